"""Tests of the calibration losses against float64 NumPy reimplementations and hand values."""

from __future__ import annotations

import doctest
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fl2ora.losses as losses
from fl2ora.errors import ConfigError
from fl2ora.losses import (
    CalibrationLossConfig,
    dca_penalty,
    focal_loss,
    label_smoothing_penalty,
    mbls_penalty,
    mdca_penalty,
    training_loss,
)

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run torch on one thread for these tiny tensors.

    On a loaded 2-core machine, waking the intra-op thread pool took about 8 ms per softmax on an
    (8, 5) tensor (measured), which made the gradient checks about 20 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NAMES = ["none", "dca", "mdca", "mbls", "focal", "label_smoothing"]
SEEDS = [0, 1, 2]
CLASS_COUNTS = [2, 5]


# --------------------------------------------------------------------------------------------------
# Independent NumPy (float64) reimplementations
# --------------------------------------------------------------------------------------------------


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_cross_entropy(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_dca(z: np.ndarray, y: np.ndarray) -> float:
    p = np_softmax(z)
    return float(abs(p.max(axis=1).mean() - (p.argmax(axis=1) == y).mean()))


def np_mdca(z: np.ndarray, y: np.ndarray) -> float:
    n, c = z.shape
    frequencies = np.bincount(y, minlength=c) / n
    return float(np.abs(np_softmax(z).mean(axis=0) - frequencies).mean())


def np_mbls(z: np.ndarray, y: np.ndarray, margin: float) -> float:
    gaps = z.max(axis=1, keepdims=True) - z
    return float(np.maximum(0.0, gaps - margin).sum(axis=1).mean())


def np_focal(z: np.ndarray, y: np.ndarray, gamma: float | str) -> float:
    log_p = np_log_softmax(z)[np.arange(len(y)), y]
    p = np.exp(log_p)
    exponent = np.where(p < 0.2, 5.0, 3.0) if gamma == "adaptive" else np.full_like(p, gamma)
    return float(np.mean(-((1.0 - p) ** exponent) * log_p))


def np_label_smoothing(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z).mean(axis=1).mean())


def np_term(name: str, z: np.ndarray, y: np.ndarray, config: CalibrationLossConfig) -> float:
    if name == "none":
        return 0.0
    if name == "dca":
        return np_dca(z, y)
    if name == "mdca":
        return np_mdca(z, y)
    if name == "mbls":
        return np_mbls(z, y, config.margin)
    if name == "focal":
        return np_focal(z, y, config.gamma)
    return np_label_smoothing(z, y)


def random_batch(seed: int, n_classes: int, n_samples: int = 16, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, size=(n_samples, n_classes))
    y = rng.integers(0, n_classes, size=n_samples)
    return z, y


def as_tensors(z: np.ndarray, y: np.ndarray, dtype: torch.dtype = torch.float64):
    return torch.tensor(z, dtype=dtype), torch.tensor(y, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------------


def test_losses_hand_computed_example():
    # Logit rows (log 3, 0) and (0, log 3) give p = (0.75, 0.25) and (0.25, 0.75). Labels are (0, 0).
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    labels = torch.tensor([0, 0])

    # DCA: confidences 0.75 and 0.75, predictions (0, 1) so accuracy 0.5: |0.75 - 0.5| = 0.25.
    assert float(dca_penalty(logits, labels)) == pytest.approx(0.25, abs=1e-12)
    # MDCA: mean p = (0.5, 0.5), label frequencies (1, 0): (|0.5 - 1| + |0.5 - 0|) / 2 = 0.5.
    assert float(mdca_penalty(logits, labels)) == pytest.approx(0.5, abs=1e-12)
    # Label smoothing: each row has -(log 0.75 + log 0.25) / 2 = (0.2876821 + 1.3862944) / 2.
    assert float(label_smoothing_penalty(logits, labels)) == pytest.approx(0.8369882, abs=1e-7)
    # Focal, gamma 2: p_y = 0.75 and 0.25, so (0.0625 * 0.2876821 + 0.5625 * 1.3862944) / 2.
    assert float(focal_loss(logits, labels, gamma=2.0)) == pytest.approx(0.3988854, abs=1e-7)
    # Focal, adaptive: both p_y >= 0.2, so gamma 3: (0.015625 * 0.2876821 + 0.421875 * 1.3862944) / 2.
    assert float(focal_loss(logits, labels, gamma="adaptive")) == pytest.approx(0.2946690, abs=1e-7)
    # MbLS, margin 0.5: each row has one gap of log 3 = 1.0986123, exceeding 0.5 by 0.5986123.
    assert float(mbls_penalty(logits, labels, margin=0.5)) == pytest.approx(0.5986123, abs=1e-7)
    # CE = (0.2876821 + 1.3862944) / 2 = 0.8369882; with MDCA at weight 2: 0.8369882 + 1.0.
    config = CalibrationLossConfig("mdca", weight=2.0)
    assert float(training_loss(logits, labels, config)) == pytest.approx(1.8369882, abs=1e-7)


def test_focal_adaptive_low_probability():
    # logits (log 9, 0) with label 1: p_y = 0.1 < 0.2, so gamma 5: 0.9**5 * log 10 = 0.59049 * 2.3025851.
    logits = torch.tensor([[math.log(9.0), 0.0]], dtype=torch.float64)
    value = float(focal_loss(logits, torch.tensor([1]), gamma="adaptive"))
    assert value == pytest.approx(1.3596535, abs=1e-7)


def test_docstring_examples():
    result = doctest.testmod(losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8
    assert result.failed == 0


# --------------------------------------------------------------------------------------------------
# Agreement with NumPy on random inputs
# --------------------------------------------------------------------------------------------------


PENALTIES = {
    "dca": (dca_penalty, np_dca),
    "mdca": (mdca_penalty, np_mdca),
    "label_smoothing": (label_smoothing_penalty, np_label_smoothing),
    "mbls_margin_2": (partial(mbls_penalty, margin=2.0), partial(np_mbls, margin=2.0)),
    "mbls_margin_10": (partial(mbls_penalty, margin=10.0), partial(np_mbls, margin=10.0)),
    "focal_gamma_0": (partial(focal_loss, gamma=0.0), partial(np_focal, gamma=0.0)),
    "focal_gamma_1_5": (partial(focal_loss, gamma=1.5), partial(np_focal, gamma=1.5)),
    "focal_gamma_3": (partial(focal_loss, gamma=3.0), partial(np_focal, gamma=3.0)),
    "focal_adaptive": (partial(focal_loss, gamma="adaptive"), partial(np_focal, gamma="adaptive")),
}


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_penalty_matches_numpy(penalty, n_classes, seed):
    torch_fn, numpy_fn = PENALTIES[penalty]
    z, y = random_batch(seed, n_classes)
    expected = numpy_fn(z, y)

    value64 = torch_fn(*as_tensors(z, y, torch.float64))
    assert value64.dtype == torch.float64
    assert value64.ndim == 0
    assert float(value64) == pytest.approx(expected, rel=1e-10, abs=1e-12)

    value32 = torch_fn(*as_tensors(z, y, torch.float32))
    assert value32.dtype == torch.float32
    assert float(value32) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_mbls_matches_numpy_on_clip_scale(seed, n_classes):
    # CLIP-like logits: 100 times cosine similarities in roughly [-0.3, 0.3].
    rng = np.random.default_rng(seed)
    z = 100.0 * rng.uniform(-0.3, 0.3, size=(16, n_classes))
    y = rng.integers(0, n_classes, size=16)
    expected = np_mbls(z, y, 10.0)
    assert expected > 0
    assert float(mbls_penalty(*as_tensors(z, y), margin=10.0)) == pytest.approx(expected, rel=1e-10)


def test_focal_adaptive_uses_both_gammas():
    # Rows chosen so that p_y is 0.1 (gamma 5) and 0.6 (gamma 3).
    logits = torch.tensor([[math.log(9.0), 0.0], [math.log(1.5), 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    expected = (0.9**5 * -math.log(0.1) + 0.4**3 * -math.log(0.6)) / 2
    assert float(focal_loss(logits, labels, gamma="adaptive")) == pytest.approx(expected, rel=1e-12)
    assert float(focal_loss(logits, labels, gamma=3.0)) != pytest.approx(expected, rel=1e-3)


def test_focal_gamma_zero_equals_cross_entropy():
    z, y = random_batch(3, 5)
    logits, labels = as_tensors(z, y)
    value = float(focal_loss(logits, labels, gamma=0.0))
    assert value == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_training_loss_matches_numpy(name, n_classes, seed):
    z, y = random_batch(seed, n_classes)
    config = CalibrationLossConfig(name, weight=0.7, margin=2.0, gamma="adaptive")
    expected = np_cross_entropy(z, y) + 0.7 * np_term(name, z, y, config)
    value = float(training_loss(*as_tensors(z, y), config))
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Gradients against finite differences
# --------------------------------------------------------------------------------------------------


def gradcheck_inputs(seed: int, n_classes: int):
    z, y = random_batch(seed, n_classes, n_samples=8)
    logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    return logits, torch.tensor(y, dtype=torch.int64)


def away_from_kinks(name: str, logits: torch.Tensor, labels: torch.Tensor, margin: float) -> bool:
    """Whether finite differences of width 1e-6 stay on one side of every kink of the term."""
    z = logits.detach()
    p = z.softmax(dim=1)
    top2 = z.topk(2, dim=1).values
    no_ties = bool((top2[:, 0] - top2[:, 1] > 1e-3).all())
    if name == "dca":
        accuracy = (p.argmax(dim=1) == labels).double().mean()
        return no_ties and abs(float(p.max(dim=1).values.mean() - accuracy)) > 1e-3
    if name == "mdca":
        frequencies = F.one_hot(labels, z.shape[1]).double().mean(dim=0)
        return bool(((p.mean(dim=0) - frequencies).abs() > 1e-3).all())
    if name == "mbls":
        gaps = z.max(dim=1, keepdim=True).values - z
        return no_ties and bool(((gaps - margin).abs() > 1e-3).all())
    if name == "focal_adaptive":
        p_true = p.gather(1, labels.unsqueeze(1))
        return bool(((p_true - 0.2).abs() > 1e-3).all())
    return True


GRAD_FUNCTIONS = {
    "dca": dca_penalty,
    "mdca": mdca_penalty,
    "mbls": partial(mbls_penalty, margin=2.0),
    "focal_gamma_2": partial(focal_loss, gamma=2.0),
    "focal_gamma_0_5": partial(focal_loss, gamma=0.5),
    "focal_adaptive": partial(focal_loss, gamma="adaptive"),
    "label_smoothing": label_smoothing_penalty,
}


@pytest.mark.parametrize("name", sorted(GRAD_FUNCTIONS))
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_penalty_gradient_matches_finite_differences(name, n_classes, seed):
    logits, labels = gradcheck_inputs(seed, n_classes)
    assert away_from_kinks(name, logits, labels, margin=2.0)
    function = GRAD_FUNCTIONS[name]
    assert torch.autograd.gradcheck(lambda z: function(z, labels), (logits,))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_training_loss_gradient_matches_finite_differences(name, n_classes):
    logits, labels = gradcheck_inputs(4, n_classes)
    config = CalibrationLossConfig(name, weight=0.7, margin=2.0, gamma="adaptive")
    kink_name = "focal_adaptive" if name == "focal" else name
    assert away_from_kinks(kink_name, logits, labels, margin=2.0)
    assert torch.autograd.gradcheck(lambda z: training_loss(z, labels, config), (logits,))


def test_dca_gradient_ignores_accuracy():
    # d/dz of |mean conf - acc| is sign(mean conf - acc) * d(mean conf)/dz, accuracy contributing nothing.
    logits, labels = gradcheck_inputs(0, 5)
    dca_penalty(logits, labels).backward()
    confidence = logits.detach().clone().requires_grad_(True)
    mean_confidence = confidence.softmax(dim=1).max(dim=1).values.mean()
    mean_confidence.backward()
    p = logits.detach().softmax(dim=1)
    accuracy = (p.argmax(dim=1) == labels).double().mean()
    sign = float(torch.sign(p.max(dim=1).values.mean() - accuracy))
    torch.testing.assert_close(logits.grad, sign * confidence.grad)


def test_focal_fractional_gamma_finite_gradient():
    # p_y rounds to exactly 1 in float32, where (1 - p)**0.5 has an infinite derivative.
    logits = torch.tensor([[100.0, 0.0], [0.3, 0.1]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0, 1]), gamma=0.5)
    loss.backward()
    assert bool(torch.isfinite(loss))
    assert bool(torch.isfinite(logits.grad).all())


# --------------------------------------------------------------------------------------------------
# training_loss: weight 0, precision, label smoothing identity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_training_loss_weight_zero_exact(name, n_classes):
    z, y = random_batch(5, n_classes, scale=30.0)
    logits = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor(y)
    config = CalibrationLossConfig(name, weight=0.0, gamma=0.5)

    loss = training_loss(logits, labels, config)
    loss.backward()
    reference_logits = logits.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(reference_logits, labels)
    reference.backward()

    assert torch.equal(loss, reference)
    assert torch.equal(logits.grad, reference_logits.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_training_loss_half_precision_in_float32(dtype, name):
    z, y = random_batch(6, 5)
    logits = torch.tensor(z, dtype=dtype, requires_grad=True)
    labels = torch.tensor(y)
    config = CalibrationLossConfig(name, weight=0.5, margin=2.0)

    loss = training_loss(logits, labels, config)
    loss.backward()
    expected = training_loss(logits.detach().float(), labels, config)

    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected)
    assert logits.grad.dtype == dtype
    assert bool(torch.isfinite(logits.grad.float()).all())


def test_training_loss_half_precision_weight_zero():
    z, y = random_batch(7, 5)
    logits = torch.tensor(z, dtype=torch.bfloat16)
    labels = torch.tensor(y)
    loss = training_loss(logits, labels, CalibrationLossConfig("mdca", weight=0.0))
    assert torch.equal(loss, F.cross_entropy(logits.float(), labels))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_training_loss_narrow_integer_labels(dtype, name):
    logits, labels = as_tensors(*random_batch(8, 5))
    config = CalibrationLossConfig(name, weight=0.7, margin=2.0)
    expected = training_loss(logits, labels, config)
    assert torch.equal(training_loss(logits, labels.to(dtype), config), expected)


@pytest.mark.parametrize("weight", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_label_smoothing_identity(seed, n_classes, weight):
    # CE + w * U = (1 + w) * ((1 - eps) * CE + eps * U) with eps = w / (1 + w).
    logits, labels = as_tensors(*random_batch(seed, n_classes))
    config = CalibrationLossConfig("label_smoothing", weight=weight)
    epsilon = weight / (1.0 + weight)
    expected = (1.0 + weight) * F.cross_entropy(logits, labels, label_smoothing=epsilon)
    torch.testing.assert_close(training_loss(logits, labels, config), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Invalid configuration and inputs
# --------------------------------------------------------------------------------------------------


def test_config_defaults():
    config = CalibrationLossConfig()
    assert config.name == "none"
    assert config.weight == 1.0
    assert config.margin == 10.0
    assert config.gamma == 3.0
    assert CalibrationLossConfig(gamma="adaptive").gamma == "adaptive"
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": -1.0}, r"loss\.weight must be a finite number >= 0, got -1\.0"),
        ({"weight": float("nan")}, r"loss\.weight must be a finite number >= 0, got nan"),
        ({"weight": True}, r"loss\.weight must be a finite number >= 0, got True"),
        ({"gamma": -2.0}, r"loss\.gamma must be a finite number >= 0 or 'adaptive', got -2\.0"),
        ({"gamma": "fast"}, r"loss\.gamma must be a finite number >= 0 or 'adaptive', got 'fast'"),
        ({"gamma": float("inf")}, r"loss\.gamma must be a finite number >= 0 or 'adaptive', got inf"),
        ({"name": "brier"}, r"loss\.name must be one of \['none', 'dca', .*\], got 'brier'"),
        ({"margin": 0.0}, r"loss\.margin must be a finite number > 0, got 0\.0"),
        ({"margin": -5.0}, r"loss\.margin must be a finite number > 0, got -5\.0"),
    ],
)
def test_config_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationLossConfig(**kwargs)


def _logits(n: int = 4, c: int = 3) -> torch.Tensor:
    return torch.zeros(n, c)


INVALID_INPUTS = {
    # name: (logits, labels, message pattern)
    "logits_1d": (torch.zeros(4), torch.zeros(4, dtype=torch.int64), r"logits must be 2-D"),
    "logits_3d": (torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.int64), r"logits must be 2-D"),
    "logits_integer": (
        torch.zeros(4, 3, dtype=torch.int64),
        torch.zeros(4, dtype=torch.int64),
        r"logits must have a floating dtype",
    ),
    "logits_empty": (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), r"at least one sample"),
    "labels_2d": (_logits(), torch.zeros(4, 1, dtype=torch.int64), r"labels must be 1-D"),
    "labels_float": (_logits(), torch.zeros(4), r"labels must have an integer dtype"),
    "length_mismatch": (_logits(), torch.zeros(5, dtype=torch.int64), r"got 5 labels for N = 4 rows"),
    "label_negative": (_logits(), torch.tensor([0, -1, 1, 2]), r"\[0, 2\] .* from -1 to 2"),
    "label_too_large": (_logits(), torch.tensor([0, 3, 1, 2]), r"\[0, 2\] .* from 0 to 3"),
}

LOSS_FUNCTIONS = {
    "dca": dca_penalty,
    "mdca": mdca_penalty,
    "mbls": mbls_penalty,
    "focal": focal_loss,
    "label_smoothing": label_smoothing_penalty,
    "training_loss": partial(training_loss, config=CalibrationLossConfig("mdca")),
}


@pytest.mark.parametrize("case", sorted(INVALID_INPUTS))
@pytest.mark.parametrize("function", sorted(LOSS_FUNCTIONS))
def test_invalid_inputs(function, case):
    logits, labels, match = INVALID_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        LOSS_FUNCTIONS[function](logits, labels)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (partial(mbls_penalty, margin=0.0), r"margin must be a finite number > 0, got 0\.0"),
        (partial(mbls_penalty, margin=-1.0), r"margin must be a finite number > 0, got -1\.0"),
        (partial(focal_loss, gamma=-2.0), r"gamma must be a finite number >= 0 or 'adaptive', got -2\.0"),
        (partial(focal_loss, gamma="fast"), r"gamma must be a finite number >= 0 or 'adaptive', got 'fast'"),
    ],
)
def test_invalid_loss_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(_logits(), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize(
    ("logits", "labels", "config", "match"),
    [
        ([[0.0, 1.0]], torch.tensor([0]), CalibrationLossConfig(), r"logits must be a torch\.Tensor"),
        (torch.zeros(1, 2), [0], CalibrationLossConfig(), r"labels must be a torch\.Tensor"),
        (torch.zeros(1, 2), torch.tensor([0]), {"name": "dca"}, r"config must be a CalibrationLossConfig"),
    ],
)
def test_invalid_types(logits, labels, config, match):
    with pytest.raises(TypeError, match=match):
        training_loss(logits, labels, config)
