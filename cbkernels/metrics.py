"""Long-tail evaluation metrics: per-class accuracy, balanced accuracy and the many / medium / few-shot split.

The split is the one of the long-tailed ImageNet-LT / Places-LT / iNaturalist papers (Liu et al., CVPR 2019; Kang et
al., ICLR 2020): a class is *many-shot* with more than ``many`` (100) training samples, *few-shot* with fewer than
``few`` (20), *medium-shot* otherwise, and a group's accuracy is the mean of its classes' accuracies (their recall:
on a balanced test set, the accuracy over the group's test samples).

Everything is computed on the device of the predictions, from class predictions (integer ``[...]``) or scores
(floating ``[..., C]``: logits, probabilities; the prediction is the arg-max), with no host sync on an accelerator:

- ``per_class_accuracy``, ``balanced_accuracy`` (``sklearn.metrics.balanced_accuracy_score``: the mean recall of
  the classes present in ``target``), ``shot_groups``, ``shot_accuracy``: one batch;
- ``LongTailAccuracy``: the same, streaming (``update`` per batch, ``compute`` at the end, like ``torchmetrics``),
  an ``nn.Module`` whose counts are buffers (``.to(device)``, ``state_dict``) and ``all_reduce`` over ranks.

``compute`` returns float64 tensors; a class without test samples has accuracy NaN and is left out of every mean;
a mean over no class is NaN.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ._torch_stages import check_targets
from .training import INDEX_DTYPES, _world
from .weights import Counts, _counts_tensor

SHOTS = ("many", "medium", "few")


def _thresholds(many, few) -> tuple[float, float]:
    for name, v in (("many", many), ("few", few)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
            raise TypeError(f"{name} must be a number (a training-sample count), got {v!r}")
    if few > many:
        raise ValueError(f"few ({few}) must be <= many ({many}): a class cannot be few-shot and many-shot")
    return float(many), float(few)


def shot_groups(samples_per_class: Counts, many: float = 100, few: float = 20) -> Tensor:
    """The shot group of each class from its training count: ``0`` many-shot (``n > many``), ``1`` medium-shot
    (``few <= n <= many``), ``2`` few-shot (``n < few``). int64 ``[C]`` on the device of ``samples_per_class``
    (a tensor) or the CPU."""
    many, few = _thresholds(many, few)
    n = _counts_tensor(samples_per_class)
    groups = torch.where(n > many, 0, torch.where(n < few, 2, 1)).to(torch.int64)
    return groups.to(samples_per_class.device) if isinstance(samples_per_class, Tensor) else groups


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return int(num_classes)


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return int(ignore_index)


def _hits(input: Tensor, target: Tensor, num_classes: Optional[int], ignore_index: int):
    """``(target [N] int64 with ignored rows at 0, counted [N] bool, hit [N] bool, C)`` from one batch."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor (scores [..., C] or predictions [...]), got "
                        f"{type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")
    if input.is_floating_point():
        if input.dim() < 1 or input.shape[:-1] != target.shape:
            raise ValueError(f"scores must have shape target.shape + [C] = {list(target.shape)} + [C], got "
                             f"{list(input.shape)}")
        c = input.shape[-1]
        if c == 0:
            raise ValueError("scores have 0 classes (last dim is empty)")
        if num_classes is not None and _check_num_classes(num_classes) != c:
            raise ValueError(f"scores have {c} classes (last dim) but num_classes is {num_classes}")
        pred = input.argmax(-1).reshape(-1)
    elif input.dtype in INDEX_DTYPES:
        if input.shape != target.shape:
            raise ValueError(f"predictions must have the target's shape {list(target.shape)}, got "
                             f"{list(input.shape)}")
        if num_classes is None:
            raise ValueError("num_classes is required with integer predictions (with scores it is their last dim)")
        c = _check_num_classes(num_classes)
        pred = input.reshape(-1)
        bad = (pred < 0) | (pred >= c)
        if pred.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(bad.any()):
                raise ValueError(f"predictions hold {pred[bad][0].item()}, outside [0, {c})")
        else:  # as check_targets: a device-side assert, no host sync
            torch._assert_async(~bad.any(), "cbkernels.metrics: a prediction outside [0, C)")
    else:
        raise TypeError(f"input must be floating scores [..., C] or integer predictions, got {input.dtype}")
    ignore_index = _check_ignore_index(ignore_index)
    t = target.reshape(-1).long()
    check_targets(t, c, ignore_index)
    counted = t != ignore_index
    t = torch.where(counted, t, torch.zeros_like(t))
    return t, counted, counted & (pred == t), c


def _accuracies(correct: Tensor, total: Tensor) -> Tensor:
    """float64 per-class accuracy, NaN where a class has no sample."""
    nan = torch.full_like(total, float("nan"), dtype=torch.float64)
    return torch.where(total > 0, correct.double() / total.clamp(min=1).double(), nan)


def _mean_present(acc: Tensor, select: Optional[Tensor] = None) -> Tensor:
    """Mean of the non-NaN entries of ``acc`` (where ``select``), NaN when there is none (0-d, no host sync)."""
    keep = ~torch.isnan(acc)
    if select is not None:
        keep = keep & select
    n = keep.sum()
    total = torch.where(keep, acc, torch.zeros_like(acc)).sum()
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


def _counts(input, target, num_classes, ignore_index):
    t, counted, hit, c = _hits(input, target, num_classes, ignore_index)
    total = torch.zeros(c, dtype=torch.int64, device=t.device).index_add_(0, t, counted.long())
    correct = torch.zeros(c, dtype=torch.int64, device=t.device).index_add_(0, t, hit.long())
    return correct, total


def per_class_accuracy(input: Tensor, target: Tensor, num_classes: Optional[int] = None, *,
                       ignore_index: int = -100) -> Tensor:
    """Accuracy (recall) of each class over the samples whose target it is: float64 ``[C]``, NaN for a class absent
    from ``target``. ``input``: scores ``[..., C]`` (arg-max) or integer predictions of ``target``'s shape (then
    ``num_classes`` is required). Rows whose target is ``ignore_index`` are skipped."""
    return _accuracies(*_counts(input, target, num_classes, ignore_index))


def balanced_accuracy(input: Tensor, target: Tensor, num_classes: Optional[int] = None, *,
                      ignore_index: int = -100) -> Tensor:
    """Mean per-class accuracy over the classes present in ``target`` (``sklearn.metrics.balanced_accuracy_score``);
    0-d float64, NaN when no row is counted."""
    return _mean_present(per_class_accuracy(input, target, num_classes, ignore_index=ignore_index))


def shot_accuracy(input: Tensor, target: Tensor, samples_per_class: Counts, *, many: float = 100, few: float = 20,
                  ignore_index: int = -100) -> dict[str, Tensor]:
    """``{"many", "medium", "few"}``: the mean per-class accuracy of each shot group (``shot_groups``), over its
    classes present in ``target``; NaN for a group with none. ``samples_per_class``: the training counts ``[C]``,
    read on the host (a device tensor is copied: one sync per call; ``LongTailAccuracy`` reads them once)."""
    groups = shot_groups(samples_per_class, many, few)
    acc = per_class_accuracy(input, target, groups.shape[0], ignore_index=ignore_index)
    groups = groups.to(acc.device)
    return {name: _mean_present(acc, groups == g) for g, name in enumerate(SHOTS)}


class LongTailAccuracy(nn.Module):
    """Streaming long-tail accuracy: ``update(input, target)`` per batch, ``compute()`` at the end.

    Args:
        num_classes: ``C``.
        samples_per_class: the training counts ``[C]`` (e.g. ``ClassCounter(...).counts``) for the shot split;
            without them ``compute`` has no ``many`` / ``medium`` / ``few`` entries.
        many, few: the split's thresholds (``shot_groups``): many-shot ``n > many``, few-shot ``n < few``.
        ignore_index: targets skipped.
        device: where the counts live (``update``'s tensors must be there; ``.to()`` moves them).

    ``update`` takes scores ``[..., C]`` (the arg-max is the prediction) or integer predictions of ``target``'s
    shape; it adds to the int64 buffers ``correct`` and ``total`` (``[C]``) on the device, without a host sync.
    ``compute()`` returns float64 tensors: ``accuracy`` (over all counted samples), ``balanced_accuracy`` (mean
    per-class accuracy over the classes seen), ``per_class_accuracy`` ``[C]`` (NaN for a class never seen),
    ``support`` ``[C]`` (int64, samples per class) and, with ``samples_per_class``, ``many``, ``medium``, ``few``.
    ``all_reduce(group)`` sums the counts over ranks in place; ``reset()`` zeroes them. Keep the metric out of a
    ``DistributedDataParallel``-wrapped model: DDP broadcasts a module's buffers from rank 0 and would overwrite
    the other ranks' counts. A NaN score is read as ``argmax`` reads it (the NaN's class is the prediction).
    """

    def __init__(self, num_classes: int, samples_per_class: Optional[Counts] = None, *, many: float = 100,
                 few: float = 20, ignore_index: int = -100, device=None):
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.many, self.few = _thresholds(many, few)
        self.register_buffer("correct", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.register_buffer("total", torch.zeros(num_classes, dtype=torch.int64, device=device))
        groups = None
        if samples_per_class is not None:
            groups = shot_groups(samples_per_class, many, few)
            if groups.shape[0] != num_classes:
                raise ValueError(f"samples_per_class has {groups.shape[0]} classes but num_classes is {num_classes}")
            groups = groups.to(self.correct.device)
        # Not saved: the split follows from the constructor's arguments (a checkpoint of the counts loads into a
        # metric with or without one, and never replaces the thresholds it was built with).
        self.register_buffer("groups", groups, persistent=False)

    @torch.no_grad()
    def update(self, input: Tensor, target: Tensor) -> "LongTailAccuracy":
        """Adds one batch; returns the metric."""
        if isinstance(input, Tensor) and input.device != self.correct.device:
            raise ValueError(f"input is on {input.device} but the metric is on {self.correct.device}")
        t, counted, hit, _ = _hits(input, target, self.num_classes, self.ignore_index)
        self.total.index_add_(0, t, counted.long())
        self.correct.index_add_(0, t, hit.long())
        return self

    @torch.no_grad()
    def compute(self) -> dict[str, Tensor]:
        acc = _accuracies(self.correct, self.total)
        n = self.total.sum()
        out = {
            "accuracy": torch.where(n > 0, self.correct.sum().double() / n.clamp(min=1).double(),
                                    torch.full((), float("nan"), dtype=torch.float64, device=n.device)),
            "balanced_accuracy": _mean_present(acc),
            "per_class_accuracy": acc,
            "support": self.total.clone(),
        }
        if self.groups is not None:
            out.update({name: _mean_present(acc, self.groups == g) for g, name in enumerate(SHOTS)})
        return out

    @torch.no_grad()
    def all_reduce(self, group=None) -> "LongTailAccuracy":
        """Sums the counts over the ranks of ``group`` in place (a collective: every rank calls it)."""
        if _world(group) > 1:
            import torch.distributed as dist

            dist.all_reduce(self.correct, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(self.total, op=dist.ReduceOp.SUM, group=group)
        return self

    @torch.no_grad()
    def reset(self) -> "LongTailAccuracy":
        self.correct.zero_()
        self.total.zero_()
        return self

    def extra_repr(self) -> str:
        split = f", many={self.many:g}, few={self.few:g}" if self.groups is not None else ""
        return f"num_classes={self.num_classes}{split}, ignore_index={self.ignore_index}"
