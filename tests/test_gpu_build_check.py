"""The ahead-of-time GPU build check (tools/gpu_build_check.py): Triton kernels compile for sm_80 and sm_90 without
spills, and the variants it compiles are the ones the dispatcher launches. No GPU needed."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_build_check.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_build_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_nvidia_tools() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bundled / t).exists() or shutil.which(t) for t in ("ptxas", "cuobjdump"))


def test_global_load_report():
    tool = _load_tool()
    ptx = ("ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n ld.global.b64 { %rd2 }, [ %rd3 + 0 ];\n"
           "ld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd4 + 0 ];\n ld.global.b16 { %rs1 }, [ %rd5 ];")
    assert tool._global_loads(ptx) == "v4.b32x2 b64x1 b16x1"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_variants_cover_every_launch():
    """Every plan the dispatcher makes, for any shape and dtype, is among the variants the check compiles."""
    from cbkernels import _triton as T

    known = {(v["kernel"], v["dtype"], v["num_warps"], tuple(sorted(v["constexprs"].items())))
             for v in T.launch_variants()}
    rng = random.Random(0)
    shapes = [(rng.randint(1, 5000), rng.choice([rng.randint(1, 300), rng.randint(1, 40000), rng.randint(1, 300000)]))
              for _ in range(300)] + [(8, 256000), (4096, 8142), (8192, 1000), (4096, 128256), (1, 1)]
    dtypes = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
    for n, c in shapes:
        for dtype, itemsize in dtypes.items():
            for sms, row_pad in ((1, 0), (108, 3), (132, 16)):
                align = T.align_for(c, c + row_pad, c, itemsize)
                for loss_type in range(4):
                    for gamma in (0.0, 0.5, 1.0, 2.0, 1.7):
                        for eps in (0.0, 0.1):
                            lt, gc, smooth = T.kernel_flags(loss_type, gamma, eps)
                            plan = T.plan_launch(n, c, itemsize, sms, align, one_vs_all=lt in (T.SIGMOID, T.FOCAL))
                            for grad in (False, True):
                                flags = dict(LOSS_TYPE=lt, GAMMA_CASE=gc, HAS_SMOOTHING=smooth, HAS_GRAD=grad,
                                             **dict(zip(T.TRANSFORM_FLAGS, T.NO_TRANSFORM_FLAGS)))
                                main = dict(flags, SINGLE_TILE=plan.single_tile, SPLIT=plan.splits > 1,
                                            ROWS=plan.rows, BLOCK_C=plan.block_c, ALIGN=align)
                                key = ("cb_loss_kernel", dtype, plan.num_warps, tuple(sorted(main.items())))
                                assert key in known, (n, c, dtype, key)
                                if plan.splits > 1:
                                    f = T.finish_flags(lt, gc, smooth, grad)
                                    fin = dict(zip(("LOSS_TYPE", "GAMMA_CASE", "HAS_SMOOTHING", "HAS_GRAD"), f),
                                               MAX_SPLITS=T.MAX_SPLITS, BLOCK_C=plan.block_c, ALIGN=align,
                                               **dict(zip(T.TRANSFORM_FLAGS, T.NO_TRANSFORM_FLAGS)))
                                    key = ("cb_loss_split_finish_kernel", dtype, plan.num_warps,
                                           tuple(sorted(fin.items())))
                                    assert key in known, (n, c, dtype, key)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_transform_variants_cover_every_flag_and_path():
    """The transform launches are checked through a covering set, not their product: every flag, on every path
    the dispatcher takes with it (the largest single tile as planned with that flag, the loop, the split path and
    its finish kernel), for every dtype; every flag of a family at once on the largest tile; and no more than a
    few hundred variants."""
    from cbkernels import _triton as T

    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_build_check

    assert gpu_build_check.TRANSFORM_FLAGS == T.TRANSFORM_FLAGS  # the tool's labels name every flag
    variants = list(T.transform_variants())
    assert 0 < len(variants) <= 400
    base = {(v["kernel"], v["dtype"], v["num_warps"], tuple(sorted(v["constexprs"].items())))
            for v in T.launch_variants() if not any(v["constexprs"][f] for f in T.TRANSFORM_FLAGS)}
    assert all((v["kernel"], v["dtype"], v["num_warps"], tuple(sorted(v["constexprs"].items()))) not in base
               for v in variants)

    def path(v):
        c = v["constexprs"]
        if v["kernel"] == "cb_loss_split_finish_kernel":
            return "finish"
        return "split" if c["SPLIT"] else "single" if c["SINGLE_TILE"] else "loop"

    covered = {(v["dtype"], path(v), f, v["constexprs"]["LOSS_TYPE"] in (T.SIGMOID, T.FOCAL))
               for v in variants for f in T.TRANSFORM_FLAGS if v["constexprs"][f]}
    for dtype, itemsize in (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp64", 8)):
        for one_vs_all in (False, True):
            for i, flag in enumerate(T.TRANSFORM_FLAGS):
                if flag == "HAS_ZLOSS" and one_vs_all:
                    continue
                # The split path's first kernel leaves statistics: the z-loss is its finish kernel's.
                for p in ("single", "loop") + (() if flag == "HAS_ZLOSS" else ("split",)):
                    assert (dtype, p, flag, one_vs_all) in covered, (dtype, p, flag, one_vs_all)
                if not one_vs_all:
                    assert (dtype, "finish", flag, False) in covered, (dtype, flag)
            # The largest single tile a softcapped call can get, with every flag of the family.
            vec = 16 // itemsize
            c = T.single_tile_max(itemsize, vec, one_vs_all, softcap=True)
            plan = T.plan_launch(1 << 20, c, itemsize, 132, vec, one_vs_all, softcap=True)
            assert plan.single_tile and not T.plan_launch(1 << 20, c + 1, itemsize, 132, vec, one_vs_all,
                                                          softcap=True).single_tile
            assert any(v["dtype"] == dtype and v["constexprs"].get("BLOCK_C") == plan.block_c
                       and v["constexprs"].get("SINGLE_TILE") and v["constexprs"]["HAS_GRAD"]
                       and all(v["constexprs"][f] for f in T.TRANSFORM_FLAGS if f != "HAS_ZLOSS")
                       and (v["constexprs"]["LOSS_TYPE"] in (T.SIGMOID, T.FOCAL)) == one_vs_all
                       for v in variants), (dtype, one_vs_all)


@pytest.mark.skipif(not _has_nvidia_tools(), reason="needs triton with its NVIDIA backend (ptxas, cuobjdump)")
def test_triton_kernels_build_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Not the full set (5990 compiles: 18 to 42 minutes on a 2-core machine; `make gpu-build-check`): the covering set
    # and the largest tile of every math, dtype and access width (a covering set by loss alone once missed real
    # spills: focal, gamma 0.5/2, 16384-wide bf16 tiles on sm_80).
    run = subprocess.run([sys.executable, str(TOOL), "--arch", "80", "90", "--suite"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-20000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("sm_")]
    tool = _load_tool()
    n_variants = len(tool.suite_variants())
    assert len(lines) == 2 * n_variants, out[-5000:]
    assert not [line for line in lines if "SPILL" in line], out[-5000:]


TRITON_MIN = Path(sys.prefix) / "triton-min"  # make setup's TRITON_MIN_SPEC, outside the venv's path


@pytest.mark.skipif(not (TRITON_MIN / "triton").is_dir(), reason="make setup installs the oldest supported Triton")
def test_kernels_compile_with_the_oldest_supported_triton():
    """Every code path compiles for sm_90 with the oldest Triton the package supports (pyproject's triton>=3.6), not
    only with the newest: Triton 3.6's tl.fdiv has no approx= (a TypeError at compile time in every one-vs-all kernel
    until _rcp checked). Registers and spills are the full sweep's business, with the venv's Triton."""
    import tomllib

    oldest = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                  ["triton"] if d.startswith("triton"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TRITON_MIN), str(ROOT)])
    probe = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert oldest == f"triton>={'.'.join(probe.split('.')[:2])}", (oldest, probe)  # the floor is what is tested
    run = subprocess.run([sys.executable, str(TOOL), "--arch", "90", "--code-paths"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    out = run.stdout + run.stderr
    assert f"triton {probe}:" in out, out[-3000:]
    assert run.returncode == 0, out[-20000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == len(_load_tool().code_path_variants()) >= 60, out[-5000:]
    assert "COMPILE ERROR" not in out, out[-5000:]
