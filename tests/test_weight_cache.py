"""The functional API with ``samples_per_class`` is sync-free in the steady state (issue 10, point 1).

Computing the weights every call costs a host computation, a host read (``int(...)``: ``aten::_local_scalar_dense``)
and a host-to-device copy: a stall per step on a GPU and an error inside CUDA-graph capture. The weights of recent
counts are cached per (counts, beta, C, device). These tests record the ATen ops a call dispatches: on the ``meta``
device a host-to-device copy shows as ``aten::_to_copy`` just as it would to a GPU.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cbkernels as cb
from cbkernels import _validation as V

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
META = torch.device("meta")
HOST_READS_AND_COPIES = {"aten._local_scalar_dense.default", "aten._to_copy.default", "aten.copy_.default"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _empty_cache():
    V._WEIGHT_CACHE.clear()
    yield
    V._WEIGHT_CACHE.clear()


def lookup(counts, beta=0.999, device=META, num_classes=len(COUNTS)):
    with RecordOps() as rec:
        w = V.class_weights(counts, None, beta, num_classes, device)
    return w, rec.ops


@pytest.mark.parametrize("kind", ["list", "tuple", "numpy", "tensor"])
def test_second_call_with_the_same_counts_reads_nothing_on_the_host(kind):
    counts = {"list": list(COUNTS), "tuple": tuple(COUNTS), "numpy": np.array(COUNTS),
              "tensor": torch.tensor(COUNTS)}[kind]
    w1, first = lookup(counts)
    # The recorder sees what the fix removes: the first call reads the empty-class count on the host and copies.
    assert "aten._local_scalar_dense.default" in first and "aten._to_copy.default" in first
    w2, second = lookup(counts)
    assert not HOST_READS_AND_COPIES & set(second), second
    assert second == []  # no op at all: the device weights are reused as they are
    assert w2 is w1 and w2.device == META


def test_cached_weights_are_the_weights():
    w, _ = lookup(COUNTS, device=torch.device("cpu"))
    again, _ = lookup(list(COUNTS), device=torch.device("cpu"))  # another list, same values
    assert again is w
    assert torch.equal(w, cb.class_balanced_weights(COUNTS, beta=0.999))


def test_changed_counts_or_beta_or_device_recompute():
    cpu = torch.device("cpu")
    counts = torch.tensor(COUNTS)
    w, _ = lookup(counts, device=cpu)
    counts[0] = 10  # in place: the version counter moves, the weights must follow
    w_new, ops = lookup(counts, device=cpu)
    assert "aten._local_scalar_dense.default" in ops
    assert torch.equal(w_new, cb.class_balanced_weights(counts, beta=0.999)) and not torch.equal(w_new, w)
    view = counts[:]  # a write through a view bumps the shared version counter too
    view[1] = 7
    assert torch.equal(lookup(counts, device=cpu)[0], cb.class_balanced_weights(counts, beta=0.999))
    assert torch.equal(lookup(counts, beta=0.9, device=cpu)[0], cb.class_balanced_weights(counts, beta=0.9))
    listed = list(COUNTS)
    lookup(listed, device=cpu)
    listed[0] = 1  # a list is keyed by value
    assert torch.equal(lookup(listed, device=cpu)[0], cb.class_balanced_weights(listed, beta=0.999))
    assert lookup(COUNTS, device=META)[0].device == META


def test_a_recycled_tensor_id_never_matches():
    cpu = torch.device("cpu")
    for i in range(20):
        counts = torch.tensor([c + i for c in COUNTS])
        w, _ = lookup(counts, device=cpu)
        assert torch.equal(w, cb.class_balanced_weights(counts, beta=0.999)), i
        del counts, w
        gc.collect()


def test_cache_stays_bounded_and_errors_are_not_cached():
    cpu = torch.device("cpu")
    for i in range(3 * V._WEIGHT_CACHE_SIZE):
        lookup([c + i for c in COUNTS], device=cpu)
    assert len(V._WEIGHT_CACHE) <= V._WEIGHT_CACHE_SIZE
    for _ in range(2):
        with pytest.raises(ValueError, match="empty class"):
            lookup([0] + COUNTS[1:], device=cpu)
        with pytest.raises(ValueError, match="logits have C = 11"):
            lookup(COUNTS, device=cpu, num_classes=11)


def test_functional_call_with_counts_costs_what_a_precomputed_weight_costs():
    """End to end: from the second call on, passing counts dispatches exactly the ops of passing the weight."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, len(COUNTS), generator=g)
    target = torch.randint(0, len(COUNTS), (16,), generator=g)
    weight = cb.class_balanced_weights(COUNTS, beta=0.999)
    for backend in cb.available_backends():
        cb.cb_focal(logits, target, COUNTS, backend=backend)
        with RecordOps() as with_counts:
            loss_counts = cb.cb_focal(logits, target, COUNTS, backend=backend)
        with RecordOps() as with_weight:
            loss_weight = cb.cb_focal(logits, target, weight=weight, backend=backend)
        # The given weight is detached (an alias, no compute); otherwise the two calls dispatch the same ops.
        assert with_counts.ops == [op for op in with_weight.ops if op != "aten.detach.default"], backend
        assert torch.equal(loss_counts, loss_weight)
