"""Hugging Face causal LMs trained with a class-balanced token loss, never materialising the logits.

    from cbkernels.integrations.transformers import apply_class_balanced_loss
    counts = cb.ClassCounter.count(train_loader, model.config.vocab_size).counts   # token frequencies
    apply_class_balanced_loss(model, counts, loss_type="softmax_focal", beta=0.9999, gamma=1.0)
    Trainer(model=model, ...).train()                                              # nothing else changes

After ``apply_class_balanced_loss(model, ...)``, a forward pass **in training mode with labels** runs the model's
base (decoder) to its last hidden state and computes the loss with ``linear_cb_loss`` from that state and the
``lm_head`` weight (and bias, if any), chunk by chunk: the ``[tokens, vocab]`` logits are never held. The causal
shift is the model's own (token ``t`` predicts label ``t + 1``; ``shift_labels=`` is honoured), ``ignore_index``
is -100 as in ``transformers``, tied input/output embeddings receive their gradient through the shared weight, and
the Trainer's ``num_items_in_batch`` (gradient accumulation) becomes the loss's ``normalizer``. The returned output
has ``logits=None`` on that path. Every other call (eval mode, no labels, ``generate()``) runs the model's original
forward unchanged. ``remove_class_balanced_loss(model)`` restores the original forward.

Works with any ``*ForCausalLM`` whose ``base_model`` returns the last hidden state first and whose
``get_output_embeddings()`` is the ``lm_head`` linear layer (Llama, Qwen2, Mistral, GPT-2, Gemma 2, ...). Models
that transform the logits after ``lm_head`` get the same transform inside the fused kernels (SPEC section 10):
Gemma 2/3's ``config.final_logit_softcapping`` becomes ``softcap``, Cohere's ``config.logit_scale`` and Granite's
``1 / config.logits_scaling`` become ``logit_scale`` (for those model types only); such an attribute on another
model type, a model with both, or another post-head transform (``output_logit_scale``) is refused with a clear
error rather than trained on a different loss. Needs
``transformers`` (the ``hf`` extra); importing ``cbkernels`` never imports it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Optional

import torch
from torch import Tensor, nn

from ..linear_loss import LinearClassBalancedLoss

IGNORE_INDEX = -100  # transformers' label padding
_ATTR = "_cbkernels_loss"  # the criterion, kept outside the module tree (not in the model's state_dict)
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep")


def apply_class_balanced_loss(model: nn.Module, samples_per_class=None, *, loss_type: str = "softmax",
                              beta: float = 0.999, gamma: float = 0.5, weight: Optional[Tensor] = None,
                              label_smoothing: float = 0.0, chunk_size: Optional[int] = None,
                              backend: str = "auto", normalize: bool = True,
                              zero_count: str = "zero", z_loss: float = 0.0) -> LinearClassBalancedLoss:
    """Makes ``model`` (a ``*ForCausalLM``) train with a class-balanced loss over its vocabulary; returns the
    criterion (a ``LinearClassBalancedLoss``: ``reweight()`` it for deferred re-weighting).

    ``samples_per_class``: ``[V]`` token counts over the training set (``ClassCounter``), with ``beta``; or a
    precomputed ``weight`` ``[V]``; with neither, weights 1 (the model's own cross-entropy, fused). ``V`` is the
    number of rows of the ``lm_head`` weight. ``zero_count`` defaults to ``"zero"``: tokens never seen in training
    get weight 0. ``z_loss``: PaLM's z-loss (softmax losses). The other options are ``linear_cb_loss``'s; the
    model's own post-head logit transform is read from its config (see the module docstring).
    """
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"{type(model).__name__}: get_output_embeddings() must be the lm_head nn.Linear, got "
                        f"{type(lm_head).__name__}")
    transforms = dict(_logit_transforms(model), z_loss=z_loss)
    vocab = lm_head.weight.shape[0]
    if weight is not None:
        if samples_per_class is not None:
            raise ValueError("give samples_per_class (with beta) or a precomputed weight, not both")
        crit = LinearClassBalancedLoss(torch.ones(vocab), loss_type=loss_type, beta=0.0, gamma=gamma,
                                       label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX,
                                       chunk_size=chunk_size, backend=backend, **transforms)
        if weight.shape != (vocab,):
            raise ValueError(f"weight must have shape [V] = [{vocab}] (lm_head rows), got {tuple(weight.shape)}")
        crit.weight.copy_(weight.detach().float())
    else:
        counts = torch.ones(vocab) if samples_per_class is None else samples_per_class
        crit = LinearClassBalancedLoss(counts, loss_type=loss_type, beta=0.0 if samples_per_class is None else beta,
                                       gamma=gamma, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX,
                                       chunk_size=chunk_size, backend=backend, normalize=normalize,
                                       zero_count=zero_count, **transforms)
        if crit.weight.shape[0] != vocab:
            raise ValueError(f"samples_per_class has {crit.weight.shape[0]} classes but lm_head has V = {vocab} rows")
    remove_class_balanced_loss(model)
    model.__dict__[_ATTR] = crit
    original = model.forward

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        shift_labels = kwargs.get("shift_labels")
        if args or not self.training or (labels is None and shift_labels is None):
            return original(*args, **kwargs)
        return _fused_forward(self, self.__dict__[_ATTR], kwargs)

    # The original signature (with self: a bound method drops it): the Trainer keeps the batch keys the forward
    # names and passes num_items_in_batch only to a forward with **kwargs.
    forward.__signature__ = inspect.signature(original.__func__ if hasattr(original, "__func__") else original)
    model.forward = types.MethodType(forward, model)
    model.__dict__["_cbkernels_original_forward"] = original
    return crit


# The model types whose forward applies a config attribute to the logits after lm_head, and how (transformers'
# modeling files): a config attribute on another model type is not known to be applied, so it is refused.
_POST_HEAD = {
    "final_logit_softcapping": ("softcap", {"gemma2", "gemma3", "gemma3_text"}),  # cap * tanh(logits / cap)
    "logit_scale": ("logit_scale", {"cohere", "cohere2"}),  # logits * logit_scale
    "logits_scaling": ("logit_scale", {"granite", "granitemoe", "granitemoeshared", "granitemoehybrid"}),  # / scaling
}


def _logit_transforms(model: nn.Module) -> dict:
    """The model's post-``lm_head`` logit transform as ``linear_cb_loss`` options, or a ValueError."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    out = {}
    for attr, (option, model_types) in _POST_HEAD.items():
        v = getattr(config, attr, None)
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == (0.0 if option == "softcap"
                                                                                           else 1.0)):
            continue
        if model_type not in model_types:
            raise ValueError(f"{name} (model_type {model_type!r}) has config.{attr}={v!r}, which cbkernels only knows "
                             f"how to apply for {sorted(model_types)}; it would train a different loss than the "
                             "model's own")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{name}: config.{attr} must be a number > 0, got {v!r}")
        out[option] = float(v) if attr != "logits_scaling" else 1.0 / float(v)
    other = getattr(config, "output_logit_scale", None)
    if other not in (None, 1, 1.0):
        raise ValueError(f"{name} transforms its logits after lm_head (config.output_logit_scale={other}), which "
                         "the fused loss does not reproduce; it would train a different loss")
    if "softcap" in out and "logit_scale" in out:
        raise ValueError(f"{name} both softcaps (config.final_logit_softcapping) and scales its logits; their order "
                         "after lm_head is model-specific, so the fused loss refuses rather than guess")
    return out


def remove_class_balanced_loss(model: nn.Module) -> None:
    """Restores the forward that ``apply_class_balanced_loss`` replaced (nothing when it was not applied)."""
    if "_cbkernels_original_forward" in model.__dict__:
        del model.__dict__["forward"]
        del model.__dict__["_cbkernels_original_forward"]
        del model.__dict__[_ATTR]


def _fused_forward(model: nn.Module, crit: LinearClassBalancedLoss, kwargs: dict):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    labels = kwargs.get("labels")
    shift_labels = kwargs.get("shift_labels")
    normalizer = kwargs.get("num_items_in_batch")
    base_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_KWARGS}
    outputs = model.base_model(**base_kwargs)
    hidden = outputs[0]
    if shift_labels is None:
        # transformers' causal shift: position t predicts label t + 1, the last position predicts nothing.
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    lm_head = model.get_output_embeddings()
    if crit.weight.device != hidden.device:
        crit.to(hidden.device)
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.to(hidden.device)
    loss = crit(hidden, lm_head.weight, shift_labels.to(hidden.device), bias=lm_head.bias, normalizer=normalizer)
    fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"} if hasattr(outputs, "items") else {}
    out_cls = CausalLMOutputWithCrossAttentions if "cross_attentions" in fields else CausalLMOutputWithPast
    known = {f.name for f in dataclasses.fields(out_cls)}
    return out_cls(loss=loss, logits=None, **{k: v for k, v in fields.items() if k in known})
