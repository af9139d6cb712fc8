"""The compiled backends ("cpu", "cuda"): ``cbkernels::cb_loss_fwd`` and ``cb_loss_fwd_inplace``.

Their schemas and fakes are defined in ``_opdefs`` (imported first); loading ``cbkernels._C`` (``_extension``:
prebuilt for this torch, or compiled on first use) registers the kernels that were built (CPU always, CUDA when
compiled in). ``loss_fwd`` / ``loss_fwd_inplace`` are the backend interface
of ``_backends`` and serve both backends; ``forward`` / ``forward_inplace`` take the ops' flat arguments.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _extension, _opdefs  # the ops' schemas and fakes, before the library that registers their kernels

if _extension.load() is None:  # prebuilt for this torch, cached, or built now (cbkernels/_extension.py)
    raise ImportError("cbkernels: the compiled kernels (cbkernels._C) are not available for this torch; see the "
                      "warning above, or 'Install' in the README")

_opdefs.define_ops("")
_opdefs.define_loss_op()

_fwd = torch.ops.cbkernels.cb_loss_fwd.default
_fwd_inplace = torch.ops.cbkernels.cb_loss_fwd_inplace.default

forward = _fwd  # (logits, target, weight, scale, *LossSpec.fwd_args(compute_grad)) -> (loss, grad)
# (logits, target, weight, *LossSpec.op_args()) -> loss, differentiable (autograd in C++: csrc/cb_autograd.cpp).
loss = torch.ops.cbkernels.cb_loss.default


def forward_inplace(logits: Tensor, *args, **kwargs) -> Tensor:
    """The in-place op: per-row loss ``[N]``; ``scale * dl/dz`` is written over ``logits``."""
    rows = _fwd_inplace(logits, *args, **kwargs)
    if not torch.compiler.is_compiling():
        # Like every in-place ATen op: bump the version counter, so that autograd refuses to use the overwritten
        # values where another node saved them (logits = x.exp() with inplace_backward=True) instead of silently
        # computing a wrong gradient. The C++ op alone does not (no ADInplaceOrView kernel takes effect for it);
        # under torch.compile the mutation is functionalised and tracked by the compiler.
        torch.autograd.graph.increment_version(logits)
    return rows


def loss_fwd(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor], spec: _opdefs.LossSpec,
             compute_grad: bool, tensors: _opdefs.LogitTensors = _opdefs.NO_TENSORS) -> Tuple[Tensor, Tensor]:
    """The loss (``[N]`` or 0-d, see ``_opdefs``) and ``s * dl/dz`` ``[N, C]`` (empty when not ``compute_grad``)."""
    if tensors is _opdefs.NO_TENSORS:
        return _fwd(logits, target, weight, scale, *spec.fwd_args(compute_grad))
    return _fwd(logits, target, weight, scale, *spec.fwd_args(compute_grad), **tensors.kwargs())


def loss_fwd_inplace(logits: Tensor, target: Tensor, weight: Tensor, scale: Optional[Tensor],
                     spec: _opdefs.LossSpec, tensors: _opdefs.LogitTensors = _opdefs.NO_TENSORS) -> Tensor:
    """The loss (``[N]`` or 0-d); ``s * dl/dz`` is written over ``logits``."""
    return forward_inplace(logits, target, weight, scale, *spec.op_args(), **tensors.kwargs())
