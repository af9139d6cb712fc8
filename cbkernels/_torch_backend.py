"""Pure-PyTorch backend: runs anywhere, one pass for loss and gradient, memory-lean.

Rows are processed in chunks in float32 (float64 for float64 logits), so that besides the gradient
this never holds more than one chunk of temporaries. The ops are registered as custom ops so that
``torch.compile`` sees one opaque node, the same as for the compiled backends.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backends import fake_forward, fake_forward_inplace

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3

# Elements per chunk: at most CHUNK_ELEMENTS (4 MB of float32) and at most a quarter of the logits, so that the
# chunk's float32 temporaries (up to six [rows, C] buffers for the focal loss) stay well below the gradient's size;
# at least MIN_CHUNK_ELEMENTS, so that per-chunk Python overhead stays small.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_ELEMENTS = 1 << 17


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
    loss_type: int, gamma: float, eps: float, want_grad: bool, out: Optional[Tensor] = None,
    mask_rows: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Loss ``[R]`` and (optionally) ``scale * dl/dz`` ``[R, C]`` for one chunk, in z's dtype.

    Few fused ATen ops over the chunk, each vectorised; ``z`` may alias the caller's logits and is
    never written. ``out`` (z's dtype and shape, not aliasing z) receives the gradient directly when
    given, which saves a copy pass. ``mask_rows=False`` says every row is valid (no masking pass).
    """
    num_classes = z.shape[1]
    ty = t.unsqueeze(1)
    zy = z.gather(1, ty).squeeze(1)
    grad = None
    if loss_type in (SOFTMAX, SOFTMAX_FOCAL):
        # log_softmax then exp: p stays accurate and -log p_y never sees log(0). The target's column of p is then
        # replaced so that 1 - p_y = sum_{j != y} p_j is summed, not subtracted: it keeps full relative precision
        # on confident rows, where 1 - p_y and -log p_y would cancel to 0 in float32 (SPEC section 6).
        sum_logp = None
        if eps == 0.0:
            # softmax directly (one pass fewer than log_softmax + exp); -log p_y is accurate while p_y is a normal
            # number, and for rows where it is not, lse - z_y (large then) comes from logsumexp.
            p = torch.softmax(z, 1, out=out) if want_grad and out is not None else torch.softmax(z, dim=1)
            p_y = p.gather(1, ty).squeeze(1)
            nll_direct = -torch.log(p_y)
            tiny = p_y < torch.finfo(p_y.dtype).tiny
            if p.device.type != "cpu" or bool(tiny.any()):  # the check is free on the CPU, a sync elsewhere
                nll_direct = torch.where(tiny, torch.logsumexp(z, 1) - zy, nll_direct)
        else:
            logp = torch.log_softmax(z, 1, out=out) if want_grad and out is not None else torch.log_softmax(z, dim=1)
            nll_direct = -logp.gather(1, ty).squeeze(1)
            sum_logp = logp.sum(1)
            p = logp.exp_()
        p.scatter_(1, ty, 0.0)
        q = p.sum(1)  # 1 - p_y
        nll = torch.where(q < 0.5, -torch.log1p(-q), nll_direct)
        if loss_type == SOFTMAX:
            loss = nll if eps == 0.0 else (1.0 - eps) * nll - (eps / num_classes) * sum_logp
            coef = a
        else:
            mod = _pow_gamma(q, gamma)
            loss = nll if mod is None else mod * nll
            if mod is None:
                coef = a
            else:
                # r = L / (1 - P) -> 1 as 1 - P underflows; keeps gamma < 1 finite (SPEC section 4).
                r = torch.where(q > 0, nll / q, torch.ones_like(nll))
                coef = a * mod * (1.0 + gamma * torch.exp(-nll) * r)
        if want_grad:
            # p_y - q_y = (1 - q) - (1 - eps) - eps/C: the target column gets eps - q, every column then - eps/C.
            p.scatter_(1, ty, (eps - q).unsqueeze(1))
            if eps != 0.0:
                p.sub_(eps / num_classes)
            grad = p.mul_((coef * scale).unsqueeze(1))
    elif loss_type == SIGMOID:
        # softplus(z) = log1p(exp(z)) in ATen, or z past its threshold: accurate for every finite z. The target's
        # term softplus(-z_y) is put in its column rather than subtracting z_y from a sum (which cancels).
        elem = F.softplus(z)
        elem.scatter_(1, ty, F.softplus(-zy).unsqueeze(1))
        loss = elem.sum(1)
        if want_grad:
            grad = torch.sigmoid(z) if out is None else torch.sigmoid(z, out=out)
            grad.scatter_(1, ty, torch.sigmoid(-zy).neg_().unsqueeze(1))  # sigmoid(z_y) - 1 without cancellation
            grad.mul_((a * scale).unsqueeze(1))
    else:
        # Every element as a non-target (t = 0: v = -z, u = softplus(z), q = sigmoid(-z)), then the
        # one target column per row is overwritten with its own value: no one-hot, no sign flips.
        p = torch.sigmoid(z)
        u = F.softplus(z)
        mod = _pow_gamma(p, gamma)
        elem = u if mod is None else mod * u
        tu = F.softplus(-zy)  # target: u = softplus(-z_y), 1 - q = sigmoid(-z_y), q = sigmoid(z_y)
        tq = torch.sigmoid(zy)
        t1q = torch.sigmoid(-zy)
        tmod = _pow_gamma(t1q, gamma)
        tloss = tu if tmod is None else tmod * tu
        loss = elem.scatter(1, ty, tloss.unsqueeze(1)).sum(1)
        if want_grad:
            q = torch.sigmoid(-z)  # 1 - p without the cancellation of 1 - sigmoid(z)
            g = q.mul_(u).mul_(gamma).add_(p) if gamma != 0.0 else p
            if mod is not None:
                g = g.mul_(mod)
            tg = gamma * tq * tu + t1q
            tg = -(tg if tmod is None else tmod * tg)
            g = g.scatter_(1, ty, tg.unsqueeze(1))
            grad = g.mul_((a * scale).unsqueeze(1))
    loss = torch.where(valid, loss * a, torch.zeros_like(loss))
    if grad is not None and mask_rows:
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    if out is not None and grad is not None and grad.data_ptr() != out.data_ptr():
        out.copy_(grad)
        grad = out
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
    rows = max(1, min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, n * c // 4)) // max(c, 1))
    # Ignored rows need their gradient zeroed (a zero weight would not clear a NaN logit). On the CPU the check
    # is free; elsewhere it would be a host sync, so the masking pass always runs there.
    mask_rows = logits.device.type != "cpu" or not bool(valid_all.all())
    # The gradient is written straight into grad_out when it has the compute dtype and does not alias the
    # logits (in place, or a dtype cast, goes through one chunk-sized temporary and a copy).
    direct = grad_out is not None and grad_out.dtype == cdtype and grad_out.data_ptr() != logits.data_ptr()
    with torch.autocast(logits.device.type, enabled=False):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            z = logits[r0:r1].to(cdtype)
            l_rows, g = _chunk(z, t_all[r0:r1], valid_all[r0:r1], a_all[r0:r1], scale_c,
                               loss_type, gamma, label_smoothing, grad_out is not None,
                               out=grad_out[r0:r1] if direct else None, mask_rows=mask_rows)
            loss[r0:r1] = l_rows
            if grad_out is not None and not direct:
                grad_out[r0:r1].copy_(g)
    return loss


def _forward(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int, compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    loss = _run(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index,
                grad if compute_grad else None)
    return loss, grad


def _forward_inplace(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int,
) -> Tensor:
    return _run(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, logits)


# Registered as custom ops, so that torch.compile sees one opaque node as for the compiled backends.
forward_op = torch.library.custom_op("cbkernels::cb_loss_fwd_torch", _forward, mutates_args=())
forward_op.register_fake(fake_forward)
forward_inplace_op = torch.library.custom_op("cbkernels::cb_loss_fwd_inplace_torch", _forward_inplace,
                                             mutates_args=("logits",))
forward_inplace_op.register_fake(fake_forward_inplace)


def forward(*args) -> Tuple[Tensor, Tensor]:
    """The backend's forward (see _backends): the custom op under torch.compile; in eager mode the function itself,
    which skips the Python custom-op dispatch (about 0.6 ms a call, as much as the whole loss at 1024 x 1000)."""
    return (forward_op if torch.compiler.is_compiling() else _forward)(*args)


def forward_inplace(*args) -> Tensor:
    """In-place forward; eager calls bump the logits' version counter through the in-place copies they make."""
    return (forward_inplace_op if torch.compiler.is_compiling() else _forward_inplace)(*args)
