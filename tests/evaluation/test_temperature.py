"""Tests for fl2ora.evaluation.temperature against numpy NLL computations and known temperatures."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fl2ora.evaluation import temperature as temperature_module
from fl2ora.evaluation.calibration import (
    accuracy,
    expected_calibration_error,
    negative_log_likelihood,
)
from fl2ora.evaluation.temperature import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    apply_temperature,
    fit_temperature,
    fit_temperature_federated,
    fit_temperature_per_client_average,
    local_nll_and_gradient,
)

# The synthetic model is this many times too confident: its logits are the true logits times 3.
OVERCONFIDENCE = 3.0


def calibrated_logits(
    n_samples: int, n_classes: int, seed: int, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return random logits z and labels drawn from softmax(z), so that T = 1 is calibrated."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n_samples, n_classes, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def numpy_nll_per_sample(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> np.ndarray:
    """Return -log softmax(logits / T)[y] per sample, computed in numpy."""
    scaled = logits.numpy().astype(np.float64) / temperature
    row_max = scaled.max(axis=1, keepdims=True)
    log_normaliser = row_max[:, 0] + np.log(np.exp(scaled - row_max).sum(axis=1))
    return log_normaliser - scaled[np.arange(scaled.shape[0]), labels.numpy()]


def split_with_label_skew(
    logits: torch.Tensor, labels: torch.Tensor, sizes: list[int], seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split samples into clients of the given sizes and Dirichlet(0.3) class preferences."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = logits.shape[1]
    remaining = torch.arange(logits.shape[0])
    clients = []
    for size in sizes:
        preference = torch.from_numpy(rng.dirichlet(np.full(n_classes, 0.3)))
        weights = preference[labels[remaining]] + 1e-6
        chosen = torch.multinomial(weights, size, replacement=False, generator=generator)
        indices = remaining[chosen]
        clients.append((logits[indices], labels[indices]))
        keep = torch.ones(remaining.shape[0], dtype=torch.bool)
        keep[chosen] = False
        remaining = remaining[keep]
    return clients


@pytest.fixture(scope="module")
def true_data() -> tuple[torch.Tensor, torch.Tensor]:
    return calibrated_logits(20_000, 10, seed=0)


@pytest.fixture(scope="module")
def overconfident_data(true_data) -> tuple[torch.Tensor, torch.Tensor, float]:
    logits, labels = true_data
    overconfident = OVERCONFIDENCE * logits
    return overconfident, labels, fit_temperature(overconfident, labels)


@pytest.fixture(scope="module")
def small_overconfident_data(overconfident_data) -> tuple[torch.Tensor, torch.Tensor, float]:
    logits, labels, _ = overconfident_data
    logits, labels = logits[:4000], labels[:4000]
    return logits, labels, fit_temperature(logits, labels)


@pytest.fixture(scope="module")
def skewed_clients() -> list[tuple[torch.Tensor, torch.Tensor]]:
    logits, labels = calibrated_logits(9_000, 10, seed=2)
    sizes = [150, 850, 2500, 5500]
    return split_with_label_skew(OVERCONFIDENCE * logits, labels, sizes=sizes, seed=3)


# --------------------------------------------------------------------------------------------------
# Central fit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 3.0])
def test_fit_recovers_known_temperature(true_data, true_temperature):
    logits, labels = true_data

    fitted = fit_temperature(logits * true_temperature, labels)

    assert abs(fitted / true_temperature - 1.0) < 0.03


def test_fit_minimises_numpy_nll(overconfident_data):
    logits, labels, fitted = overconfident_data

    # A grid of 41 temperatures 0.1% apart in log T, centred on the fitted one.
    grid = fitted * np.exp(np.linspace(-0.02, 0.02, 41))
    grid_nll = [numpy_nll_per_sample(logits, labels, t).mean() for t in grid]

    assert int(np.argmin(grid_nll)) == 20


def test_fit_keeps_accuracy_and_lowers_nll(overconfident_data):
    logits, labels, fitted = overconfident_data
    probs_before = logits.softmax(dim=1)
    probs_after = apply_temperature(logits, fitted)

    assert fitted > 1.0
    assert torch.equal(probs_after.argmax(dim=1), probs_before.argmax(dim=1))
    assert accuracy(probs_after, labels) == accuracy(probs_before, labels)
    nll_before = negative_log_likelihood(probs_before, labels)
    nll_after = negative_log_likelihood(probs_after, labels)
    assert nll_after < nll_before
    expected_nll = numpy_nll_per_sample(logits, labels, fitted).mean()
    assert nll_after == pytest.approx(expected_nll, rel=1e-10)


def test_fit_lowers_ece_when_overconfident(overconfident_data):
    logits, labels, fitted = overconfident_data

    ece_before = expected_calibration_error(logits.softmax(dim=1), labels)
    ece_after = expected_calibration_error(apply_temperature(logits, fitted), labels)

    assert ece_before > 0.1
    assert ece_after < 0.02
    assert ece_after < ece_before


def test_fit_accepts_log_probabilities(small_overconfident_data):
    logits, labels, fitted = small_overconfident_data
    row_shift = torch.linspace(-50.0, 50.0, logits.shape[0], dtype=torch.float64).unsqueeze(1)

    from_log_probs = fit_temperature(logits.softmax(dim=1).log(), labels)
    from_shifted = fit_temperature(logits + row_shift, labels)

    assert from_log_probs == pytest.approx(fitted, rel=1e-6)
    assert from_shifted == pytest.approx(fitted, rel=1e-6)


def test_fit_float32_logits_match_float64(small_overconfident_data):
    logits, labels, fitted = small_overconfident_data

    assert fit_temperature(logits.to(torch.float32), labels) == pytest.approx(fitted, rel=1e-5)


def test_fit_separable_returns_lower_bound(caplog):
    # Every prediction is correct with a margin of at least 2, so the NLL falls as T goes to 0.
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, -1.0], [-1.0, 0.0, 4.0]])
    labels = logits.argmax(dim=1)

    with caplog.at_level(logging.WARNING, logger=temperature_module.__name__):
        fitted = fit_temperature(logits, labels)

    assert fitted == MIN_TEMPERATURE
    assert "smallest temperature" in caplog.text


def test_fit_uninformative_returns_upper_bound(caplog):
    # Each sample's label is its least likely class, so uniform probabilities (T -> inf) are best.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = logits.argmin(dim=1)

    with caplog.at_level(logging.WARNING, logger=temperature_module.__name__):
        fitted = fit_temperature(logits, labels)

    assert fitted == MAX_TEMPERATURE
    assert "largest temperature" in caplog.text


# --------------------------------------------------------------------------------------------------
# apply_temperature and local_nll_and_gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.25, 1.0, 7.0])
def test_apply_matches_numpy_softmax(temperature):
    logits, _ = calibrated_logits(50, 6, seed=4)
    scaled = logits.numpy() / temperature
    expected = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)

    probs = apply_temperature(logits, temperature)

    assert probs.dtype == torch.float64
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("dtype", "expected_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
    ],
)
def test_apply_low_precision_returns_float32(dtype, expected_dtype):
    logits, _ = calibrated_logits(50, 6, seed=5)

    probs = apply_temperature(logits.to(dtype), 2.0)

    assert probs.dtype == expected_dtype
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(50), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_local_values_match_numpy(temperature):
    logits, labels = calibrated_logits(500, 7, seed=6)
    log_t = math.log(temperature)
    step = 1e-5

    nll, gradient, n_samples = local_nll_and_gradient(logits, labels, temperature)

    assert n_samples == 500
    assert nll == pytest.approx(numpy_nll_per_sample(logits, labels, temperature).sum(), rel=1e-12)
    nll_up = numpy_nll_per_sample(logits, labels, math.exp(log_t + step)).sum()
    nll_down = numpy_nll_per_sample(logits, labels, math.exp(log_t - step)).sum()
    finite_difference = (nll_up - nll_down) / (2 * step)
    assert gradient == pytest.approx(finite_difference, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Federated and per-client fits
# --------------------------------------------------------------------------------------------------


def test_federated_equals_pooled_fit(skewed_clients):
    pooled_logits = torch.cat([logits for logits, _ in skewed_clients])
    pooled_labels = torch.cat([labels for _, labels in skewed_clients])
    # The split must have skewed the clients' label distributions, or the test shows little.
    histograms = torch.stack(
        [torch.bincount(labels, minlength=10) / labels.numel() for _, labels in skewed_clients]
    )
    assert float((histograms.max(dim=0).values - histograms.min(dim=0).values).max()) > 0.3

    federated = fit_temperature_federated(skewed_clients)
    pooled = fit_temperature(pooled_logits, pooled_labels)

    assert federated == pytest.approx(pooled, abs=1e-4)
    assert pooled > 1.5


def test_federated_rounds_query_every_client(skewed_clients, monkeypatch):
    calls = []
    original = temperature_module.local_nll_and_gradient

    def recording_client(logits, labels, temperature):
        calls.append((logits.data_ptr(), temperature))
        return original(logits, labels, temperature)

    monkeypatch.setattr(temperature_module, "local_nll_and_gradient", recording_client)
    max_iter = 30

    fit_temperature_federated(skewed_clients, max_iter=max_iter)

    n_clients = len(skewed_clients)
    client_order = [logits.data_ptr() for logits, _ in skewed_clients]
    assert len(calls) % n_clients == 0
    n_rounds = len(calls) // n_clients
    assert 3 < n_rounds <= max_iter + 3
    for round_index in range(n_rounds):
        round_calls = calls[round_index * n_clients : (round_index + 1) * n_clients]
        assert [pointer for pointer, _ in round_calls] == client_order
        assert len({temperature for _, temperature in round_calls}) == 1


def test_federated_one_client_equals_central(small_overconfident_data):
    logits, labels, fitted = small_overconfident_data

    assert fit_temperature_federated([(logits, labels)]) == pytest.approx(fitted, abs=1e-6)


def test_federated_separable_returns_lower_bound(caplog):
    client_a = (torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))
    client_b = (torch.tensor([[1.0, -1.0]]), torch.tensor([0]))

    with caplog.at_level(logging.WARNING, logger=temperature_module.__name__):
        fitted = fit_temperature_federated([client_a, client_b])

    assert fitted == MIN_TEMPERATURE
    assert "smallest temperature" in caplog.text


@pytest.mark.parametrize("federated", [False, True])
def test_fit_warns_when_max_iter_reached(small_overconfident_data, caplog, federated):
    logits, labels, _ = small_overconfident_data

    with caplog.at_level(logging.WARNING, logger=temperature_module.__name__):
        if federated:
            fit_temperature_federated([(logits, labels)], max_iter=1)
        else:
            fit_temperature(logits, labels, max_iter=1)

    assert "Raise max_iter" in caplog.text


@pytest.fixture(scope="module")
def individual_fits(skewed_clients) -> list[float]:
    return [fit_temperature(logits, labels) for logits, labels in skewed_clients]


def test_per_client_average_weights_by_count(skewed_clients, individual_fits):
    individual = individual_fits
    counts = [labels.numel() for _, labels in skewed_clients]

    averaged = fit_temperature_per_client_average(skewed_clients)

    assert averaged == pytest.approx(np.average(individual, weights=counts), rel=1e-12)
    # Individual fits on label-skewed clients differ, so the weights change the average.
    assert max(individual) - min(individual) > 1e-3


def test_per_client_average_explicit_weights(skewed_clients, individual_fits):
    individual = individual_fits

    equal = fit_temperature_per_client_average(skewed_clients, weights=[1.0, 1.0, 1.0, 1.0])
    first_only = fit_temperature_per_client_average(
        skewed_clients, weights=torch.tensor([2.0, 0.0, 0.0, 0.0])
    )

    assert equal == pytest.approx(float(np.mean(individual)), rel=1e-12)
    assert first_only == pytest.approx(individual[0], rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Invalid inputs
# --------------------------------------------------------------------------------------------------

GOOD_LOGITS = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]])
GOOD_LABELS = torch.tensor([0, 2])
GOOD_CLIENTS = [(GOOD_LOGITS, GOOD_LABELS), (GOOD_LOGITS[:1], GOOD_LABELS[:1])]
LONG = torch.long


@pytest.mark.parametrize(
    ("function", "kwargs", "error", "match"),
    [
        # logits are class indices
        (
            fit_temperature,
            {"logits": torch.tensor([[1, 0], [0, 1]]), "labels": GOOD_LABELS},
            ValueError,
            "floating dtype",
        ),
        # logits are 1-D
        (fit_temperature, {"logits": torch.zeros(3), "labels": torch.tensor([0, 1, 0])}, ValueError, "2-D"),
        # no samples
        (
            fit_temperature,
            {"logits": torch.zeros(0, 3), "labels": torch.zeros(0, dtype=LONG)},
            ValueError,
            "N >= 1",
        ),
        # one class
        (
            fit_temperature,
            {"logits": torch.zeros(4, 1), "labels": torch.zeros(4, dtype=LONG)},
            ValueError,
            "C >= 2",
        ),
        # -inf from the log of a zero probability
        (
            fit_temperature,
            {"logits": torch.tensor([[0.0, -math.inf], [0.0, 0.0]]), "labels": torch.tensor([0, 1])},
            ValueError,
            "clamp_min",
        ),
        # NaN logit
        (
            fit_temperature,
            {"logits": torch.tensor([[0.0, math.nan]]), "labels": torch.tensor([0])},
            ValueError,
            "finite",
        ),
        # labels of the wrong length
        (
            fit_temperature,
            {"logits": GOOD_LOGITS, "labels": torch.tensor([0])},
            ValueError,
            "one entry per sample",
        ),
        # label outside [0, C)
        (fit_temperature, {"logits": GOOD_LOGITS, "labels": torch.tensor([0, 3])}, ValueError, r"\[0, 2\]"),
        # float labels
        (
            fit_temperature,
            {"logits": GOOD_LOGITS, "labels": torch.tensor([0.0, 1.0])},
            ValueError,
            "integer dtype",
        ),
        # logits not a tensor
        (fit_temperature, {"logits": [[1.0, 0.0]], "labels": torch.tensor([0])}, TypeError, "torch.Tensor"),
        # max_iter zero, tol negative
        (fit_temperature, {"logits": GOOD_LOGITS, "labels": GOOD_LABELS, "max_iter": 0}, ValueError, "max_iter"),
        (fit_temperature, {"logits": GOOD_LOGITS, "labels": GOOD_LABELS, "tol": -1e-8}, ValueError, "tol"),
        # temperature zero, negative, infinite, NaN, not a number
        (apply_temperature, {"logits": GOOD_LOGITS, "temperature": 0.0}, ValueError, "> 0, got 0.0"),
        (apply_temperature, {"logits": GOOD_LOGITS, "temperature": -2.0}, ValueError, "got -2.0"),
        (apply_temperature, {"logits": GOOD_LOGITS, "temperature": math.inf}, ValueError, "got inf"),
        (
            local_nll_and_gradient,
            {"logits": GOOD_LOGITS, "labels": GOOD_LABELS, "temperature": math.nan},
            ValueError,
            "got nan",
        ),
        (apply_temperature, {"logits": GOOD_LOGITS, "temperature": "2"}, TypeError, "real number"),
        # apply_temperature with 3-D logits
        (apply_temperature, {"logits": torch.zeros(2, 3, 4), "temperature": 1.0}, ValueError, "2-D"),
        # local values with labels of the wrong length
        (
            local_nll_and_gradient,
            {"logits": GOOD_LOGITS, "labels": torch.tensor([0, 1, 2]), "temperature": 1.0},
            ValueError,
            "one entry per sample",
        ),
        # no clients
        (fit_temperature_federated, {"client_data": []}, ValueError, "empty"),
        # a client given as a bare tensor
        (
            fit_temperature_federated,
            {"client_data": [GOOD_LOGITS]},
            ValueError,
            r"client_data\[0\] must be a \(logits, labels\) pair",
        ),
        # clients with different numbers of classes
        (
            fit_temperature_federated,
            {"client_data": [(GOOD_LOGITS, GOOD_LABELS), (torch.zeros(1, 2), torch.tensor([0]))]},
            ValueError,
            "same C classes",
        ),
        # the client with a bad label is named
        (
            fit_temperature_federated,
            {"client_data": [(GOOD_LOGITS, GOOD_LABELS), (GOOD_LOGITS, torch.tensor([0, 5]))]},
            ValueError,
            r"client_data\[1\] labels",
        ),
        # federated max_iter not an int
        (fit_temperature_federated, {"client_data": GOOD_CLIENTS, "max_iter": 2.5}, ValueError, "max_iter"),
        # weights of the wrong length, negative, summing to 0, or NaN
        (
            fit_temperature_per_client_average,
            {"client_data": GOOD_CLIENTS, "weights": [1.0]},
            ValueError,
            "one entry per client",
        ),
        (
            fit_temperature_per_client_average,
            {"client_data": GOOD_CLIENTS, "weights": [1.0, -1.0]},
            ValueError,
            "non-negative",
        ),
        (
            fit_temperature_per_client_average,
            {"client_data": GOOD_CLIENTS, "weights": [0.0, 0.0]},
            ValueError,
            "positive sum",
        ),
        (
            fit_temperature_per_client_average,
            {"client_data": GOOD_CLIENTS, "weights": [1.0, math.nan]},
            ValueError,
            "finite",
        ),
    ],
)
def test_invalid_inputs_raise(function, kwargs, error, match):
    with pytest.raises(error, match=match):
        function(**kwargs)
