#!/usr/bin/env python
"""Class-balanced losses on long-tailed handwritten digits (a small-scale replay of Cui et al., CVPR 2019).

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, ten classes of 174-183 images; ships with
scikit-learn, nothing is downloaded). For every seed the images of each class are shuffled and split
into a balanced test set (50 per class), a balanced validation set (20 per class, used only to choose
beta and gamma) and a training pool. The long-tailed training set for imbalance factor IF keeps the
first ``n_i = int(n_max * IF^(-i/(C-1)))`` pool images of class ``i`` (``n_max = 100``), the recipe of
the paper's long-tailed CIFAR, so digit 0 is the head and digit 9 the tail.

Model: MLP 64 -> 128 -> 10 (ReLU) trained full-batch with AdamW and a cosine learning-rate schedule.
Losses: plain softmax cross-entropy, sigmoid cross-entropy and sigmoid focal loss, and their
class-balanced versions through ``cbkernels`` over a (beta, gamma) grid. Like the paper, the sigmoid
and focal models start with final-layer bias ``-log((1 - pi) / pi)``, ``pi = 0.1``.

Reported: balanced test accuracy (mean per-class recall) and tail accuracy (mean recall of the three
rarest classes), mean +/- std over seeds. For each loss family the grid point (gamma for focal; beta,
and gamma for CB focal) with the best mean validation balanced accuracy is the one reported: the test
set never picks anything. Every grid point is also in the JSON and Markdown outputs.

    python examples/long_tailed_digits.py            # full run: 10 seeds, about 4 minutes on one busy core
    python examples/long_tailed_digits.py --quick    # smoke run: about 15 seconds

A seed fixes the data split and the initial network, so the same seed gives the same numbers, and
every loss sees the same split and starting weights (the paired differences in the output use that).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import cbkernels

NUM_CLASSES = 10
TEST_PER_CLASS = 50
VAL_PER_CLASS = 20
# The rarest class has 174 images; 174 - 50 - 20 = 104 leaves room for a head class of 100.
N_MAX = 100
NUM_TAIL = 3
PRIOR_PI = 0.1

FAMILIES = ("softmax", "sigmoid", "focal", "cb_softmax", "cb_sigmoid", "cb_focal")
LABELS = {
    "softmax": "softmax CE", "sigmoid": "sigmoid CE", "focal": "focal",
    "cb_softmax": "CB softmax CE", "cb_sigmoid": "CB sigmoid CE", "cb_focal": "CB focal",
}

FULL = dict(seeds=10, steps=500, imbalance_factors=[10, 50, 100], betas=[0.9, 0.99, 0.999, 0.9999],
            gammas=[0.5, 1.0, 2.0])
QUICK = dict(seeds=2, steps=150, imbalance_factors=[10, 50, 100], betas=[0.99, 0.9999], gammas=[1.0])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data

def long_tailed_counts(n_max: int, imbalance: float, num_classes: int = NUM_CLASSES) -> list[int]:
    """``n_i = int(n_max * IF^(-i/(C-1)))``, at least one image per class."""
    return [max(1, int(n_max * imbalance ** (-i / (num_classes - 1)))) for i in range(num_classes)]


def split_digits(x: np.ndarray, y: np.ndarray, seed: int):
    """Per-class shuffle into (test, val, pool) index lists; pools stay ordered so that the training
    sets of the different imbalance factors are nested prefixes of one another."""
    rng = np.random.default_rng(seed)
    test, val, pool = [], [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:TEST_PER_CLASS])
        val.append(idx[TEST_PER_CLASS:TEST_PER_CLASS + VAL_PER_CLASS])
        pool.append(idx[TEST_PER_CLASS + VAL_PER_CLASS:])
    return np.concatenate(test), np.concatenate(val), pool


def load_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixels are 0..16 ink counts: a fixed rescale needs no statistics from any split.
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


# ---------------------------------------------------------------------------------------------- model
# One independent MLP per seed, stacked along a leading dim and run with batched matmuls: the seeds
# of a configuration train in one loop. AdamW is elementwise and each model's loss is its own mean,
# so this is exactly S separate trainings, only with less Python overhead.

def init_params(seeds: list[int], hidden: int) -> list[torch.Tensor]:
    """nn.Linear's default init, one generator per seed so a seed's network does not depend on
    which other seeds run beside it."""
    w1, b1, w2, b2 = [], [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(10_000 + s)
        k1, k2 = 1 / math.sqrt(64), 1 / math.sqrt(hidden)
        w1.append((torch.rand(64, hidden, generator=g) * 2 - 1) * k1)
        b1.append((torch.rand(1, hidden, generator=g) * 2 - 1) * k1)
        w2.append((torch.rand(hidden, NUM_CLASSES, generator=g) * 2 - 1) * k2)
        b2.append((torch.rand(1, NUM_CLASSES, generator=g) * 2 - 1) * k2)
    return [torch.stack(t) for t in (w1, b1, w2, b2)]


def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.baddbmm(b2, torch.baddbmm(b1, x, w1).relu_(), w2)


def per_class_recall(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``[S, C]`` recall of each class for each seed's model."""
    pred = logits.argmax(-1)
    hits = (pred == y).float()
    onehot = torch.nn.functional.one_hot(y, NUM_CLASSES).float()
    return ((hits.unsqueeze(-1) * onehot).sum(1) / onehot.sum(1)).numpy()


def train(cfg: dict, init: list[torch.Tensor], xtr, ytr, counts, args) -> list[torch.Tensor]:
    params = [p.clone() for p in init]
    if cfg["loss_type"] != "softmax" and not args.no_prior_bias:
        # The paper's start for one-vs-all losses: every class probability begins at pi, so the nine
        # negatives of each row do not swamp the first steps with a huge push-down gradient.
        params[3].fill_(-math.log((1 - PRIOR_PI) / PRIOR_PI))
    for p in params:
        p.requires_grad_(True)
    # Decay the weights, not the biases: the prior bias is a deliberate start, not something to shrink.
    opt = torch.optim.AdamW([{"params": [params[0], params[2]], "weight_decay": args.weight_decay},
                             {"params": [params[1], params[3]], "weight_decay": 0.0}], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    if cfg["beta"] is None:
        def crit(z, t):
            return cbkernels.class_balanced_loss(z, t, loss_type=cfg["loss_type"], gamma=cfg["gamma"],
                                                 reduction="sum", backend=args.backend)
    else:
        # Counts over the whole training set (identical for every seed), never per batch.
        crit = cbkernels.ClassBalancedLoss(counts, loss_type=cfg["loss_type"], beta=cfg["beta"],
                                           gamma=cfg["gamma"], reduction="sum", backend=args.backend)
    n = ytr.shape[1]
    for _ in range(args.steps):
        # "sum" / n is each model's own mean loss; summing over the stacked models keeps their gradients apart.
        loss = crit(forward(params, xtr), ytr) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{cfg['name']}: training loss is {loss.item()}")
    return [p.detach() for p in params]


def loss_configs(betas, gammas) -> list[dict]:
    cfgs = [dict(family="softmax", loss_type="softmax", beta=None, gamma=0.0),
            dict(family="sigmoid", loss_type="sigmoid", beta=None, gamma=0.0)]
    cfgs += [dict(family="focal", loss_type="focal", beta=None, gamma=g) for g in gammas]
    cfgs += [dict(family="cb_softmax", loss_type="softmax", beta=b, gamma=0.0) for b in betas]
    cfgs += [dict(family="cb_sigmoid", loss_type="sigmoid", beta=b, gamma=0.0) for b in betas]
    cfgs += [dict(family="cb_focal", loss_type="focal", beta=b, gamma=g) for b in betas for g in gammas]
    for c in cfgs:
        parts = [c["family"]] + ([f"beta={c['beta']:g}"] if c["beta"] is not None else [])
        parts += [f"gamma={c['gamma']:g}"] if c["loss_type"] == "focal" else []
        c["name"] = " ".join(parts)
    return cfgs


# -------------------------------------------------------------------------------------------- summary

def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def select(runs: list[dict], imbalance_factors) -> dict:
    """Per imbalance factor and family, the grid point with the best mean validation balanced accuracy
    (ties go to the earlier grid point)."""
    out = {}
    for imb in imbalance_factors:
        base = next(r for r in runs if r["imbalance"] == imb and r["family"] == "softmax")
        out[str(imb)] = {}
        for fam in FAMILIES:
            cands = [r for r in runs if r["imbalance"] == imb and r["family"] == fam]
            if not cands:
                continue
            best = max(cands, key=lambda r: (r["val_bacc_mean"], -cands.index(r)))
            diff = np.array(best["test_bacc"]) - np.array(base["test_bacc"])
            out[str(imb)][fam] = dict(
                name=best["name"], beta=best["beta"], gamma=best["gamma"],
                val_bacc_mean=best["val_bacc_mean"],
                test_bacc_mean=best["test_bacc_mean"], test_bacc_std=best["test_bacc_std"],
                tail_acc_mean=best["tail_acc_mean"], tail_acc_std=best["tail_acc_std"],
                # Same seed = same split and same initial network, so the paired difference is the
                # sharper comparison with plain softmax.
                delta_vs_softmax_mean=mean_std(diff)[0], delta_vs_softmax_std=mean_std(diff)[1],
                seeds_better_than_softmax=int((diff > 0).sum()), seeds_worse_than_softmax=int((diff < 0).sum()),
            )
    return out


def pct(m: float, s: float) -> str:
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def markdown(results: dict) -> str:
    imbs = results["config"]["imbalance_factors"]
    sel = results["selected"]
    head = "| loss | " + " | ".join(f"IF {i}" for i in imbs) + " |\n|---|" + "---|" * len(imbs) + "\n"
    lines = [f"Balanced test accuracy, % (mean ± std over {results['config']['seeds']} seeds); "
             "beta/gamma chosen on the validation split\n", head]
    for fam in FAMILIES:
        cells = []
        for i in imbs:
            r = sel[str(i)].get(fam)
            if r is None:
                cells.append("")
                continue
            hp = ([f"β={r['beta']:g}"] if r["beta"] is not None else []) + (
                [f"γ={r['gamma']:g}"] if fam.endswith("focal") else [])
            cells.append(pct(r["test_bacc_mean"], r["test_bacc_std"]) + (f" ({', '.join(hp)})" if hp else ""))
        lines.append(f"| {LABELS[fam]} | " + " | ".join(cells) + " |\n")
    lines += [f"\nTail accuracy (the {NUM_TAIL} rarest classes, digits "
              f"{NUM_CLASSES - NUM_TAIL}-{NUM_CLASSES - 1}), %\n", head]
    for fam in FAMILIES:
        cells = [pct(sel[str(i)][fam]["tail_acc_mean"], sel[str(i)][fam]["tail_acc_std"])
                 if fam in sel[str(i)] else "" for i in imbs]
        lines.append(f"| {LABELS[fam]} | " + " | ".join(cells) + " |\n")
    lines += ["\nPaired difference in balanced test accuracy vs plain softmax CE, points "
              "(mean ± std; seeds better / worse)\n", head]
    for fam in FAMILIES[1:]:
        cells = []
        for i in imbs:
            r = sel[str(i)].get(fam)
            cells.append(f"{100 * r['delta_vs_softmax_mean']:+.1f} ± {100 * r['delta_vs_softmax_std']:.1f} "
                         f"({r['seeds_better_than_softmax']}/{r['seeds_worse_than_softmax']})" if r else "")
        lines.append(f"| {LABELS[fam]} | " + " | ".join(cells) + " |\n")
    lines += ["\nEvery grid point: balanced test accuracy / tail accuracy / validation balanced accuracy, %\n",
              "| configuration | " + " | ".join(f"IF {i}" for i in imbs) + " |\n|---|" + "---|" * len(imbs) + "\n"]
    names = list(dict.fromkeys(r["name"] for r in results["runs"]))
    for name in names:
        cells = []
        for i in imbs:
            r = next((r for r in results["runs"] if r["name"] == name and r["imbalance"] == i), None)
            cells.append(f"{100 * r['test_bacc_mean']:.1f} / {100 * r['tail_acc_mean']:.1f} / "
                         f"{100 * r['val_bacc_mean']:.1f}" if r else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imbs = results["config"]["imbalance_factors"]
    sel = results["selected"]
    colours = {"softmax": "tab:blue", "sigmoid": "tab:orange", "focal": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "test_bacc", "balanced test accuracy"),
                           (axes[1], "tail_acc", f"tail accuracy ({NUM_TAIL} rarest classes)")):
        for k, fam in enumerate(FAMILIES):
            base = fam.removeprefix("cb_")
            m = [100 * sel[str(i)][fam][f"{key}_mean"] for i in imbs]
            s = [100 * sel[str(i)][fam][f"{key}_std"] for i in imbs]
            # A small horizontal offset per line keeps the error bars apart on the log axis.
            xs = [i * 1.035 ** (k - 2.5) for i in imbs]
            ax.errorbar(xs, m, yerr=s, color=colours[base], ls="-" if fam.startswith("cb_") else "--",
                        marker="o" if fam.startswith("cb_") else "s", capsize=3, label=LABELS[fam])
        ax.set_xscale("log")
        ax.set_xticks(imbs)
        ax.set_xticklabels([str(i) for i in imbs])
        ax.minorticks_off()
        ax.set_xlabel("imbalance factor")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Long-tailed digits, MLP, mean ± std over {results['config']['seeds']} seeds "
                 "(β, γ chosen on the validation split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Plain vs class-balanced (cbkernels) softmax / sigmoid / focal losses on long-tailed "
                    "sklearn digits. Writes JSON, Markdown and PNG results; progress goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output directory")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run (under a minute): {QUICK['seeds']} seeds, {QUICK['steps']} steps, "
                        f"betas {QUICK['betas']}, gammas {QUICK['gammas']}; explicit options below still win")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds (full: {FULL['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--imbalance-factors", type=float, nargs="+", default=None,
                   help=f"n_max / n_min of the training sets (full: {FULL['imbalance_factors']})")
    p.add_argument("--betas", type=float, nargs="+", default=None, help=f"CB beta grid (full: {FULL['betas']})")
    p.add_argument("--gammas", type=float, nargs="+", default=None, help=f"focal gamma grid (full: {FULL['gammas']})")
    p.add_argument("--steps", type=int, default=None, help=f"full-batch training steps (full: {FULL['steps']})")
    p.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW peak learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=0.5,
                   help="AdamW decoupled weight decay on the weight matrices (biases are not decayed)")
    p.add_argument("--no-prior-bias", action="store_true",
                   help="start sigmoid/focal final-layer biases from nn.Linear's init instead of -log((1-pi)/pi)")
    # One thread by default: the tensors are a few hundred rows, too small for intra-op threads to pay
    # off, and on a busy machine OpenMP threads waiting for each other made each step ~50x slower.
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for the run (restored afterwards); 1 is fastest at this size")
    p.add_argument("--backend", default="auto", help="cbkernels backend")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.imbalance_factors = [int(i) if float(i).is_integer() else i for i in args.imbalance_factors]
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be >= 1")
    return args


def main(argv=None) -> dict:
    """Run the experiment for command-line ``argv`` (``sys.argv[1:]`` when None); return the results
    dict (as written to the JSON file, plus the output ``paths``)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return experiment(args)
    finally:
        # Leave the caller's process as it was (the smoke test runs this in pytest's process).
        torch.set_num_threads(threads)


def experiment(args) -> dict:
    t0 = time.perf_counter()
    x, y = load_data()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    splits = [split_digits(x, y, s) for s in seeds]
    xte = torch.from_numpy(np.stack([x[te] for te, _, _ in splits]))
    yte = torch.from_numpy(np.stack([y[te] for te, _, _ in splits]))
    xva = torch.from_numpy(np.stack([x[va] for _, va, _ in splits]))
    yva = torch.from_numpy(np.stack([y[va] for _, va, _ in splits]))
    init = init_params(seeds, args.hidden)
    cfgs = loss_configs(args.betas, args.gammas)
    total = len(cfgs) * len(args.imbalance_factors)
    log(f"long-tailed digits: {len(seeds)} seeds x {len(args.imbalance_factors)} imbalance factors x "
        f"{len(cfgs)} losses, {args.steps} steps each, backend {args.backend}")
    runs, counts_by_if, done = [], {}, 0
    for imb in args.imbalance_factors:
        counts = long_tailed_counts(N_MAX, imb)
        counts_by_if[str(imb)] = counts
        xtr = torch.from_numpy(np.stack([x[np.concatenate([pool[c][:n] for c, n in enumerate(counts)])]
                                         for _, _, pool in splits]))
        ytr = torch.from_numpy(np.stack([y[np.concatenate([pool[c][:n] for c, n in enumerate(counts)])]
                                         for _, _, pool in splits]))
        log(f"IF {imb}: {sum(counts)} training images per seed, counts {counts}")
        for cfg in cfgs:
            params = train(cfg, init, xtr, ytr, counts, args)
            with torch.no_grad():
                tr_acc = (forward(params, xtr).argmax(-1) == ytr).float().mean(1).numpy()
                rec_va = per_class_recall(forward(params, xva), yva)
                rec_te = per_class_recall(forward(params, xte), yte)
            val_bacc, test_bacc = rec_va.mean(1), rec_te.mean(1)
            tail = rec_te[:, NUM_CLASSES - NUM_TAIL:].mean(1)
            run = dict(imbalance=imb, **cfg, seeds=seeds, train_acc=tr_acc.tolist(), val_bacc=val_bacc.tolist(),
                       test_bacc=test_bacc.tolist(), tail_acc=tail.tolist(),
                       test_recall_per_class_mean=rec_te.mean(0).tolist())
            for k in ("train_acc", "val_bacc", "test_bacc", "tail_acc"):
                run[f"{k}_mean"], run[f"{k}_std"] = mean_std(run[k])
            runs.append(run)
            done += 1
            log(f"[{done:3d}/{total}] IF {imb:>3} {cfg['name']:<32} "
                f"val {pct(run['val_bacc_mean'], run['val_bacc_std'])}  "
                f"test {pct(run['test_bacc_mean'], run['test_bacc_std'])}  tail {100 * run['tail_acc_mean']:.1f}"
                f"  ({time.perf_counter() - t0:.1f} s)")
    wall = time.perf_counter() - t0
    results = dict(
        config=dict(quick=args.quick, seeds=len(seeds), seed_list=seeds, imbalance_factors=args.imbalance_factors,
                    betas=args.betas, gammas=args.gammas, steps=args.steps, hidden=args.hidden, lr=args.lr,
                    weight_decay=args.weight_decay, prior_bias=not args.no_prior_bias, prior_pi=PRIOR_PI,
                    optimizer="AdamW, full batch, cosine lr decay", n_max=N_MAX, test_per_class=TEST_PER_CLASS,
                    val_per_class=VAL_PER_CLASS, num_tail_classes=NUM_TAIL, train_counts=counts_by_if,
                    backend=args.backend, threads=args.threads, torch=torch.__version__,
                    cbkernels=cbkernels.__version__, python=platform.python_version()),
        runs=runs,
        selected=select(runs, args.imbalance_factors),
        wall_time_s=wall,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "long_tailed_digits" + ("_quick" if args.quick else "")
    paths = {ext: args.out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    paths["md"].write_text(f"# Long-tailed digits: plain vs class-balanced losses\n\n{table}\n"
                           f"Wall time {wall:.1f} s.\n")
    plot(results, paths["png"])
    results["paths"] = {k: str(v) for k, v in paths.items()}
    print(table.split("\nEvery grid point")[0])
    log(f"done in {wall:.1f} s; wrote {', '.join(str(v) for v in paths.values())}")
    return results


if __name__ == "__main__":
    main()
