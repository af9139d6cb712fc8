"""Smoke test of ``make bench`` (``benchmarks/bench.py`` and its harness): a tiny shape, outputs, memory accounting.

No timing assertions: those belong to the benchmarks, never to the test suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench, harness, report

B, C = 16, 100
GRAD_BYTES = B * C * 4  # float32 logits gradient
PROVIDERS = ("naive", "F.cross_entropy", "cb:torch")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = bench.main(["--quick", "--shapes", f"{B}x{C}", "--providers", ",".join(PROVIDERS),
                             "--out", str(out), "--name", "smoke", "--no-progress"])
    return result, stdout.getvalue(), out


def _row(result, loss, provider):
    (row,) = [r for r in result["rows"] if r["loss"] == loss and r["provider"] == provider]
    return row


def test_table_printed(run):
    _, text, _ = run
    for column in report.TABLE_COLUMNS:
        assert column in text
    for name in PROVIDERS + harness.LOSSES:
        assert name in text
    assert "smoke.json" in text


def test_json_markdown_png_written(run):
    result, _, out = run
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    machine = saved["machine"]
    for key in ("cpu", "cpu_count", "torch", "backends", "loadavg_start"):
        assert key in machine
    assert "torch" in machine["backends"]
    assert saved["config"]["dtype"] == "float32" and saved["config"]["device"] == "cpu"
    assert saved["config"]["threads"] == 2
    assert "profiler" in saved["memory_method"]
    # F.cross_entropy only for softmax: 4 losses x 2 providers + 1.
    assert len(saved["rows"]) == 9
    assert all(r["error"] is None for r in saved["rows"]), [r["error"] for r in saved["rows"]]
    md = (out / "smoke.md").read_text()
    # The speed-up summary (one line per case) and every row.
    assert "| shape | loss | naive ms |" in md and "| shape | loss | provider |" in md
    assert md.count("\n| 16x100 |") == 4 + 9
    pytest.importorskip("matplotlib")
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timings_and_speedups(run):
    result, _, _ = run
    for r in result["rows"]:
        assert r["reps"] >= 2 and len(r["times_ms"]) == r["reps"]
        assert 0 < r["min_ms"] <= r["median_ms"]
        naive = _row(result, r["loss"], "naive")["median_ms"]
        assert r["speedup"] == pytest.approx(naive / r["median_ms"])
    assert torch.get_num_threads() != 0  # main() restored the thread count it changed


@pytest.mark.parametrize("loss", harness.LOSSES)
def test_torch_backend_keeps_only_the_gradient(run, loss):
    r = _row(run[0], loss, "cb:torch")
    assert r["saved_bytes"] == GRAD_BYTES
    assert GRAD_BYTES <= r["kept_bytes"] <= GRAD_BYTES + 64  # plus the scalar loss
    assert r["kept_x"] == pytest.approx(1.0, abs=0.02)
    assert r["peak_bytes"] >= r["kept_bytes"]


def test_naive_focal_keeps_several_logits(run):
    r = _row(run[0], "focal", "naive")
    assert r["kept_x"] > 4  # one-hot, bce, exp, log1p, modulator, products: about 6x
    assert r["peak_bytes"] >= r["kept_bytes"] + GRAD_BYTES


def test_memory_sees_tensors_kept_outside_save_for_backward():
    class Stash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.stash = x * 2  # invisible to saved_tensors_hooks, still held until backward
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return ctx.stash * g

    x = torch.randn(B, C, requires_grad=True)
    mem = bench.measure_memory(bench.Provider("stash", Stash.apply, ()), x)
    assert mem["saved_bytes"] == 0
    assert GRAD_BYTES <= mem["kept_bytes"] <= GRAD_BYTES + 64


@pytest.mark.slow
def test_compiled_provider_is_measured(tmp_path):
    result = bench.main(["--quick", "--shapes", f"{B}x{C}", "--losses", "sigmoid", "--providers",
                         "naive,naive+compile", "--out", str(tmp_path), "--no-progress", "--no-plot"])
    r = _row(result, "sigmoid", "naive+compile")
    assert r["error"] is None and r["compile_s"] > 0
    # The compiled backward allocates the logits gradient: proof the allocator trace sees compiled code.
    assert r["peak_bytes"] >= GRAD_BYTES
    assert r["kept_bytes"] is not None and r["saved_bytes"] is not None


def test_help_explains_every_option():
    text = bench.build_parser().format_help()
    for opt in ("--device", "--dtype", "--shapes", "--losses", "--providers", "--threads", "--quick", "--out"):
        assert opt in text


@pytest.mark.parametrize("argv", [["--providers", "nope"], ["--shapes", "huge"], ["--losses", "dice"],
                                  ["--dtype", "int8"]])
def test_bad_arguments_exit(argv, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(argv + ["--out", str(tmp_path), "--quick"])


def test_import_needs_no_matplotlib_or_triton():
    # Only what the harness itself adds to ``import cbkernels`` is its business; the package never loads it.
    code = ("import sys, cbkernels; assert 'benchmarks' not in sys.modules; before = set(sys.modules); "
            "import benchmarks.bench; "
            "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in ('matplotlib', 'triton', 'tqdm')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_transform_providers(tmp_path):
    # naive+tf and cb:<backend>+tf: all four transforms and the z-loss; +tf speed-ups are against naive+tf.
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench.main(["--quick", "--shapes", "8x50", "--losses", "focal", "--providers",
                             "naive+tf,cb:torch+tf", "--out", str(tmp_path), "--name", "tf",
                             "--no-progress", "--no-plot", "--no-memory", "--max-reps", "2"])
    rows = {(r["loss"], r["provider"]): r for r in result["rows"]}
    assert len(rows) == 2 and all(r["error"] is None for r in rows.values()), [r["error"] for r in rows.values()]
    for loss in ("focal",):
        tf_base = rows[(loss, "naive+tf")]["median_ms"]
        ours = rows[(loss, "cb:torch+tf")]
        assert ours["speedup"] == pytest.approx(tf_base / ours["median_ms"])
    # The naive+tf loss is the reference formula: same value as the fused one.
    x = torch.randn(8, 50, dtype=torch.float64)
    t = torch.randint(0, 50, (8,))
    w = torch.rand(50, dtype=torch.float64) + 0.5
    offset, margin = bench.transform_vectors(50, "cpu")
    import cbkernels as cb

    for loss in harness.LOSSES:
        naive = bench.naive_transformed_loss(x, t, w, offset.double(), margin.double(), loss_type=loss, gamma=0.5)
        fused = cb.class_balanced_loss(x, t, weight=w, loss_type=loss, gamma=0.5, backend="torch",
                                       softcap=bench.SOFTCAP, logit_offset=offset, target_margin=margin,
                                       logit_scale=bench.LOGIT_SCALE,
                                       z_loss=bench.Z_LOSS if loss in ("softmax", "softmax_focal") else 0.0)
        torch.testing.assert_close(fused, naive, rtol=1e-6, atol=1e-9)


def test_soft_target_providers(tmp_path):
    # naive+soft and cb:<backend>+soft: dense mixup targets; +soft speed-ups are against naive+soft.
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench.main(["--quick", "--shapes", "8x50", "--losses", "softmax", "--providers",
                             "naive+soft,cb:torch+soft", "--out", str(tmp_path), "--name", "soft",
                             "--no-progress", "--no-plot", "--no-memory", "--max-reps", "2"])
    rows = {r["provider"]: r for r in result["rows"]}
    assert len(rows) == 2 and all(r["error"] is None for r in rows.values()), [r["error"] for r in rows.values()]
    assert rows["cb:torch+soft"]["speedup"] == pytest.approx(rows["naive+soft"]["median_ms"]
                                                             / rows["cb:torch+soft"]["median_ms"])
    # The naive+soft loss is the formula users write today: the same value as the fused one.
    x = torch.randn(8, 50, dtype=torch.float64)
    t = torch.randint(0, 50, (8,))
    w = torch.rand(50) + 0.5
    q = bench.mixup_targets(t, 50, torch.float64)
    assert torch.allclose(q.sum(1), torch.ones(8, dtype=torch.float64))
    import cbkernels as cb

    for loss in harness.LOSSES:
        naive = bench.soft_target_loss(x, q, w, loss_type=loss, gamma=0.5)
        fused = cb.class_balanced_loss(x, q, weight=w, loss_type=loss, gamma=0.5, backend="torch")
        torch.testing.assert_close(fused, naive, rtol=1e-6, atol=1e-9)
