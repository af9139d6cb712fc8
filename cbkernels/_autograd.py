"""The one autograd path shared by every backend (SPEC section 7).

Forward runs the backend once, which returns the per-row loss and, when the logits need it, the
gradient already multiplied by the reduction's normaliser. Backward only scales that stored gradient
by ``grad_output`` (in place when ``inplace_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backends import get_backend


def _reduction_scale(target: Tensor, weight: Tensor, ignore_index: int, reduction: str, dtype) -> Tensor:
    """0-d normaliser for the reduction, kept on the device (no host sync)."""
    valid = target != ignore_index
    if reduction == "mean":
        return 1.0 / valid.sum().clamp(min=1).to(dtype)
    if reduction == "weighted_mean":
        a = torch.where(valid, weight[torch.where(valid, target, torch.zeros_like(target)).long()], 0.0)
        total = a.to(dtype).sum()
        return torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    return torch.ones((), dtype=dtype, device=target.device)


_NO_DOUBLE_BACKWARD = (
    "cbkernels: double backward through a class-balanced loss is not supported (its backward scales a "
    "gradient computed in the forward pass)"
)


class CBLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor, backend: str, loss_type: int,
                gamma: float, label_smoothing: float, ignore_index: int, reduction: str,
                inplace_backward: bool) -> Tensor:
        forward_fn, forward_inplace_fn = get_backend(backend).functions()
        lead_shape = logits.shape[:-1]
        num_classes = logits.shape[-1]
        z = logits.reshape(-1, num_classes)
        t = target.reshape(-1)
        ldtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        scale = _reduction_scale(t, weight, ignore_index, reduction, ldtype)
        want_grad = ctx.needs_input_grad[0]
        if want_grad and inplace_backward:
            rows = forward_inplace_fn(z, t, weight, scale, loss_type, gamma, label_smoothing, ignore_index)
            grad = z.detach()  # when reshape had to copy, the gradient lives in that copy and the logits stay intact
        else:
            rows, grad = forward_fn(z, t, weight, scale, loss_type, gamma, label_smoothing, ignore_index,
                                    want_grad)
        ctx.lead_shape = lead_shape
        ctx.reduction = reduction
        ctx.inplace_backward = bool(inplace_backward and want_grad)
        if want_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return rows.reshape(lead_shape)
        total = rows.sum()
        return total if reduction == "sum" else total * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        grad_output = grad_output.detach()
        go = grad_output.reshape(-1, 1).to(grad.dtype) if ctx.reduction == "none" else grad_output
        if ctx.inplace_backward:
            # The logits buffer already holds the gradient: scale it where it is (zero extra memory).
            # A second backward through the same graph then fails autograd's saved-tensor version
            # check instead of silently scaling twice.
            grad = grad.mul_(go)
        else:
            # Out of place, so retain_graph / autograd.grad / jacobians can use the saved gradient again.
            grad = grad * go
        if torch.is_grad_enabled():
            # create_graph=True: fine for the rest of the graph, but differentiating this gradient
            # again must fail loudly rather than return a silent zero.
            grad = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, 1)(grad.detach().requires_grad_())
        return grad.reshape(*ctx.lead_shape, grad.shape[-1]), None, None, None, None, None, None, None, None, None
