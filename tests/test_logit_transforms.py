"""Logit transforms and z-loss (SPEC sections 10-11) on the CPU backends against the float64 reference, code nobody
here wrote, and bad input. Triton: tests/test_triton_transforms.py; CUDA (emulated): tests/test_cuda_emulated*.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_inputs, run_loss

import cbkernels as cb
from cbkernels.reference import reference_loss

CPU_BACKENDS = [b for b in cb.available_backends() if b in ("torch", "cpu")]
SOFTMAX_LOSSES = ("softmax", "softmax_focal")


def _vectors(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(c, generator=g)
    margin = torch.rand(c, generator=g) * 0.8 - 0.2  # some negative: z'_y may exceed the other logits
    return offset, margin


def _options(which, loss_type, c, seed=0):
    """One transform alone, or all of them (with z-loss on the softmax losses)."""
    offset, margin = _vectors(c, seed)
    all_on = dict(softcap=4.0, logit_offset=offset, target_margin=margin, logit_scale=1.7)
    if loss_type in SOFTMAX_LOSSES:
        all_on["z_loss"] = 0.05
    return {
        "softcap": dict(softcap=2.5),
        "offset": dict(logit_offset=offset),
        "margin": dict(target_margin=margin),
        "scale": dict(logit_scale=3.0),
        "z_loss": dict(z_loss=0.1),
        "all": all_on,
    }[which]


WHICH = ("softcap", "offset", "margin", "scale", "z_loss", "all")


def _fn(loss_type, backend, w, opts, **extra):
    def fn(z, t, **kw):
        g = {"gamma": 0.5} if "focal" in loss_type else {}
        return cb.class_balanced_loss(z, t, loss_type=loss_type, weight=w, backend=backend, **{**g, **opts, **extra},
                                      **kw)

    return fn


def _ref_kw(loss_type, reduction, opts, **extra):
    return dict(loss_type=loss_type, gamma=0.5, reduction=reduction, **opts, **extra)


def _cases(loss_types=LOSS_TYPES):
    return [(lt, w) for lt in loss_types for w in WHICH if not (w == "z_loss" and lt not in SOFTMAX_LOSSES)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type,which", _cases())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(5, 1), (7, 2), (33, 423)])
def test_each_transform_odd_shapes(backend, loss_type, which, reduction, dtype, shape):
    logits, target, counts = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    w = cb.class_balanced_weights(counts, beta=0.99)
    opts = _options(which, loss_type, shape[1])
    loss, grad = run_loss(_fn(loss_type, backend, w, opts), logits, target, reduction=reduction)
    assert grad.dtype == dtype
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, reduction, opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(256, 8142), (1024, 1000)])
def test_all_transforms_realistic(backend, loss_type, shape):
    logits, target, counts = make_inputs(*shape, seed=2)
    w = cb.class_balanced_weights(counts, beta=0.999)
    opts = _options("all", loss_type, shape[1])
    loss, grad = run_loss(_fn(loss_type, backend, w, opts), logits, target, reduction="mean")
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, "mean", opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_label_smoothing_with_margin(backend, eps):
    # The smoothing term sums every transformed logit, the target's with its margin.
    logits, target, counts = make_inputs(19, 37, seed=4)
    w = cb.class_balanced_weights(counts, beta=0.99)
    opts = _options("all", "softmax", 37)
    loss, grad = run_loss(_fn("softmax", backend, w, opts, label_smoothing=eps), logits, target, reduction="none")
    assert_matches(loss, grad, logits, target, w, **_ref_kw("softmax", "none", opts, label_smoothing=eps))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_softcap_large_logits(backend, loss_type):
    # |z| up to 1e4: tanh saturates, the factor 1 - tanh^2 underflows to 0 without NaN, the loss stays finite.
    logits, target, counts = make_inputs(24, 300, seed=6, scale=3000.0)
    w = cb.class_balanced_weights(counts, beta=0.999)
    opts = dict(softcap=30.0, z_loss=1e-3) if loss_type in SOFTMAX_LOSSES else dict(softcap=30.0)
    loss, grad = run_loss(_fn(loss_type, backend, w, opts), logits, target, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_matches(loss, grad, logits, target, w, **_ref_kw(loss_type, "none", opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_with_transforms(backend, loss_type, dtype):
    # In place the gradient overwrites the logits: the softcap factor must come from the raw logits read before.
    logits, target, counts = make_inputs(17, 129, dtype=dtype, seed=8)
    w = cb.class_balanced_weights(counts, beta=0.99)
    opts = _options("all", loss_type, 129)
    loss, grad = run_loss(_fn(loss_type, backend, w, opts), logits, target, reduction="sum")
    x = logits.clone().requires_grad_(True)
    y = x * 1  # a non-leaf whose buffer the loss may overwrite
    loss_ip = _fn(loss_type, backend, w, opts, inplace_backward=True)(y, target, reduction="sum")
    loss_ip.backward()
    torch.testing.assert_close(loss_ip.detach(), loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identity_transforms_are_bit_exact(backend, loss_type, dtype):
    # Zero vectors run the transformed code path with identity values: the same bits as no transform at all.
    logits, target, counts = make_inputs(21, 300, dtype=dtype, seed=9)
    w = cb.class_balanced_weights(counts, beta=0.99)
    zeros = torch.zeros(300)
    # (The CPU's sigmoid-focal loops with transforms take the general exponent form, so a general gamma here.)
    gamma = {"gamma": 1.7} if "focal" in loss_type else {}
    plain = run_loss(_fn(loss_type, backend, w, {}, **gamma), logits, target, reduction="none")
    ident = run_loss(_fn(loss_type, backend, w, dict(logit_offset=zeros, target_margin=zeros, logit_scale=1.0),
                         **gamma), logits, target, reduction="none")
    for a, b in zip(plain, ident):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_z_loss(backend, loss_type, reduction):
    logits, target, counts = make_inputs(40, 77, seed=10)
    w = cb.class_balanced_weights(counts, beta=0.99)
    opts = _options("all", loss_type, 77)
    z = logits.clone().requires_grad_(True)
    loss, z_term = cb.class_balanced_loss(z, target, loss_type=loss_type, weight=w, backend=backend,
                                          reduction=reduction, return_z_loss=True, **opts)
    assert not z_term.requires_grad and z_term.shape == loss.shape
    ref_loss, ref_z = reference_loss(logits.double(), target, w.double(), loss_type=loss_type, reduction=reduction,
                                     gamma=0.5, return_z_loss=True, **opts)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_term.double(), ref_z, rtol=1e-5, atol=1e-7)
    assert (ref_z != 0).any()
    # The same loss and gradient as without return_z_loss (which takes another autograd path on the CPU).
    plain = run_loss(_fn(loss_type, backend, w, opts), logits, target, reduction=reduction)
    loss.backward(torch.ones_like(loss) if loss.dim() == 0 else
                  (torch.arange(loss.numel(), dtype=torch.float64).remainder(3) + 0.5).float())
    torch.testing.assert_close(loss.detach(), plain[0], rtol=0, atol=0)
    torch.testing.assert_close(z.grad, plain[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_all_transforms(backend, loss_type):
    logits, target, _ = make_inputs(4, 5, dtype=torch.float64, seed=11, ignore_frac=0.3)
    offset, margin = _vectors(5, 3)
    opts = dict(softcap=2.0, logit_offset=offset, target_margin=margin, logit_scale=1.3)
    if loss_type in SOFTMAX_LOSSES:
        opts["z_loss"] = 0.2
    w = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        def f(z):
            return cb.class_balanced_loss(z, target, loss_type=loss_type, weight=w, backend=backend, gamma=0.7,
                                          reduction=reduction, **opts)

        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("return_z_loss", [False, True])
def test_torch_compile_fullgraph(backend, return_z_loss):
    logits, target, counts = make_inputs(16, 40, seed=12)
    offset, margin = _vectors(40)
    crit = cb.ClassBalancedLoss(counts, loss_type="softmax", backend=backend, softcap=5.0, logit_offset=offset,
                                target_margin=margin, logit_scale=2.0, z_loss=1e-2, return_z_loss=return_z_loss)

    def step(z, t):
        out = crit(z, t)
        return out if return_z_loss else (out, torch.zeros(()))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    l1, zt1 = step(z1, target)
    l2, zt2 = compiled(z2, target)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(zt2, zt1)
    torch.testing.assert_close(z2.grad, z1.grad)


# ----------------------------------------------------------------------------------------------------------------
# Against code nobody here wrote: the published recipes, transcribed with PyTorch's own losses.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjustment_is_shifted_cross_entropy(backend, tau):
    logits, target, counts = make_inputs(64, 100, seed=13, ignore_frac=0.0)
    o = cb.logit_adjustment(counts, tau=tau)
    prior = counts.double() / counts.sum()
    z = logits.clone().requires_grad_(True)
    ours = cb.cb_softmax_cross_entropy(z, target, logit_offset=o, backend=backend)
    theirs_z = logits.clone().requires_grad_(True)
    theirs = F.cross_entropy(theirs_z + tau * torch.log(prior).float(), target)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad, theirs_z.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ldam_drw_is_margin_cross_entropy(backend):
    # LDAM-DRW's second stage: F.cross_entropy(s * (z - m_y onehot), weight=w), torch's weighted mean.
    logits, target, counts = make_inputs(64, 100, seed=14, ignore_frac=0.0)
    m = cb.ldam_margins(counts, max_margin=0.5)
    w = cb.class_balanced_weights(counts, beta=0.9999)
    z = logits.clone().requires_grad_(True)
    ours = cb.cb_softmax_cross_entropy(z, target, weight=w, target_margin=m, logit_scale=30.0,
                                       reduction="weighted_mean", backend=backend)
    theirs_z = logits.clone().requires_grad_(True)
    theirs = F.cross_entropy(30.0 * (theirs_z - m[target][:, None] * F.one_hot(target, 100)), target, weight=w)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad, theirs_z.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softcap_z_loss_is_gemma2_palm(backend):
    # Gemma 2: logits = cap * tanh(logits / cap); PaLM: loss += 1e-4 * logsumexp(logits)^2, averaged over tokens.
    logits, target, _ = make_inputs(96, 500, seed=15, scale=20.0)
    z = logits.clone().requires_grad_(True)
    ours, z_term = cb.cb_softmax_cross_entropy(z, target, softcap=30.0, z_loss=1e-4, return_z_loss=True,
                                               backend=backend)
    theirs_z = logits.clone().requires_grad_(True)
    capped = 30.0 * torch.tanh(theirs_z / 30.0)
    keep = target != -100
    lse = torch.logsumexp(capped[keep], dim=-1)
    palm_z = 1e-4 * (lse**2).mean()
    theirs = F.cross_entropy(capped, target) + palm_z
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_term, palm_z.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(z.grad, theirs_z.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# The linear path and the module.


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cb_loss_transforms(backend, loss_type, reduction):
    g = torch.Generator().manual_seed(16)
    n, h, v = 45, 24, 70
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float()
    lm = (torch.randn(v, h, generator=g) * 0.3)
    target = torch.randint(0, v, (n,), generator=g)
    target[::7] = -100
    opts = _options("all", loss_type, v)
    if loss_type in SOFTMAX_LOSSES:
        opts["return_z_loss"] = True
    hx, wx = hidden.clone().requires_grad_(True), lm.clone().requires_grad_(True)
    out = cb.linear_cb_loss(hx, wx, target, loss_type=loss_type, reduction=reduction, chunk_size=16,
                            backend=backend, **opts)
    loss, z_term = out if loss_type in SOFTMAX_LOSSES else (out, None)
    hr, wr = hidden.double().requires_grad_(True), lm.double().requires_grad_(True)
    ref = reference_loss(hr @ wr.T, target, loss_type=loss_type, reduction=reduction, gamma=0.5, **opts)
    ref_loss, ref_z = ref if loss_type in SOFTMAX_LOSSES else (ref, None)
    loss.sum().backward()
    ref_loss.sum().backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    if z_term is not None:
        torch.testing.assert_close(z_term.double(), ref_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hx.grad.double(), hr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wx.grad.double(), wr.grad, rtol=1e-4, atol=1e-5)


def test_module_rechecks_a_changed_buffer():
    crit = cb.ClassBalancedLoss([5, 4, 3], loss_type="softmax", logit_offset=torch.zeros(3))
    z, t = torch.randn(4, 3), torch.randint(0, 3, (4,))
    crit(z, t)
    crit.logit_offset[1] = float("inf")  # in place: the cached check must not hide it
    with pytest.raises(ValueError, match="logit_offset"):
        crit(z, t)
    crit.logit_offset = torch.tensor([0.0, 1.0, 2.0])  # a new tensor: checked, and its values used
    ref = reference_loss(z.double(), t, crit.weight.double(), loss_type="softmax", reduction="mean",
                         logit_offset=torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(crit(z, t).double(), ref, rtol=1e-5, atol=1e-6)


def test_module_buffers_and_repr():
    counts = [500, 50, 5]
    crit = cb.ClassBalancedLoss(counts, loss_type="softmax", logit_offset=cb.logit_adjustment(counts),
                                target_margin=cb.ldam_margins(counts), logit_scale=30.0, z_loss=1e-4)
    names = dict(crit.named_buffers())
    assert {"weight", "logit_offset", "target_margin"} <= set(names)
    assert names["logit_offset"].dtype == torch.float32
    r = repr(crit)
    assert "logit_scale=30.0" in r and "logit_offset=[3]" in r and "z_loss=0.0001" in r
    z = torch.randn(8, 3)
    t = torch.randint(0, 3, (8,))
    ref = reference_loss(z.double(), t, crit.weight.double(), loss_type="softmax", reduction="mean",
                         logit_offset=cb.logit_adjustment(counts), target_margin=cb.ldam_margins(counts),
                         logit_scale=30.0, z_loss=1e-4)
    torch.testing.assert_close(crit(z, t).double(), ref, rtol=1e-5, atol=1e-6)
    crit.z_loss = 0.0  # an option changed after construction takes effect on the next call
    ref0 = reference_loss(z.double(), t, crit.weight.double(), loss_type="softmax", reduction="mean",
                          logit_offset=cb.logit_adjustment(counts), target_margin=cb.ldam_margins(counts),
                          logit_scale=30.0)
    torch.testing.assert_close(crit(z, t).double(), ref0, rtol=1e-5, atol=1e-6)


def test_helpers():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    o = cb.logit_adjustment(counts, tau=1.0)
    n = torch.tensor(counts, dtype=torch.float64)
    assert o.dtype == torch.float32 and o.shape == (10,)
    torch.testing.assert_close(o.double(), torch.log(n / n.sum()), rtol=0, atol=1e-6)
    m = cb.ldam_margins(counts, max_margin=0.5)
    torch.testing.assert_close(m.double(), 0.5 * (n / n.min()) ** -0.25, rtol=0, atol=1e-7)
    assert m.max().item() == pytest.approx(0.5) and m.argmax().item() == 9
    for fn in (cb.logit_adjustment, cb.ldam_margins):
        with pytest.raises(ValueError, match="1 empty class"):
            fn([3, 0, 2])
    with pytest.raises(ValueError, match="max_margin"):
        cb.ldam_margins(counts, max_margin=0.0)
    with pytest.raises(ValueError, match="tau"):
        cb.logit_adjustment(counts, tau=float("nan"))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the argument.


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(z_loss=-1e-4), ValueError, "z_loss"),
    (dict(logit_offset=torch.zeros(6)), ValueError, "logit_offset"),
    (dict(target_margin=torch.zeros(5, 1)), ValueError, "target_margin"),
    (dict(logit_offset=torch.zeros(5, dtype=torch.int64)), TypeError, "logit_offset"),
    (dict(target_margin=[0.1] * 5), TypeError, "target_margin"),
    (dict(logit_offset=torch.tensor([0.0, 1.0, float("inf"), 0.0, 0.0])), ValueError, "logit_offset"),
    (dict(target_margin=torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])), ValueError, "target_margin"),
    (dict(target_margin=torch.tensor([0.0, 1e39, 0.0, 0.0, 0.0], dtype=torch.float64)), ValueError,
     "target_margin"),
])
def test_bad_transform_arguments(kwargs, exc, match):
    z, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(exc, match=match):
        cb.class_balanced_loss(z, t, loss_type="softmax", **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "focal"])
def test_z_loss_with_sigmoid_losses_is_an_error(loss_type):
    z, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="z_loss"):
        cb.class_balanced_loss(z, t, loss_type=loss_type, z_loss=1e-4)
    with pytest.raises(ValueError, match="return_z_loss"):
        cb.class_balanced_loss(z, t, loss_type=loss_type, return_z_loss=True)
    with pytest.raises(ValueError, match="z_loss"):
        cb.ClassBalancedLoss([1, 2, 3, 4, 5], loss_type=loss_type, z_loss=1e-4)


def test_vector_on_another_device_is_an_error():
    z, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="logit_offset is on meta"):
        cb.class_balanced_loss(z, t, loss_type="softmax", logit_offset=torch.zeros(5, device="meta"))


def test_linear_transforms_with_process_group_refused():
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="process_group"):
        cb.linear_cb_loss(h, w, t, softcap=30.0, process_group=object())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_softcap_factor_has_full_relative_precision(backend, loss_type):
    # sech^2(z / c) where tanh saturates (|z / c| up to 7.5: sech^2 ~ 1e-6) and where tanh(z / c) is tiny: every
    # gradient element to a few float32 ulps relative, not only relative to the largest one (1 + expm1(-2|x|)
    # cancelled there: 0.3% off at |x| = 6).
    g = torch.Generator().manual_seed(17)
    logits = (torch.rand(8, 512, generator=g) * 60 - 30)
    logits[:, :16] *= 1e-4
    target = torch.randint(0, 512, (8,), generator=g)
    z = logits.clone().requires_grad_(True)
    cb.class_balanced_loss(z, target, loss_type=loss_type, backend=backend, softcap=4.0, reduction="sum").backward()
    zr = logits.double().requires_grad_(True)
    reference_loss(zr, target, loss_type=loss_type, softcap=4.0, reduction="sum").backward()
    torch.testing.assert_close(z.grad.double(), zr.grad, rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_positive_margin_times_scale_beyond_exp_range(backend, loss_type, eps):
    # s m_y = 90: a confident target whose raw logit is the row max by far. A row max taken without the margin sits
    # s m_y above every z' and flushes every exp to 0 (NaN gradients); it must be the max of the z' themselves.
    logits = torch.tensor([[10.0, 0.0, 0.0, 1.0], [0.0, 0.5, 9.0, -3.0]])
    target = torch.tensor([0, 2])
    margin = torch.tensor([3.0, 0.0, 3.0, 0.0])
    kw = dict(label_smoothing=eps) if loss_type == "softmax" else {}
    opts = dict(target_margin=margin, logit_scale=30.0, z_loss=1e-3)
    loss, grad = run_loss(_fn(loss_type, backend, None, opts, **kw), logits, target, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_matches(loss, grad, logits, target, None, **_ref_kw(loss_type, "none", opts, **kw))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ignored_rows_with_nonfinite_logits_get_zero_gradient(backend, loss_type):
    # Ignored rows are read too: a NaN, +inf or all -inf row there must still give loss 0, gradient 0, z term 0.
    logits = torch.randn(4, 6)
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")
    logits[3, 0] = float("inf")
    target = torch.tensor([1, -100, -100, -100])
    opts = _options("all", loss_type, 6)
    z = logits.clone().requires_grad_(True)
    if loss_type in SOFTMAX_LOSSES:
        loss, z_term = cb.class_balanced_loss(z, target, loss_type=loss_type, backend=backend, reduction="none",
                                              return_z_loss=True, **opts)
        assert torch.equal(z_term[1:], torch.zeros(3))
    else:
        loss = cb.class_balanced_loss(z, target, loss_type=loss_type, backend=backend, reduction="none", **opts)
    loss.sum().backward()
    assert torch.equal(loss[1:].detach(), torch.zeros(3)) and torch.isfinite(loss[0])
    assert torch.equal(z.grad[1:], torch.zeros(3, 6)) and torch.isfinite(z.grad[0]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "weighted_mean"])
def test_return_z_loss_follows_the_normalizer(backend, reduction):
    logits, target, counts = make_inputs(30, 50, seed=18)
    w = cb.class_balanced_weights(counts, beta=0.99)
    normalizer = 7 if reduction == "mean" else None
    loss, z_term = cb.cb_softmax_cross_entropy(logits, target, weight=w, backend=backend, reduction=reduction,
                                               z_loss=1e-2, return_z_loss=True, normalizer=normalizer)
    _, z_rows = cb.cb_softmax_cross_entropy(logits, target, weight=w, backend=backend, reduction="none",
                                            z_loss=1e-2, return_z_loss=True)
    valid = target != -100
    denom = 7.0 if reduction == "mean" else w[target[valid]].double().sum()
    torch.testing.assert_close(z_term.double(), z_rows.double().sum() / denom, rtol=1e-6, atol=0)
    plain = cb.cb_softmax_cross_entropy(logits, target, weight=w, backend=backend, reduction=reduction,
                                        normalizer=normalizer)
    torch.testing.assert_close(loss.double() - z_term.double(), plain.double(), rtol=1e-5, atol=1e-7)
    zero = cb.cb_softmax_cross_entropy(logits, target, weight=w, backend=backend, return_z_loss=True)[1]
    assert zero.item() == 0.0


def test_vectors_requiring_grad_are_refused():
    z, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    offset = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match="logit_offset requires grad"):
        cb.class_balanced_loss(z, t, loss_type="softmax", logit_offset=offset)
    with torch.no_grad():  # no gradient wanted: fine
        cb.class_balanced_loss(z, t, loss_type="softmax", logit_offset=offset)
    cb.class_balanced_loss(z, t, loss_type="softmax", logit_offset=offset.detach())


def test_module_vectors_made_in_inference_mode_and_after_a_dtype_cast():
    counts = [50, 20, 5]
    with torch.inference_mode():
        offset = cb.logit_adjustment(counts)
    crit = cb.ClassBalancedLoss(counts, loss_type="softmax", logit_offset=offset)
    z, t = torch.randn(6, 3), torch.randint(0, 3, (6,))
    ref = reference_loss(z.double(), t, crit.weight.double(), loss_type="softmax", reduction="mean",
                         logit_offset=offset)
    for _ in range(2):  # inference tensors have no version counter: checked on every call, no error
        torch.testing.assert_close(crit(z, t).double(), ref, rtol=1e-5, atol=1e-6)
    crit = cb.ClassBalancedLoss(counts, loss_type="softmax", logit_offset=torch.zeros(3))
    crit(z, t)
    crit.double()  # the buffers become float64 copies; then a new buffer of the same size replaces one
    crit.logit_offset = torch.tensor([0.0, 2.0, -2.0], dtype=torch.float64)
    ref = reference_loss(z.double(), t, crit.weight.double(), loss_type="softmax", reduction="mean",
                         logit_offset=torch.tensor([0.0, 2.0, -2.0]))
    torch.testing.assert_close(crit(z, t).double(), ref, rtol=1e-5, atol=1e-6)
