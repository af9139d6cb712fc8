"""The CUDA C++ kernels compile with plain nvcc for every architecture setup.py builds by default (native code and
PTX), and that PTX for the newer GPUs the driver compiles it for, with warnings as errors and never a spill
(tools/nvcc_build_check.py, also `make gpu-build-check`). No GPU needed: the .cu files include no torch header."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_FILE = ROOT / "cbkernels" / "_build.py"  # how setup.py builds the extension
TOOL = ROOT / "tools" / "nvcc_build_check.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("nvcc_build_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


def test_default_arch_list_is_setup_pys_with_native_code_and_ptx():
    text = BUILD_FILE.read_text()
    assert re.search(r'TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST\)', text), "the build must use its default"
    archs = tool.parse_arch_list(tool.setup_arch_list())
    assert f'DEFAULT_CUDA_ARCH_LIST = "{tool.setup_arch_list()}"' in text  # read from the file, not the fallback
    natives = [a for a, _ in archs]
    assert {"80", "90"} <= set(natives), natives  # Ampere and Hopper natively
    assert any(ptx for _, ptx in archs) and max(int(a) for a, ptx in archs if ptx) == max(int(a) for a in natives)


def test_parse_arch_list_takes_torch_syntax_and_short_forms():
    assert tool.parse_arch_list("7.5;8.0;9.0+PTX") == [("75", False), ("80", False), ("90", True)]
    assert tool.parse_arch_list("80,90") == [("80", False), ("90", False)]
    assert tool.parse_arch_list(" 8.6 10.0+ptx ") == [("86", False), ("100", True)]
    with pytest.raises(ValueError, match="Ampere"):
        tool.parse_arch_list("Ampere")


def test_ptx_targets_are_compiled_for_the_first_arch_of_every_newer_major():
    real = ["75", "80", "86", "87", "88", "89", "90", "100", "110", "103", "120", "121"]  # nvcc 13.0's list
    assert tool.newer_majors("90", real) == ["100", "110", "120"]
    assert tool.newer_majors("120", real) == []
    targets = tool.plan_targets(tool.parse_arch_list("7.5;8.0;9.0+PTX"), ["100", "110", "120"])
    assert [t.gencode() for t in targets] == [
        "-gencode=arch=compute_75,code=[sm_75]",
        "-gencode=arch=compute_80,code=[sm_80]",
        "-gencode=arch=compute_90,code=[sm_90,sm_100,sm_110,sm_120,compute_90]",
    ]
    assert [c for t in targets for c in t.columns()] == [
        "sm_75", "sm_80", "sm_90", "sm_100 from compute_90", "sm_110 from compute_90", "sm_120 from compute_90"]
    # Without +PTX nothing is made of PTX, and the PTX never serves an older architecture.
    assert tool.plan_targets([("90", False)], ["100"])[0].gencode() == "-gencode=arch=compute_90,code=[sm_90]"
    assert tool.plan_targets([("120", True)], ["100"])[0].jit == ()
    # Nor an architecture that native code of the list serves (same major version, not newer).
    targets = tool.plan_targets(tool.parse_arch_list("8.0;9.0+PTX;10.0"), ["100", "103", "120"])
    assert [t.columns() for t in targets] == [["sm_80"], ["sm_90", "sm_120 from compute_90"], ["sm_100"]]


def test_ptxas_report_of_a_ptx_build_names_the_real_arch():
    log = "\n".join([
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_100'",
        "ptxas info    : Function properties for _Z1kv",
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
        "ptxas info    : Used 64 registers, used 1 barriers",
    ])
    (u,) = tool.parse_ptxas(log)
    assert (u.arch, u.registers, u.spill_stores, u.spill_loads, u.stack) == ("sm_100", 64, 4, 4, 8)
    u.ptx = "compute_90"
    assert u.target == "sm_100 from compute_90"


@pytest.mark.skipif(tool.find_nvcc() is None, reason="needs nvcc (CUDA toolkit)")
def test_every_cu_file_builds_for_the_default_targets_without_warnings_or_spills():
    run = subprocess.run([sys.executable, str(TOOL)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-20000:]
    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.startswith("kernel"))
    columns = [c.strip() for c in header.split("|")[1:]]
    natives = [f"sm_{a}" for a, _ in tool.parse_arch_list(tool.setup_arch_list())]
    assert columns[: len(natives)] == natives, columns
    real = tool.nvcc_real_archs(tool.find_nvcc())
    for blackwell in ("100", "120"):  # B200, RTX 50xx: reached through the PTX
        if blackwell in real:
            assert any(c.startswith(f"sm_{blackwell} from compute_") for c in columns), columns
    assert re.search(r"PTX: compute_\d+", run.stdout), run.stdout[-2000:]
    rows = [line for line in lines if line.startswith("cb_")]
    # Every kernel family the launchers use is there, for every target, with zero spill bytes.
    for family in ("cb_loss_stream_kernel", "cb_softmax_rows_kernel", "cb_softmax_split_finish_kernel",
                   "cb_sigmoid_split_sum_kernel"):
        assert any(r.startswith(family) for r in rows), (family, out[-5000:])
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:]]
        assert len(cells) == len(columns), r
        for cell in cells:
            regs, spill_st, spill_ld, _stack = (int(v) for v in cell.split("/"))
            assert 0 < regs <= 255 and spill_st == 0 and spill_ld == 0, r
    assert "no warnings, no spills" in run.stdout
