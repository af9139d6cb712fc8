"""Dense targets (SPEC section 9: soft / mixup / multi-label rows, weight modes) through the public API on the CPU
backends, against the float64 reference, against code nobody here wrote, and bad input. Triton:
tests/test_triton_dense.py; CUDA (emulated): tests/test_cuda_emulated_dense.py; the compiled CPU kernel's own
cases (bits of one-hot rows, extreme logits): tests/test_cpu_dense.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_dense, make_inputs, run_loss

import cbkernels as cb

CPU_BACKENDS = [b for b in cb.available_backends() if b in ("torch", "cpu")]
MODES = ("sample", "class")


def _fn(loss_type, backend, w, **opts):
    def fn(z, t, **kw):
        g = {"gamma": 0.5} if "focal" in loss_type else {}
        return cb.class_balanced_loss(z, t, loss_type=loss_type, weight=w, backend=backend, **{**g, **opts}, **kw)

    return fn


def _ref_kw(loss_type, reduction, **opts):
    return dict(loss_type=loss_type, gamma=0.5, reduction=reduction, **opts)


def _weight(c, seed=0):
    counts = torch.randint(1, 5000, (c,), generator=torch.Generator().manual_seed(seed))
    return cb.class_balanced_weights(counts, beta=0.99)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(5, 1), (7, 2), (33, 423)])
def test_matches_reference(backend, loss_type, mode, reduction, dtype, shape):
    logits, _, _ = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    q = make_dense(*shape, "mixed", seed=shape[1])
    w = _weight(shape[1])
    loss, grad = run_loss(_fn(loss_type, backend, w, weight_mode=mode), logits, q, reduction=reduction)
    assert grad.dtype == dtype and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches(loss, grad, logits, q, w, **_ref_kw(loss_type, reduction, weight_mode=mode))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,kind", [((256, 8142), "mixup"), ((1024, 1000), "timm"), ((64, 1000), "multihot")])
def test_realistic(backend, loss_type, mode, shape, kind):
    if kind == "multihot" and loss_type.startswith("softmax"):
        kind = "soft"
    logits, _, _ = make_inputs(*shape, seed=3)
    q = make_dense(*shape, kind, seed=4)
    w = _weight(shape[1], seed=5)
    loss, grad = run_loss(_fn(loss_type, backend, w, weight_mode=mode), logits, q, reduction="mean")
    assert_matches(loss, grad, logits, q, w, **_ref_kw(loss_type, "mean", weight_mode=mode))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transforms_label_smoothing_and_z_loss(backend, loss_type, dtype):
    """Every transform with dense targets (the margin is m_j q_ij), label smoothing and the z-loss."""
    n, c = 37, 423
    logits, _, _ = make_inputs(n, c, dtype=dtype, seed=6)
    q = make_dense(n, c, "mixed", seed=7)
    w = _weight(c, seed=8)
    g = torch.Generator().manual_seed(9)
    opts = dict(softcap=4.0, logit_offset=torch.randn(c, generator=g), target_margin=torch.rand(c, generator=g),
                logit_scale=1.7)
    if loss_type.startswith("softmax"):
        opts["z_loss"] = 0.05
    if loss_type == "softmax":
        opts["label_smoothing"] = 0.1
    for mode in MODES:
        loss, grad = run_loss(_fn(loss_type, backend, w, weight_mode=mode, **opts), logits, q, reduction="sum")
        assert_matches(loss, grad, logits, q, w, **_ref_kw(loss_type, "sum", weight_mode=mode, **opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_hot_rows_equal_index_targets(backend, loss_type, reduction):
    """Index targets are the special case q = one-hot (SPEC section 9): the same values (tolerance here; the
    compiled CPU backend's bit-for-bit equality is tests/test_cpu_dense.py's)."""
    logits, target, _ = make_inputs(40, 423, seed=10, ignore_frac=0.0)
    q = F.one_hot(target, 423).float()
    w = _weight(423, seed=11)
    fn = _fn(loss_type, backend, w)
    l_idx, g_idx = run_loss(fn, logits, target, reduction=reduction)
    l_dense, g_dense = run_loss(fn, logits, q, reduction=reduction)
    torch.testing.assert_close(l_dense, l_idx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_dense, g_idx, rtol=0, atol=1e-6 * g_idx.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inplace_equals_out_of_place(backend, loss_type):
    logits, _, _ = make_inputs(20, 100, seed=12)
    q = make_dense(20, 100, "mixed", seed=13)
    w = _weight(100)
    a = logits.clone().requires_grad_()
    la = cb.class_balanced_loss(a, q, loss_type=loss_type, weight=w, backend=backend)
    la.backward()
    b = logits.clone().requires_grad_()
    lb = cb.class_balanced_loss(b * 1, q, loss_type=loss_type, weight=w, backend=backend, inplace_backward=True)
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(backend, loss_type, mode):
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = make_dense(4, 3, "soft" if loss_type.startswith("softmax") else "mixed", seed=14, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ls = 0.1 if loss_type == "softmax" else 0.0
    for reduction in ("none", "weighted_mean"):
        assert torch.autograd.gradcheck(
            lambda x: cb.class_balanced_loss(x, q, loss_type=loss_type, weight=w, gamma=1.5, backend=backend,
                                             weight_mode=mode, reduction=reduction, label_smoothing=ls),
            (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dense_target_dtypes_and_strides(backend):
    """bf16/fp16/float64 targets with float32 logits, float32 targets with bf16 logits, column-strided targets."""
    logits, _, _ = make_inputs(9, 50, seed=15)
    q = make_dense(9, 50, "timm", seed=16)
    w = _weight(50)
    fn = _fn("softmax", backend, w)
    for tq in (q.bfloat16(), q.half(), q.double()):
        loss, grad = run_loss(fn, logits, tq)
        assert_matches(loss, grad, logits, tq.double(), w, **_ref_kw("softmax", "mean"))
    loss, grad = run_loss(fn, logits.bfloat16(), q)
    assert_matches(loss, grad, logits.bfloat16(), q, w, **_ref_kw("softmax", "mean"))
    strided = q.t().contiguous().t()
    assert not strided.is_contiguous()
    loss, grad = run_loss(fn, logits, strided)
    assert_matches(loss, grad, logits, q, w, **_ref_kw("softmax", "mean"))
    # [..., C] logits with leading dims
    loss, grad = run_loss(fn, logits.reshape(3, 3, 50), q.reshape(3, 3, 50), reduction="none")
    assert loss.shape == (3, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_against_code_nobody_here_wrote(backend):
    """``F.cross_entropy`` with probability targets and ``weight=`` (class mode), with class indices and label
    smoothing (class mode, weighted_mean), ``F.binary_cross_entropy_with_logits`` with dense targets, and
    torchvision's soft-target sigmoid focal loss."""
    n, c = 64, 37
    logits, target, _ = make_inputs(n, c, seed=17, ignore_frac=0.2)
    q = make_dense(n, c, "timm", seed=18)
    w = _weight(c, seed=19)
    z = logits.double()
    ours = cb.class_balanced_loss(logits, q, loss_type="softmax", weight=w, weight_mode="class", reduction="sum",
                                  backend=backend)
    torch.testing.assert_close(ours.double(), F.cross_entropy(z, q.double(), weight=w.double(), reduction="sum"),
                               rtol=1e-5, atol=0)
    for eps in (0.0, 0.1):
        ours = cb.class_balanced_loss(logits, target, loss_type="softmax", weight=w, weight_mode="class",
                                      reduction="weighted_mean", label_smoothing=eps, backend=backend)
        theirs = F.cross_entropy(z, target, weight=w.double(), label_smoothing=eps)
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=0)
    hot = make_dense(n, c, "multihot", seed=20)
    ours = cb.class_balanced_loss(logits, hot, loss_type="sigmoid", weight=w, weight_mode="class", reduction="sum",
                                  backend=backend)
    theirs = F.binary_cross_entropy_with_logits(z, hot.double(), weight=w.double(), reduction="sum")
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=0)
    soft = make_dense(n, c, "soft", seed=21)
    for gamma in (0.0, 0.5, 2.0):
        # torchvision.ops.sigmoid_focal_loss with alpha=-1 (no alpha), written as torchvision writes it
        p = torch.sigmoid(z)
        ce = F.binary_cross_entropy_with_logits(z, soft.double(), reduction="none")
        p_t = p * soft.double() + (1 - p) * (1 - soft.double())
        theirs = (ce * ((1 - p_t) ** gamma)).sum(1)
        a = (soft.double() @ w.double()) / soft.double().sum(1)
        ours = cb.class_balanced_loss(logits, soft, loss_type="focal", gamma=gamma, weight=w, reduction="none",
                                      backend=backend)
        torch.testing.assert_close(ours.double(), a * theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sample_weights_as_spec_says(backend):
    """mixup of A and B with lambda: lambda w_A + (1 - lambda) w_B; multi-hot: the positives' mean weight; a row
    without mass: 1; weighted_mean divides by their sum in both modes; ignore_index does not apply."""
    c = 4
    w = torch.tensor([1.0, 2.0, 4.0, 8.0])
    z = torch.zeros(3, c)
    q = torch.tensor([[0.25, 0.0, 0.75, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    per_row = cb.class_balanced_loss(z, q, loss_type="sigmoid", weight=w, reduction="none", backend=backend,
                                     ignore_index=0)
    plain = cb.class_balanced_loss(z, q, loss_type="sigmoid", reduction="none", backend=backend)
    torch.testing.assert_close(per_row / plain, torch.tensor([0.25 + 3.0, 5.0, 1.0]))
    for mode in MODES:
        total = cb.class_balanced_loss(z, q, loss_type="sigmoid", weight=w, reduction="sum", backend=backend,
                                       weight_mode=mode)
        wm = cb.class_balanced_loss(z, q, loss_type="sigmoid", weight=w, reduction="weighted_mean", backend=backend,
                                    weight_mode=mode)
        mean = cb.class_balanced_loss(z, q, loss_type="sigmoid", weight=w, reduction="mean", backend=backend,
                                      weight_mode=mode)
        torch.testing.assert_close(wm, total / (3.25 + 5.0 + 1.0))
        torch.testing.assert_close(mean, total / 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits_stay_finite(backend, loss_type):
    z = torch.tensor([[1e4, -1e4, 0.0, 30.0], [-90.0, 90.0, 1e-3, -1e-3]], requires_grad=True)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    for gamma in (0.0, 0.5, 1.0, 2.0, 1.7):
        kw = {"gamma": gamma} if "focal" in loss_type else {}
        loss = cb.class_balanced_loss(z, q, loss_type=loss_type, backend=backend, reduction="sum", **kw)
        (g,) = torch.autograd.grad(loss, z)
        ref = cb.reference.reference_loss(z.detach().double().requires_grad_(), q.double(), loss_type=loss_type,
                                          reduction="sum", **kw)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    backend = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    logits, _, _ = make_inputs(16, 40, seed=22)
    q = make_dense(16, 40, "mixup", seed=23)
    w = _weight(40)

    def step(z, t):
        return cb.class_balanced_loss(z, t, loss_type="softmax", weight=w, backend=backend, weight_mode="class")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    la, lb = step(a, q), compiled(b, q)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_and_linear_loss(backend):
    c, h = 30, 16
    counts = torch.randint(1, 500, (c,), generator=torch.Generator().manual_seed(24))
    hidden = torch.randn(12, h)
    lm = torch.randn(c, h) * 0.3
    q = make_dense(12, c, "timm", seed=25)
    for mode in MODES:
        crit = cb.ClassBalancedLoss(counts, loss_type="softmax_focal", gamma=1.0, backend=backend, weight_mode=mode)
        assert ("weight_mode='class'" in repr(crit)) == (mode == "class")
        direct = cb.class_balanced_loss(hidden @ lm.T, q, counts, loss_type="softmax_focal", gamma=1.0,
                                        backend=backend, weight_mode=mode)
        torch.testing.assert_close(crit(hidden @ lm.T, q), direct)
        lin = cb.linear_cb_loss(hidden, lm, q, counts, loss_type="softmax_focal", gamma=1.0, backend=backend,
                                weight_mode=mode, chunk_size=5, reduction="weighted_mean")
        ref = cb.class_balanced_loss(hidden @ lm.T, q, counts, loss_type="softmax_focal", gamma=1.0,
                                     backend=backend, weight_mode=mode, reduction="weighted_mean")
        torch.testing.assert_close(lin, ref)
        crit = cb.LinearClassBalancedLoss(counts, loss_type="focal", backend=backend, weight_mode=mode, chunk_size=5)
        torch.testing.assert_close(crit(hidden, lm, q),
                                   cb.class_balanced_loss(hidden @ lm.T, q, counts, loss_type="focal",
                                                          backend=backend, weight_mode=mode))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_index_targets_in_class_mode(backend):
    """Class indices under weight_mode='class' (ignored rows count for nothing), every loss."""
    logits, target, counts = make_inputs(30, 20, seed=26, ignore_frac=0.3)
    w = cb.class_balanced_weights(counts, beta=0.99)
    for loss_type in LOSS_TYPES:
        extra = {"label_smoothing": 0.2} if loss_type == "softmax" else {}
        for reduction in REDUCTIONS:
            loss, grad = run_loss(_fn(loss_type, backend, w, weight_mode="class", **extra), logits, target,
                                  reduction=reduction)
            assert_matches(loss, grad, logits, target, w,
                           **_ref_kw(loss_type, reduction, weight_mode="class", **extra))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_dense_targets(backend):
    logits = torch.randn(4, 5)
    q = torch.full((4, 5), 0.2)
    fn = dict(backend=backend)
    with pytest.raises(ValueError, match="target.*shape"):
        cb.class_balanced_loss(logits, q[:, :4], **fn)
    with pytest.raises(ValueError, match="target.*shape"):
        cb.class_balanced_loss(logits, q[:3], **fn)
    with pytest.raises(TypeError, match="target"):
        cb.class_balanced_loss(logits, q.to(torch.complex64), **fn)
    with pytest.raises(ValueError, match="weight_mode"):
        cb.class_balanced_loss(logits, q, weight_mode="row", **fn)
    with pytest.raises(ValueError, match="requires grad"):
        cb.class_balanced_loss(logits, q.clone().requires_grad_(), **fn)
    for loss_type in LOSS_TYPES:
        for bad, why in ((-0.1, "negative"), (math.nan, "NaN"), (math.inf, "infinite|above 1")):
            qb = q.clone()
            qb[2, 3] = bad
            with pytest.raises(ValueError, match=f"target.*{why}"):
                cb.class_balanced_loss(logits, qb, loss_type=loss_type, **fn)
        qb = q.clone()
        qb[1, 1] = 1.5
        if loss_type in ("sigmoid", "focal"):
            with pytest.raises(ValueError, match="target.*above 1"):
                cb.class_balanced_loss(logits, qb, loss_type=loss_type, **fn)
        else:  # a softmax target need not sum to 1 (torch's rule for probability targets)
            assert torch.isfinite(cb.class_balanced_loss(logits, qb, loss_type=loss_type, **fn))
    # the logits are never written on a failed call
    z = logits.clone()
    qb = q.clone()
    qb[0, 0] = -1.0
    with pytest.raises(ValueError):
        cb.class_balanced_loss(z.requires_grad_(), qb, inplace_backward=True, **fn)
    assert torch.equal(z.detach(), logits)
