"""Shared test helpers: inputs, the float64 oracle, and the tolerance rule of SPEC section 6."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

# torch.compile's on-disk caches (AOTAutograd's, Inductor's) key a graph by what dynamo traced, which for the CPU
# backend is the op cbkernels::cb_loss, not what its C++ autograd kernel expands to: a cache filled by another
# version of the ops replays code written for their old schemas. The tests get a cache of their own per version of
# the op definitions (a user-set TORCHINDUCTOR_CACHE_DIR wins).
_ROOT = Path(__file__).resolve().parents[1]
_OPS_VERSION = hashlib.sha256(b"".join((_ROOT / f).read_bytes() for f in (
    "cbkernels/_opdefs.py", "csrc/cb_autograd.cpp", "csrc/cb_binding.h"))).hexdigest()[:12]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"cbkernels-tests-inductor-{_OPS_VERSION}"))

from cbkernels.reference import reference_loss  # noqa: E402  (after the cache directory is chosen)

LOSS_TYPES = ("softmax", "sigmoid", "focal", "softmax_focal")
REDUCTIONS = ("none", "mean", "sum", "weighted_mean")


def load_example(name: str):
    """``examples/<name>.py`` as a module (examples/ is not a package): its functions and ``main(argv)``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_inputs(n, c, dtype=torch.float32, *, ignore_frac=0.2, seed=0, scale=3.0, device="cpu",
                ignore_index=-100, target_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_frac and n:
        drop = torch.rand(n, generator=g) < ignore_frac
        target[drop] = ignore_index
    counts = torch.randint(1, 5000, (c,), generator=g)
    return logits.to(device), target.to(target_dtype).to(device), counts


def make_dense(n, c, kind="mixed", *, seed=0, dtype=torch.float32, device="cpu"):
    """Dense targets ``[n, c]`` (SPEC section 9). ``"mixup"``: ``lam onehot(a) + (1 - lam) onehot(b)``;
    ``"timm"``: the same with label smoothing 0.1 folded in as timm's ``Mixup`` does (off = 0.1 / C); ``"soft"``:
    softmax rows; ``"multihot"``: 0/1 rows with about a third positive; ``"mixed"``: the rows cycle through mixup,
    soft, multi-hot, all-zero and one-hot rows (with C = 1 every row is 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, c, (n,), generator=g)
    b = torch.randint(0, c, (n,), generator=g)
    lam = torch.rand(n, 1, generator=g, dtype=torch.float64)
    eye = torch.eye(c, dtype=torch.float64)
    mix = lam * eye[a] + (1 - lam) * eye[b]
    if kind == "mixup":
        q = mix
    elif kind == "timm":
        off = 0.1 / c
        on = 1.0 - 0.1 + off
        q = lam * (eye[a] * (on - off) + off) + (1 - lam) * (eye[b] * (on - off) + off)
    elif kind == "soft":
        q = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, 1)
    elif kind == "multihot":
        q = (torch.rand(n, c, generator=g, dtype=torch.float64) < 0.33).double()
    elif kind == "mixed":
        soft = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, 1)
        hot = (torch.rand(n, c, generator=g, dtype=torch.float64) < 0.33).double()
        rows = torch.arange(n).remainder(5)[:, None]
        q = torch.where(rows == 0, mix, torch.where(rows == 1, soft, torch.where(rows == 2, hot, torch.where(
            rows == 3, torch.zeros_like(mix), eye[a]))))
    else:
        raise ValueError(kind)
    return q.to(dtype).to(device)


def oracle(logits, target, weight, **kw):
    """Float64 reference loss and d(loss)/d(logits) (summed with a fixed upstream for 'none')."""
    z = logits.detach().double().requires_grad_(True)
    loss = reference_loss(z, target, None if weight is None else weight.double(), **kw)
    up = _upstream(loss)
    (loss * up).sum().backward()
    return loss.detach(), z.grad


def eager_at_dtype(logits, target, weight, **kw):
    """PyTorch's own eager computation at the logits' dtype (the bf16/fp16 yardstick of SPEC 6)."""
    z = logits.detach().clone().requires_grad_(True)
    loss = reference_loss(z, target, None if weight is None else weight.to(z.dtype), **kw)
    up = _upstream(loss).to(loss.dtype)
    (loss * up).sum().backward()
    return loss.detach().double(), z.grad.double()


def _upstream(loss):
    if loss.dim() == 0:
        return torch.ones((), dtype=loss.dtype)
    # A fixed, non-uniform upstream gradient exercises the per-row scaling of 'none'.
    n = loss.numel()
    return (torch.arange(n, dtype=torch.float64).remainder(3) + 0.5).to(loss.dtype).reshape(loss.shape)


def run_loss(fn, logits, target, **kw):
    """Our loss and gradient, driven with the same upstream gradient as ``oracle``."""
    z = logits.detach().clone().requires_grad_(True)
    loss = fn(z, target, **kw)
    up = _upstream(loss).to(loss.dtype)
    (loss * up).sum().backward()
    return loss.detach(), z.grad


EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_matches(loss, grad, logits, target, weight, **kw):
    """Check ``loss``/``grad`` against the float64 oracle with the dtype's tolerance (SPEC section 6)."""
    ref_loss, ref_grad = oracle(logits, target, weight, **kw)
    loss, grad = loss.double(), grad.double()
    assert loss.shape == ref_loss.shape
    assert grad.shape == ref_grad.shape
    lscale = ref_loss.abs().max().item() if ref_loss.numel() else 0.0
    gscale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    dtype = logits.dtype
    if dtype in (torch.float32, torch.float64):
        rtol = 1e-5 if dtype == torch.float32 else 1e-10
        atol_g = (1e-6 if dtype == torch.float32 else 1e-12) * max(gscale, 1e-30)
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=rtol * 0.1 * max(lscale, 1e-30))
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=atol_g)
        return
    # bf16 / fp16: per element, no worse than 2x PyTorch's eager error at the same dtype, plus one
    # rounding of the output (eps * |ref|) and a float32-level floor.
    eager_loss, eager_grad = eager_at_dtype(logits, target, weight, **kw)
    eps = EPS[dtype]
    for name, ours, ref, eager, scale in (("loss", loss, ref_loss, eager_loss, lscale),
                                          ("grad", grad, ref_grad, eager_grad, gscale)):
        err = (ours - ref).abs()
        bound = 2 * (eager - ref).abs() + eps * ref.abs() + 1e-5 * scale
        worst = (err - bound).max().item() if err.numel() else -1.0
        assert worst <= 0, f"{name}: error exceeds 2x eager {dtype} error by {worst:.3g} (scale {scale:.3g})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Without TRITON_INTERPRET=1, the Triton interpreter tests are deselected: tests/test_triton.py's
    test_interpreter_suite runs them in a child process that has the variable from the start."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    deselected = [item for item in items if item.get_closest_marker("triton_interpreter")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("triton_interpreter")]
