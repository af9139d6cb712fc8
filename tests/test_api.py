"""Public API: validation at the edge, dispatch, the module, imports, autocast, compile, properties."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import LOSS_TYPES, REDUCTIONS, assert_matches, make_inputs, run_loss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cbkernels as cb

FUNCS = {
    "softmax": cb.cb_softmax_cross_entropy,
    "sigmoid": cb.cb_sigmoid_cross_entropy,
    "focal": cb.cb_focal,
    "softmax_focal": cb.cb_softmax_focal,
}


def test_import_cb_focal_is_the_function():
    code = "import cbkernels.cb_focal, cbkernels, sys; f = cbkernels.cb_focal; print(callable(f), f.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "cb_focal"]


def test_import_is_lazy():
    code = ("import sys, cbkernels; print('triton' in sys.modules, 'cbkernels._C' in sys.modules, "
            "'cbkernels._triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_available_backends_and_auto():
    names = cb.available_backends()
    assert names[0] == "torch"
    logits, target, counts = make_inputs(8, 5)
    expected = cb.class_balanced_loss(logits, target, counts, backend="torch")
    torch.testing.assert_close(cb.class_balanced_loss(logits, target, counts), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        cb.cb_focal(logits, target, backend="tpu")
    if "cuda" not in names:
        with pytest.raises(RuntimeError, match=r"'cuda' is not available here \(available: \["):
            cb.cb_focal(logits, target, backend="cuda")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_functional_entry_points_agree(loss_type):
    logits, target, counts = make_inputs(16, 11)
    kw = {"gamma": 1.0} if "focal" in loss_type else {}
    a = FUNCS[loss_type](logits, target, counts, beta=0.99, **kw)
    b = cb.class_balanced_loss(logits, target, counts, loss_type=loss_type, beta=0.99, **kw)
    c = cb.class_balanced_loss(logits, target, loss_type=loss_type, weight=cb.class_balanced_weights(counts, 0.99),
                               **kw)
    module = cb.ClassBalancedLoss(counts, loss_type=loss_type, beta=0.99, **kw)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, module(logits, target))


def test_no_counts_no_weight_is_the_plain_loss():
    logits, target, _ = make_inputs(32, 10, ignore_frac=0)
    ours = cb.cb_softmax_cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1))
    ours_w = cb.cb_softmax_cross_entropy(logits, target, weight=torch.rand(10), reduction="weighted_mean")
    assert ours_w.dim() == 0


def test_weighted_mean_matches_torch_cross_entropy():
    logits, target, counts = make_inputs(64, 17, ignore_frac=0.3)
    w = cb.class_balanced_weights(counts, beta=0.999)
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    ours = cb.cb_softmax_cross_entropy(z1, target, weight=w, reduction="weighted_mean")
    ref = torch.nn.functional.cross_entropy(z2, target, weight=w)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(z1.grad, z2.grad)


def test_module_buffer_state_dict_and_repr():
    crit = cb.ClassBalancedLoss([50, 10, 0, 1], loss_type="softmax", beta=0.9, zero_count="zero")
    assert "weight" in crit.state_dict() and crit.weight[2] == 0
    crit = crit.to(torch.float64)  # buffers follow .to(); the loss must still take them
    assert "loss_type='softmax'" in repr(crit)
    logits, target, _ = make_inputs(8, 4, ignore_frac=0)
    target[target == 2] = 0
    assert torch.isfinite(crit(logits, target))
    with pytest.raises(ValueError, match="empty class"):
        cb.ClassBalancedLoss([5, 0, 3])


def test_bad_inputs_have_clear_errors():
    logits, target, counts = make_inputs(8, 5, ignore_frac=0)
    cases = [
        (dict(logits=logits.long()), TypeError, "logits must be float"),
        (dict(logits=logits[0, 0]), ValueError, "0-d"),
        (dict(logits=logits[:, :0]), ValueError, "0 classes"),
        (dict(target=target.float()), TypeError, "target must hold int64 or int32"),
        (dict(target=target[:4]), ValueError, r"target must have shape logits.shape\[:-1\] = \(8,\)"),
        (dict(target=torch.full((8,), 5)), IndexError, r"target holds 5, outside \[0, 5\)"),
        (dict(target=torch.full((8,), -1)), IndexError, "target holds -1"),
        (dict(samples_per_class=counts[:4]), ValueError, "samples_per_class has 4 classes but logits have C = 5"),
        (dict(samples_per_class=[1, 0, 2, 3, 4]), ValueError, "1 empty class"),
        (dict(beta=1.0), ValueError, "beta must lie in"),
        (dict(beta=-0.5), ValueError, "beta must lie in"),
        (dict(weight=torch.ones(5), samples_per_class=counts), ValueError, "not both"),
        (dict(weight=torch.ones(4), samples_per_class=None), ValueError, r"weight must have shape \[C\] = \[5\]"),
        (dict(weight=torch.ones(5, dtype=torch.long), samples_per_class=None), TypeError, "weight must be a float"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(gamma=-1.0), ValueError, "gamma must be"),
        (dict(gamma=float("nan")), ValueError, "gamma must be"),
        (dict(loss_type="hinge"), ValueError, "loss_type must be one of"),
        (dict(label_smoothing=1.5, loss_type="softmax"), ValueError, "label_smoothing must lie in"),
        (dict(label_smoothing=0.1, loss_type="focal"), ValueError, "label_smoothing applies to"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(logits=[[1.0]]), TypeError, "logits must be a torch.Tensor"),
    ]
    for override, exc, match in cases:
        kw = dict(logits=logits, target=target, samples_per_class=counts, loss_type="focal")
        kw.update(override)
        before = logits.clone()
        with pytest.raises(exc, match=match):
            cb.class_balanced_loss(kw.pop("logits"), kw.pop("target"), kw.pop("samples_per_class"), **kw)
        assert torch.equal(logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_device_mismatch():
    logits, target, _ = make_inputs(8, 5)
    with pytest.raises(ValueError, match="target is on"):
        cb.cb_focal(logits.cuda(), target)
    with pytest.raises(ValueError, match="weight is on"):
        cb.cb_focal(logits, target, weight=torch.ones(5, device="cuda"))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_autocast_cpu(loss_type):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10)
    x = torch.randn(32, 16)
    target = torch.randint(0, 10, (32,))
    counts = torch.randint(1, 100, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        loss = cb.class_balanced_loss(logits, target, counts, loss_type=loss_type)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    ref = cb.reference.reference_loss(logits.detach().double(), target, cb.class_balanced_weights(counts).double(),
                                      loss_type=loss_type)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_torch_backend(loss_type, reduction):
    logits, target, counts = make_inputs(24, 13)
    w = cb.class_balanced_weights(counts)

    def f(z, t):
        return cb.class_balanced_loss(z, t, loss_type=loss_type, weight=w, reduction=reduction, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grad = run_loss(f, logits, target)
    comp_loss, comp_grad = run_loss(compiled, logits, target)
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)


def test_torch_compile_fullgraph_with_counts():
    logits, target, counts = make_inputs(24, 13)
    counts_list = counts.tolist()

    def f(z, t):
        return cb.cb_focal(z, t, counts_list, beta=0.999, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grad = run_loss(f, logits, target)
    comp_loss, comp_grad = run_loss(compiled, logits, target)
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 40),
    c=st.integers(1, 300),
    loss_type=st.sampled_from(LOSS_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
    gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0.0, 5.0),
    beta=st.sampled_from([0.0, 0.9, 0.999]) | st.floats(0.0, 0.99999),
    scale=st.floats(0.01, 30.0),
    ignore_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    backend=st.sampled_from([b for b in cb.available_backends() if b in ("torch", "cpu")]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(n, c, loss_type, reduction, gamma, beta, scale, ignore_frac, dtype, backend,
                                    seed):
    logits, target, counts = make_inputs(n, c, dtype=dtype, seed=seed, scale=scale, ignore_frac=ignore_frac)
    w = cb.class_balanced_weights(counts, beta=beta)
    kw = {"gamma": gamma} if "focal" in loss_type else {}

    def f(z, t, **extra):
        return cb.class_balanced_loss(z, t, loss_type=loss_type, weight=w, backend=backend, **kw, **extra)

    loss, grad = run_loss(f, logits, target, reduction=reduction)
    assert_matches(loss, grad, logits, target, w, loss_type=loss_type, gamma=gamma, reduction=reduction)


def test_cpu_extension_is_built():
    """`make setup` builds cbkernels._C on every machine with a C++ compiler: its absence is a failure here, not
    a silent skip of every compiled-backend test (set CBKERNELS_SKIP_EXTENSION=1 for a pure-Python install)."""
    if os.environ.get("CBKERNELS_SKIP_EXTENSION") == "1":
        pytest.skip("pure-Python install requested (CBKERNELS_SKIP_EXTENSION=1)")
    assert "cpu" in cb.available_backends()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiled_call_first_in_a_fresh_process(backend):
    """The first call of a process may be a compiled one: backends load at trace time, not inside the graph."""
    code = textwrap.dedent(f"""
        import torch, cbkernels as cb
        f = torch.compile(lambda x, t: cb.cb_focal(x, t, backend={backend!r}), fullgraph=True, backend="aot_eager")
        x = torch.randn(6, 7, requires_grad=True)
        t = torch.randint(0, 7, (6,))
        loss = f(x, t)
        loss.backward()
        ref = cb.cb_focal(x.detach(), t, backend={backend!r})
        assert torch.allclose(loss, ref), (loss, ref)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]


@pytest.mark.parametrize("loss_type", ["focal", "softmax"])
def test_compile_fullgraph_with_inplace_backward(loss_type):
    t = torch.randint(0, 7, (6,))
    x = torch.randn(6, 7, requires_grad=True)
    cb.class_balanced_loss(x * 1, t, loss_type=loss_type, inplace_backward=True).backward()
    expected, x.grad = x.grad, None
    f = torch.compile(lambda x, t: cb.class_balanced_loss(x * 1, t, loss_type=loss_type, inplace_backward=True),
                      fullgraph=True, backend="aot_eager")
    f(x, t).backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-7)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.parametrize("backend", [
    "torch", "cpu",
    pytest.param("triton", marks=[pytest.mark.triton_interpreter,
                                  pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")]),
])
@pytest.mark.parametrize("make", ["expand_rows", "expand_middle", "stride0_classes"])
def test_inplace_backward_rejects_overlapping_logits(backend, make):
    """Every backend the same: a gradient written over logits whose elements share memory would be written by several
    rows at once (concurrently on a GPU), so inplace_backward=True refuses them with a clear error."""
    if backend not in cb.available_backends():
        pytest.skip(f"backend {backend!r} is not built here")
    base = torch.randn(1, 7)
    x = {"expand_rows": lambda: base.expand(5, 7),
         "expand_middle": lambda: base.reshape(1, 1, 7).expand(2, 3, 7),
         "stride0_classes": lambda: torch.randn(5, 1).expand(5, 7)}[make]().requires_grad_(True)
    t = torch.randint(0, 7, x.shape[:-1])
    with pytest.raises(ValueError, match="overlap in memory"):
        cb.cb_focal(x, t, inplace_backward=True, backend=backend)
    before = base.clone()
    # Out of place is fine (and the logits stay intact); so is a contiguous copy in place.
    loss = cb.cb_focal(x, t, backend=backend)
    loss.backward()
    assert torch.equal(base, before)
    y = x.detach().contiguous().requires_grad_(True)
    cb.cb_focal(y * 1, t, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(y.grad, x.grad)
