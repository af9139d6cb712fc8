"""GPU benchmark of the Triton and CUDA C++ backends against naive eager PyTorch and ``torch.compile`` of it.

    python benchmarks/gpu_bench.py [--out benchmarks/results] [--losses softmax focal] [--budget 240]

Forward+backward of the mean loss w.r.t. a leaf logits tensor, median of CUDA-event timings (``logits.grad`` reset
between steps, untimed warm-up first; ``torch.compile`` compiles there, with dynamic shapes so that it compiles
once per loss and dtype). Providers:

- ``triton``: ``cbkernels.class_balanced_loss(..., backend="triton")``, the whole user-facing call (validation,
  reduction scale, kernel, backward scaling);
- ``triton-kernel``: the ``cbkernels::cb_loss_fwd_triton`` op alone (loss and gradient in one launch);
- ``cuda`` / ``cuda-kernel``: the same for the CUDA C++ backend (``cbkernels::cb_loss_fwd`` on CUDA tensors), when
  the extension was built with its CUDA kernels;
- ``F.cross_entropy`` (weight=w) and ``liger`` (Liger-Kernel's fused ``liger_cross_entropy``, when installed): the
  cross-entropy baselines, softmax only;
- ``eager``: ``benchmarks.harness.naive_cb_loss`` at the working dtype (what users write today);
- ``compile``: ``torch.compile`` of the same function;
- ``triton+tf`` / ``cuda+tf`` / ``eager+tf``: the same with all four logit transforms and the z-loss on (SPEC
  sections 10-11; the options of ``benchmarks.bench``'s ``+tf`` providers).
- ``triton+soft`` / ``cuda+soft`` / ``eager+soft``: dense mixup targets (SPEC section 9; ``benchmarks.bench``'s
  ``+soft`` providers and their naive baseline).

Effective bandwidth = (logits read + gradient written) / time, also as a fraction of a device-to-device copy
measured in the same run. Below 2^20 logits (the CIFAR shapes) each provider's kernel launches per step are
counted too (``<n>k`` in the table: the profiler's CUDA kernels of one forward+backward). Writes
``gpu_bench_<gpu>_<date>.json`` and ``.txt`` under ``--out``. ``--device cpu``
runs the script under the Triton interpreter as a smoke test of the script itself (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import re
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/gpu_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cbkernels as cb  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import LOSSES, naive_cb_loss  # noqa: E402

# (N, C, dtypes): the paper's iNaturalist 2018 head (8142), ImageNet, an LM vocabulary (32000), Llama 3's
# 128256 (bf16 only: the fp32 eager baseline alone needs tens of GB), and few rows of a huge vocabulary.
# The paper's long-tailed CIFAR-10/100 (batch 128) first: per-call overhead and kernel launches decide those.
CASES = [(128, 10), (128, 100), (256, 8142), (4096, 8142), (1024, 1000), (8192, 1000), (2048, 32000),
         (4096, 128256), (8, 256000)]
SMALL = 1 << 20  # logits below this many elements also get their kernel launches per step counted
SOFTMAX_ONLY = {"F.cross_entropy", "liger"}  # cross-entropy baselines: the softmax loss only
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BF16_ONLY = {(4096, 128256)}
GAMMA = 0.5


def median_ms(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs: CUDA events on a GPU, perf_counter on the CPU (smoke)."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(harness.timed_rounds({"fn": fn}, device, min_reps=reps, max_reps=reps)["fn"])


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=20, warmup=3)
    return 2 * nbytes / ms / 1e6


def reps_for(nbytes: int) -> int:
    return 50 if nbytes < (64 << 20) else 20 if nbytes < (1 << 30) else 10


def make_step(provider: str, loss_type: str, logits, target, weight, compiled: dict):
    if provider in ("triton-kernel", "cuda-kernel"):
        from cbkernels._opdefs import LOSS_TYPES

        scale = torch.ones((), device=logits.device)
        lt = LOSS_TYPES[loss_type]
        op = torch.ops.cbkernels.cb_loss_fwd_triton if provider == "triton-kernel" else torch.ops.cbkernels.cb_loss_fwd

        def step():  # the loss kernel alone: a given scale and per-row losses (no normaliser or reduction launch)
            op(logits, target, weight, scale, lt, GAMMA, 0.0, -100, True)

        return step
    x = logits.detach().clone().requires_grad_(True)
    if provider.endswith("+tf"):
        from benchmarks.bench import LOGIT_SCALE, SOFTCAP, Z_LOSS, naive_transformed_loss, transform_vectors

        offset, margin = transform_vectors(logits.shape[1], logits.device)
        base = provider[: -len("+tf")]
        tf = dict(softcap=SOFTCAP, logit_offset=offset, target_margin=margin, logit_scale=LOGIT_SCALE,
                  z_loss=Z_LOSS if loss_type in ("softmax", "softmax_focal") else 0.0)

        def fn(z):
            if base == "eager":
                return naive_transformed_loss(z, target, weight, offset, margin, loss_type=loss_type, gamma=GAMMA)
            return cb.class_balanced_loss(z, target, weight=weight, loss_type=loss_type, gamma=GAMMA,
                                          backend=base, **tf)
    elif provider.endswith("+soft"):
        from benchmarks.bench import mixup_targets, soft_target_loss

        q = mixup_targets(target, logits.shape[1], logits.dtype)
        base = provider[: -len("+soft")]

        def fn(z):
            if base == "eager":
                return soft_target_loss(z, q, weight, loss_type=loss_type, gamma=GAMMA)
            return cb.class_balanced_loss(z, q, weight=weight, loss_type=loss_type, gamma=GAMMA, backend=base)
    elif provider in ("triton", "cuda"):
        def fn(z):
            return cb.class_balanced_loss(z, target, weight=weight, loss_type=loss_type, gamma=GAMMA,
                                          backend=provider)
    elif provider == "F.cross_entropy":
        w = weight.to(logits.dtype)

        def fn(z):
            return torch.nn.functional.cross_entropy(z, target, weight=w)
    elif provider == "liger":
        from liger_kernel.transformers.functional import liger_cross_entropy  # optional: absent means an error row

        def fn(z):
            return liger_cross_entropy(z, target, weight=weight)
    elif provider == "eager":
        def fn(z):
            return naive_cb_loss(z, target, weight, loss_type=loss_type, gamma=GAMMA)
    else:
        key = (loss_type, logits.dtype)
        if key not in compiled:
            compiled[key] = torch.compile(naive_cb_loss, dynamic=True)
        cfn = compiled[key]

        def fn(z):
            return cfn(z, target, weight, loss_type=loss_type, gamma=GAMMA)

    def step():
        x.grad = None
        fn(x).backward()

    return step


def cuda_launches(step) -> int:
    """Kernels one step launches on the GPU (forward and backward), from the profiler's device activity; memcpy and
    memset records are not kernels and are left out."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm (compiles, caches)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if "memcpy" not in n.lower() and "memset" not in n.lower())


def time_provider(provider: str, loss_type: str, logits, target, weight, compiled: dict) -> float:
    """Median milliseconds of one provider's step on one case (a GPU's repetitions, or a smoke run's two)."""
    step = make_step(provider, loss_type, logits, target, weight, compiled)
    if logits.is_cuda:
        return median_ms(step, "cuda", reps_for(2 * logits.numel() * logits.element_size()), warmup=2)
    return median_ms(step, "cpu", 2, warmup=1)


def run(losses, budget_s: float, providers, cases=CASES, dtypes=tuple(DTYPES), device="cuda") -> dict:
    on_gpu = device == "cuda"
    meta = {
        "gpu": "CPU (smoke run)", "gpu_sm_count": 0, "gpu_capability": "-", **harness.machine_info(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "triton": __import__("triton").__version__,
        "gamma": GAMMA,
        "method": "forward+backward, median of CUDA-event timings; bandwidth counts logits read + gradient written",
    }
    meta["copy_GBps"] = round(copy_bandwidth(device, (1 << 30) if on_gpu else (1 << 24)), 1)
    print(f"# {meta['gpu']} ({meta['gpu_sm_count']} SMs), torch {meta['torch']}, triton {meta['triton']}, "
          f"device copy {meta['copy_GBps']} GB/s", flush=True)
    t_start = time.time()
    compiled: dict = {}
    rows = []
    for loss_type in losses:
        for n, c in cases:
            for dname in dtypes:
                dtype = DTYPES[dname]
                if (n, c) in BF16_ONLY and dname != "bf16":
                    continue
                g = torch.Generator(device=device).manual_seed(0)
                logits = torch.randn(n, c, device=device, generator=g).mul_(3).to(dtype)
                target = torch.randint(0, c, (n,), device=device, generator=g)
                weight = torch.rand(c, device=device, generator=g) + 0.5
                nbytes = 2 * logits.numel() * logits.element_size()
                row = {"loss": loss_type, "N": n, "C": c, "dtype": dname, "bytes": nbytes}
                for provider in providers:
                    if provider in SOFTMAX_ONLY and loss_type != "softmax":
                        continue
                    if provider == "compile" and time.time() - t_start > budget_s:
                        row[provider] = None  # over the time budget: torch.compile is the slow one to warm up
                        continue
                    # The step (and the copy of the logits it makes) is built inside the peak-memory window.
                    timed = functools.partial(time_provider, provider, loss_type, logits, target, weight, compiled)
                    try:
                        ms, peak = harness.peak_bytes(timed, device) if on_gpu else (timed(), 0)
                        row[provider] = {"ms": round(ms, 4), "GBps": round(nbytes / ms / 1e6, 1),
                                         "frac_copy": round(nbytes / ms / 1e6 / meta["copy_GBps"], 3),
                                         "peak_MB": round(peak / 2**20, 1)}
                        if on_gpu and logits.numel() < SMALL:
                            step = make_step(provider, loss_type, logits, target, weight, compiled)
                            row[provider]["launches"] = cuda_launches(step)
                    except Exception as e:  # an OOM or compile failure is a result, not the end of the run
                        row[provider] = {"error": harness.one_line(e)}
                    finally:
                        if on_gpu:
                            torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row, providers), flush=True)
                del logits, target, weight
    meta["seconds"] = round(time.time() - t_start, 1)
    return {"meta": meta, "rows": rows}


def format_row(row, providers) -> str:
    cells = [f"{row['loss']:13} {row['N']:>5}x{row['C']:<6} {row['dtype']:4}"]
    for p in providers:
        r = row.get(p)
        if not r:
            cells.append(f"{p}: {'skipped':>8}")
        elif "error" in r:
            cells.append(f"{p}: {'error':>8}")
        else:
            launches = f" {r['launches']}k" if "launches" in r else ""
            cells.append(f"{p}: {r['ms']:8.3f} ms {r['frac_copy']:5.0%}{launches}")
    for name in ("triton", "cuda"):
        ours = row.get(name)
        if not ours or "ms" not in ours:
            continue
        for base_name in ("eager", "compile", "F.cross_entropy", "liger"):
            base = row.get(base_name)
            if base and "ms" in base:
                cells.append(f"{name} vs {base_name} {base['ms'] / ours['ms']:5.1f}x")
    for variant in ("+tf", "+soft"):  # each variant against its own eager baseline
        base = row.get("eager" + variant)
        for name in ("triton" + variant, "cuda" + variant):
            ours = row.get(name)
            if base and "ms" in base and ours and "ms" in ours:
                cells.append(f"{name} vs eager{variant} {base['ms'] / ours['ms']:5.1f}x")
    return " | ".join(cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    parser.add_argument("--losses", nargs="+", default=["softmax", "focal"], choices=LOSSES)
    parser.add_argument("--providers", nargs="+", default=None,
                        help="default: triton, triton-kernel, then cuda and cuda-kernel when the CUDA C++ backend is "
                             "built, eager, compile")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds after which torch.compile cases are skipped (its warm-up dominates)")
    parser.add_argument("--cases", nargs="+", default=None, help="NxC shapes instead of the default set")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (timings meaningless)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device")
        return 1
    if args.providers is None:
        has_cuda_backend = args.device == "cuda" and "cuda" in cb.available_backends()
        args.providers = ["triton", "triton-kernel"] + (["cuda", "cuda-kernel"] if has_cuda_backend else [])
        args.providers += ["F.cross_entropy", "liger", "eager", "compile", "triton+tf"]
        args.providers += (["cuda+tf"] if has_cuda_backend else []) + ["eager+tf"]
        args.providers += ["triton+soft"] + (["cuda+soft"] if has_cuda_backend else []) + ["eager+soft"]
    cases = CASES if args.cases is None else [tuple(int(x) for x in case.split("x")) for case in args.cases]
    result = run(args.losses, args.budget, args.providers, cases, args.dtypes, args.device)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", result["meta"]["gpu"]).strip("-").lower()
    stem = f"gpu_bench_{gpu}_{datetime.date.today().isoformat()}"
    m = result["meta"]
    header = (f"{m['gpu']} ({m['gpu_sm_count']} SMs, sm_{m['gpu_capability']}), {m['date']}, torch {m['torch']}, "
              f"triton {m['triton']}, CUDA {m['torch_cuda']}; device-to-device copy {m['copy_GBps']} GB/s\n"
              f"{m['method']}; % = fraction of the copy's bandwidth; gamma {m['gamma']}\n")
    table = "\n".join(format_row(r, args.providers) for r in result["rows"])
    harness.write_results(Path(args.out), stem, result, txt=header + table + "\n")
    print(f"wrote {Path(args.out) / stem}.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
