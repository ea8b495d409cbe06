"""Every speed-up leaves the trained model and the metrics unchanged: real CIFAR-10 images, tiny CLIP.

Each case runs the same two federated rounds with a ``perf`` switch on and off and
compares the final adapters, the final probabilities of every test image and the
client-mean metrics. Switches that only reuse or keep values (text-feature cache,
decoded-image cache) must match bit for bit; the others change features by float
rounding and must match within :data:`fl2ora.perf.suite.TOLERANCE`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl2ora.perf.suite import (
    BATCHED_CLIENTS_CASE,
    SPEEDUP_CASES,
    SWITCHES,
    TOLERANCE,
    DataSource,
    make_config,
    measure_pair,
    run_rounds,
)

pytestmark = pytest.mark.slow

BIT_IDENTICAL = ("text_feature_cache", "decoded_image_cache")
CPU = torch.device("cpu")


def config(archive, method, overrides=()):
    data = DataSource("cifar10", str(archive), real=True)
    return make_config("tiny", method, data, CPU, "fp32", clients=2, train_per_client=16, test_per_client=8,
                       rounds=2, batch_size=8, overrides=("train.lr=0.05", *overrides))


@pytest.mark.parametrize(
    "case", (*SPEEDUP_CASES, BATCHED_CLIENTS_CASE), ids=lambda c: f"{c.switch}-{c.method}-{'-'.join(c.overrides)}"
)
def test_switch_leaves_results_unchanged(case, cifar10_archive, tmp_path):
    on = config(cifar10_archive, case.method, case.on_overrides())
    off = config(cifar10_archive, case.method, case.off_overrides())
    pair = measure_pair(on, off, tmp_path)

    difference = pair["max_abs_difference"]
    assert difference["state"] <= TOLERANCE["state"]
    assert difference["probabilities"] <= TOLERANCE["probabilities"]
    assert difference["metrics"] <= TOLERANCE["metrics"]
    assert pair["equal_within_tolerance"]
    if case.switch in BIT_IDENTICAL:
        assert difference == {"state": 0.0, "probabilities": 0.0, "metrics": 0.0}


@pytest.mark.parametrize("method", ["fl2ora", "coop", "kgcoop", "maple", "layernorm", "full"])
def test_all_switches_leave_results_unchanged(method, cifar10_archive, tmp_path):
    overrides = ("data.augment=false",) if method in ("coop", "kgcoop") else ()
    on = config(cifar10_archive, method, overrides)
    off = config(cifar10_archive, method, (*overrides, *(f"perf.{name}=false" for name in SWITCHES)))
    pair = measure_pair(on, off, tmp_path)
    assert pair["equal_within_tolerance"], pair["max_abs_difference"]
    # The plain run used no cache at all.
    assert pair["feature_sets_computed"]["off"] == 0
    assert pair["decoded_image_bytes"]["off"] == 0


def test_caches_exercised_by_coop(cifar10_archive, tmp_path):
    coop = config(cifar10_archive, "coop", ("data.augment=false",))
    run = run_rounds(coop, tmp_path)
    # Two client training sets and the evaluation set, each encoded once over both rounds.
    assert run["feature_sets_computed"] == 3
    # Every image read once (to encode it) and kept after the 32 px resize and crop: 32 x 32 x 3 bytes each.
    images = 10 * (coop.data.max_train_per_class + coop.data.max_test_per_class)
    assert run["decoded_image_bytes"] == images * 32 * 32 * 3
    np.testing.assert_allclose(run["probabilities"].sum(axis=1), 1.0, rtol=0, atol=1e-5)
