"""``make dist-check``: the package as users install it, outside the source tree.

1. Builds the sdist (``python -m build --sdist``) and a wheel against this environment's torch
   (``pip wheel --no-build-isolation``: the prebuilt, stripped library).
2. Makes one fresh virtual environment holding only torch (``TORCH_SPEC``, the CPU wheel by default) and numpy, and
   copies it twice: one gets the wheel, the other the sdist through a plain ``pip install`` (build isolation: no
   torch in the build environment, so a pure wheel that compiles its kernels on first use).
3. In each, from an empty directory, runs a smoke test: import, ``__version__``, ``available_backends()`` (the
   ``cpu`` backend must be there: prebuilt for the wheel, compiled on first use for the sdist), one loss forward
   and backward on the ``cpu`` backend against the ``torch`` backend, ``import cbkernels.cb_focal``.

Prints the artifacts' sizes, each step's time and the smoke tests' output; exit status 0 when everything passed.
``python tools/dist_check.py [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")

SMOKE = r'''
import os, sys, time, warnings
t0 = time.time()
warnings.simplefilter("error", RuntimeWarning)  # a failed or missing build must fail the check, not warn
import torch
import cbkernels as cb
assert os.path.dirname(cb.__file__) != os.path.join(sys.argv[1], "cbkernels"), "imported the source tree"
backends = cb.available_backends()
print(f"cbkernels {cb.__version__} from {os.path.dirname(cb.__file__)}; torch {torch.__version__}; "
      f"backends {backends}; ready in {time.time() - t0:.1f} s")
assert "cpu" in backends, backends
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 37, generator=g, requires_grad=True)
y = torch.randint(0, 37, (64,), generator=g)
y[::5] = -100
counts = torch.randint(1, 500, (37,), generator=g)
for loss_type in ("softmax", "sigmoid", "focal", "softmax_focal"):
    loss = cb.class_balanced_loss(x, y, counts, loss_type=loss_type, backend="cpu")
    loss.backward()
    grad, x.grad = x.grad, None
    ref = cb.class_balanced_loss(x, y, counts, loss_type=loss_type, backend="torch")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-6 * x.grad.abs().max().item())
    x.grad = None
    print(f"  {loss_type:13} cpu {loss.item():.6f}  torch {ref.item():.6f}")
import cbkernels.cb_focal
assert cb.cb_focal is cbkernels.cb_focal and callable(cb.cb_focal)
print("smoke test passed")
'''


def run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def step(name, t0):
    print(f"  [{time.time() - t0:6.1f} s] {name}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="cbkernels-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        dist = work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(ROOT)])
        step("sdist built", t0)
        run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist),
             str(ROOT)])
        step("wheel built (against this environment's torch)", t0)
        (sdist,) = dist.glob("cbkernels-*.tar.gz")
        (wheel,) = dist.glob("cbkernels-*.whl")
        with zipfile.ZipFile(wheel) as z:
            names = {i.filename: i.file_size for i in z.infolist()}
        lib = [n for n in names if n.startswith("cbkernels/_C")]
        assert lib, f"no prebuilt library in {wheel.name}"
        assert "cbkernels/_build_info.py" in names and any(n.startswith("cbkernels/_csrc/") for n in names)
        assert any(n.endswith("/LICENSE") or n.endswith("licenses/LICENSE") for n in names), "no LICENSE in the wheel"
        print(f"  {wheel.name}: {wheel.stat().st_size / 2**20:.2f} MB ({lib[0]}: {names[lib[0]] / 2**20:.2f} MB "
              f"uncompressed); {sdist.name}: {sdist.stat().st_size / 2**20:.2f} MB")
        assert names[lib[0]] < 4 * 2**20, "the library kept its debug sections"

        base = work / "venv-base"
        shutil.rmtree(base, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(base)])
        run([str(base / "bin" / "python"), "-m", "pip", "install", "-q", TORCH_SPEC, "numpy"])
        step(f"fresh venv with {TORCH_SPEC} and numpy", t0)
        cache = work / "kernel-cache"  # the first-use build's cache: empty, so the sdist's install really builds
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "CBKERNELS_CACHE_DIR": str(cache), "PYTHONPATH": ""}
        env.pop("TRITON_INTERPRET", None)
        outside = work / "elsewhere"
        outside.mkdir(exist_ok=True)
        ok = True
        for label, artifact in (("wheel", wheel), ("sdist", sdist)):
            venv = work / f"venv-{label}"
            shutil.rmtree(venv, ignore_errors=True)
            run(["cp", "-al", str(base), str(venv)])  # hard links: seconds, not a copy of torch (pip adds files only)
            py = str(venv / "bin" / "python")
            run([py, "-m", "pip", "install", "-q", "--no-deps", str(artifact)], env=env, cwd=outside)
            step(f"{label} installed", t0)
            proc = subprocess.run([py, "-c", SMOKE, str(ROOT)], capture_output=True, text=True, env=env, cwd=outside)
            print("\n".join("    " + line for line in (proc.stdout + proc.stderr).strip().splitlines()))
            step(f"{label} smoke test {'passed' if proc.returncode == 0 else 'FAILED'}", t0)
            ok &= proc.returncode == 0
        print(f"dist-check {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
        return 0 if ok else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
