"""The Triton launches compile with the options the ahead-of-time check compiles with (issue 10, point 8).

FP fusion left to Triton's default differs between releases (Triton 3.9 warns, a later one changes it), so the code
that runs could differ from the code tools/gpu_build_check.py checked. Every launch passes ``compile_options``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import make_inputs

import cbkernels as cb

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ROOT = Path(__file__).resolve().parent.parent


class RecordLaunches:
    """Stands in for a jitted kernel: records each launch's keyword options, then runs the real (interpreted) one.
    Subclassed under the interpreter's kernel type name, which the CPU path checks for."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append(kwargs)
            return launch(*args, **kwargs)

        return run


def _options(kwargs):
    return {k: kwargs[k] for k in ("num_warps", "maxnreg", "enable_fp_fusion") if k in kwargs}


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("path", ["single", "split"])
def test_every_launch_pins_the_compile_options(monkeypatch, path):
    from types import SimpleNamespace

    from cbkernels import _autograd, _grad_scale
    from cbkernels import _triton as T

    real = T.kernels()
    seen = []
    rec = type("InterpretedFunction", (RecordLaunches,), {})
    fake = SimpleNamespace(cb_loss_kernel=rec(real.cb_loss_kernel, seen),
                           cb_loss_split_finish_kernel=rec(real.cb_loss_split_finish_kernel, seen))
    monkeypatch.setattr(T, "kernels", lambda: fake)
    monkeypatch.setattr(_grad_scale, "grad_scale_kernel", rec(_grad_scale.grad_scale_kernel, seen))
    monkeypatch.setattr(_autograd, "_is_exactly_one_on_cpu", lambda go: False)
    monkeypatch.setattr(_autograd, "_device_side_scale", lambda device_type, traced, index=None: not traced)
    if path == "split":
        monkeypatch.setattr(T, "SMALL_C_MAX", 16)
        monkeypatch.setattr(T, "SINGLE_TILE_MAX", {2: 64, 4: 64, 8: 64})
        monkeypatch.setattr(T, "SINGLE_TILE_MAX_NARROW", {2: 64, 4: 64, 8: 64})
        monkeypatch.setattr(T, "LOOP_BLOCK", {2: 64, 4: 64, 8: 64})
        monkeypatch.setattr(T, "INTERPRET_SM_COUNT", 8)
    z, target, counts = make_inputs(2, 300, seed=1)
    x = z.clone().requires_grad_(True)
    cb.cb_softmax_cross_entropy(x, target, counts, backend="triton").backward()
    assert len(seen) == (3 if path == "split" else 2)  # the loss kernel(s), then backward's scale
    for kwargs in seen:
        assert _options(kwargs) == T.compile_options(kwargs["num_warps"]), kwargs
    assert T.compile_options(4)["enable_fp_fusion"] is True


def test_build_check_compiles_with_the_launch_options(monkeypatch):
    """tools/gpu_build_check.py hands triton.compile exactly the launches' options (no environment default)."""
    import triton

    from cbkernels import _triton as T

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_build_check
    finally:
        sys.path.pop(0)
    captured = []
    monkeypatch.setattr(triton, "compile", lambda src, target, options: captured.append(options))
    variants = gpu_build_check.triton_variants(quick=True)
    kinds = {v["kernel"] for v in variants}
    assert {"cb_loss_kernel", "cb_loss_split_finish_kernel", "grad_scale_kernel", "reduction_scale_kernel",
            "reduce_rows_kernel"} <= kinds
    import importlib

    scale = [v for v in variants if v["kernel"] == "grad_scale_kernel"]
    debug = [v for v in variants if v.get("options") == {"debug": True}]
    for v in variants[:3] + scale[:1] + debug[:1] + variants[-3:]:
        fn = getattr(importlib.import_module(v["module"]) if "module" in v else T.kernels(), v["kernel"])
        gpu_build_check._compile(fn, v, 90)
        # The launch's options; the normaliser kernel adds debug=True (its device assert), as its launch does.
        assert captured[-1] == dict(T.compile_options(v["num_warps"]), **v.get("options", {}))
    assert debug and all(v["kernel"] == "reduction_scale_kernel" for v in debug)
