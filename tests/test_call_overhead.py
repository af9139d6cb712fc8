"""What one loss call costs besides its kernel: the ATen ops it dispatches and the kernel launches it makes.

The paper's setting (CIFAR: 128 rows of 10 or 100 classes) is decided by per-call overhead, where every dispatched
op is a kernel launch on a GPU. A forward call with a precomputed weight may dispatch at most 3 compute ops in all
(the fused op included; views, ``detach`` and allocations do not count) and read nothing back to the host on a
non-CPU path; its backward at most 1 op. Speed itself is measured in ``make bench`` (the "small" rows), never here.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LOSS_TYPES, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import cbkernels as cb
from cbkernels import available_backends

# Ops that move no data: views, detach, metadata, allocation.
FREE = {"view", "_unsafe_view", "reshape", "_reshape_alias", "alias", "detach", "expand", "as_strided", "t",
        "unsqueeze", "squeeze", "select", "slice", "empty", "empty_strided", "empty_like", "new_empty",
        "new_empty_strided", "lift_fresh", "lift_fresh_copy"}
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}
REDUCTIONS = ("mean", "sum", "weighted_mean", "none")


class Recorder(TorchDispatchMode):
    """Records the name of every ATen (or custom) op dispatched while active, with the device of its first tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = [a.device.type for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((func.__name__.split(".")[0], func.namespace, devices[0] if devices else None))
        return func(*args, **(kwargs or {}))

    def compute_ops(self):
        return [name for name, ns, _ in self.ops if not (ns == "aten" and (name in FREE or name in HOST_READS))]

    def host_reads(self, device_type=None):
        return [name for name, _, dev in self.ops if name in HOST_READS and dev == device_type]


def _kw(loss_type):
    return {"gamma": 0.5} if "focal" in loss_type else {}


def _forward_backward(fn, logits, grad_output=None):
    """Ops of the forward and of the backward, recorded separately (grad_output made outside both)."""
    x = logits.detach().requires_grad_()
    with Recorder() as fwd:
        loss = fn(x)
    go = torch.ones_like(loss) if grad_output is None else torch.full_like(loss, grad_output)
    with Recorder() as bwd:
        loss.backward(go)
    return fwd, bwd, x.grad


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs the compiled CPU backend")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(128, 10), (4, 32, 100)])
def test_cpu_call_dispatches_one_op(loss_type, reduction, shape):
    logits, target, counts = make_inputs(math.prod(shape[:-1]), shape[-1], seed=1)
    logits, target = logits.reshape(shape), target.reshape(shape[:-1])
    module = cb.ClassBalancedLoss(counts, loss_type=loss_type, reduction=reduction, backend="cpu", **_kw(loss_type))
    for fn in (lambda z: module(z, target),
               lambda z: cb.class_balanced_loss(z, target, loss_type=loss_type, weight=module.weight,
                                                reduction=reduction, backend="cpu", **_kw(loss_type))):
        for go in (None, 2.0):
            fwd, bwd, grad = _forward_backward(fn, logits, go)
            assert fwd.compute_ops() == ["cb_loss_fwd"], fwd.ops
            assert not fwd.host_reads("cpu")
            # Backward: the scale by grad_output (skipped when it is exactly 1, read on the host for free on CPU).
            assert len(bwd.compute_ops()) <= 1, bwd.ops
            skipped = go is None and reduction != "none"  # a scalar grad_output of exactly 1
            assert bwd.compute_ops() == ([] if skipped else ["mul_"]), bwd.ops
            assert grad is not None and grad.shape == logits.shape


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs the compiled CPU backend")
def test_inplace_backward_and_counts_dispatch_one_op():
    logits, target, counts = make_inputs(128, 100, seed=2)
    x = logits.clone().requires_grad_()
    z = x * 1.0  # a non-leaf buffer the in-place backward may overwrite
    with Recorder() as fwd:
        cb.cb_focal(z, target, counts, inplace_backward=True, backend="cpu")  # counts: weights cached after one call
    with Recorder() as fwd:
        loss = cb.cb_focal(z, target, counts, inplace_backward=True, backend="cpu")
    assert fwd.compute_ops() == ["cb_loss_fwd_inplace"], fwd.ops
    loss.backward()


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs the compiled CPU backend")
def test_bad_target_is_checked_in_the_op_with_the_same_error():
    logits, target, _ = make_inputs(16, 10, seed=3)
    target[5] = 10
    with pytest.raises(IndexError):  # the first call makes the cached unit weights (no weight, no counts)
        cb.cb_softmax_cross_entropy(logits, target, backend="cpu")
    for reduction in REDUCTIONS:
        with Recorder() as rec, pytest.raises(IndexError, match=r"target holds 10, outside \[0, 10\) and not "
                                                                 r"ignore_index=-100"):
            cb.cb_softmax_cross_entropy(logits, target, reduction=reduction, backend="cpu")
        assert rec.compute_ops() == ["cb_loss_fwd"], rec.ops
    target[5] = -7
    with pytest.raises(IndexError, match="target holds -7"):
        cb.cb_sigmoid_cross_entropy(logits, target, backend="cpu", reduction="none")


# --------------------------------------------------------------------------- Triton (launches through the launcher)


class LaunchCounter:
    """Wraps a Triton kernel: counts ``kernel[grid](...)`` launches (named as the interpreter's kernels are, whose
    type the launcher checks before it runs CPU tensors; see also tests/test_triton_launch.py)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__)
            with _disable_current_modes():  # the interpreter's own tensor copies are not the launcher's ops
                return launch(*args, **kwargs)

        return run


@pytest.fixture
def triton_launches(monkeypatch):
    from cbkernels import _grad_scale, _triton, _triton_reduce

    log = []
    k = _triton.kernels()
    for mod, names in ((k, ("cb_loss_kernel", "cb_loss_split_finish_kernel")),
                       (_triton_reduce, ("reduction_scale_kernel", "reduce_rows_kernel")),
                       (_grad_scale, ("grad_scale_kernel",))):
        for name in names:
            counter = type("InterpretedFunction", (LaunchCounter,), {})
            monkeypatch.setattr(mod, name, counter(getattr(mod, name), log))
    return log


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_call_launches_at_most_three_kernels(triton_launches, loss_type, reduction):
    logits, target, counts = make_inputs(128, 10, seed=4)
    w = cb.class_balanced_weights(counts)
    fwd, bwd, grad = _forward_backward(
        lambda z: cb.class_balanced_loss(z, target, loss_type=loss_type, weight=w, reduction=reduction,
                                         backend="triton", **_kw(loss_type)), logits)
    expected = ["reduction_scale_kernel", "cb_loss_kernel"] + ([] if reduction == "none" else ["reduce_rows_kernel"])
    assert triton_launches == expected
    assert len(fwd.compute_ops()) <= 3, fwd.ops
    assert len(bwd.compute_ops()) <= 1, bwd.ops
    assert grad is not None


@pytest.mark.triton_interpreter
def test_triton_bad_target_raises_under_the_interpreter():
    logits, target, _ = make_inputs(16, 10, seed=5)
    target[3] = 12
    for reduction in REDUCTIONS:
        with pytest.raises(IndexError, match=r"target holds 12, outside \[0, 10\)"):
            cb.cb_focal(logits, target, reduction=reduction, backend="triton")


def _strided_target_case(backend):
    logits, target, counts = make_inputs(16, 11, seed=6)
    wide = torch.stack([target, torch.full_like(target, 10**6)], 1)  # a bad value between every two real ones
    strided = wide[:, 0]
    assert strided.stride(0) == 2
    for reduction in REDUCTIONS:
        ours = cb.cb_focal(logits, strided, counts, backend=backend, reduction=reduction)
        ref = cb.cb_focal(logits, target, counts, backend="torch", reduction=reduction)
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs the compiled CPU backend")
def test_strided_target_cpu():
    # The in-op target check and normaliser read the targets the op was given, whatever their stride.
    _strided_target_case("cpu")


@pytest.mark.triton_interpreter
def test_strided_target_triton():
    _strided_target_case("triton")
