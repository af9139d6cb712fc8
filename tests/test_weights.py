"""Class-balanced weights (SPEC section 1)."""

import math

import numpy as np
import pytest
import torch

import cbkernels as cb

CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
PAPER_WEIGHTS = [0.0506, 0.0769, 0.1211, 0.1950, 0.3188, 0.5246, 0.8683, 1.4426, 2.4092, 3.9927]


def _direct(counts, beta):
    """Straight from the formula, in Python floats."""
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    k = len(counts)
    return [r * k / sum(raw) for r in raw]


def test_paper_cifar10_weights():
    w = cb.class_balanced_weights(CIFAR10_LT_COUNTS, beta=0.9999)
    assert w.dtype == torch.float32 and w.shape == (10,)
    torch.testing.assert_close(w, torch.tensor(PAPER_WEIGHTS), atol=5e-5, rtol=0)
    assert math.isclose(w.double().sum().item(), 10.0, rel_tol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999])
@pytest.mark.parametrize("counts", [CIFAR10_LT_COUNTS, [1], [3, 1], list(range(1, 200, 7))])
def test_weights_match_formula(beta, counts):
    w = cb.class_balanced_weights(counts, beta=beta)
    torch.testing.assert_close(w.double(), torch.tensor(_direct(counts, beta), dtype=torch.float64),
                               rtol=2e-7, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999999])
def test_effective_number(beta):
    counts = [0, 1, 10, 1000, 123456]
    e = cb.effective_number(counts, beta)
    assert e.dtype == torch.float64
    expected = [(1 - beta**n) / (1 - beta) for n in counts]
    torch.testing.assert_close(e, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_beta_limits_and_unnormalised():
    counts = [100, 10, 1]
    torch.testing.assert_close(cb.class_balanced_weights(counts, beta=0.0), torch.ones(3))
    raw = cb.class_balanced_weights(counts, beta=0.9, normalize=False)
    torch.testing.assert_close(raw.double(), torch.tensor([0.1 / (1 - 0.9**n) for n in counts], dtype=torch.float64))
    # beta -> 1 approaches inverse frequency.
    near_one = cb.class_balanced_weights(counts, beta=1 - 1e-9)
    inv = torch.tensor([1 / 100, 1 / 10, 1.0])
    torch.testing.assert_close(near_one, inv * 3 / inv.sum(), rtol=1e-5, atol=0)


def test_input_types_and_device():
    counts = [5, 3, 2]
    ref = cb.class_balanced_weights(counts, beta=0.99)
    for c in (tuple(counts), np.array(counts), torch.tensor(counts), torch.tensor(counts, dtype=torch.float32)):
        torch.testing.assert_close(cb.class_balanced_weights(c, beta=0.99), ref)


def test_zero_count_classes():
    counts = [10, 0, 5, 0]
    with pytest.raises(ValueError, match="2 empty class"):
        cb.class_balanced_weights(counts)
    w = cb.class_balanced_weights(counts, beta=0.9, zero_count="zero")
    assert w[1] == 0 and w[3] == 0
    # K counts the non-empty classes only, so the non-empty weights average to 1.
    assert math.isclose(w.sum().item(), 2.0, rel_tol=1e-6)
    torch.testing.assert_close(w[[0, 2]].double(), torch.tensor(_direct([10, 5], 0.9), dtype=torch.float64))
    with pytest.raises(ValueError, match="every class is empty"):
        cb.class_balanced_weights([0, 0], zero_count="zero")
    with pytest.raises(ValueError, match="zero_count"):
        cb.class_balanced_weights(counts, zero_count="nan")


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        cb.class_balanced_weights([1, 2], beta=beta)
    with pytest.raises(ValueError, match="beta"):
        cb.effective_number([1, 2], beta)


@pytest.mark.parametrize("counts,match", [([], "empty"), ([[1, 2]], "1-D"), ([1, -2], ">= 0"),
                                          ([1, float("nan")], "non-finite"), (["a"], "counts")])
def test_bad_counts(counts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cb.class_balanced_weights(counts)


def test_beta_from_num_samples():
    assert cb.beta_from_num_samples(10000) == 0.9999
    with pytest.raises(ValueError):
        cb.beta_from_num_samples(0)
