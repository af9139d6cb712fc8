"""linear_cb_loss / LinearClassBalancedLoss against the float64 reference on the materialised logits.

The oracle is ``reference_loss(hidden.double() @ W.double().T + bias, ...)`` differentiated by autograd;
every test compares the loss and the gradients of hidden, lm_weight and bias.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import EPS, LOSS_TYPES, REDUCTIONS, _upstream

import cbkernels as cb
from cbkernels.linear_loss import LinearClassBalancedLoss, default_chunk_size, linear_cb_loss
from cbkernels.reference import reference_loss

# Odd on purpose: H = 37, V = 1025 (not a power of two), N = 45 rows (not a multiple of chunk 7).
LEAD, H, V = (5, 9), 37, 1025
CHUNKS = (1, 7, None, 1000)  # one row, an odd size, the default (here > N) and explicitly > N
CPU_BACKENDS = [b for b in cb.available_backends() if b in ("torch", "cpu")]


def make_linear_inputs(lead=LEAD, hidden_size=H, vocab=V, *, dtype=torch.float32, seed=0, ignore_frac=0.2,
                       ignore_index=-100, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, hidden_size, generator=g)
    # Logits of standard deviation ~3, as in the loss tests: softmax rows neither flat nor one-hot.
    w = torch.randn(vocab, hidden_size, generator=g) * (3.0 / math.sqrt(hidden_size))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    target = torch.randint(0, vocab, lead, generator=g)
    if ignore_frac:
        target[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    counts = torch.randint(1, 5000, (vocab,), generator=g)
    hidden, w = hidden.to(dtype), w.to(dtype)
    return hidden, w, None if b is None else b.to(dtype), target, counts


def _backward(loss, tensors):
    (loss * _upstream(loss).to(loss.dtype)).sum().backward()
    return [None if t is None else t.grad for t in tensors]


def reference(hidden, w, b, target, weight, *, dtype=torch.float64, **kw):
    """Loss and (grad_hidden, grad_W, grad_bias) of the materialised logits at ``dtype`` (autograd)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in (hidden, w, b)]
    logits = F.linear(leaves[0], leaves[1], leaves[2])
    loss = reference_loss(logits, target, None if weight is None else weight.to(dtype), **kw)
    return loss.detach().double(), [None if g is None else g.double() for g in _backward(loss, leaves)]


def ours(hidden, w, b, target, fn=linear_cb_loss, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (hidden, w, b)]
    loss = fn(leaves[0], leaves[1], target, bias=leaves[2], **kw)
    return loss.detach(), _backward(loss, leaves)


def assert_close_fp32(loss, grads, ref_loss, ref_grads):
    """float32 rule. Loss: rtol 1e-5 (SPEC section 6). Gradients: atol 1e-5 * max|ref|.

    Why 1e-5 and not the loss kernels' 1e-6: here every gradient is a float32 matmul output. Unit
    roundoff is u = 2^-24 = 6e-8; a length-K float32 dot product errs by about sqrt(K) * u (worst case
    K * u) times the sum of |terms|, and the terms here can be several times larger than the result
    (softmax gradients sum to 0 over the classes, so grad_hidden = g @ W cancels). The longest sums
    are K = V = 1025 (grad_hidden) and K = H = 37 inside the logits that feed every gradient:
    sqrt(1025) * 6e-8 = 2e-6 relative to the terms, a few times that relative to max|grad|.
    """
    lscale = ref_loss.abs().max().item() if ref_loss.numel() else 0.0
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6 * max(lscale, 1e-30))
    for name, g, r in zip(("hidden", "lm_weight", "bias"), grads, ref_grads):
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape and g.dtype == torch.float32, name
        gscale = r.abs().max().item()
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-5 * max(gscale, 1e-30), msg=lambda m: f"{name}: {m}")


def _kw(loss_type, reduction, **extra):
    kw = dict(loss_type=loss_type, reduction=reduction)
    if "focal" in loss_type:
        kw["gamma"] = extra.pop("gamma", 0.5)
    kw.update(extra)
    return kw


# Every loss type x reduction at the odd chunk size; every chunk size x loss type with "mean" (gradients
# precomputed in forward) and "none" (recomputed in backward), the two code paths of the chunk loop.
CASES = ([(lt, red, 7) for lt in LOSS_TYPES for red in REDUCTIONS]
         + [(lt, red, cs) for lt in LOSS_TYPES for red in ("mean", "none") for cs in CHUNKS if cs != 7])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type, reduction, chunk_size", CASES)
def test_matches_reference_fp32(loss_type, reduction, chunk_size, backend):
    hidden, w, b, target, counts = make_linear_inputs(seed=len(loss_type) + len(reduction))
    weight = cb.class_balanced_weights(counts, beta=0.999)
    kw = _kw(loss_type, reduction)
    loss, grads = ours(hidden, w, b, target, weight=weight, chunk_size=chunk_size, backend=backend, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (LEAD if reduction == "none" else ())
    assert_close_fp32(loss, grads, *reference(hidden, w, b, target, weight, **kw))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing(reduction):
    hidden, w, b, target, counts = make_linear_inputs(seed=3)
    weight = cb.class_balanced_weights(counts)
    kw = _kw("softmax", reduction, label_smoothing=0.1)
    loss, grads = ours(hidden, w, b, target, weight=weight, chunk_size=7, **kw)
    assert_close_fp32(loss, grads, *reference(hidden, w, b, target, weight, **kw))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.7])
@pytest.mark.parametrize("loss_type", ["focal", "softmax_focal"])
def test_gammas(loss_type, gamma):
    hidden, w, b, target, counts = make_linear_inputs(seed=4)
    weight = cb.class_balanced_weights(counts)
    kw = _kw(loss_type, "sum", gamma=gamma)
    loss, grads = ours(hidden, w, b, target, weight=weight, chunk_size=7, **kw)
    assert_close_fp32(loss, grads, *reference(hidden, w, b, target, weight, **kw))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_bias_int32_target_other_ignore_index_and_counts(loss_type):
    hidden, w, _, target, counts = make_linear_inputs(seed=5, ignore_index=-1, bias=False)
    target = target.to(torch.int32)
    kw = _kw(loss_type, "mean", ignore_index=-1)
    loss, grads = ours(hidden, w, None, target, samples_per_class=counts, beta=0.99, chunk_size=8, **kw)
    weight = cb.class_balanced_weights(counts, beta=0.99)
    assert_close_fp32(loss, grads, *reference(hidden, w, None, target, weight, **kw))


def test_no_weight_is_plain_cross_entropy_and_all_ignored_rows():
    hidden, w, b, target, _ = make_linear_inputs(seed=6, ignore_frac=0)
    plain = F.cross_entropy(F.linear(hidden, w, b).flatten(0, 1), target.flatten())
    torch.testing.assert_close(linear_cb_loss(hidden, w, target, bias=b), plain)
    h = hidden.clone().requires_grad_(True)
    loss = linear_cb_loss(h, w, torch.full_like(target, -100), bias=b)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_module_matches_function():
    hidden, w, b, target, counts = make_linear_inputs(seed=7)
    crit = LinearClassBalancedLoss(counts, loss_type="focal", beta=0.99, gamma=2.0, reduction="weighted_mean",
                                   chunk_size=16)
    assert "weight" in crit.state_dict() and crit.weight.shape == (V,) and "chunk_size=16" in repr(crit)
    got, got_grads = ours(hidden, w, b, target, fn=lambda *a, bias, **k: crit(*a, bias=bias))
    ref, ref_grads = ours(hidden, w, b, target, samples_per_class=counts, beta=0.99, loss_type="focal", gamma=2.0,
                          reduction="weighted_mean")
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


def test_any_strides():
    hidden, w, b, target, counts = make_linear_inputs(seed=15)
    weight = cb.class_balanced_weights(counts)
    # Transposed storage for hidden and lm_weight, a strided bias: handled, not rejected.
    h_t = hidden.reshape(-1, H).t().contiguous().t().reshape(*LEAD, H)
    w_t = w.t().contiguous().t()
    b_s = torch.stack([b, b], 1)[:, 0]
    assert not w_t.is_contiguous() and not b_s.is_contiguous()
    kw = _kw("focal", "none")
    loss, grads = ours(h_t, w_t, b_s, target, weight=weight, chunk_size=7, **kw)
    assert_close_fp32(loss, grads, *reference(hidden, w, b, target, weight, **kw))


def test_autocast_runs_the_projection_at_the_autocast_dtype():
    hidden, w, b, target, counts = make_linear_inputs(seed=16)
    weight = cb.class_balanced_weights(counts)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cb_loss(leaves[0], leaves[1], target, weight=weight, bias=leaves[2], chunk_size=7)
    loss.backward()
    assert loss.dtype == torch.float32 and all(t.grad.dtype == torch.float32 for t in leaves)
    ref_loss, ref_grads = ours(hidden.bfloat16(), w.bfloat16(), b.bfloat16(), target, weight=weight, chunk_size=7)
    torch.testing.assert_close(loss.detach(), ref_loss)
    for t, r in zip(leaves, ref_grads):
        torch.testing.assert_close(t.grad, r.float())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_no_worse_than_eager(loss_type, reduction, backend):
    """bf16 inputs against PyTorch eager at bf16 (linear then the reference loss), both vs float64.

    Loss (one value per row): per element, at most 2x eager's error plus one bf16 rounding and a
    float32-level floor (the rule of conftest.assert_matches). Gradients: each element is a matmul
    output, a sum over V (hidden) or N (lm_weight, bias) of independently rounded products, and both
    implementations share the rounding of the bf16 logits; per element, eager's error is then a random
    draw that is near 0 by chance for some elements (about 0.5% here, although ours is 2-3x smaller in
    max and RMS). So the gradients follow flash-attention's rule, per tensor: max error at most 2x
    eager's max error, and RMS error no larger than eager's.
    """
    hidden, w, b, target, counts = make_linear_inputs(dtype=torch.bfloat16, seed=8)
    weight = cb.class_balanced_weights(counts)
    kw = _kw(loss_type, reduction)
    loss, grads = ours(hidden, w, b, target, weight=weight, chunk_size=7, backend=backend, **kw)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    ref_loss, ref_grads = reference(hidden, w, b, target, weight, **kw)
    eager_loss, eager_grads = reference(hidden, w, b, target, weight, dtype=torch.bfloat16, **kw)
    err, eager_err = (loss.double() - ref_loss).abs(), (eager_loss - ref_loss).abs()
    bound = 2 * eager_err + EPS[torch.bfloat16] * ref_loss.abs() + 1e-5 * ref_loss.abs().max()
    assert (err <= bound).all(), f"loss: error exceeds 2x eager by {(err - bound).max().item():.3g}"
    for name, o, r, e in zip(("hidden", "lm_weight", "bias"), grads, ref_grads, eager_grads):
        err, eager_err = (o.double() - r).abs(), (e - r).abs()
        assert err.max() <= 2 * eager_err.max(), f"{name}: max error {err.max():.3g} vs eager {eager_err.max():.3g}"
        assert err.norm() <= eager_err.norm(), f"{name}: RMS error {err.norm():.3g} vs eager {eager_err.norm():.3g}"


@pytest.mark.parametrize("reduction", ["sum", "none", "weighted_mean"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type, reduction):
    hidden, w, b, target, counts = make_linear_inputs((2, 3), 5, 11, dtype=torch.float64, seed=9, ignore_frac=0.2)
    weight = cb.class_balanced_weights(counts)
    kw = _kw(loss_type, reduction)

    def fn(h, w_, b_):
        # gradcheck runs backward more than once on one graph: keep the gradients.
        return linear_cb_loss(h, w_, target, weight=weight, bias=b_, chunk_size=4, allow_retain_graph=True, **kw)

    inputs = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_frozen_weight_and_no_grad():
    hidden, w, b, target, counts = make_linear_inputs(seed=10)
    weight = cb.class_balanced_weights(counts)
    h = hidden.clone().requires_grad_(True)
    loss = linear_cb_loss(h, w, target, weight=weight, bias=b, chunk_size=7)
    loss.backward()
    ref_loss, ref_grads = reference(hidden, w, b, target, weight, loss_type="softmax", reduction="mean")
    assert_close_fp32(loss, [h.grad, None, None], ref_loss, [ref_grads[0], None, None])
    with torch.no_grad():
        wl = w.clone().requires_grad_(True)
        torch.testing.assert_close(linear_cb_loss(hidden, wl, target, weight=weight, bias=b), loss.detach())


def test_retain_graph():
    hidden, w, b, target, _ = make_linear_inputs(seed=11)
    h = hidden.clone().requires_grad_(True)
    loss = linear_cb_loss(h, w, target, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="allow_retain_graph=True"):
        loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    loss = linear_cb_loss(h2, w, target, bias=b, allow_retain_graph=True)
    (g1,) = torch.autograd.grad(loss, h2, retain_graph=True)
    (g2,) = torch.autograd.grad(3 * loss, h2)
    torch.testing.assert_close(g1, h.grad, rtol=0, atol=0)
    torch.testing.assert_close(g2, 3 * g1)


def test_double_backward_is_a_clear_error():
    hidden, w, b, target, _ = make_linear_inputs(seed=12)
    h = hidden.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(linear_cb_loss(h, w, target, bias=b), h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def _peak_bytes_above_start(run):
    from benchmarks.harness import cpu_peak_bytes

    return cpu_peak_bytes(run)


def test_full_logits_never_exist():
    hidden, w, b, target, counts = make_linear_inputs((512,), 64, 8192, seed=13)
    weight = cb.class_balanced_weights(counts)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    logits_bytes = 512 * 8192 * 4
    grads_bytes = sum(t.numel() * 4 for t in leaves)

    def step():
        linear_cb_loss(leaves[0], leaves[1], target, weight=weight, bias=leaves[2], chunk_size=32).backward()

    step()  # warm-up: one-time allocations (thread pools, op registration) do not count
    for t in leaves:
        t.grad = None
    extra = _peak_bytes_above_start(step) - grads_bytes
    # One chunk of logits is 32 x 8192 x 4 = 1 MiB; the fused loss adds a few chunk-sized temporaries.
    assert extra < logits_bytes / 4, f"{extra / 2**20:.1f} MiB above the gradients"


def test_default_chunk_size():
    assert default_chunk_size(2048, 1024, 32768) == 256  # a quarter of lm_weight: H / 4 rows
    assert default_chunk_size(8192, 4096, 128256) == 1024
    assert default_chunk_size(8192, 512, 8192) == 512  # as large as hidden: N * H / V rows
    assert default_chunk_size(10_000, 16, 50_000) == 64  # the minimum
    assert default_chunk_size(10, 16, 50_000) == 10 and default_chunk_size(0, 16, 50) == 1


def test_bad_inputs_have_clear_errors():
    hidden, w, b, target, counts = make_linear_inputs(seed=14)
    cases = [
        (dict(hidden=hidden.long()), TypeError, "hidden must be float"),
        (dict(hidden=hidden[..., :5]), ValueError, "lm_weight has H = 37 but hidden has H = 5"),
        (dict(lm_weight=w[0]), ValueError, r"lm_weight must have shape \[V, H\]"),
        (dict(lm_weight=w.double()), TypeError, "lm_weight is torch.float64 but hidden is torch.float32"),
        (dict(bias=b[:7]), ValueError, r"bias must have shape \[V\] = \[1025\]"),
        (dict(bias=b.double()), TypeError, "bias is torch.float64"),
        (dict(target=target[0]), ValueError, r"target must have shape hidden.shape\[:-1\] = \(5, 9\)"),
        (dict(target=torch.full(LEAD, V)), IndexError, r"target holds 1025, outside \[0, 1025\)"),
        (dict(target=target.float()), TypeError, "target must hold int64 or int32"),
        (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
        (dict(chunk_size=True), ValueError, "chunk_size must be an int >= 1"),
        (dict(samples_per_class=counts[:10]), ValueError, "samples_per_class has 10 classes but lm_weight has V"),
        (dict(weight=torch.ones(10)), ValueError, r"weight must have shape \[C\] = \[1025\]"),
        (dict(loss_type="focal", label_smoothing=0.1), ValueError, "label_smoothing applies to"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
        (dict(process_group=object()), RuntimeError, "torch.distributed is not initialised"),
    ]
    for override, exc, match in cases:
        kw = dict(hidden=hidden, lm_weight=w, target=target, bias=b)
        kw.update(override)
        with pytest.raises(exc, match=match):
            linear_cb_loss(kw.pop("hidden"), kw.pop("lm_weight"), kw.pop("target"), **kw)


# ----------------------------------------------------------------------------------------------------
# Vocabulary parallel: 2 processes, gloo on CPU


def _vp_worker(rank, world, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hidden, w, b, target, counts = make_linear_inputs(seed=21)
        # An uneven split (513 + 512 classes) with targets on both sides.
        bounds = [0, V // 2 + 1, V]
        lo, hi = bounds[rank], bounds[rank + 1]
        weight = cb.class_balanced_weights(counts)
        cases = [(lt, red, cs) for lt in LOSS_TYPES for red in REDUCTIONS for cs in (None, 7)]
        cases.append(("softmax", "none", 7, 0.1))
        for i, (lt, red, cs, *eps) in enumerate(cases):
            kw = _kw(lt, red, **({"label_smoothing": eps[0]} if eps else {}))
            # Alternate the two accepted forms of the class weights: this rank's slice or the global vector.
            wk = weight[lo:hi] if i % 2 else weight
            loss, (gh, gw, gb) = ours(hidden, w[lo:hi], b[lo:hi], target, weight=wk, chunk_size=cs,
                                      process_group=dist.group.WORLD, **kw)
            ref_loss, (rh, rw, rb) = reference(hidden, w, b, target, weight, **kw)
            assert_close_fp32(loss, [gh, gw, gb], ref_loss, [rh, rw[lo:hi], rb[lo:hi]])
        # Counts are global; a mismatch that only one rank could see raises on every rank (no hang).
        loss, _ = ours(hidden, w[lo:hi], b[lo:hi], target, samples_per_class=counts, process_group=dist.group.WORLD)
        ref_loss, _ = reference(hidden, w, b, target, weight, loss_type="softmax", reduction="mean")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        crit = LinearClassBalancedLoss(counts, loss_type="focal", reduction="sum", process_group=dist.group.WORLD)
        loss, _ = ours(hidden, w[lo:hi], b[lo:hi], target, fn=lambda *a, bias, **k: crit(*a, bias=bias))
        ref_loss, _ = reference(hidden, w, b, target, weight, loss_type="focal", gamma=0.5, reduction="sum")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        with pytest.raises(ValueError, match="same chunk_size"):
            linear_cb_loss(hidden, w[lo:hi], target, chunk_size=4 + rank, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _vp_error_worker(rank, world, init_file):
    """Inputs that only one rank gets wrong: every rank must raise (not wait in a collective for the
    rank that raised), and the ranks must stay in step for the next call."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # A short collective timeout turns a rank left waiting into a RuntimeError within seconds.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=5))
    try:
        hidden, w, b, target, counts = make_linear_inputs(seed=22)
        weight = cb.class_balanced_weights(counts)
        group = dist.group.WORLD
        lo, hi = (0, V // 2) if rank == 0 else (V // 2, V)
        # Rank 1's shard is empty (rank 0 holds every class): both ranks name rank 1.
        empty = slice(0, V) if rank == 0 else slice(V, V)
        with pytest.raises(ValueError, match=r"shard must hold V_r >= 1 classes; rank\(s\) \[1\] hold 0"):
            linear_cb_loss(hidden, w[empty], target, bias=b[empty], weight=weight, process_group=group)
        # A bad bias on rank 1 only: rank 1 raises its own error, rank 0 one that names rank 1.
        bias = b[lo:hi].double() if rank == 1 else b[lo:hi]
        exc, match = (TypeError, "bias is torch.float64") if rank == 1 else (ValueError, r"rank\(s\) \[1\] rejected")
        with pytest.raises(exc, match=match):
            linear_cb_loss(hidden, w[lo:hi], target, bias=bias, process_group=group)
        # Class weights on rank 0 only: the ranks would compute different losses, or rank 0 alone would raise.
        with pytest.raises(ValueError, match="same class weights"):
            linear_cb_loss(hidden, w[lo:hi], target, weight=weight[lo:hi] if rank == 0 else None,
                           process_group=group)
        # Grad mode off on rank 1 only: rank 0 alone would all-reduce grad_hidden.
        with torch.set_grad_enabled(rank == 0), pytest.raises(ValueError, match="same hidden.requires_grad"):
            linear_cb_loss(hidden.clone().requires_grad_(True), w[lo:hi], target, process_group=group)
        # Every rank made the same collectives: the next call still works.
        loss = linear_cb_loss(hidden, w[lo:hi], target, bias=b[lo:hi], weight=weight[lo:hi], process_group=group)
        ref_loss, _ = reference(hidden, w, b, target, weight, loss_type="softmax", reduction="mean")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, tmp_path, timeout_s):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # spawn, not fork: earlier tests in this process may have started torch.compile's worker threads and pools, and a
    # child forked while one of them holds a lock can hang (tests/test_training.py's DDP test did once).
    ctx = mp.start_processes(worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail(f"vocab-parallel workers did not finish in {timeout_s} s (a collective mismatch?)")


def test_vocab_parallel_two_ranks_gloo(tmp_path):
    _run_two_ranks(_vp_worker, tmp_path, 120)


def test_vocab_parallel_one_bad_rank_raises_on_every_rank(tmp_path):
    _run_two_ranks(_vp_error_worker, tmp_path, 60)
