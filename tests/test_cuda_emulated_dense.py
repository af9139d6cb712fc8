"""The CUDA kernels with dense targets (SPEC section 9: soft labels, mixup, multi-label) on CPU, through the emulation
of tests/cuda_emu (see tests/test_cuda_emulated.py), against the float64 reference written from the formulas
(``cbkernels.reference.reference_loss`` with a floating target, gradients by autograd).

Every kernel path (several rows per block, a block per row, streamed and split rows: the dense kernels have their own
instantiations), every loss and both weight modes, rows that are soft, mixup, multi-hot, all zero and one-hot, label
smoothing, the logit transforms (the margin scaled by q) with the z-loss, targets in the logits' dtype and in float32
(aligned like the logits, or not: the vector and the element-wise target loads), strided rows and in place, every
reduction with the launch's own normaliser (the "weighted_mean" one from the rows' sample weights, a first launch),
no gradient, and the one-hot dense target against the index kernels (confident rows keep their relative precision).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cbkernels.reference import reference_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_emu  # noqa: E402
from test_cuda_emulated import CONFIGS, _scale  # noqa: E402
from test_cuda_emulated import _check as _check_index  # noqa: E402
from test_cuda_emulated_transforms import _vectors  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_emu.unavailable_reason() is not None,
                                reason=cuda_emu.unavailable_reason() or "")

SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL = 0, 1, 2, 3
NAMES = {SOFTMAX: "softmax", SIGMOID: "sigmoid", FOCAL: "focal", SOFTMAX_FOCAL: "softmax_focal"}
SOFTMAX_TYPES = (SOFTMAX, SOFTMAX_FOCAL)
SHAPES = ((9, 1, 0), (11, 2, 1), (13, 7, 1), (6, 37, 3), (5, 423, 0), (2, 1025, 5))


@pytest.fixture(scope="module", autouse=True)
def _built():
    cuda_emu.load()


def _logits(n, c, dtype, *, seed, scale=3.0, col_offset=0, row_pad=0):
    """Logits as a view [N, C] of a wider buffer (column offset and row padding make rows misaligned)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, c + col_offset + row_pad, generator=g, dtype=torch.float64) * scale).to(dtype)
    return base[:, col_offset:col_offset + c]


def _targets(n, c, dtype=torch.float32, *, seed, col_offset=0, row_pad=0):
    """q [N, C] in [0, 1], a view of a wider buffer; rows cycle through soft (a random distribution), mixup (two
    classes, lambda and 1 - lambda), multi-hot, all-zero and one-hot rows."""
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.zeros(n, c + col_offset + row_pad, dtype=torch.float64)
    rows = q[:, col_offset:col_offset + c]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            p = torch.rand(c, generator=g, dtype=torch.float64) ** 3
            rows[i] = p / p.sum()
        elif kind == 1:
            a, b = torch.randint(0, c, (2,), generator=g).tolist()
            lam = torch.rand((), generator=g, dtype=torch.float64).item()
            rows[i, a] += lam
            rows[i, b] += 1 - lam
        elif kind == 2:
            rows[i] = (torch.rand(c, generator=g) < 0.3).double()
        elif kind == 4:
            rows[i, torch.randint(0, c, (), generator=g)] = 1.0
    return q.to(dtype)[:, col_offset:col_offset + c]


def _weight(c, seed):
    g = torch.Generator().manual_seed(seed + 2)
    return torch.rand(c, generator=g, dtype=torch.float32) + 0.5


def _reference(logits, q, weight, scale, loss_type, gamma, eps, mode, reduction="none", **tf):
    """The loss (z-loss included) under ``reduction``, scale * dl/dz with respect to the raw logits, the z-loss
    terms."""
    z = logits.double().detach().requires_grad_(True)
    kw = {k: v for k, v in tf.items() if (k != "z_loss" or v) and (k != "softcap" or v)}
    loss, z_term = reference_loss(z, q.double(), weight.double(), loss_type=NAMES[loss_type], gamma=gamma,
                                  label_smoothing=eps, reduction=reduction, weight_mode=mode, return_z_loss=True, **kw)
    (grad,) = torch.autograd.grad(loss.sum() * float(scale), z)
    return loss.detach(), grad, z_term


def _check(loss, grad, ref_loss, ref_grad, dtype, what="", zmax=0.0):
    """tests/test_cuda_emulated.py's check; with transforms (``zmax``: the largest |z'|) a gradient element may also
    be off by 2^-22 |z'| relative: z' is formed in float32 (a few roundings of ulp(z')), and p_j = exp(z'_j - lse)
    carries that absolute error of z'_j as a relative one (multi-hot rows make T p_j large, not only 1 - p_y)."""
    if zmax and dtype != torch.float64:
        loose = ref_grad.double().abs() * (2.0**-22 * zmax)
        grad = torch.where((grad.double() - ref_grad).abs() <= loose, ref_grad.to(grad.dtype), grad)
    _check_index(loss, grad, ref_loss, ref_grad, dtype, what)


def _zmax(logits, q, tf):
    """The largest |z'| of the transformed logits (0 without transforms)."""
    if not tf:
        return 0.0
    z = logits.double()
    z = tf["softcap"] * torch.tanh(z / tf["softcap"]) + tf["logit_offset"].double() - tf["target_margin"].double() * q
    return (z * tf["logit_scale"]).abs().max().item()


def _check_z_rows(got, ref, dtype, what=""):
    assert not torch.isnan(got).any(), f"unwritten z_rows {what}"
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * max(ref.abs().max().item(), 1e-6),
                               msg=f"z_rows {what}")


def _transforms(c, loss_type, seed):
    offset, margin = _vectors(c, seed)
    return dict(softcap=6.0, logit_offset=offset, target_margin=margin, logit_scale=1.7,
                z_loss=1e-2 if loss_type in SOFTMAX_TYPES else 0.0)


def _every_path(dtype, target_dtype, loss_type, gamma, eps, mode, transforms=False, configs=CONFIGS):
    ran = set()
    for n, c, col_offset in SHAPES:
        logits = _logits(n, c, dtype, seed=n * c, col_offset=col_offset)
        q = _targets(n, c, target_dtype, seed=n * c, col_offset=col_offset)
        weight = _weight(c, n * c)
        tf = _transforms(c, loss_type, seed=c) if transforms else {}
        scale = _scale(dtype)
        ref_loss, ref_grad, ref_z = _reference(logits, q, weight, scale, loss_type, gamma, eps, mode, **tf)
        for path, tpr, splits in configs:
            if cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
                continue  # the forced shape cannot hold this row
            loss, grad, plan = cuda_emu.forward(logits, q, weight, scale, loss_type, gamma, eps, path=path,
                                                threads_per_row=tpr, splits=splits, weight_mode=mode,
                                                z_rows=True, **tf)
            what = f"{NAMES[loss_type]} {mode} {n}x{c}+{col_offset} {dtype} q {target_dtype} {plan}"
            _check(loss, grad, ref_loss, ref_grad, dtype, what, _zmax(logits, q.double(), tf))
            _check_z_rows(plan["z_rows"], ref_z, dtype, what)
            ran.add((plan["path"], plan["threads_per_row"] > 32, plan["splits"] > 1))
    return ran


def _assert_every_path(ran, loss_type):
    # The dense softmax focal loss streams whatever is forced (it reads a row again after its statistics anyway).
    expected = {(2, False, False), (2, True, False), (2, True, True)}
    if loss_type == SOFTMAX:
        expected |= {(1, False, False), (1, True, False)}
    assert expected <= ran, ran


# (loss_type, gamma, label_smoothing): the dense sigmoid kernel takes every focal exponent at run time.
LOSSES = [(SOFTMAX, 0.0, 0.0), (SOFTMAX, 0.0, 0.1), (SIGMOID, 0.0, 0.0), (FOCAL, 0.5, 0.0), (FOCAL, 1.0, 0.0),
          (FOCAL, 2.0, 0.0), (FOCAL, 1.7, 0.0), (SOFTMAX_FOCAL, 1.7, 0.0), (SOFTMAX_FOCAL, 0.5, 0.0)]


@pytest.mark.parametrize("mode", ["sample", "class"])
@pytest.mark.parametrize("loss_type,gamma,eps", LOSSES)
def test_every_path_float32(loss_type, gamma, eps, mode):
    _assert_every_path(_every_path(torch.float32, torch.float32, loss_type, gamma, eps, mode), loss_type)


@pytest.mark.parametrize("loss_type,gamma,eps,mode", [(SOFTMAX, 0.0, 0.1, "class"), (SIGMOID, 0.0, 0.0, "sample"),
                                                      (FOCAL, 2.0, 0.0, "class"), (FOCAL, 1.7, 0.0, "sample"),
                                                      (SOFTMAX_FOCAL, 1.7, 0.0, "sample")])
def test_transforms_and_z_loss_every_path(loss_type, gamma, eps, mode):
    # The margin m_j q_ij, before the statistics (the row max is of the margined logits).
    ran = _every_path(torch.float32, torch.float32, loss_type, gamma, eps, mode, transforms=True)
    _assert_every_path(ran, loss_type)


# A few plans of each shape: several rows per block, a block per row, streamed and split rows.
SOME_CONFIGS = [("auto", 0, 0), ("rows", 4, 0), ("rows", 64, 0), ("stream", 32, 1), ("stream", 64, 3)]


@pytest.mark.parametrize("dtype,target_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float32), (torch.float64, torch.float64),
                                                (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("loss_type,gamma,eps,mode", [(SOFTMAX, 0.0, 0.1, "sample"), (FOCAL, 0.5, 0.0, "class"),
                                                      (SOFTMAX_FOCAL, 2.0, 0.0, "class")])
def test_other_dtypes(dtype, target_dtype, loss_type, gamma, eps, mode):
    # Targets in the logits' dtype or float32 (the two the kernels read), with the transforms.
    _every_path(dtype, target_dtype, loss_type, gamma, eps, mode, transforms=True, configs=SOME_CONFIGS)


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16), (torch.float64, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
def test_in_place_with_strided_rows_and_targets(dtype, target_dtype, loss_type):
    # Strided, misaligned logits written in place, and targets whose rows sit elsewhere in 16 bytes than the logits'
    # (element-wise target loads), then aligned like them (vector loads): the same results.
    n, c = 7, 213
    logits = _logits(n, c, dtype, seed=3, col_offset=1, row_pad=2, scale=6.0)
    weight = _weight(c, 3)
    tf = _transforms(c, loss_type, seed=4)
    scale = _scale(dtype, 0.25)
    gamma = 0.5
    for q_offset, q_pad in ((3, 1), (1, 2)):
        q = _targets(n, c, target_dtype, seed=5, col_offset=q_offset, row_pad=q_pad)
        for mode in ("sample", "class"):
            ref_loss, ref_grad, ref_z = _reference(logits, q, weight, scale, loss_type, gamma, 0.0, mode, **tf)
            for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 3), ("rows", 32, 0), ("stream", 4, 1)):
                buffer = logits._base.clone()
                z = buffer[:, 1:1 + c]
                if cuda_emu.plan(z, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
                    continue
                loss, _, plan = cuda_emu.forward(z, q, weight, scale, loss_type, gamma, path=path,
                                                 threads_per_row=tpr, splits=splits, grad=z, z_rows=True,
                                                 weight_mode=mode, **tf)
                what = f"in place {path} {tpr} {splits} q +{q_offset} {mode}"
                _check(loss, z, ref_loss, ref_grad, dtype, what, _zmax(logits, q.double(), tf))
                _check_z_rows(plan["z_rows"], ref_z, dtype, what)
                assert torch.equal(buffer[:, 0], logits._base[:, 0])
                assert torch.equal(buffer[:, 1 + c:], logits._base[:, 1 + c:])


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("mode", ["sample", "class"])
@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
def test_reduced_launch(loss_type, mode, reduction):
    # The launch's own normaliser: 1/N for "mean" (every dense row counts), 1 / sum_i a_i of the sample weights for
    # "weighted_mean" in both modes (a first launch finds them, which split sigmoid rows in sample mode read too).
    for n, c, path, tpr, splits in ((301, 37, "auto", 0, 0), (3, 1025, "stream", 64, 2), (4, 2000, "auto", 0, 0)):
        logits = _logits(n, c, torch.float32, seed=n + c)
        q = _targets(n, c, seed=n + c)
        weight = _weight(c, c)
        tf = _transforms(c, loss_type, seed=c)
        ref, _, _ = _reference(logits, q, weight, 1.0, loss_type, 0.5, 0.1, mode, reduction, **tf)
        rows, _, _ = _reference(logits, q, weight, 1.0, loss_type, 0.5, 0.1, mode, **tf)
        s = ref.item() / rows.sum().item()
        _, ref_grad, _ = _reference(logits, q, weight, s, loss_type, 0.5, 0.1, mode, **tf)
        loss, grad, plan = cuda_emu.forward(logits, q, weight, None, loss_type, 0.5, 0.1, path=path,
                                            threads_per_row=tpr, splits=splits, reduction=reduction,
                                            weight_mode=mode, **tf)
        what = f"{n}x{c} {reduction} {plan}"
        assert abs(loss.item() - ref.item()) <= 1e-5 * max(abs(ref.item()), 1e-6), (loss.item(), ref.item(), what)
        if reduction != "sum":  # the launch computed the normaliser
            torch.testing.assert_close(plan["scale"].double(), torch.tensor(s, dtype=torch.float64), rtol=1e-6, atol=0)
        _check(ref.new_zeros(1), grad, ref.new_zeros(1), ref_grad, torch.float32, what, _zmax(logits, q, tf))


@pytest.mark.parametrize("loss_type", [SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL])
def test_without_gradient(loss_type):
    # No gradient: the same losses (split softmax-focal rows: every split's focal terms, one block for the rest).
    logits = _logits(4, 2000, torch.float32, seed=21)
    q = _targets(4, 2000, seed=21)
    weight = _weight(2000, 21)
    for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 3), ("rows", 64, 0)):
        if cuda_emu.plan(logits, loss_type, path=path, threads_per_row=tpr, splits=splits) is None:
            continue
        for mode in ("sample", "class"):
            kw = dict(path=path, threads_per_row=tpr, splits=splits, weight_mode=mode)
            with_grad, _, _ = cuda_emu.forward(logits, q, weight, _scale(torch.float32), loss_type, 1.7, **kw)
            loss, none, _ = cuda_emu.forward(logits, q, weight, _scale(torch.float32), loss_type, 1.7,
                                             compute_grad=False, **kw)
            assert none is None
            assert torch.equal(loss, with_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("loss_type,gamma", [(SOFTMAX, 0.0), (SIGMOID, 0.0), (FOCAL, 2.0), (FOCAL, 1.7),
                                             (SOFTMAX_FOCAL, 1.7)])
def test_one_hot_rows_match_the_index_kernels(dtype, loss_type, gamma):
    # Index targets are the special case q = one-hot (SPEC section 9): the dense kernels agree with the index ones to
    # float rounding, class mode too where it equals sample mode (softmax losses).
    n, c = 12, 300
    logits = _logits(n, c, dtype, seed=13)
    g = torch.Generator().manual_seed(13)
    target = torch.randint(0, c, (n,), generator=g)
    q = torch.nn.functional.one_hot(target, c).to(torch.float32)
    weight = _weight(c, 13)
    scale = _scale(dtype)
    modes = ("sample", "class") if loss_type in SOFTMAX_TYPES else ("sample",)
    for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
        kw = dict(path=path, threads_per_row=tpr, splits=splits)
        ref_loss, ref_grad, _ = cuda_emu.forward(logits, target, weight, scale, loss_type, gamma, **kw)
        for mode in modes:
            loss, grad, _ = cuda_emu.forward(logits, q, weight, scale, loss_type, gamma, weight_mode=mode, **kw)
            rtol = 1e-12 if dtype == torch.float64 else 2e-6
            torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0, msg=f"{mode} {path}")
            gtol = 1e-12 if dtype == torch.float64 else {torch.float32: 1e-6, torch.bfloat16: 2.0**-7}[dtype]
            torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=gtol,
                                       atol=gtol * ref_grad.double().abs().max().item(), msg=f"{mode} {path}")


def test_class_mode_with_index_targets():
    # Index targets in class mode are the sample mode for the softmax losses without label smoothing (the index kernels
    # compute those); the launch refuses the other cases, which the API edge sends as one-hot dense targets.
    n, c = 6, 40
    logits = _logits(n, c, torch.float32, seed=19)
    target = torch.arange(n) * 5
    weight = _weight(c, 19)
    scale = _scale(torch.float32)
    for lt in (SOFTMAX, SOFTMAX_FOCAL):
        sample = cuda_emu.forward(logits, target, weight, scale, lt, 1.7)
        cls = cuda_emu.forward(logits, target, weight, scale, lt, 1.7, weight_mode="class")
        assert torch.equal(sample[0], cls[0]) and torch.equal(sample[1], cls[1])
    for lt, eps in ((SOFTMAX, 0.1), (SIGMOID, 0.0), (FOCAL, 0.0)):
        with pytest.raises(RuntimeError, match="CUDA error"):
            cuda_emu.forward(logits, target, weight, scale, lt, 1.7, eps, weight_mode="class")


@pytest.mark.parametrize("loss_type", [SOFTMAX, SOFTMAX_FOCAL])
def test_confident_rows_keep_relative_precision(loss_type):
    # A one-hot row whose class leads by 16 to 22: L = log1p(sum_{j != y} e^(z_j - z_y)) ~ 1e-7 .. 1e-10 and 1 - p_y
    # come from the other classes' exps, not from lse - z_y or 1 - p_y formed in float32 (all cancelled); C = 1
    # gives exactly 0 (one column: lse = z, p = 1).
    n, c = 8, 50
    logits = _logits(n, c, torch.float64, seed=17, scale=1.0)
    target = torch.arange(n) % c
    logits[torch.arange(n), target] += torch.linspace(16, 22, n, dtype=torch.float64)
    q = torch.nn.functional.one_hot(target, c).float()
    weight = torch.ones(c)
    others = torch.logsumexp(logits.masked_fill(q.bool(), float("-inf")) - logits.gather(1, target[:, None]), 1)
    nll = torch.log1p(torch.exp(others))
    for path, tpr, splits in (("auto", 0, 0), ("stream", 32, 1), ("stream", 64, 2)):
        loss, grad, _ = cuda_emu.forward(logits.float(), q, weight, _scale(torch.float32, 1.0), loss_type, 0.5,
                                         path=path, threads_per_row=tpr, splits=splits)
        expected = nll if loss_type == SOFTMAX else (-torch.expm1(-nll)) ** 0.5 * nll
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0, msg=path)
        if loss_type == SOFTMAX:  # dl/dz_y = -(1 - p_y)
            one_minus_p = -torch.expm1(-nll)
            torch.testing.assert_close(-grad[torch.arange(n), target].double(), one_minus_p, rtol=1e-5, atol=0)
    single = _logits(6, 1, torch.float32, seed=3)
    for lt in (SOFTMAX, SOFTMAX_FOCAL):
        loss, grad, _ = cuda_emu.forward(single, torch.ones(6, 1), torch.ones(1), _scale(torch.float32), lt, 0.5)
        assert (loss == 0).all() and (grad == 0).all()


def test_masked_logits_and_rows_without_mass():
    # -inf logits where q = 0 (masked classes) add nothing and get a zero gradient (no 0 * inf), as with index
    # targets; a multi-label row without positives has sample weight 1 (SPEC section 9).
    n, c, keep = 6, 50, 20
    logits = _logits(n, c, torch.float32, seed=10).clone()
    q = _targets(n, keep, seed=10)
    q_full = torch.cat([q, torch.zeros(n, c - keep)], 1)
    logits[:, keep:] = float("-inf")
    weight = _weight(c, 10)
    for lt, gamma in ((SOFTMAX, 0.0), (SIGMOID, 0.0), (FOCAL, 0.5), (FOCAL, 1.7), (SOFTMAX_FOCAL, 2.0)):
        for mode in ("sample", "class"):
            ref_loss, ref_grad, _ = _reference(logits[:, :keep], q, weight[:keep], 0.7, lt, gamma, 0.0, mode)
            for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
                loss, grad, _ = cuda_emu.forward(logits, q_full, weight, _scale(torch.float32), lt, gamma, path=path,
                                                 threads_per_row=tpr, splits=splits, weight_mode=mode)
                assert (grad[:, keep:] == 0).all()
                _check(loss, grad[:, :keep], ref_loss, ref_grad, torch.float32, f"{lt} {mode} {path}")


@pytest.mark.parametrize("loss_type,gamma", [(SOFTMAX, 0.0), (SIGMOID, 0.0), (FOCAL, 0.5), (FOCAL, 1.7),
                                             (SOFTMAX_FOCAL, 2.0)])
def test_large_logits_stay_finite(loss_type, gamma):
    # Far beyond exp's range (|z| ~ 600): the row's shift, exp(-|z|) and the guarded terms keep everything finite.
    logits = _logits(8, 700, torch.float32, seed=11, scale=200.0)
    q = _targets(8, 700, seed=11)
    weight = _weight(700, 11)
    for mode in ("sample", "class"):
        ref_loss, ref_grad, _ = _reference(logits, q, weight, 0.7, loss_type, gamma, 0.0, mode)
        for path, tpr, splits in (("auto", 0, 0), ("stream", 32, 1), ("stream", 64, 2)):
            loss, grad, _ = cuda_emu.forward(logits, q, weight, _scale(torch.float32), loss_type, gamma, path=path,
                                             threads_per_row=tpr, splits=splits, weight_mode=mode)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            _check(loss, grad, ref_loss, ref_grad, torch.float32, f"{mode} {path} {splits}")


def test_nan_target_reaches_its_row_only_and_runs_repeat_bitwise():
    # No value checks on the GPU: a NaN target gives that row a NaN loss, never a silent 0; same inputs, same bits.
    logits = _logits(6, 300, torch.float32, seed=9)
    q = _targets(6, 300, seed=9).clone()
    q[2, 5] = float("nan")
    weight = _weight(300, 9)
    for lt in (SOFTMAX, SIGMOID, FOCAL, SOFTMAX_FOCAL):
        for mode in ("sample", "class"):
            for path, tpr, splits in (("auto", 0, 0), ("stream", 64, 2)):
                kw = dict(path=path, threads_per_row=tpr, splits=splits, weight_mode=mode)
                loss, grad, _ = cuda_emu.forward(logits, q, weight, _scale(torch.float32), lt, 1.7, **kw)
                assert torch.isnan(loss[2]) and not torch.isnan(loss[[0, 1, 3, 4, 5]]).any(), (lt, mode, path)
                again, grad_again, _ = cuda_emu.forward(logits, q, weight, _scale(torch.float32), lt, 1.7, **kw)
                assert torch.equal(loss[[0, 1, 3, 4, 5]], again[[0, 1, 3, 4, 5]])
                assert torch.equal(grad[[0, 1, 3, 4, 5]], grad_again[[0, 1, 3, 4, 5]])
