"""The CUDA C++ kernels compile with plain nvcc for sm_80 and sm_90, warnings as errors, and never spill
(tools/nvcc_build_check.py, also `make gpu-build-check`). No GPU needed: the .cu files include no torch header."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "nvcc_build_check.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("nvcc_build_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(_load_tool().find_nvcc() is None, reason="needs nvcc (CUDA toolkit)")
def test_every_cu_file_builds_for_sm80_sm90_without_warnings_or_spills():
    run = subprocess.run([sys.executable, str(TOOL), "--arch", "80,90"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-20000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("cb_")]
    # Every kernel family the launchers use is there, for both architectures, with zero spill bytes.
    for family in ("cb_loss_stream_kernel", "cb_softmax_rows_kernel", "cb_softmax_split_finish_kernel",
                   "cb_sigmoid_split_sum_kernel"):
        assert any(r.startswith(family) for r in rows), (family, out[-5000:])
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:]]
        assert len(cells) == 2, r
        for cell in cells:
            regs, spill_st, spill_ld, _stack = (int(v) for v in cell.split("/"))
            assert 0 < regs <= 255 and spill_st == 0 and spill_ld == 0, r
    assert "no warnings, no spills" in run.stdout
