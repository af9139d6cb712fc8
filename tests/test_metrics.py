"""cbkernels.metrics against a hand computation and sklearn.metrics.balanced_accuracy_score."""

from __future__ import annotations

import math

import pytest
import torch

from cbkernels import ClassCounter
from cbkernels.metrics import (
    LongTailAccuracy,
    balanced_accuracy,
    per_class_accuracy,
    shot_accuracy,
    shot_groups,
)

NAN = float("nan")


def same(a, b):
    """Equal lists of floats, NaN equal to NaN."""
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12, abs=1e-15), (a, b)


# A hand-checked batch: 4 classes, class 3 never a target.
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, -100, 2, 2, 2])
PRED = torch.tensor([0, 1, 0, 1, 3, 2, 3, 0, 2, 2])
# class 0: 2/3, class 1: 1/2, class 2: 3/4, class 3: no sample
HAND = [2 / 3, 1 / 2, 3 / 4, NAN]


def test_hand_computation_from_predictions():
    same(per_class_accuracy(PRED, TARGET, 4).tolist(), HAND)
    assert balanced_accuracy(PRED, TARGET, 4).item() == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3, rel=1e-15)


def test_scores_are_read_by_argmax_and_equal_predictions():
    scores = torch.nn.functional.one_hot(PRED, 4).double() * 3 - 1 + 0.1 * torch.rand(10, 4, dtype=torch.float64)
    assert torch.equal(scores.argmax(-1), PRED)
    same(per_class_accuracy(scores, TARGET).tolist(), HAND)
    same(per_class_accuracy(scores.float(), TARGET, 4).tolist(), HAND)
    same(per_class_accuracy(scores.bfloat16(), TARGET, 4).tolist(), HAND)


def test_shot_groups_thresholds():
    counts = [500, 101, 100, 20, 19, 0, 1000]
    assert shot_groups(counts).tolist() == [0, 0, 1, 1, 2, 2, 0]
    assert shot_groups(counts, many=50, few=5).tolist() == [0, 0, 0, 1, 1, 2, 0]
    # Thresholds are inclusive on the medium side: n == many and n == few are medium.
    assert shot_groups([10, 10, 3], many=10, few=10).tolist() == [1, 1, 2]
    t = torch.tensor(counts)
    assert shot_groups(t).device == t.device


def test_shot_accuracy_by_hand():
    counts = [150, 50, 5, 7]  # many, medium, few, few (class 3 has no test sample)
    r = shot_accuracy(PRED, TARGET, counts)
    assert r["many"].item() == pytest.approx(2 / 3)
    assert r["medium"].item() == pytest.approx(1 / 2)
    assert r["few"].item() == pytest.approx(3 / 4)  # class 3 absent from the targets: left out, not counted as 0
    r = shot_accuracy(PRED, TARGET, [50, 50, 50, 50])
    assert math.isnan(r["many"].item()) and math.isnan(r["few"].item())
    assert r["medium"].item() == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn_balanced_accuracy(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    c = int(torch.randint(2, 40, (1,), generator=g))
    n = int(torch.randint(1, 500, (1,), generator=g))
    # A long-tailed target (some classes absent) and predictions that are right about half the time.
    probs = torch.rand(c, generator=g) ** 4 + 1e-3
    target = torch.multinomial(probs, n, replacement=True, generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.5, target, torch.randint(0, c, (n,), generator=g))
    want = sklearn_metrics.balanced_accuracy_score(target.numpy(), pred.numpy())
    assert balanced_accuracy(pred, target, c).item() == pytest.approx(want, rel=1e-12)
    # The streaming metric, over uneven batches, with the scores' path
    scores = torch.randn(n, c, generator=g, dtype=torch.float64)
    scores[torch.arange(n), pred] = 10.0
    m = LongTailAccuracy(c)
    for chunk in torch.arange(n).tensor_split(min(n, 7)):
        m.update(scores[chunk], target[chunk])
    r = m.compute()
    assert r["balanced_accuracy"].item() == pytest.approx(want, rel=1e-12)
    assert r["accuracy"].item() == pytest.approx(sklearn_metrics.accuracy_score(target.numpy(), pred.numpy()),
                                                 rel=1e-12)
    assert torch.equal(r["support"], torch.bincount(target, minlength=c))
    assert r["balanced_accuracy"].dtype == torch.float64


def test_streaming_equals_one_batch_and_resets():
    counts = [150, 50, 5, 7]
    m = LongTailAccuracy(4, samples_per_class=counts)
    m.update(PRED[:4], TARGET[:4]).update(PRED[4:], TARGET[4:])
    r = m.compute()
    same(r["per_class_accuracy"].tolist(), HAND)
    assert r["accuracy"].item() == pytest.approx(6 / 9)  # the ignored row is not a sample
    one = shot_accuracy(PRED, TARGET, counts)
    for k in ("many", "medium", "few"):
        assert r[k].item() == pytest.approx(one[k].item())
    # any leading shape: [B, T] targets with [B, T, C] scores
    m2 = LongTailAccuracy(4, samples_per_class=counts)
    m2.update(torch.nn.functional.one_hot(PRED, 4).float().reshape(2, 5, 4), TARGET.reshape(2, 5))
    same(m2.compute()["per_class_accuracy"].tolist(), HAND)
    m.reset()
    r = m.compute()
    assert math.isnan(r["accuracy"].item()) and math.isnan(r["balanced_accuracy"].item())
    assert r["support"].sum().item() == 0


def test_state_dict_round_trip_and_counter_counts():
    counter = ClassCounter(4).update(torch.tensor([0] * 150 + [1] * 50 + [2] * 5 + [3] * 7))
    m = LongTailAccuracy(4, samples_per_class=counter.counts, many=100, few=20)
    assert m.groups.tolist() == [0, 1, 2, 2]
    m.update(PRED, TARGET)
    m2 = LongTailAccuracy(4, samples_per_class=counter.counts)
    m2.load_state_dict(m.state_dict())
    same(m2.compute()["per_class_accuracy"].tolist(), HAND)
    assert "many=100" in repr(m)
    assert "many" not in LongTailAccuracy(4).compute()


def test_ignore_index_other_value():
    t = TARGET.clone()
    t[6] = 7
    same(per_class_accuracy(PRED, t, 4, ignore_index=7).tolist(), HAND)
    with pytest.raises(IndexError, match="outside"):
        per_class_accuracy(PRED, t, 4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="num_classes is required"):
        per_class_accuracy(PRED, TARGET)
    with pytest.raises(ValueError, match="outside"):
        per_class_accuracy(PRED.clone().fill_(4), TARGET, 4)
    with pytest.raises(IndexError, match="outside"):
        per_class_accuracy(PRED, torch.tensor([5] * 10), 4)
    with pytest.raises(TypeError, match="target must hold integer"):
        per_class_accuracy(PRED, TARGET.float(), 4)
    with pytest.raises(ValueError, match="shape"):
        per_class_accuracy(torch.randn(10, 4), TARGET[:9])
    with pytest.raises(ValueError, match="num_classes is 5"):
        per_class_accuracy(torch.randn(10, 4), TARGET, 5)
    with pytest.raises(ValueError, match="shape"):
        per_class_accuracy(PRED[:9], TARGET, 4)
    with pytest.raises(TypeError, match="input must be"):
        per_class_accuracy(PRED.bool(), TARGET, 4)
    with pytest.raises(ValueError, match="few .* must be <= many"):
        shot_groups([1, 2], many=10, few=20)
    with pytest.raises(ValueError, match="num_classes must be"):
        LongTailAccuracy(0)
    with pytest.raises(ValueError, match="samples_per_class has 3 classes"):
        LongTailAccuracy(4, samples_per_class=[1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        shot_groups([1, -2])
    with pytest.raises(ValueError, match="num_classes is 4"):
        LongTailAccuracy(4).update(torch.randn(10, 3), TARGET)
    with pytest.raises(ValueError, match="num_classes is 4"):
        shot_accuracy(torch.randn(10, 3), TARGET, [1, 2, 3, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3000, 50, generator=g)
    target = torch.randint(0, 50, (3000,), generator=g)
    target[::7] = -100
    counts = torch.randint(1, 300, (50,), generator=g)
    cpu = LongTailAccuracy(50, samples_per_class=counts).update(scores, target).compute()
    m = LongTailAccuracy(50, samples_per_class=counts.cuda(), device="cuda")
    for chunk in range(3):
        m.update(scores[chunk::3].cuda(), target[chunk::3].cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # update and compute never wait for the device
    try:
        m.update(scores[:0].cuda(), target[:0].cuda())
        gpu = m.compute()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, v in cpu.items():
        assert gpu[k].device.type == "cuda"
        torch.testing.assert_close(gpu[k].cpu(), v, equal_nan=True, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_index_dtype(dtype):
    t = TARGET.clone()
    t[6] = 9  # uint8 cannot hold -100
    same(per_class_accuracy(PRED.to(dtype), t.to(dtype), 4, ignore_index=9).tolist(), HAND)


def test_odd_inputs():
    # an empty batch counts nothing; 0-d targets with [C] scores; non-contiguous scores; float16 scores
    m = LongTailAccuracy(4, samples_per_class=[150, 50, 5, 7])
    m.update(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64))
    assert m.total.sum().item() == 0
    m.update(torch.tensor([0.0, 3.0, 1.0, 2.0]), torch.tensor(1))
    assert m.correct.tolist() == [0, 1, 0, 0] and m.total.tolist() == [0, 1, 0, 0]
    scores = torch.nn.functional.one_hot(PRED, 4).half().t().contiguous().t()  # [10, 4], column-major
    assert not scores.is_contiguous()
    same(per_class_accuracy(scores, TARGET).tolist(), HAND)
    same(per_class_accuracy(PRED[::1].view(2, 5).t(), TARGET.view(2, 5).t(), 4).tolist(), HAND)
    # numpy integers for the counts, thresholds and num_classes
    np = pytest.importorskip("numpy")
    assert shot_groups(np.array([150, 50, 5]), many=np.int64(100), few=np.int32(20)).tolist() == [0, 1, 2]
    same(per_class_accuracy(PRED, TARGET, np.int64(4)).tolist(), HAND)


def test_split_is_not_part_of_the_checkpoint():
    with_split = LongTailAccuracy(4, samples_per_class=[150, 50, 5, 7]).update(PRED, TARGET)
    plain = LongTailAccuracy(4)
    plain.load_state_dict(with_split.state_dict())
    same(plain.compute()["per_class_accuracy"].tolist(), HAND)
    other = LongTailAccuracy(4, samples_per_class=[150, 50, 5, 7], many=1000, few=1)
    other.load_state_dict(LongTailAccuracy(4).update(PRED, TARGET).state_dict())
    assert other.groups.tolist() == [1, 1, 1, 1]  # its own thresholds, not a checkpoint's
    assert set(with_split.state_dict()) == {"correct", "total"}


def test_argument_checks():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        per_class_accuracy(PRED, TARGET, 4, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LongTailAccuracy(4, ignore_index=None)
    with pytest.raises(ValueError, match="fit in int64"):
        per_class_accuracy(PRED, TARGET, 4, ignore_index=2**70)
    with pytest.raises(ValueError, match="num_classes must be"):
        per_class_accuracy(torch.randn(10, 4), TARGET, 4.0)
    with pytest.raises(TypeError, match="many must be a number"):
        shot_groups([1, 2], many="100")
    m = LongTailAccuracy(4, device="meta")
    with pytest.raises(ValueError, match="is on cpu but the metric is on meta"):
        m.update(PRED, TARGET)
