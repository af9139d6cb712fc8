"""``make bench``: forward+backward time and memory of the class-balanced losses, per provider.

``python -m benchmarks.bench --help`` (or ``make bench BENCH_ARGS="..."``) lists the options. Providers:

- ``naive``: ``benchmarks.harness.naive_cb_loss`` at the working dtype (what users write today); the
  baseline every speed-up is measured against, side by side in the same run.
- ``naive+compile``: ``torch.compile`` of the same function, compiled once per case outside the timing.
- ``F.cross_entropy``: ``F.cross_entropy(logits, target, weight=w)`` (softmax only; its mean is the
  weighted mean, which does not matter for timing).
- ``cb:<backend>``: ``cbkernels.ClassBalancedLoss(..., backend=<backend>)`` holding the case's precomputed
  weights (a call is ``class_balanced_loss(..., weight=w)``) for every backend that
  ``cbkernels.available_backends()`` reports at run time; ``cb:<backend>+inplace`` (only when named in
  ``--providers``) adds ``inplace_backward=True``.
- ``naive+tf`` and ``cb:<backend>+tf``: the same with all four logit transforms of SPEC section 10 and the z-loss
  (softmax losses) on (``TRANSFORMS``): naive+tf transforms the logits with PyTorch ops, then calls the naive loss
  and adds the z-loss; a ``+tf`` provider's speed-up is against ``naive+tf``. In the default providers.
- ``naive+soft`` and ``cb:<backend>+soft``: dense mixup targets (SPEC section 9: each row ``lam onehot(y) +
  (1 - lam) onehot(y')``, the batch mixed with its reverse, timm's pairing) in the default ``weight_mode="sample"``.
  naive+soft is what users write today (``soft_target_loss``: timm's ``SoftTargetCrossEntropy`` form, BCE with
  dense targets, torchvision's soft focal loss, times the row weight); a ``+soft`` provider's speed-up is against
  ``naive+soft``. In the default providers.

Results: a table on stdout, and ``<stem>.json`` / ``.md`` / ``.png`` under ``--out`` (``benchmarks/report.py``
writes them). Importing this module needs neither matplotlib nor triton (both load lazily, only when used).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # run as a script (python benchmarks/bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import BASELINE, LOSSES, naive_cb_loss  # noqa: E402
from benchmarks.report import Progress, format_markdown, format_table, plot, shape_label  # noqa: E402

SHAPES: Dict[str, Tuple[int, int]] = {
    # The paper's long-tailed CIFAR (batch 128): per-call overhead decides these ("small" rows).
    "cifar10": (128, 10),
    "cifar100": (128, 100),
    "inat2018": (256, 8142),  # iNaturalist 2018: batch 256, 8142 species
    "imagenet": (1024, 1000),
    "vocab": (2048, 32000),  # LM-head sized vocabulary
}
QUICK_SHAPES: Dict[str, Tuple[int, int]] = {"small": (128, 1000)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIXED_PROVIDERS = ("naive", "naive+compile", "F.cross_entropy", "naive+tf", "naive+soft")
TF_BASELINE = "naive+tf"
SOFT_BASELINE = "naive+soft"
VARIANTS = ("tf", "soft")  # cb:<backend>+<variant> providers in the defaults (+inplace only when named)
# The "+tf" providers' options: Gemma-2's softcap, logit adjustment (tau 1), LDAM's margins, a scale and PaLM's z-loss.
SOFTCAP, LOGIT_SCALE, Z_LOSS = 30.0, 2.0, 1e-4


def transform_vectors(classes: int, device) -> Tuple[Tensor, Tensor]:
    """The +tf providers' ``logit_offset`` and ``target_margin`` from the cases' long-tailed counts."""
    import cbkernels

    counts = harness.long_tailed_counts(classes)
    return cbkernels.logit_adjustment(counts).to(device), cbkernels.ldam_margins(counts).to(device)


def mixup_targets(target: Tensor, classes: int, dtype=torch.float32) -> Tensor:
    """The +soft providers' dense targets: the batch mixed with its reverse (timm's ``Mixup`` pairing), one
    ``lam`` per row (fixed seed), in ``dtype`` on the targets' device."""
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(target.shape[0], 1, generator=g).to(target.device)
    eye = F.one_hot(target, classes).float()
    return (lam * eye + (1 - lam) * eye.flip(0)).to(dtype)


def soft_target_loss(x: Tensor, q: Tensor, w: Tensor, *, loss_type: str, gamma: float) -> Tensor:
    """What users write today for dense targets, times the paper's row weight ``a_i = q_i . w / sum_j q_ij``: timm's
    ``SoftTargetCrossEntropy`` (``sum -q log_softmax``), BCE-with-logits with dense targets, torchvision's
    ``sigmoid_focal_loss`` formula, and ``sum q (1 - p)^gamma (-log p)`` for softmax focal; mean over rows."""
    a = (q.float() @ w) / q.float().sum(1)
    if loss_type == "softmax":
        per = torch.sum(-q * F.log_softmax(x, dim=-1), dim=-1)
    elif loss_type == "softmax_focal":
        logp = F.log_softmax(x, dim=-1)
        per = torch.sum(q * (1 - logp.exp()) ** gamma * -logp, dim=-1)
    else:
        ce = F.binary_cross_entropy_with_logits(x, q, reduction="none")
        if loss_type == "focal":
            p = torch.sigmoid(x)
            p_t = p * q + (1 - p) * (1 - q)
            ce = ce * ((1 - p_t) ** gamma)
        per = ce.sum(-1)
    return (a.to(per.dtype) * per).mean()


def naive_transformed_loss(x: Tensor, t: Tensor, w: Tensor, offset: Tensor, margin: Tensor, *, loss_type: str,
                           gamma: float) -> Tensor:
    """What users write today for the transforms: PyTorch ops on the logits, then the naive loss (+ z-loss)."""
    z = SOFTCAP * torch.tanh(x / SOFTCAP) + offset.to(x.dtype)
    z = z.scatter_add(1, t[:, None], -margin[t][:, None].to(x.dtype))
    z = z * LOGIT_SCALE
    loss = naive_cb_loss(z, t, w, loss_type=loss_type, gamma=gamma)
    if loss_type in ("softmax", "softmax_focal"):
        loss = loss + Z_LOSS * torch.logsumexp(z.float(), dim=-1).pow(2).mean()
    return loss

# Logits below this many elements are timed in batches of steps (INNER_ELEMS // numel of them, at most MAX_INNER):
# a single step there lasts tens of microseconds, close to the timer's and the loop's own cost.
INNER_ELEMS = 1 << 20
MAX_INNER = 512


def inner_steps(logits: Tensor) -> int:
    """Steps per timed unit: 1 for realistic shapes, up to MAX_INNER for the tiny ones."""
    return max(1, min(MAX_INNER, INNER_ELEMS // max(1, logits.numel())))


TIMING_METHOD = (
    "forward+backward of the mean loss w.r.t. a leaf logits tensor; logits.grad is reset between steps "
    "(untimed; inside the timed unit for the small shapes, below 2^20 logits, which are timed in units of "
    "2^20 // (B*C) steps, at most 512, reported per step). Per provider one untimed warm-up step "
    "(torch.compile compiles there, once per case) and one untimed memory step, then timed rounds: every "
    "round runs each provider once, in an order "
    "rotated per round, so machine noise hits all providers alike. Each provider repeats until about "
    "--target-time seconds at its running median (between --min-reps and --max-reps steps). Median reported; "
    "speed-up = naive median / provider median, from the same run. CPU: time.perf_counter; CUDA: CUDA "
    "events after a synchronize."
)
MEMORY_METHOD = {
    "cpu": (
        "kept = bytes the forward allocates and still holds when it returns (what autograd keeps for "
        "backward, plus the scalar loss), from the c10 CPU allocator's allocation/free records captured "
        "with torch.profiler(profile_memory=True); peak = highest allocated level above the start over "
        "forward+backward (it includes the logits gradient). The inputs are allocated beforehand and not "
        "counted. saved = unique storages seen by torch.autograd.graph.saved_tensors_hooks, inputs "
        "excluded: a cross-check (it does see what torch.compile'd graphs save, but not tensors a custom "
        "autograd.Function keeps outside save_for_backward)."
    ),
    "cuda": (
        "kept = torch.cuda.memory_allocated() after the forward minus before it (what autograd keeps for "
        "backward, plus the scalar loss); peak = torch.cuda.max_memory_allocated() over forward+backward "
        "minus the start level (it includes the logits gradient). The inputs are allocated beforehand and "
        "not counted. saved = unique storages seen by torch.autograd.graph.saved_tensors_hooks, inputs "
        "excluded: a cross-check."
    ),
}


# ----------------------------------------------------------------------------------------------------
# Inputs and providers


@dataclass
class Case:
    """One benchmark case: a shape, a loss and the tensors every provider gets."""

    shape: str
    batch: int
    classes: int
    loss: str
    gamma: float
    logits: Tensor  # [B, C] leaf at the working dtype, requires grad
    target: Tensor  # [B] int64
    weight: Tensor  # [C] float32 class-balanced weights

    @property
    def logits_bytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()


def make_inputs(batch: int, classes: int, *, dtype=torch.float32, device="cpu", beta: float = 0.999,
                seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Logits ``[B, C]`` (leaf, requires grad), targets drawn from the long-tailed counts, weights ``[C]``."""
    g = torch.Generator().manual_seed(seed)
    target, weight = harness.long_tailed_targets(batch, classes, g, beta)
    logits = (2.0 * torch.randn(batch, classes, generator=g)).to(dtype)
    return logits.to(device).requires_grad_(True), target.to(device), weight.to(device)


@dataclass
class Provider:
    name: str
    loss_fn: Callable[[Tensor], Tensor]  # logits -> scalar loss
    inputs: Tuple[Tensor, ...]  # tensors that exist anyway: not counted as kept memory
    compile_s: Optional[float] = None


def cb_provider_names(device: str, *, explicit: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """``cb:<backend>`` names runnable on ``device``, and notes on the backends left out.

    Triton on CPU tensors runs in its interpreter (TRITON_INTERPRET=1), a correctness tool far too slow
    to time: it is only benchmarked when named explicitly.
    """
    from cbkernels import available_backends
    from cbkernels._backends import get_backend, triton_interpret

    names, notes = [], []
    for b in available_backends():
        name = f"cb:{b}"
        if device not in get_backend(b).devices:
            continue
        if b == "triton" and device == "cpu":
            if not triton_interpret():
                continue
            if name not in explicit:
                notes.append(f"{name} skipped: Triton interpreter on CPU (name it in --providers to time it)")
                continue
        names.append(name)
    return names, notes


def default_providers(device: str) -> List[str]:
    cb_names = cb_provider_names(device)[0]
    return list(FIXED_PROVIDERS) + cb_names + _variants(cb_names)


def _variants(cb_names: Sequence[str]) -> List[str]:
    return [f"{n}+{v}" for v in VARIANTS for n in cb_names]


def applies(provider: str, loss: str) -> bool:
    return provider != "F.cross_entropy" or loss == "softmax"


def make_provider(name: str, case: Case) -> Provider:
    """Build provider ``name`` for ``case``; ``naive+compile`` is compiled here (timed into ``compile_s``)."""
    t, w, lt, g = case.target, case.weight, case.loss, case.gamma
    if name == "naive":
        return Provider(name, lambda x: naive_cb_loss(x, t, w, loss_type=lt, gamma=g), (t, w))
    if name == "naive+compile":
        import torch._dynamo

        # A fresh cache per case: one compile per shape and loss, and never a silent fallback to eager
        # after the recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(naive_cb_loss, dynamic=False)
        p = Provider(name, lambda x: compiled(x, t, w, loss_type=lt, gamma=g), (t, w))
        t0 = time.perf_counter()
        step(p, case.logits)  # compiles the forward and, on first backward, the backward graph
        harness.sync(case.logits.device)
        p.compile_s = time.perf_counter() - t0
        return p
    if name == TF_BASELINE:
        offset, margin = transform_vectors(case.classes, case.logits.device)
        return Provider(name, lambda x: naive_transformed_loss(x, t, w, offset, margin, loss_type=lt, gamma=g),
                        (t, w, offset, margin))
    if name == SOFT_BASELINE:
        q = mixup_targets(t, case.classes, case.logits.dtype)
        return Provider(name, lambda x: soft_target_loss(x, q, w, loss_type=lt, gamma=g), (t, w, q))
    if name == "F.cross_entropy":
        if lt != "softmax":
            raise ValueError("F.cross_entropy only applies to the softmax loss")
        wd = w.to(case.logits.dtype)  # F.cross_entropy wants the weight in the logits' dtype
        return Provider(name, lambda x: F.cross_entropy(x, t, weight=wd), (t, wd))
    if name.startswith("cb:"):
        import cbkernels
        from cbkernels._backends import resolve_backend

        backend, _, variant = name[3:].partition("+")
        if variant not in ("", "inplace") + VARIANTS:
            raise ValueError(f"unknown provider {name!r}: the variants are cb:<backend>+inplace, +tf and +soft")
        resolve_backend(backend, case.logits.device)  # a clear error when it cannot run here
        # +inplace: inplace_backward=True, the gradient written over the logits (which the steps then keep
        # overwriting: fine for timing and memory, the values stay finite).
        inplace = variant == "inplace"
        tf = {}
        if variant == "tf":
            offset, margin = transform_vectors(case.classes, "cpu")
            tf = dict(softcap=SOFTCAP, logit_offset=offset, target_margin=margin, logit_scale=LOGIT_SCALE,
                      z_loss=Z_LOSS if lt in ("softmax", "softmax_focal") else 0.0)
        # The module form with the case's precomputed weights (what a training loop holds).
        module = cbkernels.ClassBalancedLoss([1] * case.classes, loss_type=lt, gamma=g, backend=backend,
                                             inplace_backward=inplace, **tf).to(w.device)
        module.weight = w
        if variant == "soft":
            q = mixup_targets(t, case.classes, case.logits.dtype)
            return Provider(name, lambda x: module(x, q), (t, w, q))
        return Provider(name, lambda x: module(x, t), (t, w))
    raise ValueError(f"unknown provider {name!r}")


def step(p: Provider, x: Tensor) -> None:
    """One forward+backward (the timed unit)."""
    p.loss_fn(x).backward()


# ----------------------------------------------------------------------------------------------------
# Measurement


def time_step(p: Provider, x: Tensor) -> float:
    """Seconds for one forward+backward of ``p`` (``x.grad`` reset beforehand, untimed)."""
    x.grad = None
    return harness.time_once(lambda: step(p, x), x.device)


def measure_memory(p: Provider, x: Tensor) -> Dict[str, int]:
    """Bytes kept from forward to backward, the peak over forward+backward and the saved-tensor total.

    See ``MEMORY_METHOD`` for what each number means.
    """
    x.grad = None
    gc.collect()
    inputs = {t.untyped_storage().data_ptr() for t in (x, *p.inputs)}
    saved: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def forward() -> Tensor:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return p.loss_fn(x)

    if x.device.type == "cuda":
        harness.sync(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        loss = forward()
        harness.sync(x.device)
        kept = torch.cuda.memory_allocated(x.device) - base
        loss.backward()
        harness.sync(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - base
    else:
        loss, fwd = harness.cpu_allocations(forward)
        kept, peak_fwd = harness.running_peak(fwd)
        _, bwd = harness.cpu_allocations(loss.backward)
        peak = max(peak_fwd, kept + harness.running_peak(bwd)[1])
    del loss
    x.grad = None
    return {"kept_bytes": int(kept), "peak_bytes": int(peak), "saved_bytes": int(sum(saved.values()))}


def _graphs_compiled() -> int:
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class Options:
    device: str = "cpu"
    dtype: str = "float32"
    gamma: float = 0.5
    beta: float = 0.999
    seed: int = 0
    target_time: float = 1.0
    min_reps: int = 3
    max_reps: int = 20
    memory: bool = True


def run_case(case: Case, provider_names: Sequence[str], opts: Options,
             status: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Benchmark every provider on ``case``; one result row per provider (``error`` set when it failed)."""
    x = case.logits
    rows: Dict[str, dict] = {}
    providers: List[Provider] = []
    for name in provider_names:
        row = rows[name] = _new_row(case, name, opts)
        try:
            status(f"warm-up {name}")
            p = make_provider(name, case)
            x.grad = None
            step(p, x)  # warm-up (after compiling, for naive+compile)
        except Exception as exc:  # one broken provider must not sink the run
            row["error"] = harness.one_line(exc)
            x.grad = None
            continue
        row["compile_s"] = p.compile_s
        providers.append(p)
        if opts.memory:
            status(f"memory {name}")
            try:
                mem = measure_memory(p, x)
            except Exception as exc:  # e.g. a torch whose profiler internals moved: still time it
                _add_note(row, "memory not measured: " + harness.one_line(exc))
            else:
                row.update(mem)
                for k in ("kept", "peak", "saved"):
                    row[f"{k}_x"] = mem[f"{k}_bytes"] / case.logits_bytes
        x.grad = None

    def dropped(name: str, exc: Exception) -> None:
        rows[name]["error"] = harness.one_line(exc)

    graphs_before = _graphs_compiled()
    status("timing " + ", ".join(p.name for p in providers))
    inner = inner_steps(x)

    def unit(p: Provider) -> None:
        step(p, x)
        for _ in range(inner - 1):
            x.grad = None
            step(p, x)

    try:
        times = harness.timed_rounds({p.name: (lambda p=p: unit(p)) for p in providers}, x.device,
                                     min_reps=opts.min_reps, max_reps=opts.max_reps, target_time=opts.target_time,
                                     prepare=lambda: setattr(x, "grad", None), on_error=dropped)
    finally:
        x.grad = None
    times = {name: [t / inner for t in ts] for name, ts in times.items()}
    recompiled = _graphs_compiled() - graphs_before

    for name, ts in times.items():
        row = rows[name]
        ms = sorted(t * 1e3 for t in ts)
        row.update(reps=len(ms), inner_steps=inner, median_ms=statistics.median(ms), min_ms=ms[0],
                   times_ms=[t * 1e3 for t in ts])
        if len(ms) >= 2:
            q = statistics.quantiles(ms, n=4, method="inclusive")
            row.update(p25_ms=q[0], p75_ms=q[2])
        if recompiled and name == "naive+compile":
            _add_note(row, f"{recompiled} graph(s) compiled during the timed rounds")
    base = rows.get(BASELINE, {}).get("median_ms")
    tf_base = rows.get(TF_BASELINE, {}).get("median_ms")
    soft_base = rows.get(SOFT_BASELINE, {}).get("median_ms")
    for name, row in rows.items():
        b = tf_base if name.endswith("+tf") else soft_base if name.endswith("+soft") else base
        if b and row.get("median_ms"):
            row["speedup"] = b / row["median_ms"]
    return list(rows.values())


def _add_note(row: dict, note: str) -> None:
    row["note"] = note if not row["note"] else f"{row['note']}; {note}"


def _new_row(case: Case, provider: str, opts: Options) -> dict:
    return {
        "shape": case.shape, "batch": case.batch, "classes": case.classes, "loss": case.loss,
        "provider": provider, "device": opts.device, "dtype": opts.dtype, "gamma": case.gamma,
        "logits_bytes": case.logits_bytes, "median_ms": None, "min_ms": None, "p25_ms": None, "p75_ms": None,
        "reps": 0, "speedup": None, "kept_bytes": None, "kept_x": None, "peak_bytes": None, "peak_x": None,
        "saved_bytes": None, "saved_x": None, "compile_s": None, "times_ms": [], "error": None, "note": None,
    }


# ----------------------------------------------------------------------------------------------------
# Command line


def _split(s: Optional[str]) -> Optional[List[str]]:
    return None if s is None else [p.strip() for p in s.split(",") if p.strip()]


def parse_shapes(spec: Optional[str], quick: bool) -> Dict[str, Tuple[int, int]]:
    if spec is None:
        return dict(QUICK_SHAPES if quick else SHAPES)
    out = {}
    for item in _split(spec):
        if item in SHAPES or item in QUICK_SHAPES:
            out[item] = {**SHAPES, **QUICK_SHAPES}[item]
        elif "x" in item and all(p.isdigit() for p in item.split("x", 1)):
            b, c = (int(p) for p in item.split("x", 1))
            out[item] = (b, c)
        else:
            raise SystemExit(f"--shapes: unknown shape {item!r}; use {', '.join({**SHAPES, **QUICK_SHAPES})} or BxC")
    return out


def build_parser() -> argparse.ArgumentParser:
    shapes = ", ".join(f"{k} ({b}x{c})" for k, (b, c) in {**SHAPES, **QUICK_SHAPES}.items())
    try:
        here = ", ".join(list(FIXED_PROVIDERS) + cb_provider_names("cpu")[0])
    except Exception as exc:  # --help must work even when a backend's probe is broken
        here = f"(cbkernels backends unavailable: {exc})"
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Time forward+backward of the class-balanced losses for every provider, side by side,\n"
                    "and measure the memory each keeps between forward and backward.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
providers:
  naive            cbkernels.reference.naive_cb_loss at the working dtype: the speed-up baseline
  naive+compile    torch.compile of it, compiled once per case before timing
  F.cross_entropy  F.cross_entropy(logits, target, weight=w), softmax only
  cb:<backend>     cbkernels.ClassBalancedLoss(..., backend=<backend>) with precomputed weights, each backend
  cb               all cb:<backend>
  cb:<backend>+inplace  the same with inplace_backward=True (only when named)
  naive+tf, cb:<backend>+tf  all four logit transforms and the z-loss on; +tf speed-ups are against naive+tf
  naive+soft, cb:<backend>+soft  dense mixup targets; +soft speed-ups are against naive+soft
  on this machine's CPU: {here}
shapes: {shapes}, or any BxC.
memory: kept = bytes held from forward to backward (CPU: allocator records from torch.profiler;
  CUDA: torch.cuda.memory_allocated), also as a multiple of the logits' size; peak over forward+backward.
outputs: a table on stdout; under --out: <stem>.json (machine, config, one row per case and provider),
  <stem>.md (markdown tables for a README) and <stem>.png (speed-up per provider per shape and loss).
examples:
  python -m benchmarks.bench --quick
  python -m benchmarks.bench --dtype bfloat16 --shapes imagenet
  python -m benchmarks.bench --shapes 512x4096 --losses focal --providers naive,cb
  python -m benchmarks.bench --device cuda --providers naive,naive+compile,cb:triton,cb:cuda""",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="logits dtype (default float32)")
    p.add_argument("--shapes", help="comma-separated shape names or BxC (default: cifar10,cifar100,inat2018,"
                                    "imagenet,vocab; with --quick: small)")
    p.add_argument("--losses", help=f"comma-separated subset of {','.join(LOSSES)} (default all)")
    p.add_argument("--providers", help="comma-separated providers (default: every one that runs here)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default 2 on CPU, untouched on CUDA)")
    p.add_argument("--quick", action="store_true",
                   help="fast pass: shape 'small', --target-time 0.05, --min-reps 2, --max-reps 5, and no "
                        "naive+compile unless named in --providers")
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/results in the repo)")
    p.add_argument("--name", help="file stem of the outputs (default bench_<device>_<dtype>[_<shapes>]_<date>)")
    p.add_argument("--gamma", type=float, default=0.5, help="focal gamma (default 0.5)")
    p.add_argument("--beta", type=float, default=0.999, help="class-balanced beta for the weights (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--target-time", type=float, help="timed seconds per provider per case (default 1.0)")
    p.add_argument("--min-reps", type=int, help="least timed steps per provider per case (default 3)")
    p.add_argument("--max-reps", type=int, help="most timed steps per provider per case (default 20)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return p


def _select_providers(requested: Optional[List[str]], device: str, quick: bool) -> Tuple[List[str], List[str]]:
    cb_names, notes = cb_provider_names(device, explicit=requested or ())
    if requested is None:
        if quick:
            # Compiling costs 5-15 s per case on a small CPU (until inductor's cache is warm): more than the
            # rest of a quick pass together.
            notes.append("--quick leaves out naive+compile; name it in --providers to include it")
            fixed = [p for p in FIXED_PROVIDERS if p != "naive+compile"]
            return fixed + cb_names + _variants(cb_names), notes
        return list(FIXED_PROVIDERS) + cb_names + _variants(cb_names), notes
    out: List[str] = []
    for name in requested:
        if name == "cb":
            out += cb_names
        elif name in FIXED_PROVIDERS or name in cb_names:
            out.append(name)
        elif name.partition("+")[2] in ("inplace",) + VARIANTS and name.partition("+")[0] in cb_names:
            out.append(name)
        elif name.startswith("cb:"):
            from cbkernels import available_backends

            raise SystemExit(f"--providers: {name} cannot run on {device} here; cbkernels backends available: "
                             f"{available_backends()}")
        else:
            raise SystemExit(f"--providers: unknown provider {name!r}; choose from "
                             f"{', '.join(list(FIXED_PROVIDERS) + cb_names)} or cb")
    return list(dict.fromkeys(out)), notes


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark described by ``argv`` (see ``--help``); return the result written to JSON."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    shapes = parse_shapes(args.shapes, args.quick)
    losses = _split(args.losses) or list(LOSSES)
    bad = [lt for lt in losses if lt not in LOSSES]
    if bad:
        raise SystemExit(f"--losses: unknown {bad}; choose from {', '.join(LOSSES)}")
    providers, notes = _select_providers(_split(args.providers), args.device, args.quick)
    opts = Options(device=args.device, dtype=args.dtype, gamma=args.gamma, beta=args.beta, seed=args.seed,
                   target_time=args.target_time if args.target_time is not None else (0.05 if args.quick else 1.0),
                   min_reps=args.min_reps or (2 if args.quick else 3),
                   max_reps=args.max_reps or (5 if args.quick else 20), memory=not args.no_memory)
    opts.max_reps = max(opts.max_reps, opts.min_reps)

    old_threads = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (2 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        result = _run(args, list(sys.argv[1:] if argv is None else argv), shapes, losses, providers, opts, notes)
    finally:
        torch.set_num_threads(old_threads)
    return result


def _run(args, argv, shapes, losses, providers, opts: Options, notes) -> dict:
    started = datetime.datetime.now().astimezone()
    machine = harness.machine_info(opts.device)
    cases = [(s, lt) for s in shapes for lt in losses]
    progress = Progress(len(cases), enabled=not args.no_progress)
    rows: List[dict] = []
    try:
        for shape in shapes:
            b, c = shapes[shape]
            progress.case(shape_label(shape, b, c))
            progress.status("making inputs")
            logits, target, weight = make_inputs(b, c, dtype=DTYPES[opts.dtype], device=opts.device,
                                                 beta=opts.beta, seed=opts.seed)
            for lt in losses:
                progress.case(f"{shape_label(shape, b, c)} {lt}")
                case = Case(shape, b, c, lt, opts.gamma, logits, target, weight)
                rows += run_case(case, [p for p in providers if applies(p, lt)], opts, progress.status)
                progress.advance()
            del logits, target, weight
            gc.collect()
    finally:
        progress.close()

    load = max(machine["loadavg_start"] or 0, harness.loadavg() or 0)
    if load > (machine["cpus_usable"] or 1):
        notes = notes + [f"busy machine (load average up to {load:.1f} on {machine['cpus_usable']} CPUs): other "
                         "work competed with the timed steps; the times and even the ratios are noisy"]
        print(f"note: {notes[-1]}", file=sys.stderr)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now().astimezone() - started).total_seconds(), 1),
        "machine": {**machine, "loadavg_end": harness.loadavg()},
        "config": {"device": opts.device, "dtype": opts.dtype, "threads": torch.get_num_threads(),
                   "shapes": {k: list(v) for k, v in shapes.items()}, "losses": losses, "providers": providers,
                   "gamma": opts.gamma, "beta": opts.beta, "seed": opts.seed, "quick": args.quick,
                   "target_time_s": opts.target_time, "min_reps": opts.min_reps, "max_reps": opts.max_reps,
                   "argv": argv},
        "notes": notes,
        "timing_method": TIMING_METHOD,
        "memory_method": MEMORY_METHOD[opts.device] if opts.memory else "not measured (--no-memory)",
        "rows": rows,
    }
    out_dir = args.out or harness.RESULTS_DIR
    stem = args.name or _default_stem(opts, shapes, args.quick, started)
    written = harness.write_results(out_dir, stem, result, md=format_markdown(result))
    wrote_png = not args.no_plot and plot(result, out_dir / f"{stem}.png")
    if not args.no_plot and not wrote_png:
        print("note: matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)

    m = result["machine"]
    print(f"cbkernels bench | {opts.device} {opts.dtype} | {m.get('gpu') or m['cpu']} | "
          f"{result['config']['threads']} threads | torch {m['torch']} | backends {m['backends']} | "
          f"{result['duration_s']:.0f} s | load average {m['loadavg_start']} -> {m['loadavg_end']}")
    print(format_table(rows))
    print("memory: " + ("kept = bytes held from forward to backward (allocator), x = multiple of the logits' "
                        "size; peak over forward+backward" if opts.memory else "not measured"))
    written += [out_dir / f"{stem}.png"] if wrote_png else []
    print("wrote " + ", ".join(str(p) for p in written))
    return result


def _default_stem(opts: Options, shapes: dict, quick: bool, when: datetime.datetime) -> str:
    parts = ["bench", opts.device, opts.dtype]
    if quick:
        parts.append("quick")
    elif list(shapes) != list(SHAPES):
        parts.append("-".join(shapes))
    parts.append(when.strftime("%Y-%m-%d"))
    return "_".join(parts)


if __name__ == "__main__":
    main()
