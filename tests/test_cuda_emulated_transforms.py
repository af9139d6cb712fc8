"""The CUDA kernels' logit transforms and z-loss (SPEC sections 10-11) on CPU, through the emulation of
tests/cuda_emu (see tests/test_cuda_emulated.py), against the float64 reference written from the formulas
(``cbkernels.reference.reference_loss``, gradients by autograd).

Each transform alone and all together, with and without the z-loss, on every kernel path (several rows per block,
a block per row, streamed and split rows) and every storage dtype, misaligned and strided rows, in place (the
softcap's chain rule needs the raw logit the gradient overwrites), ignored rows, the per-row z-loss terms, the
launch's reductions, large and infinite logits under a softcap, a negative margin that lifts the target above
every other logit, and the identities: a zero offset (the transform kernels) reproduces the plain kernels bit for
bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cbkernels.reference import reference_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_emu  # noqa: E402
from test_cuda_emulated import CONFIGS, _check, _inputs, _normaliser, _scale  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_emu.unavailable_reason() is not None,
                                reason=cuda_emu.unavailable_reason() or "")

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3
NAMES = {SOFTMAX: "softmax", SIGMOID: "sigmoid", FOCAL: "focal", SOFTMAX_FOCAL: "softmax_focal"}
SOFTMAX_TYPES = (SOFTMAX, SOFTMAX_FOCAL)


@pytest.fixture(scope="module", autouse=True)
def _built():
    cuda_emu.load()


def _vectors(c, seed):
    """A logit adjustment tau log(pi) (negative, a few units) and LDAM-like margins (0.1 .. 0.5)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 1000, (c,), generator=g).double()
    offset = (torch.log(counts / counts.sum())).float()
    margin = (0.5 * (counts / counts.max()) ** -0.25 / (counts.min() / counts.max()) ** -0.25).float()
    return offset, margin


def _transforms(kind, c, loss_type, seed=0):
    """The keyword arguments of one transform set (z_loss only for the softmax losses)."""
    offset, margin = _vectors(c, seed)
    z_loss = 1e-2 if loss_type in SOFTMAX_TYPES else 0.0
    return {
        "softcap": dict(softcap=4.0),
        "offset": dict(logit_offset=offset),
        "margin": dict(target_margin=margin),
        "scale": dict(logit_scale=2.5),
        "z_loss": dict(z_loss=z_loss),
        "all": dict(softcap=6.0, logit_offset=offset, target_margin=margin, logit_scale=1.7, z_loss=z_loss),
    }[kind]


def _reference(logits, target, weight, scale, loss_type, gamma, eps, ignore_index=-100, **tf):
    """Per-row losses (z-loss term included), scale * dl/dz with respect to the raw logits, and the z-loss terms."""
    z = logits.double().detach().requires_grad_(True)
    kw = {k: v for k, v in tf.items() if k != "z_loss" or v}
    if kw.get("softcap") == 0.0:
        del kw["softcap"]
    rows, z_rows = reference_loss(z, target.long(), weight.double(), loss_type=NAMES[loss_type], gamma=gamma,
                                  label_smoothing=eps, reduction="none", ignore_index=ignore_index,
                                  return_z_loss=True, **kw)
    (grad,) = torch.autograd.grad((rows * float(scale)).sum(), z)
    return rows.detach(), grad, z_rows


def _check_z_rows(got, ref, target, dtype, what=""):
    assert not torch.isnan(got).any(), f"unwritten z_rows {what}"
    assert (got[target == -100] == 0).all(), f"z_rows of ignored rows {what}"
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * max(ref.abs().max().item(), 1e-6),
                               msg=f"z_rows {what}")


# (loss_type, gamma, label_smoothing): the sigmoid focal exponents share one transform kernel (kGeneral) but gamma 0.
LOSSES = [(SOFTMAX, 0.0, 0.1), (SIGMOID, 0.0, 0.0), (FOCAL, 0.5, 0.0), (FOCAL, 2.0, 0.0), (SOFTMAX_FOCAL, 1.7, 0.0)]
SHAPES = ((9, 1, 0), (13, 7, 1), (6, 37, 3), (4, 423, 0), (2, 1025, 5))


def _every_path(dtype, loss_type, gamma, eps, kind):
    ran = set()
    for n, c, col_offset in SHAPES:
        logits, target, weight = _inputs(n, c, dtype, seed=n * c, col_offset=col_offset)
        tf = _transforms(kind, c, loss_type, seed=c)
        scale = _scale(dtype)
        ref_loss, ref_grad, ref_z = _reference(logits, target, weight, scale, loss_type, gamma, eps, **tf)
        for path, tpr, splits in CONFIGS:
            plan = cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits)
            if plan is None:  # the forced shape cannot hold this row
                continue
            loss, grad, plan = cuda_emu.forward(logits, target, weight, scale, loss_type, gamma, eps, path=path,
                                                threads_per_row=tpr, splits=splits, z_rows=True, **tf)
            what = f"{kind} {n}x{c}+{col_offset} {plan}"
            _check(loss, grad, ref_loss, ref_grad, dtype, what)
            _check_z_rows(plan["z_rows"], ref_z, target, dtype, what)
            ran.add((plan["path"], plan["threads_per_row"] > 32, plan["splits"] > 1))
    expected = {(2, False, False), (2, True, False), (2, True, True)}
    if loss_type in SOFTMAX_TYPES:
        expected |= {(1, False, False), (1, True, False)}
    assert expected <= ran


@pytest.mark.parametrize("kind", ["softcap", "offset", "margin", "scale", "all"])
@pytest.mark.parametrize("loss_type,gamma,eps", LOSSES)
def test_every_path_float32(loss_type, gamma, eps, kind):
    _every_path(torch.float32, loss_type, gamma, eps, kind)


@pytest.mark.parametrize("loss_type,gamma,eps", [(SOFTMAX, 0.0, 0.1), (SOFTMAX_FOCAL, 1.7, 0.0)])
def test_z_loss_alone_every_path(loss_type, gamma, eps):
    # No logit transform: the transform kernels with identity transforms (the plain ones never take a z-loss), the
    # z-loss in the softmax row epilogue; asking for z_rows changes no bit of the loss or the gradient.
    _every_path(torch.float32, loss_type, gamma, eps, "z_loss")
    logits, target, weight = _inputs(6, 1025, torch.float32, seed=43, col_offset=2)
    for path, tpr, splits in (("auto", 0, 0), ("rows", 96, 0), ("stream", 64, 1), ("stream", 256, 3)):
        launch = dict(path=path, threads_per_row=tpr, splits=splits, z_loss=1e-2)
        plain = cuda_emu.forward(logits, target, weight, _scale(torch.float32), loss_type, gamma, eps, **launch)
        with_rows = cuda_emu.forward(logits, target, weight, _scale(torch.float32), loss_type, gamma, eps,
                                     z_rows=True, **launch)
        assert torch.equal(plain[0], with_rows[0]) and torch.equal(plain[1], with_rows[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("loss_type,gamma,eps", [(SOFTMAX, 0.0, 0.1), (SIGMOID, 0.0, 0.0), (FOCAL, 1.7, 0.0),
                                                 (SOFTMAX_FOCAL, 2.0, 0.0)])
def test_every_path_other_dtypes(dtype, loss_type, gamma, eps):
    _every_path(dtype, loss_type, gamma, eps, "all")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
def test_in_place_with_strided_rows(dtype, loss_type):
    # The softcap's factor 1 - tanh(z / c)^2 needs the raw logit that the gradient overwrites: every path must read a
    # chunk (and keep it) before storing over it.
    n, c = 7, 213
    logits, target, weight = _inputs(n, c, dtype, seed=3, col_offset=1, row_pad=2, scale=6.0)
    tf = _transforms("all", c, loss_type, seed=4)
    scale = _scale(dtype, 0.25)
    ref_loss, ref_grad, ref_z = _reference(logits, target, weight, scale, loss_type, 0.5, 0.0, **tf)
    for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 3), ("rows", 32, 0), ("stream", 4, 1)):
        buffer = logits._base.clone()
        z = buffer[:, 1:1 + c]
        if cuda_emu.plan(z, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
            continue
        loss, _, plan = cuda_emu.forward(z, target, weight, scale, loss_type, 0.5, path=path, threads_per_row=tpr,
                                         splits=splits, grad=z, z_rows=True, **tf)
        _check(loss, z, ref_loss, ref_grad, dtype, f"in place {path} {tpr} {splits}")
        _check_z_rows(plan["z_rows"], ref_z, target, dtype, "in place")
        assert torch.equal(buffer[:, 0], logits._base[:, 0])
        assert torch.equal(buffer[:, 1 + c:], logits._base[:, 1 + c:])


LARGE_CONFIGS = [("auto", 0, 0), ("rows", 512, 0), ("stream", 32, 1), ("stream", 256, 1), ("stream", 64, 3),
                 ("stream", 256, 5)]


@pytest.mark.parametrize("dtype,loss_type,gamma,eps", [(torch.float32, SOFTMAX, 0.0, 0.1),
                                                       (torch.float32, SOFTMAX_FOCAL, 0.5, 0.0),
                                                       (torch.float32, FOCAL, 2.0, 0.0),
                                                       (torch.float32, SIGMOID, 0.0, 0.0),
                                                       (torch.bfloat16, SOFTMAX, 0.0, 0.0),
                                                       (torch.float64, SOFTMAX_FOCAL, 1.7, 0.0)], ids=str)
def test_large_and_infinite_logits_under_softcap(dtype, loss_type, gamma, eps):
    # |z| ~ 1e4 (and some +-inf) capped at 30: tanh saturates, 1 - tanh^2 is exactly 0 there (no NaN from inf * 0),
    # and the capped row is an ordinary one, streamed and split alike.
    n, c = 6, 3000
    g = torch.Generator().manual_seed(31)
    z = torch.randn(n, c + 3, generator=g, dtype=torch.float64) * 60.0
    z[:, ::7] *= 200.0
    z[0, 3 + 10], z[1, 3 + 11], z[2, 3 + 12] = float("inf"), float("-inf"), float("-inf")
    logits = z.to(dtype)[:, 3:]
    target = torch.randint(0, c, (n,), generator=g)
    target[4] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float32) + 0.5
    offset, margin = _vectors(c, 5)
    tf = dict(softcap=30.0, logit_offset=offset, target_margin=margin,
              z_loss=1e-3 if loss_type in SOFTMAX_TYPES else 0.0)
    scale = _scale(dtype)
    ref_loss, ref_grad, ref_z = _reference(logits, target, weight, scale, loss_type, gamma, eps, **tf)
    assert torch.isfinite(ref_grad).all()
    for path, tpr, splits in LARGE_CONFIGS:
        if cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
            continue  # a block of 512 threads holds a row on the rows path only
        loss, grad, plan = cuda_emu.forward(logits, target, weight, scale, loss_type, gamma, eps, path=path,
                                            threads_per_row=tpr, splits=splits, z_rows=True, **tf)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        _check(loss, grad, ref_loss, ref_grad, dtype, f"{plan}")
        _check_z_rows(plan["z_rows"], ref_z, target, dtype, f"{plan}")
        assert grad[0, 10] == 0 and grad[1, 11] == 0 and grad[2, 12] == 0


@pytest.mark.parametrize("loss_type", [SOFTMAX, SOFTMAX_FOCAL, SIGMOID])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_negative_margin_lifts_the_target_above_the_max(loss_type, dtype):
    # target_margin = -40 puts z'_y far above every other logit, and LDAM's scale 30 multiplies the gaps: the row's
    # shift must be the transformed max (the target's), or exp(z'_y - m) overflows.
    n, c = 8, 1500
    logits, target, weight = _inputs(n, c, dtype, seed=41, scale=1.0)
    margin = torch.full((c,), -40.0)
    tf = dict(target_margin=margin, logit_scale=30.0, z_loss=1e-4 if loss_type in SOFTMAX_TYPES else 0.0)
    scale = _scale(dtype)
    ref_loss, ref_grad, ref_z = _reference(logits, target, weight, scale, loss_type, 1.7, 0.0, **tf)
    for path, tpr, splits in (("auto", 0, 0), ("rows", 32, 0), ("stream", 256, 1), ("stream", 64, 4)):
        if cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
            continue
        loss, grad, plan = cuda_emu.forward(logits, target, weight, scale, loss_type, 1.7, path=path,
                                            threads_per_row=tpr, splits=splits, z_rows=True, **tf)
        _check(loss, grad, ref_loss, ref_grad, dtype, f"{plan}")
        _check_z_rows(plan["z_rows"], ref_z, target, dtype, f"{plan}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("loss_type", [SOFTMAX, FOCAL])
def test_reduced_launch(reduction, loss_type):
    # The launch's own normaliser and reduced loss with the transforms and the z-loss (not weighted by a_i: it still
    # counts in the sum the normaliser divides).
    for n, c, path in ((700, 37, "auto"), (3, 1025, "stream")):
        logits, target, weight = _inputs(n, c, torch.float32, seed=n + c)
        tf = _transforms("all", c, loss_type, seed=c)
        s = _normaliser(target, weight, reduction)
        ref_rows, ref_grad, _ = _reference(logits, target, weight, s, loss_type, 0.5, 0.0, **tf)
        loss, grad, plan = cuda_emu.forward(logits, target, weight, None, loss_type, 0.5, path=path,
                                            reduction=reduction, splits=2 if path == "stream" else 0,
                                            threads_per_row=64 if path == "stream" else 0, **tf)
        expected = s * ref_rows.sum().item()
        assert abs(loss.item() - expected) <= 1e-5 * max(abs(expected), 1e-6), (loss.item(), expected)
        _check(ref_rows.new_zeros(1), grad, ref_rows.new_zeros(1), ref_grad, torch.float32, f"{n}x{c} {reduction}")


@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
def test_all_rows_ignored(loss_type):
    logits, target, weight = _inputs(10, 50, torch.float32, seed=7)
    target[:] = -100
    tf = _transforms("all", 50, loss_type)
    for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
        loss, grad, plan = cuda_emu.forward(logits, target, weight, _scale(torch.float32), loss_type, 2.0, path=path,
                                            threads_per_row=tpr, splits=splits, z_rows=True, **tf)
        assert (loss == 0).all() and (grad == 0).all() and (plan["z_rows"] == 0).all()


def _identity_runs(logits, target, weight, scale, loss_type, gamma, eps, path, tpr, splits, **extra):
    return cuda_emu.forward(logits, target, weight, scale, loss_type, gamma, eps, path=path, threads_per_row=tpr,
                            splits=splits, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("loss_type,gamma,eps", [(SOFTMAX, 0.0, 0.1), (SIGMOID, 0.0, 0.0), (FOCAL, 1.7, 0.0),
                                                 (SOFTMAX_FOCAL, 1.7, 0.0)])
def test_identity_transforms_are_bitwise_the_plain_kernels(dtype, loss_type, gamma, eps):
    # A zero offset and zero margins run the transform kernels (kTf) with z' = z exactly: the same bits as the plain
    # kernels, so the transform stage adds no rounding of its own. Asking for z_rows with z_loss 0 gives zeros and
    # changes nothing else. (gamma 1.7: the transform kernels share the kGeneral focal term.)
    logits, target, weight = _inputs(9, 301, dtype, seed=17, col_offset=1)
    scale = _scale(dtype)
    zeros = torch.zeros(301)
    for path, tpr, splits in (("auto", 0, 0), ("rows", 8, 0), ("rows", 64, 0), ("stream", 4, 1), ("stream", 64, 3)):
        if cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
            continue
        args = (logits, target, weight, scale, loss_type, gamma, eps, path, tpr, splits)
        plain_loss, plain_grad, _ = _identity_runs(*args)
        for extra in (dict(logit_offset=zeros), dict(target_margin=zeros, logit_scale=1.0), dict(z_rows=True)):
            loss, grad, plan = _identity_runs(*args, **extra)
            assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad), (extra, plan)
            if "z_rows" in extra:
                assert (plan["z_rows"] == 0).all()


def test_sigmoid_losses_write_zero_z_rows():
    # The z-loss is an error for the sigmoid losses at the API; a z_rows buffer given anyway is still written.
    logits, target, weight = _inputs(5, 2000, torch.float32, seed=19)
    for lt in (SIGMOID, FOCAL):
        for path, tpr, splits in (("auto", 0, 0), ("stream", 256, 3)):
            _, _, plan = cuda_emu.forward(logits, target, weight, _scale(torch.float32), lt, 0.5, path=path,
                                          threads_per_row=tpr, splits=splits, z_rows=True, softcap=5.0)
            assert (plan["z_rows"] == 0).all()


@pytest.mark.parametrize("loss_type", [SIGMOID, SOFTMAX])
def test_softcap_factor_has_full_relative_precision(loss_type):
    # sech^2(z / c) where tanh saturates (|z / c| up to 7.5) and where tanh is tiny: every gradient element to a few
    # float32 ulps relative (1 + expm1(-2|x|) cancelled: 0.3% off at |x| = 6), on every path.
    g = torch.Generator().manual_seed(17)
    logits = torch.rand(5, 700, generator=g) * 60 - 30
    logits[:, :16] *= 1e-4
    target = torch.randint(0, 700, (5,), generator=g)
    weight = torch.ones(700)
    scale = _scale(torch.float32)
    _, ref_grad, _ = _reference(logits, target, weight, scale, loss_type, 0.0, 0.0, softcap=4.0)
    for path, tpr, splits in CONFIGS:
        if cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
            continue
        _, grad, plan = cuda_emu.forward(logits, target, weight, scale, loss_type, 0.0, 0.0, path=path,
                                         threads_per_row=tpr, splits=splits, softcap=4.0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=0, msg=str(plan))
