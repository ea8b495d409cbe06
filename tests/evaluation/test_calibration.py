"""Tests for fl2ora.evaluation.calibration against hand computations, numpy, torchmetrics and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from fl2ora.evaluation.calibration import (
    METRIC_NAMES,
    accuracy,
    adaptive_calibration_error,
    brier_score,
    classification_metrics,
    classwise_calibration_error,
    equal_width_bin_statistics,
    expected_calibration_error,
    macro_f1,
    maximum_calibration_error,
    mean_confidence,
    negative_log_likelihood,
    reference_calibration_errors,
    top_label_bin_statistics,
)

N_BINS_GRID = (1, 5, 10, 15)

# Four samples used by several hand-computed tests.
# Top-label confidences 0.9, 0.8, 0.6, 0.7; predictions 0, 0, 1, 1; correct: yes, no, yes, yes.
HAND_PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
HAND_LABELS = torch.tensor([0, 1, 1, 1])


def random_probs(
    n_samples: int, n_classes: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return softmax probabilities of random logits and random labels."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n_samples, n_classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (n_samples,), generator=generator)
    return logits.softmax(dim=1).to(dtype), labels


def off_boundary_probs(
    n_samples: int, n_classes: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return random probabilities whose top-label confidence is at least 1e-6 away from every
    bin edge m/M of every n_bins in N_BINS_GRID, and below 1.0."""
    probs, labels = random_probs(n_samples, n_classes, seed, dtype)
    conf = probs.max(dim=1).values.to(torch.float64)
    keep = conf < 1.0 - 1e-6
    for n_bins in N_BINS_GRID:
        distance = (conf * n_bins - torch.round(conf * n_bins)).abs() / n_bins
        keep &= distance > 1e-6
    return probs[keep], labels[keep]


# --------------------------------------------------------------------------------------------------
# Independent numpy implementations
# --------------------------------------------------------------------------------------------------


def numpy_ace(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Adaptive calibration error with a plain loop over np.array_split bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    gaps = []
    for chunk in np.array_split(order, n_bins):
        if len(chunk) == 0:  # array_split gives empty chunks when N < n_bins
            continue
        gaps.append(abs(correct[chunk].mean() - conf[chunk].mean()))
    return float(np.mean(gaps))


def numpy_classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Classwise ECE with explicit right-closed bin tests lo < p <= hi (first bin includes 0)."""
    n_samples, n_classes = probs.shape
    per_class = []
    for k in range(n_classes):
        p_k = probs[:, k]
        is_k = (labels == k).astype(np.float64)
        total = 0.0
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            in_bin = (p_k > lo) & (p_k <= hi)
            if b == 0:
                in_bin |= p_k == 0.0
            if in_bin.any():
                total += in_bin.sum() / n_samples * abs(is_k[in_bin].mean() - p_k[in_bin].mean())
        per_class.append(total)
    return float(np.mean(per_class))


def numpy_reference_errors(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[float, float]:
    """Released-code ECE and MCE written as explicit comparisons on np.linspace edges.

    ECE: averages over lo <= c < hi, weights count lo <= c < hi plus c == 1.0 in the last bin.
    MCE: bins lo <= c < hi, the last bin c >= lo; the gap is weighted by the bin's share.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    n_samples = len(conf)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        averaged = (conf >= lo) & (conf < hi)
        weight = averaged.sum() + (np.sum(conf == 1.0) if b == n_bins - 1 else 0)
        if averaged.any():
            ece += weight / n_samples * abs(correct[averaged].mean() - conf[averaged].mean())

        mce_bin = conf >= lo if b == n_bins - 1 else averaged
        if b == 0:
            mce_bin |= conf < lo
        if mce_bin.any():
            share = mce_bin.sum() / n_samples
            mce = max(mce, share * abs(correct[mce_bin].mean() - conf[mce_bin].mean()))
    return float(ece), float(mce)


# --------------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------------


def test_hand_example_top_label_errors():
    # 5 bins of width 0.2, right-closed:
    #   (0.4, 0.6]: 0.6 correct            -> acc 1,   conf 0.6,  gap 0.4,  weight 1/4
    #   (0.6, 0.8]: 0.8 wrong, 0.7 correct -> acc 0.5, conf 0.75, gap 0.25, weight 2/4
    #   (0.8, 1.0]: 0.9 correct            -> acc 1,   conf 0.9,  gap 0.1,  weight 1/4
    # ECE = 0.4/4 + 0.25*2/4 + 0.1/4 = 0.1 + 0.125 + 0.025 = 0.25; MCE = 0.4.
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.25, abs=1e-7)
    assert maximum_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.4, abs=1e-7)

    # 10 bins: every confidence alone in its bin, gaps 0.1, 0.8, 0.4, 0.3.
    # ECE = (0.1 + 0.8 + 0.4 + 0.3) / 4 = 0.4; MCE = 0.8.
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10) == pytest.approx(0.4, abs=1e-7)
    assert maximum_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10) == pytest.approx(0.8, abs=1e-7)


def test_hand_example_ace():
    # Sorted: 0.6 (correct), 0.7 (correct), 0.8 (wrong), 0.9 (correct).
    # 2 bins: {0.6, 0.7} acc 1 conf 0.65 gap 0.35; {0.8, 0.9} acc 0.5 conf 0.85 gap 0.35 -> 0.35.
    assert adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(0.35, abs=1e-7)
    # 3 bins of sizes 2, 1, 1: gaps 0.35, |0 - 0.8| = 0.8, |1 - 0.9| = 0.1 -> 1.25 / 3.
    assert adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=3) == pytest.approx(1.25 / 3, abs=1e-7)
    # 10 bins > N = 4: 4 bins of one, gaps 0.4, 0.3, 0.8, 0.1 -> 0.4.
    assert adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10) == pytest.approx(0.4, abs=1e-7)


def test_hand_example_classwise_ece():
    # Class 0, p_0 = 0.9 (y=0), 0.8 (y=1), 0.4 (y=1), 0.3 (y=1); 5 bins:
    #   (0.2, 0.4]: 0.4, 0.3 -> freq 0, mean 0.35, gap 0.35, weight 2/4
    #   (0.6, 0.8]: 0.8      -> freq 0, gap 0.8, weight 1/4
    #   (0.8, 1.0]: 0.9      -> freq 1, gap 0.1, weight 1/4
    #   ECE_0 = (0.7 + 0.8 + 0.1) / 4 = 0.4
    # Class 1, p_1 = 0.1 (y=0), 0.2 (y=1), 0.6 (y=1), 0.7 (y=1):
    #   [0, 0.2]:   0.1, 0.2 -> freq 0.5, mean 0.15, gap 0.35, weight 2/4
    #   (0.4, 0.6]: 0.6      -> freq 1, gap 0.4; (0.6, 0.8]: 0.7 -> freq 1, gap 0.3
    #   ECE_1 = (0.7 + 0.4 + 0.3) / 4 = 0.35
    # Mean over classes = 0.375.
    assert classwise_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.375, abs=1e-7)


def test_hand_example_classification_metrics():
    metrics = classification_metrics(HAND_PROBS, HAND_LABELS, n_bins=5)
    assert tuple(metrics) == METRIC_NAMES
    assert metrics["accuracy"] == pytest.approx(0.75)  # 3 of 4 correct
    # Class 0: TP 1, FP 1, FN 0 -> 2/3; class 1: TP 2, FP 0, FN 1 -> 4/5; mean 11/15.
    assert metrics["macro_f1"] == pytest.approx(11 / 15)
    assert metrics["confidence"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.7) / 4)
    # -mean(log p_y) with p_y = 0.9, 0.2, 0.6, 0.7.
    expected_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.7)) / 4
    assert metrics["nll"] == pytest.approx(expected_nll, rel=1e-6)
    # Per sample 0.02, 1.28, 0.32, 0.18 -> 1.8 / 4.
    assert metrics["brier"] == pytest.approx(0.45, abs=1e-6)
    assert metrics["ece"] == pytest.approx(0.25, abs=1e-7)
    assert metrics["mce"] == pytest.approx(0.4, abs=1e-7)
    assert metrics["ace"] == pytest.approx(0.4, abs=1e-7)
    assert metrics["classwise_ece"] == pytest.approx(0.375, abs=1e-7)
    assert all(isinstance(value, float) for value in metrics.values())


def test_confidence_one_standard_and_reference():
    # Confidences 1.0 (wrong), 0.875 (correct), 0.625 (wrong), 0.75 (correct); 4 bins.
    probs = torch.tensor([[1.0, 0.0], [0.875, 0.125], [0.625, 0.375], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 1])

    # Standard, right-closed, 1.0 counted in the last bin:
    #   (0.75, 1]: 1.0 wrong, 0.875 correct  -> acc 0.5, conf 0.9375, gap 0.4375, weight 1/2
    #   (0.5, 0.75]: 0.625 wrong, 0.75 correct -> acc 0.5, conf 0.6875, gap 0.1875, weight 1/2
    # ECE = 0.21875 + 0.09375 = 0.3125; MCE = 0.4375.
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.3125, abs=1e-12)
    assert maximum_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.4375, abs=1e-12)

    # Reference ECE, left-closed, 1.0 out of the averages but in the last bin's weight:
    #   [0.75, 1): 0.875, 0.75 both correct -> gap 1 - 0.8125 = 0.1875, weight 3/4 (with the 1.0)
    #   [0.5, 0.75): 0.625 wrong            -> gap 0.625, weight 1/4
    #   ECE = 0.140625 + 0.15625 = 0.296875
    # Reference MCE, last bin [0.75, inf) contains 1.0 (wrong), 0.875, 0.75 (correct):
    #   acc 2/3, conf 2.625/3 = 0.875, gap 5/24, weighted 3/4 * 5/24 = 0.15625
    #   [0.5, 0.75): weighted 1/4 * 0.625 = 0.15625 -> MCE = 0.15625
    ece, mce = reference_calibration_errors(probs, labels, n_bins=4)
    assert ece == pytest.approx(0.296875, abs=1e-12)
    assert mce == pytest.approx(0.15625, abs=1e-12)

    reference = classification_metrics(probs, labels, n_bins=4, definition="reference")
    standard = classification_metrics(probs, labels, n_bins=4, definition="standard")
    assert reference["ece"] == pytest.approx(0.296875, abs=1e-12)
    assert reference["mce"] == pytest.approx(0.15625, abs=1e-12)
    assert standard["ece"] == pytest.approx(0.3125, abs=1e-12)
    for name in ("accuracy", "macro_f1", "confidence", "nll", "brier", "ace", "classwise_ece"):
        assert reference[name] == standard[name], name


def test_reference_hides_all_ones_bin():
    # Two samples at confidence 1.0, one of them wrong; 10 bins.
    # Standard: one bin, acc 0.5, conf 1.0 -> ECE = MCE = 0.5.
    # Reference ECE: no bin average includes 1.0 -> 0. Reference MCE: last bin contains both,
    # share 1, gap 0.5 -> 0.5.
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5)
    assert maximum_calibration_error(probs, labels) == pytest.approx(0.5)
    assert reference_calibration_errors(probs, labels) == pytest.approx((0.0, 0.5))


def test_empty_bins_are_skipped():
    # All three confidences in (0.9, 1.0] (0.95, 0.95, 0.92), two correct: acc 2/3, conf 0.94.
    # The 9 empty bins add nothing to ECE and are not considered by MCE.
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.92, 0.08]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    gap = abs(2 / 3 - (0.95 + 0.95 + 0.92) / 3)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(gap, abs=1e-12)
    assert maximum_calibration_error(probs, labels, n_bins=10) == pytest.approx(gap, abs=1e-12)

    stats = top_label_bin_statistics(probs, labels, n_bins=10)
    assert stats.counts.tolist() == [0] * 9 + [3]
    assert torch.isnan(stats.accuracy[:9]).all()
    assert torch.isnan(stats.confidence[:9]).all()


def test_single_class_is_perfectly_calibrated():
    # C = 1: every probability is 1.0 and every label is 0, so every prediction is correct.
    probs = torch.ones(5, 1)
    labels = torch.zeros(5, dtype=torch.int64)
    metrics = classification_metrics(probs, labels, n_bins=10)
    expected = {
        "accuracy": 1.0, "macro_f1": 1.0, "confidence": 1.0, "nll": 0.0, "brier": 0.0,
        "ece": 0.0, "mce": 0.0, "ace": 0.0, "classwise_ece": 0.0,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    # Reference: ECE averages leave out the 1.0s (0), MCE's last bin has gap 0.
    assert reference_calibration_errors(probs, labels) == (0.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_boundary_confidences_use_right_closed_bins(dtype):
    # With 10 bins, 0.3 belongs to (0.2, 0.3] and 0.7 to (0.6, 0.7].
    #   0.3 (correct) + 0.25 (wrong): acc 0.5, conf 0.275, gap 0.225
    #   0.7 (correct) + 0.65 (wrong): acc 0.5, conf 0.675, gap 0.175
    # ECE = (2*0.225 + 2*0.175) / 4 = 0.2. Putting 0.3 in (0.3, 0.4] would give gaps 0.7 and 0.25.
    probs = torch.tensor(
        [
            [0.3, 0.2, 0.2, 0.2, 0.1],
            [0.25, 0.2, 0.2, 0.2, 0.15],
            [0.7, 0.1, 0.1, 0.05, 0.05],
            [0.65, 0.1, 0.1, 0.1, 0.05],
        ],
        dtype=dtype,
    )
    labels = torch.tensor([0, 1, 0, 2])
    stats = top_label_bin_statistics(probs, labels, n_bins=10)
    assert stats.counts.tolist() == [0, 0, 2, 0, 0, 0, 2, 0, 0, 0]
    # float16 stores 0.3 as 0.2998 and 0.7 as 0.7002, which moves the ECE by about 1e-4.
    tolerance = 1e-3 if dtype == torch.float16 else 1e-6
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.2, abs=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_bins", [1, 3, 5, 7, 10, 15])
def test_every_edge_closes_its_own_bin(dtype, n_bins):
    # The value m/M, stored in dtype, must land in bin m - 1 (0-based), and 0 in bin 0.
    values = torch.tensor([0.0] + [m / n_bins for m in range(1, n_bins + 1)], dtype=dtype)
    stats = equal_width_bin_statistics(values, torch.ones_like(values), n_bins)
    expected = [2] + [1] * (n_bins - 1) if n_bins > 1 else [2]
    assert stats.counts.tolist() == expected


# --------------------------------------------------------------------------------------------------
# Comparisons with independent libraries and implementations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_bins", N_BINS_GRID)
def test_ece_mce_match_torchmetrics(n_bins, seed):
    # torchmetrics 1.9 puts a confidence of exactly 1.0 in an extra hidden bin and uses left-closed
    # bins, so the samples avoid 1.0 and every bin edge, where both definitions agree.
    probs, labels = off_boundary_probs(600, 7, seed, torch.float32)
    n_classes = probs.shape[1]
    expected_ece = multiclass_calibration_error(probs, labels, n_classes, n_bins=n_bins, norm="l1")
    expected_mce = multiclass_calibration_error(probs, labels, n_classes, n_bins=n_bins, norm="max")
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(float(expected_ece), abs=1e-5)
    assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(float(expected_mce), abs=1e-5)


@pytest.mark.parametrize("n_samples", [3, 10, 97, 500])
@pytest.mark.parametrize("n_bins", N_BINS_GRID)
def test_ace_matches_numpy_loop(n_bins, n_samples):
    probs, labels = random_probs(n_samples, 5, seed=n_samples)
    expected = numpy_ace(probs.numpy(), labels.numpy(), n_bins)
    assert adaptive_calibration_error(probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)


def test_ace_with_tied_confidences_matches_numpy_loop():
    # Many exact ties across bin borders: both sides must use a stable sort.
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.75, 0.25]] * 3)
    labels = torch.tensor([0, 1, 1, 1, 0] * 3)
    for n_bins in N_BINS_GRID:
        expected = numpy_ace(probs.numpy(), labels.numpy(), n_bins)
        assert adaptive_calibration_error(probs, labels, n_bins) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("n_classes", [1, 2, 10])
@pytest.mark.parametrize("n_bins", N_BINS_GRID)
def test_classwise_ece_matches_numpy_loop(n_bins, n_classes):
    probs, labels = random_probs(400, n_classes, seed=n_classes)
    expected = numpy_classwise_ece(probs.numpy(), labels.numpy(), n_bins)
    assert classwise_calibration_error(probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_bins", N_BINS_GRID)
def test_reference_matches_numpy_loop(n_bins):
    # Random probabilities plus rows with confidence exactly 1.0 and rows on bin edges.
    probs, labels = random_probs(300, 4, seed=n_bins)
    extra = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.6, 0.2, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]],
        dtype=torch.float64,
    )
    probs = torch.cat([probs, extra])
    labels = torch.cat([labels, torch.tensor([0, 0, 0, 1])])
    expected = numpy_reference_errors(probs.numpy(), labels.numpy(), n_bins)
    assert reference_calibration_errors(probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_matches_torch_nll_loss(dtype):
    probs, labels = random_probs(256, 6, seed=3, dtype=dtype)
    expected = F.nll_loss(probs.to(torch.float64).log(), labels)
    assert negative_log_likelihood(probs, labels) == pytest.approx(float(expected), rel=1e-6)


def test_nll_clamps_zero_probability():
    # p_y = 0 is clamped to 1e-12: NLL = -log(1e-12) / 2 for one such sample out of two (the
    # other has p_y = 1 and adds 0).
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([1, 0])
    assert negative_log_likelihood(probs, labels) == pytest.approx(-math.log(1e-12) / 2)


def test_brier_matches_numpy_formula():
    probs, labels = random_probs(256, 6, seed=4)
    p = probs.numpy()
    one_hot = np.eye(6)[labels.numpy()]
    expected = np.mean(np.sum((p - one_hot) ** 2, axis=1))
    assert brier_score(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_accuracy_and_confidence_match_numpy():
    probs, labels = random_probs(256, 6, seed=5)
    p = probs.numpy()
    assert accuracy(probs, labels) == pytest.approx(np.mean(p.argmax(axis=1) == labels.numpy()))
    assert mean_confidence(probs) == pytest.approx(np.mean(p.max(axis=1)), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_sklearn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    # 12 classes and 40 samples: some classes are never labelled or never predicted.
    probs, labels = random_probs(40, 12, seed=seed)
    predictions = probs.argmax(dim=1)
    expected = sklearn_metrics.f1_score(labels.numpy(), predictions.numpy(), average="macro")
    assert macro_f1(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert macro_f1(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_counts_predicted_only_class():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    # Class 2 is predicted once but never a label: it scores F1 = 0 and counts in the mean.
    # Class 0: TP 2, FP 0, FN 0 -> 1; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2 -> 0. Mean 5/9.
    predictions = torch.tensor([0, 0, 1, 2])
    labels = torch.tensor([0, 0, 1, 1])
    assert macro_f1(predictions, labels) == pytest.approx(5 / 9)
    expected = sklearn_metrics.f1_score(labels.numpy(), predictions.numpy(), average="macro")
    assert macro_f1(predictions, labels) == pytest.approx(expected)


@pytest.mark.parametrize("definition", ["standard", "reference"])
@pytest.mark.parametrize("n_bins", N_BINS_GRID)
def test_classification_metrics_match_single_functions(n_bins, definition):
    probs, labels = random_probs(200, 5, seed=n_bins)
    metrics = classification_metrics(probs, labels, n_bins=n_bins, definition=definition)
    if definition == "reference":
        ece, mce = reference_calibration_errors(probs, labels, n_bins)
    else:
        ece = expected_calibration_error(probs, labels, n_bins)
        mce = maximum_calibration_error(probs, labels, n_bins)
    expected = {
        "accuracy": accuracy(probs, labels),
        "macro_f1": macro_f1(probs, labels),
        "confidence": mean_confidence(probs),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": ece,
        "mce": mce,
        "ace": adaptive_calibration_error(probs, labels, n_bins),
        "classwise_ece": classwise_calibration_error(probs, labels, n_bins),
    }
    assert tuple(metrics) == METRIC_NAMES
    assert metrics == expected


def test_validate_args_false_skips_checks():
    # Rows summing to 1.2 are rejected with validation and accepted without it.
    probs = torch.tensor([[0.7, 0.5]])
    labels = torch.tensor([0])
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(probs, labels)
    # One sample at confidence 0.7, correct: gap 0.3.
    assert expected_calibration_error(probs, labels, validate_args=False) == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------------
# Invalid inputs
# --------------------------------------------------------------------------------------------------

VALID_PROBS = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
VALID_LABELS = torch.tensor([0, 1])

INVALID_CASES = [
    # (id, probs, labels, n_bins, expected exception, message pattern)
    ("n_bins zero", VALID_PROBS, VALID_LABELS, 0, ValueError, "n_bins must be a positive int"),
    ("n_bins negative", VALID_PROBS, VALID_LABELS, -1, ValueError, "n_bins must be a positive int"),
    ("n_bins float", VALID_PROBS, VALID_LABELS, 2.5, ValueError, "n_bins must be a positive int"),
    ("n_bins bool", VALID_PROBS, VALID_LABELS, True, ValueError, "n_bins must be a positive int"),
    ("probs not a tensor", [[0.6, 0.4]], torch.tensor([0]), 10, TypeError, "probs must be a torch.Tensor"),
    ("probs 1-D", torch.tensor([0.6, 0.4]), VALID_LABELS, 10, ValueError, "probs must be 2-D"),
    ("probs 3-D", VALID_PROBS.unsqueeze(0), VALID_LABELS, 10, ValueError, "probs must be 2-D"),
    ("probs integer", torch.tensor([[1, 0], [0, 1]]), VALID_LABELS, 10, ValueError, "floating dtype"),
    ("rows not summing to 1", torch.tensor([[0.6, 0.6], [0.3, 0.7]]), VALID_LABELS, 10, ValueError,
     r"row 0 sums to 1\.2"),
    ("NaN", torch.tensor([[float("nan"), 0.4], [0.3, 0.7]]), VALID_LABELS, 10, ValueError,
     "probs must be finite"),
    ("inf", torch.tensor([[float("inf"), 0.4], [0.3, 0.7]]), VALID_LABELS, 10, ValueError,
     "probs must be finite"),
    ("negative probability", torch.tensor([[1.2, -0.2], [0.3, 0.7]]), VALID_LABELS, 10, ValueError,
     "probs must be non-negative"),
    ("label too large", VALID_PROBS, torch.tensor([0, 2]), 10, ValueError, r"labels must lie in \[0, 1\]"),
    ("label negative", VALID_PROBS, torch.tensor([-1, 1]), 10, ValueError, "labels must be non-negative"),
    ("labels float", VALID_PROBS, torch.tensor([0.0, 1.0]), 10, ValueError, "labels must have an integer dtype"),
    ("labels 2-D", VALID_PROBS, VALID_LABELS.unsqueeze(1), 10, ValueError, "labels must be 1-D"),
    ("length mismatch", VALID_PROBS, torch.tensor([0, 1, 1]), 10, ValueError, "one entry per sample"),
    ("N = 0", torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), 10, ValueError, "at least one sample"),
    ("C = 0", torch.zeros(2, 0), VALID_LABELS, 10, ValueError, "at least one class"),
]

BINNED_FUNCTIONS = [
    expected_calibration_error,
    maximum_calibration_error,
    adaptive_calibration_error,
    classwise_calibration_error,
    reference_calibration_errors,
    classification_metrics,
]


@pytest.mark.parametrize("function", BINNED_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("probs", "labels", "n_bins", "error", "match"),
    [case[1:] for case in INVALID_CASES],
    ids=[case[0] for case in INVALID_CASES],
)
def test_binned_metrics_reject_invalid_input(function, probs, labels, n_bins, error, match):
    with pytest.raises(error, match=match):
        function(probs, labels, n_bins=n_bins)


# macro_f1 reads an integer input as predicted classes, so its errors name predictions.
MACRO_F1_MATCH = {
    "probs not a tensor": "predictions must be a torch.Tensor",
    "probs integer": "predictions must be 1-D",
}
UNBINNED_CASES = [case for case in INVALID_CASES if not case[0].startswith("n_bins")]


@pytest.mark.parametrize(
    "function", [negative_log_likelihood, brier_score, accuracy, macro_f1], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("case", UNBINNED_CASES, ids=[case[0] for case in UNBINNED_CASES])
def test_unbinned_metrics_reject_invalid_input(function, case):
    case_id, probs, labels, _, error, match = case
    if function is macro_f1:
        match = MACRO_F1_MATCH.get(case_id, match)
    with pytest.raises(error, match=match):
        function(probs, labels)


def test_mean_confidence_rejects_invalid_probs():
    with pytest.raises(ValueError, match="probs must be finite"):
        mean_confidence(torch.tensor([[float("nan"), 1.0]]))


def test_classification_metrics_rejects_unknown_definition():
    with pytest.raises(ValueError, match="definition must be 'standard' or 'reference'"):
        classification_metrics(VALID_PROBS, VALID_LABELS, definition="netcal")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("predictions", "labels", "match"),
    [
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "probs must be 2-D"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), "predictions must be non-negative"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), "labels must have one entry per sample"),
        (torch.tensor([0, 1]), torch.tensor([0, -3]), "labels must be non-negative"),
    ],
    ids=["float predictions", "negative prediction", "length mismatch", "negative label"],
)
def test_macro_f1_rejects_invalid_class_indices(predictions, labels, match):
    with pytest.raises(ValueError, match=match):
        macro_f1(predictions, labels)
