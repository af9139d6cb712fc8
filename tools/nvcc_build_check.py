#!/usr/bin/env python3
"""Compile every CUDA source of cbkernels with plain nvcc and check its resource use.

Each ``csrc/cuda/*.cu`` is compiled for every architecture (sm_80 and sm_90 by default) with the nvcc flags of
``setup.py`` and torch's ``CUDAExtension``, plus warnings as errors (``-Xcompiler -Wall,-Wextra,-Werror``,
``--Werror all-warnings``) and ``-Xptxas -v``. ptxas's report is parsed into one row per kernel (registers,
spill stores, spill loads, stack, per architecture) and printed as a table. Exit status 1 on any compiler
error or warning and on any spill: a kernel that spills has outgrown its register budget.

No GPU and no CUDA build of torch needed: the kernels include no torch header. When torch is importable, the
binding (``csrc/cuda/*.cpp``, the one file that sees torch) is also compiled with ``-fsyntax-only`` against
torch's headers (a CPU wheel ships the CUDA ones too), so it does not meet a compiler for the first time on a
GPU machine. Usage:

    python tools/nvcc_build_check.py [--arch 80,90] [--jobs N] [--json out.json] [--no-binding]
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"

# setup.py's nvcc flags (read from it; this default if that fails), then torch.utils.cpp_extension's
# COMMON_NVCC_FLAGS (kernels must build without the implicit half/bfloat16 conversions those defines remove).
DEFAULT_SETUP_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
STRICT_FLAGS = ["-Xcompiler", "-Wall,-Wextra,-Werror,-fPIC", "--Werror", "all-warnings", "-Xptxas", "-v"]

ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_RE = re.compile(r"Used (\d+) registers")
WARNING_RE = re.compile(r"\bwarning\b", re.IGNORECASE)


@dataclass
class KernelUse:
    kernel: str
    arch: str
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0


def setup_nvcc_flags() -> List[str]:
    m = re.search(r'"nvcc":\s*(\[[^\]]*\])', (ROOT / "setup.py").read_text())
    try:
        flags = ast.literal_eval(m.group(1)) if m else None
    except (ValueError, SyntaxError):
        flags = None
    return flags if isinstance(flags, list) and all(isinstance(f, str) for f in flags) else DEFAULT_SETUP_FLAGS


def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    pretty = out.splitlines()
    if len(pretty) != len(names):
        return {n: n for n in names}
    return {n: _shorten(p) for n, p in zip(names, pretty)}


def _shorten(name: str) -> str:
    if name.endswith(")"):  # drop the argument list: the last balanced (...)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"^void ", "", name)
    name = name.replace("cbkernels::gpu::", "").replace("cbkernels::", "")
    name = re.sub(r"\(GammaKind\)(\d)", lambda m: "G" + "0H12X"[int(m.group(1))], name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "half").replace(" ", "")


def parse_ptxas(log: str) -> List[KernelUse]:
    uses: List[KernelUse] = []
    current: Optional[KernelUse] = None
    for line in log.splitlines():
        m = ENTRY_RE.search(line)
        if m:
            current = KernelUse(kernel=m.group(1), arch=m.group(2))
            uses.append(current)
            continue
        if current is None:
            continue
        m = STACK_RE.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = REGS_RE.search(line)
        if m:
            current.registers = int(m.group(1))
            current = None
    return uses


def compile_one(nvcc: str, source: Path, arch: str, outdir: str) -> Tuple[Path, str, int, str]:
    obj = os.path.join(outdir, f"{source.stem}_sm{arch}.o")
    cmd = [nvcc, *setup_nvcc_flags(), *TORCH_FLAGS, *STRICT_FLAGS, f"-I{ROOT / 'csrc'}",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(source), "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return source, arch, proc.returncode, proc.stdout + proc.stderr


def check_binding(source: Path, nvcc: str, outdir: str) -> Tuple[Path, str, int, str]:
    """Host-compiler syntax check of a binding source against torch's headers (C++20, as setup.py builds it)."""
    from torch.utils.cpp_extension import include_paths

    includes = [Path(p) for p in include_paths()]
    cuda_include = Path(nvcc).resolve().parent.parent / "include"
    stub = Path(outdir) / "stub"
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in includes):
        # Generated by torch's CUDA build only: a CPU wheel ships c10/cuda without it.
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    system = [f for p in [stub, *includes, cuda_include] for f in ("-isystem", str(p))]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *system, f"-I{ROOT / 'csrc'}",
           str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return source, "host", proc.returncode, proc.stdout + proc.stderr


def compiler_problems(log: str) -> List[str]:
    # ptxas -v prints its report as "ptxas info"; anything else that says warning or error is a problem.
    return [line for line in log.splitlines()
            if not line.startswith("ptxas info") and (WARNING_RE.search(line) or "error" in line.lower())]


def table(uses: List[KernelUse], archs: List[str]) -> str:
    names = demangle(sorted({u.kernel for u in uses}))
    by_kernel: Dict[str, Dict[str, KernelUse]] = {}
    for u in uses:
        by_kernel.setdefault(names[u.kernel], {})[u.arch] = u
    head = ["kernel"] + [f"sm_{a} regs / spill st / spill ld / stack" for a in archs]
    rows = []
    for name in sorted(by_kernel):
        cells = [name]
        for a in archs:
            u = by_kernel[name].get(f"sm_{a}")
            cells.append("-" if u is None else f"{u.registers} / {u.spill_stores} / {u.spill_loads} / {u.stack}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    ap.add_argument("--json", help="also write the per-kernel numbers to this file")
    ap.add_argument("--no-binding", action="store_true", help="skip the syntax check of the torch binding")
    ap.add_argument("sources", nargs="*", help="sources to compile (default: csrc/cuda/*.cu)")
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc_build_check: nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return 2
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    sources = [Path(s).resolve() for s in args.sources] or sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print(f"nvcc_build_check: no .cu files under {CUDA_DIR}", file=sys.stderr)
        return 2

    bindings = [] if args.no_binding or importlib.util.find_spec("torch") is None else sorted(CUDA_DIR.glob("*.cpp"))

    failures: List[str] = []
    uses: List[KernelUse] = []
    with tempfile.TemporaryDirectory() as outdir, \
            concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        jobs = [pool.submit(check_binding, b, nvcc, outdir) for b in bindings]
        jobs += [pool.submit(compile_one, nvcc, s, a, outdir) for s in sources for a in archs]
        for job in concurrent.futures.as_completed(jobs):
            source, arch, rc, log = job.result()
            target = "host compiler" if arch == "host" else f"sm_{arch}"
            where = f"{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source} ({target})"
            if rc != 0:
                head = "\n".join(log.splitlines()[:40])
                failures.append(f"{where}: nvcc exited with {rc}\n{head}")
                continue
            failures += [f"{where}: {line}" for line in compiler_problems(log)]
            uses += parse_ptxas(log)

    if uses:
        print(table(uses, archs))
    for u in uses:
        if u.spill_stores or u.spill_loads:
            failures.append(f"{demangle([u.kernel])[u.kernel]} ({u.arch}): spills "
                            f"{u.spill_stores} bytes stored, {u.spill_loads} bytes loaded")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(u) for u in uses], indent=1))
    print(f"\n{len(sources)} sources x {len(archs)} architectures, {len(uses)} kernel builds, "
          f"{len(bindings)} binding syntax checks", end="")
    if failures:
        print(f", {len(failures)} problems:")
        for f in failures:
            print("  " + f)
        return 1
    print(": no warnings, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
