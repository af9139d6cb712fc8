"""Training-loop pieces (SPEC sections 12-13): ``normalizer``, ``distributed_normalizer`` under a real DDP model,
``ClassCounter`` and the modules' in-place ``reweight``."""

from __future__ import annotations

import copy
import io
import os
import time

import pytest
import torch
from conftest import LOSS_TYPES, make_inputs
from torch import nn

import cbkernels as cb
from cbkernels import ClassCounter, distributed_normalizer

CPU_BACKENDS = [b for b in ("cpu", "torch") if b in cb.available_backends()]


def _kw(loss_type):
    return {"gamma": 0.5} if "focal" in loss_type else {}


def _loss_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


# ----------------------------------------------------------------------------------------------- normalizer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalizer_divides_the_sum(backend, loss_type, dtype):
    logits, target, counts = make_inputs(37, 23, dtype=dtype, seed=3)
    w = cb.class_balanced_weights(counts)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    ref, ref_grad = _loss_and_grad(lambda z: cb.class_balanced_loss(z, target, weight=w, loss_type=loss_type,
                                                                    reduction="sum", backend=backend,
                                                                    **_kw(loss_type)), logits)
    for k in (7, 123.5, torch.tensor(41.0), torch.tensor(9, dtype=torch.int64)):
        kk = float(k)
        loss, grad = _loss_and_grad(lambda z: cb.class_balanced_loss(z, target, weight=w, loss_type=loss_type,
                                                                     backend=backend, normalizer=k,
                                                                     **_kw(loss_type)), logits)
        torch.testing.assert_close(loss.double(), ref.double() / kk, **tol)
        torch.testing.assert_close(grad.double(), ref_grad.double() / kk,
                                   rtol=tol["rtol"] * 4, atol=tol["rtol"] * ref_grad.abs().max().item() / kk)
    # The module and the wrappers take it too.
    crit = cb.ClassBalancedLoss(counts, loss_type=loss_type, backend=backend, **_kw(loss_type))
    wrapper = {"softmax": cb.cb_softmax_cross_entropy, "sigmoid": cb.cb_sigmoid_cross_entropy, "focal": cb.cb_focal,
               "softmax_focal": cb.cb_softmax_focal}[loss_type]
    a = crit(logits, target, normalizer=10)
    b = wrapper(logits, target, counts, backend=backend, normalizer=10, **_kw(loss_type))
    c = cb.class_balanced_loss(logits, target, counts, loss_type=loss_type, reduction="sum", backend=backend,
                               **_kw(loss_type))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.double(), c.double() / 10, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_accumulation_with_the_step_normalizer_equals_the_whole_batch(backend):
    # Two micro-batches with very different numbers of ignored rows: per-micro-batch means would weigh their rows
    # unequally; dividing both sums by the step's valid rows gives the whole batch's mean exactly.
    logits, target, counts = make_inputs(64, 50, dtype=torch.float64, seed=4, ignore_frac=0.0)
    target[:20] = -100
    whole, whole_grad = _loss_and_grad(lambda z: cb.cb_focal(z, target, counts, backend=backend), logits)
    total = (target != -100).sum()
    x = logits.detach().clone().requires_grad_()
    acc = 0.0
    for sl in (slice(0, 24), slice(24, 64)):
        loss = cb.cb_focal(x[sl], target[sl], counts, backend=backend, normalizer=total)
        loss.backward()
        acc = acc + loss.detach()
    torch.testing.assert_close(acc, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, whole_grad, rtol=1e-12, atol=1e-15)
    # Without it the plain means disagree (the test can fail).
    y = logits.detach().clone().requires_grad_()
    for sl in (slice(0, 24), slice(24, 64)):
        (cb.cb_focal(y[sl], target[sl], counts, backend=backend) / 2).backward()
    assert not torch.allclose(y.grad, whole_grad, rtol=1e-3)


def test_normalizer_bad_values_and_reductions():
    logits, target, counts = make_inputs(8, 5, seed=5)
    for bad, err in ((0, ValueError), (-2.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                     (True, TypeError), ("4", TypeError), (torch.tensor([3.0]), ValueError),
                     (torch.tensor(0.0), ValueError), (torch.tensor(True), TypeError)):
        with pytest.raises(err, match="normalizer"):
            cb.cb_focal(logits, target, counts, normalizer=bad)
    for reduction in ("sum", "none", "weighted_mean"):
        with pytest.raises(ValueError, match="normalizer applies to reduction='mean'"):
            cb.cb_focal(logits, target, counts, reduction=reduction, normalizer=4)
    meta = torch.tensor(3.0, device="meta")
    with pytest.raises(ValueError, match="normalizer is on meta"):
        cb.cb_focal(logits, target, counts, normalizer=meta)


def test_normalizer_linear_cb_loss():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(30, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (30,), generator=g)
    t[::4] = -100
    counts = torch.randint(1, 100, (40,), generator=g)
    crit = cb.LinearClassBalancedLoss(counts, loss_type="focal", chunk_size=7)
    loss = crit(h, w, t, normalizer=17.0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = cb.linear_cb_loss(h, w, t, counts, loss_type="focal", reduction="sum", chunk_size=7) / 17.0
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_normalizer_gradcheck_and_compile(backend):
    t = torch.tensor([0, 3, -100, 2])
    w = torch.rand(5, dtype=torch.float64) + 0.5
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: cb.cb_softmax_focal(v, t, weight=w.float(), backend=backend, normalizer=torch.tensor(2.5)), (z,))
    logits, target, counts = make_inputs(16, 9, seed=7)
    weight = cb.class_balanced_weights(counts)

    def f(v, n):
        return cb.cb_focal(v, target, weight=weight, backend=backend, normalizer=n)

    eager = f(logits, torch.tensor(6.0))
    compiled = torch.compile(f, fullgraph=True)(logits, torch.tensor(6.0))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)


@pytest.mark.triton_interpreter
def test_normalizer_triton_and_its_target_check():
    logits, target, counts = make_inputs(16, 9, seed=8)
    a = cb.cb_focal(logits, target, counts, backend="triton", normalizer=5)
    b = cb.cb_focal(logits, target, counts, backend="torch", reduction="sum") / 5
    torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    target[3] = 9  # a given scale still goes through the kernel that checks the targets
    with pytest.raises(IndexError, match="target holds 9"):
        cb.cb_focal(logits, target, counts, backend="triton", normalizer=5)


# ---------------------------------------------------------------------------------------------- data parallel


def test_distributed_normalizer_single_process():
    t = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    n = distributed_normalizer(t)
    assert n.dtype == torch.float64 and n.shape == () and n.item() == 3.0
    assert distributed_normalizer(torch.full((4,), -100)).item() == 1.0  # nothing counted: the mean's max(1, 0)
    assert distributed_normalizer(t, ignore_index=3).item() == 5.0
    with pytest.raises(TypeError, match="integer class indices"):
        distributed_normalizer(t.float())


def _ddp_worker(rank, world, init_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the same model on every rank (the single-process reference is built from it)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 11)).double()
        x = torch.randn(24, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 11, (24,), generator=g)
        y[:9] = -100  # rank 0's half has 9 ignored rows of 12, rank 1's none
        counts = torch.randint(1, 300, (11,), generator=g)
        lo, hi = rank * 12, (rank + 1) * 12
        for backend in [b for b in ("cpu", "torch") if b in cb.available_backends()]:
            for loss_type in LOSS_TYPES:
                ref = copy.deepcopy(model)
                cb.class_balanced_loss(ref(x), y, counts, loss_type=loss_type, backend=backend).backward()
                ddp = DDP(copy.deepcopy(model))
                local = cb.class_balanced_loss(ddp(x[lo:hi]), y[lo:hi], counts, loss_type=loss_type,
                                               backend=backend, normalizer=distributed_normalizer(y[lo:hi]))
                local.backward()
                for p, q in zip(ddp.module.parameters(), ref.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
                # The per-rank mean (no normalizer) is biased towards rank 0's few rows: the check can fail.
                plain = DDP(copy.deepcopy(model))
                cb.class_balanced_loss(plain(x[lo:hi]), y[lo:hi], counts, loss_type=loss_type,
                                       backend=backend).backward()
                assert not all(torch.allclose(p.grad, q.grad, rtol=1e-6)
                               for p, q in zip(plain.module.parameters(), ref.parameters()))
        # The counter's all_reduce gives every rank the global counts.
        counter = ClassCounter(11).update(y[lo:hi]).all_reduce()
        torch.testing.assert_close(counter.counts, torch.bincount(y[y != -100], minlength=11))
    finally:
        dist.destroy_process_group()


def test_distributed_normalizer_gives_the_single_process_gradient_under_ddp(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # spawn, not fork: earlier tests in this process may have started torch.compile's worker threads and pools, and
    # a child forked while one of them holds a lock can hang (seen once in a full cold run).
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail("DDP workers did not finish in 180 s")


# ---------------------------------------------------------------------------------------------- class counter


def test_counter_matches_bincount():
    g = torch.Generator().manual_seed(9)
    counter = ClassCounter(17)
    seen = []
    for dtype in (torch.int64, torch.int32, torch.uint8):
        t = torch.randint(0, 17, (5, 40), generator=g)
        t[:, ::3] = -100 if dtype != torch.uint8 else 0
        if dtype == torch.uint8:
            t = t.clamp(min=0)
        counter.update(t.to(dtype))
        seen.append(t.reshape(-1))
    allt = torch.cat(seen)
    torch.testing.assert_close(counter.counts, torch.bincount(allt[allt != -100], minlength=17))
    assert counter.counts.dtype == torch.int64
    # Multi-hot rows add their positives.
    dense = (torch.rand(6, 17, generator=g) < 0.3).float()
    before = counter.counts.clone()
    counter.update(dense)
    torch.testing.assert_close(counter.counts - before, dense.sum(0).long())
    counter.reset()
    assert counter.counts.sum().item() == 0


def test_counter_bad_input():
    counter = ClassCounter(4, ignore_index=-1)
    with pytest.raises(IndexError, match="target holds 4, outside \\[0, 4\\) and not ignore_index=-1"):
        counter.update(torch.tensor([0, 4, -1]))
    with pytest.raises(IndexError, match="target holds -100"):
        counter.update(torch.tensor([-100]))
    assert counter.counts.sum().item() == 0  # a failed update changes nothing
    with pytest.raises(ValueError, match="multi-hot"):
        counter.update(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[\.\.\., C\]"):
        counter.update(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="integer class indices"):
        counter.update(torch.tensor([True]))
    with pytest.raises(ValueError, match="on meta"):
        counter.update(torch.tensor([1], device="meta"))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            ClassCounter(bad)


def test_counter_state_dict_and_count_over_a_dataloader(capsys):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(100, 3, generator=g)
    y = torch.randint(0, 7, (100,), generator=g)
    y[::10] = -100
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    counter = ClassCounter.count(loader, 7)
    expected = torch.bincount(y[y != -100], minlength=7)
    torch.testing.assert_close(counter.counts, expected)
    assert "counted 7 batches, 90 targets" in capsys.readouterr().err
    dicts = [{"input_ids": x[i:i + 25], "labels": y[i:i + 25]} for i in range(0, 100, 25)]
    torch.testing.assert_close(ClassCounter.count(dicts, 7, progress=False).counts, expected)
    torch.testing.assert_close(ClassCounter.count([y[:50], y[50:]], 7, progress=False).counts, expected)
    buf = io.BytesIO()
    torch.save(counter.state_dict(), buf)
    buf.seek(0)
    restored = ClassCounter(7)
    restored.load_state_dict(torch.load(buf))
    torch.testing.assert_close(restored.counts, expected)
    assert list(counter.state_dict()) == ["counts"]


# ----------------------------------------------------------------------------------------------- reweighting


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reweight_in_place_is_deferred_reweighting_and_survives_compile(backend):
    logits, target, counts = make_inputs(32, 12, seed=11)
    crit = cb.ClassBalancedLoss(counts, loss_type="focal", beta=0.0, backend=backend)  # the plain loss first
    buffer = crit.weight
    torch.testing.assert_close(crit.weight, torch.ones(12))
    compiled = torch.compile(crit, fullgraph=True)
    plain = compiled(logits, target)
    torch.testing.assert_close(plain, cb.cb_focal(logits, target, backend=backend), rtol=1e-6, atol=0)
    crit.reweight(beta=0.999)  # later epochs: class-balanced, same counts
    assert crit.weight is buffer and crit.beta == 0.999
    torch.testing.assert_close(crit.weight, cb.class_balanced_weights(counts, beta=0.999))
    balanced = compiled(logits, target)
    torch.testing.assert_close(balanced, cb.cb_focal(logits, target, counts, beta=0.999, backend=backend),
                               rtol=1e-6, atol=0)
    new_counts = ClassCounter(12).update(target).counts + 1
    crit.reweight(new_counts)
    torch.testing.assert_close(crit.weight, cb.class_balanced_weights(new_counts, beta=0.999))
    torch.testing.assert_close(compiled(logits, target),
                               cb.cb_focal(logits, target, new_counts, beta=0.999, backend=backend), rtol=1e-6,
                               atol=0)
    assert list(crit.state_dict()) == ["weight"]  # the kept counts are not state
    with pytest.raises(ValueError, match="12"):
        crit.reweight(torch.ones(5))
    with pytest.raises(ValueError, match="beta"):
        crit.reweight(beta=1.0)


def test_reweight_linear_module():
    counts = torch.randint(1, 50, (40,))
    crit = cb.LinearClassBalancedLoss(counts, beta=0.0)
    buffer = crit.weight
    crit.reweight(counts * 2, beta=0.99)
    assert crit.weight is buffer
    torch.testing.assert_close(crit.weight, cb.class_balanced_weights(counts * 2, beta=0.99))
