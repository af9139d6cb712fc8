"""Dense targets (SPEC section 9) in the compiled CPU kernel: what is specific to its row code. One-hot rows take the
index-target code (the same bits), every other row the dense rows (per focal exponent kind, the sparse and the SIMD
softmax-focal paths, each target storage type), and the kernel's own scan checks the values. The public API's cases
over every CPU backend are tests/test_dense_targets.py's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_dense, make_inputs, run_loss

import cbkernels as cb

pytestmark = pytest.mark.skipif("cpu" not in cb.available_backends(), reason="C++ extension not built")

LOSS_IDS = {"softmax": 0, "sigmoid": 1, "focal": 2, "softmax_focal": 3}
SOFTMAX_LOSSES = ("softmax", "softmax_focal")
MODES = {"sample": 0, "class": 1}


def _op(z, t, w, loss_type, *, gamma=0.5, eps=0.0, reduction="none", mode="sample", grad=True, **tf):
    from cbkernels import _ops  # noqa: F401  (registers the ops)

    return torch.ops.cbkernels.cb_loss_fwd.default(z, t, w, None, LOSS_IDS[loss_type], gamma, eps, -100, grad,
                                                   reduction=reduction, weight_mode=MODES[mode], **tf)


def _weight(c, seed=0):
    counts = torch.randint(1, 5000, (c,), generator=torch.Generator().manual_seed(seed))
    return cb.class_balanced_weights(counts, beta=0.99)


def _transforms(loss_type, c, seed=0):
    """Every transform (and the z-loss for the softmax losses), as the op's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    tf = dict(softcap=4.0, logit_offset=torch.randn(c, generator=g),
              target_margin=torch.rand(c, generator=g) * 0.8 - 0.2, logit_scale=1.7)
    if loss_type in SOFTMAX_LOSSES:
        tf["z_loss"] = 0.05
    return tf


def _ref_transforms(tf):
    return {**tf, "softcap": tf.get("softcap") or None}


def _fn(loss_type, w, **opts):
    def fn(z, t, **kw):
        return cb.class_balanced_loss(z, t, loss_type=loss_type, weight=w, backend="cpu", **opts, **kw)

    return fn


def _gammas(loss_type):
    return (0.0, 0.5, 1.0, 2.0, 1.7) if "focal" in loss_type else (0.0,)


# --- one-hot rows: the index-target code, bit for bit ----------------------------------------------------------


def _one_hot_cases():
    cases = [(lt, "sample", 0.0) for lt in LOSS_TYPES] + [("softmax", "sample", 0.1)]
    return cases + [(lt, "class", 0.0) for lt in SOFTMAX_LOSSES]


@pytest.mark.parametrize("loss_type,mode,eps", _one_hot_cases())
@pytest.mark.parametrize("transformed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_one_hot_rows_are_index_rows_bitwise(loss_type, mode, eps, transformed, dtype):
    n, c = 24, 423
    logits, target, _ = make_inputs(n, c, dtype=dtype, seed=1, ignore_frac=0.0)
    w = _weight(c, seed=2)
    tf = _transforms(loss_type, c, seed=3) if transformed else {}
    for gamma in _gammas(loss_type):
        for q_dtype in {dtype, torch.float32}:
            q = F.one_hot(target, c).to(q_dtype)
            for reduction in ("none", "weighted_mean"):
                kw = dict(gamma=gamma, eps=eps, reduction=reduction, **tf)
                index = _op(logits, target, w, loss_type, **kw)
                dense = _op(logits, q, w, loss_type, mode=mode, **kw)
                assert torch.equal(dense[0], index[0]) and torch.equal(dense[1], index[1]), (gamma, q_dtype, reduction)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_rows_among_soft_rows(loss_type, dtype):
    """In a mixed batch the one-hot rows still give the index rows' bits, the others match the reference."""
    n, c = 40, 300
    logits, target, _ = make_inputs(n, c, dtype=dtype, seed=4, ignore_frac=0.0)
    w = _weight(c, seed=5)
    q = make_dense(n, c, "mixed", seed=6)
    hot = (q == 1).sum(1).eq(1) & (q != 0).sum(1).eq(1)
    target = torch.where(hot, q.argmax(1), target)
    assert 4 <= int(hot.sum()) < n
    tf = _transforms(loss_type, c, seed=7)
    gamma = 1.7 if "focal" in loss_type else 0.0
    index_loss, index_grad = _op(logits, target, w, loss_type, gamma=gamma, **tf)
    loss, grad = _op(logits, q, w, loss_type, gamma=gamma, **tf)
    assert torch.equal(loss[hot], index_loss[hot]) and torch.equal(grad[hot], index_grad[hot])
    # the other rows, through the public API, against the float64 reference
    ref_tf = _ref_transforms(tf)
    loss, grad = run_loss(_fn(loss_type, w, gamma=gamma, **ref_tf), logits, q, reduction="none")
    assert_matches(loss, grad, logits, q, w, loss_type=loss_type, gamma=gamma, reduction="none", **ref_tf)


# --- dense rows against the float64 reference --------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,kind", [((6, 1), "mixed"), ((10, 2), "mixed"), ((30, 423), "mixup"),
                                        ((30, 423), "timm"), ((30, 423), "mixed"), ((4, 8142), "mixup"),
                                        ((4, 8142), "timm")])
def test_every_gamma_and_target_kind(loss_type, mode, shape, kind):
    """Each focal exponent kind (0, 1/2, 1, 2 and a general one); softmax focal's sparse path (mixup: two nonzeros)
    and its SIMD pass (timm, soft and multi-hot rows); C = 1 and 2; a vocabulary-sized row."""
    logits, _, _ = make_inputs(*shape, seed=8)
    q = make_dense(*shape, kind, seed=9)
    w = _weight(shape[1], seed=10)
    large = shape[1] > 1000  # the float64 oracle's time: one general exponent and one reduction there
    for gamma in (1.7,) if large and "focal" in loss_type else _gammas(loss_type):
        for reduction in ("none",) if large else ("none", "weighted_mean"):
            loss, grad = run_loss(_fn(loss_type, w, gamma=gamma, weight_mode=mode), logits, q, reduction=reduction)
            assert_matches(loss, grad, logits, q, w, loss_type=loss_type, gamma=gamma, reduction=reduction,
                           weight_mode=mode)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_transforms_smoothing_and_every_reduction(loss_type, dtype, reduction):
    n, c = 25, 129
    logits, _, _ = make_inputs(n, c, dtype=dtype, seed=11)
    q = make_dense(n, c, "mixed", seed=12)
    w = _weight(c, seed=13)
    tf = _ref_transforms(_transforms(loss_type, c, seed=14))
    eps = {"label_smoothing": 0.1} if loss_type == "softmax" else {}
    for mode in MODES:
        loss, grad = run_loss(_fn(loss_type, w, gamma=0.5, weight_mode=mode, **tf, **eps), logits, q,
                              reduction=reduction)
        assert_matches(loss, grad, logits, q, w, loss_type=loss_type, gamma=0.5, reduction=reduction,
                       weight_mode=mode, **tf, **eps)


def test_sparse_focal_threshold():
    """Softmax-focal rows with C/32 nonzeros (scalar per-column code) and with one more (the SIMD pass)."""
    n, c = 8, 448
    logits, _, _ = make_inputs(n, c, seed=15)
    g = torch.Generator().manual_seed(16)
    q = torch.zeros(n, c)
    for i in range(n):
        k = c // 32 + (i % 2)
        q[i, torch.randperm(c, generator=g)[:k]] = torch.rand(k, generator=g) + 0.1
    w = _weight(c, seed=17)
    for mode in MODES:
        for gamma in (0.5, 2.0, 1.7):
            tf = _ref_transforms(_transforms("softmax_focal", c, seed=18))
            loss, grad = run_loss(_fn("softmax_focal", w, gamma=gamma, weight_mode=mode, **tf), logits, q,
                                  reduction="none")
            assert_matches(loss, grad, logits, q, w, loss_type="softmax_focal", gamma=gamma, reduction="none",
                           weight_mode=mode, **tf)


@pytest.mark.parametrize("logits_dtype,q_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                                  (torch.float64, torch.float64), (torch.float64, torch.float32)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_target_storage_and_row_stride(logits_dtype, q_dtype, loss_type):
    """q in the logits' type or float32 (read in place, or converted by the scan), with a row stride > C."""
    n, c = 12, 70
    logits, _, _ = make_inputs(n, c, dtype=logits_dtype, seed=19)
    q = make_dense(n, c, "mixed", seed=20)
    w = _weight(c, seed=21)
    wide = torch.zeros(n, c + 9, dtype=q_dtype)
    wide[:, 3:c + 3] = q.to(q_dtype)
    strided = wide[:, 3:c + 3]
    assert strided.stride(0) == c + 9
    ref_q = q.to(q_dtype).double()
    for t in (q.to(q_dtype), strided):
        out = _op(logits, t, w, loss_type, gamma=0.5, reduction="sum")
        loss, grad = run_loss(_fn(loss_type, w, gamma=0.5), logits, t, reduction="sum")
        assert torch.equal(out[0], loss) and torch.equal(out[1], grad)
        assert_matches(loss, grad, logits, ref_q, w, loss_type=loss_type, gamma=0.5, reduction="sum")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits(loss_type):
    """|z| up to 1e4 with soft, multi-hot and zero rows: finite, and within float32's tolerance of the reference."""
    n, c = 20, 64
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(n, c, generator=g) * torch.tensor([1.0, 30.0, 1e3, 1e4]).repeat(n // 4)[:, None]
    q = make_dense(n, c, "mixed", seed=23)
    if loss_type in ("sigmoid", "focal"):
        q = q.clamp(max=1.0)
    w = _weight(c, seed=24)
    for gamma in _gammas(loss_type):
        for mode in MODES:
            loss, grad = run_loss(_fn(loss_type, w, gamma=gamma, weight_mode=mode), logits, q, reduction="none")
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert_matches(loss, grad, logits, q, w, loss_type=loss_type, gamma=gamma, reduction="none",
                           weight_mode=mode)


# --- the op's other outputs and modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_no_grad_and_thread_split_give_the_same_bits(loss_type, dtype):
    n, c = 160, 100  # 40 rows a task: four tasks on two threads
    logits, _, _ = make_inputs(n, c, dtype=dtype, seed=25)
    q = make_dense(n, c, "mixed", seed=26)
    w = _weight(c, seed=27)
    tf = _transforms(loss_type, c, seed=28)
    kw = dict(gamma=1.7, reduction="none", mode="class", **tf)
    loss, grad = _op(logits, q, w, loss_type, **kw)
    nograd, empty = _op(logits, q, w, loss_type, grad=False, **kw)
    assert torch.equal(nograd, loss) and empty.numel() == 0
    z = logits.clone()
    inplace = torch.ops.cbkernels.cb_loss_fwd_inplace.default(z, q, w, None, LOSS_IDS[loss_type], 1.7, 0.0, -100,
                                                              reduction="none", weight_mode=1, **tf)
    assert torch.equal(inplace, loss) and torch.equal(z, grad)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op(logits, q, w, loss_type, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], loss) and torch.equal(one[1], grad)


@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
def test_z_rows(loss_type):
    n, c = 15, 50
    logits, _, _ = make_inputs(n, c, seed=29)
    q = make_dense(n, c, "mixed", seed=30)
    tf = _transforms(loss_type, c, seed=31)
    z_rows = torch.empty(n)
    _op(logits, q, _weight(c), loss_type, z_rows=z_rows, **tf)
    z = tf["softcap"] * torch.tanh(logits.double() / tf["softcap"]) + tf["logit_offset"].double()
    z = (z - tf["target_margin"].double() * q.double()) * tf["logit_scale"]
    torch.testing.assert_close(z_rows.double(), tf["z_loss"] * torch.logsumexp(z, 1) ** 2, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_weighted_mean_divides_by_the_sample_weights(mode):
    c = 5
    w = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    q = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1.0, 0, 1.0, 1.0], [0, 0, 0, 0, 1.0]])
    logits = torch.randn(4, c)
    total = _op(logits, q, w, "sigmoid", reduction="sum", mode=mode)[0]
    weighted = _op(logits, q, w, "sigmoid", reduction="weighted_mean", mode=mode)
    mean = _op(logits, q, w, "sigmoid", reduction="mean", mode=mode)[0]
    a = torch.tensor([1.5, 1.0, 26.0 / 3, 16.0])
    torch.testing.assert_close(weighted[0], total / a.sum())
    torch.testing.assert_close(mean, total / 4)
    summed = _op(logits, q, w, "sigmoid", reduction="sum", mode=mode)[1]
    torch.testing.assert_close(weighted[1], summed / a.sum())


# --- value checks in the kernel's scan -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bad_values_raise(loss_type, dtype):
    n, c = 6, 9
    logits = torch.randn(n, c, dtype=dtype)
    q = torch.full((n, c), 0.1)
    w = torch.ones(c)
    sigmoid = loss_type in ("sigmoid", "focal")
    for bad, why in ((-0.5, "negative"), (math.nan, "NaN"), (math.inf, "above 1" if sigmoid else "infinite"),
                     (1.5, "above 1" if sigmoid else None)):
        qb = q.clone()
        qb[3, 7] = bad
        for q_dtype in {dtype, torch.float32}:
            if why is None:
                assert torch.isfinite(_op(logits, qb.to(q_dtype), w, loss_type, reduction="sum")[0])
                continue
            with pytest.raises(ValueError, match=rf"target holds .* at row 3, class 7: .*this one is {why}"):
                _op(logits, qb.to(q_dtype), w, loss_type)
            with pytest.raises(ValueError, match=why):
                _op(logits, qb.to(q_dtype), w, loss_type, reduction="weighted_mean")


def test_first_bad_row_wins_and_inplace_logits_stay():
    n, c = 400, 100  # ten tasks
    logits = torch.randn(n, c)
    q = torch.full((n, c), 0.01)
    q[350, 2] = -1.0
    q[120, 5] = math.nan
    q[260, 1] = -2.0
    w = torch.ones(c)
    for loss_type in LOSS_TYPES:
        with pytest.raises(ValueError, match="row 120, class 5"):
            _op(logits, q, w, loss_type)
        z = logits.clone()
        with pytest.raises(ValueError, match="row 120, class 5"):
            torch.ops.cbkernels.cb_loss_fwd_inplace.default(z, q, w, None, LOSS_IDS[loss_type], 0.5, 0.0, -100)
        assert torch.equal(z, logits)
