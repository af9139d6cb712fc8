"""The two small Triton kernels around the loss kernel: the reduction's normaliser before it, the reduced loss after.

A forward call of the Triton backend is at most three launches and no host synchronisation (SPEC section 5):

1. ``reduction_scale_kernel``: one program reads every target, fails a device-side assert
   on one outside ``[0, C)`` that is not ``ignore_index`` (the kernel is built with ``debug=True`` for that assert
   only; the loss kernel does not check), and writes ``s`` to a 0-d tensor the loss kernel reads: ``1 / max(1,
   #valid)`` for ``"mean"``, ``1 / sum_i a_i`` (0 when that is 0) for ``"weighted_mean"``, 1 otherwise (a given
   scale, e.g. a ``normalizer`` or the chunked linear path's, replaces it and the launch only checks). It also
   writes the first bad row (``n_rows`` when none), which the host reads where that is free: under the interpreter
   (CPU tensors), where it raises the CPU's ``IndexError``.
2. the loss kernel (``_triton_kernels``), reading ``s`` on the device.
3. ``reduce_rows_kernel`` (scalar reductions): ``s * sum_i l_i``, one program, a fixed summation order (equal inputs,
   equal bits; no atomics).

Dense targets (SPEC section 9) have no index to check, and every row counts: ``"mean"`` is ``1 / N``, filled on the
host. ``"weighted_mean"`` divides by the sample weights' sum ``sum_i a_i``, ``a_i = sum_j w_j q_ij / sum_j q_ij``:
a reduction over all of q, in two launches instead of step 1: ``mass_partials_kernel`` (rows, and column chunks
for few long rows, over the grid) leaves each row's ``sum_j w_j q_ij`` and ``sum_j q_ij`` per chunk, and
``mass_scale_kernel`` (one program, a fixed order) sums the rows' ``a_i``. The loss kernel reuses the partials where
it needs ``a_i`` before its own pass has seen the whole row (a sample-mode one-vs-all split).

Imported with the Triton backend; the kernels are compiled ahead of time by tools/gpu_build_check.py like the rest.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_kernels import _mass_sums, _sample_weight

BLOCK = 1024
NUM_WARPS = 4
NONE, MEAN, WEIGHTED_MEAN = 0, 1, 3  # REDUCTION values (cb_params.h's Reduction; "sum" launches as NONE: s = 1)


@triton.jit(debug=True)  # debug keeps the device_assert (Triton drops it otherwise); nothing else here depends on it
def reduction_scale_kernel(target_ptr, weight_ptr, scale_ptr, bad_ptr, n_rows, n_cols, ignore_index,
                           REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    cdt = scale_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], tl.int32)
    wsum = tl.zeros([BLOCK], cdt)
    first_bad = tl.full([BLOCK], n_rows, tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        in_range = rows < n_rows
        y = tl.load(target_ptr + rows, mask=in_range, other=ignore_index).to(tl.int64)
        valid = in_range & (y >= 0) & (y < n_cols) & (y != ignore_index)
        bad = in_range & (y != ignore_index) & ~valid
        tl.device_assert(bad == 0, "cbkernels: target outside [0, C) and not ignore_index")
        first_bad = tl.minimum(first_bad, tl.where(bad, rows, n_rows))
        count += valid.to(tl.int32)
        if REDUCTION == 3:
            wsum += tl.load(weight_ptr + tl.where(valid, y, 0), mask=valid, other=0.0).to(cdt)
    if REDUCTION == 3:
        total = tl.sum(wsum, axis=0)
        s = tl.where(total > 0, 1.0 / total, 0.0).to(cdt)
    elif REDUCTION == 1:
        s = (1.0 / tl.maximum(tl.sum(count, axis=0), 1).to(cdt)).to(cdt)
    else:
        s = tl.full((), 1.0, cdt)
    tl.store(scale_ptr, s)
    tl.store(bad_ptr, tl.min(first_bad, axis=0))


@triton.jit
def reduce_rows_kernel(loss_ptr, scale_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], out_ptr.dtype.element_ty)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        acc += tl.load(loss_ptr + rows, mask=rows < n_rows, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * tl.load(scale_ptr))


@triton.jit
def mass_partials_kernel(q_ptr, weight_ptr, out_ptr, n_rows, n_cols, stride_q, cols_per_split,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (r, k): rows [r ROWS, (r + 1) ROWS), columns [k cols_per_split, ...): ``out [N, K, 2]`` gets
    ``sum_j w_j q_ij`` and ``sum_j q_ij``, in the dtype the loss is computed in."""
    cdt = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: N * C may pass 2**31
    row_ok = rows < n_rows
    col_lo = tl.program_id(1) * cols_per_split
    wq, sq = _mass_sums(q_ptr + rows * stride_q, weight_ptr, row_ok, col_lo,
                        tl.minimum(col_lo + cols_per_split, n_cols), cdt, ROWS, BLOCK_C)
    out = out_ptr + (rows * tl.num_programs(1) + tl.program_id(1)) * 2
    tl.store(out, wq, mask=row_ok)
    tl.store(out + 1, sq, mask=row_ok)


@triton.jit
def mass_scale_kernel(mass_ptr, scale_ptr, n_rows, n_splits, BLOCK: tl.constexpr):
    # 1 / sum_i a_i (0 when that is 0) from the rows' mass partials; a_i = 1 for a row without mass.
    cdt = scale_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], cdt)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        ok = rows < n_rows
        wq = tl.zeros([BLOCK], cdt)
        sq = tl.zeros([BLOCK], cdt)
        for k in range(0, n_splits):
            part = mass_ptr + (rows.to(tl.int64) * n_splits + k) * 2
            wq += tl.load(part, mask=ok, other=0.0)
            sq += tl.load(part + 1, mask=ok, other=0.0)
        total += tl.where(ok, _sample_weight(wq, sq), 0.0)
    t = tl.sum(total, axis=0)
    tl.store(scale_ptr, tl.where(t > 0, 1.0 / t, 0.0).to(cdt))


# mass_partials_kernel's tiles: MASS_TILE elements, BLOCK_C the first of MASS_BLOCKS that holds a row (else the last).
MASS_TILE = 2048
MASS_BLOCKS = (16, 128, 1024)

_REDUCTION_CODE = {"mean": MEAN, "weighted_mean": WEIGHTED_MEAN}


def _guard(t: Tensor):
    return contextlib.nullcontext() if t.device.type == "cpu" else torch.cuda.device(t.device)


def reduction_scale(target: Tensor, weight: Tensor, num_classes: int, ignore_index: int, reduction: str,
                    cdtype: torch.dtype, scale: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """``(s, first_bad)``: the normaliser the loss kernel reads and the 1-element tensor of the first bad row
    (``n_rows`` for none), from one launch that checks every target. A given ``scale`` replaces the reduction's
    normaliser (converted to ``cdtype``); the launch then only checks the targets."""
    from ._triton import compile_options

    s = torch.empty((), dtype=cdtype, device=target.device)
    bad = torch.empty(1, dtype=torch.int32, device=target.device)
    code = NONE if scale is not None else _REDUCTION_CODE.get(reduction, NONE)
    with _guard(target):
        reduction_scale_kernel[(1,)](target, weight, s, bad, target.shape[0], num_classes, ignore_index,
                                     REDUCTION=code, BLOCK=BLOCK, **compile_options(NUM_WARPS))
    return (s if scale is None else scale.to(cdtype)), bad


def _mass_block(c: int) -> int:
    return next((b for b in MASS_BLOCKS if b >= c), MASS_BLOCKS[-1])


def mass_partials(q: Tensor, weight: Tensor, splits: int, cols_per_split: int, cdtype: torch.dtype) -> Tensor:
    """``[N, splits, 2]``: each row's ``sum_j w_j q_ij`` and ``sum_j q_ij`` over ``splits`` chunks of
    ``cols_per_split`` columns (one chunk, the whole row, for ``splits == 1``), in ``cdtype``. ``q`` has unit
    column stride."""
    from ._triton import compile_options

    n, c = q.shape
    out = torch.empty((n, splits, 2), dtype=cdtype, device=q.device)
    block = _mass_block(c)
    rows = MASS_TILE // block
    if n:
        with _guard(q):
            mass_partials_kernel[(-(-n // rows), splits)](
                q, weight.contiguous(), out, n, c, q.stride(0), cols_per_split if splits > 1 else c,
                ROWS=rows, BLOCK_C=block, **compile_options(NUM_WARPS))
    return out


def mass_scale(mass: Tensor) -> Tensor:
    """The ``"weighted_mean"`` normaliser of dense targets from ``mass_partials``: a 0-d tensor of their dtype."""
    from ._triton import compile_options

    s = torch.empty((), dtype=mass.dtype, device=mass.device)
    with _guard(mass):
        mass_scale_kernel[(1,)](mass, s, mass.shape[0], mass.shape[1], BLOCK=BLOCK, **compile_options(NUM_WARPS))
    return s


def reduce_rows(rows: Tensor, s: Tensor) -> Tensor:
    """``s * sum_i rows_i`` as a 0-d tensor of ``rows``' dtype, in one launch."""
    from ._triton import compile_options

    out = torch.empty((), dtype=rows.dtype, device=rows.device)
    with _guard(rows):
        reduce_rows_kernel[(1,)](rows, s, out, rows.shape[0], BLOCK=BLOCK, **compile_options(NUM_WARPS))
    return out


def launch_variants() -> Iterator[dict]:
    """Every (constexprs, num_warps) these kernels launch with, for the ahead-of-time build check; each carries its
    signature (what the JIT specialises: allocator tensors are 16-byte aligned) and a label for the report."""
    for cdt in ("fp32", "fp64"):
        for target in ("i64", "i32"):
            for reduction in (NONE, MEAN, WEIGHTED_MEAN):
                yield dict(kernel="reduction_scale_kernel", module=__name__, dtype=cdt, num_warps=NUM_WARPS,
                           options=dict(debug=True), constexprs=dict(REDUCTION=reduction, BLOCK=BLOCK),
                           label=f"reduction_scale reduction={reduction} target={target} block={BLOCK}",
                           signature={"target_ptr": f"*{target}", "weight_ptr": "*fp32", "scale_ptr": f"*{cdt}",
                                      "bad_ptr": "*i32", "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32"},
                           divisible=["target_ptr", "weight_ptr", "scale_ptr", "bad_ptr"])
        yield dict(kernel="reduce_rows_kernel", module=__name__, dtype=cdt, num_warps=NUM_WARPS,
                   constexprs=dict(BLOCK=BLOCK), label=f"reduce_rows block={BLOCK}",
                   signature={"loss_ptr": f"*{cdt}", "scale_ptr": f"*{cdt}", "out_ptr": f"*{cdt}", "n_rows": "i32"},
                   divisible=["loss_ptr", "scale_ptr", "out_ptr"])
        yield dict(kernel="mass_scale_kernel", module=__name__, dtype=cdt, num_warps=NUM_WARPS,
                   constexprs=dict(BLOCK=BLOCK), label=f"mass_scale block={BLOCK}",
                   signature={"mass_ptr": f"*{cdt}", "scale_ptr": f"*{cdt}", "n_rows": "i32", "n_splits": "i32"},
                   divisible=["mass_ptr", "scale_ptr"])
    # Every tile shape for the main (q, compute) pairs; fp16 q (bf16's twin) and float32 q of fp64 logits on one.
    pairs = [(q, cdt, block) for q, cdt in (("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64"))
             for block in MASS_BLOCKS]
    for q, cdt, block in pairs + [("fp16", "fp32", MASS_BLOCKS[-1]), ("fp32", "fp64", MASS_BLOCKS[-1])]:
        rows = MASS_TILE // block
        yield dict(kernel="mass_partials_kernel", module=__name__, dtype=cdt, num_warps=NUM_WARPS,
                   constexprs=dict(ROWS=rows, BLOCK_C=block), label=f"mass_partials q={q} rows={rows} block={block}",
                   signature={"q_ptr": f"*{q}", "weight_ptr": "*fp32", "out_ptr": f"*{cdt}", "n_rows": "i32",
                              "n_cols": "i32", "stride_q": "i32", "cols_per_split": "i32"},
                   divisible=["q_ptr", "weight_ptr", "out_ptr"])
