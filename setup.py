"""Build script: the pure-Python package, its C++/CUDA sources, and the prebuilt ``cbkernels._C`` when torch is
importable while building.

- ``make setup`` / ``pip install --no-build-isolation -e .`` / ``pip wheel --no-build-isolation .``: torch is the
  environment's, so ``_C`` is compiled against it (how, in ``cbkernels/_build.py``) and the wheel records that torch
  version (``cbkernels/_build_info.py``). Debug sections are stripped unless ``CBKERNELS_DEBUG=1``.
- ``pip install .`` / ``pip install cbkernels`` (build isolation: no torch in the build environment): no library
  is compiled and no torch is fetched to build one; the package carries its sources (``cbkernels/_csrc``) and
  ``cbkernels._extension`` compiles them once on first use against the user's torch (cached), or falls back to the
  pure-PyTorch backend when there is no compiler.
``CBKERNELS_SKIP_EXTENSION=1`` builds no library even with torch present.
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    # By path: importing the cbkernels package here would import torch (absent under build isolation).
    spec = importlib.util.spec_from_file_location("_cbkernels_build", os.path.join(HERE, "cbkernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as cbkernels/_csrc: what the first-use build compiles."""

    def run(self):
        super().run()
        if not os.path.isdir(os.path.join(HERE, "csrc")):
            return
        target = os.path.join(self.build_lib, "cbkernels", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _extensions():
    if not os.path.isdir("csrc") or os.environ.get("CBKERNELS_SKIP_EXTENSION") == "1":
        return [], {}
    if importlib.util.find_spec("torch") is None:
        return [], {}  # build isolation: a pure wheel that compiles on first use (cbkernels/_extension.py)
    build = _load_build_module()
    ext, cmdclass = build.extension("csrc")
    base = cmdclass["build_ext"]

    class BuildExtRecordingTorch(base):
        def finalize_options(self):
            super().finalize_options()
            if "build_temp" not in self.distribution.get_option_dict("build_ext"):  # unless given (--build-temp)
                # One object directory per Python and torch, in the tree, for every build of this checkout (the
                # editable install, `pip wheel`, `setup.py build_ext`): ninja then recompiles only what changed
                # (it tracks the commands and the headers), so `make dist-check`'s wheel links the objects
                # `make setup` compiled, and a rebuild after an edit compiles one file, not all of them.
                import sys

                import torch

                tag = f"cp{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
                self.build_temp = os.path.join(HERE, "build", f"temp-{tag}".replace("+", "_"))

        def run(self):
            super().run()
            # Beside the library, wherever it went (build/lib for a wheel, the source tree with --inplace).
            out = os.path.dirname(self.get_ext_fullpath("cbkernels._C"))
            with open(os.path.join(out, "_build_info.py"), "w") as f:
                f.write(build.build_info_source())

    return [ext], {"build_ext": BuildExtRecordingTorch}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
