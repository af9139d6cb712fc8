"""The CUDA kernels' logic on CPU: csrc/cuda compiled with g++ against a CPU emulation of CUDA (tests/cuda_emu).

Every path (several rows per block, a block per row, streamed and split rows), every loss and focal exponent,
every storage dtype, misaligned and strided rows, large logits on every path, in place, and the launch plans of
realistic shapes, against the float64 torch backend. The emulation models the hardware approximations the kernels
call (ex2.approx, __expf, __fdividef, sqrt.approx) at their documented worst-case error (tests/cuda_emu/cuda_emu.h),
so the float32 tolerances here are met under the GPU's arithmetic too, not only under exact libm; the exact bits
of the approximations still differ from a GPU's (tests/test_cuda_backend.py checks those on a GPU).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cbkernels._torch_backend import forward as torch_forward

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_emu  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_emu.unavailable_reason() is not None,
                                reason=cuda_emu.unavailable_reason() or "")

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (loss_type, gamma, label_smoothing)
LOSSES = [(SOFTMAX, 0.0, 0.0), (SOFTMAX, 0.0, 0.1), (SIGMOID, 0.0, 0.0)]
LOSSES += [(lt, g, 0.0) for lt in (FOCAL, SOFTMAX_FOCAL) for g in (0.0, 0.5, 1.0, 2.0, 1.7)]
# (path, threads_per_row, splits): automatic, and every kernel shape forced
CONFIGS = [("auto", 0, 0), ("rows", 1, 0), ("rows", 4, 0), ("rows", 32, 0), ("rows", 64, 0), ("rows", 96, 0),
           ("stream", 2, 1), ("stream", 32, 1), ("stream", 64, 1), ("stream", 64, 3), ("stream", 256, 2)]


@pytest.fixture(scope="module", autouse=True)
def _built():
    cuda_emu.load()


def _inputs(n, c, dtype, *, seed=0, ignore_every=4, scale=3.0, col_offset=0, row_pad=0, target_dtype=torch.int64):
    """Logits as a view [N, C] of a wider buffer (column offset and row padding make rows misaligned)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, c + col_offset + row_pad, generator=g, dtype=torch.float64) * scale).to(dtype)
    logits = base[:, col_offset:col_offset + c]
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[1::ignore_every] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float32) + 0.5
    return logits, target.to(target_dtype), weight


def _scale(dtype, value=0.7):
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _reference(logits, target, weight, scale, lt, gamma, eps):
    return torch_forward(logits.double().contiguous(), target, weight, scale.double(), lt, gamma, eps, -100, True)


def _check(loss, grad, ref_loss, ref_grad, dtype, what=""):
    assert not torch.isnan(loss).any(), f"unwritten or NaN loss {what}"
    assert not torch.isnan(grad).any(), f"unwritten or NaN gradient {what}"
    loss, grad = loss.double(), grad.double()
    # Floors: a reference that is all zeros (C = 1) holds float64 rounding noise of ~1e-17.
    lscale = max(ref_loss.abs().max().item(), 1e-6)
    gscale = max(ref_grad.abs().max().item(), 1e-6)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10 * lscale, msg=f"loss {what}")
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10 * gscale, msg=f"grad {what}")
        return
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6 * lscale, msg=f"loss {what}")
    # float32 math, one rounding to the storage type (2^-24 / 2^-11 / 2^-8 relative).
    rel = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    err = (grad - ref_grad).abs()
    bound = rel * ref_grad.abs() + 1e-6 * gscale
    assert (err <= bound).all(), f"grad {what}: worst excess {(err - bound).max().item():.3g} (scale {gscale:.3g})"


def _every_path(dtype, loss_type, gamma, eps):
    ran = set()
    for n, c, col_offset in ((9, 1, 0), (13, 7, 1), (6, 37, 3), (4, 423, 0), (2, 1025, 5)):
        logits, target, weight = _inputs(n, c, dtype, seed=n * c, col_offset=col_offset)
        scale = _scale(dtype)
        ref_loss, ref_grad = _reference(logits, target, weight, scale, loss_type, gamma, eps)
        for path, tpr, splits in CONFIGS:
            plan = cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits)
            if plan is None:  # the forced shape cannot hold this row
                continue
            loss, grad, plan = cuda_emu.forward(logits, target, weight, scale, loss_type, gamma, eps, path=path,
                                                threads_per_row=tpr, splits=splits)
            _check(loss, grad, ref_loss, ref_grad, dtype, f"{n}x{c}+{col_offset} {plan}")
            ran.add((plan["path"], plan["threads_per_row"] > 32, plan["splits"] > 1))
    softmax = loss_type in (SOFTMAX, SOFTMAX_FOCAL)
    expected = {(2, False, False), (2, True, False), (2, True, True)}
    if softmax:
        expected |= {(1, False, False), (1, True, False)}
    assert expected <= ran


@pytest.mark.parametrize("loss_type,gamma,eps", LOSSES)
def test_every_path_float32(loss_type, gamma, eps):
    _every_path(torch.float32, loss_type, gamma, eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("loss_type,gamma,eps", [(SOFTMAX, 0.0, 0.1), (SIGMOID, 0.0, 0.0), (FOCAL, 0.5, 0.0),
                                                 (FOCAL, 1.7, 0.0), (SOFTMAX_FOCAL, 2.0, 0.0)])
def test_every_path_other_dtypes(dtype, loss_type, gamma, eps):
    _every_path(dtype, loss_type, gamma, eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
@pytest.mark.parametrize("config", [("auto", 0, 0), ("stream", 64, 3), ("rows", 32, 0)])
def test_in_place_with_strided_rows(dtype, loss_type, config):
    path, tpr, splits = config
    n, c = 7, 213
    logits, target, weight = _inputs(n, c, dtype, seed=3, col_offset=1, row_pad=2)
    scale = _scale(dtype, 0.25)
    ref_loss, ref_grad = _reference(logits, target, weight, scale, loss_type, 0.5, 0.0)
    buffer = logits._base.clone()
    z = buffer[:, 1:1 + c]
    if cuda_emu.plan(z, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
        pytest.skip("forced plan cannot hold the row")
    loss, grad, _ = cuda_emu.forward(z, target, weight, scale, loss_type, 0.5, path=path, threads_per_row=tpr,
                                     splits=splits, grad=z)
    _check(loss, z, ref_loss, ref_grad, dtype, "in place")
    # Columns outside the view (neighbours of misaligned rows in the same 16 bytes) are untouched.
    assert torch.equal(buffer[:, 0], logits._base[:, 0])
    assert torch.equal(buffer[:, 1 + c:], logits._base[:, 1 + c:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", [SOFTMAX, FOCAL])
def test_gradient_buffer_aligned_unlike_logits(dtype, loss_type):
    # Row stride C + 3: each row's offset in 16 bytes differs from the contiguous gradient's, so stores go
    # element by element; sentinel columns around the gradient rows must survive.
    n, c = 11, 300
    logits, target, weight = _inputs(n, c, dtype, seed=5, row_pad=3)
    scale = _scale(dtype)
    ref_loss, ref_grad = _reference(logits, target, weight, scale, loss_type, 1.7, 0.0)
    for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
        out = torch.full((n, c + 8), 12345.0, dtype=dtype)
        grad = out[:, 4:4 + c]
        loss, _, _ = cuda_emu.forward(logits, target, weight, scale, loss_type, 1.7, grad=grad, path=path,
                                      threads_per_row=tpr, splits=splits)
        _check(loss, grad, ref_loss, ref_grad, dtype, path)
        assert (out[:, :4] == 12345.0).all() and (out[:, 4 + c:] == 12345.0).all()


@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
def test_int32_targets_all_ignored_rows_and_no_grad(loss_type):
    logits, target, weight = _inputs(10, 50, torch.float32, seed=7, target_dtype=torch.int32)
    scale = _scale(torch.float32)
    ref_loss, ref_grad = _reference(logits, target.long(), weight, scale, loss_type, 2.0, 0.0)
    loss, grad, _ = cuda_emu.forward(logits, target, weight, scale, loss_type, 2.0)
    _check(loss, grad, ref_loss, ref_grad, torch.float32, "int32 targets")
    loss_only, none, _ = cuda_emu.forward(logits, target, weight, scale, loss_type, 2.0, compute_grad=False)
    assert none is None
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0)
    ignored = torch.full_like(target, -100)
    for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
        loss, grad, _ = cuda_emu.forward(logits, ignored, weight, scale, loss_type, 2.0, path=path,
                                         threads_per_row=tpr, splits=splits)
        assert (loss == 0).all() and (grad == 0).all()


def test_nan_logit_reaches_its_row_only():
    logits, target, weight = _inputs(6, 40, torch.float32, seed=9, ignore_every=0)
    logits = logits.clone()
    logits[2, 5] = float("nan")
    for lt in (SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL):
        loss = cuda_emu.forward(logits, target, weight, _scale(torch.float32), lt, 0.5)[0]
        assert torch.isnan(loss[2]) and not torch.isnan(loss[[0, 1, 3, 4, 5]]).any()


def test_masked_classes_get_zero_gradient():
    # -inf logits (classes masked out) contribute nothing and get a zero gradient; the rest stays finite.
    logits, target, weight = _inputs(6, 50, torch.float32, seed=10, ignore_every=0)
    logits = logits.clone()
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[:, 20:] = True
    masked[torch.arange(6), target] = False
    logits[masked] = float("-inf")
    for lt, gamma in ((SOFTMAX, 0.0), (SIGMOID, 0.0), (FOCAL, 0.5), (FOCAL, 1.7), (SOFTMAX_FOCAL, 2.0)):
        for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
            loss, grad, _ = cuda_emu.forward(logits, target, weight, _scale(torch.float32), lt, gamma, path=path,
                                             threads_per_row=tpr, splits=splits)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert (grad[masked] == 0).all()


def test_large_logits_stay_finite():
    # Far beyond exp's range: shifts by the row max, exp(-|v|) and log1p keep everything finite.
    logits, target, weight = _inputs(8, 100, torch.float32, seed=11, scale=200.0)
    scale = _scale(torch.float32)
    for lt, gamma in ((SOFTMAX, 0.0), (SIGMOID, 0.0), (FOCAL, 0.5), (FOCAL, 1.7), (SOFTMAX_FOCAL, 0.5)):
        ref_loss, ref_grad = _reference(logits, target, weight, scale, lt, gamma, 0.0)
        loss, grad, _ = cuda_emu.forward(logits, target, weight, scale, lt, gamma)
        _check(loss, grad, ref_loss, ref_grad, torch.float32, f"lt={lt}")


def _large_logits(n, c, kind, dtype, *, seed, col_offset=3):
    """Rows of |z| ~ 1e4 ("1e4": offsets of +-5e3..2e4, a spread of a few units and a ramp along the row, so the
    running max rises in every tile and every thread), or small logits with a random third of the classes near 1e3
    ("1e3": the max jumps by ~1e3 at the first large one, then creeps; most targets lie ~1e3 below the max). The
    logits are a view with misaligned rows, as in _inputs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c + col_offset, generator=g, dtype=torch.float64) * 3.0
    if kind == "1e4":
        offsets = torch.tensor([1e4, -1e4, 7e3, -1.3e4, 2e4, -5e3], dtype=torch.float64).repeat(n // 6 + 1)[:n]
        z += offsets[:, None] + torch.linspace(0.0, 8.0, c + col_offset, dtype=torch.float64)
    else:
        z[torch.rand(z.shape, generator=g) < 0.3] += 1e3
    target = torch.randint(0, c, (n,), generator=g)
    target[n - 1] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float32) + 0.5
    return z.to(dtype)[:, col_offset:], target, weight


# Streamed rows: a warp and two warps per row (several rows per block), a block looping over two tiles, split rows.
LARGE_CONFIGS = [("stream", 32, 1), ("stream", 64, 1), ("stream", 256, 1), ("stream", 64, 3), ("stream", 256, 2),
                 ("stream", 256, 5)]
LARGE_CASES = [(torch.float32, SOFTMAX, 0.0, 0.0), (torch.float32, SOFTMAX, 0.0, 0.1),
               (torch.float32, SOFTMAX_FOCAL, 1.7, 0.0), (torch.float32, FOCAL, 0.5, 0.0),
               (torch.bfloat16, SOFTMAX, 0.0, 0.1), (torch.float64, SOFTMAX, 0.0, 0.1)]


@pytest.mark.parametrize("kind", ["1e4", "1e3"])
@pytest.mark.parametrize("dtype,loss_type,gamma,eps", LARGE_CASES, ids=str)
def test_large_logits_stream_and_split(dtype, loss_type, gamma, eps, kind):
    # Partial sums taken under different running maxima (tiles of a thread, threads of a block, splits of a row)
    # must combine exactly: a rescale that rounds differently from the exps shows at these magnitudes as 1e-5 to
    # 1e-4 relative error in the row statistics.
    logits, target, weight = _large_logits(7, 5000, kind, dtype, seed=23)
    scale = _scale(dtype)
    ref_loss, ref_grad = _reference(logits, target, weight, scale, loss_type, gamma, eps)
    splits_seen = set()
    for path, tpr, splits in LARGE_CONFIGS:
        loss, grad, plan = cuda_emu.forward(logits, target, weight, scale, loss_type, gamma, eps, path=path,
                                            threads_per_row=tpr, splits=splits)
        _check(loss, grad, ref_loss, ref_grad, dtype, f"{kind} {plan}")
        splits_seen.add(plan["splits"])
    assert {1, 2, 3, 5} <= splits_seen


@pytest.mark.parametrize("loss_type", [SOFTMAX, FOCAL])
def test_split_rows_deterministic_and_consistent(loss_type):
    logits, target, weight = _inputs(3, 9000, torch.float32, seed=13, ignore_every=0)
    scale = _scale(torch.float32)
    runs = [cuda_emu.forward(logits, target, weight, scale, loss_type, 0.5, num_sms=8)[:2] for _ in range(2)]
    assert cuda_emu.plan(logits, loss_type, num_sms=8)["splits"] > 1
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    whole = cuda_emu.forward(logits, target, weight, scale, loss_type, 0.5, path="stream", splits=1)
    torch.testing.assert_close(runs[0][0], whole[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(runs[0][1], whole[1], rtol=0, atol=1e-7 * whole[1].abs().max().item())


def test_float64_scale_with_float32_logits():
    logits, target, weight = _inputs(5, 30, torch.float32, seed=15)
    ref = cuda_emu.forward(logits, target, weight, torch.tensor(0.3), SOFTMAX)
    out = cuda_emu.forward(logits, target, weight, torch.tensor(0.3, dtype=torch.float64), SOFTMAX)
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("shape,dtype,path,tpr,splits", [
    ((256, 8142), torch.float32, 1, 512, 1),     # a row in the registers of a 512-thread block
    ((4096, 8142), torch.bfloat16, 1, 256, 1),
    ((8192, 1000), torch.float32, 1, 64, 1),     # two warps per row
    ((8192, 1000), torch.bfloat16, 1, 32, 1),    # a warp per row
    ((1024, 7), torch.float32, 1, 1, 1),         # a thread per row
    ((2048, 32000), torch.bfloat16, 2, 256, 1),  # streamed, one block per row
    ((4096, 128256), torch.bfloat16, 2, 256, 1),
    ((8, 256000), torch.float32, 2, 256, 63),    # few long rows: split over ~4 blocks per SM
    ((8, 256000), torch.bfloat16, 2, 256, 32),
])
def test_plans_of_realistic_shapes(shape, dtype, path, tpr, splits):
    got = cuda_emu.plan(torch.empty(1, 1, dtype=dtype).expand(*shape), SOFTMAX, num_sms=132)
    assert (got["path"], got["threads_per_row"], got["splits"]) == (path, tpr, splits)


def test_sigmoid_plans_stream():
    got = cuda_emu.plan(torch.empty(1, 1).expand(4096, 8142), FOCAL, num_sms=132)
    assert (got["path"], got["threads_per_row"], got["splits"]) == (2, 256, 1)
    got = cuda_emu.plan(torch.empty(1, 1).expand(8192, 1000), SIGMOID, num_sms=132)
    assert (got["path"], got["threads_per_row"], got["splits"]) == (2, 64, 1)
    got = cuda_emu.plan(torch.empty(1, 1).expand(4096, 10), FOCAL, num_sms=132)
    assert (got["path"], got["threads_per_row"], got["block_threads"]) == (2, 1, 256)


def test_bad_target_fails_the_device_assert():
    # A device-side assert aborts the emulating process, so it runs in a child.
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import cuda_emu
        z = torch.zeros(4, 10)
        t = torch.tensor([1, 2, 10, 3])
        cuda_emu.forward(z, t, torch.ones(10), torch.tensor(1.0), 0)
        print("no assert")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no assert" not in proc.stdout
    assert "target outside [0, C)" in proc.stderr


def _normaliser(target, weight, reduction):
    """SPEC section 5 in float64, written from the formulas."""
    valid = target != -100
    if reduction == "mean":
        return 1.0 / max(1, int(valid.sum()))
    if reduction == "weighted_mean":
        total = weight.double()[target[valid].long()].sum().item()
        return 1.0 / total if total > 0 else 0.0
    return 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss_type", [SOFTMAX, FOCAL])
def test_reduced_launch(reduction, dtype, loss_type):
    # The launch's own normaliser (before the loss kernels) and reduced loss (after them): rows on every path, more
    # rows than one block's threads (the strided loops), int32 targets, a whole batch ignored.
    for n, c, path, ignore_every in ((700, 37, "auto", 4), (1100, 5, "auto", 3), (3, 1025, "stream", 2),
                                     (5, 11, "auto", 1)):
        logits, target, weight = _inputs(n, c, dtype, seed=n + c, ignore_every=ignore_every,
                                         target_dtype=torch.int32 if n == 1100 else torch.int64)
        if ignore_every == 1:
            target[:] = -100  # no valid row: mean divides by max(1, 0), weighted_mean's sum is 0 (s = 0)
        s = _normaliser(target, weight, reduction)
        ref_rows, ref_grad = _reference(logits, target.long(), weight, torch.tensor(s, dtype=torch.float64),
                                        loss_type, 0.5, 0.0)
        loss, grad, plan = cuda_emu.forward(logits, target, weight, None, loss_type, 0.5, path=path,
                                            reduction=reduction, splits=2 if path == "stream" else 0,
                                            threads_per_row=64 if path == "stream" else 0)
        assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if reduction != "sum":
            # The normaliser as the CPU backend rounds it: exact for the count, one rounding of the weight sum.
            tol = 1e-15 if dtype == torch.float64 else 2.0**-23
            assert abs(plan["scale"].item() - s) <= tol * abs(s), (plan["scale"].item(), s)
        expected = s * ref_rows.sum().item()
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        assert abs(loss.item() - expected) <= rtol * max(abs(expected), 1e-6), (loss.item(), expected)
        _check(ref_rows.new_zeros(1), grad, ref_rows.new_zeros(1), ref_grad, dtype, f"{n}x{c} {reduction}")
        # Equal inputs, equal bits (fixed-order sums).
        again = cuda_emu.forward(logits, target, weight, None, loss_type, 0.5, path=path, reduction=reduction,
                                 splits=2 if path == "stream" else 0, threads_per_row=64 if path == "stream" else 0)
        assert torch.equal(again[0], loss) and torch.equal(again[1], grad)


def test_bad_target_fails_the_device_assert_with_a_reduction():
    # With reduction="mean" the first launch is the normaliser's, which reads every target: a negative one fails
    # its assert (the same check the loss kernels run before they read w[y]).
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import cuda_emu
        z = torch.zeros(4, 10)
        t = torch.tensor([1, 2, -3, 3])
        cuda_emu.forward(z, t, torch.ones(10), None, 0, reduction="mean")
        print("no assert")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no assert" not in proc.stdout
    assert "target outside [0, C)" in proc.stderr
