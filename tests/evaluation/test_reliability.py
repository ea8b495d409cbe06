"""Tests for fl2ora.evaluation.reliability: reliability bins and the saved PNG."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch

from fl2ora.evaluation.calibration import expected_calibration_error, maximum_calibration_error
from fl2ora.evaluation.reliability import (
    FIGURE_DPI,
    FIGURE_SIZE_INCHES,
    plot_reliability_diagram,
    reliability_bins,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_probs(n_samples: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n_samples, n_classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (n_samples,), generator=generator)
    return logits.softmax(dim=1), labels


def test_plot_writes_valid_png(tmp_path):
    probs, labels = random_probs(300, 10, seed=0)
    path = tmp_path / "reliability.png"
    title = "ECE 12.34%\nrandom-initialised backbone: pipeline check, not a CLIP result"

    plot_reliability_diagram(probs, labels, path, n_bins=10, title=title)

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    width_px = round(FIGURE_SIZE_INCHES[0] * FIGURE_DPI)
    height_px = round(FIGURE_SIZE_INCHES[1] * FIGURE_DPI)
    assert image.shape[:2] == (height_px, width_px)
    assert image.shape[2] in (3, 4)
    # The drawing is not blank: more than one colour appears.
    assert np.unique(image.reshape(-1, image.shape[2]), axis=0).shape[0] > 10


def test_plot_accepts_string_path_and_overwrites(tmp_path):
    path = tmp_path / "diagram.png"
    path.write_bytes(b"old")
    probs = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    labels = torch.tensor([0, 0])

    plot_reliability_diagram(probs, labels, str(path), n_bins=5)

    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_missing_folder_raises(tmp_path):
    probs, labels = random_probs(10, 3, seed=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_reliability_diagram(probs, labels, tmp_path / "missing" / "plot.png")


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
def test_bins_match_numpy_histogram(n_bins):
    probs, labels = random_probs(500, 6, seed=n_bins)
    conf = probs.max(dim=1).values.numpy()
    correct = (probs.argmax(dim=1) == labels).numpy()
    # np.histogram uses left-closed bins and reliability_bins right-closed ones. Random
    # confidences lie on no edge, so both give the same counts.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    assert np.abs(conf[:, None] * n_bins - np.arange(n_bins + 1)).min() > 1e-9

    bins = reliability_bins(probs, labels, n_bins)

    expected_counts, _ = np.histogram(conf, edges)
    assert bins["counts"].sum() == len(conf)
    np.testing.assert_array_equal(bins["counts"], expected_counts)
    np.testing.assert_allclose(bins["edges"], edges, atol=1e-15)
    bin_index = np.clip(np.digitize(conf, edges) - 1, 0, n_bins - 1)
    for b in range(n_bins):
        in_bin = bin_index == b
        if in_bin.any():
            assert bins["accuracy"][b] == pytest.approx(correct[in_bin].mean())
            assert bins["confidence"][b] == pytest.approx(conf[in_bin].mean())
        else:
            assert np.isnan(bins["accuracy"][b])
            assert np.isnan(bins["confidence"][b])


def test_bins_give_the_same_ece_and_mce():
    # ECE and MCE recomputed from the reliability bins equal the metric functions.
    probs, labels = random_probs(400, 5, seed=7)
    bins = reliability_bins(probs, labels, 10)
    non_empty = bins["counts"] > 0
    gaps = np.abs(bins["accuracy"][non_empty] - bins["confidence"][non_empty])
    weights = bins["counts"][non_empty] / bins["counts"].sum()
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(np.sum(weights * gaps))
    assert maximum_calibration_error(probs, labels, 10) == pytest.approx(np.max(gaps))


def test_bins_count_confidence_one_in_last_bin():
    # Confidences 1.0, 1.0 and 0.3 with 10 bins: the 1.0s go to (0.9, 1], 0.3 to (0.2, 0.3].
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.3, 0.25, 0.25, 0.2]])
    labels = torch.tensor([0, 0, 0])
    bins = reliability_bins(probs, labels, 10)
    assert bins["counts"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 2]
    assert bins["accuracy"][9] == pytest.approx(0.5)
    assert bins["confidence"][9] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("probs", "labels", "n_bins", "match"),
    [
        (torch.tensor([[0.6, 0.4]]), torch.tensor([0]), 0, "n_bins must be a positive int"),
        (torch.tensor([0.6, 0.4]), torch.tensor([0]), 10, "probs must be 2-D"),
        (torch.tensor([[0.6, 0.6]]), torch.tensor([0]), 10, "sum to 1"),
        (torch.tensor([[0.6, 0.4]]), torch.tensor([2]), 10, r"labels must lie in \[0, 1\]"),
    ],
    ids=["n_bins zero", "probs 1-D", "rows not summing to 1", "label out of range"],
)
def test_invalid_input_raises(tmp_path, probs, labels, n_bins, match):
    with pytest.raises(ValueError, match=match):
        reliability_bins(probs, labels, n_bins)
    path = tmp_path / "plot.png"
    with pytest.raises(ValueError, match=match):
        plot_reliability_diagram(probs, labels, path, n_bins)
    assert not path.exists()
