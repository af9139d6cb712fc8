"""Triton backend: the logit transforms (SPEC section 10) and the z-loss (SPEC section 11) against the float64
reference, on every path (single tile, loop, split), every dtype and reduction, in place, and bit for bit equal to
the transform-free kernels when a transform changes nothing.

Interpreter tests, as in tests/test_triton.py (whose ``test_interpreter_suite`` runs them in a child process with
``TRITON_INTERPRET=1``; ``TRITON_INTERPRET=1 pytest tests/test_triton_transforms.py`` runs them directly). Small
shapes: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_inputs, run_loss

import cbkernels as cb
from cbkernels.reference import reference_loss

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from test_triton import device_arithmetic, force_loop, force_split  # noqa: E402, F401  (a fixture, used by name)

from cbkernels import _triton as T  # noqa: E402  (needs triton)
from cbkernels._triton_kernels import _tanh_sech2  # noqa: E402

cpu = pytest.mark.triton_interpreter
# The interpreter evaluates both sides of every tl.where: log(0) and 0/0 in the branch not taken are expected.
pytestmark = [cpu, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

SOFTMAX_LOSSES = ("softmax", "softmax_focal")
PATHS = ("single", "loop", "split")
# One transform at a time, then all of them (z-loss: softmax losses only).
TRANSFORMS = ("softcap", "offset", "margin", "scale", "z_loss", "all")
SHAPES = {"single": (12, 37), "loop": (9, 150), "split": (5, 150)}


def transform_kw(which: str, c: int, loss_type: str, seed: int = 0) -> dict:
    """Options of one transform (or ``"all"``): softcap near the logits' size (make_inputs: 3 * randn), offsets of a
    logit adjustment's size, LDAM-like positive margins."""
    g = torch.Generator().manual_seed(100 + seed)
    kw = {}
    if which in ("softcap", "all"):
        kw["softcap"] = 4.0
    if which in ("offset", "all"):
        kw["logit_offset"] = torch.randn(c, generator=g) * 0.7
    if which in ("margin", "all"):
        kw["target_margin"] = torch.rand(c, generator=g) * 1.5
    if which in ("scale", "all"):
        kw["logit_scale"] = 1.7
    if which in ("z_loss", "all") and loss_type in SOFTMAX_LOSSES:
        kw["z_loss"] = 0.05
    return kw


def set_path(monkeypatch, path: str) -> None:
    if path != "single":
        (force_split if path == "split" else force_loop)(monkeypatch)


def check(z, target, weight, **kw):
    loss, grad = run_loss(cb.class_balanced_loss, z, target, weight=weight, backend="triton", **kw)
    kw.pop("inplace_backward", None)
    assert_matches(loss, grad, z, target, weight, **kw)
    return loss, grad


def inputs(n, c, dtype=torch.float32, seed=0, **kw):
    z, target, counts = make_inputs(n, c, dtype, seed=seed, **kw)
    return z, target, cb.class_balanced_weights(counts, beta=0.999)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type,which", [(lt, w) for lt in LOSS_TYPES for w in TRANSFORMS
                                             if w != "z_loss" or lt in SOFTMAX_LOSSES])  # z-loss: softmax only
def test_matches_reference(monkeypatch, loss_type, which, path):
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    if path == "split":
        assert T.plan_launch(n, c, 4, T.INTERPRET_SM_COUNT).splits > 1
    # Every reduction across the cases, and label smoothing with the transforms.
    reduction = REDUCTIONS[(LOSS_TYPES.index(loss_type) + TRANSFORMS.index(which) + PATHS.index(path)) % 4]
    extra = {"label_smoothing": 0.1} if loss_type == "softmax" and which in ("all", "margin") else {}
    z, target, weight = inputs(n, c, seed=TRANSFORMS.index(which))
    check(z, target, weight, loss_type=loss_type, gamma=1.7, reduction=reduction,
          **transform_kw(which, c, loss_type), **extra)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dtypes(monkeypatch, loss_type, dtype):
    z, target, weight = inputs(10, 37, dtype, seed=1)
    check(z, target, weight, loss_type=loss_type, gamma=0.5, reduction="none",
          **transform_kw("all", 37, loss_type, seed=1))
    force_split(monkeypatch)
    z, target, weight = inputs(3, 150, dtype, seed=2)
    check(z, target, weight, loss_type=loss_type, gamma=0.5, reduction="sum",
          **transform_kw("all", 150, loss_type, seed=2))


@pytest.mark.parametrize("loss_type", ["focal", "softmax_focal"])
def test_gamma_cases(loss_type):
    z, target, weight = inputs(8, 29, seed=3)
    for gamma in (0.0, 0.5, 1.0, 2.0):
        check(z, target, weight, loss_type=loss_type, gamma=gamma, reduction="sum",
              **transform_kw("all", 29, loss_type, seed=3))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inplace(monkeypatch, loss_type, path):
    """The softcap's factor needs the raw logit when the gradient is stored over it: every path (the split path's
    finish kernel too) reads a tile before it overwrites it. In place and out of place give the same bits."""
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    z, target, weight = inputs(n, c, torch.bfloat16, seed=4)
    kw = dict(loss_type=loss_type, gamma=2.0, reduction="mean", **transform_kw("all", c, loss_type, seed=4))
    loss, grad = check(z, target, weight, inplace_backward=True, **kw)
    ref_loss, ref_grad = run_loss(cb.class_balanced_loss, z, target, weight=weight, backend="triton", **kw)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    buf = z.clone().requires_grad_(True)
    cb.class_balanced_loss(buf, target, weight=weight, backend="triton", inplace_backward=True, **kw).backward()
    assert buf.grad.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_softcap_large_logits(monkeypatch, loss_type, path):
    """|z| ~ 1e3 under a softcap: tanh saturates to +-1 and sech^2 to (about) 0 without NaN or inf; tiny logits keep
    tanh's full relative precision."""
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    z, target, weight = inputs(n, c, seed=5)
    z[0] *= 300.0
    z[1] = 1e3
    z[2, ::2] = -1e3
    z[3] *= 1e-6
    kw = dict(loss_type=loss_type, gamma=0.5, reduction="none", softcap=15.0)
    if loss_type in SOFTMAX_LOSSES:
        kw["z_loss"] = 1e-3
    loss, grad = check(z, target, weight, **kw)
    assert loss.isfinite().all() and grad.isfinite().all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
def test_z_rows(monkeypatch, loss_type, path):
    """return_z_loss: the z-loss part of the loss under each reduction (the op fills z_rows per row: 0 for ignored
    rows), equal to the reference's; 0 when z_loss is 0."""
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    z, target, weight = inputs(n, c, seed=6, ignore_frac=0.4)
    assert (target == -100).any()
    tf = transform_kw("all", c, loss_type, seed=6)
    for reduction in REDUCTIONS:
        kw = dict(loss_type=loss_type, reduction=reduction, gamma=1.7, **tf)
        loss, z_term = cb.class_balanced_loss(z, target, weight=weight, backend="triton", return_z_loss=True, **kw)
        ref_loss, ref_z = reference_loss(z.double(), target, weight.double(), return_z_loss=True, **kw)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z_term.double(), ref_z, rtol=1e-5, atol=1e-7)
        if reduction == "none":
            assert (z_term[target == -100] == 0).all() and (z_term[target != -100] > 0).all()
            # The z-loss is in the loss, unweighted: the rest is the weighted loss without it.
            no_z = cb.class_balanced_loss(z, target, weight=weight, backend="triton", **{**kw, "z_loss": 0.0})
            torch.testing.assert_close(loss - z_term, no_z, rtol=1e-5, atol=1e-5)
    zero = cb.class_balanced_loss(z, target, weight=weight, backend="triton", return_z_loss=True,
                                  loss_type=loss_type, reduction="none", **{**tf, "z_loss": 0.0})[1]
    assert zero.shape == (n,) and not zero.any()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_rows_ignored(loss_type):
    z, target, weight = inputs(6, 9, seed=7, ignore_frac=1.0)
    kw = dict(loss_type=loss_type, reduction="sum", **transform_kw("all", 9, loss_type))
    loss, grad = check(z, target, weight, **kw)
    assert loss.item() == 0.0 and not grad.any()
    if loss_type in SOFTMAX_LOSSES:
        rows = cb.class_balanced_loss(z, target, weight=weight, backend="triton", return_z_loss=True,
                                      **{**kw, "reduction": "none"})[1]
        assert not rows.any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_identity_transforms_change_no_bit(monkeypatch, loss_type, dtype, path):
    """Zero offsets and margins (HAS_OFFSET / HAS_MARGIN on, adding 0), z_loss 0 with z_rows asked for, and
    logit_scale 1 give exactly the transform-free kernels' bits (signs of zeros included), on every path."""
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    z, target, weight = inputs(n, c, dtype, seed=8)
    z[0, :5] = 0.0
    z[1, :5] = -0.0
    weight[target[2].clamp(min=0)] = 0.0  # a row with a_i = 0: gradients of 0 keep their sign
    kw = dict(loss_type=loss_type, gamma=1.7, reduction="none", backend="triton",
              label_smoothing=0.1 if loss_type == "softmax" else 0.0)
    plain = run_loss(cb.class_balanced_loss, z, target, weight=weight, **kw)
    zeros = torch.zeros(c)
    same = run_loss(cb.class_balanced_loss, z, target, weight=weight, logit_offset=zeros, target_margin=zeros,
                    logit_scale=1.0, softcap=None, **kw)
    for a, b in zip(plain, same):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
    if loss_type in SOFTMAX_LOSSES:
        with_rows = run_loss(lambda x, t, **k: cb.class_balanced_loss(x, t, **k)[0], z, target, weight=weight,
                             z_loss=0.0, return_z_loss=True, **kw)
        for a, b in zip(plain, with_rows):
            assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    z, target, weight = inputs(3, 5, torch.float64, seed=9, ignore_frac=0.3)
    tf = transform_kw("all", 5, loss_type, seed=9)
    tf["softcap"] = 2.0

    def fn(x):
        return cb.class_balanced_loss(x, target, weight=weight, loss_type=loss_type, gamma=1.7, reduction="mean",
                                      backend="triton", **tf)

    assert torch.autograd.gradcheck(fn, (z.requires_grad_(True),))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gpu_arithmetic_within_tolerance(monkeypatch, device_arithmetic, loss_type):  # noqa: F811 (fixture)
    """With the GPU's float32 primitives at their worst (tests/test_triton.py's model) every transform stays within
    SPEC 6's float32 tolerances: the softcap's tanh and sech^2 use _exp and the approximate reciprocal."""
    kw = dict(loss_type=loss_type, gamma=0.5, reduction="none", **transform_kw("all", 150, loss_type, seed=10))
    z, target, weight = inputs(6, 150, seed=10)
    z[0] *= 1e-3  # tanh's series branch
    check(z, target, weight, **kw)
    force_split(monkeypatch)
    check(z[:4], target[:4], weight, **kw)
    assert sum(device_arithmetic.values()) > 0


@triton.jit
def _tanh_sech2_kernel(x_ptr, t_ptr, d_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    t, d = _tanh_sech2(x)
    tl.store(t_ptr + tl.arange(0, N), t)
    tl.store(d_ptr + tl.arange(0, N), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_sech2_accuracy(dtype):
    """tanh to a few ulp relative everywhere (tiny |x| included, where (1 - e) / (1 + e) loses every digit) and
    sech^2 relative too where tanh rounds to 1; signs, +-inf and NaN."""
    mag = torch.cat([10.0 ** torch.linspace(-30, 2.5, 400, dtype=torch.float64),
                     torch.linspace(0.5, 0.6, 101, dtype=torch.float64)])
    x = torch.cat([mag, -mag, torch.tensor([0.0, float("inf"), -float("inf"), float("nan")], dtype=torch.float64)])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel(), dtype=torch.float64)]).to(dtype)
    t, d = torch.empty_like(x), torch.empty_like(x)
    _tanh_sech2_kernel[(1,)](x, t, d, n)
    xd = x.double()
    ref_t = torch.tanh(xd)
    ref_d = 1.0 / torch.cosh(xd) ** 2
    ulp = torch.finfo(dtype).eps / 2
    finite = xd.isfinite()
    rel_t = ((t.double() - ref_t).abs() / ref_t.abs().clamp(min=1e-300))[finite & (xd != 0)]
    assert rel_t.max() <= 4 * ulp, rel_t.max() / ulp
    tiny = torch.finfo(dtype).tiny
    normal = finite & (ref_d > tiny / ulp)
    rel_d = ((d.double() - ref_d).abs() / ref_d)[normal]
    assert rel_d.max() <= 8 * ulp, rel_d.max() / ulp
    assert t[xd == float("inf")].item() == 1.0 and t[xd == -float("inf")].item() == -1.0
    assert (d[xd.abs() == float("inf")] == 0).all()
    assert t[xd.isnan()].isnan().all() and d[xd.isnan()].isnan().all()
    nonzero = finite & (xd != 0)
    assert torch.equal(t[nonzero].signbit(), x[nonzero].signbit())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("path", PATHS)
def test_ignored_rows_with_nonfinite_logits_get_zero_gradient(monkeypatch, loss_type, path):
    # The kernels read ignored rows too: a NaN, +inf or all -inf row there must still give loss 0 and gradient 0
    # with a softcap (whose factor is NaN there) and a z-loss (whose p is NaN there).
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, c, generator=g)
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")
    logits[3, 0] = float("inf")
    target = torch.randint(0, c, (n,), generator=g)
    target[1:4] = -100
    z = logits.clone().requires_grad_(True)
    kw = transform_kw("all", c, loss_type)
    loss = cb.class_balanced_loss(z, target, loss_type=loss_type, backend="triton", reduction="none", **kw)
    loss.sum().backward()
    assert torch.equal(loss[1:4].detach(), torch.zeros(3))
    assert torch.equal(z.grad[1:4], torch.zeros(3, c))
    keep = torch.ones(n, dtype=torch.bool)
    keep[1:4] = False
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(z.grad[keep]).all()


@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
@pytest.mark.parametrize("path", PATHS)
def test_positive_margin_times_scale_beyond_exp_range(monkeypatch, loss_type, path):
    set_path(monkeypatch, path)
    n, c = SHAPES[path]
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    logits[torch.arange(n), target] = 10.0  # confident targets, the row max by far
    margin = torch.full((c,), 3.0)
    kw = dict(target_margin=margin, logit_scale=30.0, z_loss=1e-3)
    loss, grad = run_loss(lambda z, t, **k: cb.class_balanced_loss(z, t, loss_type=loss_type, backend="triton",
                                                                    **kw, **k), logits, target, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_matches(loss, grad, logits, target, None, loss_type=loss_type, gamma=0.5, reduction="none", **kw)
