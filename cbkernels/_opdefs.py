"""The cbkernels ops, defined once: loss-type codes, the loss specification, every op's schema and fake.

A leaf module (it imports only torch). Every backend computes the same op over 2-D logits ``[N, C]``, with one
argument list: the tensors, the fields of ``LossSpec`` in declaration order, ``compute_grad`` before the trailing
fields (added later, with defaults: a call written for the older schema means what it meant)::

    cb_loss_fwd<suffix>(Tensor logits, Tensor target, Tensor weight, Tensor? scale, int loss_type, float gamma,
                        float label_smoothing, int ignore_index, bool compute_grad, str reduction="none",
                        float softcap=0.0, float logit_scale=1.0, float z_loss=0.0, int weight_mode=0,
                        Tensor? logit_offset=None, Tensor? target_margin=None, Tensor(b!)? z_rows=None)
                        -> (Tensor, Tensor)
    cb_loss_fwd_inplace<suffix>(Tensor(a!) logits, Tensor target, Tensor weight, Tensor? scale, int loss_type,
                                float gamma, float label_smoothing, int ignore_index, str reduction="none",
                                float softcap=0.0, float logit_scale=1.0, float z_loss=0.0, int weight_mode=0,
                                Tensor? logit_offset=None, Tensor? target_margin=None, Tensor(b!)? z_rows=None)
                                -> Tensor

One op call is the whole forward of a loss (SPEC sections 2-5): it checks the targets (a value outside ``[0, C)``
that is not ``ignore_index`` raises ``IndexError`` on the CPU, fails a device-side assert on a GPU), computes the
reduction's normaliser ``s`` (SPEC section 5: ``1 / max(1, #valid rows)`` for ``"mean"``, ``1 / sum_i a_i`` (0 when
that is 0) for ``"weighted_mean"``, 1 for ``"sum"`` and ``"none"``; a given ``scale``, a 0-d tensor on the logits'
device, replaces it), the per-row losses ``l_i`` (float32; float64 for float64 logits; SPEC section 3, 0 for ignored
rows) and ``s * dl/dz`` ``[N, C]`` in the logits' dtype (SPEC section 4; ``[0]`` without ``compute_grad``). It
returns ``[l_i]`` for ``"none"``, else the 0-d ``s * sum_i l_i``, summed in a fixed order (equal inputs, equal
bits). The in-place op writes the gradient over the logits.

The logit transforms and the z-loss (SPEC sections 10-11): the loss is computed on
``z' = logit_scale * (softcap * tanh(z / softcap) + logit_offset_j - target_margin_y [j == y])`` (softcap 0: none;
a None vector: none) plus ``z_loss * lse(z')**2`` per counted row (softmax losses), and the gradient is with
respect to the raw ``z``. ``z_rows`` (float32 / float64 ``[N]``, optional) receives each row's z-loss term
``z_loss * lse(z')**2`` (0 for ignored rows), unnormalised, for ``return_z_loss``.

Dense targets (SPEC section 9): ``target`` may instead be a floating ``[N, C]`` tensor of probabilities / multi-hot
rows ``q_ij >= 0`` (the logits' dtype or float32), with no ignore_index (every row counts). ``weight_mode``
``WEIGHT_SAMPLE`` multiplies row i by ``a_i = sum_j w_j q_ij / sum_j q_ij`` (1 for a row without mass; index
targets: ``w[y_i]``), ``WEIGHT_CLASS`` each class term j by ``w_j``; ``"weighted_mean"`` divides by the sample
weights' sum in both modes. The margin becomes ``m_j q_ij``. The kernels do not check q's values (the compiled CPU
kernel does: ValueError).

Suffixes: ``""`` for the compiled ops (kernels for CPU and CUDA in ``cbkernels._C``, which registers kernels only),
``"_torch"`` and ``"_triton"`` for the Python backends, which register theirs with ``register_kernels``.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3  # the op's loss_type codes (csrc and Triton use the same)
LOSS_TYPES = {"softmax": SOFTMAX, "sigmoid": SIGMOID, "focal": FOCAL, "softmax_focal": SOFTMAX_FOCAL}
WEIGHT_SAMPLE, WEIGHT_CLASS = 0, 1  # the op's weight_mode codes (SPEC section 9)
WEIGHT_MODES = {"sample": WEIGHT_SAMPLE, "class": WEIGHT_CLASS}

class LossSpec(NamedTuple):
    """What one loss call computes besides its tensors (SPEC sections 3-5), built and validated once at the API edge
    by ``_validation.loss_spec`` and carried unchanged down to each op wrapper, which flattens it (``op_args``,
    ``fwd_args``).

    Immutable Python scalars, so ``torch.compile`` treats a spec as a constant (a NamedTuple rather than a frozen
    dataclass: every call builds one, in 0.2 us instead of 0.8). Every field is an op argument of the same name,
    schema type from the annotation. The ``TRAILING_FIELDS`` were added to the ops after their first release: they
    come last in every schema (after ``compute_grad``) with their default, so calls written for the older schema
    still mean what they meant. A field's default is the option switched off.
    """

    loss_type: int  # a value of LOSS_TYPES
    gamma: float = 0.0  # focal exponent (focal losses only)
    label_smoothing: float = 0.0  # eps (softmax only)
    ignore_index: int = -100
    reduction: str = "none"  # one of REDUCTIONS; "none" returns the per-row losses (trailing)
    softcap: float = 0.0  # c > 0: z <- c tanh(z / c) first (SPEC section 10); 0 for none (trailing)
    logit_scale: float = 1.0  # s > 0: z <- s z last (trailing)
    z_loss: float = 0.0  # z_loss * lse(z')**2 added per counted row, softmax losses (SPEC section 11; trailing)
    weight_mode: int = 0  # WEIGHT_SAMPLE (a_i multiplies the row) or WEIGHT_CLASS (w_j each class term; SPEC 9)

    @property
    def transforms(self) -> bool:
        """Whether a scalar transform or the z-loss is on (the tensor ones travel in ``LogitTensors``)."""
        return self.softcap != 0.0 or self.logit_scale != 1.0 or self.z_loss != 0.0

    def op_args(self) -> tuple:
        """The fields' values in the order of ``cb_loss_fwd_inplace`` and ``cb_loss`` (no ``compute_grad``), the
        trailing ones that hold their default left out (the schema supplies them: every argument passed costs the
        op call its conversion, about half a microsecond, at CIFAR sizes a few percent of the whole step)."""
        args = _OP_ARGS.get(self)
        if args is None:
            n = len(self)
            while n > _NUM_LEADING and self[n - 1] == _DEFAULTS[n - 1]:
                n -= 1
            args = tuple(self[:n])
            if len(_OP_ARGS) < 256 and not torch.compiler.is_compiling():
                _OP_ARGS[self] = args
        return args

    def fwd_args(self, compute_grad: bool) -> tuple:
        """The scalar arguments of ``cb_loss_fwd``: the leading fields, ``compute_grad``, the trailing fields (those
        that hold their default left out, as in ``op_args``)."""
        args = self.op_args()
        return (*args[:_NUM_LEADING], compute_grad, *args[_NUM_LEADING:])

    @classmethod
    def from_op_args(cls, args) -> "LossSpec":
        """The spec back from the flat scalar arguments of ``cb_loss_fwd_inplace`` / ``cb_loss``."""
        return cls(*args[:len(cls._fields)])

    @classmethod
    def from_fwd_args(cls, args) -> Tuple["LossSpec", bool]:
        """``(spec, compute_grad)`` back from the flat scalar arguments of ``cb_loss_fwd``."""
        return cls(*args[:_NUM_LEADING], *args[_NUM_LEADING + 1:len(cls._fields) + 1]), bool(args[_NUM_LEADING])


class LogitTensors(NamedTuple):
    """The ops' optional tensor arguments, last in every schema (after the spec's fields): the ``[C]`` float32
    vectors of SPEC section 10 on the logits' device, and ``z_rows``, an ``[N]`` buffer (the loss' dtype) the op
    fills with each row's z-loss term (``return_z_loss``). None: off."""

    logit_offset: Optional[Tensor] = None
    target_margin: Optional[Tensor] = None
    z_rows: Optional[Tensor] = None

    def kwargs(self) -> dict:
        """The given ones as keyword arguments of an op call (the spec's trailing defaults may be left out before
        them: ``LossSpec.op_args``)."""
        return {k: v for k, v in zip(self._fields, self) if v is not None}

    @classmethod
    def from_args(cls, args, fwd: bool) -> "LogitTensors":
        """The tensors back from an op's flat arguments after its four leading tensors (``fwd``: ``cb_loss_fwd``'s,
        with ``compute_grad``)."""
        return cls(*args[len(LossSpec._fields) + int(fwd):])


NO_TENSORS = LogitTensors()
_DEFAULTS = tuple(LossSpec._field_defaults.get(f) for f in LossSpec._fields)
_OP_ARGS: dict = {}  # spec -> op_args() (specs are few per process; capped, then not trimmed)
TRAILING_FIELDS = ("reduction", "softcap", "logit_scale", "z_loss", "weight_mode")  # added after the first schema
REDUCTIONS = ("none", "mean", "sum", "weighted_mean")
_NUM_LEADING = len(LossSpec._fields) - len(TRAILING_FIELDS)
if LossSpec._fields[_NUM_LEADING:] != TRAILING_FIELDS:
    raise TypeError("LossSpec: the trailing fields must come last")
# Keyed by the annotations' classes (so: no __future__ import here).
_SCHEMA_TYPE = {int: "int", float: "float", bool: "bool", str: "str"}


def _schema_args(names, defaults: bool) -> str:
    out = []
    for name in names:
        arg = f"{_SCHEMA_TYPE[LossSpec.__annotations__[name]]} {name}"
        if defaults:
            default = LossSpec._field_defaults[name]
            arg += f'="{default}"' if isinstance(default, str) else f"={default}"
        out.append(arg)
    return ", ".join(out)


# "int loss_type, float gamma, float label_smoothing, int ignore_index" and 'str reduction="none", ...'.
LEADING_SCHEMA = _schema_args(LossSpec._fields[:_NUM_LEADING], defaults=False)
TRAILING_SCHEMA = _schema_args(TRAILING_FIELDS, defaults=True)
TENSORS_SCHEMA = "Tensor? logit_offset=None, Tensor? target_margin=None, Tensor(b!)? z_rows=None"


def schemas(suffix: str) -> Tuple[str, str]:
    """The forward and in-place forward schemas of the ops ``cb_loss_fwd<suffix>``, ``cb_loss_fwd_inplace<suffix>``."""
    return (
        f"cb_loss_fwd{suffix}(Tensor logits, Tensor target, Tensor weight, Tensor? scale, {LEADING_SCHEMA}, "
        f"bool compute_grad, {TRAILING_SCHEMA}, {TENSORS_SCHEMA}) -> (Tensor, Tensor)",
        f"cb_loss_fwd_inplace{suffix}(Tensor(a!) logits, Tensor target, Tensor weight, Tensor? scale, "
        f"{LEADING_SCHEMA}, {TRAILING_SCHEMA}, {TENSORS_SCHEMA}) -> Tensor",
    )


def loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """float32 (float64 for float64 logits): the dtype of every loss and of the computation."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def loss_shape(logits: Tensor, reduction: str) -> tuple:
    """The op's loss: ``[N]`` per row for ``"none"``, 0-d otherwise."""
    return tuple(logits.shape[:1]) if reduction == "none" else ()


def fake_forward(logits: Tensor, target: Tensor, weight: Tensor, scale, *options) -> Tuple[Tensor, Tensor]:
    """The fake kernel of every forward op (torch.compile, opcheck); ``options``: its scalar arguments."""
    spec, compute_grad = LossSpec.from_fwd_args(options)
    loss = logits.new_empty(loss_shape(logits, spec.reduction), dtype=loss_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return loss, grad


def fake_forward_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale, *options) -> Tensor:
    """The fake kernel of every in-place forward op: the loss (the gradient replaces the logits)."""
    spec = LossSpec.from_op_args(options)
    return logits.new_empty(loss_shape(logits, spec.reduction), dtype=loss_dtype(logits.dtype))


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
    """Registers a Python backend's ``forward(logits, target, weight, scale, spec, compute_grad, tensors)`` and
    ``forward_inplace(logits, target, weight, scale, spec, tensors)`` as the kernels of its ops: the dispatcher
    passes the op's flat arguments, turned back into a ``LossSpec`` and ``LogitTensors`` here."""

    def fwd_kernel(logits, target, weight, scale, *options):
        return forward(logits, target, weight, scale, *LossSpec.from_fwd_args(options),
                       LogitTensors.from_args(options, True))

    def fwd_inplace_kernel(logits, target, weight, scale, *options):
        return forward_inplace(logits, target, weight, scale, LossSpec.from_op_args(options),
                               LogitTensors.from_args(options, False))

    for key in dispatch_keys:
        LIB.impl(f"cb_loss_fwd{suffix}", fwd_kernel, key)
        LIB.impl(f"cb_loss_fwd_inplace{suffix}", fwd_inplace_kernel, key)


def define_loss_op(*, _stacklevel: int = 1) -> None:
    """Defines ``cb_loss``, the differentiable whole call of the compiled CPU backend (its autograd kernel lives in
    csrc/cb_autograd.cpp), with its fake: ``cb_loss(Tensor logits, Tensor target, Tensor weight, Tensor? scale,
    <spec>, Tensor? logit_offset=None, Tensor? target_margin=None) -> Tensor`` over 2-D logits, returning the loss
    of ``cb_loss_fwd`` (``return_z_loss`` takes the other path: this op has no ``z_rows``)."""
    qualname = "cbkernels::cb_loss"
    if not _exists(qualname):
        LIB.define(f"cb_loss(Tensor logits, Tensor target, Tensor weight, Tensor? scale, {LEADING_SCHEMA}, "
                   f"{TRAILING_SCHEMA}, Tensor? logit_offset=None, Tensor? target_margin=None) -> Tensor")
    elif not torch._C._dispatch_pystub(qualname, ""):
        return

    def fake(logits, target, weight, scale, *options):
        return fake_forward_inplace(logits, target, weight, scale, *options)

    torch.library.register_fake(qualname, fake, lib=LIB, _stacklevel=_stacklevel + 1)


define_ops("_torch")
define_ops("_triton")
