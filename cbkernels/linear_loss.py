"""Class-balanced losses fused with the output projection, for large vocabularies (LM heads).

``linear_cb_loss(hidden, lm_weight, target, ...)`` equals
``class_balanced_loss(hidden @ lm_weight.T + bias, target, ...)`` (SPEC sections 3-5) without ever
holding the ``[N, V]`` logits: rows are walked in chunks; each chunk's logits are computed, turned into
``scale * dl/dz`` in place by the fused loss backend, and consumed right away by
``grad_hidden[chunk] = g @ W``, ``grad_W += g.T @ hidden[chunk]`` and ``grad_bias += g.sum(0)``. The
extra memory is one chunk of logits plus the float32 gradient accumulators (for float32 inputs the
accumulators are the returned gradients themselves).

Autograd (SPEC section 7): with a scalar reduction the gradients are computed in the forward pass and
backward only scales them by ``grad_output``. By default backward scales them in place and hands them
over (no weight-sized copy, the same contract as ``torch.nn.functional.linear_cross_entropy``'s chunked
path), so a second backward through the same graph raises; ``allow_retain_graph=True`` scales out of
place instead, at the cost of one transient copy of each gradient. ``reduction="none"`` cannot be
precomputed (``grad_W`` sums per-row gradients weighted by a ``grad_output`` that only backward
knows): the forward computes the loss alone and backward runs the chunk loop again with the per-row
``grad_output`` folded into the gradient, one extra logits matmul per chunk.

Vocabulary parallel (``process_group``): each rank holds a contiguous shard ``lm_weight[V_r, H]`` (and
``bias[V_r]``), ranks ordered by their rank in the group; ``hidden`` and ``target`` (GLOBAL class ids)
are the same on every rank. See ``linear_cb_loss`` for the details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validation as V
from ._backends import get_backend, resolve_backend
from ._opdefs import (
    FOCAL,
    NO_TENSORS,
    SIGMOID,
    SOFTMAX,
    SOFTMAX_FOCAL,
    WEIGHT_CLASS,
    WEIGHT_SAMPLE,
    LogitTensors,
    LossSpec,
    loss_dtype,
)
from ._torch_stages import (
    check_targets,
    flat_target,
    focal_terms,
    reduction_scale,
    refuse_double_backward,
    row_weights,
    softmax_grad_,
    softmax_row_stage,
)
from .weights import ReweightMixin

# Smallest default chunk: below ~64 rows the two gradient matmuls run far from peak and the rank-R
# update of the V x H accumulator becomes memory-bound (it reads and writes V*H floats per chunk).
MIN_CHUNK_ROWS = 64


def default_chunk_size(num_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk when ``chunk_size`` is not given.

    A chunk's logits ``[rows, V]`` may be as large as ``hidden`` or as a quarter of ``lm_weight``,
    whichever is larger: both are sizes the caller already pays for (``grad_hidden`` has the size of
    ``hidden``; the ``grad_W`` accumulator that of ``lm_weight``), so the chunk adds at most a constant
    fraction to them. ``rows >= MIN_CHUNK_ROWS`` keeps the matmuls efficient. ``vocab_size`` is the
    global vocabulary in vocab-parallel mode so that every rank picks the same chunking.
    """
    budget = max(num_rows * hidden_size, (vocab_size * hidden_size) // 4)
    rows = max(MIN_CHUNK_ROWS, budget // max(vocab_size, 1))
    return max(1, min(rows, num_rows))


@dataclass(frozen=True)
class _VocabShard:
    group: object  # torch.distributed.ProcessGroup
    start: int  # first global class id held by this rank
    total: int  # V over all ranks


@dataclass(frozen=True)
class _Config:
    spec: LossSpec
    chunk_rows: int
    backend: str  # resolved name; unused by the vocab-parallel path
    allow_retain_graph: bool
    shard: Optional[_VocabShard]
    tensors: LogitTensors = NO_TENSORS  # the [V] transform vectors (SPEC section 10)
    return_z_loss: bool = False


# ----------------------------------------------------------------------------------------------------
# Validation (API edge)


def _check_hidden(hidden) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in V.LOGIT_DTYPES:
        raise TypeError(f"hidden must be float32, float16, bfloat16 (or float64), got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")


def _check_shard(hidden: Tensor, lm_weight, bias, chunk_size, *, allow_empty: bool = False) -> None:
    """Checks of what may differ between vocab-parallel ranks (``allow_empty``: V = 0 is checked over
    all ranks after the exchange instead)."""
    if not isinstance(lm_weight, Tensor):
        raise TypeError(f"lm_weight must be a torch.Tensor, got {type(lm_weight).__name__}")
    if lm_weight.dim() != 2:
        raise ValueError(f"lm_weight must have shape [V, H], got {tuple(lm_weight.shape)}")
    if lm_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_weight has H = {lm_weight.shape[1]} but hidden has H = {hidden.shape[-1]} "
                         f"(hidden {tuple(hidden.shape)}, lm_weight {tuple(lm_weight.shape)})")
    if lm_weight.shape[0] == 0 and not allow_empty:
        raise ValueError("lm_weight holds 0 classes: need V >= 1")
    if lm_weight.dtype != hidden.dtype:
        raise TypeError(f"lm_weight is {lm_weight.dtype} but hidden is {hidden.dtype}: they must match")
    if lm_weight.device != hidden.device:
        raise ValueError(f"lm_weight is on {lm_weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != lm_weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = [{lm_weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias is {bias.dtype} but hidden is {hidden.dtype}: they must match")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 (or None), got {chunk_size!r}")


def _check_target(target, hidden: Tensor, num_classes: int, ignore_index: int) -> bool:
    """Checks ``target``; returns whether it is dense (SPEC section 9: floating ``[..., V]``, its values checked by
    each chunk's op)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() and target.shape != hidden.shape[:-1]:  # (index-shaped: the int check below)
        if target.shape != (*hidden.shape[:-1], num_classes):
            raise ValueError(f"a floating (dense) target must have shape hidden.shape[:-1] + (V,) = "
                             f"{(*hidden.shape[:-1], num_classes)}, got {tuple(target.shape)}")
        stand_in = torch.empty((), dtype=hidden.dtype, device=hidden.device).expand(target.shape)
        return V.check_logits_target(stand_in, target)
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    # The shared check wants logits: a zero-byte stand-in of shape [..., V] gives it the dtype checks without the
    # logits; the class range is checked here once (a host check on CPU, a device-side assert elsewhere), as the
    # chunks take a precomputed scale.
    stand_in = torch.empty((), dtype=hidden.dtype, device=hidden.device).expand(*hidden.shape[:-1], num_classes)
    V.check_logits_target(stand_in, target)
    check_targets(target, num_classes, ignore_index)
    return False


def _class_len(samples_per_class, weight) -> int:
    """Length of the class vector the caller gave (-1 for none), without converting it."""
    x = weight if weight is not None else samples_per_class
    if x is None:
        return -1
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() == 1 else -2
    try:
        return len(x)
    except TypeError:
        return -2


def _autocast_inputs(hidden, lm_weight, bias):
    """Under autocast the projection runs at the autocast dtype, as ``F.linear`` would."""
    dev = hidden.device.type if isinstance(hidden, Tensor) else "cpu"
    if not torch.is_autocast_enabled(dev):
        return hidden, lm_weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dt) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float64) else t

    return cast(hidden), cast(lm_weight), cast(bias)


# ----------------------------------------------------------------------------------------------------
# Vocabulary-parallel setup


def _vocab_shard(process_group, hidden, lm_weight, bias, target, samples_per_class, weight, beta, chunk_size,
                 ignore_index) -> Tuple[_VocabShard, Tensor]:
    """Gather every rank's shard size (one tiny all-gather, read on the host) and build the global
    ``[V]`` class weights.

    A rank that raised before the all-gather would leave the others waiting in it, and one that raised
    between it and the chunk loop would leave them waiting in the loop's first all-reduce. So the
    checks of what may differ between ranks (the shard and its bias, a slice of ``weight``,
    ``chunk_size``, the grad mode) run first without raising, their outcome travels in the same
    all-gather, and every decision after it reads the gathered table: all ranks raise together.
    Checks of what the contract makes identical on every rank (``hidden``, ``target``,
    ``samples_per_class``, the options) fail identically on every rank and stay local.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    _check_hidden(hidden)
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    device = hidden.device
    try:
        _check_shard(hidden, lm_weight, bias, chunk_size, allow_empty=True)
        if weight is not None:
            _check_weight_tensor(weight, device)
        error = None
    except (TypeError, ValueError) as e:
        error = e
    ok = error is None
    weight_kind = (weight is not None) + 2 * (samples_per_class is not None)
    mine = torch.tensor([lm_weight.shape[0] if ok else -1, target.numel() if isinstance(target, Tensor) else -1,
                         hidden.shape[-1], (chunk_size or 0) if ok else -1, _class_len(samples_per_class, weight),
                         int(hidden.requires_grad and torch.is_grad_enabled()), weight_kind, int(ok)],
                        dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=process_group)
    table = torch.stack(gathered).tolist()
    failed = [r for r, row in enumerate(table) if not row[7]]
    if failed:
        if error is not None:
            raise error
        raise ValueError(f"vocab-parallel: rank(s) {failed} rejected their lm_weight / bias / weight / chunk_size "
                         "(the error is raised there); every rank stops")
    sizes = [row[0] for row in table]
    total = sum(sizes)
    empty = [r for r, s in enumerate(sizes) if s == 0]
    if empty:
        raise ValueError(f"vocab-parallel: every rank's lm_weight shard must hold V_r >= 1 classes; rank(s) {empty} "
                         f"hold 0 (shard sizes per rank {sizes})")
    for col, what in ((1, "rows (hidden/target)"), (2, "hidden size H"), (3, "chunk_size"),
                      (5, "hidden.requires_grad (with grad mode on)"),
                      (6, "class weights (none, weight or samples_per_class)")):
        if len({row[col] for row in table}) != 1:
            raise ValueError(f"vocab-parallel: every rank must pass the same {what}; per rank: "
                             f"{[row[col] for row in table]}")
    lens = [row[4] for row in table]
    local_weight = weight is not None and all(n == s for n, s in zip(lens, sizes)) and total != sizes[rank]
    if weight is not None and not local_weight and any(n != total for n in lens):
        raise ValueError(f"vocab-parallel: weight must be this rank's slice [V_r] on every rank or the global "
                         f"[V] = [{total}] on every rank; lengths per rank {lens}, shard sizes {sizes}")
    if samples_per_class is not None and any(n != total for n in lens):
        raise ValueError(f"vocab-parallel: samples_per_class must hold the counts of all V = {total} classes "
                         f"on every rank (the weights are normalised over all classes); got lengths {lens}")
    if local_weight:
        weight = _gather_weight(weight, sizes, process_group)
    w = V.class_weights(samples_per_class, weight, beta, total, device)
    _check_target(target, hidden, total, ignore_index)
    return _VocabShard(process_group, sum(sizes[:rank]), total), w


def _check_weight_tensor(weight, device: torch.device) -> None:
    """``V.class_weights``'s checks of a given ``weight`` that hold for a slice too (its length is
    checked on the gathered table)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {device}")


def _gather_weight(local: Tensor, sizes, group) -> Tensor:
    import torch.distributed as dist

    width = max(sizes)
    padded = torch.zeros(width, dtype=torch.float32, device=local.device)
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------------------------------
# The chunk loop


_CUDA_ADDMM_OUT_DTYPE: Optional[bool] = None  # learnt on first use: does this torch have it?


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32/float64 and ``a, b`` possibly half precision.

    Rounding each chunk's product to bf16 before summing would add one bf16 rounding per chunk, so the
    product is formed at the accumulator's precision: cuBLAS ``out_dtype`` on CUDA when this torch has
    it for ``addmm``, else the chunk operands (chunk-sized, never the weight) are upcast.
    """
    global _CUDA_ADDMM_OUT_DTYPE
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _CUDA_ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _CUDA_ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError):  # raised on the host before any launch: acc is untouched
            _CUDA_ADDMM_OUT_DTYPE = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _sharded_chunk(z: Tensor, t_local: Tensor, owned: Tensor, valid: Tensor, a: Tensor, scale: Tensor,
                   cfg: _Config, want_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Loss of one chunk whose classes are spread over ranks; writes ``scale * dl/dz`` over ``z``.

    Returns ``(full, partial)`` per-row losses: ``full`` is complete on every rank (softmax terms that
    need the global log-sum-exp); ``partial`` is this rank's share of a sum over classes (sigmoid and
    focal rows, the label-smoothing term), summed over ranks once after the loop. Pure PyTorch at
    float32 (float64 for float64 inputs): the fused kernels need the whole row.
    """
    import torch.distributed as dist

    group, num_classes, spec = cfg.shard.group, cfg.shard.total, cfg.spec
    eps = spec.label_smoothing
    cdtype = loss_dtype(z.dtype)
    zf = z if z.dtype == cdtype else z.to(cdtype)
    ty = t_local.unsqueeze(1)
    if spec.loss_type in (SOFTMAX, SOFTMAX_FOCAL):
        partial = None
        m = zf.amax(1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        # Everything below works on logits shifted by the row max: exp cannot overflow and the
        # smoothing sum cancels far less than C * lse - sum_j z_ij would.
        zs = zf.sub_(m.unsqueeze(1))
        zy_s = torch.where(owned, zs.gather(1, ty).squeeze(1), 0.0)  # only the owner contributes
        zs_sum = zs.sum(1) if eps else None
        e = zs.exp_()
        packed = torch.stack([e.sum(1), zy_s], 1)  # one all-reduce for sum-exp and target logit
        dist.all_reduce(packed, group=group)
        s, zy_s = packed.unbind(1)
        log_s = s.log()
        main, coef = softmax_row_stage(log_s - zy_s, None, a, spec)  # from L = lse - z_y
        if eps:
            # This rank's share of sum_j (lse - z_ij), summed over ranks after the loop.
            partial = (eps / num_classes) * (z.shape[1] * log_s - zs_sum)
        full = torch.where(valid, a * main, 0.0)
        if want_grad:
            g = e.div_(s.unsqueeze(1))
            g.scatter_add_(1, ty, torch.where(owned, -(1.0 - eps), 0.0).to(cdtype).unsqueeze(1))
            softmax_grad_(g, coef, scale, spec, num_classes)
        if partial is not None:
            partial = torch.where(valid, a * partial, 0.0)
        return _finish(z, g if want_grad else None, valid, full, partial)
    zy = torch.where(owned, zf.gather(1, ty).squeeze(1), 0.0)
    if spec.loss_type == SIGMOID:
        partial = F.softplus(zf).sum(1) - zy
        g = None
        if want_grad:
            g = zf.sigmoid_()
            g.scatter_add_(1, ty, torch.where(owned, -1.0, 0.0).to(cdtype).unsqueeze(1))
            g.mul_((a * scale).unsqueeze(1))
    else:
        # The torch backend's focal terms, the target column patched only on the rank that owns it.
        partial, g = focal_terms(zf, ty, zy, a, scale, spec.gamma, want_grad, owned=owned)
    partial = torch.where(valid, a * partial, 0.0)
    return _finish(z, g, valid, None, partial)


def _finish(z: Tensor, g: Optional[Tensor], valid: Tensor, full, partial):
    if g is not None:
        g.masked_fill_(~valid.unsqueeze(1), 0.0)
        if g is not z:
            z.copy_(g)
    return full, partial


def _run_chunks(h: Tensor, w_proj: Tensor, bias: Optional[Tensor], target: Tensor, weight: Tensor,
                scale: Tensor, cfg: _Config, want: Tuple[bool, bool, bool], row_scale: Optional[Tensor] = None):
    """Per-row loss ``[N]`` and (as asked by ``want``) ``grad_hidden``, ``grad_W``, ``grad_bias``.

    ``h`` ``[N, H]``, ``w_proj`` ``[V, H]`` (this rank's shard), ``scale`` the reduction's 0-d
    normaliser; ``row_scale`` ``[N]`` (``reduction="none"`` backward) multiplies each row's gradient.
    """
    n, hidden_size = h.shape
    vocab, dtype, device = w_proj.shape[0], h.dtype, h.device
    acc = loss_dtype(dtype)
    want_h, want_w, want_b = want
    want_grad = want_h or want_w or want_b
    shard = cfg.shard
    loss = torch.zeros(n, dtype=acc, device=device)
    z_rows = torch.empty(n, dtype=acc, device=device) if cfg.return_z_loss and row_scale is None else None
    partial = torch.zeros(n, dtype=acc, device=device) if shard is not None else None
    # Vocab-parallel: every rank contributes to every row of grad_hidden, so it is summed over ranks;
    # keep the partial sums at accumulator precision until then.
    gh = torch.empty(n, hidden_size, dtype=acc if shard is not None else dtype, device=device) if want_h else None
    gw = torch.zeros(vocab, hidden_size, dtype=acc, device=device) if want_w else None
    gb = torch.zeros(vocab, dtype=acc, device=device) if want_b else None
    rows = min(cfg.chunk_rows, n)
    buf = torch.empty(rows, vocab, dtype=dtype, device=device)
    spec = cfg.spec
    if shard is None:
        fwd, fwd_inplace = get_backend(cfg.backend).functions()
        chunk_spec = spec._replace(reduction="none")  # per-row losses, the gradient scaled by the whole call's scale
    else:
        valid, _, a_all = row_weights(target, weight, spec, acc)
        t_local = target.long() - shard.start
        owned = valid & (t_local >= 0) & (t_local < vocab)
        t_local = torch.where(owned, t_local, 0)
        scale_c = scale.to(acc)
    with torch.autocast(device.type, enabled=False):
        for r0 in range(0, n, max(rows, 1)):
            r1 = min(n, r0 + rows)
            z, hc = buf[: r1 - r0], h[r0:r1]
            if bias is None:
                torch.mm(hc, w_proj.t(), out=z)
            else:
                torch.addmm(bias, hc, w_proj.t(), out=z)
            if shard is not None:
                s = scale_c if row_scale is None else scale_c * row_scale[r0:r1].to(acc)
                full, part = _sharded_chunk(z, t_local[r0:r1], owned[r0:r1], valid[r0:r1], a_all[r0:r1], s,
                                            cfg, want_grad)
                if full is not None:
                    loss[r0:r1] = full
                if part is not None:
                    partial[r0:r1] = part
            elif want_grad:
                tensors = cfg.tensors if z_rows is None else cfg.tensors._replace(z_rows=z_rows[r0:r1])
                loss[r0:r1] = fwd_inplace(z, target[r0:r1], weight, scale, chunk_spec, tensors)
                if row_scale is not None:
                    z.mul_(row_scale[r0:r1].unsqueeze(1))  # computed at row_scale's precision, rounded once
            else:
                tensors = cfg.tensors if z_rows is None else cfg.tensors._replace(z_rows=z_rows[r0:r1])
                loss[r0:r1] = fwd(z, target[r0:r1], weight, scale, chunk_spec, False, tensors)[0]
            if want_h:
                if gh.dtype == dtype:
                    torch.mm(z, w_proj, out=gh[r0:r1])
                else:
                    gh[r0:r1] = torch.mm(z, w_proj)
            if want_w:
                _accumulate_mm(gw, z.t(), hc)
            if want_b:
                gb.add_(z.sum(0, dtype=acc))
    if shard is not None:
        import torch.distributed as dist

        if spec.loss_type in (SIGMOID, FOCAL) or spec.label_smoothing:
            dist.all_reduce(partial, group=shard.group)
            loss.add_(partial)
        if want_h:
            dist.all_reduce(gh, group=shard.group)
    out = [loss]
    for g in (gh, gw, gb):
        out.append(None if g is None else g.to(dtype))
    return (*out, z_rows)


class _LinearCBLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, lm_weight: Tensor, bias: Optional[Tensor], target: Tensor, weight: Tensor,
                cfg: _Config, scale: Optional[Tensor] = None):
        """``(loss, z_term)``: the z-loss part of the loss under the same reduction with ``cfg.return_z_loss``
        (else an empty tensor), not differentiable."""
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if scale is None:  # a normalizer's scale replaces the reduction's (SPEC section 12)
            scale = reduction_scale(target, weight, cfg.spec, loss_dtype(hidden.dtype))
        ctx.cfg, ctx.want = cfg, want
        if cfg.spec.reduction == "none":
            loss, _, _, _, z_rows = _run_chunks(hidden, lm_weight, bias, target, weight, scale, cfg,
                                                (False, False, False))
            if any(want):
                ctx.save_for_backward(hidden, lm_weight, bias, target, weight)
            z_term = z_rows if z_rows is not None else loss.new_empty(0)
            ctx.mark_non_differentiable(z_term)
            return loss, z_term
        loss, gh, gw, gb, z_rows = _run_chunks(hidden, lm_weight, bias, target, weight, scale, cfg, want)
        # Plain attributes, not save_for_backward: backward may consume them in place.
        ctx.grads = (gh, gw, gb) if any(want) else None
        total = loss.sum()
        z_term = loss.new_empty(0) if z_rows is None else z_rows.sum() * scale.to(z_rows.dtype)
        ctx.mark_non_differentiable(z_term)
        return (total if cfg.spec.reduction == "sum" else total * scale), z_term

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_z_term=None):
        cfg, want = ctx.cfg, ctx.want
        grad_output = grad_output.detach()
        if cfg.spec.reduction == "none":
            hidden, lm_weight, bias, target, weight = ctx.saved_tensors
            one = torch.ones((), dtype=grad_output.dtype, device=grad_output.device)
            _, gh, gw, gb, _ = _run_chunks(hidden, lm_weight, bias, target, weight, one, cfg, want,
                                           row_scale=grad_output)
        elif cfg.allow_retain_graph:
            gh, gw, gb = (None if g is None else g * grad_output for g in ctx.grads)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cb_loss: backward through the same graph a second time; its gradients were "
                    "scaled in place and handed over by the first backward. Pass allow_retain_graph=True "
                    "to keep them (costs one transient copy of each gradient).")
            grads, ctx.grads = ctx.grads, None
            gh, gw, gb = (None if g is None else g.mul_(grad_output) for g in grads)
        if torch.is_grad_enabled():
            gh, gw, gb = (None if g is None else refuse_double_backward(g) for g in (gh, gw, gb))
        return gh, gw, gb, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API


def linear_cb_loss(
    hidden: Tensor,
    lm_weight: Tensor,
    target: Tensor,
    samples_per_class=None,
    *,
    loss_type: str = "softmax",
    beta: float = 0.999,
    gamma: float = 0.5,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    process_group=None,
    backend: str = "auto",
    allow_retain_graph: bool = False,
    normalizer=None,
    softcap: Optional[float] = None,
    logit_offset: Optional[Tensor] = None,
    target_margin: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    weight_mode: str = "sample",
):
    """Class-balanced loss of the logits ``hidden @ lm_weight.T + bias``, never materialising them.

    Equals ``class_balanced_loss(F.linear(hidden, lm_weight, bias), target, ...)`` for every
    ``loss_type`` and ``reduction`` (SPEC sections 3-5), with the peak extra memory of one chunk of
    logits plus float32 gradient accumulators instead of several ``[N, V]`` tensors.

    Args:
        hidden: ``[..., H]`` float32 / float16 / bfloat16 (or float64).
        lm_weight: ``[V, H]``, same dtype and device as ``hidden`` (``[V_r, H]``, this rank's shard,
            with ``process_group``).
        target: ``hidden.shape[:-1]`` int64 / int32 global class ids; ``ignore_index`` marks rows that
            count for nothing. Or dense per-class targets ``hidden.shape[:-1] + (V,)`` (SPEC section 9, as in
            ``class_balanced_loss``; not with ``process_group``), read a chunk of rows at a time.
        samples_per_class, beta, weight: class weights as in ``class_balanced_loss`` (``[V]``).
        bias: optional ``[V]`` (``[V_r]``), same dtype as ``hidden``.
        loss_type, gamma, reduction, ignore_index, label_smoothing: as in ``class_balanced_loss``.
        chunk_size: rows per chunk; default ``default_chunk_size(N, H, V)`` (logits chunk no larger
            than ``hidden`` or a quarter of ``lm_weight``, at least 64 rows).
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (see below).
        backend: fused loss backend for the single-device path, as in ``class_balanced_loss``.
        allow_retain_graph: keep the precomputed gradients through backward (out-of-place scaling, one
            transient gradient-sized copy) so that ``retain_graph=True`` / repeated ``autograd.grad``
            work. Default: scaled in place and handed over.
        normalizer: as in ``class_balanced_loss`` (``reduction="mean"`` only): the sum is divided by it.
        softcap, logit_offset, target_margin, logit_scale, z_loss, return_z_loss: the logit transforms and the
            z-loss of SPEC sections 10-11, as in ``class_balanced_loss`` (vectors ``[V]``), applied inside each
            chunk's fused kernel. Not with ``process_group``.
        weight_mode: ``"sample"`` or ``"class"``, as in ``class_balanced_loss``. Not with ``process_group``.

    Returns:
        float32 loss (float64 for float64 inputs): ``hidden.shape[:-1]`` for ``reduction="none"``,
        else a scalar; with ``return_z_loss``, ``(loss, z_term)``. Gradients reach ``hidden``, ``lm_weight`` and
        ``bias`` in their dtype.

    Vocabulary parallel (``process_group`` given): ``lm_weight`` / ``bias`` are this rank's contiguous
    shard of the classes, shards ordered by rank; ``hidden`` and ``target`` are identical on every
    rank. Each call all-gathers the shard sizes (one tiny collective and a host read) to find this
    rank's class offset, so shards may be uneven (not empty) and no offset has to be passed or kept
    consistent. ``weight`` may be this rank's slice ``[V_r]`` (all-gathered) or the global ``[V]``;
    ``samples_per_class`` must be the global ``[V]`` counts (the weights are normalised over all
    classes). Softmax losses combine each row's max and sum-exp across ranks and take the target logit
    from its owner; sigmoid / focal rows sum per-rank partial losses. The returned loss is the same on
    every rank; ``lm_weight`` / ``bias`` gradients are local; ``hidden``'s gradient is summed over the
    ranks inside this function, so do not all-reduce it again. This path is pure PyTorch at float32
    (``backend`` is not used). Every rank must make the same calls (and, for ``reduction="none"``,
    run backward), as with any collective.
    """
    spec = V.loss_spec(loss_type, gamma=gamma, label_smoothing=label_smoothing, ignore_index=ignore_index,
                       reduction=reduction, softcap=softcap, logit_scale=logit_scale, z_loss=z_loss,
                       return_z_loss=return_z_loss, weight_mode=weight_mode)
    V.check_backend(backend)
    if process_group is not None and (spec.transforms or return_z_loss or logit_offset is not None
                                      or target_margin is not None):
        raise ValueError("linear_cb_loss: the logit transforms and the z-loss are not supported with process_group "
                         "(the vocabulary-parallel path) yet")
    if process_group is not None and (spec.weight_mode != WEIGHT_SAMPLE
                                      or (isinstance(target, Tensor) and target.is_floating_point())):
        raise ValueError("linear_cb_loss: dense targets and weight_mode='class' are not supported with process_group "
                         "(the vocabulary-parallel path) yet")
    hidden, lm_weight, bias = _autocast_inputs(hidden, lm_weight, bias)
    if process_group is None:
        _check_hidden(hidden)
        _check_shard(hidden, lm_weight, bias, chunk_size)
        vocab = lm_weight.shape[0]
        dense = _check_target(target, hidden, vocab, spec.ignore_index)
        n_cls = _class_len(samples_per_class, None)
        if n_cls >= 0 and n_cls != vocab:
            raise ValueError(f"samples_per_class has {n_cls} classes but lm_weight has V = {vocab}")
        w = V.class_weights(samples_per_class, weight, beta, vocab, hidden.device)
        if dense:
            target = V.dense_target(target, hidden)
        elif spec.weight_mode == WEIGHT_CLASS:
            spec = V.index_class_spec(spec)
            if spec.weight_mode == WEIGHT_CLASS:
                backend = "torch"  # as class_balanced_loss: class indices weighted per class
        backend_name, shard = resolve_backend(backend, hidden.device).name, None
    else:
        shard, w = _vocab_shard(process_group, hidden, lm_weight, bias, target, samples_per_class, weight, beta,
                                chunk_size, spec.ignore_index)
        vocab, backend_name = shard.total, backend
    lead, hidden_size = hidden.shape[:-1], hidden.shape[-1]
    n = math.prod(lead)
    rows = chunk_size if chunk_size is not None else default_chunk_size(n, hidden_size, vocab)
    tensors = V.logit_tensors(logit_offset, target_margin, vocab, hidden.device)
    cfg = _Config(spec, rows, backend_name, bool(allow_retain_graph), shard, tensors, bool(return_z_loss))
    scale = V.normalizer_scale(normalizer, spec.reduction, hidden.device, loss_dtype(hidden.dtype))
    loss, z_term = _LinearCBLossFunction.apply(hidden.reshape(n, hidden_size), lm_weight, bias,
                                               flat_target(target, vocab), w,
                                               cfg, scale)
    if reduction == "none":
        loss, z_term = loss.reshape(lead), z_term.reshape(lead) if return_z_loss else z_term
    return (loss, z_term) if return_z_loss else loss


class LinearClassBalancedLoss(ReweightMixin, nn.Module):
    """Module form of ``linear_cb_loss``: class weights computed once (float64, stored float32) and kept
    as a buffer ``weight`` ``[V]`` (the global vocabulary, also in vocab-parallel mode).

    ``loss = crit(hidden, lm_weight, target, bias=None, normalizer=None)``; ``reweight(counts, beta=...)`` recomputes
    the weights in place.

    Args:
        samples_per_class: ``[V]`` counts over the whole training set.
        loss_type, beta, gamma, reduction, ignore_index, label_smoothing, chunk_size, process_group,
            backend, allow_retain_graph: as in ``linear_cb_loss``.
        normalize, zero_count: as in ``class_balanced_weights``.
        softcap, logit_offset, target_margin, logit_scale, z_loss, return_z_loss, weight_mode: as in
            ``linear_cb_loss``; the vectors are kept as buffers.
    """

    def __init__(self, samples_per_class, loss_type: str = "softmax", beta: float = 0.999, gamma: float = 0.5,
                 reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 chunk_size: Optional[int] = None, process_group=None, backend: str = "auto", *,
                 normalize: bool = True, zero_count: str = "error", allow_retain_graph: bool = False,
                 softcap: Optional[float] = None, logit_offset: Optional[Tensor] = None,
                 target_margin: Optional[Tensor] = None, logit_scale: float = 1.0, z_loss: float = 0.0,
                 return_z_loss: bool = False, weight_mode: str = "sample"):
        super().__init__()
        # checked now; forward builds the spec from the attributes as they are then
        V.loss_spec(loss_type, gamma=gamma, label_smoothing=label_smoothing, ignore_index=ignore_index,
                    reduction=reduction, softcap=softcap, logit_scale=logit_scale, z_loss=z_loss,
                    return_z_loss=return_z_loss, weight_mode=weight_mode)
        V.check_backend(backend)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 (or None), got {chunk_size!r}")
        self.register_buffer("weight", self._init_counts(samples_per_class, beta, normalize, zero_count))
        c, dev = self.weight.shape[0], self.weight.device
        for name, v in (("logit_offset", logit_offset), ("target_margin", target_margin)):
            self.register_buffer(name, V.class_vector(name, v.to(dev) if isinstance(v, Tensor) else v, c, dev))
        self.loss_type, self.beta, self.gamma = loss_type, beta, gamma
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.chunk_size, self.process_group, self.backend = chunk_size, process_group, backend
        self.allow_retain_graph = allow_retain_graph
        self.softcap, self.logit_scale, self.z_loss, self.return_z_loss = softcap, logit_scale, z_loss, return_z_loss
        self.weight_mode = weight_mode

    def forward(self, hidden: Tensor, lm_weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                normalizer=None):
        return linear_cb_loss(hidden, lm_weight, target, loss_type=self.loss_type, gamma=self.gamma,
                              weight=self.weight, bias=bias, reduction=self.reduction,
                              ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                              chunk_size=self.chunk_size, process_group=self.process_group,
                              backend=self.backend, allow_retain_graph=self.allow_retain_graph,
                              normalizer=normalizer, softcap=getattr(self, "softcap", None),
                              logit_offset=getattr(self, "logit_offset", None),
                              target_margin=getattr(self, "target_margin", None),
                              logit_scale=getattr(self, "logit_scale", 1.0), z_loss=getattr(self, "z_loss", 0.0),
                              return_z_loss=getattr(self, "return_z_loss", False),
                              weight_mode=getattr(self, "weight_mode", "sample"))

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, num_classes={self.weight.shape[0]}, beta={self.beta}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}, chunk_size={self.chunk_size}")
