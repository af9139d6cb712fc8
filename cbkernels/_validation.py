"""Every check on user input, in one place at the API edge (SPEC sections 1-2, 5, 8).

Backends and kernels trust what passes here and never check again.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from ._backends import BACKEND_NAMES
from ._opdefs import (
    FOCAL,
    LOSS_TYPES,
    NO_TENSORS,
    REDUCTIONS,
    SIGMOID,
    SOFTMAX,
    WEIGHT_CLASS,
    WEIGHT_MODES,
    WEIGHT_SAMPLE,
    LogitTensors,
    LossSpec,
)
from .weights import check_beta, class_balanced_weights

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)


def _number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def loss_spec(loss_type: str, *, gamma: float, label_smoothing: float, ignore_index: int,
              reduction: str, softcap=None, logit_scale: float = 1.0, z_loss: float = 0.0,
              return_z_loss: bool = False, weight_mode: str = "sample") -> LossSpec:
    """The one options object of a call: every option checked here, once, then carried unchanged to the kernels."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if label_smoothing and LOSS_TYPES[loss_type] != SOFTMAX:
        raise ValueError(f"label_smoothing applies to loss_type='softmax' only, got loss_type={loss_type!r}")
    if softcap is not None and (not _number(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not _number(logit_scale) or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if not _number(z_loss) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    one_vs_all = LOSS_TYPES[loss_type] in (SIGMOID, FOCAL)
    if z_loss and one_vs_all:
        raise ValueError(f"z_loss applies to the softmax losses only (it penalises the softmax normaliser), got "
                         f"loss_type={loss_type!r}")
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {type(return_z_loss).__name__}")
    if return_z_loss and one_vs_all:
        raise ValueError(f"return_z_loss applies to the softmax losses only, got loss_type={loss_type!r}")
    if not isinstance(weight_mode, str) or weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {tuple(WEIGHT_MODES)}, got {weight_mode!r}")
    return LossSpec(loss_type=LOSS_TYPES[loss_type], gamma=float(gamma), label_smoothing=float(label_smoothing),
                    ignore_index=int(ignore_index), reduction=reduction,
                    softcap=0.0 if softcap is None else float(softcap), logit_scale=float(logit_scale),
                    z_loss=float(z_loss), weight_mode=WEIGHT_MODES[weight_mode])


def class_vector(name: str, v, num_classes: int, device: torch.device) -> Optional[Tensor]:
    """A ``[C]`` transform vector (``logit_offset``, ``target_margin``; SPEC section 10) as the kernels read it:
    float32 (any floating dtype is converted), contiguous, on the logits' device; None stays None. Non-finite
    entries raise ``ValueError`` on the CPU; on a GPU they fail a device-side assert (no host sync). A vector that
    requires grad is refused (the kernels give it no gradient) unless grad mode is off."""
    if v is None:
        return None
    _check_class_tensor(name, v, num_classes, device, "a torch.Tensor or None")
    if v.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but the fused kernels give no gradient for it (SPEC section 10: "
                         f"the gradient is the logits'); pass {name}.detach() to use it as a constant")
    v = v.detach()
    if v.dtype != torch.float32:
        v = v.float()  # a float64 entry beyond float32's range becomes inf and is caught below
    if not v.is_contiguous():
        v = v.contiguous()
    if device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite (as float32), got a non-finite entry")
    else:
        torch._assert_async(torch.isfinite(v).all(), f"cbkernels: {name} has a non-finite entry")
    return v


def logit_tensors(logit_offset, target_margin, num_classes: int, device: torch.device) -> LogitTensors:
    """The checked ``[C]`` vectors of SPEC section 10 (``NO_TENSORS`` when neither is given)."""
    if logit_offset is None and target_margin is None:
        return NO_TENSORS
    return LogitTensors(class_vector("logit_offset", logit_offset, num_classes, device),
                        class_vector("target_margin", target_margin, num_classes, device))


def check_backend(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def check_logits_target(logits: Tensor, target: Tensor) -> bool:
    """O(1) metadata checks; the target values are checked by the op (IndexError on the CPU, a device assert on a
    GPU), in the pass that reads them. Returns whether ``target`` is dense (SPEC section 9: floating, the logits'
    shape)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16, bfloat16 (or float64), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., C] with the classes on the last dim, got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has 0 classes (shape {tuple(logits.shape)}): need C >= 1")
    if target.is_floating_point():
        if target.shape == logits.shape[:-1]:
            raise TypeError(f"target must hold int64 or int32 class indices, got {target.dtype} (a floating target "
                            f"holds per-class targets and has the logits' shape {tuple(logits.shape)}: SPEC section 9)")
        if target.shape != logits.shape:
            raise ValueError(f"a floating (dense) target must have the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(target.shape)} (class indices need an int64 or int32 target)")
        if target.dtype not in LOGIT_DTYPES:
            raise TypeError(f"a dense target must be float32, float16, bfloat16 or float64, got {target.dtype}")
        if target.device != logits.device:
            raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError("target requires grad, but the fused kernels give no gradient for it (the gradient is "
                             "the logits'); pass target.detach()")
        return True
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold int64 or int32 class indices, or be a floating [..., C] tensor of "
                        f"per-class targets (SPEC section 9), got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    # The values (each target in [0, C) or ignore_index) are checked by the op itself, in the pass that reads them.
    return False


def dense_target(target: Tensor, logits: Tensor) -> Tensor:
    """A checked dense target as every kernel reads it: the logits' dtype or float32 (another floating dtype is
    converted to float32: exact for the narrower ones, float32's precision for float64), unit stride along the
    classes, no autograd history. Its values (``q >= 0``, ``q <= 1`` for the sigmoid losses, no NaN) are checked by
    the CPU ops; on a GPU they are not (no host sync)."""
    if target.requires_grad:
        target = target.detach()
    if target.dtype != logits.dtype and target.dtype != torch.float32:
        target = target.float()
    if target.shape[-1] > 1 and target.stride(-1) != 1:
        target = target.contiguous()
    return target


def index_class_spec(spec: LossSpec) -> LossSpec:
    """``weight_mode="class"`` with class-index targets: where it equals ``"sample"`` (the softmax losses without
    label smoothing: one class term per row) the spec says sample, which every kernel computes; elsewhere it stays
    class, which only the torch backend computes for index targets (see ``losses._call``)."""
    if spec.weight_mode == WEIGHT_CLASS and spec.loss_type not in (SIGMOID, FOCAL) and spec.label_smoothing == 0.0:
        return spec._replace(weight_mode=WEIGHT_SAMPLE)
    return spec


def normalizer_scale(normalizer, reduction: str, device: torch.device, dtype: torch.dtype) -> Optional[Tensor]:
    """The op's scale for a ``normalizer`` (SPEC section 12): ``1 / normalizer`` as a 0-d ``dtype`` tensor on
    ``device``, or None without one. A tensor normaliser is never read on the host off the CPU (and inside a
    compiled graph a non-positive one is a device-side assert); a number is checked here."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only (it replaces the number of counted rows), "
                         f"got reduction={reduction!r}")
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
        if normalizer.device != device:
            raise ValueError(f"normalizer is on {normalizer.device} but logits are on {device}")
        n = normalizer.detach().to(dtype)
        if device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(n > 0):
                raise ValueError(f"normalizer must be > 0, got {n.item()!r}")
        else:
            torch._assert_async(n > 0, "cbkernels: normalizer must be > 0")
        return 1.0 / n
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be a number or a 0-d tensor, got {type(normalizer).__name__}")
    if not math.isfinite(normalizer) or normalizer <= 0:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    return torch.full((), 1.0 / float(normalizer), dtype=dtype, device=device)  # a fill: no host-to-device copy


def check_inplace(logits: Tensor) -> None:
    """``inplace_backward=True`` writes each element's gradient over that element: elements sharing memory (an
    expanded tensor, a stride-0 dim) would be written by several rows at once, concurrently on a GPU. O(ndim)."""
    if logits.numel() == 0:
        return
    dims = sorted((abs(st), sz) for sz, st in zip(logits.shape, logits.stride()) if sz > 1)
    reach = 1  # a dim must stride past everything the smaller-stride dims span (a sufficient test, exact for views)
    for stride, size in dims:
        if stride < reach:
            raise ValueError(
                f"inplace_backward=True writes the gradient over the logits, but their elements overlap in memory "
                f"(shape {tuple(logits.shape)}, strides {tuple(logits.stride())}: e.g. an expanded tensor); pass "
                "logits.contiguous() or use inplace_backward=False"
            )
        reach = stride * size


def _check_class_tensor(name: str, v, num_classes: int, device: torch.device, what: str = "a torch.Tensor") -> None:
    """A per-class ``[C]`` floating tensor on the logits' device (the weight, the transform vectors)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be {what}, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != num_classes:
        raise ValueError(f"{name} must have shape [C] = [{num_classes}], got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but logits are on {device}")


def given_weight(weight: Tensor, num_classes: int, device: torch.device) -> Tensor:
    """A precomputed ``[C]`` weight, checked and as the kernels read it (float32, no autograd history): the tensor
    itself when it already is (no op dispatched)."""
    _check_class_tensor("weight", weight, num_classes, device)
    if weight.requires_grad:
        weight = weight.detach()
    return weight if weight.dtype == torch.float32 else weight.float()


def class_weights(
    samples_per_class, weight: Optional[Tensor], beta: float, num_classes: int, device: torch.device
) -> Tensor:
    """The ``[C]`` float32 class weights on ``device`` from counts or a given weight (ones if neither)."""
    beta = check_beta(beta)  # checked even when a weight is given: a bad beta is a bug either way
    if samples_per_class is not None and weight is not None:
        raise ValueError("give samples_per_class (with beta) or a precomputed weight, not both")
    if weight is not None:
        return given_weight(weight, num_classes, device)
    if samples_per_class is None:
        return _unit_weights(num_classes, device)
    if torch.compiler.is_compiling():
        return _traceable_weights(samples_per_class, beta, num_classes, device)
    key, owner = _counts_key(samples_per_class)
    if key is not None:
        key = (key, beta, num_classes, device)
        hit = _WEIGHT_CACHE.get(key)
        if hit is not None and (owner is None or hit[0]() is owner):
            _WEIGHT_CACHE.move_to_end(key)
            return hit[1]
    w = class_balanced_weights(samples_per_class, beta=beta)
    if w.shape[0] != num_classes:
        raise ValueError(f"samples_per_class has {w.shape[0]} classes but logits have C = {num_classes}")
    w = w.to(device)
    if key is not None:
        _cache_put(key, weakref.ref(owner) if owner is not None else None, w)
    return w


# Device weights of recent (counts, beta, C, device): the functional API with counts is called every step with the
# same counts, and recomputing them would cost a host computation and a host-to-device copy (a stall, and an error
# inside CUDA-graph capture) on every call. Values are never handed to the user (only to the kernels, which read them).
_WEIGHT_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_WEIGHT_CACHE_SIZE = 16


def _unit_weights(num_classes: int, device: torch.device) -> Tensor:
    """``w = 1`` (no counts, no weight: the plain loss), made once per (C, device) rather than on every call."""
    if torch.compiler.is_compiling():
        return torch.ones(num_classes, dtype=torch.float32, device=device)
    key = ("ones", num_classes, device)
    hit = _WEIGHT_CACHE.get(key)
    if hit is not None:
        _WEIGHT_CACHE.move_to_end(key)
        return hit[1]
    w = torch.ones(num_classes, dtype=torch.float32, device=device)
    _cache_put(key, None, w)
    return w


def _cache_put(key: tuple, owner_ref, w: Tensor) -> None:
    """Stores ``(owner_ref, w)``, the least recently used entries leaving beyond ``_WEIGHT_CACHE_SIZE``."""
    _WEIGHT_CACHE[key] = (owner_ref, w)
    while len(_WEIGHT_CACHE) > _WEIGHT_CACHE_SIZE:
        _WEIGHT_CACHE.popitem(last=False)


def _counts_key(samples_per_class) -> tuple:
    """(key, owner): a hashable key that changes whenever the counts may have, or (None, None) when there is none.

    A tensor is keyed by identity and version counter (bumped by every in-place write, to it or to a view of it),
    never by value, which would read a device tensor on the host; the cached entry holds a weak reference to it so
    that a recycled ``id`` never matches. Lists, tuples and numpy arrays are keyed by value (host data already)."""
    n = samples_per_class
    if isinstance(n, Tensor):
        try:
            version = n._version
        except RuntimeError:  # inference-mode tensors have no version counter
            return None, None
        return ("tensor", id(n), version, n.data_ptr(), n.device, n.dtype, tuple(n.shape)), n
    if type(n).__module__ == "numpy" and type(n).__name__ == "ndarray" and n.dtype.kind in "biuf":
        return ("array", n.dtype.str, n.shape, n.tobytes()), None
    if isinstance(n, (list, tuple)) and all(type(x) in (int, float) for x in n):
        return ("seq", tuple(n)), None
    return None, None


def _traceable_weights(samples_per_class, beta: float, num_classes: int, device: torch.device) -> Tensor:
    """``class_balanced_weights(..., zero_count="error")`` with no data-dependent Python branch, so a
    compiled graph keeps the functional API with counts whole; empty classes fail a device assert."""
    n = torch.as_tensor(samples_per_class, dtype=torch.float64, device=device)
    if n.shape != (num_classes,):
        raise ValueError(f"samples_per_class must have shape [C] = [{num_classes}], got {tuple(n.shape)}")
    torch._assert_async((n > 0).all(), "cbkernels: samples_per_class has an empty class (count 0)")
    if beta == 0.0:
        return torch.ones(num_classes, dtype=torch.float32, device=device)
    log_beta = math.log1p(beta - 1.0) if beta >= 0.5 else math.log(beta)
    w = (1.0 - beta) / -torch.expm1(n * log_beta)
    return (w * (num_classes / w.sum())).float()
