"""Build script: the pure-Python package, plus the compiled extension ``cbkernels._C`` when its sources exist.

The C++ CPU kernels are always built (any machine with a C++ compiler). The CUDA sources are added
when torch is a CUDA build and a CUDA toolkit is found (never decided by torch.cuda.is_available(),
which is False on GPU-less build hosts); CBKERNELS_FORCE_CUDA=1 / CBKERNELS_SKIP_CUDA=1 override.
"""

import glob
import os

from setuptools import setup


def _extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpu_sources or os.environ.get("CBKERNELS_SKIP_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # Never -march=native: the wheel must run on any x86-64 / aarch64 machine.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    force = os.environ.get("CBKERNELS_FORCE_CUDA") == "1"
    skip = os.environ.get("CBKERNELS_SKIP_CUDA") == "1"
    use_cuda = bool(cuda_sources) and not skip and (force or (torch.version.cuda is not None and CUDA_HOME is not None))
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "cbkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=[("CBKERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "cbkernels._C",
            cpu_sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
