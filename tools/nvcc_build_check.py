#!/usr/bin/env python3
"""Compile every CUDA source of cbkernels with plain nvcc and check its resource use.

Each ``csrc/cuda/*.cu`` is compiled for the architectures ``setup.py`` builds by default (``cbkernels/_build.py``'s
``DEFAULT_CUDA_ARCH_LIST``, e.g. ``7.5;8.0;9.0+PTX``) with its nvcc flags and torch's
``CUDAExtension``, plus warnings as errors (``-Xcompiler -Wall,-Wextra,-Werror``, ``--Werror all-warnings``) and
``-Xptxas -v``: native code for each listed architecture and, for a ``+PTX`` one, the PTX plus the code ptxas makes
of it for the first architecture of every newer major version nvcc knows (sm_100, sm_110, sm_120 with CUDA 13):
what the driver compiles that PTX into at first load on those GPUs. One nvcc run per source and virtual
architecture. ptxas's report is parsed into one row per kernel (registers, spill stores, spill loads, stack, per
target) and printed as a table. Exit status 1 on any compiler error or warning, on any spill (a kernel that spills
has outgrown its register budget) and, building every source, on a kernel of EXPECTED_KERNELS missing for a storage
type or target (the index-target and dense-target instantiations of each path).

No GPU and no CUDA build of torch needed: the kernels include no torch header. When torch is importable, the
binding (``csrc/cuda/*.cpp``, the one file that sees torch) is also compiled with ``-fsyntax-only`` against
torch's headers (a CPU wheel ships the CUDA ones too), so it does not meet a compiler for the first time on a
GPU machine. Usage:

    python tools/nvcc_build_check.py [--arch "7.5;8.0;9.0+PTX"] [--jit 100,120] [--jobs N] [--json out.json]
                                     [--no-binding]

``--arch`` takes TORCH_CUDA_ARCH_LIST's syntax (``80,90`` also works); ``--jit ""`` compiles no PTX into code.
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
BUILD_FILE = ROOT / "cbkernels" / "_build.py"  # how setup.py builds the extension
CUDA_DIR = ROOT / "csrc" / "cuda"

# The build's nvcc flags (cbkernels/_build.py, which setup.py uses; read from it, this default if that fails),
# then torch.utils.cpp_extension's COMMON_NVCC_FLAGS (kernels must build without the implicit half/bfloat16
# conversions those defines remove).
DEFAULT_SETUP_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
STRICT_FLAGS = ["-Xcompiler", "-Wall,-Wextra,-Werror,-fPIC", "--Werror", "all-warnings", "-Xptxas", "-v"]

DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"  # when cbkernels/_build.py's DEFAULT_CUDA_ARCH_LIST cannot be read

# Every kernel the launchers instantiate, per storage type T (and its compute type A), as the table names them: a
# flag's kernels missing from a build of every source means a launcher lost them. The index kernels: the plain ones
# (every sigmoid focal exponent), then two transform kinds; the dense-target ones (cb_dense_*): one per path, with the
# transforms and the focal exponent at run time.
STORAGE_TYPES = {"float": "float", "half": "float", "bf16": "float", "double": "double"}
EXPECTED_KERNELS = (
    [f"cb_softmax_rows_kernel<{{T}},{tf}>" for tf in ("tf_off", "tf_affine", "tf_capped")]
    + [f"cb_softmax_split_finish_kernel<{{T}},{tf}>" for tf in ("tf_off", "tf_affine", "tf_capped")]
    + [f"cb_loss_stream_kernel<{{T}},SoftmaxFamily,{tf}>" for tf in ("tf_off", "tf_affine", "tf_capped")]
    + [f"cb_loss_stream_kernel<{{T}},SigmoidFamily<G{g}>,tf_off>" for g in "0H12X"]
    + [f"cb_loss_stream_kernel<{{T}},SigmoidFamily<G{g}>,{tf}>" for g in "0X" for tf in ("tf_affine", "tf_capped")]
    + ["cb_sigmoid_split_sum_kernel<{A}>", "cb_reduction_scale_kernel<{A}>", "cb_reduce_rows_kernel<{A}>"]
    + ["cb_dense_softmax_rows_kernel<{T}>", "cb_dense_stream_kernel<{T},SoftmaxFamily>",
       "cb_dense_stream_kernel<{T},SigmoidFamily<GX>>", "cb_dense_split_finish_kernel<{T}>",
       "cb_dense_row_weight_kernel<{T}>", "cb_dense_split_sum_kernel<{A}>", "cb_dense_reduction_scale_kernel<{A}>"]
)


def expected_kernels() -> List[str]:
    return sorted({k.format(T=t, A=a) for t, a in STORAGE_TYPES.items() for k in EXPECTED_KERNELS})


ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_RE = re.compile(r"Used (\d+) registers")
WARNING_RE = re.compile(r"\bwarning\b", re.IGNORECASE)


@dataclass
class KernelUse:
    kernel: str
    arch: str  # the real architecture, "sm_100"
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    ptx: str = ""  # "compute_90" when the code was made from that PTX for a newer architecture (the driver's JIT)

    @property
    def target(self) -> str:
        return f"{self.arch} from {self.ptx}" if self.ptx else self.arch


@dataclass(frozen=True)
class Target:
    """One nvcc run's ``-gencode``: a virtual architecture and the codes made from it."""
    virtual: str  # "90"
    native: bool  # sm_<virtual> code
    ptx: bool  # the PTX itself, embedded for the driver
    jit: Tuple[str, ...] = ()  # newer real architectures ptxas compiles the PTX for, as the driver would

    def gencode(self) -> str:
        codes = ([f"sm_{self.virtual}"] if self.native else []) + [f"sm_{a}" for a in self.jit]
        codes += [f"compute_{self.virtual}"] if self.ptx else []
        return f"-gencode=arch=compute_{self.virtual},code=[{','.join(codes)}]"

    def columns(self) -> List[str]:
        """The table's columns for this run's code, named as KernelUse.target names them."""
        return ([f"sm_{self.virtual}"] if self.native else []) + [f"sm_{a} from compute_{self.virtual}"
                                                                   for a in self.jit]


def setup_nvcc_flags() -> List[str]:
    m = re.search(r'"nvcc":\s*(\[[^\]]*\])', BUILD_FILE.read_text())
    try:
        flags = ast.literal_eval(m.group(1)) if m else None
    except (ValueError, SyntaxError):
        flags = None
    return flags if isinstance(flags, list) and all(isinstance(f, str) for f in flags) else DEFAULT_SETUP_FLAGS


def setup_arch_list() -> str:
    m = re.search(r'^DEFAULT_CUDA_ARCH_LIST\s*=\s*"([^"]+)"', BUILD_FILE.read_text(), re.MULTILINE)
    return m.group(1) if m else DEFAULT_ARCH_LIST


def parse_arch_list(spec: str) -> List[Tuple[str, bool]]:
    """TORCH_CUDA_ARCH_LIST syntax ("7.5;8.0;9.0+PTX", also "75,80 90") -> [("75", False), ("90", True)]."""
    out = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)(?:\.(\d))?(\+PTX)?", entry, re.IGNORECASE)
        if m is None:
            raise ValueError(f"bad architecture {entry!r} in {spec!r} (want e.g. 8.0, 9.0+PTX or 90)")
        out.append((m.group(1) + (m.group(2) or ""), bool(m.group(3))))
    return out


def nvcc_real_archs(nvcc: str) -> List[str]:
    """The real architectures this nvcc compiles for, ascending ("75", "80", ..., "121")."""
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=False).stdout
    return sorted({m for m in re.findall(r"\bsm_(\d+)\b", out)}, key=int)


def newer_majors(virtual: str, real: List[str]) -> List[str]:
    """The first real architecture of every major version newer than ``virtual``'s: the GPUs its PTX serves that
    no native code of an older major can run on."""
    firsts: Dict[int, str] = {}
    for a in sorted(real, key=int):
        firsts.setdefault(int(a) // 10, a)
    return [a for major, a in sorted(firsts.items()) if major > int(virtual) // 10]


def plan_targets(arch_list: List[Tuple[str, bool]], jit: Optional[List[str]]) -> List[Target]:
    """One Target per virtual architecture; ``jit`` = the real architectures a PTX target is also compiled for,
    less those that native code of the list serves (the driver runs native code of the same major version)."""
    natives: Dict[str, bool] = {}
    for arch, ptx in arch_list:
        natives[arch] = natives.get(arch, False) or ptx

    def served_natively(j: str) -> bool:
        return any(int(a) // 10 == int(j) // 10 and int(a) <= int(j) for a in natives)

    return [Target(a, True, ptx, tuple(j for j in (jit or []) if int(j) > int(a) and not served_natively(j))
                   if ptx else ()) for a, ptx in natives.items()]


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
    name = re.sub(r"\(TfKind\)(\d)", lambda m: ("tf_off", "tf_affine", "tf_capped", "tf_any")[int(m.group(1))], name)
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


def compile_one(nvcc: str, source: Path, target: Target, outdir: str) -> Tuple[Path, str, int, str]:
    obj = os.path.join(outdir, f"{source.stem}_compute{target.virtual}.o")
    cmd = [nvcc, *setup_nvcc_flags(), *TORCH_FLAGS, *STRICT_FLAGS, f"-I{ROOT / 'csrc'}", target.gencode(),
           "-c", str(source), "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return source, f"compute_{target.virtual}", proc.returncode, proc.stdout + proc.stderr


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


def table(uses: List[KernelUse], columns: List[str]) -> str:
    names = demangle(sorted({u.kernel for u in uses}))
    by_kernel: Dict[str, Dict[str, KernelUse]] = {}
    for u in uses:
        by_kernel.setdefault(names[u.kernel], {})[u.target] = u
    head = ["kernel (registers / spill stores / spill loads / stack bytes)"] + columns
    rows = []
    for name in sorted(by_kernel):
        cells = [name]
        for a in columns:
            u = by_kernel[name].get(a)
            cells.append("-" if u is None else f"{u.registers} / {u.spill_stores} / {u.spill_loads} / {u.stack}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=None,
                    help=f"architectures, TORCH_CUDA_ARCH_LIST syntax (default, the build's: {setup_arch_list()})")
    ap.add_argument("--jit", default=None,
                    help="real architectures to compile a +PTX target's PTX for, comma-separated (default: the first "
                         "of every newer major version nvcc knows)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    ap.add_argument("--json", help="also write the per-kernel numbers to this file")
    ap.add_argument("--no-binding", action="store_true", help="skip the syntax check of the torch binding")
    ap.add_argument("sources", nargs="*", help="sources to compile (default: csrc/cuda/*.cu)")
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc_build_check: nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return 2
    try:
        arch_list = parse_arch_list(setup_arch_list() if args.arch is None else args.arch)
    except ValueError as e:
        print(f"nvcc_build_check: {e}", file=sys.stderr)
        return 2
    real = nvcc_real_archs(nvcc)
    if args.jit is not None:
        jit = [a.strip() for a in args.jit.split(",") if a.strip()]
    else:
        jit = sorted({a for arch, ptx in arch_list if ptx for a in newer_majors(arch, real)}, key=int)
    targets = plan_targets(arch_list, jit)
    columns = [c for t in targets for c in t.columns()]
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
        # The runs with the most code to make first: the +PTX one ptxas's the PTX for several architectures.
        order = sorted(targets, key=lambda t: -len(t.columns()))
        jobs += [pool.submit(compile_one, nvcc, s, t, outdir) for t in order for s in sources]
        for job in concurrent.futures.as_completed(jobs):
            source, arch, rc, log = job.result()
            target = "host compiler" if arch == "host" else arch
            where = f"{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source} ({target})"
            if rc != 0:
                head = "\n".join(log.splitlines()[:40])
                failures.append(f"{where}: nvcc exited with {rc}\n{head}")
                continue
            failures += [f"{where}: {line}" for line in compiler_problems(log)]
            virtual = arch.removeprefix("compute_")
            for u in parse_ptxas(log):
                u.ptx = "" if u.arch == f"sm_{virtual}" else arch
                uses.append(u)

    if uses:
        print(table(uses, columns))
    if not args.sources and shutil.which("c++filt"):  # every source: every kernel the launchers use, every target
        names = demangle(sorted({u.kernel for u in uses}))
        built = {(names[u.kernel], u.target) for u in uses}
        failures += [f"{k} ({c}): not built" for k in expected_kernels() for c in columns if (k, c) not in built]
    for u in uses:
        if u.spill_stores or u.spill_loads:
            failures.append(f"{demangle([u.kernel])[u.kernel]} ({u.target}): spills "
                            f"{u.spill_stores} bytes stored, {u.spill_loads} bytes loaded")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(u) for u in uses], indent=1))
    ptx = [f"compute_{t.virtual}" for t in targets if t.ptx]
    print(f"\n{len(sources)} sources x {len(columns)} architectures ({', '.join(columns)}; PTX: "
          f"{', '.join(ptx) or 'none'}), {len(uses)} kernel builds, {len(bindings)} binding syntax checks", end="")
    if failures:
        print(f", {len(failures)} problems:")
        for f in failures:
            print("  " + f)
        return 1
    print(": no warnings, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
