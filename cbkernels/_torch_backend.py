"""Pure-PyTorch backend: runs anywhere, one pass for loss and gradient, memory-lean.

Rows are processed in chunks in float32 (float64 for float64 logits), so that besides the gradient
this never holds more than one chunk of temporaries. The ops are registered as custom ops so that
``torch.compile`` sees one opaque node, the same as for the compiled backends.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3

# Elements per chunk: big enough that Python overhead is small, small enough that the chunk's
# float32 temporaries (a handful of [rows, C] buffers) stay near the cache.
CHUNK_ELEMENTS = 1 << 18


def _pow_gamma(x: Tensor, gamma: float) -> Optional[Tensor]:
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


def _chunk(
    z: Tensor, t: Tensor, valid: Tensor, a: Tensor, scale: Tensor,
    loss_type: int, gamma: float, eps: float, want_grad: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Loss ``[R]`` and (optionally) ``scale * dl/dz`` ``[R, C]`` for one chunk, in z's dtype.

    ``z`` may alias the caller's logits: it is never written.
    """
    rows, num_classes = z.shape
    ty = t.unsqueeze(1)
    zy = z.gather(1, ty).squeeze(1)
    grad = None
    if loss_type in (SOFTMAX, SOFTMAX_FOCAL):
        m = z.amax(1, keepdim=True)
        p = (z - m).exp_()
        s = p.sum(1, keepdim=True)
        lse = (m + s.log()).squeeze(1)
        nll = lse - zy
        if loss_type == SOFTMAX:
            loss = nll if eps == 0.0 else (1.0 - eps) * nll + eps * (lse - z.mean(1))
            coef = a
        else:
            one_minus_p = -torch.expm1(-nll)
            mod = _pow_gamma(one_minus_p, gamma)
            loss = nll if mod is None else mod * nll
            if mod is None:
                coef = a
            else:
                # r = L / (1 - P) -> 1 as 1 - P underflows; keeps gamma < 1 finite (SPEC section 4).
                r = torch.where(one_minus_p > 0, nll / one_minus_p, torch.ones_like(nll))
                coef = a * mod * (1.0 + gamma * torch.exp(-nll) * r)
        if want_grad:
            p.div_(s)
            p.scatter_add_(1, ty, torch.full_like(zy, -(1.0 - eps)).unsqueeze(1))
            if eps != 0.0:
                p.sub_(eps / num_classes)
            grad = p.mul_((coef * scale).unsqueeze(1))
    else:
        # One exp(-|z|) per element gives sigmoid(z), sigmoid(-z) and softplus together.
        e = z.abs().neg_().exp_()
        log1p_e = torch.log1p(e)
        inv = (1.0 + e).reciprocal_()
        sig_pos = inv  # sigmoid(|z|)
        sig_neg = e * inv  # sigmoid(-|z|)
        nonneg = z >= 0
        if loss_type == SIGMOID:
            loss = (z.clamp(min=0) + log1p_e).sum(1) - zy
            if want_grad:
                grad = torch.where(nonneg, sig_pos, sig_neg)
                grad.scatter_add_(1, ty, torch.full_like(zy, -1.0).unsqueeze(1))
                grad.mul_((a * scale).unsqueeze(1))
        else:
            # v = s z with s = +1 on the target, -1 elsewhere; u = softplus(-v); q = sigmoid(v).
            is_t = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ty, True)
            v_nonneg = nonneg == is_t
            v = torch.where(is_t, z, -z)
            u = (-v).clamp_(min=0).add_(log1p_e)
            one_minus_q = torch.where(v_nonneg, sig_neg, sig_pos)
            mod = _pow_gamma(one_minus_q, gamma)
            loss = (u if mod is None else mod * u).sum(1)
            if want_grad:
                if gamma == 0.0:
                    g = one_minus_q.clone()
                else:
                    q = torch.where(v_nonneg, sig_pos, sig_neg)
                    g = q.mul_(u).mul_(gamma).add_(one_minus_q).mul_(mod)
                g = torch.where(is_t, -g, g)
                grad = g.mul_((a * scale).unsqueeze(1))
    loss = torch.where(valid, loss * a, torch.zeros_like(loss))
    if grad is not None:
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    return loss, grad


def _run(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int, grad_out: Optional[Tensor],
) -> Tensor:
    n, c = logits.shape
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=cdtype, device=logits.device)
    valid_all = target != ignore_index
    t_all = torch.where(valid_all, target, torch.zeros_like(target)).long()
    a_all = weight.to(cdtype)[t_all]
    scale_c = scale.to(cdtype)
    rows = max(1, CHUNK_ELEMENTS // max(c, 1))
    with torch.autocast(logits.device.type, enabled=False):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            z = logits[r0:r1].to(cdtype)
            l_rows, g = _chunk(z, t_all[r0:r1], valid_all[r0:r1], a_all[r0:r1], scale_c,
                               loss_type, gamma, label_smoothing, grad_out is not None)
            loss[r0:r1] = l_rows
            if grad_out is not None:
                grad_out[r0:r1].copy_(g)
    return loss


@torch.library.custom_op("cbkernels::cb_loss_fwd_torch", mutates_args=())
def forward(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int, compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    loss = _run(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index,
                grad if compute_grad else None)
    return loss, grad


@forward.register_fake
def _(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad):
    ldtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty(logits.shape[:1], dtype=ldtype)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return loss, grad


@torch.library.custom_op("cbkernels::cb_loss_fwd_inplace_torch", mutates_args=("logits",))
def forward_inplace(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int,
) -> Tensor:
    return _run(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, logits)


@forward_inplace.register_fake
def _(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index):
    ldtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(logits.shape[:1], dtype=ldtype)
