"""In-training calibration losses: cross-entropy plus an optional calibration term.

Every loss takes raw ``logits: (N, C) float`` and ``labels: (N,) int64`` with values in ``[0, C)``
and returns a differentiable scalar tensor. CLIP's logits are ``exp(logit_scale) * cos / tau``,
about 100 times a cosine similarity for pretrained CLIP. Float16 and bfloat16 logits are upcast
to float32 before any arithmetic, and float64 logits stay float64.

Terms:

- DCA: Liang et al., "Improved Trainable Calibration Method for Neural Networks on Medical
  Imaging Classification", BMVC 2020.
- MDCA: Hebbalaguppe et al., "A Stitch in Time Saves Nine: A Train-Time Regularizing Loss for
  Improved Neural Network Calibration", CVPR 2022.
- MbLS: Liu et al., "The Devil is in the Margin: Margin-based Label Smoothing for Network
  Calibration", CVPR 2022.
- Focal loss: Lin et al. 2017, with the sample-dependent FLSD-53 schedule of Mukhoti et al.,
  "Calibrating Deep Neural Networks using Focal Loss", NeurIPS 2020.
- Label smoothing as a penalty: cross-entropy to the uniform distribution.

:func:`training_loss` combines cross-entropy with the term that :class:`CalibrationLossConfig`
names. Each function validates its inputs unless called with ``validate_args=False``. The label
range check reads ``labels.min()`` and ``labels.max()`` back to the host, which waits for the GPU.
Labels of any integer dtype are converted to int64.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Real
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from fl2ora.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationLossConfig",
    "LossName",
    "dca_penalty",
    "focal_loss",
    "label_smoothing_penalty",
    "mbls_penalty",
    "mdca_penalty",
    "training_loss",
]

LossName = Literal["none", "dca", "mdca", "mbls", "focal", "label_smoothing"]
"""Names of the calibration terms that :func:`training_loss` can add."""

_LOSS_NAMES: tuple[str, ...] = get_args(LossName)

_ADAPTIVE_THRESHOLD = 0.2
_ADAPTIVE_GAMMA_LOW = 5.0
_ADAPTIVE_GAMMA_HIGH = 3.0


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class CalibrationLossConfig:
    """Training loss: cross-entropy plus ``weight`` times a calibration term."""

    name: LossName = "none"
    """Calibration term added to cross-entropy: ``none`` (plain cross-entropy, as FL²oRA),
    ``dca``, ``mdca``, ``mbls`` (margin-based label smoothing), ``focal`` or
    ``label_smoothing`` (cross-entropy to the uniform distribution)."""
    weight: float = 1.0
    """Multiplier of the calibration term. A weight of 0 gives exactly plain cross-entropy."""
    margin: float = 10.0
    """MbLS margin in logit units. On CLIP logits (exp(logit_scale) / tau times a cosine) the
    margin 10 of Liu et al. allows a cosine gap of 0.1 when exp(logit_scale) = 100 and tau = 1."""
    gamma: float | str = 3.0
    """Focal-loss exponent, a number >= 0 or ``adaptive`` for FLSD-53 (5 where the true-class
    probability is below 0.2, else 3)."""

    def __post_init__(self) -> None:
        if self.name not in _LOSS_NAMES:
            raise ConfigError(f"loss.name must be one of {list(_LOSS_NAMES)}, got {self.name!r}.")
        if not _is_number(self.weight) or not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(
                f"loss.weight must be a finite number >= 0, got {self.weight!r}. "
                "Use 0 for plain cross-entropy."
            )
        if not _is_number(self.margin) or not (math.isfinite(self.margin) and self.margin > 0):
            raise ConfigError(
                f"loss.margin must be a finite number > 0, got {self.margin!r}. "
                "Liu et al. use 10; see mbls_penalty for CLIP logits."
            )
        _check_gamma(self.gamma, "loss.gamma", ConfigError)


def _is_number(value: object) -> bool:
    # bool is a Real subclass, but weight=True is almost certainly a mistake.
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_gamma(gamma: object, name: str, error: type[ValueError]) -> None:
    if gamma == "adaptive":
        return
    if not _is_number(gamma) or not (math.isfinite(gamma) and gamma >= 0):
        raise error(
            f"{name} must be a finite number >= 0 or 'adaptive', got {gamma!r}. "
            "Mukhoti et al. use 3, or 'adaptive' for FLSD-53."
        )


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _check_inputs(logits: Tensor, labels: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (N, C), got {type(logits).__name__}.")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (N,), got {type(labels).__name__}.")

    if not logits.is_floating_point():
        raise ValueError(f"logits must have a floating dtype, got {logits.dtype}. Pass raw model outputs.")
    if logits.ndim != 2:
        raise ValueError(
            f"logits must be 2-D with shape (N, C), got shape {tuple(logits.shape)}. "
            "Flatten extra dimensions into N first."
        )
    n_samples, n_classes = logits.shape
    if n_samples < 1:
        raise ValueError("logits must contain at least one sample (N >= 1), got N = 0.")
    if n_classes < 1:
        raise ValueError("logits must contain at least one class (C >= 1), got C = 0.")

    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must have an integer dtype (int64), got {labels.dtype}.")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D with shape (N,), got shape {tuple(labels.shape)}.")
    if labels.shape[0] != n_samples:
        raise ValueError(
            f"labels must have one entry per row of logits, got {labels.shape[0]} labels for "
            f"N = {n_samples} rows."
        )

    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes - 1}] for logits with C = {n_classes} columns, got "
            f"values from {low} to {high}. Check that the label mapping matches the class order."
        )


def _at_least_float32(logits: Tensor) -> Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


# --------------------------------------------------------------------------------------------------
# Calibration terms
# --------------------------------------------------------------------------------------------------


def dca_penalty(logits: Tensor, labels: Tensor, *, validate_args: bool = True) -> Tensor:
    """Compute the difference between confidence and accuracy (DCA) of a batch.

    ``DCA = | (1/N) Σ_i max_k p_ik − (1/N) Σ_i 1[argmax_k p_ik = y_i] |`` with ``p = softmax(logits)``.
    The accuracy term is a constant, so gradients flow only through the confidences.

    Args:
        logits: ``(N, C) float`` raw logits.
        labels: ``(N,) int64`` class indices in ``[0, C)``.
        validate_args: check shapes, dtypes and the label range.

    Returns:
        ``() float`` scalar in ``[0, 1]``.

    Example:
        >>> import math
        >>> logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
        >>> labels = torch.tensor([0, 0])
        >>> # Both confidences are 0.75 and one prediction in two is right: |0.75 - 0.5|.
        >>> round(float(dca_penalty(logits, labels)), 4)
        0.25
    """
    if validate_args:
        _check_inputs(logits, labels)
    logits = _at_least_float32(logits)
    labels = labels.long()

    probs = logits.softmax(dim=1)  # (N, C)
    confidence, predictions = probs.max(dim=1)  # (N,), (N,)
    accuracy = (predictions == labels).to(probs.dtype).mean()
    return (confidence.mean() - accuracy).abs()


def mdca_penalty(logits: Tensor, labels: Tensor, *, validate_args: bool = True) -> Tensor:
    """Compute the multi-class difference between confidence and accuracy (MDCA) of a batch.

    ``MDCA = (1/C) Σ_k | (1/N) Σ_i p_ik − (1/N) Σ_i 1[y_i = k] |`` with ``p = softmax(logits)``.

    Args:
        logits: ``(N, C) float`` raw logits.
        labels: ``(N,) int64`` class indices in ``[0, C)``.
        validate_args: check shapes, dtypes and the label range.

    Returns:
        ``() float`` scalar in ``[0, 2 / C]``.

    Example:
        >>> import math
        >>> logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
        >>> labels = torch.tensor([0, 0])
        >>> # Mean probabilities (0.5, 0.5), label frequencies (1, 0): (0.5 + 0.5) / 2.
        >>> round(float(mdca_penalty(logits, labels)), 4)
        0.5
    """
    if validate_args:
        _check_inputs(logits, labels)
    logits = _at_least_float32(logits)
    labels = labels.long()

    n_classes = logits.shape[1]
    mean_probs = logits.softmax(dim=1).mean(dim=0)  # (C,)
    frequencies = F.one_hot(labels, n_classes).to(mean_probs.dtype).mean(dim=0)  # (C,)
    return (mean_probs - frequencies).abs().mean()


def mbls_penalty(
    logits: Tensor, labels: Tensor, margin: float = 10.0, *, validate_args: bool = True
) -> Tensor:
    """Compute the margin penalty of margin-based label smoothing (MbLS).

    ``MbLS = (1/N) Σ_i Σ_k max(0, max_j z_ij − z_ik − m)``: a linear penalty on every logit that
    lies more than the margin ``m`` below the largest logit of its row. The labels are only
    validated, because the penalty does not depend on them.

    Choosing the margin for CLIP: Liu et al.'s default ``m = 10`` was set for the logits of
    ordinary classifiers. CLIP's logits are ``exp(logit_scale) / tau`` times a cosine similarity,
    so ``m`` corresponds to a cosine gap of ``m * tau / exp(logit_scale)``. With pretrained CLIP
    (``exp(logit_scale) = 100``) and ``tau = 1``, the default 10 tolerates a cosine gap of 0.1
    and penalises classes whose cosine lies further below the top class. For the same cosine gap
    ``g`` choose ``m = 100 * g``. A randomly initialised ``transformers`` CLIP starts at
    ``exp(logit_scale) = 1 / 0.07``, about 14.3, where ``m = 10`` is a cosine gap of 0.7.

    Args:
        logits: ``(N, C) float`` raw logits.
        labels: ``(N,) int64`` class indices in ``[0, C)``.
        margin: ``m`` in logit units, > 0.
        validate_args: check shapes, dtypes, the label range and the margin.

    Returns:
        ``() float`` scalar >= 0.

    Raises:
        ValueError: when ``margin`` is not a finite number > 0.

    Example:
        >>> logits = torch.tensor([[5.0, 0.0, -10.0], [1.0, 1.0, 1.0]])
        >>> labels = torch.tensor([0, 2])
        >>> # Row 1 gaps (0, 5, 15) exceed 10 by (0, 0, 5); row 2 has none: (5 + 0) / 2.
        >>> round(float(mbls_penalty(logits, labels, margin=10.0)), 4)
        2.5
    """
    if validate_args:
        _check_inputs(logits, labels)
        if not _is_number(margin) or not (math.isfinite(margin) and margin > 0):
            raise ValueError(f"margin must be a finite number > 0, got {margin!r}. Liu et al. use 10.")
    logits = _at_least_float32(logits)
    labels = labels.long()

    # NOTE: Liu et al.'s released code takes F.relu(gaps - margin).mean() over all N x C entries,
    # so its alpha = 0.1 equals weight = 0.1 / C with this sum over classes.
    gaps = logits.max(dim=1, keepdim=True).values - logits  # (N, C)
    return F.relu(gaps - margin).sum(dim=1).mean()


def focal_loss(
    logits: Tensor,
    labels: Tensor,
    gamma: float | Literal["adaptive"] = 3.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    """Compute the focal loss ``(1/N) Σ_i −(1 − p_iy)^γ log p_iy`` with ``p = softmax(logits)``.

    With ``gamma="adaptive"`` each sample gets FLSD-53 of Mukhoti et al. 2020: ``γ = 5`` when
    ``p_iy < 0.2`` and ``γ = 3`` otherwise, chosen without gradient. ``gamma=0`` is cross-entropy.

    Args:
        logits: ``(N, C) float`` raw logits.
        labels: ``(N,) int64`` class indices in ``[0, C)``.
        gamma: exponent ``γ >= 0``, or ``"adaptive"``.
        validate_args: check shapes, dtypes, the label range and ``gamma``.

    Returns:
        ``() float`` scalar >= 0.

    Raises:
        ValueError: when ``gamma`` is neither a finite number >= 0 nor ``"adaptive"``.

    Example:
        >>> import math
        >>> logits = torch.tensor([[math.log(3.0), 0.0]])
        >>> # p_y = 0.75: 0.25 * -log(0.75) = 0.25 * 0.287682.
        >>> round(float(focal_loss(logits, torch.tensor([0]), gamma=1.0)), 4)
        0.0719
        >>> # p_y = 0.25 >= 0.2, so gamma = 3: 0.75**3 * -log(0.25) = 0.421875 * 1.386294.
        >>> round(float(focal_loss(logits, torch.tensor([1]), gamma="adaptive")), 4)
        0.5848
    """
    if validate_args:
        _check_inputs(logits, labels)
        _check_gamma(gamma, "gamma", ValueError)
    logits = _at_least_float32(logits)
    labels = labels.long()

    log_p_true = logits.log_softmax(dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)  # (N,)
    p_true = log_p_true.exp()
    if gamma == "adaptive":
        low = p_true.detach() < _ADAPTIVE_THRESHOLD
        exponent = torch.where(low, _ADAPTIVE_GAMMA_LOW, _ADAPTIVE_GAMMA_HIGH).to(p_true.dtype)
    else:
        exponent = torch.full_like(p_true, float(gamma))
    # p_true rounds to 1 for confident samples. The clamp keeps the base positive, because the
    # derivative of base**gamma is infinite at base 0 for 0 < gamma < 1 and would turn 0 * inf into
    # a NaN gradient. The clamp changes the loss by at most tiny**gamma * |log p_true|.
    modulator = (1.0 - p_true).clamp_min(torch.finfo(p_true.dtype).tiny).pow(exponent)
    return -(modulator * log_p_true).mean()


def label_smoothing_penalty(logits: Tensor, labels: Tensor, *, validate_args: bool = True) -> Tensor:
    """Compute the cross-entropy to the uniform distribution, ``(1/N) Σ_i −(1/C) Σ_k log p_ik``.

    Added to cross-entropy it is label smoothing: ``CE + w * penalty`` equals ``(1 + w)`` times
    the label-smoothed cross-entropy with ``ε = w / (1 + w)`` (targets ``(1 − ε) onehot + ε / C``,
    as ``F.cross_entropy(..., label_smoothing=ε)``). The labels are only validated, because the
    penalty does not depend on them.

    Args:
        logits: ``(N, C) float`` raw logits.
        labels: ``(N,) int64`` class indices in ``[0, C)``.
        validate_args: check shapes, dtypes and the label range.

    Returns:
        ``() float`` scalar >= ``log C``.

    Example:
        >>> import math
        >>> logits = torch.tensor([[math.log(3.0), 0.0]])
        >>> # p = (0.75, 0.25): -(log 0.75 + log 0.25) / 2 = (0.287682 + 1.386294) / 2.
        >>> round(float(label_smoothing_penalty(logits, torch.tensor([0]))), 4)
        0.837
    """
    if validate_args:
        _check_inputs(logits, labels)
    logits = _at_least_float32(logits)
    labels = labels.long()

    return -logits.log_softmax(dim=1).mean(dim=1).mean()


# --------------------------------------------------------------------------------------------------
# Combined training loss
# --------------------------------------------------------------------------------------------------


def training_loss(
    logits: Tensor, labels: Tensor, config: CalibrationLossConfig, *, validate_args: bool = True
) -> Tensor:
    """Compute ``F.cross_entropy(logits, labels) + config.weight * term``.

    ``term`` is the penalty that ``config.name`` names (the focal loss itself for ``focal``, 0 for
    ``none``). With ``weight == 0`` or ``name == "none"`` the term is not computed and the result
    is bitwise ``F.cross_entropy`` of the float32 (or float64) logits.

    Args:
        logits: ``(N, C) float`` raw logits; float16 and bfloat16 are upcast to float32.
        labels: ``(N,) int64`` class indices in ``[0, C)``.
        config: the calibration term and its settings.
        validate_args: check shapes, dtypes and the label range.

    Returns:
        ``() float`` scalar.

    Example:
        >>> import math
        >>> logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
        >>> labels = torch.tensor([0, 0])
        >>> # CE = (-log 0.75 - log 0.25) / 2 = 0.836988, MDCA = 0.5: 0.836988 + 2 * 0.5.
        >>> round(float(training_loss(logits, labels, CalibrationLossConfig("mdca", weight=2.0))), 4)
        1.837
    """
    if not isinstance(config, CalibrationLossConfig):
        raise TypeError(f"config must be a CalibrationLossConfig, got {type(config).__name__}.")
    if validate_args:
        _check_inputs(logits, labels)
    logits = _at_least_float32(logits)
    labels = labels.long()

    cross_entropy = F.cross_entropy(logits, labels)
    # Skipping the term keeps weight 0 exact even where the term is inf or NaN (0 * inf = NaN).
    if config.name == "none" or config.weight == 0:
        return cross_entropy

    if config.name == "dca":
        term = dca_penalty(logits, labels, validate_args=False)
    elif config.name == "mdca":
        term = mdca_penalty(logits, labels, validate_args=False)
    elif config.name == "mbls":
        term = mbls_penalty(logits, labels, config.margin, validate_args=False)
    elif config.name == "focal":
        term = focal_loss(logits, labels, config.gamma, validate_args=False)
    elif config.name == "label_smoothing":
        term = label_smoothing_penalty(logits, labels, validate_args=False)
    else:
        raise ConfigError(f"loss.name must be one of {list(_LOSS_NAMES)}, got {config.name!r}.")
    return cross_entropy + config.weight * term
