"""Training-loop pieces around the losses (SPEC sections 12-13): the data-parallel normaliser and running class counts.

- ``distributed_normalizer(target)``: the ``normalizer`` that makes every rank's ``reduction="mean"`` loss average,
  under DDP's gradient averaging, to exactly the mean over the whole global batch, whatever the number of ignored
  rows on each rank. The count is all-reduced on the device: no host sync.
- ``ClassCounter``: ``bincount`` of targets accumulated on the device (int64, ``ignore_index`` skipped), all-reduced
  across a process group, saved and loaded with a ``state_dict``; ``ClassCounter.count(loader, C)`` counts a whole
  ``DataLoader`` (or any iterable of batches) with a progress line on stderr.

Both feed the loss modules: ``ClassBalancedLoss.reweight(counter.counts, beta=...)`` recomputes the weights in place.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ._torch_stages import check_targets

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _world(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def distributed_normalizer(target: Tensor, ignore_index: int = -100, group=None) -> Tensor:
    """The ``normalizer`` for an exact global mean under data parallel (SPEC section 12).

    Every rank passes its own ``target`` (index targets, any shape); the valid rows (``target != ignore_index``)
    are counted on the device and all-reduced over ``group`` (the default group; no process group: this process
    alone). Returns the 0-d float64 tensor ``max(1, global_valid) / world_size``: with it each rank's loss is
    ``sum_local / normalizer``, and DDP's averaging of the ranks' gradients (a division by ``world_size``) gives
    ``sum_global / global_valid``, the single-process mean of the whole batch, even when the ranks hold different
    numbers of ignored rows (where the plain per-rank mean is biased towards the ranks with fewer). Call it on
    every rank (it is a collective).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    count = (target != ignore_index).sum(dtype=torch.int64).reshape(())
    world = _world(group)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count.clamp(min=1).to(torch.float64) / world


class ClassCounter(nn.Module):
    """Running class counts of targets (SPEC section 13): ``counts`` ``[C]`` int64 on the counter's device.

    ``update(target)`` takes index targets (any integer dtype and shape; ``ignore_index`` rows are skipped; a value
    outside ``[0, C)`` raises ``IndexError`` on the CPU and fails a device assert on a GPU) or multi-hot targets
    (floating ``[..., C]`` of 0s and 1s: each row adds its positives). Everything stays on the device, with no host
    sync. ``all_reduce(group)`` sums the counts over ranks in place; ``state_dict()`` / ``load_state_dict()`` save
    and restore them (the counts are a buffer); ``reset()`` zeroes them.
    """

    def __init__(self, num_classes: int, ignore_index: int = -100, device=None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, target: Tensor) -> "ClassCounter":
        """Adds the classes of ``target`` to the counts; returns the counter."""
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if target.device != self.counts.device:
            raise ValueError(f"target is on {target.device} but the counter is on {self.counts.device}")
        c = self.num_classes
        if target.is_floating_point():
            if target.dim() < 1 or target.shape[-1] != c:
                raise ValueError(f"a dense (multi-hot) target must have shape [..., C] = [..., {c}], got "
                                 f"{tuple(target.shape)}")
            rows = target.reshape(-1, c)
            if rows.device.type == "cpu" and not bool(((rows == 0) | (rows == 1)).all()):
                raise ValueError("a dense target must be multi-hot (0s and 1s): soft probability rows have no "
                                 "integer count; count the index targets they were mixed from")
            self.counts += (rows > 0).sum(0, dtype=torch.int64)
            return self
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(f"target must hold integer class indices or multi-hot floats, got {target.dtype}")
        t = target.reshape(-1).long()
        check_targets(t, c, self.ignore_index)  # the losses' check and error: IndexError on the CPU, else an assert
        keep = (t != self.ignore_index) & (t >= 0) & (t < c)  # a bad row (already asserted) never indexes
        # index_add_ over every row (ignored ones add 0 at class 0): no boolean indexing, so no host sync.
        self.counts.index_add_(0, torch.where(keep, t, torch.zeros_like(t)), keep.to(torch.int64))
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "ClassCounter":
        """Sums the counts over the ranks of ``group`` in place (a collective: every rank calls it)."""
        if _world(group) > 1:
            import torch.distributed as dist

            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    @torch.no_grad()
    def reset(self) -> "ClassCounter":
        self.counts.zero_()
        return self

    @classmethod
    def count(cls, batches: Iterable, num_classes: int, *, ignore_index: int = -100, device=None,
              target_of: Optional[Callable] = None, progress: bool = True) -> "ClassCounter":
        """A counter over every target of ``batches`` (a ``DataLoader`` or any iterable), in one pass.

        A batch's target is ``target_of(batch)`` when given; otherwise the batch itself when it is a tensor, its
        ``"labels"`` / ``"label"`` / ``"target"`` entry when it is a mapping, else its second element (``(inputs,
        target, ...)``). Targets are moved to ``device`` (default: the first target's). ``progress`` prints a
        line on stderr at most twice a second and a summary at the end.
        """
        counter = None
        t0 = last = time.monotonic()
        n_batches = 0
        for batch in batches:
            target = target_of(batch) if target_of is not None else _target_of(batch)
            if counter is None:
                counter = cls(num_classes, ignore_index, device=device if device is not None else target.device)
            counter.update(target.to(counter.counts.device, non_blocking=True))
            n_batches += 1
            now = time.monotonic()
            if progress and now - last >= 0.5:
                last = now
                print(f"\rcbkernels: counted {n_batches} batches ({now - t0:.0f} s)", end="", file=sys.stderr,
                      flush=True)
        if counter is None:
            counter = cls(num_classes, ignore_index, device=device)
        if progress:
            total = int(counter.counts.sum())
            print(f"\rcbkernels: counted {n_batches} batches, {total} targets in {time.monotonic() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        return counter

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"


def _target_of(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("labels", "label", "target", "targets"):
            if key in batch:
                return batch[key]
        raise KeyError(f"a batch mapping needs a 'labels', 'label' or 'target' entry (or pass target_of); it has "
                       f"{sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(f"cannot find the target in a batch of type {type(batch).__name__}: pass target_of")
