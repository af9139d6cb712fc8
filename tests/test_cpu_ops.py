"""The compiled CPU backend: op registration, opcheck, torch.compile, per-ISA kernels, threads, accuracy.

tests/test_losses.py runs the full accuracy matrix over every available backend, "cpu" included;
this file covers what is specific to the C++ ops and their kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_inputs, run_loss

import cbkernels as cb
from cbkernels._backends import resolve_backend

pytestmark = pytest.mark.skipif("cpu" not in cb.available_backends(), reason="C++ extension not built")

LOSS_IDS = {"softmax": 0, "sigmoid": 1, "focal": 2, "softmax_focal": 3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
PUBLIC = {"softmax": cb.cb_softmax_cross_entropy, "sigmoid": cb.cb_sigmoid_cross_entropy, "focal": cb.cb_focal,
          "softmax_focal": cb.cb_softmax_focal}


def _ops():
    from cbkernels import _ops

    return _ops


def _op_args(n, c, dtype, loss_type, *, gamma=0.5, eps=0.0, seed=0, target_dtype=torch.int64):
    logits, target, counts = make_inputs(n, c, dtype=dtype, seed=seed, target_dtype=target_dtype)
    weight = cb.class_balanced_weights(counts, beta=0.99)
    scale = torch.tensor(1.0 / max(n, 1), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return logits, target, weight, scale, LOSS_IDS[loss_type], gamma, eps, -100


def _loss_kw(loss_type, gamma=0.5):
    return {"gamma": gamma} if "focal" in loss_type else {}


def test_ops_registered_and_auto_picks_cpu():
    _ops()
    for name in ("cbkernels::cb_loss_fwd", "cbkernels::cb_loss_fwd_inplace"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    # The pure-PyTorch backend's ops live in the same namespace.
    assert hasattr(torch.ops.cbkernels, "cb_loss_fwd_torch")
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_fwd(dtype, loss_type, compute_grad):
    args = _op_args(9, 37, dtype, loss_type, eps=0.1 if loss_type == "softmax" else 0.0)
    torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd.default, args + (compute_grad,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_opcheck_inplace_and_strided(dtype, loss_type):
    logits, *rest = _op_args(6, 40, dtype, loss_type, target_dtype=torch.int32)
    torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd_inplace.default, (logits.clone(), *rest))
    # Column-strided logits (the kernel copies them and writes the gradient back).
    strided = torch.zeros(40, 6, dtype=dtype).t().copy_(logits)
    torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd_inplace.default, (strided, *rest))
    torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd.default, (strided, *rest, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inplace_matches_out_of_place_bitwise(dtype, loss_type):
    ops = _ops()
    logits, *rest = _op_args(23, 130, dtype, loss_type, gamma=1.7)
    loss, grad = ops.forward(logits, *rest, True)
    loss_nograd, empty = ops.forward(logits, *rest, False)
    assert empty.shape == (0,) and torch.equal(loss, loss_nograd)
    assert grad.dtype == dtype and grad.is_contiguous()
    # Row-strided (a column slice of a wider buffer) and column-strided in-place buffers.
    wide = torch.full((23, 150), 7.0, dtype=dtype)
    wide[:, 5:135] = logits
    for buf, view in ((wide, wide[:, 5:135]), (None, torch.empty(130, 23, dtype=dtype).t().copy_(logits))):
        loss_ip = ops.forward_inplace(view, *rest)
        assert torch.equal(loss_ip, loss) and torch.equal(view, grad)
        if buf is not None:  # the columns outside the view are untouched
            assert (buf[:, :5] == 7).all() and (buf[:, 135:] == 7).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_reduced_op_is_the_normalised_sum_of_rows(reduction, loss_type, backend):
    # The op's scalar reductions: s from the targets (SPEC section 5), loss = s * sum_i l_i, gradient = s * dl/dz.
    fwd = _ops().forward if backend == "cpu" else torch.ops.cbkernels.cb_loss_fwd_torch.default
    fwd_ip = _ops().forward_inplace if backend == "cpu" else torch.ops.cbkernels.cb_loss_fwd_inplace_torch.default
    for dtype in (torch.float32, torch.float64):
        logits, target, weight, _, lt, gamma, eps, ii = _op_args(57, 23, dtype, loss_type)
        cdtype = dtype
        valid = target != ii
        if reduction == "mean":
            s = 1.0 / valid.sum().clamp(min=1).to(cdtype)
        elif reduction == "weighted_mean":
            s = 1.0 / weight.double()[target[valid]].sum().to(cdtype)
        else:
            s = torch.ones((), dtype=cdtype)
        rows, grad_rows = fwd(logits, target, weight, s, lt, gamma, eps, ii, True)  # the first schema's call
        loss, grad = fwd(logits, target, weight, None, lt, gamma, eps, ii, True, reduction)
        assert loss.shape == () and loss.dtype == cdtype
        torch.testing.assert_close(grad, grad_rows, rtol=0, atol=0)  # the same s, the same bits
        expected = rows.double().sum() * s.double()
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=0)
        buf = logits.clone()
        loss_ip = fwd_ip(buf, target, weight, None, lt, gamma, eps, ii, reduction)
        assert torch.equal(loss_ip, loss) and torch.equal(buf, grad)
        for s_given in (torch.tensor(0.25, dtype=cdtype),):  # a given scale replaces the reduction's
            loss_s, grad_s = fwd(logits, target, weight, s_given, lt, gamma, eps, ii, True, reduction)
            torch.testing.assert_close(grad_s, grad_rows * (s_given / s), rtol=4 * torch.finfo(dtype).eps, atol=0)
            torch.testing.assert_close(loss_s.double(), rows.double().sum() * 0.25, rtol=tol, atol=0)
        # No rows: every reduction of nothing is 0.
        empty = fwd(logits[:0], target[:0], weight, None, lt, gamma, eps, ii, True, reduction=reduction)[0]
        assert empty.shape == () and empty.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
def test_opcheck_reduced(reduction):
    for loss_type in LOSS_TYPES:
        logits, target, weight, scale, *rest = _op_args(9, 37, torch.float32, loss_type)
        for s in (None, scale):
            torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd.default,
                                  (logits, target, weight, s, *rest, True, reduction))
            torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd_inplace.default,
                                  (logits.clone(), target, weight, s, *rest, reduction))


def test_out_of_range_target_raises_index_error():
    ops = _ops()
    logits, target, weight, scale, *rest = _op_args(8, 5, torch.float32, "focal")
    target[3] = 5
    with pytest.raises(IndexError, match="target holds 5"):
        ops.forward(logits, target, weight, scale, *rest, True)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph(loss_type, backend):
    fn = PUBLIC[loss_type]
    logits, target, counts = make_inputs(37, 211, seed=3)
    w = cb.class_balanced_weights(counts)

    def f(z, t):
        return fn(z, t, weight=w, backend=backend, **_loss_kw(loss_type))

    compiled = torch.compile(f, fullgraph=True)
    eager_loss, eager_grad = run_loss(f, logits, target)
    loss, grad = run_loss(compiled, logits, target)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_thread_count_does_not_change_bits(dtype):
    ops = _ops()
    before = torch.get_num_threads()
    try:
        for loss_type in LOSS_TYPES:
            args = _op_args(301, 1000, dtype, loss_type, seed=5)  # enough rows for several tasks
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(ops.forward(*args, True))
            for loss, grad in results[1:]:
                assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    finally:
        torch.set_num_threads(before)


def _check_against_reference(loss_type, shape, dtype, reduction, *, gamma=0.5, eps=0.0, target_dtype=torch.int64,
                             seed=0):
    logits, target, counts = make_inputs(*shape, dtype=dtype, seed=seed, target_dtype=target_dtype)
    w = cb.class_balanced_weights(counts, beta=0.999)
    kw = _loss_kw(loss_type, gamma)
    if eps:
        kw["label_smoothing"] = eps
    loss, grad = run_loss(lambda z, t, **k: PUBLIC[loss_type](z, t, weight=w, backend="cpu", **kw, **k),
                          logits, target, reduction=reduction)
    assert_matches(loss, grad, logits, target, w, loss_type=loss_type, reduction=reduction,
                   gamma=gamma, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(256, 8142), (1024, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_shapes(loss_type, shape, dtype):
    _check_against_reference(loss_type, shape, dtype, "mean")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(5, 1), (9, 423), (4, 1025), (40, 15), (0, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_odd_shapes(loss_type, shape, dtype, reduction):
    _check_against_reference(loss_type, shape, dtype, reduction, target_dtype=torch.int32, seed=sum(shape))


@pytest.mark.parametrize("loss_type", ["focal", "softmax_focal"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 1.7, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gammas(loss_type, gamma, dtype):
    _check_against_reference(loss_type, (33, 517), dtype, "none", gamma=gamma)


@pytest.mark.parametrize("eps", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_label_smoothing(eps, dtype):
    _check_against_reference("softmax", (31, 1025), dtype, "weighted_mean", eps=eps)


def _accurate_reference(logits, target, loss_type, gamma):
    """Per-row float64 losses in forms that keep relative precision for tiny losses (the softmax ones
    via L = log1p(sum_{j != y} exp(z_j - z_y)); reference_loss's lse - z_y cancels there, even in float64)."""
    z = logits.double()
    if not loss_type.startswith("softmax"):
        return cb.reference.reference_loss(z, target, None, loss_type=loss_type, reduction="none", gamma=gamma)
    zy = z.gather(1, target[:, None])
    others = torch.ones_like(z, dtype=torch.bool).scatter_(1, target[:, None], False)
    nll = torch.log1p(torch.where(others, torch.exp(z - zy), 0.0).sum(1))
    return nll if loss_type == "softmax" else (-torch.expm1(-nll)) ** gamma * nll


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_confident_rows_keep_relative_precision(loss_type):
    # Target logit far above the rest: the per-row loss is tiny and must not cancel to 0 or lose digits.
    n, c = 64, 300
    logits = torch.randn(n, c)
    target = torch.randint(0, c, (n,))
    logits[torch.arange(n), target] = torch.linspace(5.0, 40.0, n)
    logits[torch.arange(n), (target + 1) % c] = -torch.linspace(5.0, 40.0, n)  # confident negatives too
    for gamma in (0.0, 0.5, 2.0, 1.7):
        kw = _loss_kw(loss_type, gamma)
        ours = PUBLIC[loss_type](logits, target, reduction="none", backend="cpu", **kw).double()
        ref = _accurate_reference(logits, target, loss_type, gamma)
        assert (ref > 0).all()
        # atol: float32 subnormals (softmax focal reaches L^(1+gamma) ~ 1e-48) carry no relative precision
        torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-37)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_masked_logits(loss_type, dtype):
    logits, target, _ = make_inputs(8, 50, dtype=dtype, ignore_frac=0, seed=6)
    logits[1, 7] = float("nan")
    target[4] = -100
    logits[4, :] = float("nan")
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[6, (target[6] + 1) % 50:] = True  # -inf logits: classes masked out
    masked[6, target[6]] = False
    logits[masked] = float("-inf")
    z = logits.clone().requires_grad_(True)
    loss = PUBLIC[loss_type](z, target, reduction="none", backend="cpu", **_loss_kw(loss_type))
    loss.sum().backward()
    assert torch.isnan(loss[1])
    # softmax couples the row, so NaN reaches every class; the sigmoid losses keep classes apart
    nan_grad = torch.isnan(z.grad[1])
    assert nan_grad.all() if loss_type.startswith("softmax") else (nan_grad.nonzero().flatten().tolist() == [7])
    assert loss[4] == 0 and (z.grad[4] == 0).all()
    keep = torch.tensor([0, 2, 3, 5, 6, 7])
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(z.grad[keep]).all()
    assert (z.grad[6][masked[6]] == 0).all()


# Each instruction-set build of the row kernels, forced through ATen's own capability switch.
_ISA_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import assert_matches, make_inputs, run_loss
    import cbkernels as cb
    assert torch.backends.cpu.get_cpu_capability() == {cap!r}, torch.backends.cpu.get_cpu_capability()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for loss_type in ("softmax", "sigmoid", "focal", "softmax_focal"):
            for gamma in ((0.0, 0.5, 1.0, 2.0, 1.7) if "focal" in loss_type else (0.5,)):
                logits, target, counts = make_inputs(19, 141, dtype=dtype, seed=1)
                w = cb.class_balanced_weights(counts)
                kw = dict(loss_type=loss_type, gamma=gamma, reduction="none")
                loss, grad = run_loss(lambda z, t, **k: cb.class_balanced_loss(z, t, weight=w, backend="cpu", **k),
                                      logits, target, **kw)
                assert_matches(loss, grad, logits, target, w, **kw)
    print("ok")
""")


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_each_isa_build_matches_reference(cap):
    have = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if have not in order or order.index(cap) > order.index(have):
        pytest.skip(f"this CPU runs {have}")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests, cap=cap)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
