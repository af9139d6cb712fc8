"""Smoke test of examples/long_tailed_digits.py: the --quick path end to end, in-process, and its loss builders."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import torch
from conftest import load_example

import cbkernels

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def example():
    return load_example("long_tailed_digits")


@pytest.fixture(scope="module")
def quick(example, tmp_path_factory):
    """One --quick run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("quick")
    threads = torch.get_num_threads()
    res = example.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads
    data = json.loads((out / "long_tailed_digits_quick.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    return res, data, out


def _expected_groups(counts, many, few):
    # the shot split written out independently of cbkernels.metrics
    return [0 if n > many else 2 if n < few else 1 for n in counts]


def test_long_tailed_counts_follow_the_paper(example):
    assert example.long_tailed_counts(5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert example.long_tailed_counts(100, 100) == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]


def test_quick_run_writes_results(example, quick):
    res, data, out = quick
    png, md = (out / f"long_tailed_digits_quick.{ext}" for ext in ("png", "md"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    for label in example.LABELS.values():
        assert f"| {label} |" in text, label
    for section in ("## Many / medium / few-shot", "## Paired difference", "## CB softmax: beta sweep",
                    "| inverse frequency (1/n) |", "tuned β − inverse frequency", "## LDAM-DRW minus LDAM",
                    "## Every grid point"):
        assert section in text, section

    cfg = data["config"]
    assert cfg["quick"] is True
    assert cfg["command"].endswith("long_tailed_digits.py --quick --out " + str(out))
    assert f"`{cfg['command']}`" in text and cfg["machine"]["node"] in text
    header = text.split("\n## ")[0]
    assert cfg["date"] in header and f"seeds: 0-{cfg['seeds'] - 1} ({cfg['seeds']})" in header
    assert datetime.datetime.fromisoformat(cfg["date"]).tzinfo is not None
    assert cfg["machine"]["cpu_count"] >= 1 and cfg["seed_list"] == list(range(cfg["seeds"]))
    imbs = cfg["imbalance_factors"]
    assert imbs == [10, 100]
    assert cfg["families"] == list(example.FAMILIES)
    # every grid point once per IF, plus one LDAM-DRW run per IF
    n_cfg = len(example.loss_configs(example.parse_args(["--quick"])))
    assert len(data["runs"]) == (n_cfg + 1) * len(imbs)
    for run in data["runs"]:
        for key in ("train_acc", "val_bacc", "test_bacc", "test_acc", "tail_acc"):
            assert len(run[key]) == cfg["seeds"]
            assert all(0.0 <= v <= 1.0 for v in run[key]), (run["name"], key, run[key])
        # the balanced validation split (20 per class): balanced accuracy is hits / 200, in float64
        n_val = cfg["val_per_class"] * 10
        assert all(abs(v - h / n_val) < 1e-12 for v, h in zip(run["val_bacc"], run["val_hits"], strict=True))
    for imb in imbs:
        assert set(data["selected"][str(imb)]) == set(example.FAMILIES)
        for sel in data["selected"][str(imb)].values():
            assert 0.0 <= sel["test_bacc_mean"] <= 1.0
    # Even the short quick training beats chance (10%) by far on the mildest imbalance.
    assert data["selected"]["10"]["softmax"]["test_bacc_mean"] > 0.6
    assert res["selected"] == data["selected"]


def test_shot_accuracies(quick):
    _, data, _ = quick
    cfg = data["config"]
    assert (cfg["many"], cfg["few"]) == (50, 10)
    seen_empty = seen_full = False
    for run in data["runs"]:
        counts = cfg["train_counts"][str(run["imbalance"])]
        groups = _expected_groups(counts, cfg["many"], cfg["few"])
        per_class = run["test_recall_per_class_mean"]
        # balanced accuracy is the mean per-class recall
        assert sum(run["test_bacc"]) / len(run["test_bacc"]) == pytest.approx(sum(per_class) / len(per_class))
        for g, shot in enumerate(("many", "medium", "few")):
            members = [a for a, k in zip(per_class, groups) if k == g]
            if not members:
                # NaN in the metric, null in the JSON, for every seed: only where the group has no class
                assert run[shot] == [None] * cfg["seeds"] and run[f"{shot}_mean"] is None, (run["name"], shot)
                seen_empty = True
                continue
            assert all(0.0 <= v <= 1.0 for v in run[shot]), (run["name"], shot, run[shot])
            # a group's accuracy is the mean accuracy of its classes
            assert run[f"{shot}_mean"] == pytest.approx(sum(members) / len(members)), (run["name"], shot)
        seen_full |= all(run[f"{s}_mean"] is not None for s in ("many", "medium", "few"))
    # IF 10 (smallest class 10) has no few-shot class, IF 100 has all three groups: both cases are checked
    assert seen_empty and seen_full


def test_beta_sweep_and_inverse_frequency(example, quick):
    _, data, _ = quick
    cfg = data["config"]
    for imb in cfg["imbalance_factors"]:
        runs = {r["name"]: r for r in data["runs"] if r["imbalance"] == imb}
        sweep = data["beta_sweep"][str(imb)]
        assert [r["beta"] for r in sweep["betas"]] == cfg["sweep_betas"]
        assert 0.0 <= sweep["inv_freq"]["test_bacc_mean"] <= 1.0
        assert sweep["selected_beta"] == data["selected"][str(imb)]["cb_softmax"]["hp"]["beta"]
        d = sweep["tuned_minus_inv_freq"]
        assert d["better"] + d["worse"] <= cfg["seeds"]
        inv = runs["inv_freq"]["test_bacc"]
        tuned = runs[f"cb_softmax beta={sweep['selected_beta']:g}"]["test_bacc"]
        assert d["mean"] == pytest.approx(sum(a - b for a, b in zip(tuned, inv)) / len(inv))
        # beta = 0 is the plain loss: same split, same start, same numbers
        assert runs["cb_softmax beta=0"]["test_bacc"] == runs["softmax"]["test_bacc"]
        # Balanced Softmax is the logit-adjustment run at tau = 1
        assert data["selected"][str(imb)]["balanced_softmax"]["name"] == "logit_adj tau=1"
        assert runs["logit_adj tau=1"]["test_bacc"] != runs["softmax"]["test_bacc"]


def test_drw_run_reweights_in_place(example, quick):
    _, data, _ = quick
    cfg = data["config"]
    assert cfg["drw_step"] == round(cfg["drw_at"] * cfg["steps"]) and 0 < cfg["drw_step"] < cfg["steps"]
    for imb in cfg["imbalance_factors"]:
        counts = cfg["train_counts"][str(imb)]
        ldam = [r for r in data["runs"] if r["imbalance"] == imb and r["family"] == "ldam"]
        (drw,) = [r for r in data["runs"] if r["imbalance"] == imb and r["family"] == "ldam_drw"]
        top = max(r["val_bacc_mean"] for r in ldam)
        assert drw["hp"] == next(r for r in ldam if r["val_bacc_mean"] >= top - 1e-9)["hp"]
        assert drw["drw_step"] == cfg["drw_step"] and drw["weight_buffer_kept"] is True
        assert drw["weight_before"] == [1.0] * len(counts)
        want = cbkernels.class_balanced_weights(counts, beta=cfg["drw_beta"]).tolist()
        assert drw["weight_after"] == pytest.approx(want)
        # the rarest class gets far more weight than the head after the switch
        assert drw["weight_after"][-1] > 5 * drw["weight_after"][0]
        assert str(imb) in data["drw_vs_ldam"]


def test_pairwise_table(example, quick):
    _, data, out = quick
    text = (out / "long_tailed_digits_quick.md").read_text()
    assert "## Paired differences between the selected losses" in text
    want = [("logit_adj", "cb_softmax"), ("balanced_softmax", "cb_softmax"), ("ldam", "cb_softmax"),
            ("logit_adj", "ldam"), ("balanced_softmax", "ldam"), ("cb_la", "logit_adj"), ("ldam_drw", "ldam")]
    for a, b in want:
        assert f"| {example.LABELS[a]} − {example.LABELS[b]} |" in text, (a, b)
    for imb in data["config"]["imbalance_factors"]:
        rows = data["pairwise"][str(imb)]
        assert [(p["a"], p["b"]) for p in rows] == want
        runs = {r["name"]: r for r in data["runs"] if r["imbalance"] == imb}
        sel = data["selected"][str(imb)]
        for p in rows:
            assert (p["a_name"], p["b_name"]) == (sel[p["a"]]["name"], sel[p["b"]]["name"])
            d = [u - v for u, v in zip(runs[p["a_name"]]["test_bacc"], runs[p["b_name"]]["test_bacc"], strict=True)]
            got = p["test_bacc"]
            assert got["mean"] == pytest.approx(sum(d) / len(d), abs=1e-12)
            assert (got["better"], got["worse"]) == (sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d))
        drw = next(p for p in rows if p["a"] == "ldam_drw")["test_bacc"]
        assert drw == data["drw_vs_ldam"][str(imb)]["test_bacc"]


def _val_logits(hits_per_class, per_class=20):
    """One seed's validation logits ``[1, C * per_class, C]`` whose arg-max gets ``hits_per_class[c]`` of class
    ``c``'s samples right (the others go to class ``c + 1``)."""
    y, pred = [], []
    for c, h in enumerate(hits_per_class):
        y += [c] * per_class
        pred += [c] * h + [(c + 1) % 10] * (per_class - h)
    logits = 5.0 * torch.nn.functional.one_hot(torch.tensor(pred), 10).float()
    return logits[None], torch.tensor(y)[None]


def _val_run(example, name, hits_per_class):
    hits, support = example.class_hits(*_val_logits(hits_per_class))
    assert hits.tolist() == [list(hits_per_class)] and support.tolist() == [[20] * 10]
    bacc = example.balanced_accuracy_from_hits(hits, support)
    assert bacc.dtype == np.float64
    return dict(name=name, val_bacc=bacc.tolist(), val_bacc_mean=example.mean_std(bacc)[0])


def _float32_bacc(hits_per_class):
    # the old float32 per-class-recall path, whose rounding split such ties
    rec = np.asarray(hits_per_class, dtype=np.float32) / np.float32(20)
    return float(rec.mean())


@pytest.mark.parametrize("even, uneven", [
    ([7] * 10, [6, 8] * 5),                  # 70 / 200 hits each: float32 ranks the second higher
    ([14] * 10, [15] * 5 + [13] * 5),        # 140 / 200 each: even float64 ranks the second higher by one ulp
])
def test_validation_tie_selects_the_earlier_grid_point(example, even, uneven):
    assert sum(even) == sum(uneven)
    # the crafted runs are a real test: float32 rounding ranks the later one higher
    assert _float32_bacc(uneven) > _float32_bacc(even) + 1e-9
    a, b = _val_run(example, "a", even), _val_run(example, "b", uneven)
    assert abs(a["val_bacc_mean"] - b["val_bacc_mean"]) < 1e-12
    assert example.best([a, b])["name"] == "a"
    assert example.best([b, a])["name"] == "b"
    # one more validation hit is a real difference: it wins from any position
    c = _val_run(example, "c", [uneven[0] + 1] + uneven[1:])
    assert example.best([a, b, c])["name"] == "c" and example.best([c, a, b])["name"] == "c"


def test_best_breaks_rounding_level_ties_by_grid_order(example):
    # equal values up to rounding, the later one a hair higher: the earlier grid point is chosen
    runs = [dict(name=n, val_bacc_mean=v) for n, v in (("x", 0.7), ("a", 0.778), ("b", 0.778 + 1e-15),
                                                       ("c", 0.778 + 5e-12), ("d", 0.5))]
    assert example.best(runs)["name"] == "a"
    # the float32 images of two equal float64 means (1556 / 2000) differ by far more than a float64 ulp
    runs = [dict(name="a", val_bacc_mean=0.778), dict(name="b", val_bacc_mean=0.778 + 1e-10)]
    assert example.best(runs)["name"] == "a"
    runs.append(dict(name="c", val_bacc_mean=0.778 + 1 / 2000))
    assert example.best(runs)["name"] == "c"


def test_paired_counts_ignore_rounding_level_differences(example):
    a = [0.5 + 1e-15, 0.5, 0.6, 0.4, 0.7, 0.7780000031]
    b = [0.5, 0.5 + 1e-16, 0.5, 0.5, 0.7 - 1e-12, 0.7780000031 + 1e-10]
    d = example.paired(a, b)
    assert (d["better"], d["worse"]) == (1, 1)
    # float32 inputs are compared in float64: the same value is a tie
    x = np.float32(0.778)
    assert example.paired(np.array([x, x]), [float(x), float(x)])["better"] == 0
    # at the tolerance: just beyond counts, just within does not
    d = example.paired([1.0, 1.0, 1.0, 1.0], [1.0 - 2e-9, 1.0 + 2e-9, 1.0 - 5e-10, 1.0 + 5e-10])
    assert (d["better"], d["worse"]) == (1, 1)


def _counts_100(example):
    return example.long_tailed_counts(100, 100)


def test_criteria_carry_their_transforms(example):
    args = example.parse_args(["--quick"])
    counts = _counts_100(example)
    cfgs = {c["name"]: c for c in example.loss_configs(args)}
    crit, mod = example.make_criterion(cfgs["logit_adj tau=2"], counts, args)
    assert torch.equal(mod.logit_offset, cbkernels.logit_adjustment(counts, 2.0))
    assert torch.equal(mod.weight, torch.ones(10)) and mod.target_margin is None
    _, mod = example.make_criterion(cfgs["ldam max_margin=2 scale=10"], counts, args)
    assert torch.equal(mod.target_margin, cbkernels.ldam_margins(counts, 2.0)) and mod.logit_scale == 10.0
    assert mod.logit_offset is None and torch.equal(mod.weight, torch.ones(10))
    _, mod = example.make_criterion(cfgs["cb_la beta=0.99 tau=0.5"], counts, args)
    assert torch.allclose(mod.weight, cbkernels.class_balanced_weights(counts, beta=0.99))
    assert torch.equal(mod.logit_offset, cbkernels.logit_adjustment(counts, 0.5))

    # inverse frequency: 1/n summing to C, the beta -> 1 limit of the class-balanced weights
    w = example.inverse_frequency_weights(counts)
    assert w.sum().item() == pytest.approx(10.0)
    assert w[-1] / w[0] == pytest.approx(100.0)
    assert torch.allclose(cbkernels.class_balanced_weights(counts, beta=1 - 1e-6), w, rtol=1e-3)
    crit, mod = example.make_criterion(cfgs["inv_freq"], counts, args)
    assert mod is None
    z, t = torch.randn(2, 7, 10, dtype=torch.float64).float(), torch.randint(0, 10, (2, 7))
    ref = torch.nn.functional.cross_entropy(z.reshape(-1, 10), t.reshape(-1), weight=w, reduction="sum")
    assert crit(z, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_drw_changes_training_only_after_the_switch(example):
    args = example.parse_args(["--quick", "--steps", "6", "--drw-at", "0.5", "--seeds", "2"])
    counts = _counts_100(example)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 40, 64, generator=g)
    y = torch.arange(40).remainder(10).expand(2, 40).contiguous()
    init = example.init_params([0, 1], 16)
    ldam = next(c for c in example.loss_configs(args) if c["family"] == "ldam")
    drw = example.drw_config(dict(max_margin=ldam["max_margin"], scale=ldam["scale"]))
    assert drw["drw"] and drw["hp"] == ldam["hp"]
    p_ldam, info_ldam = example.train(ldam, init, x, y, counts, args)
    p_drw, info = example.train(drw, init, x, y, counts, args)
    assert info_ldam == {}
    assert info["drw_step"] == 3 and info["weight_buffer_kept"] is True
    assert info["weight_before"] == [1.0] * 10 and info["weight_after"] != info["weight_before"]
    assert any(not torch.equal(a, b) for a, b in zip(p_ldam, p_drw))
    # before the switch the two are the same loss: stopping at the switch gives identical networks
    short = example.parse_args(["--quick", "--steps", "3", "--drw-at", "1.0", "--seeds", "2"])
    a, _ = example.train(ldam, init, x, y, counts, short)
    b, info = example.train(drw, init, x, y, counts, short)
    assert info == {} and all(torch.equal(u, v) for u, v in zip(a, b))


def test_seeds_make_runs_reproducible(example, tmp_path):
    argv = ["--imbalance-factors", "50", "--seeds", "2", "--steps", "15", "--families", "cb_softmax", "inv_freq",
            "ldam_drw", "--sweep-betas", "0.999", "--ldam-margins", "1", "--ldam-scales", "10"]
    a = example.main(argv + ["--out", str(tmp_path / "a")])
    b = example.main(argv + ["--out", str(tmp_path / "b")])
    assert [r["family"] for r in a["runs"]] == ["softmax", "cb_softmax", "inv_freq", "ldam", "ldam_drw"]
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        assert ra["name"] == rb["name"]
        assert ra["val_bacc"] == rb["val_bacc"] and ra["test_bacc"] == rb["test_bacc"]
        assert ra["few"] == rb["few"]


def test_help_documents_options(example, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--quick", "--out", "--seeds", "--betas", "--gammas", "--imbalance-factors", "--sweep-betas",
                "--taus", "--ldam-margins", "--ldam-scales", "--drw-beta", "--drw-at", "--cbla-betas",
                "--cbla-taus", "--many", "--few", "--families"):
        assert opt in out
