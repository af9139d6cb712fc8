"""Class-balanced weights from the effective number of samples (SPEC section 1)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Counts = Union[Sequence[float], torch.Tensor, "numpy.ndarray"]  # noqa: F821

ZERO_COUNT_MODES = ("error", "zero")


def check_beta(beta: float) -> float:
    """Return ``beta`` as a float, or raise ``ValueError`` unless it lies in [0, 1)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        if isinstance(beta, torch.Tensor) and beta.numel() == 1:
            beta = beta.item()
        else:
            raise TypeError(f"beta must be a float in [0, 1), got {type(beta).__name__}")
    beta = float(beta)
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
    return beta


def _counts_tensor(samples_per_class: Counts) -> torch.Tensor:
    if isinstance(samples_per_class, torch.Tensor):
        n = samples_per_class.detach()
        if n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"samples_per_class must hold real counts, got dtype {n.dtype}")
        n = n.to(device="cpu", dtype=torch.float64)
    else:
        try:
            n = torch.as_tensor(samples_per_class, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"samples_per_class must be a 1-D sequence of counts: {exc}") from None
    if n.dim() != 1:
        raise ValueError(f"samples_per_class must be 1-D (one count per class), got shape {tuple(n.shape)}")
    if n.numel() == 0:
        raise ValueError("samples_per_class is empty: need at least one class")
    if not torch.isfinite(n).all():
        raise ValueError("samples_per_class holds a non-finite count")
    if (n < 0).any():
        bad = n[n < 0][0].item()
        raise ValueError(f"samples_per_class must be >= 0, got {bad:g}")
    return n


def effective_number(samples_per_class: Counts, beta: float) -> torch.Tensor:
    """Effective number of samples ``E_c = (1 - beta^n_c) / (1 - beta)`` per class.

    Args:
        samples_per_class: ``[C]`` non-negative counts (list, numpy array or tensor), counted over the
            whole training set.
        beta: in ``[0, 1)``.

    Returns:
        float64 ``[C]`` tensor on the CPU. ``E_c = 0`` for an empty class.
    """
    beta = check_beta(beta)
    n = _counts_tensor(samples_per_class)
    if beta == 0.0:
        return (n > 0).to(torch.float64)
    # log(beta) through log1p(beta - 1): beta - 1 is exact for beta >= 0.5, so beta^n keeps full
    # precision near beta -> 1 where 1 - beta^n would otherwise cancel.
    log_beta = math.log1p(beta - 1.0) if beta >= 0.5 else math.log(beta)
    return -torch.expm1(n * log_beta) / (1.0 - beta)


def class_balanced_weights(
    samples_per_class: Counts,
    beta: float = 0.999,
    normalize: bool = True,
    zero_count: str = "error",
) -> torch.Tensor:
    """Class-balanced weights ``w_c = (1 - beta) / (1 - beta^n_c)`` (SPEC section 1).

    Args:
        samples_per_class: ``[C]`` non-negative counts over the whole training set.
        beta: in ``[0, 1)``; 0 gives all ones, ``beta -> 1`` approaches inverse frequency.
        normalize: rescale so the weights of the non-empty classes sum to their number ``K``.
        zero_count: what to do with classes of count 0: ``"error"`` (default) raises ``ValueError``;
            ``"zero"`` gives them weight 0 and leaves them out of ``K``.

    Returns:
        float32 ``[C]`` tensor, on the device of ``samples_per_class`` when it is a tensor, else the CPU.
        Computed in float64.
    """
    if zero_count not in ZERO_COUNT_MODES:
        raise ValueError(f"zero_count must be one of {ZERO_COUNT_MODES}, got {zero_count!r}")
    beta = check_beta(beta)
    n = _counts_tensor(samples_per_class)
    empty = n == 0
    n_empty = int(empty.sum())
    if n_empty and zero_count == "error":
        raise ValueError(
            f"samples_per_class has {n_empty} empty class(es) (count 0), whose class-balanced weight is "
            "1/0; pass zero_count='zero' to give them weight 0"
        )
    if n_empty == n.numel():
        raise ValueError("samples_per_class: every class is empty (all counts are 0)")
    e = effective_number(n, beta)
    w = torch.where(empty, torch.zeros_like(e), 1.0 / torch.where(empty, torch.ones_like(e), e))
    if normalize:
        k = n.numel() - n_empty
        w = w * (k / w.sum())
    device = samples_per_class.device if isinstance(samples_per_class, torch.Tensor) else "cpu"
    return w.to(device=device, dtype=torch.float32)


def beta_from_num_samples(num_samples: int) -> float:
    """The paper's data-set-size-based choice ``beta = (N - 1) / N`` (a helper, not a default)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return (num_samples - 1) / num_samples



def _nonempty_counts(samples_per_class: Counts, what: str) -> torch.Tensor:
    """float64 counts with no empty class (an empty class has no prior to adjust by, nor a margin: SPEC sections 1,
    10)."""
    n = _counts_tensor(samples_per_class)
    empty = int((n == 0).sum())
    if empty:
        raise ValueError(f"samples_per_class has {empty} empty class(es) (count 0): {what} is undefined for them "
                         "(log 0 / 0^(-1/4)); drop those classes or give them a count")
    return n


def logit_adjustment(samples_per_class: Counts, tau: float = 1.0) -> torch.Tensor:
    """Per-class logit offsets ``o_c = tau * log(pi_c)``, ``pi = n / sum(n)`` (SPEC section 10): pass as
    ``logit_offset=`` for logit-adjusted training (Menon et al., ICLR 2021); ``tau = 1`` is Balanced Softmax (Ren et
    al., NeurIPS 2020). Computed in float64, returned float32 ``[C]`` on the CPU.

    Args:
        samples_per_class: ``[C]`` counts over the whole training set (list, numpy array or tensor), none 0.
        tau: the temperature, a finite number (0 gives all zeros).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    n = _nonempty_counts(samples_per_class, "the logit adjustment")
    return (float(tau) * torch.log(n / n.sum())).float()


def ldam_margins(samples_per_class: Counts, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM's per-class margins ``m_c = C' n_c^(-1/4)`` scaled so that the rarest class gets ``max_margin`` (Cao et
    al., NeurIPS 2019; SPEC section 10): pass as ``target_margin=`` (with ``logit_scale=30`` as in LDAM's recipe).
    Computed in float64, returned float32 ``[C]`` on the CPU.

    Args:
        samples_per_class: ``[C]`` counts over the whole training set, none 0.
        max_margin: the largest margin, a finite number > 0.
    """
    if (isinstance(max_margin, bool) or not isinstance(max_margin, (int, float)) or not math.isfinite(max_margin)
            or max_margin <= 0):
        raise ValueError(f"max_margin must be a finite number > 0, got {max_margin!r}")
    n = _nonempty_counts(samples_per_class, "the LDAM margin")
    m = n.pow(-0.25)
    return (m * (float(max_margin) / m.max())).float()

class ReweightMixin:
    """``reweight()`` for a loss module holding its class weights in the buffer ``weight`` (SPEC section 13)."""

    def _init_counts(self, samples_per_class, beta: float, normalize: bool, zero_count: str) -> torch.Tensor:
        """The module's weights; keeps the counts (a non-persistent float64 buffer) for ``reweight``."""
        w = class_balanced_weights(samples_per_class, beta=beta, normalize=normalize, zero_count=zero_count)
        self.normalize, self.zero_count = normalize, zero_count
        self.register_buffer("class_counts", _counts_tensor(samples_per_class).to(w.device), persistent=False)
        return w

    @torch.no_grad()
    def reweight(self, samples_per_class: Optional[Counts] = None, *, beta: Optional[float] = None):
        """Recomputes the class weights in place from new counts and/or a new ``beta`` (deferred re-weighting:
        ``beta=0`` gives the plain loss for the first epochs, a later call the class-balanced one).

        The ``weight`` buffer stays the same tensor (its values are copied over), so an optimizer, a ``state_dict``
        and a ``torch.compile``d graph that captured it stay valid and see the new weights without recompiling.
        ``samples_per_class`` (``[C]``, e.g. ``ClassCounter(...).counts``) keeps the module's classes; it is read
        on the host once (a sync for device counts: call it between steps, not inside one). Returns the module.
        """
        counts = self.class_counts if samples_per_class is None else _counts_tensor(samples_per_class)
        if counts.shape != self.weight.shape:
            raise ValueError(f"samples_per_class has {counts.shape[0]} classes but the module has "
                             f"{self.weight.shape[0]}")
        beta = self.beta if beta is None else check_beta(beta)
        w = class_balanced_weights(counts, beta=beta, normalize=self.normalize, zero_count=self.zero_count)
        self.weight.copy_(w)
        self.class_counts = counts.to(device=self.weight.device, dtype=torch.float64)
        self.beta = beta
        return self
