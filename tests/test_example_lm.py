"""Smoke test of examples/token_balanced_lm.py: the --quick path end to end, in-process, plus its pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_example

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def example():
    return load_example("token_balanced_lm")


@pytest.fixture(scope="module")
def quick(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_quick")
    threads = torch.get_num_threads()
    res = example.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored for the rest of the suite
    return out, res


def test_quick_run_writes_results(example, quick):
    out, res = quick
    js, md, png = (out / f"token_balanced_lm_quick.{ext}" for ext in ("json", "md", "png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    text = md.read_text()
    for label in ("| plain CE |", "| CB softmax β=", "| CB softmax focal β="):
        assert label in text
    assert data["config"]["quick"] is True and "--quick" in data["command"]
    for key in ("node", "cores", "torch", "transformers", "tokenizers", "cbkernels"):
        assert key in data["machine"]
    assert res["summary"] == data["summary"]

    names = [sp["name"] for sp in data["config"]["runs"]]
    assert names[:3] == list(example.MAIN_RUNS)
    seeds = data["config"]["seed_list"]
    assert len(seeds) >= 2
    assert sorted((r["name"], r["seed"]) for r in data["runs"]) == sorted((n, s) for n in names for s in seeds)

    corpus = data["corpus"]
    vocab = corpus["vocab"]
    assert corpus["train_files"] > 0 and corpus["val_files"] > 0 and corpus["val_target_tokens"] > 0
    buckets = corpus["buckets"]
    assert set(buckets) == set(example.BUCKETS)
    assert sum(b["val_tokens"] for b in buckets.values()) == corpus["val_target_tokens"]
    assert sum(b["types"] for b in buckets.values()) == vocab
    assert sum(b["train_tokens"] for b in buckets.values()) == corpus["train_target_tokens"]
    assert all(b["val_tokens"] > 0 for b in buckets.values())

    for r in data["runs"]:
        v = r["val"]
        assert math.isfinite(v["ppl"]) and v["ppl"] > 1.0
        assert v["ppl"] == pytest.approx(math.exp(v["nll"]), rel=1e-9)
        assert 0.0 <= v["acc"] <= 1.0 and 0.0 <= v["macro_acc"] <= 1.0
        for b in example.BUCKETS:
            bk = v["buckets"][b]
            assert math.isfinite(bk["nll"]) and bk["nll"] > 0.0
            assert 0.0 <= bk["acc"] <= 1.0 and 0.0 <= bk["macro_acc"] <= 1.0
        # The overall NLL is the token-weighted mean of the bucket NLLs.
        mix = sum(v["buckets"][b]["nll"] * buckets[b]["val_tokens"] for b in example.BUCKETS)
        assert v["nll"] == pytest.approx(mix / corpus["val_target_tokens"], rel=1e-9)
    for name in names[1:]:
        ce = data["summary"]["ce"]["ppl"]["values"]
        other = data["summary"][name]["ppl"]["values"]
        diff = [a - b for a, b in zip(other, ce)]
        assert data["paired_vs_ce"][name]["ppl"]["mean"] == pytest.approx(sum(diff) / len(diff))


def test_quick_runs_train_and_the_weights_reach_the_loss(quick):
    _, data = quick
    vocab = data["corpus"]["vocab"]
    by = {(r["name"], r["seed"]): r for r in data["runs"]}
    for seed in data["config"]["seed_list"]:
        ce = by[("ce", seed)]
        # Same seed: every run starts from the same weights (the first curve point is the untrained model).
        assert len({by[(sp["name"], seed)]["val_curve"][0][1] for sp in data["config"]["runs"]}) == 1
        start, end = ce["val_curve"][0][1], ce["val_curve"][-1][1]
        # Plain CE learns: well below the untrained model and below the uniform guess log(V).
        assert end < start - 0.5 and ce["val"]["nll"] < math.log(vocab) - 0.5
        cb = by[("cb_softmax", seed)]["val"]["buckets"]
        # Class-balanced weights move the model towards rare tokens: lower rare-token NLL, higher frequent-token
        # NLL than plain CE (both by a wide margin even in the quick run). Equal runs would mean unused weights.
        assert cb["rare"]["nll"] < ce["val"]["buckets"]["rare"]["nll"] - 0.2
        assert cb["frequent"]["nll"] > ce["val"]["buckets"]["frequent"]["nll"] + 0.2
    share = data["loss_weight_share"]
    assert share["ce"]["rare"] < share["cb_softmax"]["rare"]
    assert sum(share["cb_softmax"].values()) == pytest.approx(1.0)


def test_corpus_split_is_deterministic_and_by_file(example):
    a = example.load_corpus(200_000, 20.0)
    b = example.load_corpus(200_000, 20.0)
    assert a["fingerprint"] == b["fingerprint"] and a["names"] == b["names"]
    assert not set(a["names"]["train"]) & set(a["names"]["val"])
    assert all(not n.startswith(("site-packages/", "test/", "encodings/")) for n in a["names"]["train"])
    chars = sum(map(len, a["texts"]["train"])) + sum(map(len, a["texts"]["val"]))
    assert chars >= 200_000


def test_summarize_buckets_and_macro_accuracy(example):
    # Vocabulary 4: types 0, 1 frequent, 2 medium, 3 rare.
    bucket_of = torch.tensor([0, 0, 1, 2])
    ev = dict(nll=torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0], dtype=torch.float64),
              hit=torch.tensor([True, False, True, False, True]), target=torch.tensor([0, 0, 1, 2, 3]))
    s = example.summarize(ev, bucket_of, 4)
    assert s["nll"] == pytest.approx(3.2) and s["acc"] == pytest.approx(0.6)
    assert s["macro_acc"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert s["buckets"]["frequent"] == pytest.approx(dict(nll=2.0, acc=2 / 3, macro_acc=0.75))
    assert s["buckets"]["medium"] == pytest.approx(dict(nll=4.0, acc=0.0, macro_acc=0.0))
    assert s["buckets"]["rare"] == pytest.approx(dict(nll=6.0, acc=1.0, macro_acc=1.0))


def test_batch_order_and_schedule(example):
    a = example.batch_order(10, 7, 4, seed=3)
    assert a.shape == (7, 4) and torch.equal(a, example.batch_order(10, 7, 4, seed=3))
    assert sorted(a.flatten()[:10].tolist()) == list(range(10))  # the first epoch is a permutation
    assert not torch.equal(a, example.batch_order(10, 7, 4, seed=4))
    f = [example.lr_factor(s, 100, 10) for s in range(100)]
    assert f[9] == pytest.approx(1.0) and f[0] == pytest.approx(0.1) and 0.1 <= min(f[10:]) and f[-1] < 0.11


def test_help_documents_options(example, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--quick", "--out", "--seeds", "--beta", "--gamma", "--extra-betas", "--bucket-edges", "--threads"):
        assert opt in out
