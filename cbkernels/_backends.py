"""The one dispatch point: which backend computes a loss for which tensors (SPEC section 8).

Every backend module provides two forward functions with one signature, over 2-D logits ``[N, C]``:

``loss_fwd(logits, target, weight, scale, spec, compute_grad)``
    returns ``(loss, grad [N, C] in the logits' dtype, or an empty tensor when not compute_grad)``
``loss_fwd_inplace(logits, target, weight, scale, spec)``
    returns ``loss`` and writes the gradient over ``logits``.

``spec`` is the ``LossSpec`` built at the API edge; each backend flattens it into its op's arguments
(``_opdefs`` defines the ops and their contract). One call is the whole forward: the target check, the
normaliser ``s`` of ``spec.reduction`` (SPEC section 5; a given 0-d ``scale`` on the logits' device replaces it,
as the chunked linear path does), the loss (per row for ``"none"``, else the 0-d ``s * sum_i l_i``) and
``grad = s * d l_i / d z_ij`` (SPEC section 4), with no denominator travelling through the host. Inputs arrive
with their metadata validated (see ``_validation``); the target values are checked by the op itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "cuda")


@dataclass
class Backend:
    name: str
    devices: tuple  # device types the backend runs on
    is_available: Callable[[], bool]
    load: Callable[[], tuple]  # -> (loss_fwd, loss_fwd_inplace), imported lazily on first use
    how_to_get: str = ""
    _fns: Optional[tuple] = None

    def functions(self) -> tuple:
        if self._fns is None:
            self._fns = self.load()
        return self._fns


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


_EXT_HAS: Dict[str, bool] = {}  # dispatch key -> whether cbkernels._C registered kernels for it (fixed per process)


def _compiled_ext_has(dispatch_key: str) -> bool:
    has = _EXT_HAS.get(dispatch_key)
    if has is None:
        has = _EXT_HAS[dispatch_key] = _load_compiled_ext(dispatch_key)
    return has


def _load_compiled_ext(dispatch_key: str) -> bool:
    from . import _extension

    if _extension.load() is None:  # the library for this torch: prebuilt, cached, or built now (or none)
        return False
    try:
        # cbkernels._ops defines the ops (with their fake kernels) and loads the library that registers their
        # kernels: once the compiled ops exist, torch.compile and opcheck can trace them.
        importlib.import_module("cbkernels._ops")
    except (ImportError, OSError):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cbkernels::cb_loss_fwd", dispatch_key)


# Run once while tracing under torch.compile, as torch.compiler.assume_constant_result would mark it (importing
# is not traceable). Set by hand because that decorator imports torch._dynamo, and with it Triton, at import time.
_compiled_ext_has._dynamo_marked_constant = True  # type: ignore[attr-defined]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    return _triton_installed() and (triton_interpret() or torch.cuda.is_available())


_INSTALLED: Dict[str, bool] = {}


def _triton_installed() -> bool:
    has = _INSTALLED.get("triton")
    if has is None:
        has = _INSTALLED["triton"] = (importlib.util.find_spec("triton") is not None
                                      and importlib.util.find_spec("cbkernels._triton") is not None)
    return has


# Also run once at trace time (find_spec is not traceable either).
_triton_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


# Oldest compute capability each GPU backend runs on (README "Supported GPUs"); below it the backend raises a clear
# error and "auto" takes the next backend, instead of the driver's "no kernel image is available".
MIN_CAPABILITY = {
    # sm_75 (Turing, T4): the oldest target of CUDA 13's nvcc and of torch's CUDA 13 wheels. setup.py builds native
    # code from it up (its DEFAULT_CUDA_ARCH_LIST starts there) and tools/nvcc_build_check.py compiles every kernel
    # for it without a warning or a spill. Volta (7.0) would need a CUDA 12 toolkit and was never compiled for.
    "cuda": (7, 5),
    # Triton's own supported hardware is compute capability 8.0+ (its README): older GPUs are not tested upstream.
    "triton": (8, 0),
}


def cuda_device_arch(index: int) -> Tuple[str, Tuple[int, int]]:
    """Name and compute capability ``(major, minor)`` of CUDA device ``index``: the one place that asks the driver
    (the tests replace it to play any GPU)."""
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor)


_TOO_OLD: Dict[tuple, str] = {}  # (backend, device index) -> why the backend cannot run there, or ""


def gpu_too_old(backend: str, index: Optional[int]) -> str:
    """Why ``backend`` cannot run on CUDA device ``index`` (its compute capability is below
    ``MIN_CAPABILITY[backend]``), or "" when it can. The device is asked once per (backend, index), never at import,
    so dispatch pays a dictionary lookup per call."""
    if backend not in MIN_CAPABILITY or (backend == "triton" and triton_interpret()):  # the interpreter runs anywhere
        return ""
    if index is None:
        index = torch.cuda.current_device()
    key = (backend, index)
    if key not in _TOO_OLD:
        name, cap = cuda_device_arch(index)
        cap, need = tuple(cap), MIN_CAPABILITY[backend]
        _TOO_OLD[key] = "" if cap >= need else (
            f"backend {backend!r} needs a GPU of compute capability {need[0]}.{need[1]} or newer, but cuda:{index} "
            f"({name}) has compute capability {cap[0]}.{cap[1]}. Use "
            + " or ".join(f"backend={b!r}" for b in _fallbacks(cap, backend))
            + " on this GPU (backend='auto' picks one); see \"Supported GPUs\" in the README.")
    return _TOO_OLD[key]


def _fallbacks(cap: tuple, too_new_for: str) -> List[str]:
    gpu = [b for b, m in MIN_CAPABILITY.items() if b != too_new_for and cap >= m and _REGISTRY[b].is_available()]
    return gpu + ["torch"]


# Run once per argument at trace time under torch.compile (it asks the driver, which is not traceable).
gpu_too_old._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _load(module: str) -> Callable[[], tuple]:
    def load() -> tuple:
        mod = importlib.import_module(module)
        return mod.loss_fwd, mod.loss_fwd_inplace

    return load


register_backend(Backend("torch", ("cpu", "cuda"), lambda: True, _load("cbkernels._torch_backend")))
register_backend(
    Backend(
        "cpu",
        ("cpu",),
        lambda: _compiled_ext_has("CPU"),
        _load("cbkernels._ops"),
        how_to_get=("its library is compiled on first use and needs a C++ compiler (see the warning issued then and "
                    "'Install' in the README), or a wheel built for this torch"),
    )
)
register_backend(
    Backend(
        "triton",
        ("cuda", "cpu"),  # CPU tensors only under TRITON_INTERPRET=1
        _triton_available,
        _load("cbkernels._triton"),
        how_to_get="install triton and run on a CUDA device (or set TRITON_INTERPRET=1 for CPU tensors)",
    )
)
register_backend(
    Backend(
        "cuda",
        ("cuda",),
        lambda: torch.cuda.is_available() and _compiled_ext_has("CUDA"),
        _load("cbkernels._ops"),
        how_to_get="build the extension with a CUDA toolkit on a machine with a CUDA build of torch",
    )
)


def get_backend(name: str) -> Backend:
    return _REGISTRY[name]


def available_backends() -> List[str]:
    """Names of the backends that can run here, e.g. ``["torch", "cpu"]`` on a CPU machine."""
    return [name for name, b in _REGISTRY.items() if b.is_available()]


# "auto" prefers the CUDA C++ backend for CUDA tensors only once its GPU tests have passed on real
# hardware; until then Triton is the CUDA default and "cuda" must be asked for (see README).
CUDA_BACKEND_VERIFIED = False


# Resolutions for CPU tensors, which cannot change within a process ("auto" there never picks Triton, and whether
# the compiled extension loaded is fixed): a dictionary lookup per call instead of the checks below.
_CPU_RESOLVED: Dict[str, Backend] = {}


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """Map ``backend`` ("auto" or a name) to a usable backend for tensors on ``device``."""
    if device.type == "cpu":
        hit = _CPU_RESOLVED.get(backend)
        if hit is not None:
            return hit
        if backend in ("auto", "torch", "cpu"):
            hit = _CPU_RESOLVED[backend] = _resolve(backend, device)
            return hit
    return _resolve(backend, device)


def _resolve(backend: str, device: torch.device) -> Backend:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            order = ("cuda", "triton", "torch") if CUDA_BACKEND_VERIFIED else ("triton", "torch")
        else:
            order = ("cpu", "torch")
        b = next(_REGISTRY[n] for n in order if device.type in _REGISTRY[n].devices and _REGISTRY[n].is_available()
                 and not (device.type == "cuda" and gpu_too_old(n, device.index)))
        _ensure_loaded(b.name)
        return b
    b = _REGISTRY[backend]
    if not b.is_available():
        raise RuntimeError(
            f"backend {backend!r} is not available here (available: {available_backends()}); {b.how_to_get}"
        )
    if device.type not in b.devices or (backend == "triton" and device.type == "cpu" and not triton_interpret()):
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
    too_old = gpu_too_old(backend, device.index) if device.type == "cuda" else ""
    if too_old:
        raise RuntimeError(too_old)
    _ensure_loaded(b.name)
    return b


def _ensure_loaded(name: str) -> bool:
    """Imports the backend's module now, outside any autograd.Function. Under torch.compile this runs eagerly at
    trace time (marked as constant below: importing is not traceable), so that even a process whose first call is
    a compiled one traces only the already-loaded functions."""
    _REGISTRY[name].functions()
    return True


_ensure_loaded._dynamo_marked_constant = True  # type: ignore[attr-defined]
