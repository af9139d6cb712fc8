"""Backward's only work on a GPU: ``grad *= grad_output`` in place, skipped on the device when it is 1.

``loss.backward()`` passes a ones tensor on the loss's device as ``grad_output``. On the CPU reading it is free and
the multiply is skipped on the host (``_autograd``); on a GPU reading it would be a device-to-host sync, and an
unconditional ``mul_`` is a full read and write of the ``[N, C]`` gradient (at 16384 x 128256 bf16 about 8 GB of
traffic: as much as the fused forward kernel). This kernel reads ``grad_output`` on the device and touches the
gradient only where it is not exactly 1: per call for a scalar loss, per row for ``reduction="none"``.

Imported on first use only (it imports Triton); Triton comes with every Linux CUDA build of torch, and without it
the caller falls back to ``mul_``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._opdefs import loss_dtype
from ._triton import compile_options

# Column tile by element size (about 8 KB of 16-bit values per tile), and programs per SM of the persistent grid.
BLOCK = {2: 4096, 4: 2048, 8: 1024}
NUM_WARPS = 4
PROGRAMS_PER_SM = 4
INTERPRET_PROGRAMS = 2  # the interpreter runs programs one by one: two still exercise the strided row loop


@triton.jit
def grad_scale_kernel(grad_ptr, go_ptr, n_rows, n_cols, stride_g, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    # A persistent grid (a few programs per SM, each striding over rows): with grad_output == 1 every program reads
    # one value and exits, so the skipped case costs one small launch, not a grid over the whole gradient.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    if PER_ROW:
        for row in range(pid, n_rows, n_prog):
            go = tl.load(go_ptr + row)
            if go != 1.0:
                _scale_row(grad_ptr + tl.cast(row, tl.int64) * stride_g, go, n_cols, cols, BLOCK)
    else:
        go = tl.load(go_ptr)
        if go != 1.0:
            for row in range(pid, n_rows, n_prog):
                _scale_row(grad_ptr + tl.cast(row, tl.int64) * stride_g, go, n_cols, cols, BLOCK)


@triton.jit
def _scale_row(row_ptr, go, n_cols, cols, BLOCK: tl.constexpr):
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        g = tl.load(row_ptr + offs, mask=mask)
        # In grad_output's precision (float32, float64 for float64 losses), rounded to the gradient's dtype once.
        tl.store(row_ptr + offs, (g.to(go.dtype) * go).to(g.dtype), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_programs(device_index: int) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device_index).multi_processor_count


def scale_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad [N, C] *= grad_output`` in place (a 0-d scale, or ``[N]``/``[N, 1]`` per row), with no host sync;
    rows whose scale is exactly 1 are not touched. ``grad`` needs unit column stride (every saved gradient has it)."""
    n, c = grad.shape
    per_row = grad_output.dim() > 0
    go = grad_output.reshape(-1) if per_row else grad_output.reshape(())
    if per_row and go.shape[0] != n:
        raise ValueError(f"grad_output has {go.shape[0]} rows, the gradient {n}")
    go = go.to(loss_dtype(grad.dtype)).contiguous()
    if n == 0 or c == 0:
        return grad
    on_cpu = grad.device.type == "cpu"  # CPU tensors: the Triton interpreter (tests)
    programs = min(n, INTERPRET_PROGRAMS if on_cpu else _num_programs(grad.device.index))
    guard = contextlib.nullcontext() if on_cpu else torch.cuda.device(grad.device)
    with guard:
        grad_scale_kernel[(programs,)](grad, go, n, c, grad.stride(0), PER_ROW=per_row,
                                       BLOCK=BLOCK[grad.element_size()], **compile_options(NUM_WARPS))
    return grad


def launch_variants() -> Iterator[dict]:
    """Every (constexprs, num_warps) ``scale_`` launches, for the ahead-of-time build check; each carries its
    signature (what the JIT specialises: allocator tensors are 16-byte aligned) and a label for the report."""
    for dtype, itemsize in (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp64", 8)):
        cdt = "fp64" if dtype == "fp64" else "fp32"
        for align in (1, 16 // itemsize):  # C and the row stride multiples of 16 bytes (16-byte accesses), or not
            for per_row in (False, True):
                yield dict(kernel="grad_scale_kernel", module=__name__, dtype=dtype, num_warps=NUM_WARPS,
                           constexprs=dict(PER_ROW=per_row, BLOCK=BLOCK[itemsize]),
                           signature={"grad_ptr": f"*{dtype}", "go_ptr": f"*{cdt}", "n_rows": "i32",
                                      "n_cols": "i32", "stride_g": "i32"},
                           divisible=["grad_ptr", "go_ptr"] + (["n_cols", "stride_g"] if align > 1 else []),
                           label=f"align={align} grad_scale {'per-row' if per_row else 'scalar':7} "
                                 f"block={BLOCK[itemsize]:<5}")
