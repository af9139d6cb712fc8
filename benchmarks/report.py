"""Reports of ``benchmarks/bench.py``: the stdout table, the Markdown page, the PNG plot, and progress on stderr.

matplotlib (the plot) and tqdm (the progress bar) load only when used, and are optional.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from benchmarks.harness import BASELINE


class Progress:
    """Case-level progress on stderr: tqdm when installed, plain text otherwise; silent for short runs."""

    def __init__(self, total: int, enabled: bool = True, delay: float = 2.0):
        self.total, self.done, self.enabled, self.delay = total, 0, enabled, delay
        self.t0 = time.perf_counter()
        self.label = ""
        self._bar = None
        self._tty = sys.stderr.isatty()
        self._last_plain = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="case", file=sys.stderr, delay=delay, dynamic_ncols=True)
            except ImportError:
                pass

    def case(self, label: str) -> None:
        self.label = label
        self.status("start")

    def status(self, what: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.label}: {what}", refresh=True)
            return
        elapsed = time.perf_counter() - self.t0
        if elapsed < self.delay:
            return
        width = 20
        fill = round(width * self.done / max(self.total, 1))
        bar = "#" * fill + "." * (width - fill)
        line = f"[{bar}] {self.done}/{self.total} cases {_fmt_s(elapsed)} | {self.label}: {what}"
        if self._tty:
            sys.stderr.write("\r\033[K" + line[:150])
        elif self.label != self._last_plain:  # a log file gets one line per case
            sys.stderr.write(line + "\n")
            self._last_plain = self.label
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._tty and time.perf_counter() - self.t0 >= self.delay:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"



def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _mb(b) -> Optional[float]:
    return None if b is None else b / 2**20


TABLE_COLUMNS = ("shape", "loss", "provider", "median ms", "speed-up", "kept MB", "kept/logits",
                 "peak/logits", "reps")


def shape_label(shape: str, batch: int, classes: int) -> str:
    size = f"{batch}x{classes}"
    return size if shape == size else f"{shape} {size}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table_cells(row: dict) -> List[str]:
    head = [shape_label(row["shape"], row["batch"], row["classes"]), row["loss"], row["provider"]]
    if row["error"]:
        return head + ["error: " + row["error"][:60], "", "", "", "", ""]
    kept_mb = _mb(row["kept_bytes"])
    return head + [
        _fmt(row["median_ms"], ".2f"), _x(row["speedup"]) if row["speedup"] else "",
        _fmt(kept_mb, ".1f" if (kept_mb or 0) >= 1 else ".3f"), _x(row["kept_x"]), _x(row["peak_x"]),
        str(row["reps"]),
    ]


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table, one line per (case, provider)."""
    cells = [list(TABLE_COLUMNS)] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    right = {3, 4, 5, 6, 7, 8}
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(s.rjust(w) if i in right else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """A README-ready markdown report: the context, a speed-up summary, then every row."""
    m, cfg, rows = result["machine"], result["config"], result["rows"]
    out = [
        f"# cbkernels benchmark: {cfg['device']} {cfg['dtype']}",
        "",
        f"{result['date']} | {m.get('gpu') or m['cpu']} | {cfg['threads']} threads | torch {m['torch']} | "
        f"cbkernels {m['cbkernels']} ({m['git_commit'] or 'no git'}) | backends {', '.join(m['backends'])} | "
        f"gamma {cfg['gamma']} | load average {m['loadavg_start']} -> {m['loadavg_end']} on {m['cpu_count']} CPUs",
        "",
        "Forward+backward of the mean loss; speed-up = naive median / provider median (a +tf provider, with the "
        "logit transforms and z-loss on: naive+tf median / its median; a +soft provider, with dense mixup targets: "
        "naive+soft median / its median), measured side by side "
        "in one run. Memory kept = bytes held from forward to backward, as a multiple of the logits' size.",
        "",
    ]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != BASELINE]
    if providers:
        out += ["## Speed-up over naive (memory kept / logits)", "",
                "| shape | loss | naive ms | " + " | ".join(providers) + " |",
                "|---|---|---:|" + "---:|" * len(providers)]
        cases = dict.fromkeys((r["shape"], r["batch"], r["classes"], r["loss"]) for r in rows)
        for key in cases:
            by = {r["provider"]: r for r in rows if (r["shape"], r["batch"], r["classes"], r["loss"]) == key}
            naive = by.get(BASELINE, {})
            cells = []
            for p in providers:
                r = by.get(p)
                if r is None:
                    cells.append("")
                elif r["error"]:
                    cells.append("error")
                else:
                    cells.append(_x(r["speedup"]) + (f" ({_x(r['kept_x'])})" if r["kept_x"] is not None else ""))
            out.append(f"| {shape_label(*key[:3])} | {key[3]} | {_fmt(naive.get('median_ms'), '.2f')} | "
                       + " | ".join(cells) + " |")
        out.append("")
    out += ["## All rows", "", "| " + " | ".join(TABLE_COLUMNS) + " |",
            "|---|---|---|" + "---:|" * (len(TABLE_COLUMNS) - 3)]
    out += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    out += ["", f"Timing: {result['timing_method']}", "", f"Memory: {result['memory_method']}", ""]
    out += [f"Note: {n}" for n in result.get("notes", [])]
    return "\n".join(out).rstrip("\n") + "\n"


def plot(result: dict, path: Path) -> bool:
    """Bar chart of the speed-up per provider, one panel per shape; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r["speedup"] is not None and r["provider"] != BASELINE]
    shapes = list(dict.fromkeys((r["shape"], r["batch"], r["classes"]) for r in result["rows"]))
    losses = list(dict.fromkeys(r["loss"] for r in result["rows"]))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.8 * len(shapes), 4.2), squeeze=False, sharey=True)
    width = 0.8 / max(len(providers), 1)
    for ax, shape in zip(axes[0], shapes):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, loss in enumerate(losses):
                r = next((r for r in rows if (r["shape"], r["batch"], r["classes"]) == shape
                          and r["loss"] == loss and r["provider"] == prov), None)
                if r is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["speedup"])
            bars = ax.bar(xs, ys, width, label=prov)
            ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(losses)), losses, rotation=20)
        ax.set_title(shape_label(*shape))
    axes[0][0].set_ylabel("speed-up over naive (fwd+bwd, log scale)")
    axes[0][-1].legend(fontsize=8)
    m, cfg = result["machine"], result["config"]
    fig.suptitle(f"cbkernels {cfg['device']} {cfg['dtype']}, {cfg['threads']} threads, torch {m['torch']}\n"
                 f"{m.get('gpu') or m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
