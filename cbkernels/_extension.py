"""Loads ``cbkernels._C``, the compiled CPU (and CUDA) kernels, for the torch that is running.

In order:

1. the library that came with the package (a wheel built with ``--no-build-isolation``, or ``make setup``), when it
   was compiled against this torch (``_build_info.TORCH_VERSION``): a library built for another torch can fail to
   load, or load and crash, so it is never tried;
2. a library this module built earlier for this exact setup, cached under ``$CBKERNELS_CACHE_DIR`` (default
   ``~/.cache/cbkernels``) in a directory named after the package version, the torch version, the Python ABI, the
   machine, the CPU's instruction set and a hash of the sources;
3. otherwise it builds one now from the sources the package carries (``cbkernels/_csrc``, or ``csrc`` of a source
   checkout), once per process and under a file lock (several ranks starting at once build it once), printing what
   it does on stderr: about a minute with a C++ compiler. Without a compiler, or when the build fails, it warns
   once and returns None: the ``cpu`` backend is then unavailable and ``backend="auto"`` uses the pure-PyTorch one.

This is DeepSpeed's op-builder design (ops compiled on first use through ``torch.utils.cpp_extension``, cached per
torch version) rather than per-torch prebuilt wheels as torchvision ships: a PyTorch extension's binary interface is
only stable for one torch release, and this package must work with whichever torch >= 2.11 the user has. A wheel
built against the user's torch skips the build entirely. ``CBKERNELS_NO_BUILD=1`` disables step 3.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

_PACKAGE = Path(__file__).resolve().parent
_STATE: dict = {}  # "module": the loaded module or None, once decided in this process


def load() -> Optional[ModuleType]:
    """``cbkernels._C`` for this torch (also registered in ``sys.modules``), or None when there is none."""
    if "module" not in _STATE:
        _STATE["module"] = _load()
    return _STATE["module"]


def _load() -> Optional[ModuleType]:
    if "cbkernels._C" in sys.modules:
        return sys.modules["cbkernels._C"]
    import torch

    prebuilt = importlib.util.find_spec("cbkernels._C")
    if prebuilt is not None and _built_for() == torch.__version__:
        return importlib.import_module("cbkernels._C")
    sources = _sources()
    if sources is None:
        if prebuilt is not None:
            _warn(f"its compiled kernels were built for torch {_built_for() or '(unknown)'}, not torch "
                  f"{torch.__version__}, and no sources to rebuild them came with it")
        return None
    cached = _cache_dir(sources) / _library_name()
    if not cached.exists():
        if os.environ.get("CBKERNELS_NO_BUILD") == "1":
            return None
        if not _build(sources, cached.parent):
            return None
    return _import_from(cached)


def _built_for() -> Optional[str]:
    try:
        from . import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


def _sources() -> Optional[Path]:
    for candidate in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc"):  # an installed package, a source checkout
        if (candidate / "cb_params.h").is_file():
            return candidate
    return None


def cpu_isa() -> str:
    """The instruction set ATen's kernels use on this CPU (ATEN_CPU_CAPABILITY can lower it)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return "AVX512"
    return cap if cap in ("AVX2", "DEFAULT") else "DEFAULT"


def _isas() -> list:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isa = cpu_isa() if x86 else "DEFAULT"
    return ["DEFAULT"] + ([isa] if isa != "DEFAULT" else [])


def _with_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return (torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()
            and os.environ.get("CBKERNELS_SKIP_CUDA") != "1")


def _cache_dir(sources: Path) -> Path:
    import torch

    from ._version import __version__

    digest = hashlib.sha256()
    for path in sorted(sources.rglob("*")):
        if path.is_file() and path.suffix in (".h", ".cuh", ".cpp", ".cu"):
            digest.update(str(path.relative_to(sources)).encode())
            digest.update(path.read_bytes())
    digest.update(_PACKAGE.joinpath("_build.py").read_bytes())
    cuda = f"-cuda{torch.version.cuda}" if _with_cuda() else ""
    name = (f"{__version__}-torch{torch.__version__}{cuda}-{sys.implementation.cache_tag}-{platform.machine()}-"
            f"{'-'.join(_isas()).lower()}-{digest.hexdigest()[:12]}").replace("+", "_")
    root = Path(os.environ.get("CBKERNELS_CACHE_DIR") or Path.home() / ".cache" / "cbkernels")
    return root / name


def _library_name() -> str:
    return "_C" + (importlib.machinery.EXTENSION_SUFFIXES[0] if importlib.machinery.EXTENSION_SUFFIXES
                   else sysconfig.get_config_var("EXT_SUFFIX"))


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++") or shutil.which("clang++")


def _build(sources: Path, out: Path) -> bool:
    """Compiles the sources into ``out`` (under a lock); True when the library is there afterwards."""
    import torch

    if _compiler() is None:
        _warn("no C++ compiler was found (set CXX, or install g++/clang++) to build its CPU kernels for torch "
              f"{torch.__version__}")
        return False
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / ".lock"
    with open(lock_path, "w") as lock:
        _lock(lock)
        try:
            if (out / _library_name()).exists():  # another process built it while this one waited
                return True
            return _compile(sources, out)
        finally:
            _unlock(lock)


def _compile(sources: Path, out: Path) -> bool:
    import torch

    isas = _isas()
    cuda = _with_cuda()
    what = "CPU" + (" and CUDA" if cuda else "")
    print(f"cbkernels: compiling its {what} kernels for torch {torch.__version__} ({', '.join(isas)}), once; "
          f"cached in {out}", file=sys.stderr, flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cbkernels-build-") as tmp:
        work = Path(tmp)
        shutil.copytree(sources, work / "csrc")
        shutil.copy(_PACKAGE / "_build.py", work / "_cbkernels_build.py")
        script = (
            "import sys\n"
            "from setuptools import setup\n"
            "import _cbkernels_build as b\n"
            f"ext, cmdclass = b.extension('csrc', isas={isas!r}, with_cuda={cuda!r})\n"
            "setup(name='cbkernels-kernels', ext_modules=[ext], cmdclass=cmdclass, script_args=sys.argv[1:])\n"
        )
        (work / "build_kernels.py").write_text(script)
        env = dict(os.environ)
        if cuda:
            major, minor = torch.cuda.get_device_capability()
            env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        cmd = [sys.executable, "build_kernels.py", "-q", "build_ext", "--build-lib", str(work / "lib"),
               "--build-temp", str(work / "temp")]
        log = out / "build.log"
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
        built = list((work / "lib" / "cbkernels").glob("_C*"))
        if proc.returncode != 0 or not built:
            _warn(f"building its kernels failed (log: {log})")
            return False
        tmp_target = out / (_library_name() + f".{os.getpid()}.tmp")
        shutil.copy(built[0], tmp_target)
        os.replace(tmp_target, out / _library_name())  # atomic: a reader never sees half a library
    print(f"cbkernels: built in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return True


def _import_from(path: Path) -> Optional[ModuleType]:
    spec = importlib.util.spec_from_file_location("cbkernels._C", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        _warn(f"its compiled kernels in {path} failed to load ({e})")
        return None
    sys.modules["cbkernels._C"] = module
    return module


def _warn(problem: str) -> None:
    warnings.warn(f"cbkernels: {problem}. The 'cpu' backend is unavailable; backend='auto' uses the pure-PyTorch "
                  "'torch' backend (correct, slower). See 'Install' in the README.", RuntimeWarning, stacklevel=3)


if os.name == "nt":  # pragma: no cover - the package builds its kernels on Linux and macOS
    import msvcrt

    def _lock(f):
        msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)

    def _unlock(f):
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(f):
        fcntl.flock(f, fcntl.LOCK_EX)

    def _unlock(f):
        fcntl.flock(f, fcntl.LOCK_UN)
