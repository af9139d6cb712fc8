"""What every benchmark script shares: the naive baseline, inputs, timing, memory, machine, result files.

Imported by ``benchmarks/bench.py`` (``make bench``), ``bench_linear_loss.py``, ``gpu_bench.py``, the
pytest-benchmark suite and the tests. Needs neither matplotlib nor triton.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
LOSSES = ("softmax", "sigmoid", "focal", "softmax_focal")
BASELINE = "naive"  # the provider every speed-up and memory ratio is measured against

# ----------------------------------------------------------------------------------------------------
# The naive baseline and the inputs


def naive_cb_loss(logits: Tensor, target: Tensor, weight: Tensor, *, loss_type: str = "focal",
                  gamma: float = 0.5) -> Tensor:
    """What users write today (the official code's style, mean reduction): the benchmarks' baseline.

    Run at the working dtype, it materialises several ``[N, C]`` tensors. Softmax uses the native
    ``F.cross_entropy`` per sample, as a careful user would.
    """
    if loss_type == "softmax":
        per = F.cross_entropy(logits, target, reduction="none")
        return (weight[target] * per).mean()
    onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    a = weight[target].to(logits.dtype).unsqueeze(1)
    if loss_type == "sigmoid":
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        return (a * bce).sum() / logits.shape[0]
    if loss_type == "focal":
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        modulator = torch.exp(-gamma * onehot * logits - gamma * torch.log1p(torch.exp(-1.0 * logits)))
        return (a * modulator * bce).sum() / logits.shape[0]
    if loss_type == "softmax_focal":
        logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        return (weight[target] * (1 - logp.exp()) ** gamma * -logp).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def long_tailed_counts(classes: int, imbalance: float = 100.0, n_max: int = 1000) -> Tensor:
    """Exponentially decaying class counts, ``n_max`` down to ``n_max / imbalance`` (as in CIFAR-LT)."""
    c = torch.arange(classes, dtype=torch.float64)
    return (n_max * imbalance ** (-c / max(classes - 1, 1))).round().clamp(min=1)


def long_tailed_targets(batch: int, classes: int, generator: torch.Generator,
                        beta: float = 0.999) -> Tuple[Tensor, Tensor]:
    """``[batch]`` int64 targets drawn from the long-tailed counts, and their ``[classes]`` float32 weights."""
    from cbkernels import class_balanced_weights

    counts = long_tailed_counts(classes)
    target = torch.multinomial(counts, batch, replacement=True, generator=generator)
    return target, class_balanced_weights(counts, beta=beta)


# ----------------------------------------------------------------------------------------------------
# Time


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device) -> float:
    """Seconds of one ``fn()``: CUDA events after a synchronize on a GPU, ``time.perf_counter`` on the CPU."""
    if torch.device(device).type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_rounds(steps: Dict[str, Callable[[], object]], device, *, min_reps: int, max_reps: int,
                 target_time: float = 0.0, prepare: Callable[[], object] = lambda: None,
                 on_error: Optional[Callable[[str, Exception], None]] = None) -> Dict[str, List[float]]:
    """Seconds of every timed call of each step (warm-ups are the caller's).

    Rounds: every round runs each step once, in an order rotated per round, so that machine noise hits all
    steps alike. A step repeats until about ``target_time`` seconds at its running median, between
    ``min_reps`` and ``max_reps`` calls. ``prepare()`` runs before every call, untimed. A step that raises
    leaves the rounds and goes to ``on_error`` (raised when there is none).
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    reps: Dict[str, int] = {}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call would be charged to whichever step runs then
    try:
        rnd = 0
        while True:
            todo = [name for name in times if len(times[name]) < reps.get(name, 1)]
            if not todo:
                break
            k = rnd % len(todo)
            for name in todo[k:] + todo[:k]:
                prepare()
                try:
                    times[name].append(time_once(steps[name], device))
                except Exception as exc:
                    if on_error is None:
                        raise
                    on_error(name, exc)
                    times.pop(name)
            # Re-planned every round from the median so far: a noise burst in the first rounds (another
            # process, inductor's compile workers starting) must not cut a step's repetitions short.
            for name, ts in times.items():
                want = math.ceil(target_time / max(statistics.median(ts), 1e-9))
                reps[name] = min(max_reps, max(min_reps, want))
            rnd += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


# ----------------------------------------------------------------------------------------------------
# Memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (kineto prints a line at every profiler start/stop, past Python's sys.stderr)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_allocations(run: Callable[[], object]) -> Tuple[object, List[int]]:
    """Run ``run()`` under the profiler; return its result and the allocator's byte deltas in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = run()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    return out, [size for _, size in events]


def running_peak(deltas: Sequence[int]) -> Tuple[int, int]:
    """The final level and the highest level of a sequence of allocation deltas, both above the start."""
    level = peak = 0
    for d in deltas:
        level += d
        peak = max(peak, level)
    return level, peak


def peak_bytes(run: Callable[[], object], device) -> Tuple[object, int]:
    """``run()``'s result and the highest level of allocated bytes above the start while it ran.

    CUDA: the caching allocator's statistics (``max_memory_allocated`` minus the level before). CPU: the
    c10 allocator's allocation/free records from ``torch.profiler(profile_memory=True)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    out, deltas = cpu_allocations(run)
    return out, running_peak(deltas)[1]


def cpu_peak_bytes(run: Callable[[], object]) -> int:
    """Highest level of CPU-allocator bytes above the start while ``run()`` executes (profiler records)."""
    return peak_bytes(run, "cpu")[1]


# ----------------------------------------------------------------------------------------------------
# Machine description and result files


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> Optional[float]:
    """1-minute load average: above the core count, other work competed with the timed steps."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info(device) -> dict:
    """The machine, software and checkout a result comes from (the JSON's ``machine``)."""
    import cbkernels

    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cbkernels": cbkernels.__version__,
        "backends": cbkernels.available_backends(),
        "git_commit": _git_commit(),
        "loadavg_start": loadavg(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_sm_count=props.multi_processor_count)
    return info


def write_results(out_dir: Path, stem: str, result: dict, **texts: str) -> List[Path]:
    """``<stem>.json`` (``result``) and one ``<stem>.<suffix>`` per text under ``out_dir``; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    for suffix, text in texts.items():
        paths.append(out_dir / f"{stem}.{suffix}")
        paths[-1].write_text(text)
    return paths


def one_line(exc: Exception) -> str:
    """An exception as one short line, for a result row (one broken provider must not sink a run)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
