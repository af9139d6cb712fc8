"""How ``cbkernels._C`` is found for the running torch (cbkernels/_extension.py), each case in a fresh process.

The whole install path (sdist and wheel into fresh environments, the first-use build included) is
``tools/dist_check.py`` (``make dist-check``, run by ``make test``); these tests pin the decisions around it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cbkernels as cb

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif("cpu" not in cb.available_backends(), reason="needs the compiled CPU backend")


def _run(code: str, tmp_path: Path, *, other_torch: bool = False, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CBKERNELS_CACHE_DIR": str(tmp_path / "cache"), **env}
    full_env.pop("TRITON_INTERPRET", None)
    code = (PRELUDE if other_torch else "") + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=600)


PRELUDE = """
import warnings
import cbkernels._extension as E
E._built_for = lambda: "0.0.0+another-torch"  # the library beside the package is for another torch: never loaded
"""


def test_prebuilt_library_for_this_torch_is_loaded(tmp_path):
    proc = _run("""
        import torch, cbkernels as cb, cbkernels._extension as E
        from cbkernels import _build_info
        assert _build_info.TORCH_VERSION == torch.__version__
        assert "cpu" in cb.available_backends()
        assert E.load().__file__.startswith(str(__import__("pathlib").Path(cb.__file__).parent))
        print("ok")
    """, tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    assert "compiling" not in proc.stderr


def test_library_for_another_torch_is_never_loaded_and_no_compiler_falls_back_with_one_warning(tmp_path):
    proc = _run("""
        E._compiler = lambda: None
        import torch, cbkernels as cb
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = cb.available_backends()
            second = cb.available_backends()
            x = torch.randn(6, 4, requires_grad=True)
            loss = cb.cb_focal(x, torch.tensor([0, 1, 2, 3, 0, 1]))  # auto: the torch backend
            loss.backward()
        assert "cpu" not in first and first == second, (first, second)
        assert "cbkernels._C" not in __import__("sys").modules
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and "'torch' backend" in msgs[0], msgs
        try:
            cb.cb_focal(x, torch.tensor([0, 1, 2, 3, 0, 1]), backend="cpu")
        except RuntimeError as e:
            assert "not available" in str(e)
        else:
            raise AssertionError("backend='cpu' without its library must raise")
        print("ok", x.grad.shape)
    """, tmp_path, other_torch=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_a_cached_first_use_build_is_loaded_without_building(tmp_path):
    # Plant the in-tree library where the first-use build would have cached it for this setup.
    proc = _run("""
        import shutil, cbkernels
        from pathlib import Path
        target = E._cache_dir(E._sources()) / E._library_name()
        target.parent.mkdir(parents=True)
        shutil.copy(next(Path(cbkernels.__file__).parent.glob("_C*.so")), target)
        E._compile = lambda *a: (_ for _ in ()).throw(AssertionError("must not build"))
        assert "cpu" in cbkernels.available_backends()
        assert E.load().__file__ == str(target), E.load().__file__
        print("ok", target.parent.name)
    """, tmp_path, other_torch=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    # The cache key names what the library depends on.
    key = proc.stdout.split()[-1]
    assert key.startswith(cb.__version__ + "-torch") and "cpython" in key and "default" in key


def test_failed_build_warns_with_its_log_and_falls_back(tmp_path):
    broken = tmp_path / "bin"
    broken.mkdir()
    for name in ("c++", "g++", "gcc", "cc"):
        tool = broken / name
        tool.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
        tool.chmod(0o755)
    proc = _run("""
        import cbkernels as cb
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backends = cb.available_backends()
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert "cpu" not in backends and len(msgs) == 1 and "building its kernels failed (log: " in msgs[0], msgs
        log = msgs[0].split("(log: ")[1].split(")")[0]
        assert "bin/c++" in open(log).read()  # the log shows the compiler that failed
        print("ok")
    """, tmp_path, other_torch=True, CXX=str(broken / "c++"), CC=str(broken / "cc"),
                PATH=f"{broken}:{os.environ['PATH']}")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    assert "cbkernels: compiling its CPU kernels" in proc.stderr  # the progress message


def test_no_build_opt_out(tmp_path):
    proc = _run("""
        import cbkernels as cb
        assert "cpu" not in cb.available_backends()
        print("ok")
    """, tmp_path, other_torch=True, CBKERNELS_NO_BUILD="1")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("_C*"))


def test_sources_ship_with_the_package_build(tmp_path):
    # build_py copies csrc/ into the package as cbkernels/_csrc (what a wheel's first-use build compiles).
    if shutil.which("git") is None:
        pytest.skip("needs git to list the tracked sources")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "CBKERNELS_SKIP_EXTENSION": "1"})
    assert proc.returncode == 0, proc.stderr
    shipped = {p.relative_to(tmp_path / "cbkernels" / "_csrc") for p in (tmp_path / "cbkernels" / "_csrc").rglob("*")
               if p.is_file()}
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert {Path(t).relative_to("csrc") for t in tracked} <= shipped
