"""Which GPUs each backend runs on (README "Supported GPUs"): below a backend's oldest compute capability the call
raises a clear error naming the GPU's capability, the minimum and what to use instead (not the driver's "no kernel
image is available"), and backend="auto" falls back to one that runs. No GPU needed: the one capability query,
``_backends.cuda_device_arch``, is replaced here to play each GPU."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cbkernels import _backends as B

ROOT = Path(__file__).resolve().parents[1]
BUILD_FILE = ROOT / "cbkernels" / "_build.py"  # how setup.py builds the extension
CUDA = torch.device("cuda", 0)
GPUS = {  # compute capability -> a GPU of it
    (7, 0): "Tesla V100-SXM2-16GB", (7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-80GB", (8, 6): "NVIDIA A10",
    (8, 9): "NVIDIA L4", (9, 0): "NVIDIA H200", (10, 0): "NVIDIA B200", (12, 0): "NVIDIA GeForce RTX 5090",
}


@pytest.fixture
def gpu(monkeypatch):
    """``gpu((major, minor))`` makes cuda:0 that GPU, with both GPU backends built and importable; returns the list
    of device indices the capability query was asked for."""
    asked = []

    def play(cap):
        def query(index):
            asked.append(index)
            return GPUS[cap], cap

        monkeypatch.setattr(B, "cuda_device_arch", query)
        monkeypatch.setattr(B, "_TOO_OLD", {})
        monkeypatch.setattr(B, "_ensure_loaded", lambda name: True)  # loading a backend is not what is tested
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        for name in ("cuda", "triton"):
            monkeypatch.setattr(B.get_backend(name), "is_available", lambda: True)
        return asked

    return play


@pytest.mark.parametrize("verified", [False, True])
def test_volta_gets_a_clear_error_from_both_gpu_backends_and_auto_falls_back_to_torch(gpu, monkeypatch, verified):
    gpu((7, 0))
    monkeypatch.setattr(B, "CUDA_BACKEND_VERIFIED", verified)
    for backend, need in (("cuda", "7.5"), ("triton", "8.0")):
        with pytest.raises(RuntimeError) as e:
            B.resolve_backend(backend, CUDA)
        msg = str(e.value)
        assert f"backend '{backend}' needs a GPU of compute capability {need} or newer" in msg, msg
        assert "cuda:0 (Tesla V100-SXM2-16GB) has compute capability 7.0" in msg, msg
        assert "backend='torch'" in msg and "Supported GPUs" in msg, msg
        assert "no kernel image" not in msg
    assert B.resolve_backend("auto", CUDA).name == "torch"
    assert B.resolve_backend("torch", CUDA).name == "torch"


def test_turing_runs_the_cuda_backend_but_not_triton(gpu, monkeypatch):
    gpu((7, 5))
    assert B.resolve_backend("cuda", CUDA).name == "cuda"
    with pytest.raises(RuntimeError, match=r"needs a GPU of compute capability 8\.0 or newer.*Tesla T4.* 7\.5") as e:
        B.resolve_backend("triton", CUDA)
    assert "backend='cuda' or backend='torch'" in str(e.value)  # the backends that do run here
    assert B.resolve_backend("auto", CUDA).name == "torch"  # the CUDA backend is not yet auto's choice
    monkeypatch.setattr(B, "CUDA_BACKEND_VERIFIED", True)
    assert B.resolve_backend("auto", CUDA).name == "cuda"


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)], ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_ampere_to_blackwell_run_every_backend(gpu, monkeypatch, cap):
    gpu(cap)
    for backend in ("cuda", "triton", "torch"):
        assert B.resolve_backend(backend, CUDA).name == backend
    assert B.resolve_backend("auto", CUDA).name == "triton"
    monkeypatch.setattr(B, "CUDA_BACKEND_VERIFIED", True)
    assert B.resolve_backend("auto", CUDA).name == "cuda"


def test_the_device_is_asked_once_per_index_and_never_for_cpu_tensors(gpu, monkeypatch):
    asked = gpu((9, 0))
    for _ in range(5):
        B.resolve_backend("cuda", CUDA)
        B.resolve_backend("triton", CUDA)
        B.resolve_backend("auto", CUDA)
        B.resolve_backend("auto", torch.device("cpu"))
        B.resolve_backend("torch", torch.device("cpu"))
    assert asked == [0, 0]  # once per GPU backend on cuda:0
    B.resolve_backend("cuda", torch.device("cuda", 1))
    B.resolve_backend("cuda", torch.device("cuda", 1))
    assert asked == [0, 0, 1]
    # An index-less device is the current one (asked of torch, not of the GPU's properties).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    B.resolve_backend("cuda", torch.device("cuda"))
    assert asked == [0, 0, 1]


def test_the_check_traces_under_torch_compile_fullgraph(gpu):
    """Dispatch runs while torch.compile traces a loss: the capability check must not break the graph."""
    asked = gpu((7, 0))

    def f(x):
        return x + (1 if B.resolve_backend("auto", CUDA).name == "torch" else 2)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for _ in range(2):
        assert torch.equal(compiled(torch.zeros(3)), torch.ones(3))
    assert asked == [0]  # triton's check (auto's first choice), once, at trace time


def test_triton_interpreter_ignores_the_gpu(gpu, monkeypatch):
    asked = gpu((7, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.gpu_too_old("triton", 0) == ""
    assert asked == []


def test_setup_builds_native_code_down_to_the_cuda_backends_minimum_and_ptx_for_newer_gpus():
    """The oldest native architecture setup.py builds by default is the CUDA backend's minimum: an older one would
    be built for nothing, a newer one would leave GPUs that pass the check with no kernel image."""
    m = re.search(r'^DEFAULT_CUDA_ARCH_LIST = "([^"]+)"', BUILD_FILE.read_text(), re.MULTILINE)
    assert m, "cbkernels/_build.py defines DEFAULT_CUDA_ARCH_LIST"
    entries = m.group(1).split(";")
    caps = [tuple(int(v) for v in e.removesuffix("+PTX").split(".")) for e in entries]
    assert min(caps) == B.MIN_CAPABILITY["cuda"], (entries, B.MIN_CAPABILITY)
    assert entries[caps.index(max(caps))].endswith("+PTX"), entries  # forward compatibility from the newest
    assert B.MIN_CAPABILITY["triton"] >= B.MIN_CAPABILITY["cuda"]


def test_import_never_asks_the_gpu():
    """`import cbkernels` (and the modules dispatch imports) must work where asking a GPU would fail or hang."""
    code = textwrap.dedent("""
        import torch
        def boom(*a, **k):
            raise AssertionError("the GPU was asked at import")
        for name in ("get_device_properties", "get_device_capability", "get_device_name", "current_device",
                     "device_count", "_lazy_init"):
            setattr(torch.cuda, name, boom)
        import cbkernels, cbkernels.losses, cbkernels._backends
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
