"""Benchmark: a Hugging Face causal-LM training step with the model's own loss vs ``cbkernels.integrations``.

    python benchmarks/bench_hf.py                # Llama-style, vocabulary 32768, sequence 512, batch 4 (CPU fp32)
    python benchmarks/bench_hf.py --quick        # a small shape, seconds

Providers (the same randomly initialised model, one training step = forward, backward, AdamW step):

- ``hf``: the model's own loss (``labels=``: ``lm_head`` over every position, then cross-entropy in float32);
- ``cb:softmax`` / ``cb:softmax_focal``: ``apply_class_balanced_loss(model, counts, ...)`` with long-tailed token
  counts (``linear_cb_loss`` from the last hidden state: the logits are never held).

Time: every provider in one process on the same batch, one untimed warm-up step each, then
``harness.timed_rounds`` (rounds in rotated order, medians). Memory: each provider in its own process: the peak of
the c10 CPU allocator's bytes during one training step above the level before it (model, optimizer state and
batch already allocated, gradients released), from ``torch.profiler(profile_memory=True)``. Results:
``<stem>.json`` / ``.md`` under ``--out`` (default ``benchmarks/results``), the machine named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

PROVIDERS = ("hf", "cb:softmax", "cb:softmax_focal")
SHAPES = {"full": dict(vocab=32768, seq=512, batch=4, hidden=256, layers=2),
          "quick": dict(vocab=4096, seq=128, batch=2, hidden=64, layers=1)}


def build(provider: str, shape: dict, seed: int = 0):
    """The model (with the provider's loss), its optimizer and one batch."""
    import transformers

    import cbkernels as cb
    from cbkernels.integrations.transformers import apply_class_balanced_loss

    cfg = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                                   intermediate_size=4 * shape["hidden"], num_hidden_layers=shape["layers"],
                                   num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=shape["seq"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.train()
    g = torch.Generator().manual_seed(seed)
    counts = harness.long_tailed_counts(shape["vocab"], imbalance=1000.0, n_max=100000)
    ids = torch.multinomial(counts.double(), shape["batch"] * shape["seq"], replacement=True,
                            generator=g).reshape(shape["batch"], shape["seq"])
    if provider.startswith("cb:"):
        loss_type = provider[3:]
        apply_class_balanced_loss(model, counts, loss_type=loss_type, beta=0.9999,
                                  **({"gamma": 1.0} if "focal" in loss_type else {}))
    del cb
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, {"input_ids": ids, "labels": ids}


def step(model, opt, batch) -> None:
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    opt.step()


def peak_of(provider: str, shape: dict) -> int:
    model, opt, batch = build(provider, shape)
    step(model, opt, batch)  # allocates the optimizer state
    opt.zero_grad(set_to_none=True)
    return harness.cpu_peak_bytes(lambda: step(model, opt, batch))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one provider's peak, in its own process
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES["quick" if args.quick else "full"]
    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_of(args.memory_of, shape)}))
        return 0
    peaks = {}
    for name in PROVIDERS:
        cmd = [sys.executable, __file__, "--memory-of", name, "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
        print(f"peak of {name}: {peaks[name] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    runs = {name: build(name, shape) for name in PROVIDERS}
    for model, opt, batch in runs.values():
        step(model, opt, batch)  # warm-up
    times = harness.timed_rounds({n: (lambda r=r: step(*r)) for n, r in runs.items()}, "cpu", min_reps=5,
                                 max_reps=12, target_time=10.0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = [{"provider": n, "median_s": med[n], "times_s": times[n], "peak_bytes": peaks[n],
             "time_vs_hf": med[n] / med["hf"], "peak_vs_hf": peaks[n] / peaks["hf"]} for n in PROVIDERS]
    result = {"machine": harness.machine_info("cpu"), "shape": shape, "threads": args.threads,
              "method": __doc__.split("Time:")[1].strip(), "argv": sys.argv[1:], "rows": rows}
    lines = [f"Llama-style {shape}, CPU fp32, {args.threads} threads, {result['machine'].get('cpu')}",
             "", "| provider | step s (median) | vs hf | peak MiB above model+optimizer | vs hf |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['median_s']:.3f} | {r['time_vs_hf']:.2f}x | "
                     f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_vs_hf']:.2f}x |")
    md = "\n".join(lines) + "\n"
    print(md)
    stem = f"hf_step_cpu_fp32{'_quick' if args.quick else ''}"
    harness.write_results(args.out, stem, result, md=md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
