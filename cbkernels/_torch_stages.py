"""PyTorch stages shared by the torch backend, the fused linear path and the two autograd layers.

A leaf module (torch and ``_opdefs`` only). The softmax row stage and the focal terms are the math of SPEC sections
3-4 once, for callers that hold the row statistics in different ways: the torch backend over whole rows, the
vocabulary-parallel linear path over a shard of each row.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._opdefs import FOCAL, SIGMOID, SOFTMAX, LogitTensors, LossSpec

NO_DOUBLE_BACKWARD = (
    "cbkernels: double backward through a class-balanced loss is not supported (its backward scales a "
    "gradient computed in the forward pass)"
)


def refuse_double_backward(grad: Tensor) -> Tensor:
    """``grad`` for a backward run with create_graph=True: fine for the rest of the graph, but differentiating it
    again fails loudly rather than returning a silent zero."""
    return torch._C._functions.DelayedError(NO_DOUBLE_BACKWARD, 1)(grad.detach().requires_grad_())


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target in ``[0, C)`` or ``ignore_index``: the CPU raises ``IndexError`` naming the first bad value; on an
    accelerator (and inside a compiled graph) a device-side assert, no host sync."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            value = int(target[bad][0])
            raise IndexError(f"target holds {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}")
    else:
        torch._assert_async(~bad.any(), "cbkernels: target outside [0, C) and not ignore_index")


def flat_target(target: Tensor, num_classes: int) -> Tensor:
    """The ops' target: class indices ``[N]``, or a dense target's rows ``[N, C]`` (SPEC section 9)."""
    return target.reshape(-1, num_classes) if target.is_floating_point() else target.reshape(-1)


def reduce_rows(rows: Tensor, scale: Tensor, spec: LossSpec) -> Tensor:
    """The op's loss from the per-row losses: ``rows`` for ``"none"``, else ``scale * sum_i rows_i`` (0-d)."""
    if spec.reduction == "none":
        return rows
    return rows.sum() * scale.to(rows.dtype)


# Rows per chunk of the dense targets' passes in PyTorch (the weights' and value checks' temporaries stay small).
DENSE_CHUNK_ELEMENTS = 1 << 20


def dense_sample_weights(q: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``a_i = sum_j w_j q_ij / sum_j q_ij`` per row of a dense target ``[N, C]`` (SPEC section 9; 1 for a row
    without mass), in ``dtype``, a few rows at a time (no ``[N, C]`` temporary in ``dtype``)."""
    n, c = q.shape
    out = torch.empty(n, dtype=dtype, device=q.device)
    w = weight.to(dtype)
    rows = max(1, DENSE_CHUNK_ELEMENTS // max(c, 1))
    for r0 in range(0, n, rows):
        qc = q[r0:r0 + rows].to(dtype)
        mass = qc.sum(1)
        out[r0:r0 + rows] = torch.where(mass > 0, torch.mv(qc, w) / torch.where(mass > 0, mass, 1.0), 1.0)
    return out


def check_dense_values(q: Tensor, spec: LossSpec) -> None:
    """SPEC section 9's values on the CPU: ``ValueError`` for a NaN, a negative ``q`` or (sigmoid losses) a
    ``q > 1``, naming the first bad element; nothing elsewhere (a check would be a host sync)."""
    if q.device.type != "cpu" or torch.compiler.is_compiling() or q.numel() == 0:
        return
    sigmoid = spec.loss_type in (SIGMOID, FOCAL)
    upper = 1.0 if sigmoid else torch.finfo(q.dtype).max
    lo, hi = torch.aminmax(q)
    if bool(lo >= 0) and bool(hi <= upper):  # False for a NaN
        return
    bad = ~((q >= 0) & (q <= upper))
    row, col = (int(i) for i in bad.nonzero()[0])
    value = float(q[row, col])
    if math.isnan(value) or value < 0:
        why = "NaN" if math.isnan(value) else "negative"
    else:
        why = "above 1 (the sigmoid losses' targets are per-class probabilities)" if sigmoid else "infinite"
    raise ValueError(f"target holds {value} at row {row}, class {col}: dense targets must be finite and >= 0 (and "
                     f"<= 1 for the sigmoid losses); this one is {why}")


def reduction_scale(target: Tensor, weight: Tensor, spec: LossSpec, dtype: torch.dtype) -> Tensor:
    """0-d normaliser of ``spec.reduction`` (SPEC section 5), kept on the device (no host sync). A dense target
    (SPEC section 9): every row counts, and ``"weighted_mean"`` divides by the sample weights' sum."""
    if target.is_floating_point():
        if spec.reduction == "mean":
            return torch.full((), 1.0 / max(1, target.shape[0]), dtype=dtype, device=target.device)
        if spec.reduction == "weighted_mean":
            total = dense_sample_weights(target, weight, torch.float64).sum().to(dtype)
            return torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        return torch.ones((), dtype=dtype, device=target.device)
    valid = target != spec.ignore_index
    if spec.reduction == "mean":
        return 1.0 / valid.sum().clamp(min=1).to(dtype)
    if spec.reduction == "weighted_mean":
        a = torch.where(valid, weight[torch.where(valid, target, torch.zeros_like(target)).long()], 0.0)
        total = a.double().sum().to(dtype)  # summed in float64, rounded once (as the CPU kernels do)
        return torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    return torch.ones((), dtype=dtype, device=target.device)


def row_weights(target: Tensor, weight: Tensor, spec: LossSpec, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``(valid, t, a)`` per row: not ignored; the target, ignored rows pointed at class 0 (a safe index); the sample
    weight ``a_i = w[t_i]`` in ``dtype`` (SPEC section 2; ignored rows keep class 0's weight: callers mask them)."""
    valid = target != spec.ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    return valid, t, weight.to(dtype)[t]


def pow_gamma(x: Tensor, gamma: float) -> Optional[Tensor]:
    """``x ** gamma`` with the common gammas specialised; ``None`` stands for all ones (gamma 0)."""
    if gamma == 0.0:
        return None
    if gamma == 1.0:
        return x
    if gamma == 2.0:
        return x * x
    if gamma == 0.5:
        return x.sqrt()
    return x.pow(gamma)


def softmax_row_stage(nll: Tensor, one_minus_p: Optional[Tensor], a: Tensor, spec: LossSpec) -> Tuple[Tensor, Tensor]:
    """The softmax losses' row loss and gradient coefficient from ``L = lse - z_y`` and ``1 - P`` (``P = p_y``).

    Returns ``(loss, coef)``: ``loss`` is ``(1 - eps) L`` (softmax CE; the caller adds label smoothing's spread term
    ``eps/C sum_j (lse - z_j)``, which needs the whole row) or ``(1 - P)^gamma L`` (softmax focal), before the weight
    ``a``; ``coef`` is ``a`` or ``a c_i`` of SPEC section 4, the factor of the row's ``p - q``. ``one_minus_p``:
    ``1 - P`` when the caller has it accurately, else ``None`` (then ``-expm1(-L)``; the focal loss only).
    """
    if spec.loss_type == SOFTMAX:
        eps = spec.label_smoothing
        return (nll if eps == 0.0 else (1.0 - eps) * nll), a
    if one_minus_p is None:
        one_minus_p = -torch.expm1(-nll)
    mod = pow_gamma(one_minus_p, spec.gamma)
    if mod is None:
        return nll, a
    # r = L / (1 - P) -> 1 as 1 - P underflows; keeps gamma < 1 finite (SPEC section 4).
    r = torch.where(one_minus_p > 0, nll / one_minus_p, torch.ones_like(nll))
    return mod * nll, a * mod * (1.0 + spec.gamma * torch.exp(-nll) * r)


def softmax_grad_(g: Tensor, coef: Tensor, scale: Tensor, spec: LossSpec, num_classes: int) -> Tensor:
    """``scale * coef * (p - q)`` in place, from ``g = p - (1 - eps) t`` (label smoothing's ``eps / C`` is
    subtracted here)."""
    if spec.label_smoothing != 0.0:
        g.sub_(spec.label_smoothing / num_classes)
    return g.mul_((coef * scale).unsqueeze(1))


def focal_terms(z: Tensor, ty: Tensor, zy: Tensor, a: Tensor, scale: Tensor, gamma: float, want_grad: bool,
                owned: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The sigmoid focal loss (the paper's CB_focal, SPEC sections 3-4) of a block of columns: the row sums of the
    per-element terms ``[R]`` (before the weight) and, with ``want_grad``, ``a * scale * dl/dz`` ``[R, C]``.

    Every element is first taken as a non-target (t = 0: v = -z, u = softplus(z), q = sigmoid(-z)), then the one
    target column per row (``ty``, logit ``zy``) is overwritten with its own value: no one-hot, no sign flips.
    ``owned`` (``[R]`` bool, the vocabulary-parallel path): rows whose target lies in this block; the others keep
    ``ty``'s column as a non-target. ``z`` is never written.
    """
    p = torch.sigmoid(z)
    u = F.softplus(z)
    mod = pow_gamma(p, gamma)
    elem = u if mod is None else mod * u
    tu = F.softplus(-zy)  # target: u = softplus(-z_y), 1 - q = sigmoid(-z_y), q = sigmoid(z_y)
    tq = torch.sigmoid(zy)
    t1q = torch.sigmoid(-zy)
    tmod = pow_gamma(t1q, gamma)
    tloss = tu if tmod is None else tmod * tu
    if owned is not None:
        tloss = torch.where(owned, tloss, elem.gather(1, ty).squeeze(1))
    rows = elem.scatter(1, ty, tloss.unsqueeze(1)).sum(1)
    if not want_grad:
        return rows, None
    q = torch.sigmoid(-z)  # 1 - p without the cancellation of 1 - sigmoid(z)
    g = q.mul_(u).mul_(gamma).add_(p) if gamma != 0.0 else p
    if mod is not None:
        g = g.mul_(mod)
    tg = gamma * tq * tu + t1q
    tg = -(tg if tmod is None else tmod * tg)
    if owned is not None:
        tg = torch.where(owned, tg, g.gather(1, ty).squeeze(1))
    g = g.scatter_(1, ty, tg.unsqueeze(1))
    return rows, g.mul_((a * scale).unsqueeze(1))


def transform_logits(z: Tensor, ty: Tensor, spec: LossSpec, tensors: LogitTensors, dense: bool = False):
    """The logit transforms of SPEC section 10 on a block of rows ``z`` (compute dtype, never written), in SPEC's
    order: ``(z', dz'/dz)``, the factor a tensor (softcap), the float scale, or None when it is 1 (and ``z'`` then
    ``z`` itself when nothing is on).
    ``ty`` ``[R, 1]``: the rows' target columns (the margin's); with ``dense``, the per-class targets ``q`` ``[R, C]``
    (the margin is then ``m_j q_ij``)."""
    x, factor = z, None
    if spec.softcap != 0.0:
        u = z / spec.softcap
        x = torch.tanh(u) * spec.softcap
        # sech^2 = 4 e / (1 + e)^2, e = exp(-2|u|): 1 - tanh^2 cancels where tanh saturates (0.3% off at |u| = 6)
        e = torch.exp(-2.0 * u.abs())
        factor = 4.0 * e / (1.0 + e).square()
    if tensors.logit_offset is not None:
        x = x + tensors.logit_offset.to(z.dtype)
    if tensors.target_margin is not None:
        if dense:
            x = x - tensors.target_margin.to(z.dtype) * ty
        else:
            if x is z:
                x = z.clone()
            x.scatter_add_(1, ty, -tensors.target_margin.to(z.dtype)[ty])
    if spec.logit_scale != 1.0:
        x = x * spec.logit_scale
        factor = spec.logit_scale if factor is None else factor.mul_(spec.logit_scale)
    return x, factor


def z_loss_rows(x: Tensor, spec: LossSpec) -> Tuple[Tensor, Tensor]:
    """``(lse(z'), z_loss * lse(z')**2)`` per row of the transformed logits (SPEC section 11)."""
    lse = torch.logsumexp(x, 1)
    return lse, spec.z_loss * lse * lse
