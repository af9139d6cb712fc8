"""Build and drive the CPU emulation of the CUDA kernels (see cuda_emu.h): no GPU, no CUDA torch.

``load()`` compiles ``csrc/cuda/*.cu`` as C++ with g++ against the CUDA toolkit's headers (cached by source
hash under ``build/cuda_emu``); ``forward()`` runs the whole launcher stack (plan, dispatch, kernels) on CPU
tensors, the way the binding runs it on CUDA tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
PATHS = {"auto": 0, "rows": 1, "stream": 2}
# Same defines as torch's CUDAExtension: no implicit half/bfloat16 conversions.
TORCH_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def cuda_include() -> Optional[Path]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    return None


def unavailable_reason() -> Optional[str]:
    if shutil.which("g++") is None:
        return "no g++"
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_fp16.h) for the CPU emulation of the kernels"
    return None


_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
         ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
         ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
_LIB = None


def load() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    inputs = sources + sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + sorted((ROOT / "csrc" / "cuda").glob("*.h"))
    inputs += [ROOT / "csrc" / "cb_math.h", HERE / "cuda_emu.h", HERE / "cuda_emu.cpp"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out = ROOT / "build" / "cuda_emu" / f"libcbk_cuda_emu_{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-g0", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas",
               f"-I{cuda_include()}", f"-I{ROOT / 'csrc'}", "-include", str(HERE / "cuda_emu.h"), *TORCH_DEFINES,
               "-x", "c++", *map(str, sources), "-x", "none", str(HERE / "cuda_emu.cpp"),
               "-Wl,--no-undefined", "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed:\n{proc.stderr[-6000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.cbk_emu_plan.argtypes = _ARGS + [ctypes.POINTER(ctypes.c_int64)]
    lib.cbk_emu_launch.argtypes = _ARGS
    _LIB = lib
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _args(logits, grad, target, weight, scale, loss, loss_type, gamma, eps, ignore_index, num_sms, ws,
          path, threads_per_row, splits):
    n, c = logits.shape
    return (_ptr(logits), logits.stride(0), _ptr(grad), grad.stride(0) if grad is not None else 0, _ptr(target),
            int(target.dtype == torch.int32), _ptr(weight), _ptr(scale), int(scale.dtype == torch.float64),
            _ptr(loss), n, c, loss_type, float(gamma), float(eps), ignore_index, DTYPES[logits.dtype], num_sms,
            _ptr(ws), PATHS[path], threads_per_row, splits)


def plan(logits, loss_type, *, num_sms=4, path="auto", threads_per_row=0, splits=0) -> Optional[dict]:
    """The launch plan (a dict) for these logits, or None when the forced plan is invalid."""
    lib = load()
    out = (ctypes.c_int64 * 7)()
    n, c = logits.shape
    args = (None, logits.stride(0) if logits.dim() == 2 else c, None, 0, None, 0, None, None, 0, None, n, c,
            loss_type, 0.5, 0.0, -100, DTYPES[logits.dtype], num_sms, None, PATHS[path], threads_per_row, splits)
    if lib.cbk_emu_plan(*args, out) != 0:
        return None
    keys = ("path", "threads_per_row", "block_threads", "grid_rows", "splits", "chunks_per_split", "workspace")
    return dict(zip(keys, list(out)))


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, loss_type: int,
            gamma: float = 0.0, label_smoothing: float = 0.0, ignore_index: int = -100, *,
            grad: Optional[torch.Tensor] = None, compute_grad: bool = True, num_sms: int = 4, path: str = "auto",
            threads_per_row: int = 0, splits: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """Per-row loss and ``scale * dl/dz`` from the emulated kernels; ``grad`` may be the logits (in place) or any
    buffer of the logits' shape. Outputs start as NaN, so an element the kernels leave unwritten shows."""
    lib = load()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.full((logits.shape[0],), float("nan"), dtype=acc)
    if grad is None and compute_grad:
        grad = torch.full(logits.shape, float("nan"), dtype=logits.dtype)
    p = plan(logits, loss_type, num_sms=num_sms, path=path, threads_per_row=threads_per_row, splits=splits)
    if p is None:
        raise ValueError("invalid forced plan")
    ws = torch.empty(p["workspace"], dtype=torch.uint8) if p["workspace"] else None
    rc = lib.cbk_emu_launch(*_args(logits, grad, target, weight, scale, loss, loss_type, gamma, label_smoothing,
                                   ignore_index, num_sms, ws, path, threads_per_row, splits))
    if rc != 0:
        raise RuntimeError(f"cb_loss_cuda_launch returned CUDA error {rc}")
    return loss, grad, p
