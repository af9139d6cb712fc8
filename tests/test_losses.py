"""Every backend that runs here against the float64 reference written from SPEC's formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_inputs, run_loss

import cbkernels as cb

# Triton is tested on CPU under its (slow) interpreter in tests/test_triton.py with small shapes.
CPU_BACKENDS = [b for b in cb.available_backends() if b in ("torch", "cpu")]
GAMMAS = (0.0, 0.5, 1.0, 2.0, 1.7)


def _loss_fn(loss_type, backend, w, gamma=0.5, label_smoothing=0.0):
    def fn(z, t, **kw):
        extra = {"gamma": gamma} if "focal" in loss_type else {}
        if loss_type == "softmax" and label_smoothing:
            extra["label_smoothing"] = label_smoothing
        return cb.class_balanced_loss(z, t, loss_type=loss_type, weight=w, backend=backend, **extra, **kw)

    return fn


def _ref_kw(loss_type, reduction, gamma=0.5, label_smoothing=0.0, ignore_index=-100):
    return dict(loss_type=loss_type, gamma=gamma, reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(256, 8142), (1024, 1000)])
def test_realistic_shapes_fp32(backend, loss_type, reduction, shape):
    logits, target, counts = make_inputs(*shape, seed=1)
    w = cb.class_balanced_weights(counts, beta=0.999)
    loss, grad = run_loss(_loss_fn(loss_type, backend, w), logits, target, reduction=reduction)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, reduction))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (7, 423), (3, 1025), (33, 7), (0, 5)])
def test_odd_shapes_dtypes(backend, loss_type, reduction, dtype, shape):
    logits, target, counts = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    w = cb.class_balanced_weights(counts, beta=0.99)
    loss, grad = run_loss(_loss_fn(loss_type, backend, w), logits, target, reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, reduction))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_half_dtypes_realistic(backend, dtype, loss_type):
    logits, target, counts = make_inputs(512, 1000, dtype=dtype, seed=3)
    w = cb.class_balanced_weights(counts, beta=0.999)
    loss, grad = run_loss(_loss_fn(loss_type, backend, w), logits, target, reduction="mean")
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, "mean"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", ["focal", "softmax_focal"])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gamma_cases(backend, loss_type, gamma, reduction):
    logits, target, counts = make_inputs(64, 423, seed=5, scale=6.0)
    w = cb.class_balanced_weights(counts, beta=0.9999)
    loss, grad = run_loss(_loss_fn(loss_type, backend, w, gamma=gamma), logits, target, reduction=reduction)
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, reduction, gamma=gamma))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eps", [0.1, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothing(backend, eps, reduction, dtype):
    logits, target, counts = make_inputs(48, 1025, dtype=dtype, seed=7)
    w = cb.class_balanced_weights(counts)
    loss, grad = run_loss(_loss_fn("softmax", backend, w, label_smoothing=eps), logits, target, reduction=reduction)
    assert_matches(loss, grad, logits, target, w, **_ref_kw("softmax", reduction, label_smoothing=eps))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_leading_dims_noncontiguous_int32(backend, loss_type):
    base, _, counts = make_inputs(6 * 5, 2 * 97, seed=11)
    # [6, 5, 97] logits that are a strided view (every other class column of a bigger buffer).
    logits = base.reshape(6, 5, 2 * 97)[..., ::2]
    assert not logits.is_contiguous()
    target = torch.randint(0, 97, (6, 5), dtype=torch.int32)
    target[0, 1] = target[4, 4] = -100
    w = cb.class_balanced_weights(counts[:97])
    for reduction in REDUCTIONS:
        loss, grad = run_loss(_loss_fn(loss_type, backend, w), logits, target, reduction=reduction)
        assert grad.shape == logits.shape and grad.is_contiguous()
        assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, reduction))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_transposed_logits(backend, loss_type):
    logits = torch.randn(300, 40).t()  # [40, 300], class stride 40
    target = torch.randint(0, 300, (40,))
    w = torch.rand(300) + 0.1
    loss, grad = run_loss(_loss_fn(loss_type, backend, w), logits, target, reduction="sum")
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, "sum"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_custom_ignore_index_and_all_ignored(backend, loss_type):
    logits, target, counts = make_inputs(20, 13, seed=2, ignore_frac=0.5, ignore_index=3)
    w = cb.class_balanced_weights(counts)
    kw = dict(loss_type=loss_type, weight=w, backend=backend, ignore_index=3)
    for reduction in REDUCTIONS:
        z = logits.clone().requires_grad_(True)
        loss = cb.class_balanced_loss(z, target, reduction=reduction, **kw)
        loss.sum().backward()
        ref = cb.reference.reference_loss(logits.double(), target, w.double(), loss_type=loss_type,
                                          reduction=reduction, ignore_index=3)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        assert (z.grad[target == 3] == 0).all()
    # Every row ignored: the loss is 0 and the gradient 0 for every reduction (SPEC section 5).
    t_all = torch.full((20,), 3)
    for reduction in REDUCTIONS:
        z = logits.clone().requires_grad_(True)
        loss = cb.class_balanced_loss(z, t_all, reduction=reduction, **kw)
        loss.sum().backward()
        assert (loss == 0).all() and (z.grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_propagates_to_its_row_only(backend, loss_type):
    logits, target, _ = make_inputs(6, 9, ignore_frac=0)
    logits[2, 4] = float("nan")
    target[5] = -100
    logits[5, 0] = float("nan")  # an ignored row stays at loss 0
    loss = cb.class_balanced_loss(logits, target, loss_type=loss_type, reduction="none", backend=backend)
    assert torch.isnan(loss[2])
    assert loss[5] == 0
    assert torch.isfinite(loss[[0, 1, 3, 4]]).all()
    assert torch.isnan(cb.class_balanced_loss(logits, target, loss_type=loss_type, backend=backend))
    # The ignored row's gradient is exactly 0 despite its NaN; the NaN row's gradient is not silently cleaned.
    z = logits.clone().requires_grad_(True)
    cb.class_balanced_loss(z, target, loss_type=loss_type, reduction="sum", backend=backend).backward()
    assert (z.grad[5] == 0).all()
    assert torch.isnan(z.grad[2]).any()
    assert torch.isfinite(z.grad[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits_stay_finite(backend, loss_type):
    # Large margins: naive log(sigmoid) and 1 - sigmoid underflow here; SPEC's forms do not.
    logits = torch.tensor([[80.0, -80.0, 0.0], [-200.0, 200.0, 30.0], [1e4, -1e4, 0.0]])
    target = torch.tensor([0, 0, 1])
    for gamma in GAMMAS:
        kw = {"gamma": gamma} if "focal" in loss_type else {}
        z = logits.clone().requires_grad_(True)
        loss = cb.class_balanced_loss(z, target, loss_type=loss_type, reduction="none", backend=backend, **kw)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
        ref = cb.reference.reference_loss(logits.double(), target, None, loss_type=loss_type, gamma=gamma,
                                          reduction="none")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_input_untouched_unless_inplace(backend, loss_type):
    logits, target, counts = make_inputs(16, 50, dtype=torch.bfloat16, seed=4)
    before = logits.clone()
    z = logits.clone().requires_grad_(True)
    loss = cb.class_balanced_loss(z, target, counts, loss_type=loss_type, backend=backend)
    loss.backward()
    assert torch.equal(z.detach(), before) and torch.equal(logits, before)
    expected = z.grad.clone()

    leaf = before.clone().requires_grad_(True)
    buf = leaf * 1  # a non-leaf whose buffer the in-place backward may overwrite
    loss2 = cb.class_balanced_loss(buf, target, counts, loss_type=loss_type, backend=backend, inplace_backward=True)
    loss2.backward()
    assert torch.equal(loss2, loss)
    assert torch.equal(leaf.grad, expected)
    assert torch.equal(buf.detach(), expected)  # the logits buffer now holds the gradient


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_path_and_deterministic(backend):
    logits, target, counts = make_inputs(128, 1000, seed=9)
    for loss_type in LOSS_TYPES:
        a = cb.class_balanced_loss(logits, target, counts, loss_type=loss_type, backend=backend, reduction="none")
        b = cb.class_balanced_loss(logits, target, counts, loss_type=loss_type, backend=backend, reduction="none")
        assert torch.equal(a, b) and not a.requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(backend, loss_type):
    torch.manual_seed(0)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    target = torch.tensor([0, 4, -100, 2])
    for reduction in REDUCTIONS:
        for gamma in (0.0, 0.5, 2.0, 1.3):
            if "focal" not in loss_type and gamma != 0.5:
                continue
            kw = {"gamma": gamma} if "focal" in loss_type else {}
            if loss_type == "softmax":
                kw["label_smoothing"] = 0.2

            def f(z):
                return cb.class_balanced_loss(z, target, loss_type=loss_type, weight=w.float(), reduction=reduction,
                                              backend=backend, **kw)

            z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_raises(backend):
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = cb.cb_focal(z, torch.tensor([0, 1, 2, 3]), backend=backend)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_hands_over_the_buffer_without_copies(backend):
    """Without retain_graph the stored gradient becomes logits.grad itself: no second buffer, no copy."""
    t = torch.tensor([0, 1, 2, 3, -100])
    for reduction in REDUCTIONS:
        z = torch.randn(5, 7, requires_grad=True)
        z2 = z.detach().clone().requires_grad_(True)
        loss2 = cb.class_balanced_loss(z2, t, loss_type="focal", reduction=reduction, backend=backend)
        (expected,) = torch.autograd.grad(loss2.sum(), z2, retain_graph=True)  # the out-of-place path
        ptrs = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: (ptrs.append(x.data_ptr()), x)[1], lambda x: x):
            loss = cb.class_balanced_loss(z, t, loss_type="focal", reduction=reduction, backend=backend)
        loss.sum().backward()
        assert z.grad.data_ptr() in ptrs
        torch.testing.assert_close(z.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_retain_graph_and_inplace_second_backward(backend):
    t = torch.tensor([0, 1, 2, 3])
    z = torch.randn(4, 6, requires_grad=True)
    loss = cb.cb_softmax_cross_entropy(z, t, backend=backend)
    loss.backward(retain_graph=True)
    once = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * once)
    # autograd.grad with retain_graph and changing grad_outputs (what gradcheck does) reuses the saved gradient.
    loss = cb.cb_softmax_cross_entropy(z, t, backend=backend)
    (g1,) = torch.autograd.grad(loss, z, torch.tensor(3.0), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z, torch.tensor(0.5), retain_graph=True)
    (g3,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(g1, 3 * once, rtol=1e-6, atol=0)
    torch.testing.assert_close(g2, 0.5 * once, rtol=1e-6, atol=0)
    torch.testing.assert_close(g3, once, rtol=0, atol=0)
    # With inplace_backward the gradient is scaled where it lies: a second pass must fail loudly.
    leaf = torch.randn(4, 6, requires_grad=True)
    loss = cb.cb_softmax_cross_entropy(leaf * 1, t, backend=backend, inplace_backward=True)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_agrees_with_torch_backend(backend):
    logits, target, counts = make_inputs(97, 333, seed=12)
    for loss_type in LOSS_TYPES:
        a, ga = run_loss(_loss_fn(loss_type, backend, cb.class_balanced_weights(counts)), logits, target)
        b, gb = run_loss(_loss_fn(loss_type, "torch", cb.class_balanced_weights(counts)), logits, target)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-6 * gb.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("margin", [12.0, 14.3, 17.0])
def test_confident_rows_match_reference(backend, loss_type, margin):
    """1 - p_y and -log p_y are tiny: computed as differences they cancel in float32 (SPEC section 6)."""
    logits = torch.tensor([[0.0, margin, -1.0], [margin, 0.5, -margin]])
    target = torch.tensor([1, 0])
    gammas = (0.5, 0.0, 1.0, 2.0, 1.7) if "focal" in loss_type else (0.0,)
    for gamma in gammas:
        for reduction in ("none", "sum"):
            kw = dict(loss_type=loss_type, reduction=reduction, **({"gamma": gamma} if "focal" in loss_type else {}))
            loss, grad = run_loss(cb.class_balanced_loss, logits, target, backend=backend, **kw)
            assert_matches(loss, grad, logits, target, None, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_logits(backend, loss_type):
    """Exactly 0 logits: softplus'(0) = 1/2, where one-sided derivatives of max/abs would say 1."""
    logits = torch.zeros(4, 5)
    target = torch.tensor([0, 3, -100, 4])
    for reduction in REDUCTIONS:
        kw = dict(loss_type=loss_type, reduction=reduction)
        loss, grad = run_loss(cb.class_balanced_loss, logits, target, backend=backend, **kw)
        assert_matches(loss, grad, logits, target, None, **kw)
    z = torch.zeros(1, 2, requires_grad=True)
    cb.class_balanced_loss(z, torch.tensor([1]), loss_type="sigmoid", reduction="sum", backend=backend).backward()
    torch.testing.assert_close(z.grad, torch.tensor([[0.5, -0.5]]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inplace_backward_refuses_overwritten_saved_logits(backend, loss_type):
    """With inplace_backward the logits buffer becomes the gradient: a node that saved the logits (exp saves its
    output) must fail autograd's version check, never use the overwritten values."""
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    loss = cb.class_balanced_loss(x.exp(), t, loss_type=loss_type, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
