#!/usr/bin/env python
"""Long-tail losses on long-tailed handwritten digits: class-balanced (Cui et al., CVPR 2019), logit adjustment,
Balanced Softmax, LDAM and LDAM-DRW, all through ``cbkernels``, at small scale and with paired seeds.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, ten classes of 174-183 images; ships with
scikit-learn, nothing is downloaded). For every seed the images of each class are shuffled and split
into a balanced test set (50 per class), a balanced validation set (20 per class, used only to choose
hyper-parameters) and a training pool. The long-tailed training set for imbalance factor IF keeps the
first ``n_i = int(n_max * IF^(-i/(C-1)))`` pool images of class ``i`` (``n_max = 100``), the recipe of
the paper's long-tailed CIFAR, so digit 0 is the head and digit 9 the tail. The training counts are the
same for every seed (only which images fill them changes).

Model: MLP 64 -> 128 -> 10 (ReLU) trained full-batch with AdamW and a cosine learning-rate schedule. Losses (every
one a ``cbkernels`` call; the prediction is always the arg-max of the raw logits, so offsets and margins act only
through training):

- plain softmax CE, sigmoid CE and sigmoid focal loss (gamma grid);
- class-balanced (CB) softmax / sigmoid / focal, ``ClassBalancedLoss(counts, beta=...)``: the paper, beta in
  {0.99, 0.999, 0.9999} (0.9 was the worst point everywhere in earlier runs of this script) and the focal gammas.
  CB softmax runs a beta sweep from 0 (the plain loss) to 1 - 1e-6 (within 1e-4 of inverse frequency here),
  reported per beta;
- inverse-frequency softmax CE, ``class_balanced_loss(..., weight=w)``, ``w_c = 1/n_c`` scaled to sum to C: the
  re-weighting that the effective number is meant to beat (the sweep table tests "tuned beta beats inverse
  frequency" head-on, with paired differences);
- logit adjustment (Menon et al., ICLR 2021): ``logit_offset=cbkernels.logit_adjustment(counts, tau)``, tau grid;
- Balanced Softmax (Ren et al., NeurIPS 2020): the same loss at tau = 1, its own row with nothing to tune (when 1
  is in the tau grid it is the logit-adjustment run at tau = 1, trained once);
- LDAM (Cao et al., NeurIPS 2019): ``target_margin=cbkernels.ldam_margins(counts, m)``, ``logit_scale=s``, grid
  m in {0.5, 1, 2, 4} (the largest margin, the rarest class's) x s in {1, 10, 30}. LDAM's recipe, s = 30 and
  m = 0.5, is for cosine logits in [-1, 1]; this MLP's logits are unnormalised, but the strong weight decay keeps
  them at a few units (plain CE at IF 100: std about 4, top-1 minus top-2 gap about 7), so margins of 0.5-4 are
  on the scale of the logit gaps, and s = 10-30 saturates the softmax into a hinge-like loss that stops pushing
  once the margin is met, which is what the margin needs (a pilot on seeds 0-2 at IF 10 and 100: s alone, with
  m ~ 0, moved balanced accuracy by 1 point or less; s = 1 margins barely helped; s = 10-30 with m = 1-4 helped
  most). The pilot only set the grid's range (and it shares seeds 0-2 with the reported runs); inside the grid
  the validation split chooses. s = 1 stays in the grid as the "no scale" point;
- LDAM-DRW: the criterion of LDAM's validation-selected (m, s) at that imbalance factor, as Cao et al. use one
  (m, s) for both, so that LDAM-DRW minus LDAM isolates the deferred re-weighting: ``ClassBalancedLoss(counts,
  beta=0, target_margin=..., logit_scale=...)`` (plain weights) and, at 80% of the steps, ``crit.reweight(
  beta=0.9999)``: the weight buffer is overwritten in place (the module and its buffer stay the same objects);
  the weights before and after are recorded in the JSON;
- CB + LA: class-balanced weights and the logit adjustment together (small beta x tau grid).

For each family, the grid point with the best mean validation balanced accuracy is reported: the test set never
picks anything. Every accuracy is float64 computed from integer hit counts, so grid points with the same hits
score the same up to rounding: a tie (within ``TIE_TOL`` = 1e-9) goes to the earlier grid point. Every grid point
is also in the JSON and Markdown outputs. Reported: balanced test accuracy (mean per-class recall), plain test
accuracy, many / medium / few-shot accuracy (``cbkernels.metrics``: the mean accuracy of the classes in each group;
thresholds scaled to this data set, whose head class has 100 images: many > 50, few < 10, so at IF 100 the groups
are 2 / 3 / 5 classes and at IF 10 there is no few-shot class, NaN), mean +/- std over seeds, paired differences vs
plain softmax CE and between selected losses (``PAIRS``: logit adjustment, Balanced Softmax and LDAM vs CB softmax,
LA and Balanced Softmax vs LDAM, CB + LA vs LA, LDAM-DRW vs LDAM), each with the seeds better / worse (a difference
within ``TIE_TOL`` of 0 is neither).

    python examples/long_tailed_digits.py            # full run: 10 seeds, about 10 minutes on two busy cores
    python examples/long_tailed_digits.py --quick    # smoke run: about 15 seconds

A seed fixes the data split and the initial network, so the same seed gives the same numbers, and
every loss sees the same split and starting weights (the paired differences in the output use that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import cbkernels
from cbkernels.metrics import LongTailAccuracy, shot_groups

NUM_CLASSES = 10
TEST_PER_CLASS = 50
VAL_PER_CLASS = 20
# The rarest class has 174 images; 174 - 50 - 20 = 104 leaves room for a head class of 100.
N_MAX = 100
NUM_TAIL = 3
PRIOR_PI = 0.1
SHOTS = ("many", "medium", "few")

# Table order. "balanced_softmax" is logit adjustment at tau = 1 (no grid).
FAMILIES = ("softmax", "sigmoid", "focal", "cb_softmax", "cb_sigmoid", "cb_focal", "inv_freq", "balanced_softmax",
            "logit_adj", "cb_la", "ldam", "ldam_drw")
LABELS = {
    "softmax": "softmax CE (plain)", "sigmoid": "sigmoid CE", "focal": "focal",
    "cb_softmax": "CB softmax CE", "cb_sigmoid": "CB sigmoid CE", "cb_focal": "CB focal",
    "inv_freq": "inverse-frequency softmax CE", "balanced_softmax": "Balanced Softmax (= LA τ=1)",
    "logit_adj": "logit adjustment (LA)", "cb_la": "CB + LA", "ldam": "LDAM", "ldam_drw": "LDAM-DRW",
}
# hyper-parameter key -> symbol in the tables
HP_SYMBOLS = {"beta": "β", "gamma": "γ", "tau": "τ", "max_margin": "m", "scale": "s"}

FULL = dict(seeds=10, steps=500, imbalance_factors=[10, 50, 100], betas=[0.99, 0.999, 0.9999],
            gammas=[0.5, 1.0, 2.0], sweep_betas=[0.0, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1 - 1e-6],
            taus=[0.5, 1.0, 1.5, 2.0], ldam_margins=[0.5, 1.0, 2.0, 4.0], ldam_scales=[1.0, 10.0, 30.0],
            cbla_betas=[0.99, 0.999], cbla_taus=[0.5, 1.0])
QUICK = dict(seeds=2, steps=60, imbalance_factors=[10, 100], betas=[0.999], gammas=[1.0],
             sweep_betas=[0.0, 0.999, 1 - 1e-6], taus=[1.0, 2.0], ldam_margins=[2.0], ldam_scales=[10.0],
             cbla_betas=[0.99], cbla_taus=[0.5])


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


def class_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(hits, support)``, int64 ``[S, C]``: each seed's correct predictions and samples of each class."""
    hit = (logits.argmax(-1) == y).long()
    hits = torch.zeros(y.shape[0], NUM_CLASSES, dtype=torch.int64).scatter_add_(1, y, hit)
    support = torch.zeros(y.shape[0], NUM_CLASSES, dtype=torch.int64).scatter_add_(1, y, torch.ones_like(y))
    return hits.numpy(), support.numpy()


def balanced_accuracy_from_hits(hits: np.ndarray, support: np.ndarray) -> np.ndarray:
    """float64 ``[S]`` mean per-class recall from integer counts ``[S, C]`` (every class present)."""
    return (np.asarray(hits, dtype=np.int64) / np.asarray(support, dtype=np.int64)).mean(-1)


def long_tail_metrics(logits: torch.Tensor, y: torch.Tensor, counts, many: float, few: float) -> dict:
    """``cbkernels.metrics.LongTailAccuracy`` of each seed's model: arrays ``[S]`` (``per_class_accuracy``
    ``[S, C]``); a shot group without classes is NaN."""
    metric = LongTailAccuracy(NUM_CLASSES, samples_per_class=counts, many=many, few=few)
    per_seed = []
    for z, t in zip(logits, y):
        per_seed.append({k: v.numpy() for k, v in metric.reset().update(z, t).compute().items()})
    keys = ("accuracy", "balanced_accuracy", "per_class_accuracy") + SHOTS
    return {k: np.stack([r[k] for r in per_seed]) for k in keys}


def inverse_frequency_weights(counts) -> torch.Tensor:
    """``w_c = 1/n_c`` scaled so that the weights sum to C (the normalisation of the class-balanced weights)."""
    w = 1.0 / torch.as_tensor(counts, dtype=torch.float64)
    return (w * (len(counts) / w.sum())).float()


def make_criterion(cfg: dict, counts, args):
    """The loss of a configuration: ``(crit, module)``, ``crit(logits, target)`` a summed loss, ``module`` the
    ``ClassBalancedLoss`` behind it (None for the functional plain and inverse-frequency losses)."""
    kw = dict(reduction="sum", backend=args.backend)
    if cfg["family"] in ("softmax", "sigmoid", "focal"):
        def crit(z, t):
            return cbkernels.class_balanced_loss(z, t, loss_type=cfg["loss_type"], gamma=cfg["gamma"], **kw)
        return crit, None
    if cfg["family"] == "inv_freq":
        w = inverse_frequency_weights(counts)

        def crit(z, t):
            return cbkernels.class_balanced_loss(z, t, loss_type="softmax", weight=w, **kw)
        return crit, None
    # Counts over the whole training set (identical for every seed), never per batch.
    tau, m = cfg.get("tau"), cfg.get("max_margin")
    module = cbkernels.ClassBalancedLoss(
        counts, loss_type=cfg["loss_type"], beta=cfg["beta"], gamma=cfg["gamma"],
        logit_offset=None if tau is None else cbkernels.logit_adjustment(counts, tau),
        target_margin=None if m is None else cbkernels.ldam_margins(counts, m),
        logit_scale=cfg.get("scale", 1.0), **kw)
    return module, module


def drw_step(args) -> int:
    """The step at whose start LDAM-DRW switches to class-balanced weights."""
    return min(args.steps, max(0, int(round(args.drw_at * args.steps))))


def train(cfg: dict, init: list[torch.Tensor], xtr, ytr, counts, args):
    """Returns ``(params, info)``; ``info`` records the DRW weight switch (empty for the other losses)."""
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
    crit, module = make_criterion(cfg, counts, args)
    info = {}
    switch = drw_step(args) if cfg.get("drw") else None
    n = ytr.shape[1]
    for step in range(args.steps):
        if step == switch:
            buffer = module.weight
            info = dict(drw_step=step, drw_beta=args.drw_beta, weight_before=module.weight.tolist())
            # Deferred re-weighting: the same module, its weight buffer overwritten in place.
            module.reweight(beta=args.drw_beta)
            info.update(weight_after=module.weight.tolist(), weight_buffer_kept=module.weight is buffer)
        # "sum" / n is each model's own mean loss; summing over the stacked models keeps their gradients apart.
        loss = crit(forward(params, xtr), ytr) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{cfg['name']}: training loss is {loss.item()}")
    return [p.detach() for p in params], info


def loss_configs(args) -> list[dict]:
    """Every (family, hyper-parameters) point trained up front, ``hp`` holding the point's tuned hyper-parameters.
    LDAM-DRW is not here: it runs after LDAM at each imbalance factor, at LDAM's selected point (``drw_config``)."""
    def cfg(family, loss_type="softmax", beta=0.0, gamma=0.0, **hp):
        return dict(family=family, loss_type=loss_type, beta=beta, gamma=gamma, hp=hp, **hp)

    cfgs = [cfg("softmax", beta=None), cfg("sigmoid", "sigmoid", beta=None)]
    cfgs += [cfg("focal", "focal", beta=None, gamma=g) for g in args.gammas]
    cfgs += [cfg("cb_softmax", beta=b) for b in args.sweep_betas]
    cfgs += [cfg("cb_sigmoid", "sigmoid", beta=b) for b in args.betas]
    cfgs += [cfg("cb_focal", "focal", beta=b, gamma=g) for b in args.betas for g in args.gammas]
    cfgs += [cfg("inv_freq", beta=None)]
    cfgs += [cfg("logit_adj", tau=t) for t in args.taus]
    if 1.0 not in args.taus:
        cfgs += [cfg("balanced_softmax", tau=1.0)]
    cfgs += [cfg("cb_la", beta=b, tau=t) for b in args.cbla_betas for t in args.cbla_taus]
    cfgs += [cfg("ldam", max_margin=m, scale=s) for m in args.ldam_margins for s in args.ldam_scales]
    if args.families:
        keep = {"softmax", *args.families} | ({"ldam"} if "ldam_drw" in args.families else set())
        cfgs = [c for c in cfgs if keep & {c["family"], *balanced_alias(c)}]
    return [finish_config(c) for c in cfgs]


def balanced_alias(c: dict) -> list[str]:
    """Balanced Softmax is logit adjustment at tau = 1: that run also stands for it."""
    return ["balanced_softmax"] if c["family"] == "logit_adj" and c["tau"] == 1.0 else []


def drw_config(ldam_run: dict) -> dict:
    """LDAM-DRW at the (m, s) of an LDAM run (the validation-selected one of its imbalance factor)."""
    return finish_config(dict(family="ldam_drw", loss_type="softmax", beta=0.0, gamma=0.0,
                              max_margin=ldam_run["max_margin"], scale=ldam_run["scale"],
                              hp=dict(max_margin=ldam_run["max_margin"], scale=ldam_run["scale"])))


def finish_config(c: dict) -> dict:
    """Adds the tuned hyper-parameters ``hp``, the DRW flag, the families the run also stands for, and a name."""
    hp = dict(c["hp"])
    if c["family"] in ("cb_softmax", "cb_sigmoid", "cb_focal", "cb_la"):
        hp = {"beta": c["beta"], **hp}
    if c["loss_type"] == "focal":
        hp["gamma"] = c["gamma"]
    c["hp"] = hp
    c["drw"] = c["family"] == "ldam_drw"
    c["also"] = balanced_alias(c)
    c["name"] = " ".join([c["family"]] + [f"{k}={v:g}" for k, v in hp.items()])
    return c


# -------------------------------------------------------------------------------------------- summary

def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# Accuracies are ratios of small integer counts (at most a few thousand samples), so two different values differ
# by far more than this; closer ones are the same value up to float rounding: a tie, in selection and seed counts.
TIE_TOL = 1e-9


def paired(a, b) -> dict:
    """Paired difference ``a - b`` over seeds: mean, std, seeds better / worse (a difference within ``TIE_TOL`` of
    0 is a tie, neither)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    m, s = mean_std(d)
    return dict(mean=m, std=s, better=int((d > TIE_TOL).sum()), worse=int((d < -TIE_TOL).sum()))


def candidates(runs: list[dict], imb, fam: str) -> list[dict]:
    return [r for r in runs if r["imbalance"] == imb and (r["family"] == fam or fam in r["also"])]


def best(cands: list[dict]) -> dict:
    """The best mean validation balanced accuracy; ties (within ``TIE_TOL``: the values are float64 means of ratios
    of integer hit counts, so closer values are equal up to rounding) go to the earlier grid point."""
    top = max(r["val_bacc_mean"] for r in cands)
    return next(r for r in cands if r["val_bacc_mean"] >= top - TIE_TOL)


SUMMARY_KEYS = ("test_bacc", "test_acc", "tail_acc", "many", "medium", "few")


def select(runs: list[dict], imbalance_factors) -> dict:
    """Per imbalance factor and family, the grid point with the best mean validation balanced accuracy, with its
    paired difference vs plain softmax CE."""
    out = {}
    for imb in imbalance_factors:
        base = next(r for r in runs if r["imbalance"] == imb and r["family"] == "softmax")
        out[str(imb)] = {}
        for fam in FAMILIES:
            cands = candidates(runs, imb, fam)
            if not cands:
                continue
            r = best(cands)
            # Same seed = same split and same initial network, so the paired difference is the
            # sharper comparison with plain softmax.
            d = paired(r["test_bacc"], base["test_bacc"])
            out[str(imb)][fam] = dict(
                # Balanced Softmax has nothing to tune (its run is logit adjustment at tau = 1).
                name=r["name"], hp={} if fam == "balanced_softmax" else r["hp"], val_bacc_mean=r["val_bacc_mean"],
                **{f"{k}_{s}": r[f"{k}_{s}"] for k in SUMMARY_KEYS for s in ("mean", "std")},
                delta_vs_softmax_mean=d["mean"], delta_vs_softmax_std=d["std"],
                seeds_better_than_softmax=d["better"], seeds_worse_than_softmax=d["worse"],
            )
    return out


def beta_sweep(runs: list[dict], imbalance_factors) -> dict:
    """CB softmax at every beta and inverse-frequency weights, each with its paired difference vs inverse frequency;
    and the validation-selected beta minus inverse frequency (the effective-number claim)."""
    out = {}
    for imb in imbalance_factors:
        inv = next((r for r in runs if r["imbalance"] == imb and r["family"] == "inv_freq"), None)
        cb = candidates(runs, imb, "cb_softmax")
        if inv is None or not cb:
            continue

        def row(r):
            return dict(test_bacc_mean=r["test_bacc_mean"], test_bacc_std=r["test_bacc_std"],
                        val_bacc_mean=r["val_bacc_mean"], few_mean=r["few_mean"],
                        vs_inv_freq=paired(r["test_bacc"], inv["test_bacc"]))
        tuned = best(cb)
        out[str(imb)] = dict(
            betas=[dict(beta=r["beta"], **row(r)) for r in cb],
            inv_freq=row(inv),
            selected_beta=tuned["beta"],
            tuned_minus_inv_freq=paired(tuned["test_bacc"], inv["test_bacc"]),
        )
    return out


def drw_vs_ldam(runs: list[dict], imbalance_factors) -> dict:
    """LDAM-DRW minus LDAM at the same (m, s), paired over seeds: what the deferred re-weighting adds."""
    out = {}
    for imb in imbalance_factors:
        drw = next((r for r in runs if r["imbalance"] == imb and r["family"] == "ldam_drw"), None)
        if drw is None:
            continue
        ldam = next(r for r in runs if r["imbalance"] == imb and r["family"] == "ldam" and r["hp"] == drw["hp"])
        out[str(imb)] = dict(hp=drw["hp"], test_bacc=paired(drw["test_bacc"], ldam["test_bacc"]),
                             few=paired(drw["few"], ldam["few"]) if drw["few_mean"] == drw["few_mean"] else None)
    return out


# Paired comparisons between the validation-selected losses (a - b), beyond the ones against plain softmax CE.
PAIRS = (("logit_adj", "cb_softmax"), ("balanced_softmax", "cb_softmax"), ("ldam", "cb_softmax"),
         ("logit_adj", "ldam"), ("balanced_softmax", "ldam"), ("cb_la", "logit_adj"), ("ldam_drw", "ldam"))


def pairwise(runs: list[dict], imbalance_factors) -> dict:
    """Per imbalance factor, ``PAIRS`` between the validation-selected grid points: paired difference in balanced
    test accuracy over seeds (pairs with a family that did not run are left out)."""
    out = {}
    for imb in imbalance_factors:
        rows = []
        for a, b in PAIRS:
            ca, cb = candidates(runs, imb, a), candidates(runs, imb, b)
            if not ca or not cb:
                continue
            ra, rb = best(ca), best(cb)
            rows.append(dict(a=a, b=b, a_name=ra["name"], b_name=rb["name"],
                             test_bacc=paired(ra["test_bacc"], rb["test_bacc"])))
        if rows:
            out[str(imb)] = rows
    return out


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return dict(node=platform.node(), processor=platform.processor() or platform.machine(),
                platform=platform.platform(), cpu_count=os.cpu_count(), usable_cores=usable,
                # what else the machine was doing (1-minute load average at the end): context for the wall time
                load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)


def pct(m: float, s: float) -> str:
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def fmt_hp(hp: dict) -> str:
    return ", ".join(f"{HP_SYMBOLS[k]}={v:g}" for k, v in hp.items())


def fmt_paired(d: dict) -> str:
    return f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} ({d['better']}/{d['worse']})"


def fmt_beta(b: float) -> str:
    return f"{b:.10g}"


def nan_pct(m) -> str:
    return "–" if m is None or m != m else f"{100 * m:.1f}"


def header(results: dict) -> str:
    c = results["config"]
    mach = c["machine"]
    seeds = c["seed_list"]
    counts = "; ".join(f"IF {i}: {c['train_counts'][str(i)]}" for i in c["imbalance_factors"])
    return (
        "# Long-tailed digits: class-balanced, logit-adjusted and margin losses\n\n"
        f"- command: `{c['command']}`\n"
        f"- date: {c['date']}; wall time {results['wall_time_s']:.0f} s (1-minute load average at the end: "
        f"{mach['load_average']})\n"
        f"- machine: {mach['node']} ({mach['processor']}, {mach['cpu_count']} cores, {mach['usable_cores']} usable), "
        f"{c['threads']} torch thread(s); torch {c['torch']}, cbkernels {c['cbkernels']}, Python {c['python']}, "
        f"backend {c['backend']}\n"
        f"- seeds: {seeds[0]}-{seeds[-1]} ({len(seeds)}), each fixing the split and the initial MLP; "
        f"{c['steps']} full-batch AdamW steps; hyper-parameters chosen on the balanced validation split "
        f"({c['val_per_class']} per class), test split {c['test_per_class']} per class\n"
        f"- training counts: {counts}\n"
        "- accuracies are float64 from integer hit counts; a validation tie (within 1e-9) selects the earlier grid "
        "point, and a paired difference within 1e-9 of 0 counts as neither better nor worse\n"
        f"- shot groups (training count n): many n > {c['many']:g}, medium {c['few']:g} <= n <= {c['many']:g}, "
        f"few n < {c['few']:g}; LDAM-DRW re-weights to β={c['drw_beta']:g} at step {c['drw_step']}\n"
    )


def markdown(results: dict) -> str:
    c = results["config"]
    imbs = c["imbalance_factors"]
    sel = results["selected"]
    fams = [f for f in FAMILIES if any(f in sel[str(i)] for i in imbs)]
    head = "| loss | " + " | ".join(f"IF {i}" for i in imbs) + " |\n|---|" + "---|" * len(imbs) + "\n"
    lines = [f"\n## Balanced test accuracy, % (mean ± std over {c['seeds']} seeds; "
             "validation-selected hyper-parameters in brackets)\n\n", head]
    for fam in fams:
        cells = []
        for i in imbs:
            r = sel[str(i)].get(fam)
            cells.append("" if r is None else pct(r["test_bacc_mean"], r["test_bacc_std"])
                         + (f" ({fmt_hp(r['hp'])})" if r["hp"] else ""))
        lines.append(f"| {LABELS[fam]} | " + " | ".join(cells) + " |\n")

    lines += ["\n## Many / medium / few-shot test accuracy, % (mean over seeds; – : no class in the group)\n\n"]
    groups = []
    for i in imbs:
        g = shot_groups(c["train_counts"][str(i)], c["many"], c["few"]).tolist()
        groups.append(f"IF {i}: " + " / ".join(str(g.count(k)) for k in range(3)))
    lines.append(f"Classes per group (many / medium / few): {'; '.join(groups)}.\n\n")
    lines.append(head.replace("| loss |", "| loss (many / medium / few) |"))
    for fam in fams:
        cells = []
        for i in imbs:
            r = sel[str(i)].get(fam)
            cells.append("" if r is None else " / ".join(nan_pct(r[f"{s}_mean"]) for s in SHOTS))
        lines.append(f"| {LABELS[fam]} | " + " | ".join(cells) + " |\n")

    lines += ["\n## Paired difference in balanced test accuracy vs plain softmax CE, points "
              "(mean ± std over seeds; seeds better / worse)\n\n", head]
    for fam in fams[1:]:
        cells = []
        for i in imbs:
            r = sel[str(i)].get(fam)
            cells.append(fmt_paired(dict(mean=r["delta_vs_softmax_mean"], std=r["delta_vs_softmax_std"],
                                         better=r["seeds_better_than_softmax"],
                                         worse=r["seeds_worse_than_softmax"])) if r else "")
        lines.append(f"| {LABELS[fam]} | " + " | ".join(cells) + " |\n")

    sweep = results["beta_sweep"]
    if sweep:
        simbs = [i for i in imbs if str(i) in sweep]
        lines += ["\n## CB softmax: beta sweep vs inverse-frequency weights\n\n"
                  "Balanced test accuracy, % (mean ± std); in brackets the paired difference vs inverse frequency, "
                  "points (mean; seeds better / worse); * = the validation-selected beta. β = 0 is the plain "
                  "loss; β -> 1 approaches inverse frequency.\n\n",
                  "| weights | " + " | ".join(f"IF {i}" for i in simbs) + " |\n|---|" + "---|" * len(simbs) + "\n"]
        for k, row in enumerate(sweep[str(simbs[0])]["betas"]):
            cells = []
            for i in simbs:
                r = sweep[str(i)]["betas"][k]
                d = r["vs_inv_freq"]
                star = "*" if r["beta"] == sweep[str(i)]["selected_beta"] else ""
                cells.append(f"{pct(r['test_bacc_mean'], r['test_bacc_std'])}{star} "
                             f"({100 * d['mean']:+.1f}; {d['better']}/{d['worse']})")
            lines.append(f"| CB β = {fmt_beta(row['beta'])} | " + " | ".join(cells) + " |\n")
        lines.append("| inverse frequency (1/n) | " + " | ".join(
            pct(sweep[str(i)]["inv_freq"]["test_bacc_mean"], sweep[str(i)]["inv_freq"]["test_bacc_std"])
            for i in simbs) + " |\n")
        lines.append("| **tuned β − inverse frequency** (paired) | " + " | ".join(
            f"**{fmt_paired(sweep[str(i)]['tuned_minus_inv_freq'])}** (β={fmt_beta(sweep[str(i)]['selected_beta'])})"
            for i in simbs) + " |\n")

    drw = results["drw_vs_ldam"]
    if drw:
        dimbs = [i for i in imbs if str(i) in drw]
        lines += ["\n## LDAM-DRW minus LDAM at the same (m, s), paired, points (mean ± std; seeds better / worse)\n\n",
                  "| | " + " | ".join(f"IF {i} ({fmt_hp(drw[str(i)]['hp'])})" for i in dimbs) + " |\n|---|"
                  + "---|" * len(dimbs) + "\n",
                  "| balanced test accuracy | " + " | ".join(fmt_paired(drw[str(i)]["test_bacc"]) for i in dimbs)
                  + " |\n",
                  "| few-shot accuracy | " + " | ".join(fmt_paired(drw[str(i)]["few"]) if drw[str(i)]["few"] else "–"
                                                      for i in dimbs) + " |\n"]

    pairs = results["pairwise"]
    if pairs:
        pimbs = [i for i in imbs if str(i) in pairs]
        keys = list(dict.fromkeys((p["a"], p["b"]) for i in pimbs for p in pairs[str(i)]))
        lines += ["\n## Paired differences between the selected losses, balanced test accuracy, points "
                  "(mean ± std over seeds; seeds better / worse)\n\n"
                  "Each loss at its own validation-selected hyper-parameters (first table); a − b, paired over "
                  "seeds.\n\n",
                  "| comparison | " + " | ".join(f"IF {i}" for i in pimbs) + " |\n|---|" + "---|" * len(pimbs) + "\n"]
        for a, b in keys:
            cells = []
            for i in pimbs:
                p = next((p for p in pairs[str(i)] if (p["a"], p["b"]) == (a, b)), None)
                cells.append(fmt_paired(p["test_bacc"]) if p else "")
            lines.append(f"| {LABELS[a]} − {LABELS[b]} | " + " | ".join(cells) + " |\n")

    lines += ["\n## Every grid point: balanced test accuracy / few-shot accuracy / validation balanced accuracy, %\n\n",
              "| configuration | " + " | ".join(f"IF {i}" for i in imbs) + " |\n|---|" + "---|" * len(imbs) + "\n"]
    names = list(dict.fromkeys(r["name"] for r in results["runs"]))
    for name in names:
        cells = []
        for i in imbs:
            r = next((r for r in results["runs"] if r["name"] == name and r["imbalance"] == i), None)
            cells.append(f"{100 * r['test_bacc_mean']:.1f} / {nan_pct(r['few_mean'])} / "
                         f"{100 * r['val_bacc_mean']:.1f}" if r else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imbs = results["config"]["imbalance_factors"]
    sel = results["selected"]
    fams = [f for f in FAMILIES if all(f in sel[str(i)] for i in imbs)]
    colours = dict(zip(imbs, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")))
    fig = plt.figure(figsize=(14, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1))
    top, diff, sweep_ax = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    x = np.arange(len(fams))
    for k, i in enumerate(imbs):
        off = (k - (len(imbs) - 1) / 2) * 0.18
        top.errorbar(x + off, [100 * sel[str(i)][f]["test_bacc_mean"] for f in fams],
                     yerr=[100 * sel[str(i)][f]["test_bacc_std"] for f in fams], fmt="o", capsize=3,
                     color=colours[i], label=f"IF {i}")
        d = [f for f in fams if f != "softmax"]
        diff.errorbar(np.arange(len(d)) + off, [100 * sel[str(i)][f]["delta_vs_softmax_mean"] for f in d],
                      yerr=[100 * sel[str(i)][f]["delta_vs_softmax_std"] for f in d], fmt="o", capsize=3,
                      color=colours[i], label=f"IF {i}")
    top.set_xticks(x)
    top.set_xticklabels([LABELS[f] for f in fams], rotation=20, ha="right", fontsize=8)
    top.set_ylabel("balanced test accuracy (%)")
    top.set_title("balanced test accuracy per loss (validation-selected hyper-parameters), mean ± std over seeds")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    d = [f for f in fams if f != "softmax"]
    diff.axhline(0, color="k", lw=0.8)
    diff.set_xticks(np.arange(len(d)))
    diff.set_xticklabels([LABELS[f] for f in d], rotation=35, ha="right", fontsize=7)
    diff.set_ylabel("Δ balanced accuracy vs plain softmax CE (points)")
    diff.set_title("paired difference vs plain softmax CE, mean ± std over seeds", fontsize=10)
    diff.grid(alpha=0.3)

    sweep = results["beta_sweep"]
    for i in imbs:
        if str(i) not in sweep:
            continue
        s = sweep[str(i)]
        # x = 1 - beta on a log axis (beta = 0 at 1), beta growing to the right
        xs = [1 - r["beta"] for r in s["betas"]]
        sweep_ax.errorbar(xs, [100 * r["test_bacc_mean"] for r in s["betas"]],
                          yerr=[100 * r["test_bacc_std"] for r in s["betas"]], fmt="-o", capsize=3,
                          color=colours[i], label=f"CB softmax, IF {i}")
        inv = 100 * s["inv_freq"]["test_bacc_mean"]
        sweep_ax.axhline(inv, color=colours[i], ls="--", lw=1.2, label=f"inverse frequency, IF {i}")
        sweep_ax.plot([1 - s["selected_beta"]], [100 * next(r["test_bacc_mean"] for r in s["betas"]
                                                             if r["beta"] == s["selected_beta"])],
                      marker="*", ms=14, color=colours[i], ls="none")
    if sweep:
        sweep_ax.set_xscale("log")
        sweep_ax.invert_xaxis()
        betas = [r["beta"] for r in next(iter(sweep.values()))["betas"]]
        sweep_ax.set_xticks([1 - b for b in betas])
        sweep_ax.set_xticklabels([fmt_beta(b) for b in betas], fontsize=8)
        sweep_ax.minorticks_off()
        sweep_ax.set_xlabel("β (axis: 1 - β, log; β = 0 is the plain loss, β → 1 inverse frequency); ★ = selected")
        sweep_ax.set_ylabel("balanced test accuracy (%)")
        sweep_ax.set_title("CB softmax beta sweep vs inverse-frequency weights (dashed)", fontsize=10)
        sweep_ax.legend(fontsize=7, ncol=2)
        sweep_ax.grid(alpha=0.3)
    fig.suptitle(f"Long-tailed digits, MLP, {results['config']['seeds']} seeds "
                 "(hyper-parameters chosen on the validation split)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Long-tail losses through cbkernels (plain, class-balanced, inverse frequency, logit "
                    "adjustment, Balanced Softmax, LDAM, LDAM-DRW, CB + LA) on long-tailed sklearn digits. "
                    "Writes JSON, Markdown and PNG results; progress goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output directory")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run (about 15 s): {QUICK['seeds']} seeds, {QUICK['steps']} steps, imbalance "
                        f"factors {QUICK['imbalance_factors']}, one or two points per grid; explicit options "
                        "below still win")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds (full: {FULL['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--imbalance-factors", type=float, nargs="+", default=None,
                   help=f"n_max / n_min of the training sets (full: {FULL['imbalance_factors']})")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=None,
                   help="train only these loss families (plain softmax CE, the paired baseline, always runs)")
    p.add_argument("--betas", type=float, nargs="+", default=None,
                   help=f"beta grid of CB sigmoid and CB focal (full: {FULL['betas']})")
    p.add_argument("--sweep-betas", type=float, nargs="+", default=None,
                   help=f"beta sweep of CB softmax, each reported (full: {FULL['sweep_betas']})")
    p.add_argument("--gammas", type=float, nargs="+", default=None, help=f"focal gamma grid (full: {FULL['gammas']})")
    p.add_argument("--taus", type=float, nargs="+", default=None,
                   help=f"logit-adjustment tau grid; tau=1 is Balanced Softmax (full: {FULL['taus']})")
    p.add_argument("--ldam-margins", type=float, nargs="+", default=None,
                   help=f"LDAM / LDAM-DRW largest-margin grid (full: {FULL['ldam_margins']})")
    p.add_argument("--ldam-scales", type=float, nargs="+", default=None,
                   help=f"LDAM / LDAM-DRW logit-scale grid (full: {FULL['ldam_scales']})")
    p.add_argument("--drw-beta", type=float, default=0.9999, help="LDAM-DRW: beta of the deferred re-weighting")
    p.add_argument("--drw-at", type=float, default=0.8,
                   help="LDAM-DRW: fraction of the steps after which the class-balanced weights switch on")
    p.add_argument("--cbla-betas", type=float, nargs="+", default=None,
                   help=f"CB + LA beta grid (full: {FULL['cbla_betas']})")
    p.add_argument("--cbla-taus", type=float, nargs="+", default=None,
                   help=f"CB + LA tau grid (full: {FULL['cbla_taus']})")
    p.add_argument("--many", type=float, default=50,
                   help="many-shot classes have more than this many training images (the usual 100 is n_max here)")
    p.add_argument("--few", type=float, default=10,
                   help="few-shot classes have fewer than this many training images (the usual 20, scaled)")
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
    if not 0.0 <= args.drw_at <= 1.0:
        p.error("--drw-at must lie in [0, 1]")
    return args


def main(argv=None) -> dict:
    """Run the experiment for command-line ``argv`` (``sys.argv[1:]`` when None); return the results
    dict (as written to the JSON file, plus the output ``paths``)."""
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    script = Path(__file__).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    args.command = shlex.join([str(exe), str(script), *argv])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return experiment(args)
    finally:
        # Leave the caller's process as it was (the smoke test runs this in pytest's process).
        torch.set_num_threads(threads)


def _json_safe(v):
    """NaN (a shot group without classes) -> null: strict JSON."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def experiment(args) -> dict:
    t0 = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    x, y = load_data()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    splits = [split_digits(x, y, s) for s in seeds]
    xte = torch.from_numpy(np.stack([x[te] for te, _, _ in splits]))
    yte = torch.from_numpy(np.stack([y[te] for te, _, _ in splits]))
    xva = torch.from_numpy(np.stack([x[va] for _, va, _ in splits]))
    yva = torch.from_numpy(np.stack([y[va] for _, va, _ in splits]))
    init = init_params(seeds, args.hidden)
    cfgs = loss_configs(args)
    with_drw = any(c["family"] == "ldam" for c in cfgs) and (not args.families or "ldam_drw" in args.families)
    total = (len(cfgs) + with_drw) * len(args.imbalance_factors)
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
        todo = list(cfgs)
        while todo:
            cfg = todo.pop(0)
            params, info = train(cfg, init, xtr, ytr, counts, args)
            with torch.no_grad():
                # float64 from integer counts, so equal hit counts give equal accuracies (see best())
                tr_acc = (forward(params, xtr).argmax(-1) == ytr).sum(1).double().div(ytr.shape[1]).numpy()
                val_hits, val_support = class_hits(forward(params, xva), yva)
                val_bacc = balanced_accuracy_from_hits(val_hits, val_support)
                te = long_tail_metrics(forward(params, xte), yte, counts, args.many, args.few)
            rec_te = te["per_class_accuracy"]
            run = dict(imbalance=imb, **cfg, seeds=seeds, train_acc=tr_acc.tolist(), val_bacc=val_bacc.tolist(),
                       val_hits=val_hits.sum(1).tolist(),
                       test_bacc=te["balanced_accuracy"].tolist(), test_acc=te["accuracy"].tolist(),
                       tail_acc=rec_te[:, NUM_CLASSES - NUM_TAIL:].mean(1).tolist(),
                       **{s: te[s].tolist() for s in SHOTS},
                       test_recall_per_class_mean=rec_te.mean(0).tolist(), **info)
            for k in ("train_acc", "val_bacc") + SUMMARY_KEYS:
                run[f"{k}_mean"], run[f"{k}_std"] = mean_std(run[k])
            runs.append(run)
            done += 1
            ldam = candidates(runs, imb, "ldam")
            if with_drw and not todo and ldam and not candidates(runs, imb, "ldam_drw"):
                # LDAM-DRW = LDAM's validation-selected (m, s) + the deferred re-weighting.
                todo.append(drw_config(best(ldam)))
            log(f"[{done:3d}/{total}] IF {imb:>3} {cfg['name']:<36} "
                f"val {pct(run['val_bacc_mean'], run['val_bacc_std'])}  "
                f"test {pct(run['test_bacc_mean'], run['test_bacc_std'])}  few {nan_pct(run['few_mean'])}"
                f"  ({time.perf_counter() - t0:.1f} s)")
    wall = time.perf_counter() - t0
    results = dict(
        config=dict(quick=args.quick, command=args.command, date=date, machine=machine_info(), seeds=len(seeds),
                    seed_list=seeds, imbalance_factors=args.imbalance_factors,
                    families=[f for f in FAMILIES if any(r["family"] == f or f in r["also"] for r in runs)],
                    betas=args.betas, sweep_betas=args.sweep_betas, gammas=args.gammas, taus=args.taus,
                    ldam_margins=args.ldam_margins, ldam_scales=args.ldam_scales, drw_beta=args.drw_beta,
                    drw_at=args.drw_at, drw_step=drw_step(args), cbla_betas=args.cbla_betas,
                    cbla_taus=args.cbla_taus, many=args.many, few=args.few, steps=args.steps, hidden=args.hidden,
                    lr=args.lr, weight_decay=args.weight_decay, prior_bias=not args.no_prior_bias,
                    prior_pi=PRIOR_PI, optimizer="AdamW, full batch, cosine lr decay", n_max=N_MAX,
                    test_per_class=TEST_PER_CLASS, val_per_class=VAL_PER_CLASS, num_tail_classes=NUM_TAIL,
                    train_counts=counts_by_if, backend=args.backend, threads=args.threads,
                    torch=torch.__version__, cbkernels=cbkernels.__version__, python=platform.python_version()),
        runs=runs,
        selected=select(runs, args.imbalance_factors),
        beta_sweep=beta_sweep(runs, args.imbalance_factors),
        drw_vs_ldam=drw_vs_ldam(runs, args.imbalance_factors),
        pairwise=pairwise(runs, args.imbalance_factors),
        wall_time_s=wall,
    )
    results = _json_safe(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "long_tailed_digits" + ("_quick" if args.quick else "")
    paths = {ext: args.out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    table = markdown(results)
    paths["md"].write_text(header(results) + table)
    plot(results, paths["png"])
    results["paths"] = {k: str(v) for k, v in paths.items()}
    print(table.split("\n## Every grid point")[0])
    log(f"done in {wall:.1f} s; wrote {', '.join(str(v) for v in paths.values())}")
    return results


if __name__ == "__main__":
    main()
