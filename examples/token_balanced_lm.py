#!/usr/bin/env python
"""Class-balanced token losses for a small causal LM, on the Python standard library's own source code.

Corpus: the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (present offline wherever Python is),
skipping ``site-packages``, test directories (``test``, ``tests``, ``idle_test``), ``encodings`` (generated
charmap tables) and ``pydoc_data`` (one 0.75 MB blob of English help text). Files are ordered by a hash of their
relative path and taken whole until ``--max-chars`` is reached; a second hash of the path puts
``--val-percent`` % of them in the validation split (a split by file, so no file is in both). The exact
corpus depends on the Python version: its statistics and a fingerprint are in the results.

Tokenizer: byte-level BPE trained here with ``tokenizers`` on the training split only (``--vocab``, 8192 by
default), one ``<|endoftext|>`` token between files. Token frequencies: ``cbkernels.ClassCounter`` over the
training targets (every training block's tokens after the first, exactly what the loss is trained on).

Model: ``transformers.LlamaForCausalLM`` from a config (hidden 128, 2 layers, 4 heads, tied embeddings), random
init from the seed. Every run of a seed starts from the same initial weights and sees the same batches in the same
order with the same optimizer (AdamW, linear warmup then cosine decay), all through the fused
``cbkernels.integrations.transformers.apply_class_balanced_loss``:

  1. ``ce``:               no counts, weights 1: plain cross-entropy (the model's own loss, fused);
  2. ``cb_softmax``:       class-balanced softmax CE, ``beta`` (``--beta``);
  3. ``cb_softmax_focal``: class-balanced softmax focal loss, ``beta`` and ``gamma`` (``--gamma``);
  4. ``cb_softmax@b`` for every ``b`` of ``--extra-betas``: class-balanced softmax CE with a milder ``beta``.

Tokens never seen in training get weight 0 (``zero_count="zero"``, the integration's default). ``beta`` is fixed
in advance (0.9999 by default, Cui et al.'s value for their largest data sets): the effective number
``(1 - beta^n) / (1 - beta)`` saturates at ``1 / (1 - beta) = 10^4`` occurrences, so tokens seen up to a few
thousand times are weighted roughly by ``1 / n`` and only the few most frequent ones alike. Over a vocabulary of
thousands of rare types that puts almost all of the loss on the rare tokens (the results give each bucket's share
of the training loss weight for every run), so the full run adds ``beta = 0.99`` (cap 100) as a milder point.
Nothing is tuned on the validation split.

Reported on the validation split, for every run: the perplexity ``exp(mean unweighted token NLL)`` (the LM metric,
the same for every run whatever its training loss), the top-1 accuracy, the macro (per-type averaged) accuracy,
and the NLL and accuracy per bucket of target tokens by training count (frequent / medium / rare,
``--bucket-edges``; tokens never seen in training are in "rare"). Mean ± std over seeds, and paired differences
to plain CE (same seed = same initial weights and batches).

    python examples/token_balanced_lm.py            # full run: 2 seeds x 4 runs, about 10 minutes on 2 busy cores
    python examples/token_balanced_lm.py --quick    # smoke run: a small corpus, vocabulary and model, ~15 s
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

import cbkernels

EOT = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
             "pydoc_data"}
BUCKETS = ("frequent", "medium", "rare")
MAIN_RUNS = ("ce", "cb_softmax", "cb_softmax_focal")

FULL = dict(seeds=2, steps=200, max_chars=2_000_000, vocab=8192, hidden=128, layers=2, heads=4, seq_len=128,
            batch=8, eval_every=25, curve_blocks=32, bucket_edges=[1000, 100], extra_betas=[0.99])
QUICK = dict(seeds=2, steps=30, max_chars=150_000, vocab=512, hidden=64, layers=2, heads=4, seq_len=64,
             batch=8, eval_every=10, curve_blocks=16, bucket_edges=[400, 100], extra_betas=[])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- corpus

def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files (relative paths, sorted), minus SKIP_DIRS and ``config-*``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place: os.walk never descends into the skipped directories (site-packages is large).
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        rel = Path(dirpath).relative_to(root)
        out += [rel / f for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda r: r.as_posix())


def load_corpus(max_chars: int, val_percent: float, root: Path | None = None) -> dict:
    """Files in path-hash order, whole, until ``max_chars``; split train / val by another hash of the path."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = stdlib_files(root)
    order = sorted(files, key=lambda r: (_hash("select:" + r.as_posix()), r.as_posix()))
    split = {"train": [], "val": []}
    names = {"train": [], "val": []}
    total = 0
    for rel in order:
        if total >= max_chars:
            break
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        part = "val" if _hash("split:" + rel.as_posix()) % 10_000 < val_percent * 100 else "train"
        split[part].append(text)
        names[part].append(rel.as_posix())
        total += len(text)
    fingerprint = hashlib.sha1()
    for part in ("train", "val"):
        for name, text in zip(names[part], split[part]):
            fingerprint.update(f"{part}:{name}:{len(text)}\n".encode())
            fingerprint.update(text.encode())
    return dict(root=str(root), files_available=len(files), texts=split, names=names,
                fingerprint=fingerprint.hexdigest()[:16])


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE on the training texts (deterministic for the same texts and settings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """The texts' ids, one EOT after every file."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


def blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` blocks (the tail shorter than a block is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


# ----------------------------------------------------------------------------------------------- model

def build_model(args, vocab: int, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                                   tie_word_embeddings=True, attention_dropout=0.0, rope_theta=10_000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Per-target-token NLL (nats), hit (top-1) and target id over ``val`` blocks, with the model's own forward
    (eval mode: the integration is not involved). Position t predicts token t + 1."""
    was_training = model.training
    model.eval()
    nll, hit = [], []
    for i in range(0, val.shape[0], batch):
        x = val[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        y = x[:, 1:]
        nll.append((torch.logsumexp(logits, -1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)).reshape(-1))
        hit.append((logits.argmax(-1) == y).reshape(-1))
    model.train(was_training)
    return dict(nll=torch.cat(nll).double(), hit=torch.cat(hit), target=val[:, 1:].reshape(-1))


def summarize(ev: dict, bucket_of: torch.Tensor, vocab: int) -> dict:
    """Overall and per-bucket metrics from ``evaluate``'s per-token results."""
    nll, hit, target = ev["nll"], ev["hit"].double(), ev["target"]
    n_type = torch.bincount(target, minlength=vocab).double()
    hit_type = torch.bincount(target, weights=hit, minlength=vocab)
    seen = n_type > 0
    acc_type = hit_type[seen] / n_type[seen]
    out = dict(nll=float(nll.mean()), ppl=math.exp(float(nll.mean())), acc=float(hit.mean()),
               macro_acc=float(acc_type.mean()), buckets={})
    tb = bucket_of[target]
    type_bucket = bucket_of[seen]
    for b, name in enumerate(BUCKETS):
        m = tb == b
        k = int(m.sum())
        out["buckets"][name] = dict(
            nll=float(nll[m].mean()) if k else float("nan"), acc=float(hit[m].mean()) if k else float("nan"),
            macro_acc=float(acc_type[type_bucket == b].mean()) if bool((type_bucket == b).any()) else float("nan"))
    return out


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def batch_order(n_blocks: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` block indices: seeded permutations of the training blocks, epoch after epoch."""
    g = torch.Generator().manual_seed(20_000 + seed)
    need = steps * batch
    perms = [torch.randperm(n_blocks, generator=g) for _ in range(-(-need // n_blocks))]
    return torch.cat(perms)[:need].view(steps, batch)


def run_specs(args) -> list[dict]:
    """The runs of every seed: plain CE, CB softmax and CB softmax focal at ``--beta``, CB softmax at each extra
    beta."""
    specs = [dict(name="ce", label="plain CE", loss_type="softmax", beta=None, gamma=0.0),
             dict(name="cb_softmax", label=f"CB softmax β={args.beta:g}", loss_type="softmax", beta=args.beta,
                  gamma=0.0),
             dict(name="cb_softmax_focal", label=f"CB softmax focal β={args.beta:g} γ={args.gamma:g}",
                  loss_type="softmax_focal", beta=args.beta, gamma=args.gamma)]
    specs += [dict(name=f"cb_softmax@{b:g}", label=f"CB softmax β={b:g}", loss_type="softmax", beta=b, gamma=0.0)
              for b in args.extra_betas]
    return specs


def train_run(spec: dict, model, counts: torch.Tensor, train: torch.Tensor, order: torch.Tensor, val_curve,
              init_nll: float, args):
    from cbkernels.integrations.transformers import apply_class_balanced_loss, remove_class_balanced_loss

    if spec["beta"] is None:  # no counts: weights 1, the model's own cross-entropy (fused like the others)
        apply_class_balanced_loss(model, loss_type=spec["loss_type"], backend=args.backend)
    else:
        focal = {"gamma": spec["gamma"]} if "focal" in spec["loss_type"] else {}
        apply_class_balanced_loss(model, counts, loss_type=spec["loss_type"], beta=spec["beta"], backend=args.backend,
                                  **focal)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, round(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup))
    curve = [(0, init_nll)]
    train_loss = []
    model.train()
    for step in range(args.steps):
        x = train[order[step]]
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        train_loss.append(float(out.loss.detach()))
        if not math.isfinite(train_loss[-1]):
            raise FloatingPointError(f"{spec['name']}: training loss {train_loss[-1]} at step {step}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, float(evaluate(model, val_curve, args.eval_batch)["nll"].mean())))
    remove_class_balanced_loss(model)
    return curve, train_loss


# --------------------------------------------------------------------------------------------- summary

def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def metric_paths() -> list[tuple[str, ...]]:
    paths = [("ppl",), ("nll",), ("acc",), ("macro_acc",)]
    for b in BUCKETS:
        paths += [("buckets", b, "nll"), ("buckets", b, "acc"), ("buckets", b, "macro_acc")]
    return paths


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        d = d[k]
    return d


def aggregate(runs: list[dict], names: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """Mean/std over seeds per run, and paired differences (run minus plain CE, same seed)."""
    summary, paired = {}, {}
    by = {(r["name"], r["seed"]): r["val"] for r in runs}
    for loss in names:
        summary[loss] = {}
        if loss != "ce":
            paired[loss] = {}
        for path in metric_paths():
            key = ".".join(path)
            vals = [_get(by[(loss, s)], path) for s in seeds]
            m, s = mean_std(vals)
            summary[loss][key] = dict(mean=m, std=s, values=vals)
            if loss != "ce":
                diff = np.array(vals) - np.array([_get(by[("ce", s)], path) for s in seeds])
                m, s = mean_std(diff)
                paired[loss][key] = dict(mean=m, std=s, positive=int((diff > 0).sum()), negative=int((diff < 0).sum()))
    return summary, paired


def markdown(res: dict) -> str:
    cfg, corpus, summary, paired = res["config"], res["corpus"], res["summary"], res["paired_vs_ce"]
    specs = cfg["runs"]
    n = len(cfg["seed_list"])

    def cell(name, key, scale=1.0, digits=2):
        r = summary[name][key]
        return f"{scale * r['mean']:.{digits}f}" + (f" ± {scale * r['std']:.{digits}f}" if n > 1 else "")

    def dcell(name, key, scale=1.0, digits=2):
        r = paired[name][key]
        s = f"{scale * r['mean']:+.{digits}f}"
        if n > 1:
            s += f" ± {scale * r['std']:.{digits}f} ({r['positive']}/{r['negative']})"
        return s

    L = [f"Validation split: {corpus['val_target_tokens']:,} target tokens from {corpus['val_files']} files "
         f"(never trained on, never used to choose anything); mean{' ± std' if n > 1 else ''} over {n} "
         f"seed{'s' if n > 1 else ''} ({', '.join(map(str, cfg['seed_list']))}); every run {cfg['steps']} steps "
         f"of {cfg['batch']} × {cfg['seq_len']} tokens from the same initial weights and batches.\n\n"]
    L.append("| run | val perplexity | val NLL | top-1 acc, % | macro acc, % |\n|---|---|---|---|---|\n")
    for sp in specs:
        k = sp["name"]
        L.append(f"| {sp['label']} | {cell(k, 'ppl')} | {cell(k, 'nll', digits=3)} | {cell(k, 'acc', 100, 1)} | "
                 f"{cell(k, 'macro_acc', 100, 1)} |\n")
    e_hi, e_lo = cfg["bucket_edges"]
    L.append("\nToken-frequency buckets, by the training count n of the target token; the last columns give each "
             "bucket's share of the training loss weight, sum of n_c·w_c over its types (plain CE: its share of "
             "the training tokens)\n\n")
    cb = [sp for sp in specs if sp["beta"] is not None and sp["loss_type"] == "softmax"]
    L.append("| bucket | training count | vocab types | types in val | val tokens (share) | "
             + " | ".join(f"loss weight, {sp['label']}" for sp in [specs[0]] + cb) + " |\n"
             + "|---" * (5 + 1 + len(cb)) + "|\n")
    rng = {"frequent": f"n ≥ {e_hi}", "medium": f"{e_lo} ≤ n < {e_hi}", "rare": f"n < {e_lo}"}
    for b in BUCKETS:
        st = corpus["buckets"][b]
        shares = [res["loss_weight_share"][sp["name"]][b] for sp in [specs[0]] + cb]
        L.append(f"| {b} | {rng[b]} | {st['types']:,} | {st['val_types']:,} | {st['val_tokens']:,} "
                 f"({100 * st['val_tokens'] / corpus['val_target_tokens']:.1f} %) | "
                 + " | ".join(f"{100 * v:.1f} %" for v in shares) + " |\n")
    L.append(f"\nRare includes {corpus['unseen_types']:,} types never seen in training "
             f"({corpus['unseen_val_tokens']:,} val tokens), whose weight is 0 in the CB runs.\n")
    L.append("\nPer-bucket validation NLL, nats (lower is better)\n\n| run | " + " | ".join(BUCKETS) + " |\n|---|"
             + "---|" * len(BUCKETS) + "\n")
    for sp in specs:
        L.append(f"| {sp['label']} | " + " | ".join(cell(sp["name"], f"buckets.{b}.nll", digits=3) for b in BUCKETS)
                 + " |\n")
    seen = corpus["vocab"] - corpus["unseen_types"]
    L.append(f"\nFor reference, a uniform guess over the {seen:,} types seen in training scores log {seen:,} = "
             f"{math.log(seen):.3f} nats on every seen token (uniform over the vocabulary: "
             f"{math.log(corpus['vocab']):.3f}).\n")
    L.append("\nPer-bucket top-1 accuracy, % (token-averaged / type-averaged)\n\n| run | " + " | ".join(BUCKETS)
             + " |\n|---|" + "---|" * len(BUCKETS) + "\n")
    for sp in specs:
        k = sp["name"]
        L.append(f"| {sp['label']} | " + " | ".join(
            f"{cell(k, f'buckets.{b}.acc', 100, 1)} / {cell(k, f'buckets.{b}.macro_acc', 100, 1)}"
            for b in BUCKETS) + " |\n")
    L.append("\nPaired difference vs plain CE (run minus CE, same seed)"
             + ("; mean ± std (seeds up / down)" if n > 1 else "") + "\n\n")
    cols = [("ppl", "perplexity", 1, 1), ("acc", "acc, pts", 100, 1), ("macro_acc", "macro acc, pts", 100, 2)]
    cols += [(f"buckets.{b}.nll", f"{b} NLL", 1, 3) for b in BUCKETS]
    cols += [(f"buckets.{b}.acc", f"{b} acc, pts", 100, 1) for b in BUCKETS]
    L.append("| run | " + " | ".join(c[1] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n")
    for sp in specs[1:]:
        L.append(f"| {sp['label']} | " + " | ".join(dcell(sp["name"], k, sc, d) for k, _, sc, d in cols) + " |\n")
    return "".join(L)


def details_markdown(res: dict) -> str:
    c, m, cfg = res["corpus"], res["machine"], res["config"]
    return (
        "## Setup\n\n"
        f"- Command: `{res['command']}`\n"
        f"- Date: {res['date']}; machine: {m['node']} ({m['processor'] or m['machine']}), {m['cores']} cores, "
        f"{cfg['threads']} torch threads; wall time {res['wall_time_s']:.0f} s\n"
        f"- Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, tokenizers "
        f"{m['tokenizers']}, cbkernels {m['cbkernels']}\n"
        f"- Corpus: Python {m['python']} stdlib `*.py` ({c['files_available']} files after skipping "
        f"{', '.join(sorted(SKIP_DIRS))}); {c['train_files']} train / {c['val_files']} val files, "
        f"{c['train_chars']:,} / {c['val_chars']:,} characters, {c['train_tokens']:,} / {c['val_tokens']:,} tokens; "
        f"fingerprint {c['fingerprint']}\n"
        f"- Tokenizer: byte-level BPE trained on the train split, vocabulary {c['vocab']:,}; "
        f"{c['train_chars'] / max(1, c['train_tokens']):.2f} characters per token\n"
        f"- Model: Llama, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, tied embeddings, "
        f"{res['model_parameters']:,} parameters ({res['model_parameters_non_embedding']:,} without the embedding)\n"
        f"- Training: {cfg['steps']} steps × {cfg['batch']} blocks of {cfg['seq_len']} tokens "
        f"({cfg['steps'] * cfg['batch'] * (cfg['seq_len'] - 1):,} target tokens, "
        f"{cfg['steps'] * cfg['batch'] / max(1, c['train_blocks']):.2f} epochs), AdamW lr {cfg['lr']:g} "
        f"(warmup {cfg['warmup']:g} of the steps, cosine to 10 %), weight decay {cfg['weight_decay']:g}, "
        f"betas (0.9, 0.95), no gradient clipping; cbkernels backend {cfg['backend']}\n"
        f"- Validation curves: NLL on {cfg['curve_blocks']} fixed val blocks every {cfg['eval_every']} steps; "
        "the tables use the whole val split\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = res["config"]["runs"]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    summary = res["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for i, sp in enumerate(specs):
        curves = [r["val_curve"] for r in res["runs"] if r["name"] == sp["name"]]
        steps = [s for s, _ in curves[0]]
        vals = np.array([[v for _, v in c] for c in curves])
        ax.plot(steps, vals.mean(0), color=colours[i % 6], marker="o", ms=3, label=sp["label"])
        if len(curves) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=colours[i % 6], alpha=0.2)
    ax.axhline(math.log(res["corpus"]["vocab"]), color="grey", ls=":", lw=1, label="log(vocab): uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("val NLL, nats (unweighted)")
    ax.set_title(f"validation loss ({res['config']['curve_blocks']} val blocks; band: min-max over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    x = np.arange(len(BUCKETS))
    w = 0.8 / len(specs)
    for ax, key, title, scale in ((axes[1], "nll", "val NLL per bucket, nats (lower is better)", 1.0),
                                  (axes[2], "acc", "val top-1 accuracy per bucket, %", 100.0)):
        for i, sp in enumerate(specs):
            m = [scale * summary[sp["name"]][f"buckets.{b}.{key}"]["mean"] for b in BUCKETS]
            s = [scale * summary[sp["name"]][f"buckets.{b}.{key}"]["std"] for b in BUCKETS]
            ax.bar(x + (i - (len(specs) - 1) / 2) * w, m, w, yerr=s, capsize=2, color=colours[i % 6],
                   label=sp["label"])
        if key == "nll":
            seen = res["corpus"]["vocab"] - res["corpus"]["unseen_types"]
            ax.axhline(math.log(seen), color="grey", ls=":", lw=1, label="uniform over seen types")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{b}\n({res['corpus']['buckets'][b]['val_tokens']:,} val tokens)" for b in BUCKETS])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    n = len(res["config"]["seed_list"])
    fig.suptitle(f"Llama {res['model_parameters'] / 1e6:.2f}M on Python stdlib source, BPE vocab "
                 f"{res['corpus']['vocab']}, {res['config']['steps']} steps, mean over {n} seed{'s' if n > 1 else ''}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def cpu_name() -> str:
    """The CPU model (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    # Half the cores (at most 4): on a small shared machine, OpenMP threads waiting for each other cost far more
    # than the second thread gains (on 2 busy cores a step took 3-9x longer with 2 threads than with 1).
    return max(1, min(4, cores // 2))


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Plain CE vs class-balanced softmax / softmax-focal token losses (cbkernels' transformers "
                    "integration) for a small Llama trained on the Python standard library's source. Writes JSON, "
                    "Markdown and PNG results; progress goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~15 s): " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                        + "; explicit options below still win")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds (full: {FULL['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (full: {FULL['steps']})")
    p.add_argument("--batch", type=int, default=None, help=f"blocks per step (full: {FULL['batch']})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per block (full: {FULL['seq_len']})")
    p.add_argument("--max-chars", type=int, default=None,
                   help=f"corpus size in characters, train + val (full: {FULL['max_chars']:,})")
    p.add_argument("--val-percent", type=float, default=10.0, help="share of the files in the validation split")
    p.add_argument("--vocab", type=int, default=None, help=f"BPE vocabulary size (full: {FULL['vocab']})")
    p.add_argument("--hidden", type=int, default=None, help=f"model width (full: {FULL['hidden']})")
    p.add_argument("--layers", type=int, default=None, help=f"decoder layers (full: {FULL['layers']})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (full: {FULL['heads']})")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=float, default=0.1, help="linear warmup, as a fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on the matrices")
    p.add_argument("--beta", type=float, default=0.9999, help="class-balanced beta (both CB runs)")
    p.add_argument("--gamma", type=float, default=1.0, help="focal gamma (the CB softmax-focal run)")
    p.add_argument("--extra-betas", type=float, nargs="*", default=None,
                   help=f"a CB softmax run for each of these betas too (full: {FULL['extra_betas']}, quick: none)")
    p.add_argument("--bucket-edges", type=int, nargs=2, default=None, metavar=("FREQUENT", "RARE"),
                   help="training-count thresholds: frequent n >= FREQUENT, rare n < RARE, medium between "
                        f"(full: {FULL['bucket_edges']}, quick: {QUICK['bucket_edges']})")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation-curve points")
    p.add_argument("--curve-blocks", type=int, default=None, help="val blocks for the curves (final: all)")
    p.add_argument("--eval-batch", type=int, default=8, help="blocks per evaluation forward")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="torch.set_num_threads for the run (restored afterwards)")
    p.add_argument("--backend", default="auto", help="cbkernels backend")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seeds < 1 or args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        p.error("--seeds, --steps, --batch must be >= 1 and --seq-len >= 2")
    if not all(0.0 <= b < 1.0 for b in [args.beta] + args.extra_betas):
        p.error("--beta and --extra-betas must lie in [0, 1)")
    if len({args.beta, *args.extra_betas}) != 1 + len(args.extra_betas):
        p.error("--extra-betas must differ from --beta and from each other")
    if args.bucket_edges[0] <= args.bucket_edges[1]:
        p.error("--bucket-edges FREQUENT RARE needs FREQUENT > RARE")
    if not 0 < args.val_percent < 100:
        p.error("--val-percent must lie in (0, 100)")
    return args


def main(argv=None) -> dict:
    """Run the experiment for ``argv`` (``sys.argv[1:]`` when None); return the results dict (as written to the
    JSON file, plus the output ``paths``)."""
    args = parse_args(argv)
    args.command = " ".join(["python", "examples/token_balanced_lm.py"] + list(sys.argv[1:] if argv is None
                                                                                else argv))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return experiment(args)
    finally:
        # Leave the caller's process as it was (the smoke test runs this in pytest's process).
        torch.set_num_threads(threads)


def experiment(args) -> dict:
    t0 = time.perf_counter()
    import tokenizers
    import transformers

    corpus = load_corpus(args.max_chars, args.val_percent)
    texts = corpus.pop("texts")
    if not texts["train"] or not texts["val"]:
        raise RuntimeError(f"corpus too small for a train/val split: {len(texts['train'])} train and "
                           f"{len(texts['val'])} val files; raise --max-chars")
    tok = train_tokenizer(texts["train"], args.vocab)
    vocab = tok.get_vocab_size()
    train_ids, val_ids = token_stream(tok, texts["train"]), token_stream(tok, texts["val"])
    train, val = blocks(train_ids, args.seq_len), blocks(val_ids, args.seq_len)
    if val.shape[0] == 0 or train.shape[0] == 0:
        raise RuntimeError("not a single block of --seq-len tokens in a split; raise --max-chars")
    # The training targets, as the loss sees them: every block's tokens after its first.
    counter = cbkernels.ClassCounter.count(train.split(256), vocab, target_of=lambda b: b[:, 1:], progress=False)
    counts = counter.counts
    e_hi, e_lo = args.bucket_edges
    bucket_of = torch.where(counts >= e_hi, 0, torch.where(counts >= e_lo, 1, 2))
    val_targets = val[:, 1:].reshape(-1)
    val_count = torch.bincount(val_targets, minlength=vocab)
    tok_stats = dict(
        vocab=vocab, tokenizer_sha1=hashlib.sha1(tok.to_str().encode()).hexdigest()[:16],
        train_files=len(texts["train"]), val_files=len(texts["val"]),
        train_chars=sum(map(len, texts["train"])), val_chars=sum(map(len, texts["val"])),
        train_tokens=int(train_ids.numel()), val_tokens=int(val_ids.numel()), train_blocks=int(train.shape[0]),
        val_blocks=int(val.shape[0]), train_target_tokens=int(counts.sum()), val_target_tokens=int(val_targets.numel()),
        unseen_types=int((counts == 0).sum()), unseen_val_tokens=int(val_count[counts == 0].sum()),
        max_count=int(counts.max()), median_count_of_seen_types=float(counts[counts > 0].double().median()),
        buckets={b: dict(types=int((bucket_of == i).sum()), val_types=int(((bucket_of == i) & (val_count > 0)).sum()),
                         val_tokens=int(val_count[bucket_of == i].sum()),
                         train_tokens=int(counts[bucket_of == i].sum())) for i, b in enumerate(BUCKETS)},
    )
    corpus.pop("names")
    corpus.update(tok_stats)
    log(f"corpus: {corpus['train_files']} train / {corpus['val_files']} val files, {corpus['train_chars']:,} / "
        f"{corpus['val_chars']:,} chars -> {corpus['train_tokens']:,} / {corpus['val_tokens']:,} tokens, vocab "
        f"{vocab} ({time.perf_counter() - t0:.1f} s)")
    log("buckets: " + ", ".join(f"{b} {s['types']} types / {s['val_tokens']:,} val tokens"
                                for b, s in corpus["buckets"].items()))
    specs = run_specs(args)
    # Each bucket's share of the training loss weight, sum over its types of count x class weight (SPEC's "mean"
    # reduction weighs every target token by its class weight).
    share = {}
    for sp in specs:
        w = (torch.ones(vocab, dtype=torch.float64) if sp["beta"] is None else
             cbkernels.class_balanced_weights(counts, beta=sp["beta"], zero_count="zero").double())
        mass = counts.double() * w
        share[sp["name"]] = {b: float(mass[bucket_of == i].sum() / mass.sum()) for i, b in enumerate(BUCKETS)}
    stride = max(1, val.shape[0] // args.curve_blocks)
    val_curve = val[::stride][: args.curve_blocks]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = []
    n_params = n_embed = 0
    for seed in seeds:
        base = build_model(args, vocab, seed)
        n_params = sum(p.numel() for p in base.parameters())
        n_embed = base.get_input_embeddings().weight.numel()
        order = batch_order(train.shape[0], args.steps, args.batch, seed)
        init_nll = float(evaluate(base, val_curve, args.eval_batch)["nll"].mean())
        for sp in specs:
            t1 = time.perf_counter()
            model = copy.deepcopy(base)
            curve, train_loss = train_run(sp, model, counts, train, order, val_curve, init_nll, args)
            metrics = summarize(evaluate(model, val, args.eval_batch), bucket_of, vocab)
            wall = time.perf_counter() - t1
            runs.append(dict(name=sp["name"], seed=seed, val=metrics, val_curve=curve,
                             train_loss_first_last=[train_loss[0], train_loss[-1]],
                             train_loss_every_eval=train_loss[args.eval_every - 1::args.eval_every], wall_s=wall))
            bk = metrics["buckets"]
            log(f"seed {seed} {sp['label']:<30} val ppl {metrics['ppl']:8.2f}  acc {100 * metrics['acc']:5.1f}  "
                f"macro {100 * metrics['macro_acc']:5.2f}  NLL f/m/r "
                + "/".join(f"{bk[b]['nll']:.2f}" for b in BUCKETS) + "  acc f/m/r "
                + "/".join(f"{100 * bk[b]['acc']:.1f}" for b in BUCKETS)
                + f"  ({wall:.1f} s, total {time.perf_counter() - t0:.0f} s)")
            del model
    summary, paired = aggregate(runs, [sp["name"] for sp in specs], seeds)
    wall = time.perf_counter() - t0
    results = dict(
        command=args.command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(node=platform.node(), processor=cpu_name(), machine=platform.machine(),
                     platform=platform.platform(), cores=os.cpu_count(), python=platform.python_version(),
                     torch=torch.__version__, transformers=transformers.__version__,
                     tokenizers=tokenizers.__version__, cbkernels=cbkernels.__version__),
        config=dict(quick=args.quick, seed_list=seeds, runs=specs, steps=args.steps, batch=args.batch,
                    seq_len=args.seq_len, max_chars=args.max_chars, val_percent=args.val_percent,
                    vocab_requested=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, lr=args.lr,
                    warmup=args.warmup, weight_decay=args.weight_decay, beta=args.beta, gamma=args.gamma,
                    extra_betas=args.extra_betas, bucket_edges=list(args.bucket_edges), eval_every=args.eval_every,
                    curve_blocks=int(val_curve.shape[0]), eval_batch=args.eval_batch, threads=args.threads,
                    backend=args.backend, zero_count="zero",
                    optimizer="AdamW(betas=(0.9, 0.95)), linear warmup then cosine to 10 %, no gradient clipping"),
        corpus=corpus,
        loss_weight_share=share,
        model_parameters=n_params, model_parameters_non_embedding=n_params - n_embed,
        runs=runs, summary=summary, paired_vs_ce=paired, wall_time_s=wall,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "token_balanced_lm" + ("_quick" if args.quick else "")
    paths = {ext: args.out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    paths["md"].write_text("# Token-level class-balanced losses on a small causal LM\n\n" + table + "\n"
                           + details_markdown(results))
    plot(results, paths["png"])
    results["paths"] = {k: str(v) for k, v in paths.items()}
    print(table)
    log(f"done in {wall:.1f} s; wrote {', '.join(str(v) for v in paths.values())}")
    return results


if __name__ == "__main__":
    main()
