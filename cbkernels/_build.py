"""How ``cbkernels._C`` is built, in one place: ``setup.py`` (a wheel or ``make setup``) and the first-use build of
``cbkernels._extension`` (a wheel without a prebuilt library, or one built for another torch) both call
``extension(...)``. Imports torch only inside the functions (``setup.py`` reads this file without torch installed).

The CPU row kernels (``csrc/cpu/isa/*.cpp``) are compiled once per instruction set, as ATen compiles its own
kernels: a baseline copy, and on x86-64 AVX2 and AVX512 copies; the binding picks one at run time from ATen's CPU
capability. A wheel never targets the build machine (no -march=native) and carries all three; a first-use build
carries the baseline and the one this CPU runs. The CUDA sources are added when torch is a CUDA build and a CUDA
toolkit is found (never decided by torch.cuda.is_available(), which is False on GPU-less build hosts).
"""

import glob
import os
import platform
from concurrent.futures import ThreadPoolExecutor

# ATen's per-capability flags (cmake/Codegen.cmake), so our kernels use the same instructions as its own.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
}

# The CUDA architectures built when TORCH_CUDA_ARCH_LIST is unset: native code for Turing (7.5, the oldest the CUDA
# backend supports: cbkernels._backends.MIN_CAPABILITY), Ampere (8.0, which also runs on 8.6/8.7/8.9: same major
# version) and Hopper (9.0), plus compute_90 PTX, which the driver compiles at first load on any newer GPU (Blackwell
# sm_100/sm_120 and later), where native code for older majors cannot run. A fixed list: left unset, torch builds
# for the build host's visible GPUs only (nothing on a GPU-less host), and torch's own list
# (torch.cuda.get_arch_list(), also empty without a GPU) would be every architecture from Turing to Blackwell, twice
# the build. tools/nvcc_build_check.py compiles all of these, and that PTX as the driver does for sm_100/110/120.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"


def all_isas():
    """Every instruction set a wheel carries on this architecture (``CBKERNELS_CPU_ISAS`` overrides)."""
    if os.environ.get("CBKERNELS_CPU_ISAS"):  # e.g. "DEFAULT" for a quick build
        return os.environ["CBKERNELS_CPU_ISAS"].split(",")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["DEFAULT", "AVX2", "AVX512"] if x86 else ["DEFAULT"]


def extension(csrc: str, *, isas=None, with_cuda=None, debug=None):
    """``(Extension, cmdclass)`` of ``cbkernels._C`` from the sources under ``csrc``.

    ``isas``: instruction sets of the CPU row kernels (default ``all_isas()``). ``with_cuda``: None decides from
    torch and the toolkit (``CBKERNELS_FORCE_CUDA=1`` / ``CBKERNELS_SKIP_CUDA=1`` override). ``debug``: keep debug
    sections in the library (default: ``CBKERNELS_DEBUG=1``); otherwise they are stripped at link time (11.5 MB ->
    under 1 MB; CUDA keeps ``-lineinfo`` in the device code either way).
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    isas = list(isas or all_isas())
    if debug is None:
        debug = os.environ.get("CBKERNELS_DEBUG") == "1"
    cpu_sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    isa_sources = sorted(glob.glob(os.path.join(csrc, "cpu", "isa", "*.cpp")))

    class BuildWithISAs(BuildExtension):
        """Compiles every csrc/cpu/isa source once per instruction set and links those objects after the
        baseline ones, so inline functions shared with the baseline code resolve to baseline copies."""

        def build_extension(self, ext):
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args

            def compile_isa(isa):
                macros = [("CPU_CAPABILITY", isa)] + ([] if isa == "DEFAULT" else [(f"CPU_CAPABILITY_{isa}", None)])
                return self.compiler.compile(
                    isa_sources,
                    output_dir=os.path.join(self.build_temp, isa.lower()),
                    macros=ext.define_macros + macros,
                    include_dirs=ext.include_dirs,
                    # GCC 12's own AVX-512 intrinsics headers trip -Wuninitialized (false positives).
                    extra_postargs={"cxx": cxx + ISA_FLAGS[isa] + ["-Wno-uninitialized"], "nvcc": []},
                    depends=ext.depends,
                )

            # One ninja run per instruction set (each has its own flags), all at once and beside the other sources'
            # compile (super().build_extension), which links only when they are done: one after another they left a
            # core idle (one source each), and they are most of the build's time.
            pool = ThreadPoolExecutor(max_workers=len(isas))
            futures = [pool.submit(compile_isa, isa) for isa in isas]
            link = self.compiler.link_shared_object

            def link_after_isas(objects, *args, **kwargs):
                isa_objects = [obj for f in futures for obj in f.result()]  # re-raises an ISA's compile error
                return link([o for o in objects if o not in isa_objects] + isa_objects, *args, **kwargs)

            self.compiler.link_shared_object = link_after_isas
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
                pool.shutdown(wait=True)

    # Never -march=native: the wheel must run on any x86-64 / aarch64 machine.
    # C++20: what torch >= 2.13 builds extensions with (its headers warn under C++17).
    # -g0 unless debugging: Python's CFLAGS ask for -g, and the debug sections were only stripped at link time after
    # costing a third of the compile time (the row kernels' DEFAULT build: 145 -> 100 s of CPU).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"] + ([] if debug else ["-g0"])
    link = ["-fopenmp"] + ([] if debug else ["-Wl,--strip-debug"])
    isa_macros = [(f"CBKERNELS_CPU_{isa}", "1") for isa in isas if isa != "DEFAULT"]
    depends = sorted(glob.glob(os.path.join(csrc, "**", "*.h"), recursive=True) + isa_sources)
    cuda_dir = os.path.join(csrc, "cuda")
    cuda_sources = sorted(glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp")))
    if with_cuda is None:
        force = os.environ.get("CBKERNELS_FORCE_CUDA") == "1"
        skip = os.environ.get("CBKERNELS_SKIP_CUDA") == "1"
        with_cuda = not skip and (force or (torch.version.cuda is not None and CUDA_HOME is not None))
    include = [os.path.abspath(csrc)]
    if with_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        ext = CUDAExtension(
            "cbkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include,
            define_macros=[("CBKERNELS_WITH_CUDA", "1")] + isa_macros,
            # No --use_fast_math: the kernels call the hardware approximations explicitly where they are
            # accurate enough (csrc/cuda/cb_loss_cuda_math.cuh); the per-row math of cb_math.h (powf, logf, /)
            # must stay IEEE, or e.g. the softmax-focal modulator loses ~1e-5 relative.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link,
            depends=depends,
        )
    else:
        ext = CppExtension("cbkernels._C", cpu_sources, include_dirs=include, define_macros=isa_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link, depends=depends)
    return ext, {"build_ext": BuildWithISAs.with_options(use_ninja=True)}


def build_info_source() -> str:
    """``cbkernels/_build_info.py`` of a library built now: what the loader checks before it imports ``_C``."""
    import torch

    return ('"""Written by the build of cbkernels._C (cbkernels/_build.py): the torch it was compiled against."""\n\n'
            f"TORCH_VERSION = {torch.__version__!r}\n")
