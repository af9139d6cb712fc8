"""Triton backend: host side of the fused kernels in ``_triton_kernels`` (launch plans, op kernels).

``loss_fwd`` / ``loss_fwd_inplace`` follow the backend interface of ``_backends``: a call is at most three
launches (``_triton_reduce``'s normaliser and target check, the loss kernel, the reduction; the split path of
few, huge rows adds its combining kernel; dense targets up to two more, below). Everything stays on the device
(the normaliser and the class weights are read by the kernel; no host sync), launches go to the current stream of
the logits' device, and CPU tensors run the same kernels under the Triton interpreter
(``TRITON_INTERPRET=1``, read by Triton when it is first imported: ``triton.jit`` then builds interpreter
functions, its own standard library included, for the whole process).
float64 logits are computed in float64 (the loss is then float64 too, as in the torch backend).
The logit transforms and the z-loss (SPEC sections 10-11) are the kernels' own (``transform_flags``: one constexpr
each, so that with none of them the kernels are the transform-free ones).
Dense targets (SPEC section 9: a floating ``[N, C]`` target) are the same kernels with DENSE and CLASS_WEIGHTS
(``dense_flags``); they need no target check, and take a launch more where a row statistic must come before the
pass that needs it: the ``"weighted_mean"`` normaliser (``_triton_reduce``'s mass partials, then their sum: two in
place of one), a sample-mode one-vs-all split (the same mass partials), the softmax-focal split (``S`` needs lse:
a middle launch).
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import _opdefs
from ._opdefs import FOCAL, NO_TENSORS, SIGMOID, SOFTMAX, SOFTMAX_FOCAL, LogitTensors, LossSpec, loss_dtype

# The kernels' GAMMA_CASE codes (_triton_kernels names them too, as Triton constexprs).
GAMMA_ZERO, GAMMA_HALF, GAMMA_ONE, GAMMA_TWO, GAMMA_ANY = 0, 1, 2, 3, 4
_GAMMA_CASES = {0.0: GAMMA_ZERO, 0.5: GAMMA_HALF, 1.0: GAMMA_ONE, 2.0: GAMMA_TWO}

# Launch heuristics, by logits element size (module attributes so that tests can force every path on small shapes).
# Elements per program for small C, where a program packs up to MAX_ROWS rows.
TILE_ELEMS = {2: 4096, 4: 4096, 8: 128}
MAX_ROWS = 64
SMALL_C_MAX = 2048  # up to this padded C, several rows per program
# Largest padded row kept in registers as one tile: beyond it registers spill (tools/gpu_build_check.py).
# float64 (tests, gradcheck) takes two registers per value and exp/log code with calls: one value per thread.
SINGLE_TILE_MAX = {2: 16384, 4: 16384, 8: 128}
# The same when C or the row strides allow less than 16-byte accesses: every element then needs its own address.
SINGLE_TILE_MAX_NARROW = {2: 8192, 4: 8192, 8: 128}
# The one-vs-all losses (sigmoid, focal) read every element once on any path, so a single tile buys them nothing but
# registers: the focal loss's longer code spills at 16384 values per tile (tools/gpu_build_check.py).
ONE_VS_ALL_SINGLE_TILE_MAX = {2: 8192, 4: 8192, 8: 128}
# Their per-row state also costs registers: 64 rows of 64 float32 classes spilled 8 B on sm_90 at the 128 cap.
ONE_VS_ALL_MAX_ROWS = 32
LOOP_BLOCK = {2: 4096, 4: 4096, 8: 128}  # column tile of the loop and split paths
WS_DENSE = 8  # workspace slots per (row, chunk) of a dense split (_triton_kernels.WS_DENSE)
SOFTCAP_SINGLE_TILE_MAX = 8192  # softmax single tiles above it are halved with a softcap (single_tile_max)
# Dense targets, by launched loss: the q tile and its per-element terms take registers too. At these sizes nothing
# spills (tools/gpu_build_check.py); one step up, softmax focal (which keeps p, its c_j terms and sech^2 per element
# until the row's S is known) spilled 232-296 B at 8192, the one-vs-all focal loss 72-216 B, softmax 8 B at 16384
# (and, with a softcap's sech^2, 8-24 B at 8192 on sm_90: single_tile_max halves it).
DENSE_SINGLE_TILE_MAX = {SOFTMAX: 8192, SOFTMAX_FOCAL: 4096, SIGMOID: 4096, FOCAL: 4096}
# Split a row over programs when there are fewer than SPLIT_ROWS_PER_SM * SMs rows, aiming at
# SPLIT_TARGET_PER_SM programs per SM, at most MAX_SPLITS per row.
SPLIT_ROWS_PER_SM = 2
SPLIT_TARGET_PER_SM = 4
MAX_SPLITS = 256
# "SMs" of the interpreter: only a single row is split unless a test asks for more.
INTERPRET_SM_COUNT = 1


@dataclass(frozen=True)
class Plan:
    """How one call is launched: ``rows`` x ``block_c`` tiles, ``splits`` programs per row."""

    rows: int
    block_c: int
    num_warps: int
    single_tile: bool
    splits: int = 1
    cols_per_split: int = 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Pinned, not left to Triton's default (which Triton 3.9 warns about and a later release changes): the code that runs
# is the code tools/gpu_build_check.py compiles ahead of time. FMA contraction: the kernels' error analysis assumes it.
ENABLE_FP_FUSION = True


def compile_options(num_warps: int) -> dict:
    """The compile options of every launch, and of the ahead-of-time build check."""
    return dict(num_warps=num_warps, maxnreg=maxnreg(num_warps), enable_fp_fusion=ENABLE_FP_FUSION)


def maxnreg(num_warps: int) -> int:
    """The register cap every launch compiles with: one block's share of the register file (65536 per SM), at most
    255. Without it ptxas may cap a 16-warp block at 64 registers to fit two blocks per SM and spill 8-24 bytes of
    the focal loss's state to local memory (seen for sm_80/sm_90 in tools/gpu_build_check.py); with it no launchable
    variant spills."""
    return min(255, 65536 // (32 * num_warps))


def _warps(elems: int) -> int:
    # About 8 values per thread (one 16-byte load of 16-bit logits) in tiles up to 4096; larger single tiles keep
    # 16 warps (more would cap registers at 64 per thread). More values per thread made ptxas spill in the
    # focal loss's longer code.
    return max(4, min(16, elems // 256))


def plan_launch(n: int, c: int, itemsize: int, sm_count: int, align: Optional[int] = None,
                one_vs_all: bool = False, softcap: bool = False, dense: Optional[int] = None) -> Plan:
    """Pick the kernel shape for ``n`` rows of ``c`` classes of ``itemsize``-byte logits (``align``: see align_for;
    None stands for 16-byte accesses; ``one_vs_all``: the launched loss is sigmoid or focal; ``softcap``: HAS_SOFTCAP,
    see single_tile_max; ``dense``: the launched loss type of a dense target, None for class indices)."""
    block = max(16, _next_pow2(c))
    if block <= min(SMALL_C_MAX, TILE_ELEMS[itemsize]):
        # Narrow accesses (odd C: an address per element) take half the tile: the softmax rows with their exactly
        # rounded per-row divisions spilled 8-88 B at 16 warps on sm_80/sm_90 (tools/gpu_build_check.py).
        narrow = align is not None and align * itemsize < 16
        tile = TILE_ELEMS[itemsize] // (2 if narrow and not one_vs_all else 1)
        rows = max(1, min(ONE_VS_ALL_MAX_ROWS if one_vs_all else MAX_ROWS, tile // block))
        return Plan(rows, block, _warps(rows * block), True)
    if block <= single_tile_max(itemsize, align, one_vs_all, softcap, dense):
        return Plan(1, block, _warps(block), True)
    block = LOOP_BLOCK[itemsize]
    tiles = _cdiv(c, block)
    if n < SPLIT_ROWS_PER_SM * sm_count and tiles > 1:
        splits = min(tiles, _cdiv(SPLIT_TARGET_PER_SM * sm_count, max(n, 1)), MAX_SPLITS)
        tiles_per_split = _cdiv(tiles, splits)
        splits = _cdiv(tiles, tiles_per_split)  # no empty chunk
        if splits > 1:
            return Plan(1, block, _warps(block), False, splits, tiles_per_split * block)
    return Plan(1, block, _warps(block), False)


def single_tile_max(itemsize: int, align: Optional[int], one_vs_all: bool, softcap: bool = False,
                    dense: Optional[int] = None) -> int:
    """The largest padded row kept on chip as one tile. A softcapped softmax tile keeps each element's sech^2 for
    the gradient besides its exponential: 16384 such values per tile spilled 8-16 B on sm_80
    (tools/gpu_build_check.py), so that takes half the tile (the one-vs-all losses keep nothing across a pass).
    ``dense``: the launched loss of a dense target (DENSE_SINGLE_TILE_MAX)."""
    narrow = align is not None and align * itemsize < 16
    limit = (SINGLE_TILE_MAX_NARROW if narrow else SINGLE_TILE_MAX)[itemsize]
    if dense is not None:
        dense_max = DENSE_SINGLE_TILE_MAX[dense]
        return min(limit, dense_max // 2 if softcap and dense == SOFTMAX else dense_max)
    if one_vs_all:
        return min(limit, ONE_VS_ALL_SINGLE_TILE_MAX[itemsize])
    return max(16, limit // 2) if softcap and limit > SOFTCAP_SINGLE_TILE_MAX else limit


def align_for(c: int, stride_z: int, stride_g: int, itemsize: int) -> int:
    """ALIGN: 16 bytes worth of elements when C and both row strides are multiples of it, else 2 when they are even
    (C = 8142: 4-byte bf16 pairs), else 1. Three values keep the number of compiled variants down."""
    vec = 16 // itemsize
    a = vec
    for x in (c, stride_z, stride_g):
        while x % a:
            a //= 2
    return a if a == vec else min(a, 2)


def kernel_flags(loss_type: int, gamma: float, label_smoothing: float) -> Tuple[int, int, bool]:
    """(LOSS_TYPE, GAMMA_CASE, HAS_SMOOTHING) as launched: a focal loss with gamma 0 is its plain loss."""
    if loss_type in (FOCAL, SOFTMAX_FOCAL):
        if gamma == 0.0:
            return (SIGMOID if loss_type == FOCAL else SOFTMAX), GAMMA_ZERO, False
        return loss_type, _GAMMA_CASES.get(gamma, GAMMA_ANY), False
    return loss_type, GAMMA_ZERO, loss_type == SOFTMAX and label_smoothing != 0.0


def transform_flags(spec: LossSpec, tensors: LogitTensors, loss_type: int) -> Tuple[bool, ...]:
    """(HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN, HAS_ZLOSS, HAS_SCALE) of the loss kernel, for the launched
    ``loss_type`` (the z-loss is the softmax losses'; the API edge refuses it for the others)."""
    zloss = spec.z_loss != 0.0 and loss_type in (SOFTMAX, SOFTMAX_FOCAL)
    return (spec.softcap != 0.0, tensors.logit_offset is not None, tensors.target_margin is not None, zloss,
            spec.logit_scale != 1.0)


def split_transform_flags(loss_type: int, has_grad: bool, flags: Tuple[bool, ...]
                          ) -> Tuple[Tuple[bool, ...], Tuple[bool, ...]]:
    """The transform flags of the split path's two kernels: the first leaves statistics (no z-loss); the finish
    kernel adds the z-loss and reads logits only for the softmax gradient (the one-vs-all finish only sums; without
    the gradient the scale only ever entered the statistics)."""
    softcap, offset, margin, zloss, scale = flags
    first = (softcap, offset, margin, False, scale)
    if loss_type in (SIGMOID, FOCAL):
        return first, NO_TRANSFORM_FLAGS
    return first, ((softcap, offset, margin, zloss, scale) if has_grad else (False, False, False, zloss, False))


def dense_flags(target: Tensor, spec: LossSpec) -> Tuple[bool, bool]:
    """(DENSE, CLASS_WEIGHTS): a floating [N, C] target, and its weight mode. With index targets the kernels know
    only sample mode (``_check_weight_mode``)."""
    dense = target.is_floating_point()
    return dense, dense and spec.weight_mode == _opdefs.WEIGHT_CLASS


def _check_weight_mode(target: Tensor, spec: LossSpec) -> None:
    # Class mode with index targets is sample mode for the softmax losses without smoothing (CONTRACT); the API edge
    # passes the other cases as one-hot dense targets.
    if spec.weight_mode == _opdefs.WEIGHT_CLASS and not target.is_floating_point() and (
            spec.loss_type in (SIGMOID, FOCAL) or (spec.loss_type == SOFTMAX and spec.label_smoothing != 0.0)):
        raise ValueError("the triton backend takes weight_mode='class' with class-index targets only for the softmax "
                         "losses without label smoothing: pass the targets as one-hot rows")


def finish_flags(loss_type: int, gamma_case: int, has_smoothing: bool, has_grad: bool) -> Tuple[int, int, bool, bool]:
    """Flags of the split path's second kernel: for the one-vs-all losses it only sums partial losses."""
    if loss_type in (SIGMOID, FOCAL):
        return SIGMOID, GAMMA_ZERO, False, False
    return loss_type, gamma_case, has_smoothing, has_grad


def _split_f32(x: float) -> Tuple[float, float]:
    # float64 kernels rebuild x as hi + lo: a Python float reaches a kernel as float32.
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def kernels():
    """The kernel module, imported on first use (``triton.jit`` decorates as the environment says: compiled, or
    interpreted under TRITON_INTERPRET=1, which must be set before Triton is first imported)."""
    from . import _triton_kernels

    return _triton_kernels


TRANSFORM_FLAGS = ("HAS_SOFTCAP", "HAS_OFFSET", "HAS_MARGIN", "HAS_ZLOSS", "HAS_SCALE")
NO_TRANSFORM_FLAGS = (False,) * len(TRANSFORM_FLAGS)


def _align(logits: Tensor, target: Tensor, stride_g: int) -> int:
    # ALIGN: the dense target's rows too (float32 q of 16-bit logits then takes two 16-byte accesses per vector).
    c = logits.shape[1]
    align = align_for(c, logits.stride(0), stride_g, logits.element_size())
    if target.is_floating_point():
        align = min(align, align_for(c, target.stride(0), target.stride(0), logits.element_size()))
    return align


def _plan(logits: Tensor, target: Tensor, stride_g: int, spec: LossSpec) -> Plan:
    """The launch plan of a call (``stride_g``: the gradient's row stride, or C without one)."""
    n, c = logits.shape
    lt = kernel_flags(spec.loss_type, spec.gamma, spec.label_smoothing)[0]
    sms = INTERPRET_SM_COUNT if logits.device.type == "cpu" else _cuda_sm_count(logits.device.index)
    return plan_launch(n, c, logits.element_size(), sms, _align(logits, target, stride_g),
                       one_vs_all=lt in (SIGMOID, FOCAL), softcap=spec.softcap != 0.0,
                       dense=lt if target.is_floating_point() else None)


def _needs_mass(target: Tensor, spec: LossSpec, plan: Plan) -> bool:
    # A sample-mode one-vs-all split writes its gradient before any chunk sees the whole row: a_i comes first.
    lt = kernel_flags(spec.loss_type, spec.gamma, spec.label_smoothing)[0]
    return (plan.splits > 1 and lt in (SIGMOID, FOCAL) and target.is_floating_point()
            and spec.weight_mode != _opdefs.WEIGHT_CLASS)


def _launch(logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, spec: LossSpec, grad: Optional[Tensor],
            plan: Optional[Plan] = None, tensors: LogitTensors = NO_TENSORS, mass: Optional[Tensor] = None) -> Tensor:
    n, c = logits.shape
    cdtype = loss_dtype(logits.dtype)
    loss = torch.empty(n, dtype=cdtype, device=logits.device)
    lt, gamma_case, smooth = kernel_flags(spec.loss_type, spec.gamma, spec.label_smoothing)
    flags = transform_flags(spec, tensors, lt)
    dense, class_weights = dense_flags(target, spec)
    z_rows = tensors.z_rows
    if z_rows is not None and not flags[3]:
        z_rows.zero_()  # no z-loss: every row's term is 0
        z_rows = None
    if n == 0:
        return loss
    on_cpu = logits.device.type == "cpu"
    k = kernels()
    if on_cpu and type(k.cb_loss_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("the triton backend runs CPU tensors only under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    has_grad = grad is not None
    if has_grad and on_cpu and grad.dtype == torch.bfloat16:
        # The interpreter rounds float32 to bfloat16 by truncation (a GPU rounds to nearest even): let it write
        # float32 and round here, as a GPU does. That fixes this one rounding, not the arithmetic before it: the
        # interpreter's float32 math is numpy's, not the GPU's approximations (_triton_kernels' docstring; the
        # device model in tests/test_triton.py).
        grad32 = torch.empty(grad.shape, dtype=torch.float32)
        loss = _launch(logits, target, weight, scale, spec, grad32, plan, tensors, mass)
        grad.copy_(grad32)
        return loss
    g = grad if has_grad else logits  # never written without HAS_GRAD; same dtype keeps one specialisation
    stride_g = g.stride(0) if has_grad else c
    align = _align(logits, target, stride_g)
    if plan is None:
        plan = _plan(logits, target, stride_g, spec)
    if _needs_mass(target, spec, plan) and (mass is None or mass.shape[1] != plan.splits):
        from . import _triton_reduce

        mass = _triton_reduce.mass_partials(target, weight, plan.splits, plan.cols_per_split, cdtype)
    gamma_hi, gamma_lo = _split_f32(float(spec.gamma))
    eps_hi, eps_lo = _split_f32(float(spec.label_smoothing))
    cap = float(spec.softcap)
    cap_hi, cap_lo = _split_f32(cap)
    inv_cap_hi, inv_cap_lo = _split_f32(1.0 / cap if cap else 0.0)
    lscale_hi, lscale_lo = _split_f32(float(spec.logit_scale))
    zloss_hi, zloss_lo = _split_f32(float(spec.z_loss))
    if z_rows is not None and not z_rows.is_contiguous():  # the kernels write it with unit stride
        out = torch.empty(n, dtype=cdtype, device=logits.device)
        loss = _launch(logits, target, weight, scale, spec, grad, plan, tensors._replace(z_rows=out), mass)
        z_rows.copy_(out)
        return loss
    # The kernels' runtime arguments, by name (both kernels take them all; the workspace is unused without a split,
    # the transform vectors without their flags: the weights stand in, as the loss does for z_rows and the mass
    # partials).
    args = dict(
        logits_ptr=logits,
        # int64 targets only: one specialisation fewer to compile, for an [N] copy when given int32.
        target_ptr=target if dense else target.to(torch.int64).contiguous(), weight_ptr=weight.contiguous(),
        scale_ptr=scale.to(cdtype),
        loss_ptr=loss, grad_ptr=g, ws_ptr=loss,
        offset_ptr=weight if tensors.logit_offset is None else tensors.logit_offset,
        margin_ptr=weight if tensors.target_margin is None else tensors.target_margin,
        zrows_ptr=loss if z_rows is None else z_rows,
        n_rows=n, n_cols=c, stride_z=logits.stride(0), stride_g=stride_g,
        cols_per_split=0, ignore_index=spec.ignore_index,
        gamma_hi=gamma_hi, gamma_lo=gamma_lo, eps_hi=eps_hi, eps_lo=eps_lo,
        cap_hi=cap_hi, cap_lo=cap_lo, inv_cap_hi=inv_cap_hi, inv_cap_lo=inv_cap_lo,
        lscale_hi=lscale_hi, lscale_lo=lscale_lo, zloss_hi=zloss_hi, zloss_lo=zloss_lo,
        store_z=int(z_rows is not None), stride_q=target.stride(0) if dense else 0,
        rw_ptr=loss if mass is None else mass,
    )
    dense_kw = dict(DENSE=True, CLASS_WEIGHTS=class_weights) if dense else {}
    guard = contextlib.nullcontext() if on_cpu else torch.cuda.device(logits.device)
    with guard:
        if plan.splits == 1:
            k.cb_loss_kernel[(_cdiv(n, plan.rows), 1)](
                **args, LOSS_TYPE=lt, GAMMA_CASE=gamma_case, HAS_SMOOTHING=smooth, HAS_GRAD=has_grad,
                SINGLE_TILE=plan.single_tile, SPLIT=False, ROWS=plan.rows, BLOCK_C=plan.block_c, ALIGN=align,
                **dict(zip(TRANSFORM_FLAGS, flags)), **dense_kw, **compile_options(plan.num_warps))
            return loss
        args.update(ws_ptr=torch.empty((n, plan.splits, WS_DENSE if dense else 4), dtype=cdtype, device=logits.device),
                    cols_per_split=plan.cols_per_split)
        first, finish = split_transform_flags(lt, has_grad, flags)
        k.cb_loss_kernel[(n, plan.splits)](
            **args, LOSS_TYPE=lt, GAMMA_CASE=gamma_case, HAS_SMOOTHING=smooth, HAS_GRAD=has_grad,
            SINGLE_TILE=False, SPLIT=True, ROWS=1, BLOCK_C=plan.block_c, ALIGN=align,
            **dict(zip(TRANSFORM_FLAGS, first)), **dense_kw, **compile_options(plan.num_warps))
        fin = dict(n_splits=plan.splits, MAX_SPLITS=MAX_SPLITS, BLOCK_C=plan.block_c, ALIGN=align,
                   **compile_options(plan.num_warps))
        if dense and lt == SOFTMAX_FOCAL:
            # Softmax focal's S = sum_j cw_j q_j c_j needs lse: its partials in a launch of their own.
            k.cb_loss_split_finish_kernel[(n, plan.splits)](
                **args, **fin, LOSS_TYPE=lt, GAMMA_CASE=gamma_case, HAS_SMOOTHING=False, HAS_GRAD=False,
                **dict(zip(TRANSFORM_FLAGS, first)), **dense_kw, FOCAL_SUMS=True)
        f_lt, f_gc, f_smooth, f_grad = finish_flags(lt, gamma_case, smooth, has_grad)
        if dense:
            dense_kw["CLASS_WEIGHTS"] = class_weights and lt not in (SIGMOID, FOCAL)  # summing only: one variant
        k.cb_loss_split_finish_kernel[(n, plan.splits if f_grad else 1)](
            **args, **fin, LOSS_TYPE=f_lt, GAMMA_CASE=f_gc, HAS_SMOOTHING=f_smooth, HAS_GRAD=f_grad,
            **dict(zip(TRANSFORM_FLAGS, finish)), **dense_kw)
    return loss


def _unit_col_stride(t: Tensor) -> bool:
    return t.shape[1] <= 1 or t.stride(1) == 1


def _dense_target(target: Tensor, logits: Tensor) -> Tensor:
    # The kernels read q in the logits' dtype or float32 (the API edge's choice), with unit column stride.
    if target.dtype not in (logits.dtype, torch.float32):
        target = target.float()
    return target if _unit_col_stride(target) else target.contiguous()


def _prologue(z: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
              stride_g: int) -> Tuple[Tensor, Optional[Tensor]]:
    """The normaliser the loss kernel reads, after the target check (a device assert; under the interpreter the first
    bad row is read back, free on the CPU, and raises as the CPU backend does); dense targets: no check, and the mass
    partials the normaliser was summed from, for _launch to reuse (or None)."""
    from . import _triton_reduce

    if target.is_floating_point():
        return _dense_prologue(z, target, weight, scale, spec, stride_g)

    # The kernel reads targets and weights with unit stride (a strided target, e.g. target[::2], is copied).
    s, bad = _triton_reduce.reduction_scale(target.contiguous(), weight.contiguous(), z.shape[1], spec.ignore_index,
                                            spec.reduction, loss_dtype(z.dtype), scale)
    if bad is not None and z.device.type == "cpu":
        row = int(bad[0])
        if row < z.shape[0]:
            raise IndexError(f"target holds {int(target[row])}, outside [0, {z.shape[1]}) and not "
                             f"ignore_index={spec.ignore_index}")
    return s, None


def _dense_prologue(z: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
                    stride_g: int) -> Tuple[Tensor, Optional[Tensor]]:
    from . import _triton_reduce

    cdtype = loss_dtype(z.dtype)
    plan = _plan(z, target, stride_g, spec)
    weighted = scale is None and spec.reduction == "weighted_mean"
    mass = None
    if weighted or _needs_mass(target, spec, plan):
        # Split like the loss kernel, so that a few long rows still spread over the SMs.
        mass = _triton_reduce.mass_partials(target, weight, plan.splits, plan.cols_per_split, cdtype)
    if scale is not None:
        return scale.to(cdtype), mass
    if weighted:
        return _triton_reduce.mass_scale(mass), mass
    # Every row counts: "mean" is 1 / N, known on the host (a fill, no sync).
    s = 1.0 / max(1, z.shape[0]) if spec.reduction == "mean" else 1.0
    return torch.full((), s, dtype=cdtype, device=z.device), mass


def _epilogue(rows: Tensor, s: Tensor, spec: LossSpec) -> Tensor:
    if spec.reduction == "none":
        return rows
    from . import _triton_reduce

    return _triton_reduce.reduce_rows(rows, s)


def _forward(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
             compute_grad: bool, tensors: LogitTensors = NO_TENSORS) -> Tuple[Tensor, Tensor]:
    # The kernels take any row stride but unit column stride (coalesced, vectorised loads): copy otherwise.
    z = logits if _unit_col_stride(logits) else logits.contiguous()
    _check_weight_mode(target, spec)
    if target.is_floating_point():
        target = _dense_target(target, z)
    grad = torch.empty(z.shape if compute_grad else (0,), dtype=z.dtype, device=z.device)
    s, mass = _prologue(z, target, weight, scale, spec, grad.stride(0) if compute_grad else z.shape[1])
    loss = _launch(z, target, weight, s, spec, grad if compute_grad else None, tensors=tensors, mass=mass)
    return _epilogue(loss, s, spec), grad


def _forward_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
                     tensors: LogitTensors = NO_TENSORS) -> Tensor:
    _check_weight_mode(target, spec)
    if target.is_floating_point():
        target = _dense_target(target, logits)
    unit = _unit_col_stride(logits)
    s, mass = _prologue(logits, target, weight, scale, spec, logits.stride(0) if unit else logits.shape[1])
    if unit:
        return _epilogue(_launch(logits, target, weight, s, spec, logits, tensors=tensors, mass=mass), s, spec)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    loss = _launch(logits.contiguous(), target, weight, s, spec, grad, tensors=tensors, mass=mass)
    logits.copy_(grad)
    return _epilogue(loss, s, spec)


# CPU tensors: the kernels under the Triton interpreter (_launch refuses them otherwise).
_opdefs.register_kernels("_triton", _forward, _forward_inplace)
forward = torch.ops.cbkernels.cb_loss_fwd_triton.default
forward_inplace = torch.ops.cbkernels.cb_loss_fwd_inplace_triton.default


def loss_fwd(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
             compute_grad: bool, tensors: LogitTensors = NO_TENSORS) -> Tuple[Tensor, Tensor]:
    """The backend's forward (see _backends): the op under torch.compile, the function itself in eager mode."""
    if torch.compiler.is_compiling():
        return forward(logits, target, weight, scale, *spec.fwd_args(compute_grad), **tensors.kwargs())
    return _forward(logits, target, weight, scale, spec, compute_grad, tensors)


def loss_fwd_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: LossSpec,
                     tensors: LogitTensors = NO_TENSORS) -> Tensor:
    """In-place forward: the op under torch.compile (which tracks the mutation); in eager mode the function itself,
    then the logits' version counter bumped as an in-place op would (the kernel writes them behind autograd)."""
    if torch.compiler.is_compiling():
        return forward_inplace(logits, target, weight, scale, *spec.op_args(), **tensors.kwargs())
    rows = _forward_inplace(logits, target, weight, scale, spec, tensors)
    torch.autograd.graph.increment_version(logits)
    return rows


def _main_variant(dtype: str, plan: Plan, align: int, math: tuple, has_grad: bool, flags: tuple) -> dict:
    lt, gc, smooth = math
    return dict(kernel="cb_loss_kernel", dtype=dtype, num_warps=plan.num_warps,
                constexprs=dict(LOSS_TYPE=lt, GAMMA_CASE=gc, HAS_SMOOTHING=smooth, HAS_GRAD=has_grad,
                                SINGLE_TILE=plan.single_tile, SPLIT=plan.splits > 1, ROWS=plan.rows,
                                BLOCK_C=plan.block_c, ALIGN=align, **dict(zip(TRANSFORM_FLAGS, flags))))


def _finish_variant(dtype: str, split: Plan, align: int, fin: tuple, flags: tuple) -> dict:
    lt, gc, smooth, has_grad = fin
    return dict(kernel="cb_loss_split_finish_kernel", dtype=dtype, num_warps=split.num_warps,
                constexprs=dict(LOSS_TYPE=lt, GAMMA_CASE=gc, HAS_SMOOTHING=smooth, HAS_GRAD=has_grad,
                                MAX_SPLITS=MAX_SPLITS, BLOCK_C=split.block_c, ALIGN=align,
                                **dict(zip(TRANSFORM_FLAGS, flags))))


_DTYPES = (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp64", 8))


def _plans(itemsize: int, align: int, one_vs_all: bool, softcap: bool = False,
           dense: Optional[int] = None) -> Tuple[list, Plan]:
    """Every single-tile plan (smallest block first), the loop plan and the split plan of a dtype and ALIGN."""
    single_max = single_tile_max(itemsize, align, one_vs_all, softcap, dense)
    shapes = {}  # ordered, without duplicates
    block = 16
    while block <= single_max:
        shapes[plan_launch(1 << 20, block, itemsize, 1, align, one_vs_all, softcap, dense)] = None
        block *= 2
    shapes[plan_launch(1 << 20, single_max + 1, itemsize, 1, align, one_vs_all, softcap, dense)] = None  # loop
    split = plan_launch(1, single_max + 1, itemsize, 1 << 20, align, one_vs_all, softcap, dense)
    shapes[split] = None
    return list(shapes), split


def launch_variants() -> Iterator[dict]:
    """Every (kernel, constexprs, num_warps) the dispatcher can launch without logit transforms or z-loss, for
    ahead-of-time build checks, then ``transform_variants()``: a covering set of the launches with them."""
    math = [(SOFTMAX, GAMMA_ZERO, False), (SOFTMAX, GAMMA_ZERO, True), (SIGMOID, GAMMA_ZERO, False)]
    math += [(lt, gc, False) for lt in (FOCAL, SOFTMAX_FOCAL) for gc in (GAMMA_HALF, GAMMA_ONE, GAMMA_TWO, GAMMA_ANY)]
    for dtype, itemsize in _DTYPES:
        finishes = sorted({finish_flags(lt, gc, smooth, grad) for lt, gc, smooth in math for grad in (False, True)})
        for align in sorted({1, 2, 16 // itemsize}):
            for one_vs_all in (False, True):
                family = [m for m in math if (m[0] in (SIGMOID, FOCAL)) == one_vs_all]
                shapes, split = _plans(itemsize, align, one_vs_all)
                for plan in shapes:
                    for m in family:
                        for has_grad in (False, True):
                            yield _main_variant(dtype, plan, align, m, has_grad, NO_TRANSFORM_FLAGS)
            for fin in finishes:
                yield _finish_variant(dtype, split, align, fin, NO_TRANSFORM_FLAGS)
    yield from transform_variants()
    yield from dense_variants()


def transform_variants() -> Iterator[dict]:
    """A covering set of the launches with logit transforms or z-loss (the full product would multiply the sweep
    by 32): per dtype, every flag of the family at once (each flag's code is present; a flag alone holds fewer
    live values, so the all-flags variant bounds its registers) with the family's two heaviest losses (softmax
    focal with a general gamma and smoothed softmax; focal with a general gamma and 0.5), with the gradient
    (without it a kernel holds fewer live values), on the tile shapes with the most rows, the largest single tile,
    the loop and the split path (and its finish kernel), 16-byte accesses; the largest single tile and the loop at
    ALIGN 1. fp16 (bf16's twin but for conversions) and fp64 (one-value tiles; gradcheck and tests): the largest
    single tile, the loop and the split path. The largest one-vs-all tile (8192 focal values with softcap reach
    the 128-register cap, unspilled) for every one-vs-all loss and gamma case."""
    heavy = {False: [(SOFTMAX_FOCAL, GAMMA_ANY, False), (SOFTMAX, GAMMA_ZERO, True)],
             True: [(FOCAL, GAMMA_ANY, False), (FOCAL, GAMMA_HALF, False)]}
    seen = set()

    def once(v):
        key = (v["kernel"], v["dtype"], v["num_warps"], tuple(sorted(v["constexprs"].items())))
        if key not in seen and any(v["constexprs"][f] for f in TRANSFORM_FLAGS):
            seen.add(key)
            return [v]
        return []

    for dtype, itemsize in _DTYPES:
        for align in sorted({1, 16 // itemsize}, reverse=True):
            narrow = align * itemsize < 16
            for one_vs_all in (False, True):
                every = (True, True, True, not one_vs_all, True)
                reduced = dtype in ("fp16", "fp64")
                # With the gradient only: without it a kernel holds fewer live values (no gradient tile, no sech^2),
                # so the variant with it bounds the registers of the one without.
                combos = [(m, True, every) for m in heavy[one_vs_all]]
                if narrow:
                    combos = combos[:1]
                for m, has_grad, flags in combos:
                    shapes, split = _plans(itemsize, align, one_vs_all, softcap=flags[0])
                    single = [p for p in shapes if p.single_tile]
                    loop = [p for p in shapes if not p.single_tile and p.splits == 1]
                    picked = [single[-1]] + loop if narrow or reduced else [single[0], single[-1]] + loop
                    if not narrow:
                        picked.append(split)
                    for plan in picked:
                        if plan.splits > 1:
                            first, finish = split_transform_flags(m[0], has_grad, flags)
                            yield from once(_main_variant(dtype, plan, align, m, has_grad, first))
                            fin = finish_flags(*m, has_grad)
                            yield from once(_finish_variant(dtype, plan, align, fin, finish))
                        else:
                            yield from once(_main_variant(dtype, plan, align, m, has_grad, flags))
                if one_vs_all and not narrow and not reduced:
                    shapes, _ = _plans(itemsize, align, True, softcap=True)
                    largest = [p for p in shapes if p.single_tile][-1]
                    for m in [(SIGMOID, GAMMA_ZERO, False)] + [(FOCAL, gc, False) for gc in (GAMMA_ONE, GAMMA_TWO)]:
                        yield from once(_main_variant(dtype, largest, align, m, True, every))


def _dense_variant(v: dict, target: str, class_weights: bool, **extra) -> dict:
    v["constexprs"].update(DENSE=True, CLASS_WEIGHTS=class_weights, **extra)
    v["target"] = target  # q's element type, for the build check's signature
    return v


def dense_variants() -> Iterator[dict]:
    """A covering set of the dense-target launches (DENSE, CLASS_WEIGHTS, and FOCAL_SUMS, the softmax-focal split's
    middle launch), not their product with the rest (which would double the sweep). Each family's heaviest losses
    with every transform and the gradient bound what they leave out (a kernel without them holds fewer live values;
    see transform_variants): bf16, the main case, every path (the largest single tile and the one with the most
    rows, the loop, the split path with its finish and middle launches) in both weight modes per family (softmax
    focal in class mode, smoothed softmax and focal with a general gamma in sample mode, sigmoid in class mode), two
    transform-free launches, and 2-byte accesses (odd C) on each family's largest tiles; fp32 every path of softmax
    focal, and the single tile and split of the others; fp16 (bf16's twin but for conversions) and float32 q of
    bf16 logits on the largest tile; fp64 (one-value tiles) and float32 q of fp64 logits likewise, and fp64's split
    path."""
    seen = set()

    def once(v):
        key = (v["kernel"], v["dtype"], v["target"], v["num_warps"], tuple(sorted(v["constexprs"].items())))
        if key in seen:
            return []
        seen.add(key)
        return [v]

    def launches(dtype, itemsize, target, align, math, class_weights, flags, paths):
        one_vs_all = math[0] in (SIGMOID, FOCAL)
        shapes, split = _plans(itemsize, align, one_vs_all, softcap=flags[0], dense=math[0])
        single = [p for p in shapes if p.single_tile]
        by_path = {"largest": single[-1:], "rows": single[:1], "split": [split],
                   "loop": [p for p in shapes if not p.single_tile and p.splits == 1]}
        for plan in (p for path in paths for p in by_path[path]):
            if plan.splits == 1:
                yield from once(_dense_variant(_main_variant(dtype, plan, align, math, True, flags), target,
                                               class_weights))
                continue
            first, finish = split_transform_flags(math[0], True, flags)
            yield from once(_dense_variant(_main_variant(dtype, plan, align, math, True, first), target,
                                           class_weights))
            if math[0] == SOFTMAX_FOCAL:
                sums = (math[0], math[1], False, False)
                yield from once(_dense_variant(_finish_variant(dtype, plan, align, sums, first), target,
                                               class_weights, FOCAL_SUMS=True))
            yield from once(_dense_variant(_finish_variant(dtype, plan, align, finish_flags(*math, True), finish),
                                           target, class_weights and not one_vs_all))

    every = {False: (True,) * len(TRANSFORM_FLAGS), True: (True, True, True, False, True)}  # by one_vs_all
    focal_sm, smooth, focal, sigmoid = ((SOFTMAX_FOCAL, GAMMA_ANY, False), (SOFTMAX, GAMMA_ZERO, True),
                                        (FOCAL, GAMMA_ANY, False), (SIGMOID, GAMMA_ZERO, False))
    paths = ("largest", "rows", "loop", "split")
    # (dtype, itemsize, q dtype, ALIGN, loss, class mode, flags, paths)
    cases = [("bf16", 2, "bf16", 8, focal_sm, True, every[False], paths),
             ("bf16", 2, "bf16", 8, smooth, False, every[False], paths),
             ("bf16", 2, "bf16", 8, focal, False, every[True], paths),
             ("bf16", 2, "bf16", 8, sigmoid, True, every[True], ("largest", "loop", "split")),
             ("bf16", 2, "bf16", 8, (SOFTMAX, GAMMA_ZERO, False), False, NO_TRANSFORM_FLAGS, ("largest",)),
             ("bf16", 2, "bf16", 8, (FOCAL, GAMMA_TWO, False), True, NO_TRANSFORM_FLAGS, ("largest",)),
             ("bf16", 2, "bf16", 1, focal_sm, True, every[False], ("largest",)),
             ("bf16", 2, "bf16", 1, smooth, False, every[False], ("largest",)),
             # Without the softcap the softmax tile is twice as wide.
             ("bf16", 2, "bf16", 8, smooth, False, (False,) + every[False][1:], ("largest",)),
             ("bf16", 2, "bf16", 1, smooth, False, (False,) + every[False][1:], ("largest",)),
             ("bf16", 2, "bf16", 1, focal, False, every[True], ("largest",)),
             ("fp32", 4, "fp32", 4, focal_sm, True, every[False], ("largest", "loop", "split")),
             ("fp32", 4, "fp32", 4, smooth, False, every[False], ("largest",)),
             ("fp32", 4, "fp32", 4, focal, False, every[True], ("largest", "split")),
             ("fp16", 2, "fp16", 8, focal_sm, True, every[False], ("largest",)),
             ("fp16", 2, "fp16", 8, focal, False, every[True], ("largest",)),
             ("bf16", 2, "fp32", 8, focal_sm, True, every[False], ("largest",)),
             ("bf16", 2, "fp32", 8, focal, False, every[True], ("largest",)),
             ("fp64", 8, "fp64", 2, focal_sm, True, every[False], ("largest", "split")),
             ("fp64", 8, "fp64", 2, focal, False, every[True], ("largest", "split")),
             ("fp64", 8, "fp32", 2, focal_sm, False, every[False], ("largest",))]
    for dtype, itemsize, target, align, math, class_weights, flags, case_paths in cases:
        yield from launches(dtype, itemsize, target, align, math, class_weights, flags, case_paths)
