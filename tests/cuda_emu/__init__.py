"""Build and drive the CPU emulation of the CUDA kernels (see cuda_emu.h): no GPU, no CUDA torch.

``load()`` compiles ``csrc/cuda/*.cu`` as C++ with g++ against the CUDA toolkit's headers (cached by source
hash under ``build/cuda_emu``); ``forward()`` runs the whole launcher stack (plan, dispatch, kernels) on CPU
tensors, the way the binding runs it on CUDA tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
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


# The ctypes mirror of CBLossCudaParams, field by field from its definition (csrc/cb_params.h, then the launch
# fields of csrc/cuda/cb_loss_cuda.h) rather than a copy here; load() checks its size against the compiled struct.
_CTYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "bool": ctypes.c_bool, "double": ctypes.c_double,
           "Dtype": ctypes.c_int, "Path": ctypes.c_int}  # the enums are `enum class : int`
_FIELD = re.compile(r"^\s*(?:const\s+)?(\w+)\s*(\*?)\s*(\w+);", re.MULTILINE)


def _struct_fields(header: Path, head: str) -> list:
    text = header.read_text()
    body = text[text.index(head + " {") + len(head) + 2:]
    body = re.sub(r"//[^\n]*", "", body[:body.index("\n};")])
    return [(name, ctypes.c_void_p if star else _CTYPES[ctype]) for ctype, star, name in _FIELD.findall(body)]


class _BaseParams(ctypes.Structure):
    _fields_ = _struct_fields(ROOT / "csrc" / "cb_params.h", "struct CBLossParams")


# A subclass, as in C++: the launch fields start after the base's tail padding (which a C++ derived struct of a POD
# base never reuses), not right after its last field.
class Params(_BaseParams):
    _fields_ = _struct_fields(ROOT / "csrc" / "cuda" / "cb_loss_cuda.h", "struct CBLossCudaParams : CBLossParams")


_LIB = None


def load() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    inputs = sources + sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + sorted((ROOT / "csrc" / "cuda").glob("*.h"))
    inputs += [ROOT / "csrc" / "cb_math.h", ROOT / "csrc" / "cb_params.h", HERE / "cuda_emu.h", HERE / "cuda_emu.cpp"]
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
    lib.cbk_emu_params_size.restype = ctypes.c_size_t
    if lib.cbk_emu_params_size() != ctypes.sizeof(Params):
        raise RuntimeError(f"tests/cuda_emu: the ctypes mirror of CBLossCudaParams ({ctypes.sizeof(Params)} bytes) "
                           f"does not match the compiled struct ({lib.cbk_emu_params_size()} bytes)")
    lib.cbk_emu_plan.argtypes = [ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_int64)]
    lib.cbk_emu_launch.argtypes = [ctypes.POINTER(Params)]
    _LIB = lib
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _params(logits, *, num_sms, path, threads_per_row, splits, **fields) -> Params:
    """The launch params for these logits (what set_params fills from tensors), the other fields by name."""
    n, c = logits.shape
    p = Params(logits=logits.data_ptr(), logits_row_stride=logits.stride(0) if logits.dim() == 2 else c,
               num_rows=n, num_classes=c, dtype=DTYPES[logits.dtype], num_sms=num_sms, force_path=PATHS[path],
               force_threads_per_row=threads_per_row, force_splits=splits)
    for name, value in fields.items():
        setattr(p, name, value)
    return p


def plan(logits, loss_type, *, num_sms=4, path="auto", threads_per_row=0, splits=0, **fields) -> Optional[dict]:
    """The launch plan (a dict) for these logits, or None when the forced plan is invalid. ``fields`` are further
    params by name (the workspace depends on dense_target, weight_mode, reduction and compute_scale)."""
    lib = load()
    out = (ctypes.c_int64 * 7)()
    p = _params(logits, num_sms=num_sms, path=path, threads_per_row=threads_per_row, splits=splits,
                loss_type=loss_type, gamma=0.5, logit_scale=1.0, **fields)
    if lib.cbk_emu_plan(ctypes.byref(p), out) != 0:
        return None
    keys = ("path", "threads_per_row", "block_threads", "grid_rows", "splits", "chunks_per_split", "workspace")
    return dict(zip(keys, list(out)))


REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, "weighted_mean": 3}
WEIGHT_MODES = {"sample": 0, "class": 1}


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
            loss_type: int, gamma: float = 0.0, label_smoothing: float = 0.0, ignore_index: int = -100, *,
            grad: Optional[torch.Tensor] = None, compute_grad: bool = True, num_sms: int = 4, path: str = "auto",
            threads_per_row: int = 0, splits: int = 0, reduction: str = "none", softcap: float = 0.0,
            logit_offset: Optional[torch.Tensor] = None, target_margin: Optional[torch.Tensor] = None,
            logit_scale: float = 1.0, z_loss: float = 0.0, z_rows: bool = False,
            weight_mode: str = "sample") -> Tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """The loss and ``s * dl/dz`` from the emulated kernels, as the binding launches them: the loss is per row for
    ``reduction="none"``, else the 0-d ``s * sum_i l_i``; without ``scale`` the launch computes ``s`` of the
    reduction (its value is returned in the plan dict as ``"scale"``). ``grad`` may be the logits (in place) or
    any buffer of the logits' shape. The logit transforms and z-loss (SPEC sections 10-11) as the op takes them
    (softcap 0: none; ``logit_offset`` / ``target_margin`` float32 ``[C]``); ``z_rows=True`` asks for each row's
    z-loss term, returned in the plan dict as ``"z_rows"``. A floating ``target`` of the logits' shape is a dense
    target (SPEC section 9; the logits' dtype or float32, any row stride, unit column stride), weighted per
    ``weight_mode`` ("sample" or "class"). Outputs start as NaN, so an element the kernels leave unwritten shows."""
    lib = load()
    for vec in (logit_offset, target_margin):
        assert vec is None or (vec.dtype == torch.float32 and vec.shape == logits.shape[1:] and vec.is_contiguous())
    zr = torch.full((logits.shape[0],), float("nan"), dtype=torch.float64 if logits.dtype == torch.float64
                    else torch.float32) if z_rows else None
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.full((logits.shape[0],), float("nan"), dtype=acc)
    reduced = torch.full((), float("nan"), dtype=acc) if reduction != "none" else None
    compute_scale = scale is None and reduction in ("mean", "weighted_mean")
    if compute_scale:
        scale = torch.full((), float("nan"), dtype=acc)
    if grad is None and compute_grad:
        grad = torch.full(logits.shape, float("nan"), dtype=logits.dtype)
    launch = dict(num_sms=num_sms, path=path, threads_per_row=threads_per_row, splits=splits)
    dense = target.is_floating_point()
    if dense:
        assert target.shape == logits.shape and target.dtype in (logits.dtype, torch.float32)
        assert target.shape[1] <= 1 or target.stride(1) == 1
    target_fields = dict(dense_target=dense, target_dtype=DTYPES[target.dtype] if dense else 0,
                         target_row_stride=target.stride(0) if dense else 0,
                         weight_mode=WEIGHT_MODES[weight_mode], reduction=REDUCTIONS[reduction],
                         compute_scale=compute_scale)
    p = plan(logits, loss_type, **launch, **target_fields)
    if p is None:
        raise ValueError("invalid forced plan")
    # NaN bytes: a partial result read before it is written shows.
    ws = torch.full((p["workspace"],), 255, dtype=torch.uint8) if p["workspace"] else None
    params = _params(logits, **launch, grad=_ptr(grad), grad_row_stride=grad.stride(0) if grad is not None else 0,
                     target=target.data_ptr(), target_is_int32=target.dtype == torch.int32, weight=weight.data_ptr(),
                     scale=_ptr(scale), scale_is_double=scale is not None and scale.dtype == torch.float64,
                     loss=loss.data_ptr(), reduced=_ptr(reduced), workspace=_ptr(ws), loss_type=loss_type,
                     gamma=float(gamma), label_smoothing=float(label_smoothing), ignore_index=ignore_index,
                     softcap=float(softcap),
                     logit_offset=_ptr(logit_offset), target_margin=_ptr(target_margin), logit_scale=float(logit_scale),
                     z_loss=float(z_loss), z_rows=_ptr(zr), **target_fields)
    rc = lib.cbk_emu_launch(ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"cb_loss_cuda_launch returned CUDA error {rc}")
    if compute_scale:
        p = dict(p, scale=scale)
    if z_rows:
        p = dict(p, z_rows=zr)
    return (loss if reduced is None else reduced), grad, p
