"""The cbkernels ops, defined once: loss-type codes, the loss specification, every op's schema and fake.

A leaf module (it imports only torch). Every backend computes the same op over 2-D logits ``[N, C]``, with one
argument list: the tensors, then the op fields of ``LossSpec`` in declaration order, then ``compute_grad``::

    cb_loss_fwd<suffix>(Tensor logits, Tensor target, Tensor weight, Tensor? scale, int loss_type, float gamma,
                        float label_smoothing, int ignore_index, str reduction, bool compute_grad) -> (Tensor, Tensor)
    cb_loss_fwd_inplace<suffix>(Tensor(a!) logits, Tensor target, Tensor weight, Tensor? scale, int loss_type,
                                float gamma, float label_smoothing, int ignore_index, str reduction) -> Tensor

One op call is the whole forward of a loss (SPEC sections 2-5): it checks the targets (a value outside ``[0, C)``
that is not ``ignore_index`` raises ``IndexError`` on the CPU, fails a device-side assert on a GPU), computes the
reduction's normaliser ``s`` (SPEC section 5: ``1 / max(1, #valid rows)`` for ``"mean"``, ``1 / sum_i a_i`` (0 when
that is 0) for ``"weighted_mean"``, 1 for ``"sum"`` and ``"none"``; a given ``scale``, a 0-d tensor on the logits'
device, replaces it), the per-row losses ``l_i`` (float32; float64 for float64 logits; SPEC section 3, 0 for ignored
rows) and ``s * dl/dz`` ``[N, C]`` in the logits' dtype (SPEC section 4; ``[0]`` without ``compute_grad``). It
returns ``[l_i]`` for ``"none"``, else the 0-d ``s * sum_i l_i``, summed in a fixed order (equal inputs, equal
bits). The in-place op writes the gradient over the logits.

Suffixes: ``""`` for the compiled ops (kernels for CPU and CUDA in ``cbkernels._C``, which registers kernels only),
``"_torch"`` and ``"_triton"`` for the Python backends, which register theirs with ``register_kernels``.
"""

from typing import Callable, NamedTuple, Tuple

import torch
from torch import Tensor

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3  # the op's loss_type codes (csrc and Triton use the same)
LOSS_TYPES = {"softmax": SOFTMAX, "sigmoid": SIGMOID, "focal": FOCAL, "softmax_focal": SOFTMAX_FOCAL}

class LossSpec(NamedTuple):
    """What one loss call computes besides its tensors (SPEC sections 3-5), built and validated once at the API edge
    by ``_validation.loss_spec`` and carried unchanged down to each op wrapper, which flattens it (``op_args``).

    Immutable Python scalars, so ``torch.compile`` treats a spec as a constant (a NamedTuple rather than a frozen
    dataclass: every call builds one, in 0.2 us instead of 0.8). The op fields come first, in schema order (same
    name, schema type from the annotation); the host-only ones (``HOST_FIELDS``) after them. A field's default is
    the option switched off.
    """

    loss_type: int  # a value of LOSS_TYPES
    gamma: float = 0.0  # focal exponent (focal losses only)
    label_smoothing: float = 0.0  # eps (softmax only)
    ignore_index: int = -100
    reduction: str = "none"  # one of REDUCTIONS; "none" returns the per-row losses

    def op_args(self) -> tuple:
        """The op fields' values, in schema order."""
        return self[:_NUM_OP_FIELDS]

    @classmethod
    def from_op_args(cls, args) -> "LossSpec":
        """The spec back from an op's flat scalar arguments (the host-only fields at their defaults)."""
        return cls(*args)


HOST_FIELDS = ()  # fields read on the host only, never passed to a kernel (none today)
REDUCTIONS = ("none", "mean", "sum", "weighted_mean")
OP_FIELDS = LossSpec._fields[: len(LossSpec._fields) - len(HOST_FIELDS)]
_NUM_OP_FIELDS = len(OP_FIELDS)
if set(LossSpec._fields[_NUM_OP_FIELDS:]) != set(HOST_FIELDS):
    raise TypeError("LossSpec: the host-only fields must come after the op fields")
# Keyed by the annotations' classes (so: no __future__ import here).
_SCHEMA_TYPE = {int: "int", float: "float", bool: "bool", str: "str"}
# The spec's part of every op schema: "int loss_type, float gamma, float label_smoothing, int ignore_index,
# str reduction".
SPEC_SCHEMA = ", ".join(f"{_SCHEMA_TYPE[LossSpec.__annotations__[name]]} {name}" for name in OP_FIELDS)


def schemas(suffix: str) -> Tuple[str, str]:
    """The forward and in-place forward schemas of the ops ``cb_loss_fwd<suffix>``, ``cb_loss_fwd_inplace<suffix>``."""
    return (
        f"cb_loss_fwd{suffix}(Tensor logits, Tensor target, Tensor weight, Tensor? scale, {SPEC_SCHEMA}, "
        "bool compute_grad) -> (Tensor, Tensor)",
        f"cb_loss_fwd_inplace{suffix}(Tensor(a!) logits, Tensor target, Tensor weight, Tensor? scale, {SPEC_SCHEMA}) "
        "-> Tensor",
    )


def loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """float32 (float64 for float64 logits): the dtype of every loss and of the computation."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def loss_shape(logits: Tensor, reduction: str) -> tuple:
    """The op's loss: ``[N]`` per row for ``"none"``, 0-d otherwise."""
    return tuple(logits.shape[:1]) if reduction == "none" else ()


_REDUCTION_FIELD = OP_FIELDS.index("reduction")


def fake_forward(logits: Tensor, target: Tensor, weight: Tensor, scale, *options) -> Tuple[Tensor, Tensor]:
    """The fake kernel of every forward op (torch.compile, opcheck); ``options``: the op fields, ``compute_grad``."""
    loss = logits.new_empty(loss_shape(logits, options[_REDUCTION_FIELD]), dtype=loss_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape if options[-1] else (0,))
    return loss, grad


def fake_forward_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale, *options) -> Tensor:
    """The fake kernel of every in-place forward op: the loss (the gradient replaces the logits)."""
    return logits.new_empty(loss_shape(logits, options[_REDUCTION_FIELD]), dtype=loss_dtype(logits.dtype))


LIB = torch.library.Library("cbkernels", "FRAGMENT")


def _exists(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def define_ops(suffix: str, *, _stacklevel: int = 1) -> None:
    """Defines ``cb_loss_fwd<suffix>`` and ``cb_loss_fwd_inplace<suffix>`` with their fake kernels (once)."""
    for schema, fake in zip(schemas(suffix), (fake_forward, fake_forward_inplace)):
        qualname = "cbkernels::" + schema.split("(", 1)[0]
        if not _exists(qualname):
            LIB.define(schema)
        elif not torch._C._dispatch_pystub(qualname, ""):
            continue  # defined with its fake already
        # Until csrc/ops.cpp drops its m.def block, cbkernels._C defines the compiled ops itself and names the module
        # that must register their fakes (m.set_python_module): cbkernels._ops, the caller of define_ops(""), which
        # _stacklevel points torch's check at. With kernels-only C++ this line only runs after LIB.define.
        torch.library.register_fake(qualname, fake, lib=LIB, _stacklevel=_stacklevel + 1)


def register_kernels(suffix: str, forward: Callable, forward_inplace: Callable, dispatch_keys=("CPU", "CUDA")) -> None:
    """Registers a Python backend's ``forward(logits, target, weight, scale, spec, compute_grad)`` and
    ``forward_inplace(logits, target, weight, scale, spec)`` as the kernels of its ops: the dispatcher passes the
    op's flat arguments, turned back into a ``LossSpec`` here."""

    def fwd_kernel(logits, target, weight, scale, *options):
        return forward(logits, target, weight, scale, LossSpec.from_op_args(options[:-1]), options[-1])

    def fwd_inplace_kernel(logits, target, weight, scale, *options):
        return forward_inplace(logits, target, weight, scale, LossSpec.from_op_args(options))

    for key in dispatch_keys:
        LIB.impl(f"cb_loss_fwd{suffix}", fwd_kernel, key)
        LIB.impl(f"cb_loss_fwd_inplace{suffix}", fwd_inplace_kernel, key)


def define_loss_op(*, _stacklevel: int = 1) -> None:
    """Defines ``cb_loss``, the differentiable whole call of the compiled CPU backend (its autograd kernel lives in
    csrc/cb_autograd.cpp), with its fake: ``cb_loss(Tensor logits, Tensor target, Tensor weight, Tensor? scale,
    <spec>) -> Tensor`` over 2-D logits, returning the loss of ``cb_loss_fwd``."""
    qualname = "cbkernels::cb_loss"
    if not _exists(qualname):
        LIB.define(f"cb_loss(Tensor logits, Tensor target, Tensor weight, Tensor? scale, {SPEC_SCHEMA}) -> Tensor")
    elif not torch._C._dispatch_pystub(qualname, ""):
        return

    def fake(logits, target, weight, scale, *options):
        return logits.new_empty(loss_shape(logits, options[_REDUCTION_FIELD]), dtype=loss_dtype(logits.dtype))

    torch.library.register_fake(qualname, fake, lib=LIB, _stacklevel=_stacklevel + 1)


define_ops("_torch")
define_ops("_triton")
