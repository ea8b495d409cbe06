"""Calibration and classification metrics over predicted class probabilities.

Every public function takes ``probs: (N, C) float`` (rows are probability vectors, for example a
softmax output) and ``labels: (N,) int64`` with values in ``[0, C)``, and returns a Python float.
Errors are fractions in ``[0, 1]``, not percent. Each function validates its inputs unless it is
called with ``validate_args=False``, which :func:`classification_metrics` does after validating
once.

Definitions:

- ECE and MCE: Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, on the top-label
  confidence with equal-width bins.
- ACE: the adaptive (equal-mass) calibration error of Nixon et al., "Measuring Calibration in Deep
  Learning", CVPR Workshops 2019, restricted to the top label.
- Classwise ECE: Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass
  probabilities with Dirichlet calibration", NeurIPS 2019.
- :func:`reference_calibration_errors` reproduces the non-standard ECE and MCE of the released
  FL²oRA code, only to compare with its published numbers.

All arithmetic after bin assignment runs in float64, so float16 and bfloat16 inputs lose no
precision beyond their own rounding.
"""

from __future__ import annotations

import logging
from numbers import Integral
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_NAMES",
    "NLL_EPS",
    "BinStatistics",
    "accuracy",
    "adaptive_calibration_error",
    "brier_score",
    "classification_metrics",
    "classwise_calibration_error",
    "equal_width_bin_statistics",
    "expected_calibration_error",
    "macro_f1",
    "maximum_calibration_error",
    "mean_confidence",
    "negative_log_likelihood",
    "reference_calibration_errors",
    "top_label_bin_statistics",
]

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "macro_f1",
    "confidence",
    "nll",
    "brier",
    "ece",
    "mce",
    "ace",
    "classwise_ece",
)
"""Keys of the dict returned by :func:`classification_metrics`, in order."""

NLL_EPS: float = 1e-12
"""Lower clamp on the true-class probability in :func:`negative_log_likelihood`.

A probability of exactly 0 (common after a float16 softmax) would give an infinite loss. With the
clamp, one such sample adds ``-log(1e-12) / N``, about ``27.6 / N``, to the mean.
"""

_ROW_SUM_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _check_n_bins(n_bins: int) -> None:
    # bool is an Integral subclass, but n_bins=True is almost certainly a mistake.
    if isinstance(n_bins, bool) or not isinstance(n_bins, Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}. Try 10 or 15.")


def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a torch.Tensor of shape (N, C), got {type(probs).__name__}.")
    if not probs.is_floating_point():
        raise ValueError(
            f"probs must have a floating dtype, got {probs.dtype}. Pass probabilities, for example "
            "logits.softmax(dim=1), not class indices."
        )
    if probs.ndim != 2:
        raise ValueError(
            f"probs must be 2-D with shape (N, C), got shape {tuple(probs.shape)}. "
            "Flatten extra dimensions into N first."
        )
    if probs.shape[0] < 1:
        raise ValueError("probs must contain at least one sample (N >= 1), got N = 0.")
    if probs.shape[1] < 1:
        raise ValueError("probs must contain at least one class (C >= 1), got C = 0.")
    if not bool(torch.isfinite(probs).all()):
        bad = int((~torch.isfinite(probs)).any(dim=1).sum())
        raise ValueError(f"probs must be finite, but {bad} rows contain NaN or inf.")
    if bool((probs < 0).any()):
        raise ValueError(
            f"probs must be non-negative, got a minimum of {float(probs.min())}. "
            "Apply softmax to logits before computing calibration metrics."
        )
    row_sums = probs.to(torch.float64).sum(dim=1)  # (N,)
    worst = int(torch.argmax((row_sums - 1.0).abs()))
    if abs(float(row_sums[worst]) - 1.0) > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"each row of probs must sum to 1 within {_ROW_SUM_TOLERANCE}, but row {worst} sums to "
            f"{float(row_sums[worst])!r}. Apply softmax to logits, or renormalise the rows."
        )


def _check_labels(
    labels: Tensor, n_samples: int, n_classes: int | None, name: str = "labels"
) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (int64), got {labels.dtype}.")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (N,), got shape {tuple(labels.shape)}.")
    if labels.shape[0] != n_samples:
        raise ValueError(
            f"{name} must have one entry per sample, got {labels.shape[0]} for N = {n_samples} "
            "samples."
        )
    if n_samples == 0:
        raise ValueError(f"{name} must contain at least one sample (N >= 1), got N = 0.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"{name} must be non-negative class indices, got a minimum of {low}.")
    if n_classes is not None and high >= n_classes:
        raise ValueError(
            f"{name} must lie in [0, {n_classes - 1}] for probs with C = {n_classes} columns, "
            f"got a maximum of {high}. Check that the label mapping matches the columns of probs."
        )


def _check_inputs(probs: Tensor, labels: Tensor, n_bins: int | None = None) -> None:
    if n_bins is not None:
        _check_n_bins(n_bins)
    _check_probs(probs)
    _check_labels(labels, n_samples=probs.shape[0], n_classes=probs.shape[1])


# --------------------------------------------------------------------------------------------------
# Shared binning
# --------------------------------------------------------------------------------------------------


class BinStatistics(NamedTuple):
    """Per-bin statistics of equal-width bins on ``[0, 1]``.

    For top-label binning ``accuracy`` is the fraction of correct predictions. For classwise binning
    it is the observed frequency of the class. Empty bins have a count of 0 and NaN averages.

    Attributes:
        counts: ``(n_bins,) int64`` number of samples in each bin.
        accuracy: ``(n_bins,) float64`` mean of the 0/1 outcome in each bin.
        confidence: ``(n_bins,) float64`` mean predicted probability in each bin.
    """

    counts: Tensor
    accuracy: Tensor
    confidence: Tensor


def _equal_width_bin_indices(values: Tensor, n_bins: int) -> Tensor:
    """Assign each value in ``[0, 1]`` to a right-closed bin ``((m-1)/M, m/M]``, 0 to the first bin.

    The inner edges ``m/M`` are computed in float64, where division is correctly rounded, and then
    rounded to the dtype of ``values``. So a value written as the decimal ``m/M`` (for example a
    float32 ``0.3``) compares equal to its edge and lands in the bin that the edge closes. Arithmetic
    such as ``ceil(value * M) - 1`` misplaces it (float32 ``0.3 * 10`` is ``3.0000001``), and so do
    edges from ``torch.linspace(0, 1, M + 1)`` in float32 (its edge for ``2/3`` lies below
    float32 ``2/3``).
    """
    edges = torch.arange(1, n_bins, dtype=torch.float64, device=values.device) / n_bins  # (M-1,)
    edges = edges.to(values.dtype).to(torch.float64)

    # bucketize(right=False) returns i with edges[i-1] < v <= edges[i]: the right-closed bin index.
    # Values above the last inner edge, 1.0 included, get index M - 1.
    return torch.bucketize(values.to(torch.float64).contiguous(), edges, right=False)


def equal_width_bin_statistics(values: Tensor, outcomes: Tensor, n_bins: int) -> BinStatistics:
    """Bin probabilities into equal-width bins and average them and their outcomes per bin.

    Bins are right-closed, ``((m-1)/M, m/M]`` for ``m = 1..M``. A value of 0 goes into the first
    bin and a value of exactly 1.0 into the last one, so every sample is counted. Every
    equal-width-bin metric in fl2ora and the reliability diagram call this function.

    Args:
        values: ``(N,) float`` probabilities in ``[0, 1]``, such as top-label confidences.
        outcomes: ``(N,)`` bool or float 0/1 outcomes, such as whether each prediction was correct.
        n_bins: number of bins ``M``, a positive int.

    Returns:
        A :class:`BinStatistics` with ``(n_bins,)`` counts, mean outcomes and mean values.

    Example:
        >>> stats = equal_width_bin_statistics(
        ...     torch.tensor([0.4, 0.35, 1.0]), torch.tensor([True, False, True]), n_bins=5)
        >>> stats.counts.tolist()  # 0.4 closes the bin (0.2, 0.4], 1.0 is in the last bin
        [0, 2, 0, 0, 1]
        >>> stats.accuracy[1].item(), round(stats.confidence[1].item(), 4)
        (0.5, 0.375)
    """
    n_bins = int(n_bins)
    indices = _equal_width_bin_indices(values, n_bins)  # (N,)
    values64 = values.to(torch.float64)
    outcomes64 = outcomes.to(torch.float64)

    counts = torch.bincount(indices, minlength=n_bins)  # (M,)
    value_sums = torch.zeros(n_bins, dtype=torch.float64, device=values.device)
    value_sums.scatter_add_(0, indices, values64)
    outcome_sums = torch.zeros(n_bins, dtype=torch.float64, device=values.device)
    outcome_sums.scatter_add_(0, indices, outcomes64)

    # Empty bins divide 0 by 0 and become NaN, which marks them as empty for callers.
    counts64 = counts.to(torch.float64)
    return BinStatistics(counts=counts, accuracy=outcome_sums / counts64, confidence=value_sums / counts64)


def _top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return the top-label confidence ``(N,)`` and whether the top label is correct ``(N,) bool``."""
    confidences, predictions = probs.max(dim=1)
    return confidences, predictions == labels


def top_label_bin_statistics(
    probs: Tensor, labels: Tensor, n_bins: int = 10, validate_args: bool = True
) -> BinStatistics:
    """Bin the top-label confidences as ECE, MCE and the reliability diagram do.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-width bins ``M``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        The :class:`BinStatistics` of :func:`equal_width_bin_statistics`, where ``accuracy`` is
        the fraction of correct top-label predictions in each bin.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.
    """
    if validate_args:
        _check_inputs(probs, labels, n_bins)
    confidences, correct = _top_label(probs, labels)
    return equal_width_bin_statistics(confidences, correct, n_bins)


def _weighted_gap(stats: BinStatistics) -> float:
    """Return ``sum_b (n_b / N) |acc_b - conf_b|`` over the non-empty bins."""
    non_empty = stats.counts > 0
    weights = stats.counts[non_empty].to(torch.float64) / stats.counts.sum()
    gaps = (stats.accuracy[non_empty] - stats.confidence[non_empty]).abs()
    return float((weights * gaps).sum())


def _max_gap(stats: BinStatistics) -> float:
    """Return ``max_b |acc_b - conf_b|`` over the non-empty bins."""
    non_empty = stats.counts > 0
    return float((stats.accuracy[non_empty] - stats.confidence[non_empty]).abs().max())


# --------------------------------------------------------------------------------------------------
# Calibration errors
# --------------------------------------------------------------------------------------------------


def expected_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 10, validate_args: bool = True
) -> float:
    """Compute the expected calibration error (ECE) of the top-label confidence.

    .. math::
        \\text{ECE} = \\sum_{b=1}^{M} \\frac{n_b}{N} \\left| \\text{acc}_b - \\text{conf}_b \\right|

    Bins are equal-width and right-closed, ``((b-1)/M, b/M]``. A confidence of exactly 1.0 goes
    into the last bin and counts fully, and a confidence of 0 goes into the first. See
    :func:`equal_width_bin_statistics` for how values on a bin edge are assigned.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-width bins ``M``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        ECE as a fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        Confidences 0.9 (correct), 0.8 (wrong), 0.6 (correct) and 0.7 (correct) with 5 bins:
        bin (0.8, 1] contains 0.9 (gap 0.1), bin (0.6, 0.8] contains 0.8 and 0.7 (accuracy 0.5,
        confidence 0.75, gap 0.25) and bin (0.4, 0.6] contains 0.6 (gap 0.4).
        ECE = 0.1/4 + 2*0.25/4 + 0.4/4 = 0.25.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> round(expected_calibration_error(probs, labels, n_bins=5), 4)
        0.25
    """
    if validate_args:
        _check_inputs(probs, labels, n_bins)
    return _weighted_gap(top_label_bin_statistics(probs, labels, n_bins, validate_args=False))


def maximum_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 10, validate_args: bool = True
) -> float:
    """Compute the maximum calibration error (MCE) of the top-label confidence.

    .. math::
        \\text{MCE} = \\max_{b \\,:\\, n_b > 0} \\left| \\text{acc}_b - \\text{conf}_b \\right|

    The maximum runs over the non-empty bins of :func:`expected_calibration_error` and is not
    weighted by bin size, so a single sample in a bin can set it.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-width bins ``M``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        MCE as a fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        With the bins of the :func:`expected_calibration_error` example, the gaps are 0.1, 0.25
        and 0.4, so MCE = 0.4.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> round(maximum_calibration_error(probs, labels, n_bins=5), 4)
        0.4
    """
    if validate_args:
        _check_inputs(probs, labels, n_bins)
    return _max_gap(top_label_bin_statistics(probs, labels, n_bins, validate_args=False))


def adaptive_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 10, validate_args: bool = True
) -> float:
    """Compute the adaptive (equal-mass) calibration error of the top-label confidence.

    Samples are sorted by top-label confidence (a stable sort, so ties keep their input order) and
    split into ``n_bins`` consecutive bins of equal size with ``numpy.array_split`` semantics: the
    first ``N mod M`` bins get one sample more. When ``N < M`` there are ``N`` bins of one sample.

    .. math::
        \\text{ACE} = \\frac{1}{M'} \\sum_{b=1}^{M'} \\left| \\text{acc}_b - \\text{conf}_b \\right|,
        \\quad M' = \\min(M, N)

    This is the adaptive calibration error of Nixon et al. (2019) restricted to the top label. It
    is not netcal's ``ACE``, which is the *average* calibration error (an unweighted mean over
    equal-width bins).

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-mass bins ``M``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        ACE as a fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        Sorted confidences 0.6 (correct), 0.7 (correct), 0.8 (wrong), 0.9 (correct) in 2 bins:
        the first has accuracy 1 and confidence 0.65 (gap 0.35), the second accuracy 0.5 and
        confidence 0.85 (gap 0.35). ACE = (0.35 + 0.35) / 2 = 0.35.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> round(adaptive_calibration_error(probs, labels, n_bins=2), 4)
        0.35
    """
    if validate_args:
        _check_inputs(probs, labels, n_bins)
    confidences, correct = _top_label(probs, labels)
    order = torch.sort(confidences.to(torch.float64), stable=True).indices

    n_samples = confidences.shape[0]
    n_used = min(n_bins, n_samples)
    sizes = [n_samples // n_used + (1 if b < n_samples % n_used else 0) for b in range(n_used)]

    sorted_conf = confidences.to(torch.float64)[order]
    sorted_correct = correct.to(torch.float64)[order]
    gaps = [
        (acc_bin.mean() - conf_bin.mean()).abs()
        for conf_bin, acc_bin in zip(sorted_conf.split(sizes), sorted_correct.split(sizes))
    ]
    return float(torch.stack(gaps).mean())


def classwise_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 10, validate_args: bool = True
) -> float:
    """Compute the classwise expected calibration error of Kull et al. (2019).

    For every class ``k``, the probabilities ``p_k`` of all ``N`` samples are put into the
    equal-width bins of :func:`expected_calibration_error`, and the error is averaged over classes:

    .. math::
        \\text{cwECE} = \\frac{1}{C} \\sum_{k=1}^{C} \\sum_{b=1}^{M} \\frac{n_{k,b}}{N}
        \\left| \\text{freq}_{k,b}(y = k) - \\text{mean}_{k,b}(p_k) \\right|

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-width bins ``M``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        Classwise ECE as a fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        With 5 bins, class 0 has p_0 = 0.9 (y = 0), 0.8 (y = 1), 0.4 and 0.3 (both y = 1):
        (0.1 + 0.8 + 2*0.35) / 4 = 0.4. Class 1 has p_1 = 0.1 (y = 0) and 0.2 (y = 1) in the first
        bin, then 0.6 and 0.7 (both y = 1): (2*0.35 + 0.4 + 0.3) / 4 = 0.35. The mean is 0.375.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> round(classwise_calibration_error(probs, labels, n_bins=5), 4)
        0.375
    """
    if validate_args:
        _check_inputs(probs, labels, n_bins)
    n_classes = probs.shape[1]
    per_class = [
        _weighted_gap(equal_width_bin_statistics(probs[:, k], labels == k, n_bins))
        for k in range(n_classes)
    ]
    return float(np.mean(per_class))


def reference_calibration_errors(
    probs: Tensor, labels: Tensor, n_bins: int = 10, validate_args: bool = True
) -> tuple[float, float]:
    """Compute the ECE and MCE exactly as the released FL²oRA code does, to compare with its numbers.

    NOTE: both values are non-standard and exist only to reproduce the published FL²oRA tables.
    Use :func:`expected_calibration_error` and :func:`maximum_calibration_error` for anything else.
    The behaviour below was read from ``Dassl/dassl_bton/evaluation/metrics.py`` (functions ``ECE``
    and ``MCE``) in the GitHub repository ``mainaksingha01/FL2oRA``. The ``Dassl/dassl`` evaluator
    that ``federated_main.py`` imports was not available to compare, but its ``plot.py`` computes
    the same ECE.

    Both use the float64 edges of ``numpy.linspace(0, 1, M + 1)`` and left-closed bins
    ``[lo, hi)`` (``numpy.digitize``), unlike the right-closed bins of the standard functions.

    - ECE: the accuracy and confidence averages of each bin leave out every confidence of exactly
      1.0, but the bin weights (``numpy.histogram``, whose last bin is closed) count them in the
      last bin. So the accuracy of predictions at 1.0, which a float16 softmax produces often,
      never enters a gap. A last bin that contains only 1.0s contributes 0.
    - MCE: the last bin is ``[lo, inf)`` and counts 1.0s fully, but each bin's gap is multiplied by
      its share of samples, ``max_b (n_b / N) |acc_b - conf_b|``, which hides a badly calibrated
      bin that contains few samples.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-width bins ``M``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        ``(ece, mce)`` as fractions.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        Confidences 1.0 (wrong), 0.875 (correct), 0.625 (wrong) and 0.75 (correct) with 4 bins.
        ECE: bin [0.75, 1) averages 0.875 and 0.75 (gap 1 - 0.8125 = 0.1875) but weighs 3/4
        because of the 1.0, and bin [0.5, 0.75) contains 0.625 (gap 0.625, weight 1/4):
        0.75*0.1875 + 0.25*0.625 = 0.296875. MCE: the last bin contains 1.0, 0.875 and 0.75
        (accuracy 2/3, confidence 0.875, weighted gap 0.75*0.208333 = 0.15625) and the other bin
        0.25*0.625 = 0.15625. The standard values are ECE 0.3125 and MCE 0.4375.

        >>> probs = torch.tensor(
        ...     [[1.0, 0.0], [0.875, 0.125], [0.625, 0.375], [0.25, 0.75]], dtype=torch.float64)
        >>> labels = torch.tensor([1, 0, 1, 1])
        >>> ece, mce = reference_calibration_errors(probs, labels, n_bins=4)
        >>> round(ece, 6), round(mce, 6)
        (0.296875, 0.15625)
        >>> round(expected_calibration_error(probs, labels, n_bins=4), 6)
        0.3125
    """
    if validate_args:
        _check_inputs(probs, labels, n_bins)
    confidences, correct = _top_label(probs, labels)
    conf = confidences.detach().to(torch.float64).cpu().numpy()  # (N,)
    correct_np = correct.detach().cpu().numpy().astype(np.float64)  # (N,)
    n_samples = conf.shape[0]
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # (M+1,) e.g. edge 3 of 10 is 0.30000000000000004

    # ECE: digitize gives bin i for edges[i] <= conf < edges[i+1], and index M for conf == 1.0,
    # which no bin average includes. The histogram's last bin is closed, so its weight includes 1.0.
    ece_index = np.digitize(conf, edges) - 1
    weights = np.histogram(conf, edges)[0] / n_samples
    ece = 0.0
    for b in range(n_bins):
        in_bin = ece_index == b
        if in_bin.any():
            ece += weights[b] * abs(conf[in_bin].mean() - correct_np[in_bin].mean())

    # MCE: digitize on the inner edges only, so the last bin is [edges[M-1], inf) and contains 1.0.
    mce_index = np.digitize(conf, edges[1:-1])
    mce = 0.0
    for b in np.unique(mce_index):
        in_bin = mce_index == b
        share = in_bin.sum() / n_samples
        mce = max(mce, share * abs(correct_np[in_bin].mean() - conf[in_bin].mean()))

    return float(ece), float(mce)


# --------------------------------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------------------------------


def negative_log_likelihood(probs: Tensor, labels: Tensor, validate_args: bool = True) -> float:
    """Compute the mean negative log-likelihood of the true class.

    .. math::
        \\text{NLL} = -\\frac{1}{N} \\sum_{i=1}^{N} \\log \\max(p_{i, y_i}, \\epsilon),
        \\quad \\epsilon = 10^{-12}

    The clamp at :data:`NLL_EPS` keeps a true-class probability of exactly 0 finite.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        Mean NLL in nats.

    Raises:
        ValueError: if ``probs`` or ``labels`` is invalid.

    Example:
        True-class probabilities 0.9, 0.2, 0.6 and 0.7:
        -(ln 0.9 + ln 0.2 + ln 0.6 + ln 0.7) / 4 = 2.5822989 / 4 = 0.6455747.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> round(negative_log_likelihood(probs, labels), 4)
        0.6456
    """
    if validate_args:
        _check_inputs(probs, labels)
    true_class = probs.to(torch.float64).gather(1, labels.unsqueeze(1)).squeeze(1)  # (N,)
    return float(-true_class.clamp_min(NLL_EPS).log().mean())


def brier_score(probs: Tensor, labels: Tensor, validate_args: bool = True) -> float:
    """Compute the multiclass Brier score.

    .. math::
        \\text{Brier} = \\frac{1}{N} \\sum_{i=1}^{N} \\sum_{k=1}^{C} (p_{i,k} - [y_i = k])^2

    The score lies in ``[0, 2]``. It is summed over classes, not averaged.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        The mean Brier score.

    Raises:
        ValueError: if ``probs`` or ``labels`` is invalid.

    Example:
        Squared errors per sample: 0.01 + 0.01, 0.64 + 0.64, 0.16 + 0.16 and 0.09 + 0.09,
        so the mean is 1.8 / 4 = 0.45.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> round(brier_score(probs, labels), 4)
        0.45
    """
    if validate_args:
        _check_inputs(probs, labels)
    probs64 = probs.to(torch.float64)
    one_hot = torch.nn.functional.one_hot(labels, num_classes=probs.shape[1]).to(torch.float64)
    return float(((probs64 - one_hot) ** 2).sum(dim=1).mean())


def accuracy(probs: Tensor, labels: Tensor, validate_args: bool = True) -> float:
    """Compute the top-1 accuracy, the fraction of samples whose most probable class is the label.

    Ties between classes go to the lowest class index, as in ``torch.argmax``.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        Accuracy as a fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``probs`` or ``labels`` is invalid.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> accuracy(probs, torch.tensor([0, 1, 1, 1]))
        0.75
    """
    if validate_args:
        _check_inputs(probs, labels)
    return float((probs.argmax(dim=1) == labels).to(torch.float64).mean())


def mean_confidence(probs: Tensor, validate_args: bool = True) -> float:
    """Compute the mean top-label confidence, ``(1/N) sum_i max_k p_{i,k}``.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        validate_args: check the input first. Pass False only for inputs already checked.

    Returns:
        Mean confidence as a fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``probs`` is invalid.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> round(mean_confidence(probs), 4)
        0.75
    """
    if validate_args:
        _check_probs(probs)
    return float(probs.max(dim=1).values.to(torch.float64).mean())


def macro_f1(predictions: Tensor, labels: Tensor, validate_args: bool = True) -> float:
    """Compute the macro-averaged F1 score over the classes present in the labels or predictions.

    .. math::
        F_1 = \\frac{1}{|K|} \\sum_{k \\in K} \\frac{2\\,TP_k}{2\\,TP_k + FP_k + FN_k},
        \\quad K = \\text{classes in labels} \\cup \\text{classes predicted}

    This matches ``sklearn.metrics.f1_score(labels, preds, average="macro")``. A class that is
    predicted but never the label scores 0 and counts. Classes that appear in neither are left out.

    Args:
        predictions: ``(N, C) float`` probabilities, reduced with ``argmax``, or ``(N,) int64``
            predicted classes. A floating dtype selects the first reading.
        labels: ``(N,) int64`` true classes. With probabilities they must lie in ``[0, C)``,
            with class indices they must be non-negative.
        validate_args: check the inputs first. Pass False only for inputs already checked.

    Returns:
        Macro F1 as a fraction in ``[0, 1]``.

    Raises:
        TypeError: if ``predictions`` is not a tensor.
        ValueError: if ``predictions`` or ``labels`` is invalid.

    Example:
        Predictions [0, 0, 1, 1] for labels [0, 1, 1, 1]: class 0 has TP 1, FP 1, FN 0
        (F1 = 2/3) and class 1 has TP 2, FP 0, FN 1 (F1 = 4/5). The mean is 0.7333.

        >>> round(macro_f1(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])), 4)
        0.7333
    """
    if not isinstance(predictions, Tensor):
        raise TypeError(
            "predictions must be a torch.Tensor of probabilities (N, C) or classes (N,), "
            f"got {type(predictions).__name__}."
        )
    if predictions.is_floating_point():
        if validate_args:
            _check_inputs(predictions, labels)
        predicted = predictions.argmax(dim=1)
    else:
        if validate_args:
            _check_labels(predictions, predictions.shape[0], n_classes=None, name="predictions")
            _check_labels(labels, predictions.shape[0], n_classes=None)
        predicted = predictions

    classes = torch.unique(torch.cat([labels, predicted]))  # (K,)
    is_label = labels.unsqueeze(0) == classes.unsqueeze(1)  # (K, N)
    is_predicted = predicted.unsqueeze(0) == classes.unsqueeze(1)  # (K, N)
    true_pos = (is_label & is_predicted).sum(dim=1).to(torch.float64)
    false_pos = (~is_label & is_predicted).sum(dim=1).to(torch.float64)
    false_neg = (is_label & ~is_predicted).sum(dim=1).to(torch.float64)

    # Every class in K appears in labels or predictions, so the denominator is positive.
    f1 = 2 * true_pos / (2 * true_pos + false_pos + false_neg)
    return float(f1.mean())


def classification_metrics(
    probs: Tensor,
    labels: Tensor,
    n_bins: int = 10,
    definition: Literal["standard", "reference"] = "standard",
) -> dict[str, float]:
    """Compute every metric in :data:`METRIC_NAMES` from one set of predictions.

    Inputs are validated once and each metric is computed without re-validating.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of bins for ECE, MCE, ACE and classwise ECE.
        definition: ``"standard"`` computes ECE and MCE as in Guo et al. (2017).
            ``"reference"`` takes them from :func:`reference_calibration_errors` to compare with
            the published FL²oRA numbers. Outputs made with it must be labelled as such. The other
            metrics are the same for both.

    Returns:
        A dict with the keys of :data:`METRIC_NAMES`, in that order, as fractions (NLL in nats).

    Raises:
        ValueError: if ``definition``, ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        The values are those of the examples of each function. ACE has 5 bins but only 4 samples,
        so it uses 4 bins of one with gaps 0.4, 0.3, 0.8 and 0.1, whose mean is 0.4.

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
        >>> metrics = classification_metrics(probs, torch.tensor([0, 1, 1, 1]), n_bins=5)
        >>> {name: round(value, 4) for name, value in metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'accuracy': 0.75, 'macro_f1': 0.7333, 'confidence': 0.75, 'nll': 0.6456, 'brier': 0.45,
         'ece': 0.25, 'mce': 0.4, 'ace': 0.4, 'classwise_ece': 0.375}
    """
    if definition not in ("standard", "reference"):
        raise ValueError(f"definition must be 'standard' or 'reference', got {definition!r}.")
    _check_inputs(probs, labels, n_bins)

    if definition == "reference":
        ece, mce = reference_calibration_errors(probs, labels, n_bins, validate_args=False)
    else:
        stats = top_label_bin_statistics(probs, labels, n_bins, validate_args=False)
        ece, mce = _weighted_gap(stats), _max_gap(stats)

    metrics = {
        "accuracy": accuracy(probs, labels, validate_args=False),
        "macro_f1": macro_f1(probs, labels, validate_args=False),
        "confidence": mean_confidence(probs, validate_args=False),
        "nll": negative_log_likelihood(probs, labels, validate_args=False),
        "brier": brier_score(probs, labels, validate_args=False),
        "ece": ece,
        "mce": mce,
        "ace": adaptive_calibration_error(probs, labels, n_bins, validate_args=False),
        "classwise_ece": classwise_calibration_error(probs, labels, n_bins, validate_args=False),
    }
    logger.debug("classification metrics (%s ECE/MCE, %d bins): %s", definition, n_bins, metrics)
    return metrics
