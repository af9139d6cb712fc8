"""The compiled backends' op wrappers: ``cbkernels::cb_loss_fwd`` and ``cb_loss_fwd_inplace``.

The schemas live in ``csrc/ops.cpp``; importing ``cbkernels._C`` registers them with the kernels that
were built (CPU always, CUDA when compiled in). The fake implementations here let ``torch.compile``
and ``opcheck`` trace the ops without running them. ``forward``/``forward_inplace`` have the backend
signature documented in ``cbkernels._backends`` and serve both the "cpu" and the "cuda" backend.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the ops)

_fwd = torch.ops.cbkernels.cb_loss_fwd.default
_fwd_inplace = torch.ops.cbkernels.cb_loss_fwd_inplace.default


def _loss_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("cbkernels::cb_loss_fwd")
def _(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad):
    loss = logits.new_empty(logits.shape[:1], dtype=_loss_dtype(logits))
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return loss, grad


@torch.library.register_fake("cbkernels::cb_loss_fwd_inplace")
def _(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=_loss_dtype(logits))


def forward(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int, compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """Per-row loss ``[N]`` and ``scale * dl/dz`` ``[N, C]`` (empty when not ``compute_grad``); see ``_backends``."""
    return _fwd(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad)


def forward_inplace(
    logits: Tensor, target: Tensor, weight: Tensor, scale: Tensor, loss_type: int, gamma: float,
    label_smoothing: float, ignore_index: int,
) -> Tensor:
    """Per-row loss ``[N]``; ``scale * dl/dz`` is written over ``logits``."""
    rows = _fwd_inplace(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index)
    if not torch.compiler.is_compiling():
        # Like every in-place ATen op: bump the version counter, so that autograd refuses to use the overwritten
        # values where another node saved them (logits = x.exp() with inplace_backward=True) instead of silently
        # computing a wrong gradient. The C++ op alone does not (no ADInplaceOrView kernel takes effect for it);
        # under torch.compile the mutation is functionalised and tracked by the compiler.
        torch.autograd.graph.increment_version(logits)
    return rows
