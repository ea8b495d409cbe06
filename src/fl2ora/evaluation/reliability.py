"""Reliability diagrams of the top-label confidence, saved as PNG files.

The bins are those of :func:`fl2ora.evaluation.calibration.expected_calibration_error`
(equal-width, right-closed, a confidence of 1.0 in the last bin), so the plotted gaps are the
terms of the ECE sum. Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas,
which neither selects a global backend nor touches pyplot's figure registry, so this module is
safe to use from threads and headless workers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from fl2ora.evaluation.calibration import top_label_bin_statistics

logger = logging.getLogger(__name__)

__all__ = ["FIGURE_DPI", "FIGURE_SIZE_INCHES", "plot_reliability_diagram", "reliability_bins"]

FIGURE_SIZE_INCHES: tuple[float, float] = (5.0, 6.0)
"""Width and height of the saved figure in inches."""

FIGURE_DPI: int = 100
"""Resolution of the saved PNG, so the image is 500 x 600 pixels."""


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Compute the per-bin statistics of a reliability diagram.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        n_bins: number of equal-width bins ``M``.

    Returns:
        A dict of ``(M,)`` numpy arrays: ``"counts"`` (int64, summing to N), ``"accuracy"`` and
        ``"confidence"`` (float64 means of the top-label correctness and confidence, NaN for
        empty bins), and ``"edges"`` with the ``M + 1`` bin edges ``m / M``.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.

    Example:
        >>> import torch
        >>> bins = reliability_bins(
        ...     torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]),
        ...     torch.tensor([0, 1, 1, 1]), n_bins=5)
        >>> bins["counts"].tolist()
        [0, 0, 1, 2, 1]
        >>> bins["accuracy"].round(4).tolist()
        [nan, nan, 1.0, 0.5, 1.0]
    """
    stats = top_label_bin_statistics(probs, labels, n_bins)
    return {
        "counts": stats.counts.cpu().numpy().astype(np.int64),
        "accuracy": stats.accuracy.cpu().numpy(),
        "confidence": stats.confidence.cpu().numpy(),
        "edges": np.arange(n_bins + 1, dtype=np.float64) / n_bins,
    }


def plot_reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    path: str | Path,
    n_bins: int = 10,
    title: str = "Reliability diagram",
) -> None:
    """Draw a reliability diagram with a confidence histogram and save it as a PNG.

    The upper panel has one bar per non-empty bin at the bin's accuracy, a hatched band between
    the accuracy and the bin's mean confidence (the gap that ECE weights), and the diagonal of
    perfect calibration. The lower panel shows the share of samples in each bin. The figure is
    ``FIGURE_SIZE_INCHES`` at ``FIGURE_DPI``.

    Args:
        probs: ``(N, C) float`` predicted probabilities, rows summing to 1.
        labels: ``(N,) int64`` true classes in ``[0, C)``.
        path: output PNG file. Its parent folder must exist, and an existing file is overwritten.
        n_bins: number of equal-width bins ``M``.
        title: figure title. It may contain line breaks, for example to add the ECE and a note
            that the backbone was random-initialised.

    Raises:
        ValueError: if ``n_bins``, ``probs`` or ``labels`` is invalid.
        FileNotFoundError: if the parent folder of ``path`` does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write the reliability diagram to {str(path)!r}: folder "
            f"{str(path.parent)!r} does not exist. Create it first."
        )
    bins = reliability_bins(probs, labels, n_bins)
    counts, bin_acc, bin_conf = bins["counts"], bins["accuracy"], bins["confidence"]
    left_edges = bins["edges"][:-1]
    width = 1.0 / n_bins
    non_empty = counts > 0

    # The constrained layout makes room for a title of several lines.
    fig = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax_rel = fig.add_subplot(grid[0])
    ax_hist = fig.add_subplot(grid[1], sharex=ax_rel)

    # Accuracy bars, then the gap between accuracy and mean confidence of each non-empty bin.
    ax_rel.bar(
        left_edges[non_empty], bin_acc[non_empty], width=width, align="edge",
        color="tab:blue", edgecolor="black", linewidth=0.6, label="Accuracy", zorder=2,
    )
    gap_bottom = np.minimum(bin_acc[non_empty], bin_conf[non_empty])
    gap_height = np.abs(bin_acc[non_empty] - bin_conf[non_empty])
    ax_rel.bar(
        left_edges[non_empty], gap_height, bottom=gap_bottom, width=width, align="edge",
        color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6,
        label="Gap to mean confidence", zorder=3,
    )
    ax_rel.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="Perfect calibration", zorder=4)
    ax_rel.set_xlim(0.0, 1.0)
    ax_rel.set_ylim(0.0, 1.0)
    ax_rel.set_ylabel("Accuracy")
    ax_rel.legend(loc="upper left", fontsize="small")
    ax_rel.grid(linestyle=":", linewidth=0.5, zorder=0)
    ax_rel.tick_params(labelbottom=False)

    # Share of samples per bin, so sparse bins with large gaps are easy to spot.
    ax_hist.bar(
        left_edges, counts / counts.sum(), width=width, align="edge",
        color="tab:gray", edgecolor="black", linewidth=0.6,
    )
    ax_hist.set_xlim(0.0, 1.0)
    ax_hist.set_xlabel("Confidence")
    ax_hist.set_ylabel("Share of samples")

    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=FIGURE_DPI)
    logger.info("saved reliability diagram (%d samples, %d bins) to %s", int(counts.sum()), n_bins, path)
