"""cbkernels.integrations.transformers on tiny causal LMs built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import cbkernels as cb

transformers = pytest.importorskip("transformers")
from cbkernels.integrations.transformers import (  # noqa: E402
    apply_class_balanced_loss,
    remove_class_balanced_loss,
)

V = 96


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 ties lm_head to the input embedding
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _gemma2():
    # Gemma 2 softcaps its final logits (final_logit_softcapping): the fused loss applies the same softcap.
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=3.0,
                                    attn_logit_softcapping=None)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits well beyond the cap, so that the softcap matters
        model.get_output_embeddings().weight.mul_(40.0)
    return model


MODELS = {"llama": _llama, "gpt2": _gpt2, "gemma2": _gemma2}


def _batch(seed=0, b=3, t=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[2, 11:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    return ids, labels, mask


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=2e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a.loss.detach(), loss_b.loss.detach(), rtol=rtol, atol=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=1e-5 * scale + 1e-9, msg=name)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("num_items", [None, 23])
def test_unit_weights_softmax_equals_the_models_own_loss(arch, num_items):
    ref_model = MODELS[arch]()
    ref_model.train()
    ids, labels, mask = _batch()
    kw = dict(input_ids=ids, labels=labels, attention_mask=mask)
    if num_items is not None:
        kw["num_items_in_batch"] = torch.tensor(num_items)
    ref = _loss_and_grads(ref_model, **kw)
    model = copy.deepcopy(ref_model)
    apply_class_balanced_loss(model, loss_type="softmax")  # no counts: weights 1
    ours = _loss_and_grads(model, **kw)
    assert ours[0].logits is None and ref[0].logits is not None  # the fused path never made the logits
    _assert_same(ours, ref)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("loss_type", ["softmax", "focal", "softmax_focal"])
def test_class_balanced_weights_equal_a_materialised_reference(arch, loss_type):
    model = MODELS[arch]()
    model.train()
    ids, labels, mask = _batch(seed=1)
    counts = torch.randint(0, 1000, (V,), generator=torch.Generator().manual_seed(2))
    kw = dict(gamma=1.5) if "focal" in loss_type else {}
    ref_model = copy.deepcopy(model)
    ref_model.zero_grad()
    logits = ref_model(input_ids=ids, attention_mask=mask).logits
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    weight = cb.class_balanced_weights(counts, beta=0.999, zero_count="zero")
    ref_loss = cb.class_balanced_loss(logits.float(), shift, loss_type=loss_type, weight=weight, backend="torch",
                                      **kw)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}
    apply_class_balanced_loss(model, counts, loss_type=loss_type, beta=0.999, **kw)
    out, grads = _loss_and_grads(model, input_ids=ids, labels=labels, attention_mask=mask)
    _assert_same((out, grads), (type("O", (), {"loss": ref_loss})(), ref_grads))


def test_eval_generate_and_removal_are_unchanged():
    model = _llama()
    ids, labels, mask = _batch(seed=3)
    model.eval()
    before = model(input_ids=ids, labels=labels, attention_mask=mask)
    gen_before = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    crit = apply_class_balanced_loss(model, torch.arange(1, V + 1), loss_type="focal")
    assert "_cbkernels_loss" not in dict(model.named_modules()) and all("cbkernels" not in k for k in
                                                                        model.state_dict())
    after = model(input_ids=ids, labels=labels, attention_mask=mask)  # eval mode: the original forward
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
    assert torch.equal(model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False), gen_before)
    model.train()
    assert model(input_ids=ids, labels=labels, attention_mask=mask).logits is None
    assert model(input_ids=ids, attention_mask=mask).logits is not None  # no labels: the original forward
    crit.reweight(beta=0.0)
    remove_class_balanced_loss(model)
    assert model(input_ids=ids, labels=labels, attention_mask=mask).logits is not None


def test_softcap_and_z_loss_reach_the_criterion():
    model = _gemma2()
    crit = apply_class_balanced_loss(model, z_loss=1e-3)
    assert crit.softcap == 3.0 and crit.z_loss == 1e-3
    model.train()
    ids, labels, mask = _batch(seed=4)
    ref_model = _gemma2()
    logits = ref_model(input_ids=ids, attention_mask=mask).logits  # already softcapped by the model
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = shift != -100
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift.flatten()) + 1e-3 * (
        torch.logsumexp(logits[keep], dim=-1) ** 2).mean()
    out = model(input_ids=ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(out.loss, ref, rtol=2e-5, atol=1e-6)


def test_refuses_models_that_transform_their_logits():
    model = _llama()
    model.config.output_logit_scale = 2.0
    with pytest.raises(ValueError, match="output_logit_scale"):
        apply_class_balanced_loss(model)
    model = _llama()  # a softcap attribute on a model type whose forward is not known to apply it
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_class_balanced_loss(model)
    model = _gemma2()
    model.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping must be a number > 0"):
        apply_class_balanced_loss(model)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, t=12, seed=4):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, t), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):  # uneven numbers of trained tokens per example: accumulation must weigh them right
            self.labels[i, : (i * 5) % 9] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train(tmp_path, batch, accumulation, steps=4):
    model = _llama()
    counts = torch.randint(1, 100, (V,), generator=torch.Generator().manual_seed(5))
    apply_class_balanced_loss(model, counts, loss_type="softmax_focal", beta=0.99, gamma=1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=3e-3, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant",
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_trainer_with_gradient_accumulation_matches_one_big_batch(tmp_path):
    a, losses_a = _train(tmp_path, batch=2, accumulation=2)
    b, losses_b = _train(tmp_path, batch=4, accumulation=1)
    assert losses_a[-1] < losses_a[0]  # it trains
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-4, atol=2e-6, msg=name)


def test_import_cbkernels_does_not_import_transformers():
    code = "import sys, cbkernels; assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_hf_step_benchmark_script_runs(tmp_path):
    """benchmarks/bench_hf.py --quick end to end (its figures are for the README, never asserted here)."""
    from benchmarks import bench_hf

    assert bench_hf.main(["--quick", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("hf_step_cpu_fp32_quick.md")
    text = md.read_text()
    assert all(f"| {p} |" in text for p in bench_hf.PROVIDERS)
