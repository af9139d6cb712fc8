"""The naive, readable class-balanced losses, written straight from SPEC's formulas (docs/spec.md).

Autograd does the gradient. This is the test oracle, run in float64. (The benchmarks' "naive" baseline, the
official code's style at the working dtype, lives with them: ``benchmarks/harness.py``.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) = logaddexp(x, 0): stable for every x, and autograd gives exactly sigmoid(x), 0.5 at x = 0
    # (max(x, 0) + log1p(exp(-|x|)) is as stable, but autograd would take clamp's and abs's one-sided
    # derivatives at x = 0 and return 1 there).
    return torch.logaddexp(x, torch.zeros_like(x))


def _transform(z: Tensor, q: Tensor, softcap, logit_offset, target_margin, logit_scale: float) -> Tensor:
    """SPEC section 10's transforms in its order; the margin scaled by the per-class target ``q`` (one-hot rows for
    class indices)."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if logit_offset is not None:
        z = z + logit_offset.to(z.dtype)
    if target_margin is not None:
        z = z - target_margin.to(z.dtype)[None, :] * q
    return z * logit_scale


def reference_loss(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    loss_type: str = "focal",
    gamma: float = 0.5,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    logit_offset: Optional[Tensor] = None,
    target_margin: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    weight_mode: str = "sample",
):
    """Class-balanced loss (SPEC sections 2-5, 9-11) in the dtype of ``logits``.

    ``weight`` is the ``[C]`` class weight (ones when None); the per-sample weight is
    ``a_i = weight[target_i]``, 0 for ignored rows. The transforms apply in SPEC section 10's order; with
    ``return_z_loss`` the result is ``(loss, z_term)``. A floating ``target`` of the logits' shape is a dense target
    (SPEC section 9), weighted per ``weight_mode`` ("sample" or "class"); index targets with ``weight_mode="class"``
    are their one-hot rows (ignored rows: none).
    """
    if target.is_floating_point() or weight_mode != "sample":
        return _dense_reference(logits, target, weight, loss_type=loss_type, gamma=gamma, reduction=reduction,
                                ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                                logit_offset=logit_offset, target_margin=target_margin, logit_scale=logit_scale,
                                z_loss=z_loss, return_z_loss=return_z_loss, weight_mode=weight_mode)
    c = logits.shape[-1]
    z = logits.reshape(-1, c)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    w = torch.ones(c, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    a = torch.where(valid, w[t_safe], torch.zeros((), dtype=z.dtype, device=z.device))
    onehot = F.one_hot(t_safe, c).to(z.dtype)
    z = _transform(z, onehot, softcap, logit_offset, target_margin, logit_scale)

    if loss_type == "softmax":
        lse = torch.logsumexp(z, dim=1)
        nll = lse - z.gather(1, t_safe[:, None])[:, 0]
        smooth = (lse[:, None] - z).sum(1)
        per = (1 - label_smoothing) * nll + (label_smoothing / c) * smooth
    elif loss_type == "sigmoid":
        per = (_softplus(z) - onehot * z).sum(1)
    elif loss_type == "focal":
        bce = _softplus(z) - onehot * z
        modulator = torch.exp(-gamma * (onehot * z + _softplus(-z)))
        per = (modulator * bce).sum(1)
    elif loss_type == "softmax_focal":
        nll = torch.logsumexp(z, dim=1) - z.gather(1, t_safe[:, None])[:, 0]
        one_minus_p = -torch.expm1(-nll)
        if gamma == 0:
            per = nll
        else:
            # (1-P)^gamma has an infinite slope at P = 1 for gamma < 1, and autograd would form
            # inf * 0 there; the loss is flat in that limit, so select 0 rather than differentiate.
            safe = torch.where(one_minus_p > 0, one_minus_p, torch.ones_like(one_minus_p))
            per = torch.where(one_minus_p > 0, safe**gamma, torch.zeros_like(safe)) * nll
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    zero = torch.zeros((), dtype=per.dtype, device=per.device)
    zrows = torch.where(valid, z_loss * torch.logsumexp(z, dim=1) ** 2, zero) if z_loss else torch.zeros_like(per)
    per = torch.where(valid, a * per, zero) + zrows
    loss = _reduce(per, valid, a, reduction, target.shape)
    return (loss, _reduce(zrows, valid, a, reduction, target.shape).detach()) if return_z_loss else loss


def _reduce(per: Tensor, valid: Tensor, a: Tensor, reduction: str, shape) -> Tensor:
    if reduction == "none":
        return per.reshape(shape)
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.sum() / valid.sum().clamp(min=1)
    if reduction == "weighted_mean":
        total = a.sum()
        return torch.where(total > 0, per.sum() / torch.where(total > 0, total, 1), 0 * per.sum())
    raise ValueError(f"unknown reduction {reduction!r}")



def _pow_or_zero(x: Tensor, gamma: float) -> Tensor:
    """``x ** gamma`` for ``x >= 0``, 0 at ``x == 0`` with a zero (not an infinite) slope there: the loss is flat in
    that limit, and autograd would form inf * 0."""
    if gamma == 0:
        return torch.ones_like(x)
    safe = torch.where(x > 0, x, torch.ones_like(x))
    return torch.where(x > 0, safe**gamma, torch.zeros_like(x))


def _dense_reference(logits: Tensor, target: Tensor, weight: Optional[Tensor], *, loss_type: str, gamma: float,
                     reduction: str, ignore_index: int, label_smoothing: float, softcap, logit_offset, target_margin,
                     logit_scale: float, z_loss: float, return_z_loss: bool, weight_mode: str):
    """SPEC section 9: per-class probabilities ``q`` (a dense target, or an index target's one-hot rows, ignored
    rows all zero and not counted)."""
    if weight_mode not in ("sample", "class"):
        raise ValueError(f"unknown weight_mode {weight_mode!r}")
    c = logits.shape[-1]
    z = logits.reshape(-1, c)
    if target.is_floating_point():
        q = target.reshape(-1, c).to(z.dtype)
        valid = torch.ones(q.shape[0], dtype=torch.bool, device=z.device)
        out_shape = target.shape[:-1]
    else:
        t = target.reshape(-1).long()
        valid = t != ignore_index
        q = F.one_hot(torch.where(valid, t, torch.zeros_like(t)), c).to(z.dtype) * valid[:, None]
        out_shape = target.shape
    w = torch.ones(c, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    mass = q.sum(1)
    # the sample weight: the weights' mean under q, 1 for a row without mass; 0 for an ignored row
    sample_a = torch.where(mass > 0, (q * w).sum(1) / torch.where(mass > 0, mass, torch.ones_like(mass)), 1.0)
    sample_a = torch.where(valid, sample_a, torch.zeros_like(sample_a))
    a = sample_a if weight_mode == "sample" else valid.to(z.dtype)
    cw = torch.ones_like(w) if weight_mode == "sample" else w
    z = _transform(z, q, softcap, logit_offset, target_margin, logit_scale)

    lse = torch.logsumexp(z, dim=1)
    if loss_type == "softmax":
        qs = (1 - label_smoothing) * q + label_smoothing / c
        per = (cw * qs * (lse[:, None] - z)).sum(1)
    elif loss_type == "sigmoid":
        per = (cw * (_softplus(z) - q * z)).sum(1)
    elif loss_type == "focal":
        one_minus_pt = q * torch.sigmoid(-z) + (1 - q) * torch.sigmoid(z)  # torchvision / mmdet
        per = (cw * _pow_or_zero(one_minus_pt, gamma) * (_softplus(z) - q * z)).sum(1)
    elif loss_type == "softmax_focal":
        nll = lse[:, None] - z
        per = (cw * q * _pow_or_zero(-torch.expm1(-nll), gamma) * nll).sum(1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    zero = torch.zeros((), dtype=per.dtype, device=per.device)
    zrows = torch.where(valid, z_loss * lse**2, zero) if z_loss else torch.zeros_like(per)
    per = torch.where(valid, a * per, zero) + zrows
    loss = _reduce(per, valid, sample_a, reduction, out_shape)
    return (loss, _reduce(zrows, valid, sample_a, reduction, out_shape).detach()) if return_z_loss else loss
