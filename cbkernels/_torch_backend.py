"""Pure-PyTorch backend: runs anywhere, one pass for loss and gradient, memory-lean.

Rows are processed in chunks in float32 (float64 for float64 logits), so that besides the gradient
this never holds more than one chunk of temporaries. The math shared with the fused linear path lives in
``_torch_stages``. Its functions are the kernels of the ops ``cbkernels::cb_loss_fwd_torch`` and
``cb_loss_fwd_inplace_torch`` (defined in ``_opdefs``), so that ``torch.compile`` sees one opaque node, the
same as for the compiled backends.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _opdefs
from ._opdefs import NO_TENSORS, SIGMOID, SOFTMAX, SOFTMAX_FOCAL, WEIGHT_CLASS, LogitTensors, LossSpec, loss_dtype
from ._torch_stages import (
    check_dense_values,
    check_targets,
    dense_sample_weights,
    focal_terms,
    pow_gamma,
    reduce_rows,
    reduction_scale,
    row_weights,
    softmax_grad_,
    softmax_row_stage,
    transform_logits,
    z_loss_rows,
)

# Elements per chunk: at most CHUNK_ELEMENTS (4 MB of float32) and at most a quarter of the logits, so that the
# chunk's float32 temporaries (up to six [rows, C] buffers for the focal loss) stay well below the gradient's size;
# at least MIN_CHUNK_ELEMENTS, so that per-chunk Python overhead stays small.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_ELEMENTS = 1 << 17


def _chunk(
    z: Tensor, t: Tensor, valid: Tensor, a: Tensor, scale: Tensor, spec: LossSpec, want_grad: bool,
    out: Optional[Tensor] = None, mask_rows: bool = True, tensors: LogitTensors = NO_TENSORS,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Loss ``[R]``, (optionally) ``scale * dl/dz`` ``[R, C]`` and the rows' z-loss terms (None without z-loss) for
    one chunk, in z's dtype.

    Few fused ATen ops over the chunk, each vectorised; ``z`` may alias the caller's logits and is
    never written. ``out`` (z's dtype and shape, not aliasing z) receives the gradient directly when
    given, which saves a copy pass. ``mask_rows=False`` says every row is valid (no masking pass).
    The loss is computed on the transformed logits (SPEC section 10); the gradient is the raw logits'.
    """
    num_classes = z.shape[1]
    eps = spec.label_smoothing
    ty = t.unsqueeze(1)
    z, factor = transform_logits(z, ty, spec, tensors)
    zy = z.gather(1, ty).squeeze(1)
    grad = None
    if spec.loss_type in (SOFTMAX, SOFTMAX_FOCAL):
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
        loss, coef = softmax_row_stage(nll, q, a, spec)
        if eps != 0.0:
            loss = loss - (eps / num_classes) * sum_logp  # label smoothing's spread term
        if want_grad:
            # p_y - q_y = (1 - q) - (1 - eps) - eps/C: the target column gets eps - q, every column then - eps/C.
            p.scatter_(1, ty, (eps - q).unsqueeze(1))
            grad = softmax_grad_(p, coef, scale, spec, num_classes)
    elif spec.loss_type == SIGMOID:
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
        loss, grad = focal_terms(z, ty, zy, a, scale, spec.gamma, want_grad)
    loss = loss * a
    z_rows = None
    if spec.z_loss != 0.0:  # not weighted by a_i (SPEC section 11); d/dz' = 2 z_loss lse p
        lse, z_rows = z_loss_rows(z, spec)
        loss = loss + z_rows
        z_rows = torch.where(valid, z_rows, torch.zeros_like(z_rows))
        if grad is not None:
            grad.add_(torch.softmax(z, 1).mul_((2.0 * spec.z_loss * lse * scale).unsqueeze(1)))
    if grad is not None and factor is not None:
        grad.mul_(factor)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if grad is not None and mask_rows:
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    if out is not None and grad is not None and grad.data_ptr() != out.data_ptr():
        out.copy_(grad)
        grad = out
    return loss, grad, z_rows


def _dense_chunk(
    z: Tensor, q: Tensor, valid: Optional[Tensor], w: Tensor, scale: Tensor, spec: LossSpec, want_grad: bool,
    tensors: LogitTensors = NO_TENSORS,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``_chunk`` for per-class targets ``q`` ``[R, C]`` (SPEC section 9; compute dtype): a dense target's rows, or
    an index target's one-hot rows under ``weight_mode="class"`` with ``valid`` marking the counted ones (None: all).
    Every difference that could cancel is formed from non-negative parts (SPEC section 6)."""
    num_classes = z.shape[1]
    if spec.weight_mode == WEIGHT_CLASS:
        a, cw = None, w
    else:
        # in float64 (rounded once): a float32 dot product over C classes is off by several ulp, and a_i scales
        # every gradient element of its row
        a, cw = dense_sample_weights(q, w, torch.float64).to(q.dtype), None
    x, factor = transform_logits(z, q, spec, tensors, dense=True)
    grad = None
    if spec.loss_type in (SOFTMAX, SOFTMAX_FOCAL):
        m = x.amax(1, keepdim=True)
        lse = torch.logsumexp(x, 1)
        if spec.loss_type == SOFTMAX:
            eps = spec.label_smoothing
            cq = q * (1.0 - eps) + eps / num_classes if eps != 0.0 else q
            cq = cq * cw if cw is not None else cq
            total = cq.sum(1)
            # sum_j cq_j (lse - x_j) as sum_j cq_j (m - x_j) + Q (lse - m): every term >= 0
            loss = (cq * (m - x)).sum(1) + total * (lse - m.squeeze(1))
            if want_grad:
                grad = torch.softmax(x, 1).mul_(total.unsqueeze(1)).sub_(cq)
        else:
            nll = lse.unsqueeze(1) - x  # >= 0
            one_minus_p = -torch.expm1(-nll)
            cq = q * cw if cw is not None else q
            mod = pow_gamma(one_minus_p, spec.gamma)
            loss = (cq * nll if mod is None else cq * mod * nll).sum(1)
            if want_grad:
                p = torch.exp(-nll)
                if mod is None:
                    c_ij = cq
                else:
                    r = torch.where(one_minus_p > 0, nll / torch.where(one_minus_p > 0, one_minus_p, 1.0), 1.0)
                    c_ij = cq * mod * (1.0 + spec.gamma * p * r)
                grad = p.mul_(c_ij.sum(1, keepdim=True)).sub_(c_ij)
    else:
        pos = x >= 0
        # softplus(x) - q x = (1 - q) x + log1p(e) for x >= 0, q |x| + log1p(e) below: no cancellation
        soft = torch.log1p(torch.exp(-x.abs()))
        ce = torch.where(pos, (1.0 - q) * x, -q * x).add_(soft)
        sp = torch.sigmoid(x)
        sn = torch.sigmoid(-x)
        diff = torch.where(pos, (1.0 - q) - sn, sp - q)  # sigmoid(x) - q
        if spec.loss_type == SIGMOID:
            elem = ce
            g = diff if want_grad else None
        else:
            one_minus_pt = q * sn + (1.0 - q) * sp  # two non-negative terms
            mod = pow_gamma(one_minus_pt, spec.gamma)
            elem = ce if mod is None else mod * ce
            g = None
            if want_grad:
                if mod is None:
                    g = diff
                else:
                    ratio = torch.where(one_minus_pt > 0,
                                        (1.0 - 2.0 * q) * sp * sn / torch.where(one_minus_pt > 0, one_minus_pt, 1.0),
                                        0.0)
                    g = mod * (spec.gamma * ratio * ce + diff)
        if cw is not None:
            elem = elem * cw
            g = g * cw if g is not None else None
        loss = elem.sum(1)
        grad = g
    if a is not None:
        loss = loss * a
        if grad is not None:
            grad = grad * (a * scale).unsqueeze(1)
    elif grad is not None:
        grad = grad * scale
    z_rows = None
    if spec.z_loss != 0.0:
        lse, z_rows = z_loss_rows(x, spec)
        loss = loss + z_rows
        if grad is not None:
            grad.add_(torch.softmax(x, 1).mul_((2.0 * spec.z_loss * lse * scale).unsqueeze(1)))
    if grad is not None and factor is not None:
        grad = grad * factor
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if z_rows is not None:
            z_rows = torch.where(valid, z_rows, torch.zeros_like(z_rows))
        if grad is not None:
            grad = grad.masked_fill(~valid.unsqueeze(1), 0.0)
    return loss, grad, z_rows


def _run_dense(logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, spec: LossSpec,
               grad_out: Optional[Tensor], tensors: LogitTensors = NO_TENSORS) -> Tensor:
    """``_run`` for dense targets, or index targets under ``weight_mode="class"`` (their one-hot rows, a chunk at
    a time)."""
    n, c = logits.shape
    cdtype = loss_dtype(logits.dtype)
    loss = torch.empty(n, dtype=cdtype, device=logits.device)
    w = weight.to(cdtype)
    scale_c = scale.to(cdtype)
    dense = target.is_floating_point()
    rows = max(1, min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, n * c // 4)) // max(c, 1))
    with torch.autocast(logits.device.type, enabled=False):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            z = logits[r0:r1].to(cdtype)
            if dense:
                q, valid = target[r0:r1].to(cdtype), None
            else:
                valid, t, _ = row_weights(target[r0:r1], weight, spec, cdtype)
                q = torch.zeros_like(z).scatter_(1, t.unsqueeze(1), valid.to(cdtype).unsqueeze(1))
            l_rows, g, z_rows = _dense_chunk(z, q, valid, w, scale_c, spec, grad_out is not None, tensors)
            loss[r0:r1] = l_rows
            if tensors.z_rows is not None:
                tensors.z_rows[r0:r1] = z_rows if z_rows is not None else 0.0
            if grad_out is not None:
                grad_out[r0:r1].copy_(g)
    return loss


def _run(logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, spec: LossSpec,
         grad_out: Optional[Tensor], tensors: LogitTensors = NO_TENSORS) -> Tensor:
    if target.is_floating_point() or spec.weight_mode == WEIGHT_CLASS:
        return _run_dense(logits, target, weight, scale, spec, grad_out, tensors)
    n, c = logits.shape
    cdtype = loss_dtype(logits.dtype)
    loss = torch.empty(n, dtype=cdtype, device=logits.device)
    valid_all, t_all, a_all = row_weights(target, weight, spec, cdtype)
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
            l_rows, g, z_rows = _chunk(z, t_all[r0:r1], valid_all[r0:r1], a_all[r0:r1], scale_c, spec,
                                       grad_out is not None, out=grad_out[r0:r1] if direct else None,
                                       mask_rows=mask_rows, tensors=tensors)
            loss[r0:r1] = l_rows
            if tensors.z_rows is not None:
                tensors.z_rows[r0:r1] = z_rows if z_rows is not None else 0.0
            if grad_out is not None and not direct:
                grad_out[r0:r1].copy_(g)
    return loss


def _prologue(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec) -> Tensor:
    """The op's target check and normaliser (a given ``scale`` replaces the reduction's)."""
    if target.is_floating_point():
        check_dense_values(target, spec)
    else:
        check_targets(target, logits.shape[1], spec.ignore_index)
    return reduction_scale(target, weight, spec, loss_dtype(logits.dtype)) if scale is None else scale


def _forward(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
             compute_grad: bool, tensors: LogitTensors = NO_TENSORS) -> Tuple[Tensor, Tensor]:
    s = _prologue(logits, target, weight, scale, spec)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    loss = _run(logits, target, weight, s, spec, grad if compute_grad else None, tensors)
    return reduce_rows(loss, s, spec), grad


def _forward_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
                     tensors: LogitTensors = NO_TENSORS) -> Tensor:
    s = _prologue(logits, target, weight, scale, spec)
    # the in-place copies bump the version
    return reduce_rows(_run(logits, target, weight, s, spec, logits, tensors), s, spec)


# The ops, so that torch.compile sees one opaque node as for the compiled backends; called with their flat arguments
# (tests, benchmarks) they run the same functions.
_opdefs.register_kernels("_torch", _forward, _forward_inplace)
forward = torch.ops.cbkernels.cb_loss_fwd_torch.default
forward_inplace = torch.ops.cbkernels.cb_loss_fwd_inplace_torch.default


def loss_fwd(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
             compute_grad: bool, tensors: LogitTensors = NO_TENSORS) -> Tuple[Tensor, Tensor]:
    """The backend's forward (see _backends): the op under torch.compile; in eager mode the function itself, which
    skips the op dispatch and the spec's flattening."""
    if torch.compiler.is_compiling():
        return forward(logits, target, weight, scale, *spec.fwd_args(compute_grad), **tensors.kwargs())
    return _forward(logits, target, weight, scale, spec, compute_grad, tensors)


def loss_fwd_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
                     tensors: LogitTensors = NO_TENSORS) -> Tensor:
    """In-place forward; eager calls bump the logits' version counter through the in-place copies they make."""
    if torch.compiler.is_compiling():
        return forward_inplace(logits, target, weight, scale, *spec.op_args(), **tensors.kwargs())
    return _forward_inplace(logits, target, weight, scale, spec, tensors)
