"""On a GPU: the README's headline call never stalls the host, captures in a CUDA graph, and backward does not pass
over the gradient when grad_output is 1 (issue 10, points 1 and 2). CPU-side guards: tests/test_weight_cache.py,
tests/test_grad_scale.py. Every test here is marked gpu and skips without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

import cbkernels as cb

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = [b for b in ("triton", "cuda", "torch") if torch.cuda.is_available() and b in cb.available_backends()]


def _inputs(n=256, c=1000, dtype=torch.bfloat16):
    z, target, counts = make_inputs(n, c, dtype, device="cuda")
    return z.requires_grad_(True), target, counts


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("counts_kind", ["list", "cuda_tensor"])
def test_steady_state_call_with_counts_never_syncs(backend, counts_kind):
    z, target, counts = _inputs()
    counts = counts.tolist() if counts_kind == "list" else counts.cuda()
    cb.cb_focal(z, target, counts, backend=backend).backward()  # first call: weights computed (and cached)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cb.cb_focal(z, target, counts, backend=backend).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
def test_call_with_counts_captures_in_a_cuda_graph(backend):
    z, target, counts = _inputs()
    counts = counts.tolist()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside capture: compiles, caches the weights
            z.grad = None
            cb.cb_focal(z, target, counts, backend=backend).backward()
    torch.cuda.current_stream().wait_stream(stream)
    expected = z.grad.clone()
    graph = torch.cuda.CUDAGraph()
    z.grad = None
    with torch.cuda.graph(graph):
        loss = cb.cb_focal(z, target, counts, backend=backend)
        loss.backward()
    z.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("upstream", [1.0, 0.25])
def test_backward_scale_on_the_device(backend, reduction, upstream):
    z, target, counts = _inputs(64, 423, torch.float32)
    weight = cb.class_balanced_weights(counts).cuda()
    x = z.detach().clone().requires_grad_(True)
    loss = cb.cb_focal(x, target, weight=weight, reduction=reduction, backend=backend)
    loss.backward(torch.full_like(loss, upstream))
    ref = z.detach().clone().requires_grad_(True)
    cb.cb_focal(ref, target, weight=weight, reduction=reduction, backend="torch").backward(
        torch.full_like(loss, upstream))
    # Against the torch backend (itself checked against the float64 oracle): SPEC 6's float32 gradient tolerance.
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=2e-6 * ref.grad.abs().max().item())


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("reduction", ["mean", "weighted_mean", "sum", "none"])
def test_cifar_call_is_few_ops_and_no_host_read(backend, reduction):
    # Issue 15 on the device: the forward dispatches at most 3 compute ops (the cuda backend: its one op; Triton:
    # no ATen compute op around its launches) and reads nothing back; backward at most 1 op.
    from test_call_overhead import Recorder

    z, target, counts = _inputs(128, 100, torch.float32)
    w = cb.class_balanced_weights(counts).cuda()
    cb.cb_softmax_cross_entropy(z, target, weight=w, reduction=reduction, backend=backend)  # warm-up (compiles)
    with Recorder() as fwd:
        loss = cb.cb_softmax_cross_entropy(z, target, weight=w, reduction=reduction, backend=backend)
    go = torch.ones_like(loss)
    with Recorder() as bwd:
        loss.backward(go)
    assert len(fwd.compute_ops()) <= 3 and not fwd.host_reads("cuda"), fwd.ops
    assert len(bwd.compute_ops()) <= 1 and not bwd.host_reads("cuda"), bwd.ops


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_normalizer_and_distributed_normalizer_never_sync(backend):
    # SPEC section 12 on the device: a tensor normalizer (and the single-process distributed_normalizer) is never
    # read on the host; the counter's update neither.
    z, target, counts = _inputs(256, 1000, torch.float32)
    w = cb.class_balanced_weights(counts).cuda()
    n = cb.distributed_normalizer(target)
    counter = cb.ClassCounter(1000, device="cuda")
    cb.cb_focal(z, target, weight=w, backend=backend, normalizer=n).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            n = cb.distributed_normalizer(target)
            cb.cb_focal(z, target, weight=w, backend=backend, normalizer=n).backward()
            counter.update(target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    valid = target[target != -100]
    torch.testing.assert_close(counter.counts.cpu(), 2 * torch.bincount(valid.cpu(), minlength=1000))
