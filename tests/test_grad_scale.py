"""Backward on a GPU does not pass over the gradient when ``grad_output`` is 1 (issue 10, point 2).

The device-side scale (``cbkernels._grad_scale``) runs here under the Triton interpreter (tests marked
``triton_interpreter`` run in tests/test_triton.py's TRITON_INTERPRET=1 child); the decision to use it on CUDA
tensors is checked in the parent.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_inputs, oracle
from torch.utils._python_dispatch import TorchDispatchMode

import cbkernels as cb
from cbkernels import _autograd, _backends

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (12, 0), (7, 5)])
def test_cuda_gradients_are_scaled_on_the_device(monkeypatch, capability):
    """The CUDA path must not go back to an unconditional mul_ (a full extra pass) or to a host read; on a GPU that
    Triton does not support it keeps mul_."""
    monkeypatch.setattr(_backends, "cuda_device_arch", lambda index: ("a GPU", capability))
    monkeypatch.setattr(_backends, "_TOO_OLD", {})
    if importlib.util.find_spec("triton") is None:
        assert not _autograd._device_side_scale("cuda", False, 0)
        return
    assert _autograd._device_side_scale("cuda", False, 0) == (capability >= _backends.MIN_CAPABILITY["triton"])
    assert not _autograd._device_side_scale("cuda", True, 0)  # traced: the compiler fuses the multiply
    assert not _autograd._device_side_scale("cpu", False)  # the CPU reads grad_output on the host for free


def expected(grad, go):
    """``grad * go`` computed in grad_output's precision and rounded once: what the kernel stores."""
    cdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    go = go.to(cdt).reshape(-1, 1) if go.dim() else go.to(cdt)
    return (grad.to(cdt) * go).to(grad.dtype)


def exact_scales(dtype):
    # The interpreter rounds float32 to bfloat16 by truncation (a GPU rounds to nearest): bf16 products must be exact.
    return (2.0, 0.5, -4.0, 0.0) if dtype == torch.bfloat16 else (2.5, -1 / 3, 0.0, 1e-3)


@pytest.mark.triton_interpreter
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 423), (3, 5000), (1, 1)])
@pytest.mark.parametrize("row_stride", [None, 601])
@pytest.mark.parametrize("per_row", [False, True])
def test_scale_kernel(dtype, shape, row_stride, per_row):
    from cbkernels._grad_scale import scale_

    n, c = shape
    g = torch.Generator().manual_seed(n * c)
    width = row_stride or c
    base = torch.randn(n, max(width, c), generator=g).to(dtype)
    grad = base[:, :c]
    scales = exact_scales(dtype)
    if per_row:
        go = torch.tensor([1.0 if i % 2 == 0 else scales[i % len(scales)] for i in range(n)])
        cases = [go, torch.ones(n)]
    else:
        cases = [torch.tensor(s) for s in (1.0,) + scales]
    for go in cases:
        for layout in ("2d", "column"):
            # [N, 1] is how backward passes the per-row grad_output of reduction="none".
            go_in = go.reshape(-1, 1) if (per_row and layout == "column") else go
            before = base.clone()
            out = scale_(grad, go_in)
            assert out is grad
            assert torch.equal(grad, expected(before[:, :c], go))
            assert torch.equal(base[:, c:], before[:, c:])  # nothing past C is touched
            base.copy_(before)


@pytest.mark.triton_interpreter
@needs_triton
@pytest.mark.parametrize("go", [float("nan"), float("inf")])
def test_scale_kernel_propagates_non_finite(go):
    from cbkernels._grad_scale import scale_

    grad = torch.ones(3, 17)
    scale_(grad, torch.tensor(go))
    assert torch.equal(grad.isnan(), torch.full_like(grad, go, dtype=torch.float32).isnan())


class RecordOps(TorchDispatchMode):
    """ATen ops with their output sizes, except inside ``scale_`` (whose interpreted launch copies its arguments to
    and from the host: that is the interpreter's emulation of device memory, not work a GPU does)."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.scale_calls = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.ops.append((str(func), out.numel() if isinstance(out, torch.Tensor) else 0))
        return out

    def wrap(self, scale_):
        def recorded(grad, go):
            self.scale_calls += 1
            self.paused = True
            try:
                return scale_(grad, go)
            finally:
                self.paused = False

        return recorded


@pytest.mark.triton_interpreter
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_backward_scales_on_the_device(monkeypatch, reduction, upstream, inplace_backward):
    """backward with the device-side scale (as on CUDA): the gradient is right, and no gradient-sized ATen op runs."""
    # As on CUDA: no host read of grad_output, the device-side scale instead.
    monkeypatch.setattr(_autograd, "_is_exactly_one_on_cpu", lambda go: False)
    monkeypatch.setattr(_autograd, "_device_side_scale", lambda device_type, traced, index=None: not traced)
    z, target, counts = make_inputs(6, 37, seed=3)
    weight = cb.class_balanced_weights(counts)
    x = z.clone().requires_grad_(True)
    loss = cb.cb_focal(x * 1, target, weight=weight, reduction=reduction, backend="triton",
                       inplace_backward=inplace_backward)
    up = torch.full(loss.shape, upstream)
    from cbkernels import _grad_scale

    rec = RecordOps()
    monkeypatch.setattr(_grad_scale, "scale_", rec.wrap(_grad_scale.scale_))
    with rec:
        loss.backward(up)
    assert rec.scale_calls == 1
    big = [op for op, numel in rec.ops if numel >= z.numel() and op not in ("aten.view.default", "aten.detach.default",
                                                                            "aten._unsafe_view.default")]
    # MulBackward of `x * 1` passes the gradient through one gradient-sized mul; our node adds none.
    assert big == ["aten.mul.Tensor"], rec.ops
    ref_loss, ref_grad = oracle(z, target, weight, loss_type="focal", reduction=reduction, gamma=0.5)
    scale = upstream if reduction != "none" else 1.0
    want = ref_grad * scale if reduction != "none" else _none_grad(z, target, weight, upstream)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _none_grad(z, target, weight, upstream):
    from cbkernels.reference import reference_loss

    zz = z.detach().double().requires_grad_(True)
    reference_loss(zz, target, weight.double(), loss_type="focal", reduction="none", gamma=0.5).mul(upstream).sum() \
        .backward()
    return zz.grad
