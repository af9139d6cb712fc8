"""The one autograd path shared by every backend (SPEC section 7).

Forward runs the backend's op once, which returns the loss (reduced, or per row for ``"none"``) and, when the
logits need it, the gradient already multiplied by the reduction's normaliser. Backward only scales that stored gradient
by ``grad_output``: in place and handed over to autograd when nothing can read it again (no retain_graph, or
``inplace_backward``), out of place otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ._backends import Backend, get_backend, gpu_too_old
from ._opdefs import NO_TENSORS, LogitTensors, LossSpec, loss_dtype
from ._torch_stages import flat_target, reduction_scale, refuse_double_backward


def class_balanced_loss(logits: Tensor, target: Tensor, weight: Tensor, backend: Backend, spec: LossSpec,
                        inplace_backward: bool, scale: Optional[Tensor] = None,
                        tensors: LogitTensors = NO_TENSORS, return_z_loss: bool = False):
    """The differentiable call on a resolved backend: the compiled CPU backend's ``cb_loss`` op, whose autograd is
    C++ (one dispatch forward, no Python backward: csrc/cb_autograd.cpp), or ``CBLossFunction`` for every other
    path (the other backends, ``inplace_backward``, which hands the logits buffer to backward, and
    ``return_z_loss``). ``scale``: a 0-d normaliser on the logits' device replacing the reduction's (a
    ``normalizer`` of SPEC section 12). ``tensors``: the ``[C]`` transform vectors (``z_rows`` unset).
    ``return_z_loss``: returns ``(loss, z_term)``, the z-loss part of the loss under the same reduction, detached."""
    if backend.name == "cpu" and not (inplace_backward and logits.requires_grad) and not return_z_loss:
        flat = logits.dim() == 2  # reshape is a dispatched op even when it changes nothing
        z = logits if flat else logits.reshape(-1, logits.shape[-1])
        args = (z, target if flat else flat_target(target, logits.shape[-1]), weight, scale, *spec.op_args())
        loss = _cpu_loss_op(*args) if tensors is NO_TENSORS else _cpu_loss_op(*args, **tensors.kwargs())
        return loss if flat or spec.reduction != "none" else loss.reshape(logits.shape[:-1])
    if not return_z_loss:
        return CBLossFunction.apply(logits, target, weight, backend.name, spec, bool(inplace_backward), scale, tensors)
    loss, z_rows = CBLossFunction.apply(logits, target, weight, backend.name, spec, bool(inplace_backward), scale,
                                        tensors, True)
    if spec.reduction == "none":
        return loss, z_rows.reshape(logits.shape[:-1])
    if scale is None:
        scale = reduction_scale(flat_target(target, logits.shape[-1]), weight, spec, z_rows.dtype)
    return loss, z_rows.sum() * scale.to(z_rows.dtype)


def _cpu_loss_op(*args, **kwargs) -> Tensor:
    """``cbkernels::cb_loss`` (its module ``_ops`` is loaded by resolving the ``cpu`` backend, before any call)."""
    return torch.ops.cbkernels.cb_loss.default(*args, **kwargs)


class CBLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor, backend: str, spec: LossSpec,
                inplace_backward: bool, scale: Optional[Tensor] = None, tensors: LogitTensors = NO_TENSORS,
                return_z_loss: bool = False):
        """The loss, or with ``return_z_loss`` ``(loss, z_rows)``: ``z_rows`` ``[N]`` holds each row's z-loss term,
        not differentiable (a second output only when asked for: it costs the call an allocation and autograd
        bookkeeping)."""
        # One op call: it checks the targets, normalises, reduces and computes the gradient (_opdefs).
        loss_fwd, loss_fwd_inplace = get_backend(backend).functions()
        lead_shape = logits.shape[:-1]
        z = logits.reshape(-1, logits.shape[-1])
        t = flat_target(target, z.shape[1])
        want_grad = ctx.needs_input_grad[0]
        if return_z_loss:
            z_rows = logits.new_empty((z.shape[0],), dtype=loss_dtype(logits.dtype))
            tensors = tensors._replace(z_rows=z_rows)
        if want_grad and inplace_backward:
            loss = loss_fwd_inplace(z, t, weight, scale, spec, tensors)
            grad = z.detach()  # when reshape had to copy, the gradient lives in that copy and the logits stay intact
        else:
            loss, grad = loss_fwd(z, t, weight, scale, spec, want_grad, tensors)
        ctx.lead_shape = lead_shape
        ctx.per_row = spec.reduction == "none"
        ctx.inplace_backward = bool(inplace_backward and want_grad)
        if want_grad:
            ctx.save_for_backward(grad)
        loss = loss.reshape(lead_shape) if ctx.per_row else loss
        if not return_z_loss:
            return loss
        ctx.mark_non_differentiable(z_rows)
        ctx.set_materialize_grads(False)  # no zeros made for z_rows' (never used) gradient
        return loss, z_rows

    @staticmethod
    def backward(ctx, grad_output: Optional[Tensor], *_grad_z_rows):
        if grad_output is None:  # (only z_rows was used downstream; it has no gradient)
            return (None,) * 9
        (grad,) = ctx.saved_tensors
        grad_output = grad_output.detach()
        go = grad_output.reshape(-1, 1).to(grad.dtype) if ctx.per_row else grad_output
        if ctx.inplace_backward or _saved_tensors_die_after_this_node(grad):
            # Nobody can read the saved gradient again (backward without retain_graph frees it once this node
            # returns; with inplace_backward it is the logits buffer): scale it where it is and hand it over.
            # AccumulateGrad then adopts the buffer: no second gradient-sized allocation and no copy. A second
            # backward through an inplace_backward graph fails autograd's saved-tensor version check instead of
            # silently scaling twice.
            grad = _scale_in_place(grad, go)
        else:
            # retain_graph / create_graph / autograd.grad(..., retain_graph=True): the saved gradient must stay
            # intact for the next backward, so scale out of place.
            grad = grad * go
        if torch.is_grad_enabled():
            grad = refuse_double_backward(grad)
        return grad.reshape(*ctx.lead_shape, grad.shape[-1]), None, None, None, None, None, None, None, None


def _traced(t: Tensor) -> bool:
    """Inside torch.compile / AOT autograd tracing (fake or functional tensors, not plain ones)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _saved_tensors_die_after_this_node(grad: Tensor) -> bool:
    """True when the running backward does not keep the graph, so this node's saved tensors are released as soon
    as it returns. Conservative (False) wherever that cannot be known: inside torch.compile's traced backward, or
    on a torch without the query."""
    if _traced(grad):
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return False
    try:
        return not keep_graph()
    except RuntimeError:  # not inside an engine-run backward
        return False


def _scale_in_place(grad: Tensor, go: Tensor) -> Tensor:
    """``grad *= go`` with nothing done where ``go`` is exactly 1 (``loss.backward()``'s implicit grad_output): on the
    host where reading it is free, on the device (``_grad_scale``) where it would be a sync."""
    if _is_exactly_one_on_cpu(go):
        return grad
    if _device_side_scale(grad.device.type, _traced(grad), grad.device.index):
        from ._grad_scale import scale_

        return scale_(grad, go)
    return grad.mul_(go)


def _device_side_scale(device_type: str, traced: bool, index=None) -> bool:
    """CUDA gradients outside a traced graph (where the compiler fuses the multiply), when Triton is installed and
    runs on that GPU."""
    return device_type == "cuda" and not traced and _triton_importable() and not gpu_too_old("triton", index)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _is_exactly_one_on_cpu(go: Tensor) -> bool:
    """``loss.backward()``'s implicit grad_output, recognised for free where reading it is no device sync."""
    if _traced(go):
        return False  # a traced value has no value to read
    return go.device.type == "cpu" and go.numel() == 1 and not go.requires_grad and go.item() == 1.0
