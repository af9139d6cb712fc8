"""Public class-balanced losses (SPEC sections 3-8).

Data flows down once: public function -> validation and weight lookup -> ``CBLossFunction`` -> one
backend call -> kernel.

Shapes: ``logits`` ``[..., C]`` (float32 / float16 / bfloat16, or float64, any strides), ``target``
``logits.shape[:-1]`` (int64 / int32 class indices, ``ignore_index`` marks rows that count for
nothing). The loss is float32 (float64 for float64 logits): ``logits.shape[:-1]`` for
``reduction="none"``, a scalar otherwise. The gradient has the logits' dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _autograd
from . import _validation as V
from ._backends import resolve_backend
from ._opdefs import NO_TENSORS, WEIGHT_CLASS, loss_dtype
from .weights import ReweightMixin


def class_balanced_loss(
    logits: Tensor,
    target: Tensor,
    samples_per_class=None,
    *,
    loss_type: str = "focal",
    beta: float = 0.999,
    gamma: float = 0.5,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    normalizer=None,
    softcap: Optional[float] = None,
    logit_offset: Optional[Tensor] = None,
    target_margin: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    weight_mode: str = "sample",
):
    """Class-balanced loss of any ``loss_type`` ("softmax", "sigmoid", "focal", "softmax_focal").

    Per-sample weight ``a_i = w[target_i]`` with ``w = class_balanced_weights(samples_per_class, beta)``
    or the given ``weight`` (``[C]``); with neither, ``w = 1`` (the plain loss). Reductions: ``"mean"``
    divides by the number of non-ignored rows, ``"weighted_mean"`` by ``sum_i a_i``, ``"sum"``,
    ``"none"``. ``label_smoothing`` applies to ``"softmax"`` only; ``gamma`` to the focal losses.
    ``inplace_backward=True`` writes the gradient over the logits buffer (the logits are destroyed).
    ``normalizer`` (``reduction="mean"`` only; a number > 0 or a 0-d tensor on the logits' device): divide the sum by
    it instead of the number of counted rows (SPEC section 12): e.g. the counted rows of every micro-batch of one
    optimizer step (Hugging Face's ``num_items_in_batch``), or ``distributed_normalizer(...)`` under data parallel.

    Logit transforms (SPEC section 10), applied inside the kernel in this order, the gradient being the raw logits':
    ``softcap`` ``c > 0``: ``z <- c tanh(z / c)`` (Gemma 2); ``logit_offset`` ``[C]``: ``z_j <- z_j + o_j`` (logit
    adjustment, Balanced Softmax: ``cb.logit_adjustment``); ``target_margin`` ``[C]``: ``z_y <- z_y - m_y`` on the
    target only (LDAM: ``cb.ldam_margins``); ``logit_scale`` ``s > 0``: ``z <- s z``. The vectors: float
    ``[C]`` tensors on the logits' device with finite entries (checked on the CPU; a device-side assert on a GPU).
    ``z_loss`` (softmax losses, SPEC section 11): adds ``z_loss * lse(z')**2`` per counted row, not weighted by
    ``a_i`` (PaLM). ``return_z_loss=True`` returns ``(loss, z_term)``, ``z_term`` the z-loss part of ``loss`` under
    the same reduction, detached (for logging).

    Dense targets (SPEC section 9): ``target`` may be a floating tensor of the logits' shape holding per-class
    targets ``q_ij >= 0``: mixup / cutmix probability rows (timm's ``Mixup`` output, label smoothing included) or
    multi-hot rows for multi-label data. All four losses take them: softmax ``sum_j q'_ij (lse_i - z_ij)``
    (``q' = (1-eps) q + eps/C``), sigmoid ``sum_j [softplus(z_ij) - q_ij z_ij]``, focal with
    ``1 - pt = q sigmoid(-z) + (1-q) sigmoid(z)`` (torchvision's form), softmax focal
    ``sum_j q_ij (1-p_ij)^gamma (lse_i - z_ij)``. ``ignore_index`` does not apply (every row counts in ``"mean"``).
    float32 or the logits' dtype is read as it is (another floating dtype is converted to float32 first). On the
    CPU a NaN, a negative value or (sigmoid, focal) a value above 1 raises ``ValueError``; on a GPU the values are
    not checked (that would be a host sync) and a NaN propagates to its row's loss.
    ``weight_mode``: ``"sample"`` (the paper) multiplies row i by ``a_i = sum_j w_j q_ij / sum_j q_ij`` (1 for a
    row without mass; with class indices ``w[y_i]``); ``"class"`` multiplies each class term j by ``w_j`` instead
    (``F.cross_entropy(weight=w)`` with probability targets, and with class indices and ``label_smoothing``,
    ``reduction="weighted_mean"``: exactly ``F.cross_entropy(weight=w, label_smoothing=eps)``). ``"weighted_mean"``
    divides by ``sum_i a_i`` of the sample mode in both. Class indices with ``"class"`` where it differs from
    ``"sample"`` (sigmoid, focal, label smoothing) are computed by the torch backend.
    """
    spec = V.loss_spec(loss_type, gamma=gamma, label_smoothing=label_smoothing, ignore_index=ignore_index,
                       reduction=reduction, softcap=softcap, logit_scale=logit_scale, z_loss=z_loss,
                       return_z_loss=return_z_loss, weight_mode=weight_mode)
    V.check_backend(backend)
    dense = _check_tensors(logits, target, inplace_backward)
    w = V.class_weights(samples_per_class, weight, beta, logits.shape[-1], logits.device)
    tensors = V.logit_tensors(logit_offset, target_margin, logits.shape[-1], logits.device)
    return _call(logits, target, w, spec, backend, inplace_backward, normalizer, tensors, return_z_loss, dense)


def _check_tensors(logits: Tensor, target: Tensor, inplace_backward: bool) -> bool:
    dense = V.check_logits_target(logits, target)
    if inplace_backward and logits.requires_grad:
        V.check_inplace(logits)
    return dense


def _call(logits: Tensor, target: Tensor, w: Tensor, spec, backend: str, inplace_backward: bool,
          normalizer, tensors=NO_TENSORS, return_z_loss: bool = False, dense: bool = False):
    """The checked call: the normaliser's scale, the backend, the one differentiable op."""
    scale = V.normalizer_scale(normalizer, spec.reduction, logits.device, loss_dtype(logits.dtype))
    if dense:
        target = V.dense_target(target, logits)
    elif spec.weight_mode == WEIGHT_CLASS:
        spec = V.index_class_spec(spec)
        if spec.weight_mode == WEIGHT_CLASS:
            backend = "torch"  # class indices weighted per class: the torch backend's one-hot rows, a chunk at a time
    return _autograd.class_balanced_loss(logits, target, w, resolve_backend(backend, logits.device), spec,
                                         inplace_backward, scale, tensors, return_z_loss)


def cb_softmax_cross_entropy(logits, target, samples_per_class=None, *, beta=0.999, weight=None,
                             reduction="mean", ignore_index=-100, label_smoothing=0.0,
                             inplace_backward=False, backend="auto", normalizer=None, softcap=None,
                             logit_offset=None, target_margin=None, logit_scale=1.0, z_loss=0.0,
                             return_z_loss=False, weight_mode="sample"):
    """Class-balanced softmax cross-entropy ``a_i [(1-eps)(lse_i - z_iy) + eps/C sum_j (lse_i - z_ij)]``.

    See ``class_balanced_loss`` for the arguments; SPEC sections 3-5 and 10-11 for the formulas.
    """
    return class_balanced_loss(logits, target, samples_per_class, loss_type="softmax", beta=beta, weight=weight,
                               reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               inplace_backward=inplace_backward, backend=backend, normalizer=normalizer,
                               softcap=softcap, logit_offset=logit_offset, target_margin=target_margin,
                               logit_scale=logit_scale, z_loss=z_loss, return_z_loss=return_z_loss,
                               weight_mode=weight_mode)


def cb_sigmoid_cross_entropy(logits, target, samples_per_class=None, *, beta=0.999, weight=None,
                             reduction="mean", ignore_index=-100, inplace_backward=False,
                             backend="auto", normalizer=None, softcap=None, logit_offset=None,
                             target_margin=None, logit_scale=1.0, weight_mode="sample") -> Tensor:
    """Class-balanced sigmoid cross-entropy ``a_i sum_j [softplus(z_ij) - t_ij z_ij]`` (one-vs-all).

    See ``class_balanced_loss`` for the arguments (the z-loss is for the softmax losses).
    """
    return class_balanced_loss(logits, target, samples_per_class, loss_type="sigmoid", beta=beta, weight=weight,
                               reduction=reduction, ignore_index=ignore_index,
                               inplace_backward=inplace_backward, backend=backend, normalizer=normalizer,
                               softcap=softcap, logit_offset=logit_offset, target_margin=target_margin,
                               logit_scale=logit_scale, weight_mode=weight_mode)


def cb_focal(logits, target, samples_per_class=None, *, beta=0.999, gamma=0.5, weight=None,
             reduction="mean", ignore_index=-100, inplace_backward=False, backend="auto", normalizer=None,
             softcap=None, logit_offset=None, target_margin=None, logit_scale=1.0, weight_mode="sample") -> Tensor:
    """The paper's CB_focal: ``a_i sum_j m_ij [softplus(z_ij) - t_ij z_ij]``, sigmoid focal modulator
    ``m_ij = (1-p)^gamma`` on the target and ``p^gamma`` elsewhere, ``p = sigmoid(z_ij)``.

    See ``class_balanced_loss`` for the arguments (the z-loss is for the softmax losses).
    """
    return class_balanced_loss(logits, target, samples_per_class, loss_type="focal", beta=beta, gamma=gamma,
                               weight=weight, reduction=reduction, ignore_index=ignore_index,
                               inplace_backward=inplace_backward, backend=backend, normalizer=normalizer,
                               softcap=softcap, logit_offset=logit_offset, target_margin=target_margin,
                               logit_scale=logit_scale, weight_mode=weight_mode)


def cb_softmax_focal(logits, target, samples_per_class=None, *, beta=0.999, gamma=0.5, weight=None,
                     reduction="mean", ignore_index=-100, inplace_backward=False, backend="auto",
                     normalizer=None, softcap=None, logit_offset=None, target_margin=None, logit_scale=1.0,
                     z_loss=0.0, return_z_loss=False, weight_mode="sample"):
    """Class-balanced softmax focal loss ``a_i (1 - P_i)^gamma (lse_i - z_iy)``, ``P_i = softmax(z_i)_y``.

    See ``class_balanced_loss`` for the arguments.
    """
    return class_balanced_loss(logits, target, samples_per_class, loss_type="softmax_focal", beta=beta,
                               gamma=gamma, weight=weight, reduction=reduction, ignore_index=ignore_index,
                               inplace_backward=inplace_backward, backend=backend, normalizer=normalizer,
                               softcap=softcap, logit_offset=logit_offset, target_margin=target_margin,
                               logit_scale=logit_scale, z_loss=z_loss, return_z_loss=return_z_loss,
                               weight_mode=weight_mode)


def _on(v, device):
    """A module's transform vector on its weight's device (the counts decide where the module starts)."""
    return v.to(device) if isinstance(v, Tensor) else v


class ClassBalancedLoss(ReweightMixin, nn.Module):
    """Module form of ``class_balanced_loss``: the class weights are computed once (float64, stored
    float32) and kept as a buffer ``weight`` that moves with ``.to(device)``; ``reweight(counts, beta=...)``
    recomputes them in place. ``loss = crit(logits, target, normalizer=None)``.

    Args:
        samples_per_class: ``[C]`` counts over the whole training set.
        loss_type, beta, gamma, reduction, ignore_index, label_smoothing, backend: as in
            ``class_balanced_loss``.
        normalize, zero_count: as in ``class_balanced_weights``.
        softcap, logit_offset, target_margin, logit_scale, z_loss, return_z_loss: the logit transforms and the
            z-loss, as in ``class_balanced_loss``; the two vectors are kept as buffers (``logit_offset``,
            ``target_margin``, None when not given) that move with the module.
        weight_mode: ``"sample"`` or ``"class"``, for dense targets (SPEC section 9), as in ``class_balanced_loss``.
            ``target`` may be class indices or a floating tensor of the logits' shape.
    """

    def __init__(self, samples_per_class, loss_type: str = "focal", beta: float = 0.999, gamma: float = 0.5,
                 reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 backend: str = "auto", *, normalize: bool = True, zero_count: str = "error",
                 inplace_backward: bool = False, softcap: Optional[float] = None,
                 logit_offset: Optional[Tensor] = None, target_margin: Optional[Tensor] = None,
                 logit_scale: float = 1.0, z_loss: float = 0.0, return_z_loss: bool = False,
                 weight_mode: str = "sample"):
        super().__init__()
        # checked now; forward builds the spec from the attributes as they are then
        V.loss_spec(loss_type, gamma=gamma, label_smoothing=label_smoothing, ignore_index=ignore_index,
                    reduction=reduction, softcap=softcap, logit_scale=logit_scale, z_loss=z_loss,
                    return_z_loss=return_z_loss, weight_mode=weight_mode)
        V.check_backend(backend)
        self.register_buffer("weight", self._init_counts(samples_per_class, beta, normalize, zero_count))
        c = self.weight.shape[0]
        dev = self.weight.device
        self.register_buffer("logit_offset", V.class_vector("logit_offset", _on(logit_offset, dev), c, dev))
        self.register_buffer("target_margin", V.class_vector("target_margin", _on(target_margin, dev), c, dev))
        self.loss_type, self.beta, self.gamma = loss_type, beta, gamma
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.backend, self.inplace_backward = backend, inplace_backward
        self.softcap, self.logit_scale, self.z_loss, self.return_z_loss = softcap, logit_scale, z_loss, return_z_loss
        self.weight_mode = weight_mode
        self._spec_key = None  # (options) the cached spec was built from; see forward
        self._spec = None

    def forward(self, logits: Tensor, target: Tensor, normalizer=None):
        # The spec is rebuilt (and the options checked) only when an option attribute changed since the last call.
        key = (self.loss_type, self.gamma, self.reduction, self.ignore_index, self.label_smoothing, self.backend,
               getattr(self, "softcap", None), getattr(self, "logit_scale", 1.0), getattr(self, "z_loss", 0.0),
               getattr(self, "return_z_loss", False), getattr(self, "weight_mode", "sample"))
        if key != getattr(self, "_spec_key", None):  # (absent on a module pickled before it existed)
            spec = V.loss_spec(self.loss_type, gamma=self.gamma, label_smoothing=self.label_smoothing,
                               ignore_index=self.ignore_index, reduction=self.reduction, softcap=key[6],
                               logit_scale=key[7], z_loss=key[8], return_z_loss=key[9], weight_mode=key[10])
            V.check_backend(self.backend)
            self._spec, self._spec_key = spec, key
        # The options were checked when the spec was built: the tensors' checks, in class_balanced_loss's order.
        dense = _check_tensors(logits, target, self.inplace_backward)
        w = V.given_weight(self.weight, logits.shape[-1], logits.device)
        offset, margin = getattr(self, "logit_offset", None), getattr(self, "target_margin", None)
        tensors = NO_TENSORS
        if offset is not None or margin is not None:
            tensors = self._checked_vectors(offset, margin, logits)
        return _call(logits, target, w, self._spec, self.backend, self.inplace_backward, normalizer, tensors,
                     self._spec_key[9], dense)

    def _checked_vectors(self, offset, margin, logits: Tensor):
        """The buffers as the kernels read them, checked again only after they changed: on a GPU the finiteness
        check is a launch per call. The cache holds the buffers themselves (compared by identity, so a replaced one
        is never mistaken for the old) and their version counters (bumped by every in-place write); inference
        tensors have none and are checked on every call."""
        if torch.compiler.is_compiling():
            return V.logit_tensors(offset, margin, logits.shape[-1], logits.device)
        try:
            versions = tuple(None if v is None else v._version for v in (offset, margin))
        except RuntimeError:  # an inference tensor: no version counter
            return V.logit_tensors(offset, margin, logits.shape[-1], logits.device)
        key = (versions, logits.shape[-1], logits.device)
        cached = self.__dict__.get("_vectors_cache")
        if cached is None or cached[0] is not offset or cached[1] is not margin or cached[2] != key:
            tensors = V.logit_tensors(offset, margin, logits.shape[-1], logits.device)
            self.__dict__["_vectors_cache"] = cached = (offset, margin, key, tensors)
        return cached[3]

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("softcap", getattr(self, "softcap", None)),
                                                      ("logit_scale", getattr(self, "logit_scale", 1.0)),
                                                      ("z_loss", getattr(self, "z_loss", 0.0)),
                                                      ("weight_mode", getattr(self, "weight_mode", "sample")))
                        if v not in (None, 1.0, 0.0, "sample"))
        for name in ("logit_offset", "target_margin"):
            if getattr(self, name, None) is not None:
                extra += f", {name}=[{self.weight.shape[0]}]"
        return (f"loss_type={self.loss_type!r}, num_classes={self.weight.shape[0]}, beta={self.beta}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}{extra}")
