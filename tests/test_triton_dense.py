"""Triton backend: dense targets (SPEC section 9) against the float64 reference, through the backend itself
(``_triton.loss_fwd``): every loss in both weight modes, on every path (single tile, loop, split), with label
smoothing, the logit transforms and the z-loss, every reduction, bf16 / float32 / float64, in place, and without
the gradient.

Interpreter tests, as in tests/test_triton.py (whose ``test_interpreter_suite`` runs them in a child process with
``TRITON_INTERPRET=1``; ``TRITON_INTERPRET=1 pytest tests/test_triton_dense.py`` runs them directly). Small shapes:
the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LOSS_TYPES, REDUCTIONS, _upstream, assert_matches, make_dense

from cbkernels._opdefs import LOSS_TYPES as LOSS_CODES
from cbkernels._opdefs import WEIGHT_MODES, LogitTensors, LossSpec
from cbkernels.reference import reference_loss

pytest.importorskip("triton")
from test_triton import device_arithmetic, force_loop, force_split  # noqa: E402, F401  (a fixture, used by name)

from cbkernels import _triton as T  # noqa: E402  (needs triton)

cpu = pytest.mark.triton_interpreter
# The interpreter evaluates both sides of every tl.where: log(0) and 0/0 in the branch not taken are expected.
pytestmark = [cpu, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

SOFTMAX_LOSSES = ("softmax", "softmax_focal")
PATHS = ("single", "loop", "split")
MODES = ("sample", "class")
SHAPES = {"single": (12, 37), "loop": (5, 150), "split": (3, 150)}  # the loop and split paths: three tiles


def set_path(monkeypatch, path: str, n: int, c: int, loss_type: str = "softmax") -> None:
    if path != "single":
        (force_split if path == "split" else force_loop)(monkeypatch)
    lt = T.kernel_flags(LOSS_CODES[loss_type], 1.7, 0.0)[0]
    plan = T.plan_launch(n, c, 4, T.INTERPRET_SM_COUNT, one_vs_all=lt in (T.SIGMOID, T.FOCAL), dense=lt)
    assert (plan.single_tile, plan.splits > 1) == {"single": (True, False), "loop": (False, False),
                                                   "split": (False, True)}[path]


def inputs(n, c, dtype=torch.float32, seed=0, kind="mixed"):
    """Logits, a dense target (make_dense's rows: mixup, soft, multi-hot, all-zero and one-hot) of the logits'
    dtype, and positive class weights."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g) * 3).to(dtype)
    w = torch.rand(c, generator=g) * 2 + 0.1
    return z, make_dense(n, c, kind, seed=seed, dtype=dtype), w


def transform_kw(c: int, loss_type: str, seed: int = 0) -> dict:
    # As tests/test_triton_transforms.py's "all": softcap, offsets, LDAM-like margins (here m_j q_ij), scale, z-loss.
    g = torch.Generator().manual_seed(100 + seed)
    kw = dict(softcap=4.0, logit_offset=torch.randn(c, generator=g) * 0.7,
              target_margin=torch.rand(c, generator=g) * 1.5, logit_scale=1.7)
    if loss_type in SOFTMAX_LOSSES:
        kw["z_loss"] = 0.05
    return kw


def spec_and_tensors(loss_type, reduction="none", gamma=1.7, label_smoothing=0.0, weight_mode="sample",
                     softcap=None, logit_scale=1.0, z_loss=0.0, logit_offset=None, target_margin=None, z_rows=None):
    spec = LossSpec(LOSS_CODES[loss_type], gamma, label_smoothing, -100, reduction, softcap or 0.0, logit_scale,
                    z_loss, WEIGHT_MODES[weight_mode])
    return spec, LogitTensors(logit_offset, target_margin, z_rows)


def backend(z, q, w, compute_grad=True, inplace=False, **kw):
    """The op's loss and gradient (``s dl/dz``), the gradient times the upstream that conftest's oracle uses."""
    spec, tensors = spec_and_tensors(**kw)
    if inplace:
        grad = z.clone()
        loss = T.loss_fwd_inplace(grad, q, w, None, spec, tensors)
    else:
        loss, grad = T.loss_fwd(z, q, w, None, spec, compute_grad, tensors)
    if compute_grad and loss.dim():
        grad = grad * _upstream(loss).to(grad.dtype)[:, None]
    return loss, grad


def check(z, q, w, **kw):
    kw.setdefault("gamma", 1.7)  # the reference's default differs
    loss, grad = backend(z, q, w, **kw)
    assert_matches(loss, grad, z, q, w, **kw)
    return loss, grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_mode", MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(monkeypatch, loss_type, weight_mode, path):
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    i = LOSS_TYPES.index(loss_type) + MODES.index(weight_mode) + PATHS.index(path)
    z, q, w = inputs(n, c, seed=i)
    kw = dict(loss_type=loss_type, weight_mode=weight_mode, reduction=REDUCTIONS[i % 4])
    check(z, q, w, **kw, label_smoothing=0.1 if loss_type == "softmax" else 0.0)
    # Every transform and the z-loss (the margin scaled by q), with smoothing in class mode only.
    check(z, q, w, **kw, **transform_kw(c, loss_type, i),
          label_smoothing=0.1 if loss_type == "softmax" and weight_mode == "class" else 0.0)


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bfloat16(monkeypatch, loss_type, path):
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, q, w = inputs(n, c, torch.bfloat16, seed=20)
    check(z, q, w, loss_type=loss_type, weight_mode="sample", reduction="mean", gamma=0.5,
          **transform_kw(c, loss_type, 20))
    check(z, q, w, loss_type=loss_type, weight_mode="class", reduction="none", gamma=2.0)
    # A float32 target with bfloat16 logits (the API edge's choice for other target dtypes).
    check(z, q.float(), w, loss_type=loss_type, weight_mode="class", reduction="sum", gamma=0.5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float64(monkeypatch, loss_type):
    z, q, w = inputs(6, 29, torch.float64, seed=21)
    check(z, q, w, loss_type=loss_type, weight_mode="sample", reduction="sum", **transform_kw(29, loss_type, 21))
    check(z, q.float(), w, loss_type=loss_type, weight_mode="class", reduction="weighted_mean")
    force_split(monkeypatch)
    check(z[:3], q[:3], w, loss_type=loss_type, weight_mode="sample", reduction="none")


@pytest.mark.parametrize("c", [1, 2, 423])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_odd_classes(loss_type, c):
    z, q, w = inputs(10, c, seed=c)
    for i, mode in enumerate(MODES):
        check(z, q, w, loss_type=loss_type, weight_mode=mode, reduction=REDUCTIONS[(c + i) % 4], gamma=0.5)


@pytest.mark.parametrize("loss_type", ["focal", "softmax_focal"])
def test_gamma_cases(loss_type):
    z, q, w = inputs(10, 29, seed=22)
    for gamma in (0.0, 0.5, 1.0, 2.0):
        check(z, q, w, loss_type=loss_type, weight_mode="class", gamma=gamma, reduction="sum")


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_weighted_mean_every_row_counts(monkeypatch, loss_type, path):
    """weighted_mean divides by the sample weights' sum sum_i a_i in both modes (a_i = 1 for a row without mass;
    its mass partials split over the columns with the loss on the split path, else one per row), mean by N; a given
    scale replaces both. Rows of zeros count (no ignore_index)."""
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, q, w = inputs(n, c, seed=23)
    q[1] = 0.0
    mode = MODES[(LOSS_TYPES.index(loss_type) + PATHS.index(path)) % 2]  # the normaliser is the same in both
    loss, _ = check(z, q, w, loss_type=loss_type, weight_mode=mode, reduction="weighted_mean")
    rows = backend(z, q, w, loss_type=loss_type, weight_mode=mode, compute_grad=False)[0]
    mass = q.double().sum(1)
    a = torch.where(mass > 0, (q.double() * w.double()).sum(1) / mass.clamp(min=1e-300), 1.0)
    torch.testing.assert_close(loss.double(), rows.double().sum() / a.sum(), rtol=1e-5, atol=0)
    mean = backend(z, q, w, loss_type=loss_type, weight_mode=mode, reduction="mean", compute_grad=False)[0]
    torch.testing.assert_close(mean.double(), rows.double().sum() / n, rtol=1e-5, atol=0)
    spec, tensors = spec_and_tensors(loss_type, reduction="weighted_mean")
    loss, grad = T.loss_fwd(z, q, w, torch.tensor(0.25), spec, True, tensors)
    rows, g_rows = T.loss_fwd(z, q, w, None, spec._replace(reduction="none"), True, tensors)
    torch.testing.assert_close(loss, 0.25 * rows.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, 0.25 * g_rows, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_inplace_and_loss_only(monkeypatch, loss_type, path):
    """In place and out of place give the same bits on every path (the softcap's factor and q are read before the
    gradient overwrites a tile); without the gradient, the same loss."""
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, q, w = inputs(n, c, torch.bfloat16, seed=24)
    mode = MODES[(LOSS_TYPES.index(loss_type) + PATHS.index(path)) % 2]
    kw = dict(loss_type=loss_type, weight_mode=mode, reduction="mean", gamma=2.0, **transform_kw(c, loss_type))
    loss, grad = backend(z, q, w, **kw)
    in_place, grad_in_place = backend(z, q, w, inplace=True, **kw)
    assert torch.equal(in_place, loss) and torch.equal(grad_in_place, grad)
    assert torch.equal(backend(z, q, w, compute_grad=False, **kw)[0], loss)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_hot_rows_match_index_targets(monkeypatch, loss_type, path):
    """Index targets are the special case q = onehot(y) (SPEC section 9): the dense kernels agree with the index
    kernels to float32 rounding, in sample mode and (with weights and margins per class) in class mode for the
    softmax losses without smoothing."""
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, _, w = inputs(n, c, seed=25)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(25))
    q = torch.nn.functional.one_hot(y, c).float()
    modes = MODES if loss_type in SOFTMAX_LOSSES and path == "single" else ("sample",)
    for mode in modes:
        kw = dict(loss_type=loss_type, weight_mode=mode, reduction="none", gamma=0.5, **transform_kw(c, loss_type))
        dense, g_dense = backend(z, q, w, **kw)
        index, g_index = backend(z, y, w, **kw)
        torch.testing.assert_close(dense, index, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_dense, g_index, rtol=0, atol=1e-6 * g_index.abs().max().item())


def test_index_targets_in_class_mode():
    # The API edge passes the cases where class mode changes an index-target loss as one-hot rows.
    z, _, w = inputs(6, 9, seed=26)
    y = torch.tensor([0, 3, 8, 1, 1, 5])
    for loss_type, eps in (("sigmoid", 0.0), ("focal", 0.0), ("softmax", 0.1)):
        spec, tensors = spec_and_tensors(loss_type, weight_mode="class", label_smoothing=eps)
        with pytest.raises(ValueError, match="one-hot"):
            T.loss_fwd(z, y, w, None, spec, True, tensors)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits(monkeypatch, loss_type, path):
    """Confident rows (lse - z'_j ~ 1e-7: softmax focal's 1 - P_j = -expm1(-L) and r_j = L / (1 - P_j) near their
    limits), 1e4 logits, rows whose target sits on a far logit (focal: 1 - pt underflows, its ratio term is
    guarded), all finite and within tolerance."""
    n, c = 5, SHAPES[path][1]
    set_path(monkeypatch, path, n, c, loss_type)
    z, q, w = inputs(n, c, seed=27, kind="soft")
    y = torch.arange(n) * 7 % c
    rows = torch.arange(n)
    z[rows[:2], y[:2]] = torch.tensor([15.0, 30.0])
    q[0] = 0.0
    q[0, y[0]] = 1.0
    q[1] *= 1e-3
    q[1, y[1]] = 1.0
    z[2] += 1e4
    z[3, 0] = 95.0
    q[3] = 0.0
    q[3, 0] = 1.0
    z[4, 1] = -95.0
    q[4, 1] = 1.0
    for mode in MODES:
        loss, grad = check(z, q, w, loss_type=loss_type, weight_mode=mode, reduction="none", gamma=0.5)
        assert loss.isfinite().all() and grad.isfinite().all()


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
def test_masked_vocabulary(monkeypatch, loss_type, path):
    # Logits of -inf where q is 0 (a masked vocabulary) add nothing: 0 * inf is never formed.
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, q, w = inputs(n, c, seed=28, kind="soft")
    z[:, : c // 2] = float("-inf")
    q[:, : c // 2] = 0.0
    q[1] = 0.0
    for mode in MODES:
        kw = dict(loss_type=loss_type, weight_mode=mode, reduction="none", gamma=0.5)
        loss, grad = backend(z, q, w, **kw)
        ref = reference_loss(z[:, c // 2:].double(), q[:, c // 2:].double(), w[c // 2:].double(), **kw)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        assert grad.isfinite().all() and not grad[:, : c // 2].any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
def test_z_rows(monkeypatch, loss_type, path):
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, q, w = inputs(n, c, seed=29)
    kw = dict(loss_type=loss_type, weight_mode="class", gamma=0.5, **transform_kw(c, loss_type, 29))
    z_rows = torch.full((n,), float("nan"))
    loss, _ = backend(z, q, w, z_rows=z_rows, **kw)
    ref_loss, ref_z = reference_loss(z.double(), q.double(), w.double(), return_z_loss=True, reduction="none", **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_rows.double(), ref_z, rtol=1e-5, atol=1e-7)
    assert (z_rows > 0).all()  # every row counts, the all-zero one too


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gpu_arithmetic_within_tolerance(monkeypatch, device_arithmetic, loss_type):  # noqa: F811 (fixture)
    """With the GPU's float32 primitives at their worst (tests/test_triton.py's model) the dense per-element math
    (softmax focal's expm1 and r_j, the focal ratio, the per-element reciprocals) stays within SPEC 6's float32
    tolerances."""
    z, q, w = inputs(8, 150, seed=30)
    z[0] *= 1e-3
    kw = dict(loss_type=loss_type, reduction="none", gamma=0.5)
    check(z, q, w, weight_mode="class", **kw)
    force_split(monkeypatch)
    check(z[:4], q[:4], w, weight_mode="sample", **kw)
    assert sum(device_arithmetic.values()) > 0


def test_custom_ops_and_edge_shapes():
    """The registered ops with a dense target and weight_mode (schema, fakes, no mutation of the target); an empty
    batch; q rows with a stride of their own (a slice of a wider tensor)."""
    z, q, w = inputs(6, 11, seed=31)
    for lt, reduction in ((3, "weighted_mean"), (2, "none")):
        args = (z, q, w, None, lt, 0.5, 0.0, -100)
        torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd_triton, (*args, True, reduction, 0.0, 1.0, 0.0, 1))
        torch.library.opcheck(torch.ops.cbkernels.cb_loss_fwd_inplace_triton,
                              (z.clone(), *args[1:], reduction, 0.0, 1.0, 0.0, 0))
    for loss_type in LOSS_TYPES:
        loss, grad = backend(z[:0], q[:0], w, loss_type=loss_type, reduction="weighted_mean")
        assert loss.item() == 0.0 and grad.shape == (0, 11)
        wide = torch.cat([q, torch.full_like(q, float("nan"))], 1)[:, :11]
        check(z, wide, w, loss_type=loss_type, weight_mode="class", reduction="none")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", SOFTMAX_LOSSES)
def test_confident_rows(monkeypatch, loss_type, path):
    """A batch of confident one-hot rows only (lse - m ~ 1e-7, so every loss and gradient is tiny and the float32
    tolerance is relative to them): lse - m = log1p((n_max - 1) + s_other) and, at the max, K p - k from sums that
    do not cancel; a row whose max is tied keeps n_max = 2."""
    n, c = SHAPES[path]
    set_path(monkeypatch, path, n, c, loss_type)
    z, _, w = inputs(n, c, seed=32)
    y = torch.arange(n) * 11 % c
    z[torch.arange(n), y] = 22.0 + torch.arange(n, dtype=torch.float32)
    q = torch.nn.functional.one_hot(y, c).float()
    for mode in MODES:
        check(z, q, w, loss_type=loss_type, weight_mode=mode, reduction="none", gamma=0.5)
    tied = z.clone()
    tied[torch.arange(n), (y + 1) % c] = tied[torch.arange(n), y]
    check(tied, q, w, loss_type=loss_type, weight_mode="class", reduction="none", gamma=0.5)
