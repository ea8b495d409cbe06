"""Post-hoc temperature scaling, fitted centrally, federated, or per client and averaged.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides
the logits of a trained model by one scalar ``T > 0`` chosen to minimise the negative
log-likelihood (NLL) of held-out labels. It never changes the predicted class. The FL²oRA study
argues that FL²oRA is calibrated without it, so fl2ora offers it as the reference point.

Every function takes ``logits: (N, C) float`` and ``labels: (N,) int64``. Log-probabilities work
as logits because ``log_softmax`` is shift invariant per row: ``softmax(log(p) / T)`` is ``p``
raised to ``1 / T`` and renormalised. fl2ora stores probabilities, so pass
``probs.clamp_min(1e-12).log()`` (the clamp of ``calibration.NLL_EPS``), because a probability of
exactly 0 gives ``-inf``, which the fitters reject.

The temperature is fitted as ``T = exp(s)``, which keeps it positive. With ``beta = 1 / T`` the
mean NLL is a sum of log-sum-exps of functions linear in ``beta``, so it is convex in ``beta``,
and strictly convex unless every row of logits is constant. So it has one minimum in ``s``, and
its derivative in ``s`` changes sign once. The fitters search ``T`` in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` and return a bound
with a warning when the minimum lies beyond it, for example when every validation prediction is
correct and the NLL keeps falling as ``T`` goes to 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor

from fl2ora.evaluation.calibration import _check_labels

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "apply_temperature",
    "fit_temperature",
    "fit_temperature_federated",
    "fit_temperature_per_client_average",
    "local_nll_and_gradient",
]

MIN_TEMPERATURE: float = 1e-3
"""Smallest temperature the fitters return."""

MAX_TEMPERATURE: float = 1e3
"""Largest temperature the fitters return."""

_LOG_T_BOUNDS = (math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, C), got {type(logits).__name__}."
        )
    if not logits.is_floating_point():
        raise ValueError(
            f"{name} must have a floating dtype, got {logits.dtype}. Pass logits or "
            "log-probabilities, not class indices."
        )
    if logits.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (N, C), got shape {tuple(logits.shape)}. "
            "Flatten extra dimensions into N first."
        )
    if logits.shape[0] < 1:
        raise ValueError(f"{name} must contain at least one sample (N >= 1), got N = 0.")
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name} must have at least 2 classes (C >= 2), got C = {logits.shape[1]}. "
            "With one class every temperature gives the same probabilities."
        )
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise ValueError(
            f"{name} must be finite, but {bad} rows contain NaN or inf. For log-probabilities, "
            "clamp the probabilities first: probs.clamp_min(1e-12).log()."
        )


def _check_logits_and_labels(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    _check_logits(logits, name)
    label_name = name.replace("logits", "labels")
    _check_labels(labels, n_samples=logits.shape[0], n_classes=logits.shape[1], name=label_name)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, Tensor) and temperature.numel() == 1:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}.")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be finite and > 0, got {temperature!r}. Use 1.0 to leave the "
            "logits unchanged."
        )
    return temperature


def _check_max_iter(max_iter: int) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}. Try 100.")


def _check_tol(tol: float) -> None:
    if isinstance(tol, bool) or not isinstance(tol, Real) or not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite float > 0, got {tol!r}. Try 1e-8.")


def _check_client_data(client_data: Sequence[tuple[Tensor, Tensor]]) -> None:
    if isinstance(client_data, (str, bytes, Tensor)) or not isinstance(client_data, Sequence):
        raise ValueError(
            f"client_data must be a sequence of (logits, labels) pairs, got "
            f"{type(client_data).__name__}."
        )
    if len(client_data) == 0:
        raise ValueError("client_data is empty. Pass one (logits, labels) pair per client.")
    n_classes = None
    for k, pair in enumerate(client_data):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"client_data[{k}] must be a (logits, labels) pair, got {type(pair).__name__}"
                f"{f' of length {len(pair)}' if isinstance(pair, (tuple, list)) else ''}."
            )
        logits, labels = pair
        _check_logits_and_labels(logits, labels, name=f"client_data[{k}] logits")
        if n_classes is None:
            n_classes = logits.shape[1]
        elif logits.shape[1] != n_classes:
            raise ValueError(
                f"every client must score the same C classes, but client_data[0] has C = "
                f"{n_classes} and client_data[{k}] has C = {logits.shape[1]}. Map all clients to "
                "one label space first."
            )


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def _summed_nll_and_gradient(
    logits64: Tensor, labels: Tensor, log_temperature: float
) -> tuple[float, float]:
    """Return the summed NLL at ``T = exp(log_temperature)`` and its derivative in ``log T``.

    With ``u = z / T`` the per-sample NLL is ``logsumexp(u) - u_y``, and since ``du/ds = -u`` its
    derivative in ``s = log T`` is ``u_y - sum_k p_k u_k``, where ``p = softmax(u)``.
    """
    scaled = logits64 * math.exp(-log_temperature)  # (N, C)
    log_probs = scaled.log_softmax(dim=1)  # (N, C)
    true_class = labels.unsqueeze(1)  # (N, 1)
    nll = -log_probs.gather(1, true_class).sum()

    # sum_k p_k (u_y - u_k) equals u_y - sum_k p_k u_k, but each term of a correctly classified
    # sample is >= 0, so the sign stays exact where the probabilities of other classes underflow.
    margins = scaled.gather(1, true_class) - scaled  # (N, C)
    gradient = (log_probs.exp() * margins).sum()
    return float(nll), float(gradient)


def _optimum_at_bound(mean_gradient: Callable[[float], float]) -> float | None:
    """Return the bound temperature when the minimum lies beyond it, otherwise None.

    The NLL has one minimum in ``log T``, so a slope >= 0 at the lower bound puts the minimum at
    or below it, and a slope <= 0 at the upper bound puts it at or above. A slope of exactly 0
    occurs when all other classes' probabilities underflow, as for separable data at small ``T``.
    """
    low, high = _LOG_T_BOUNDS
    if mean_gradient(low) >= 0:
        logger.warning(
            "The NLL does not increase down to T = %s, the smallest temperature allowed, so that "
            "bound is returned. This happens when (almost) every validation prediction is correct.",
            MIN_TEMPERATURE,
        )
        return MIN_TEMPERATURE
    if mean_gradient(high) <= 0:
        logger.warning(
            "The NLL does not increase up to T = %s, the largest temperature allowed, so that "
            "bound is returned. The logits carry (almost) no information about the labels.",
            MAX_TEMPERATURE,
        )
        return MAX_TEMPERATURE
    return None


def _clamp_temperature(log_temperature: float) -> float:
    low, high = _LOG_T_BOUNDS
    return math.exp(min(max(log_temperature, low), high))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Scale logits by a temperature and return the class probabilities ``softmax(logits / T)``.

    Args:
        logits: ``(N, C) float`` logits or log-probabilities.
        temperature: ``T``, a finite float > 0.

    Returns:
        ``(N, C)`` probabilities, computed in float64 and returned in float64 for float64 logits
        and in float32 otherwise, because float16 or bfloat16 rows can miss a sum of 1 by more
        than the 1e-3 that the calibration metrics accept.

    Raises:
        ValueError: if ``temperature`` is not finite and positive, or ``logits`` is not a finite
            ``(N, C)`` float tensor with ``N >= 1`` and ``C >= 2``.

    Example:
        Logits ``(ln 3, 0)`` give probabilities ``(3/4, 1/4)`` at ``T = 1``. At ``T = 2`` they give
        ``(sqrt 3, 1) / (sqrt 3 + 1) = (0.6340, 0.3660)``.

        >>> logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
        >>> [round(p, 4) for p in apply_temperature(logits, 2.0)[0].tolist()]
        [0.634, 0.366]
    """
    temperature = _check_temperature(temperature)
    _check_logits(logits)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = (logits.detach().to(torch.float64) / temperature).softmax(dim=1)  # (N, C)
    return probs.to(out_dtype)


def local_nll_and_gradient(
    logits: Tensor, labels: Tensor, temperature: float
) -> tuple[float, float, int]:
    """Compute what one client shares in each round of federated temperature fitting.

    The client computes three scalars from its own validation set, so no logits or labels leave
    it: the summed NLL of ``softmax(logits / T)``, that sum's derivative in ``s = log T``,
    ``sum_i (u_{i,y_i} - sum_k p_{i,k} u_{i,k})`` with ``u = logits / T``, and its sample count.

    Args:
        logits: ``(N, C) float`` the client's logits or log-probabilities.
        labels: ``(N,) int64`` the client's true classes in ``[0, C)``.
        temperature: ``T``, a finite float > 0.

    Returns:
        ``(summed_nll, summed_gradient, n_samples)``: the NLL in nats summed over samples, its
        derivative with respect to ``log T``, and ``N``. Computed in float64.

    Raises:
        ValueError: if ``temperature``, ``logits`` or ``labels`` is invalid.

    Example:
        One sample with logits ``(ln 3, 0)``, label 0, at ``T = 1``: the NLL is
        ``-ln(3/4) = 0.2877`` and the gradient ``ln 3 - (3/4) ln 3 = 0.2747``.

        >>> logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
        >>> nll, gradient, n = local_nll_and_gradient(logits, torch.tensor([0]), 1.0)
        >>> round(nll, 4), round(gradient, 4), n
        (0.2877, 0.2747, 1)
    """
    temperature = _check_temperature(temperature)
    _check_logits_and_labels(logits, labels)
    logits64 = logits.detach().to(torch.float64)
    labels = labels.to(logits.device)
    nll, gradient = _summed_nll_and_gradient(logits64, labels, math.log(temperature))
    return nll, gradient, int(logits.shape[0])


def fit_temperature(
    logits: Tensor, labels: Tensor, max_iter: int = 200, tol: float = 1e-8
) -> float:
    """Fit the temperature that minimises the mean NLL of ``softmax(logits / T)`` on one dataset.

    The search runs over ``s = log T``, starting at ``s = 0`` (``T = 1``), with
    ``torch.optim.LBFGS`` and a strong Wolfe line search in float64. Logits may be
    log-probabilities, for example ``probs.clamp_min(1e-12).log()``, because ``log_softmax`` is
    shift invariant per row.

    Args:
        logits: ``(N, C) float`` validation logits or log-probabilities.
        labels: ``(N,) int64`` validation classes in ``[0, C)``.
        max_iter: maximum number of L-BFGS iterations, a positive int.
        tol: L-BFGS stops when ``|d mean NLL / d log T|`` falls to ``tol`` or below, when a
            step changes ``log T`` or the mean NLL by at most ``tol ** 2``, or after
            ``max_iter * 5 / 4`` evaluations of the NLL (the default ``max_eval`` of LBFGS).

    Returns:
        The fitted temperature, in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``. A bound is returned,
        with a warning, when the minimum lies beyond it.

    Raises:
        ValueError: if ``logits``, ``labels``, ``max_iter`` or ``tol`` is invalid.

    Example:
        Two samples with logits ``(1, 0)``, one labelled 0 and one labelled 1. The NLL is
        smallest for uniform probabilities, so the temperature goes to the upper bound.

        >>> logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> fit_temperature(logits, torch.tensor([0, 1]))
        1000.0
    """
    _check_logits_and_labels(logits, labels)
    _check_max_iter(max_iter)
    _check_tol(tol)
    logits64 = logits.detach().to(torch.float64)
    labels = labels.to(logits.device)
    n_samples = logits.shape[0]

    def mean_gradient(log_temperature: float) -> float:
        return _summed_nll_and_gradient(logits64, labels, log_temperature)[1] / n_samples

    bound = _optimum_at_bound(mean_gradient)
    if bound is not None:
        return bound

    log_temperature = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol**2,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits64 * torch.exp(-log_temperature), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = float(log_temperature.detach())
    final_gradient = mean_gradient(fitted)
    if abs(final_gradient) > tol:
        logger.warning(
            "Temperature fit stopped at |d NLL / d log T| = %.3g > tol = %.3g after at most %d "
            "L-BFGS iterations. Raise max_iter or tol.",
            abs(final_gradient),
            tol,
            max_iter,
        )
    temperature = _clamp_temperature(fitted)
    logger.debug("fitted temperature %.6g on %d samples", temperature, n_samples)
    return temperature


def fit_temperature_federated(
    client_data: Sequence[tuple[Tensor, Tensor]], max_iter: int = 100, tol: float = 1e-10
) -> float:
    """Fit one temperature for all clients while the server receives only summed scalars.

    The objective is the mean NLL over the union of the clients' validation sets, the same as
    :func:`fit_temperature` on the pooled data, so both return the same temperature up to their
    tolerances. Protocol, where each round is one communication round:

    1. The server sends ``T = exp(s)`` to every client.
    2. Each client replies with :func:`local_nll_and_gradient` on its own data: three scalars.
    3. The server sums the replies and divides by the total sample count, giving the mean NLL and
       its derivative ``g(s)`` in ``s = log T``.

    The mean NLL has one minimum in ``s``, so ``g`` changes sign once. The first two rounds
    evaluate ``g`` at ``log MIN_TEMPERATURE`` and ``log MAX_TEMPERATURE``. If ``g >= 0`` at the
    lower bound or ``g <= 0`` at the upper bound, the minimum lies beyond it and the server
    returns that bound with a warning. Otherwise the server keeps a bracket ``[low, high]`` with
    ``g(low) < 0 < g(high)`` and starts at ``s = 0`` in round 3. Its first step is ``-g(0)``, as
    if the curvature were 1, and later steps are secant (quasi-Newton) steps
    ``s - g(s) (s - s_prev) / (g(s) - g(s_prev))``. It bisects the bracket instead when a step
    would leave the bracket, or when the last step did not halve ``|g|``. So the server runs at
    most ``max_iter + 3`` rounds, about 10 to 15 in the tests.

    The clients also send their summed NLL, which the server only logs, because the gradient
    alone locates an objective with one minimum.

    Args:
        client_data: one ``(logits (N_k, C) float, labels (N_k,) int64)`` pair per client, with the
            same ``C`` for every client. Logits may be log-probabilities.
        max_iter: maximum number of rounds after the three starting rounds, a positive int.
        tol: the server stops when ``|g(s)| <= tol`` or when a step changes ``s`` by at most
            ``tol``.

    Returns:
        The fitted temperature, in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.

    Raises:
        ValueError: if ``client_data``, ``max_iter`` or ``tol`` is invalid.
    """
    _check_client_data(client_data)
    _check_max_iter(max_iter)
    _check_tol(tol)
    rounds = 0

    def run_round(log_temperature: float) -> float:
        nonlocal rounds
        rounds += 1
        temperature = math.exp(log_temperature)
        replies = [
            local_nll_and_gradient(logits, labels, temperature) for logits, labels in client_data
        ]
        total_nll = sum(reply[0] for reply in replies)
        total_gradient = sum(reply[1] for reply in replies)
        total_samples = sum(reply[2] for reply in replies)
        logger.debug(
            "round %d: T = %.6g, mean NLL %.8g, gradient %.3g",
            rounds,
            temperature,
            total_nll / total_samples,
            total_gradient / total_samples,
        )
        return total_gradient / total_samples

    bound = _optimum_at_bound(run_round)
    if bound is not None:
        return bound

    low, high = _LOG_T_BOUNDS
    s = 0.0
    gradient = run_round(s)
    previous_s, previous_gradient = None, None
    converged = False
    for _ in range(max_iter):
        if abs(gradient) <= tol:
            converged = True
            break

        # The minimum lies where g changes sign: above s if g(s) < 0, below it otherwise.
        if gradient < 0:
            low = s
        else:
            high = s

        # The first step assumes a curvature of 1, later ones take the secant through the last
        # two points. Bisect when the step would leave the bracket or the last step did not
        # halve |g|, which keeps a slow secant sequence converging.
        target = None
        if previous_s is None:
            target = s - gradient
        elif gradient != previous_gradient:
            target = s - gradient * (s - previous_s) / (gradient - previous_gradient)
        stalled = previous_gradient is not None and abs(gradient) > 0.5 * abs(previous_gradient)
        if target is None or not (low < target < high) or stalled:
            target = 0.5 * (low + high)

        previous_s, previous_gradient = s, gradient
        s = target
        gradient = run_round(s)
        if abs(s - previous_s) <= tol:
            converged = True
            break

    if not converged and abs(gradient) > tol:
        logger.warning(
            "Federated temperature fit stopped at |d NLL / d log T| = %.3g > tol = %.3g after %d "
            "rounds. Raise max_iter or tol.",
            abs(gradient),
            tol,
            rounds,
        )
    temperature = _clamp_temperature(s)
    logger.info(
        "federated temperature %.6g from %d clients in %d rounds",
        temperature,
        len(client_data),
        rounds,
    )
    return temperature


def fit_temperature_per_client_average(
    client_data: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float] | None = None
) -> float:
    """Fit a temperature on each client with :func:`fit_temperature` and average them.

    Unlike :func:`fit_temperature_federated`, this minimises no shared objective: a client with
    few samples can have a far-off optimum, such as ``MIN_TEMPERATURE`` when all its validation
    predictions are correct.

    Args:
        client_data: one ``(logits (N_k, C) float, labels (N_k,) int64)`` pair per client.
        weights: one finite non-negative weight per client, with a positive sum. None weights each
            client by its sample count ``N_k``.

    Returns:
        ``sum_k w_k T_k / sum_k w_k``, the weighted arithmetic mean of the per-client temperatures.

    Raises:
        ValueError: if ``client_data`` or ``weights`` is invalid.
    """
    _check_client_data(client_data)
    if weights is None:
        weights = [float(logits.shape[0]) for logits, _ in client_data]
    else:
        if isinstance(weights, Tensor):
            weights = weights.tolist()
        if len(weights) != len(client_data):
            raise ValueError(
                f"weights must have one entry per client, got {len(weights)} weights for "
                f"{len(client_data)} clients. Pass None to weight by sample count."
            )
        weights = [float(w) for w in weights]
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"weights must be finite and non-negative with a positive sum, got {weights!r}. "
                "Pass None to weight by sample count."
            )

    temperatures = [fit_temperature(logits, labels) for logits, labels in client_data]
    logger.debug("per-client temperatures %s, weights %s", temperatures, weights)
    return sum(w * t for w, t in zip(weights, temperatures)) / sum(weights)
