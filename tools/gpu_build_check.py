"""Ahead-of-time build check of the GPU kernels, on any machine (no GPU needed).

Part "triton": compiles every Triton kernel variant the dispatcher can launch (``cbkernels._triton.launch_variants``)
for each target architecture, prints one line per variant with registers, spill bytes, shared memory and the global
loads by vector width in the PTX, and fails on a compile error or any spill. Variants compile with the options the
dispatcher launches them with (``num_warps``, and ``maxnreg`` = one block's share of the register file: without it
ptxas spilled a few bytes of some 16-warp variants to fit two blocks per SM). Registers and
spills come from ``cuobjdump -res-usage`` of the cubin Triton built (a stack frame or local memory can only be
spills or call frames here). ``align`` is the ALIGN constexpr: the
elements per vector access the host proved possible (16 bytes' worth when C and row strides allow, 2 for even C such
as 8142, else 1).

Usage: ``python tools/gpu_build_check.py [--arch 80 90] [--quick] [--only-transforms] [--only-dense] [--code-paths]
[--suite] [--jobs N]``. ``--suite``: what ``make test`` compiles (``suite_variants``). ``--code-paths``: one small
variant per code path, failing on compile errors only (the suite runs it with the oldest supported Triton).
``--quick`` compiles only the covering subset: per dtype and tile shape, the variants with the most live values (the
full set is the default). ``--only-transforms``: only the variants with logit transforms or z-loss
(``transform_variants``); ``--only-dense``: only the dense-target ones (``dense_variants``, and the normaliser's
mass kernels).
Compiled kernels are cached by Triton (``~/.triton/cache``), so a second run is fast.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS_NAMES = {0: "softmax", 1: "sigmoid", 2: "focal", 3: "softmax_focal"}
GAMMA_NAMES = {0: "-", 1: "0.5", 2: "1", 3: "2", 4: "any"}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}

# ------------------------------------------------------------------------------------------------- triton part


VEC = {"bf16": 8, "fp16": 8, "fp32": 4, "fp64": 2}  # elements in 16 bytes


TRANSFORM_FLAGS = ("HAS_SOFTCAP", "HAS_OFFSET", "HAS_MARGIN", "HAS_ZLOSS", "HAS_SCALE")  # as cbkernels._triton's


def _has_transforms(v: dict) -> bool:
    return any(v["constexprs"].get(f) for f in TRANSFORM_FLAGS)


def _is_dense(v: dict) -> bool:
    return bool(v["constexprs"].get("DENSE")) or v["kernel"].startswith("mass_")


def triton_variants(quick: bool, only_transforms: bool = False, only_dense: bool = False) -> list:
    """Every launchable variant, or a covering subset: per dtype, the variants with the most live values
    (softmax focal and focal with a general gamma, smoothed softmax, with the gradient) on the tile shapes with the
    most registers (most rows per program, largest single tile, loop, split, split-finish), and focal for the
    ALIGN values below 16 bytes (C = 8142, odd C); fp16 (bf16's twin but for conversions) on the largest tile."""
    from cbkernels._triton import launch_variants

    variants = list(launch_variants())
    if only_dense:
        # A covering set already (dense_variants): --quick keeps all of it.
        return [v for v in variants + list(_small_kernel_variants()) if _is_dense(v)]
    if only_transforms:
        variants = [v for v in variants if _has_transforms(v)]
        return variants if not quick else [v for v in variants if _every_transform(v)]
    scale = list(_small_kernel_variants())  # few and small: always all of them
    if not quick:
        return variants + scale
    heavy = {(3, 4, False), (2, 4, False), (0, 0, True)}
    single = {}  # (dtype, ALIGN) -> smallest and largest single tile
    for v in variants:
        c = v["constexprs"]
        if c.get("SINGLE_TILE"):
            lo, hi = single.get((v["dtype"], c["ALIGN"]), (1 << 30, 0))
            single[(v["dtype"], c["ALIGN"])] = (min(lo, c["BLOCK_C"]), max(hi, c["BLOCK_C"]))
    keep = []
    for v in variants:
        c, dtype = v["constexprs"], v["dtype"]
        if c.get("DENSE"):
            keep.append(v)  # a covering set already (dense_variants)
            continue
        if not c["HAS_GRAD"] or (c["LOSS_TYPE"], c["GAMMA_CASE"], c["HAS_SMOOTHING"]) not in heavy:
            continue
        if _has_transforms(v):  # the transform set is itself a covering set: its heaviest part
            if _every_transform(v):
                keep.append(v)
            continue
        full_width = c["ALIGN"] == VEC[dtype]
        if v["kernel"] == "cb_loss_split_finish_kernel":
            ok = full_width and dtype != "fp16"
        else:
            lo, hi = single[(dtype, c["ALIGN"])]
            largest = c["SINGLE_TILE"] and c["BLOCK_C"] == hi
            most_rows = c["SINGLE_TILE"] and c["BLOCK_C"] == lo
            loop = not c["SINGLE_TILE"] and not c["SPLIT"]
            if dtype == "fp16":
                ok = full_width and largest
            elif full_width:
                ok = largest or most_rows or not c["SINGLE_TILE"]
            else:
                ok = c["LOSS_TYPE"] == 2 and (largest or loop)
        if ok:
            keep.append(v)
    return keep + scale


def suite_variants() -> list:
    """What ``make test`` compiles (``--suite``): the covering set (``--quick``) and, for every dtype, access width,
    loss, gamma case and smoothing, with the gradient, the largest single tile and the largest loop tile (the
    variants with the most live values of each math: the ones a covering set by loss once missed, e.g. focal with
    gamma 0.5 or 2 on 16384-wide bf16 tiles). The full set (the default, ``make gpu-build-check``) adds the smaller
    tiles and the loss-only launches, which hold fewer live values than these."""
    from cbkernels._triton import launch_variants

    def key(v):
        return v["kernel"], v["dtype"], v["num_warps"], tuple(sorted(v["constexprs"].items()))

    largest = {}
    for v in launch_variants():
        c = v["constexprs"]
        if (_has_transforms(v) or _is_dense(v) or not c["HAS_GRAD"] or v["kernel"] == "cb_loss_split_finish_kernel"
                or c.get("SPLIT")):
            continue
        k = (v["dtype"], c["ALIGN"], c["LOSS_TYPE"], c["GAMMA_CASE"], c["HAS_SMOOTHING"], bool(c["SINGLE_TILE"]))
        size = c["BLOCK_C"] * c.get("ROWS", 1)
        if k not in largest or size > largest[k][0]:
            largest[k] = (size, v)
    out = triton_variants(True)
    seen = {key(v) for v in out}
    for _, v in largest.values():
        if key(v) not in seen:
            seen.add(key(v))
            out.append(v)
    return out


def code_path_variants() -> list:
    """One variant per code path of the covering set: per kernel, loss, path (single tile, loop, split, finish),
    dense or not, transforms or not and float64 or not, the one with the smallest tile (the fastest to compile). For
    checking that every path compiles, e.g. with the oldest supported Triton (``--code-paths``)."""
    def path(v):
        c = v["constexprs"]
        if v["kernel"] == "cb_loss_split_finish_kernel":
            return "finish"
        return "split" if c.get("SPLIT") else "single" if c.get("SINGLE_TILE") else "loop"

    picked = {}
    for v in triton_variants(True):
        c = v["constexprs"]
        key = (v["kernel"], c.get("LOSS_TYPE"), bool(c.get("DENSE")), _has_transforms(v), path(v), v["dtype"] == "fp64")
        if key not in picked or c.get("BLOCK_C", 0) < picked[key]["constexprs"].get("BLOCK_C", 0):
            picked[key] = v
    return list(picked.values())


def _every_transform(v: dict) -> bool:
    # Every transform of the loss's family on (the split path's first kernel has no z-loss; without the gradient
    # its finish kernel has only the z-loss).
    c = v["constexprs"]
    return c["HAS_GRAD"] and c["HAS_SOFTCAP"] and c["HAS_OFFSET"] and c["HAS_MARGIN"]


def _small_kernel_variants():
    """The kernels around the loss kernel (backward scale, normaliser, reduction): each variant names its module,
    signature and label."""
    from cbkernels import _grad_scale, _triton_reduce

    return [*_grad_scale.launch_variants(), *_triton_reduce.launch_variants()]


def _signature(kernel_name: str, dtype: str, align: int, target: str = "i64") -> tuple:
    """The loss kernels' signature; ``target``: the target's element type (a dense target's: the logits' or fp32)."""
    cdt = "fp64" if dtype == "fp64" else "fp32"
    sig = {"logits_ptr": f"*{dtype}", "target_ptr": f"*{target}", "weight_ptr": "*fp32", "scale_ptr": f"*{cdt}",
           "loss_ptr": f"*{cdt}", "grad_ptr": f"*{dtype}", "ws_ptr": f"*{cdt}", "offset_ptr": "*fp32",
           "margin_ptr": "*fp32", "zrows_ptr": f"*{cdt}",
           "n_rows": "i32", "n_cols": "i32", "stride_z": "i32", "stride_g": "i32", "cols_per_split": "i32"}
    if kernel_name == "cb_loss_split_finish_kernel":
        sig["n_splits"] = "i32"
    sig.update({"ignore_index": "i32", "gamma_hi": "fp32", "gamma_lo": "fp32", "eps_hi": "fp32", "eps_lo": "fp32"})
    sig.update({name: "fp32" for name in ("cap_hi", "cap_lo", "inv_cap_hi", "inv_cap_lo", "lscale_hi", "lscale_lo",
                                          "zloss_hi", "zloss_lo")})
    sig["store_z"] = "i32"
    sig.update({"stride_q": "i32", "rw_ptr": f"*{cdt}"})
    # What the JIT specialises on: tensors from the caching allocator are 16-byte aligned; a full-width ALIGN is
    # compiled as for C and row strides that are multiples of 16 (vocabulary sizes such as 32000 or 128256).
    divisible = ["logits_ptr", "target_ptr", "weight_ptr", "scale_ptr", "loss_ptr", "grad_ptr", "ws_ptr",
                 "offset_ptr", "margin_ptr", "zrows_ptr", "rw_ptr"]
    if align == VEC[dtype]:
        divisible += ["n_cols", "stride_z", "stride_g", "cols_per_split", "stride_q"]
    return sig, divisible


def _nvidia_tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else name


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack/local bytes of the cubin Triton built, from ``cuobjdump -res-usage``.

    The kernels have no local arrays, calls or printf, so a stack frame or local memory can only hold spills.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        log = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    usage = {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", log)}
    return {"regs": usage.get("reg", -1), "spill": usage.get("stack", 0) + usage.get("local", 0)}


def _global_loads(ptx: str) -> str:
    """Global loads by width, widest first, e.g. ``v4.b32x2 b64x1`` (v4.b32 = 128-bit: 8 bf16 or 4 fp32)."""
    bits = {"8": 8, "16": 16, "32": 32, "64": 64}
    count = {}
    for m in re.finditer(r"ld\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.(v\d))?\.([bfsu](\d+))\b", ptx):
        key = (f"{m.group(1)}." if m.group(1) else "") + "b" + m.group(3)
        count[key] = count.get(key, 0) + 1

    def width(key):
        vec = int(key[1]) if key.startswith("v") else 1
        return vec * bits[key.rsplit("b", 1)[1]]

    return " ".join(f"{k}x{n}" for k, n in sorted(count.items(), key=lambda kv: -width(kv[0]))) or "none"


def _compile(kernel, variant: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(variant["constexprs"])
    # Constexprs a variant leaves out hold their defaults (DENSE and its flags, off), as in the dispatcher's launches.
    for p in kernel.params:
        if p.is_constexpr and p.name not in consts and p._param.default is not p._param.empty:
            consts[p.name] = p._param.default
    if "signature" in variant:  # the small kernels' variants state their own
        sig, divisible = dict(variant["signature"]), list(variant["divisible"])
    else:
        sig, divisible = _signature(variant["kernel"], variant["dtype"], consts["ALIGN"],
                                    variant.get("target", "i64"))
    sig.update({k: "constexpr" for k in consts})
    names = list(kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    from cbkernels import _triton

    # The same options as the dispatcher's launches (FP fusion pinned there, not left to the environment).
    options = dict(_triton.compile_options(variant["num_warps"]), **variant.get("options", {}))
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def compile_triton_variant(job: tuple) -> dict:
    """Compile one variant for one architecture (runs in a worker process)."""
    variant, arch = job
    from cbkernels import _triton

    if "module" in variant:
        import importlib

        module = importlib.import_module(variant["module"])
    else:
        module = _triton.kernels()
    kernel = getattr(module, variant["kernel"])
    out = dict(variant, arch=arch)
    t0 = time.time()
    try:
        ck = _compile(kernel, variant, arch)
        out.update(_resource_usage(ck.asm["cubin"]))
        out["smem"] = int(getattr(ck.metadata, "shared", 0))
        out["loads"] = _global_loads(ck.asm["ptx"])
        out["error"] = None
    except Exception as e:  # a compile error is a result to report, not a crash of the whole check
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    out["seconds"] = time.time() - t0
    return out


def describe(v: dict) -> str:
    c = v["constexprs"]
    if "label" in v:
        return f"sm_{v['arch']} {v['dtype']:4} {v['label']} warps={v['num_warps']:<2}"
    if v["kernel"] == "cb_loss_split_finish_kernel":
        path = f"split-finish splits<={c['MAX_SPLITS']}"
    elif c["SPLIT"]:
        path = "split"
    elif c["SINGLE_TILE"]:
        path = "single"
    else:
        path = "loop"
    loss = LOSS_NAMES[c["LOSS_TYPE"]] + ("+ls" if c["HAS_SMOOTHING"] else "")
    if c.get("DENSE"):
        # q's dtype, its weight mode (sample / class), the softmax-focal split's middle launch
        path += " sums" if c.get("FOCAL_SUMS") else ""
        loss += f" q={v['target']}:{'cls' if c.get('CLASS_WEIGHTS') else 'smp'}"
    # cap, offset, margin, z-loss, scale
    tf = "".join(code for code, flag in zip("comzs", TRANSFORM_FLAGS) if c.get(flag))
    return (f"sm_{v['arch']} {v['dtype']:4} align={c['ALIGN']} {loss:13} "
            f"g={GAMMA_NAMES[c['GAMMA_CASE']]:3} "
            f"{'grad' if c['HAS_GRAD'] else 'loss':4} {path:6} rows={c.get('ROWS', 1):<3} "
            f"block={c['BLOCK_C']:<5} warps={v['num_warps']:<2}" + (f" tf={tf}" if tf else ""))


def check_triton(archs: list, quick: bool, jobs: int, only_transforms: bool = False, only_dense: bool = False,
                 code_paths: bool = False, suite: bool = False) -> bool:
    try:
        import triton
    except ImportError:
        print("triton: not installed, skipped")
        return True
    if code_paths or suite:
        variants = code_path_variants() if code_paths else suite_variants()
    else:
        variants = triton_variants(quick, only_transforms, only_dense)
    work = [(v, arch) for arch in archs for v in variants]
    print(f"triton {triton.__version__}: {len(work)} variants ({len(variants)} per architecture, "
          f"{'quick' if quick else 'full'} set), {jobs} worker(s)", flush=True)
    ok = True
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for r in pool.map(compile_triton_variant, work, chunksize=4):
            if r["error"]:
                ok = False
                print(f"{describe(r)}: COMPILE ERROR {r['error']}", flush=True)
                continue
            note = ""
            if r["spill"]:
                ok = ok and code_paths  # --code-paths checks that the code compiles; spills are the full sweep's
                note = "  SPILL"
            print(f"{describe(r)}: regs {r['regs']:3} spill {r['spill']:3} B smem {r['smem']:5} B "
                  f"ld.global {r['loads']}{note}", flush=True)
    print(f"triton: {'OK' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    return ok


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--quick", action="store_true", help="a covering subset of the variants")
    parser.add_argument("--only-transforms", action="store_true",
                        help="only the variants with logit transforms or z-loss")
    parser.add_argument("--only-dense", action="store_true", help="only the dense-target variants")
    parser.add_argument("--suite", action="store_true",
                        help="make test's set: the covering set and the largest tiles of every math (suite_variants)")
    parser.add_argument("--code-paths", action="store_true",
                        help="one small variant per code path; fails on compile errors only (spills reported)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)
    # Compile for real even if the caller's environment asks for the Triton interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    ok = check_triton(args.arch, args.quick, args.jobs, args.only_transforms, args.only_dense, args.code_paths,
                      args.suite)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
