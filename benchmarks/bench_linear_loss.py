"""Benchmark: linear + class-balanced loss without the logits (``cbkernels.linear_loss``) vs materialising them.

    python benchmarks/bench_linear_loss.py            # fp32 CPU, N=2048, H=1024, V=32768
    python benchmarks/bench_linear_loss.py --quick    # small shape, seconds
    python benchmarks/bench_linear_loss.py --device cuda   # bf16, N=8192, H=4096, V=128256 (skipped on CPU)

Providers, forward + backward of the mean loss with respect to ``hidden`` and ``lm_weight`` (no bias):

- ``ours``: ``linear_cb_loss(hidden, lm_weight, target, weight=w, loss_type=...)``, default chunking.
- ``naive``: ``F.linear`` then ``benchmarks.harness.naive_cb_loss`` (what users write today).
- ``linear_cross_entropy``: ``torch.nn.functional.linear_cross_entropy(..., weight=w,
  options=torch.nn.LinearCrossEntropyOptions())`` (its chunked path), softmax only, when this torch has it.
- ``ours+softcap+zloss`` / ``naive+softcap+zloss`` (softmax losses): the same with Gemma 2's softcap (30) and PaLM's
  z-loss (1e-4), inside the chunks' kernels for ours, as PyTorch ops on the materialised logits for naive.

Time: every provider runs in the same process on the same inputs, one untimed warm-up step each, then
``harness.timed_rounds``: rounds in which every provider steps once, the order rotated per round so that
machine noise hits them alike; median per provider. Memory: see ``MEMORY_METHOD``. Results: ``<stem>.json``
and ``<stem>.md`` under ``--out`` (default ``benchmarks/results``), the machine named.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_linear_loss.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import LOSSES, naive_cb_loss  # noqa: E402

SHAPES = {"cpu": (2048, 1024, 32768, "float32"), "quick": (512, 256, 8192, "float32"),
          "cuda": (8192, 4096, 128256, "bfloat16")}
HAS_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

MEMORY_METHOD = {
    "cpu": (
        "each provider in its own subprocess: build the inputs, one untimed warm-up step (one-time "
        "allocations of thread pools and libraries do not count), then one step recorded by "
        "torch.profiler(profile_memory=True). peak = highest level of c10 CPU-allocator bytes above the "
        "start of the step (every tensor, including temporaries inside ops; not BLAS-internal workspaces). "
        "outputs = bytes of the gradients left in .grad (the loss is negligible). overhead = peak - outputs: "
        "what the provider needs beyond inputs and outputs. rss = cross-check, the process's VmHWM above "
        "its RSS at the start of the step (high-water mark reset through /proc/self/clear_refs); it sees "
        "everything but also memory the C allocator keeps after a free."
    ),
    "cuda": (
        "in process, per provider: torch.cuda.reset_peak_memory_stats, one step, "
        "torch.cuda.max_memory_allocated minus the level before the step (exact allocator counts; the "
        "CUDA caching allocator makes a subprocess unnecessary). outputs and overhead as on CPU."
    ),
}


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """hidden ``[N, H]`` and lm_weight ``[V, H]`` leaves (logits of std ~2), long-tailed targets, weights."""
    g = torch.Generator().manual_seed(seed)
    target, w = harness.long_tailed_targets(n, v, g, beta=0.999)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(device=device, dtype=dtype).requires_grad_(True)
    return hidden, weight, target.to(device), w.to(device)


SOFTCAP, Z_LOSS = 30.0, 1e-4


def providers_for(loss: str) -> List[str]:
    names = ["ours", "naive"]
    if loss == "softmax" and HAS_LCE:
        names.append("linear_cross_entropy")
    if loss in ("softmax", "softmax_focal"):
        names += ["ours+softcap+zloss", "naive+softcap+zloss"]
    return names


def _naive_softcap_zloss(hidden, lm_weight, target, w, loss, gamma):
    z = F.linear(hidden, lm_weight)
    z = SOFTCAP * torch.tanh(z / SOFTCAP)
    return (naive_cb_loss(z, target, w.to(hidden.dtype), loss_type=loss, gamma=gamma)
            + Z_LOSS * torch.logsumexp(z, dim=-1).pow(2).mean())


def make_step(name: str, loss: str, gamma: float, hidden, lm_weight, target, w) -> Callable[[], None]:
    from cbkernels.linear_loss import linear_cb_loss

    if name == "ours":
        return lambda: linear_cb_loss(hidden, lm_weight, target, weight=w, loss_type=loss, gamma=gamma).backward()
    if name == "naive":
        return lambda: naive_cb_loss(F.linear(hidden, lm_weight), target, w.to(hidden.dtype), loss_type=loss,
                                     gamma=gamma).backward()
    if name == "ours+softcap+zloss":
        return lambda: linear_cb_loss(hidden, lm_weight, target, weight=w, loss_type=loss, gamma=gamma,
                                      softcap=SOFTCAP, z_loss=Z_LOSS).backward()
    if name == "naive+softcap+zloss":
        return lambda: _naive_softcap_zloss(hidden, lm_weight, target, w, loss, gamma).backward()
    if name == "linear_cross_entropy":
        opts = torch.nn.LinearCrossEntropyOptions()
        wd = w.to(hidden.dtype)
        return lambda: F.linear_cross_entropy(hidden, lm_weight, target, weight=wd, options=opts).backward()
    raise ValueError(f"unknown provider {name!r}")


def _zero(*leaves) -> None:
    for t in leaves:
        t.grad = None


# ----------------------------------------------------------------------------------------------------
# Memory


def _vm(field: str) -> Optional[int]:
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(name: str, loss: str, gamma: float, shape, device: str) -> Dict[str, Optional[int]]:
    n, h, v, dt = shape
    hidden, lm_weight, target, w = make_inputs(n, h, v, getattr(torch, dt), device)
    step = make_step(name, loss, gamma, hidden, lm_weight, target, w)
    step()
    _zero(hidden, lm_weight)
    gc.collect()
    harness.sync(device)
    rss = None
    start = _vm("VmRSS") if device == "cpu" and _reset_hwm() else None
    _, peak = harness.peak_bytes(step, device)
    if start is not None:
        rss = _vm("VmHWM") - start
    outputs = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, lm_weight) if t.grad is not None)
    return {"peak_bytes": int(peak), "output_bytes": int(outputs), "overhead_bytes": int(peak - outputs),
            "rss_peak_bytes": rss}


def memory_in_subprocess(name: str, loss: str, gamma: float, shape, device: str, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", json.dumps(
        {"name": name, "loss": loss, "gamma": gamma, "shape": list(shape), "device": device, "threads": threads})]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Time


def measure_time(names: List[str], loss: str, gamma: float, shape, device: str, reps: int) -> Dict[str, List[float]]:
    n, h, v, dt = shape
    hidden, lm_weight, target, w = make_inputs(n, h, v, getattr(torch, dt), device)
    steps = {p: make_step(p, loss, gamma, hidden, lm_weight, target, w) for p in names}
    for p in names:  # warm-up
        _zero(hidden, lm_weight)
        steps[p]()

    def prepare() -> None:
        _zero(hidden, lm_weight)
        gc.collect()

    return harness.timed_rounds(steps, device, min_reps=reps, max_reps=reps, prepare=prepare)


# ----------------------------------------------------------------------------------------------------
# Driver


def run(shape, device: str, losses, reps: int, gamma: float, memory: bool = True) -> dict:
    threads = torch.get_num_threads()
    rows = []
    for loss in losses:
        names = providers_for(loss)
        print(f"[{loss}] timing {names} ({reps} rounds) ...", file=sys.stderr, flush=True)
        times = measure_time(names, loss, gamma, shape, device, reps)
        mems = {}
        for p in names:
            if not memory:
                mems[p] = {}
            elif device == "cuda":
                torch.cuda.empty_cache()
                mems[p] = measure_memory(p, loss, gamma, shape, device)
            else:
                print(f"[{loss}] memory of {p} (subprocess) ...", file=sys.stderr, flush=True)
                mems[p] = memory_in_subprocess(p, loss, gamma, shape, device, threads)
        baselines = [statistics.median(times[p]) for p in names if p != "ours"]
        naive_over = mems["naive"].get("overhead_bytes")
        for p in names:
            med = statistics.median(times[p])
            over = mems[p].get("overhead_bytes")
            rows.append({"loss": loss, "provider": p, "time_s": med, "times_s": times[p],
                         "time_vs_best_baseline": med / min(baselines),
                         "overhead_vs_naive": None if over is None or not naive_over else over / naive_over,
                         **mems[p]})
    from cbkernels._backends import resolve_backend

    return {"shape": dict(zip(("N", "H", "V", "dtype"), shape)), "device": device, "reps": reps,
            "gamma": gamma, "ours_loss_backend": resolve_backend("auto", torch.device(device)).name,
            "linear_cross_entropy_available": HAS_LCE, "machine": harness.machine_info(device),
            "memory_method": MEMORY_METHOD[device], "rows": rows}


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [f"# linear + class-balanced loss, {result['device']} {s['dtype']}, N={s['N']} H={s['H']} V={s['V']}",
             "", f"Machine: `{json.dumps(result['machine'])}`", "",
             f"`ours` runs the `{result['ours_loss_backend']}` loss backend (\"auto\"). "
             f"Forward + backward (grads of hidden and lm_weight), mean reduction; median of {result['reps']} "
             "rounds. `x best` = time / the faster of the other providers in the row group. Memory in MiB: "
             "peak above the inputs; outputs = the gradients; overhead = peak - outputs.", "",
             "| loss | provider | time (s) | x best | peak | outputs | overhead | overhead / naive | rss peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = "-" if r.get("overhead_vs_naive") is None else f"{r['overhead_vs_naive']:.3f}"
        lines.append(f"| {r['loss']} | {r['provider']} | {r['time_s']:.3f} | {r['time_vs_best_baseline']:.2f} | "
                     f"{_mib(r.get('peak_bytes'))} | {_mib(r.get('output_bytes'))} | {_mib(r.get('overhead_bytes'))}"
                     f" | {ratio} | {_mib(r.get('rss_peak_bytes'))} |")
    if not result["linear_cross_entropy_available"]:
        lines += ["", "torch.nn.functional.linear_cross_entropy does not exist in this torch: not benchmarked."]
    lines += ["", f"Memory method: {result['memory_method']}", ""]
    return "\n".join(lines)


def write(result: dict, out: Path, stem: str) -> None:
    harness.write_results(out, stem, result, md=markdown(result))
    print(markdown(result))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


def cuda_accuracy_check() -> dict:
    """Small bf16 case on the GPU against float64: exercises the CUDA matmul/accumulator paths."""
    from cbkernels import linear_loss
    from cbkernels.reference import reference_loss

    hidden, w, target, cw = make_inputs(300, 64, 5000, torch.bfloat16, "cuda", seed=1)
    out = {}
    for loss in LOSSES:
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, w)]
        linear_loss.linear_cb_loss(*leaves, target, weight=cw, loss_type=loss, chunk_size=64).backward()
        ref = [t.detach().double().requires_grad_(True) for t in (hidden, w)]
        reference_loss(F.linear(*ref), target, cw.double(), loss_type=loss, reduction="mean").backward()
        out[loss] = {k: ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item()
                     for k, a, b in (("grad_hidden", leaves[0], ref[0]), ("grad_W", leaves[1], ref[1]))}
    out["cuda_addmm_out_dtype_used"] = linear_loss._CUDA_ADDMM_OUT_DTYPE
    return out


def run_cuda_case(out: Path = harness.RESULTS_DIR, reps: int = 5, losses=("softmax",),
                  gamma: float = 0.5) -> Optional[dict]:
    """The bf16 GPU case (N=8192, H=4096, V=128256), for the GPU check script; None without CUDA."""
    if not torch.cuda.is_available():
        print("bench_linear_loss: no CUDA device, GPU case skipped", file=sys.stderr)
        return None
    result = run(SHAPES["cuda"], "cuda", losses, reps, gamma)
    result["accuracy_vs_float64_max_rel_err"] = cuda_accuracy_check()
    write(result, out, "linear_loss_cuda_bf16")
    return result


def main(argv=None) -> Optional[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape (N=512, H=256, V=8192), 2 rounds")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--losses", default="softmax", help=f"comma-separated from {LOSSES}, or 'all'")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 3 on CPU, 2 with --quick)")
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_memory(spec["name"], spec["loss"], spec["gamma"], spec["shape"], spec["device"])))
        return None
    losses = LOSSES if args.losses == "all" else tuple(x.strip() for x in args.losses.split(","))
    if any(x not in LOSSES for x in losses):
        ap.error(f"--losses must name losses from {LOSSES}")
    if args.device == "cuda":
        return run_cuda_case(args.out, args.reps or 5, losses, args.gamma)
    shape = SHAPES["quick" if args.quick else "cpu"]
    result = run(shape, "cpu", losses, args.reps or (2 if args.quick else 3), args.gamma)
    write(result, args.out, f"linear_loss_cpu_fp32{'_quick' if args.quick else ''}")
    return result


if __name__ == "__main__":
    main()
