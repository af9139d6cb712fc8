"""Smoke test of examples/long_tailed_digits.py: the --quick path end to end, in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "long_tailed_digits.py"


@pytest.fixture(scope="module")
def example():
    # examples/ is not a package: load the script as a module by path.
    spec = importlib.util.spec_from_file_location("long_tailed_digits", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_long_tailed_counts_follow_the_paper(example):
    assert example.long_tailed_counts(5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert example.long_tailed_counts(100, 100) == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]


def test_quick_run_writes_results(example, tmp_path):
    threads = torch.get_num_threads()
    res = example.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads

    js, png, md = (tmp_path / f"long_tailed_digits_quick.{ext}" for ext in ("json", "png", "md"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| CB focal |" in md.read_text()
    data = json.loads(js.read_text())
    assert data["config"]["quick"] is True
    imbs = data["config"]["imbalance_factors"]
    assert imbs == [10, 50, 100]
    n_cfg = len(example.loss_configs(data["config"]["betas"], data["config"]["gammas"]))
    assert len(data["runs"]) == n_cfg * len(imbs)
    for run in data["runs"]:
        for key in ("train_acc", "val_bacc", "test_bacc", "tail_acc"):
            assert len(run[key]) == data["config"]["seeds"]
            assert all(0.0 <= v <= 1.0 for v in run[key]), (run["name"], key, run[key])
    for imb in imbs:
        assert set(data["selected"][str(imb)]) == set(example.FAMILIES)
        for sel in data["selected"][str(imb)].values():
            assert 0.0 <= sel["test_bacc_mean"] <= 1.0 and 0.0 <= sel["tail_acc_mean"] <= 1.0
    # Even the short quick training beats chance (10%) by far on the mildest imbalance.
    assert data["selected"]["10"]["softmax"]["test_bacc_mean"] > 0.6
    assert res["selected"] == data["selected"]


def test_seeds_make_runs_reproducible(example, tmp_path):
    argv = ["--imbalance-factors", "50", "--seeds", "2", "--steps", "15", "--betas", "0.999", "--gammas", "1"]
    a = example.main(argv + ["--out", str(tmp_path / "a")])
    b = example.main(argv + ["--out", str(tmp_path / "b")])
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        assert ra["name"] == rb["name"]
        assert ra["val_bacc"] == rb["val_bacc"] and ra["test_bacc"] == rb["test_bacc"]


def test_help_documents_options(example, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--quick", "--out", "--seeds", "--betas", "--gammas", "--imbalance-factors"):
        assert opt in out
