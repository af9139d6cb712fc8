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
from ._backends import fake_forward, fake_forward_inplace

_fwd = torch.ops.cbkernels.cb_loss_fwd.default
_fwd_inplace = torch.ops.cbkernels.cb_loss_fwd_inplace.default


@torch.library.register_fake("cbkernels::cb_loss_fwd")
def _fake_fwd(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad):
    return fake_forward(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad)


@torch.library.register_fake("cbkernels::cb_loss_fwd_inplace")
def _fake_fwd_inplace(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index):
    return fake_forward_inplace(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index)


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
