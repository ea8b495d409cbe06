"""The benchmark suite: its measuring tools, round split, targets, report and a short run."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from fl2ora.cli import main as cli_main
from fl2ora.perf import measure
from fl2ora.perf.options import add_bench_arguments
from fl2ora.perf.report import evaluate_targets, format_report
from fl2ora.perf.suite import (
    BATCHED_CLIENTS_CASE,
    SPEEDUP_CASES,
    DataSource,
    make_config,
    measure_pair,
    split_round,
    write_generated_images,
)

CPU = torch.device("cpu")
BATCH, IN_FEATURES, OUT_FEATURES = 8, 16, 12
LINEAR_FLOPS = 2 * BATCH * IN_FEATURES * OUT_FEATURES  # one (B, in) x (in, out) product


def test_linear_flops_forward_and_backward():
    layer = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    x = torch.randn(BATCH, IN_FEATURES, requires_grad=True)
    with torch.no_grad():
        assert measure.count_flops(lambda: layer(x)) == LINEAR_FLOPS
    # Backward: the gradient of the input and of the weight, one product each.
    assert measure.count_flops(lambda: layer(x).sum().backward()) == 3 * LINEAR_FLOPS


def test_cpu_attention_flops_counted():
    q = k = v = torch.randn(2, 4, 10, 8)  # (batch, heads, tokens, head width)
    flops = measure.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # Q K^T and the weighted sum of V: 2 products of 2 * B * H * T * T * d FLOPs each.
    assert flops == 2 * (2 * 2 * 4 * 10 * 10 * 8)


def test_matmul_rate_positive():
    result = measure.measure_matmul([32, 64], CPU, min_seconds=0.01)
    assert set(result["by_size"]) == {32, 64}
    assert result["flops_per_second"] == max(result["by_size"].values()) > 0
    assert result["best_size"] in (32, 64)
    assert result["dtype"] == "float32"


def test_matmul_summary_of_detailed_result():
    detailed = measure.MatmulResult(
        device="cpu",
        dtype="float32",
        flops_per_second=3e6,
        best_size=64,
        by_size={
            32: {"reps": 4, "seconds": 0.5, "flops_per_second": 1e6},
            64: {"reps": 2, "seconds": 0.25, "flops_per_second": 3e6},
        },
    )
    assert detailed.rates() == {"flops_per_second": 3e6, "best_size": 64, "by_size": {32: 1e6, 64: 3e6},
                                "dtype": "float32"}


@pytest.mark.parametrize(
    ("sizes", "min_seconds", "message"),
    [
        ([], 1.0, "non-empty list"),
        ([0], 1.0, "positive matrix sizes"),
        ([64, -1], 1.0, "positive matrix sizes"),
        ([64], -0.5, "min_seconds must be >= 0"),
    ],
)
def test_invalid_matmul_arguments_rejected(sizes, min_seconds, message):
    with pytest.raises(ValueError, match=message):
        measure.measure_matmul(sizes, CPU, min_seconds=min_seconds)


def test_peak_memory_sees_allocation():
    with measure.PeakMemory(CPU, interval=0.001) as memory:
        block = torch.ones(256 * 2**20 // 4)  # 256 MiB, written so every page is resident
        inside = measure.current_rss_bytes()
        time.sleep(0.1)  # the sampling thread runs while this one sleeps
        del block
    assert memory.kind == "rss"
    assert memory.peak_bytes >= inside
    assert inside - memory.start_bytes >= 192 * 2**20


def test_time_calls_counts_calls():
    calls = []
    seconds = measure.time_calls(lambda: calls.append(1), warmup=2, repeats=3, device=CPU)
    assert len(calls) == 5
    assert len(seconds) == 3
    assert all(s >= 0 for s in seconds)


def test_split_round_arithmetic():
    timing = {"seconds_train": 6.0, "seconds_aggregate": 0.5, "seconds_eval": 3.0, "seconds_checkpoint": 0.25,
              "seconds_total": 10.0, "round": 1}
    assert split_round(timing) == {"train": 6.0, "aggregate": 0.5, "eval": 3.0, "other": 0.5, "checkpoint": 0.25,
                                   "total": 10.0}
    # A round without evaluation.
    del timing["seconds_eval"]
    assert split_round(timing)["other"] == pytest.approx(3.5)


def synthetic_report(mfu=0.62, other_share=0.02, coop_speedup=14.0, equal=True, device="cpu"):
    split = {"train": 8.0, "aggregate": 0.1, "eval": 1.7, "other": 0.2, "checkpoint": 0.15, "total": 10.0}
    case = {"switch": "image_feature_cache", "method": "coop", "overrides": ["data.augment=false"], "reason": "r",
            "model": "vit-b-16", "protocol": True,
            "on": [split, split], "off": [split, split], "speedup_steady_round": coop_speedup,
            "speedup_all_rounds": coop_speedup, "equal_within_tolerance": equal,
            "max_abs_difference": {"state": 0.0, "probabilities": 1e-7, "metrics": 0.0}, "tolerance": {}}
    batched_on = {**split, "train": 5.0, "total": 7.0}
    batched = {"switch": "batched_clients", "method": "fl2ora", "overrides": [], "reason": "r", "model": "vit-b-32",
               "protocol": False, "on": [batched_on, batched_on], "off": [split, split],
               "speedup_steady_round": 10.0 / 7.0, "speedup_all_rounds": 10.0 / 7.0, "equal_within_tolerance": True,
               "max_abs_difference": {"state": 2e-7, "probabilities": 1e-7, "metrics": 0.0}, "tolerance": {}}
    step = {"model": "vit-b-32", "method": "fl2ora", "batch_size": 16, "trainable_parameters": 10,
            "train_images_per_second": 5.0, "eval_images_per_second": 20.0, "train_flops_per_step": 3e11,
            "train_mfu": mfu, "eval_mfu": 0.7, "peak_memory_bytes": 2**30, "peak_memory_kind": "rss",
            "profile": {"time": "cpu", "shares": {"matmul": 0.6, "attention": 0.1, "other": 0.3},
                        "matmul_flops_per_second": 80e9, "slowest_other": [{"op": "aten::add", "share": 0.1}]}}
    return {
        "date": "2026-12-04T00:00:00+00:00", "command": "fl2ora bench", "seconds": 300.0, "device": device,
        "machine": {"cpu_model": "CPU", "cpu_capability": "AVX2", "usable_cpus": 2, "logical_cpus": 2,
                    "memory_bytes": 2**34, "torch_threads": 2, "torch": "2"},
        "load_average_at_start": 0.1, "load_average_at_end": 0.2, "warning": "random weights.",
        "tolerance": {"state": 1e-5, "probabilities": 1e-5, "metrics": 1e-5},
        "matmul": {"dtype": "float32", "flops_per_second": 100e9, "before": {"by_size": {512: 90e9}},
                   "after": {"by_size": {512: 100e9}}},
        "data": {"real_images_in_scale": False},
        "steps": [step],
        "rounds": [{"model": "tiny", "method": "coop", "splits": [split, split], "train_images_per_round": 32,
                    "eval_images_per_round": 8, "peak_memory_bytes": 2**30, "peak_memory_kind": "rss"}],
        "speedups": {"model": "vit-b-32", "cases": [case, batched], "autocast": "not measured",
                     "loader": {"images": 64, "size": 224, "uncached_images_per_second": 400.0,
                                "filling_images_per_second": 390.0, "cached_images_per_second": 2000.0},
                     "batched_clients": [{"model": "vit-b-32", "clients": 4, "batch_size": 16, "images_per_second": 5.0,
                                          "joined_images_per_second": 5.1, "bound": 1.02, "mfu": 0.6,
                                          "joined_mfu": 0.61}]},
        "scale": {"model": "vit-b-32", "clients": 100, "sampled": 10, "train_images_per_client": 10,
                  "test_images_per_client": 2, "split": {**split, "total": 300.0 / 30}, "other_share": other_share,
                  "memory": {"rss_before_build": 2**30, "rss_after_build": 2**31, "rss_after_rounds": 2**31,
                             "backbone_parameter_bytes": 2**29, "clip_models_in_process": 1, "clients": 100,
                             "training_images": None, "decoded_image_cache_bytes": 0},
                  "peak_memory_bytes": 2**31, "peak_memory_kind": "rss"},
    }


def test_targets_met():
    targets = evaluate_targets(synthetic_report())
    assert [t["met"] for t in targets] == [True, True, True, None]
    assert targets[0]["figure"] == "62.0% at batch 16"
    assert targets[3]["cause"] == "not measured: no GPU in this run"


@pytest.mark.parametrize(
    ("kwargs", "missed", "cause"),
    [
        ({"mfu": 0.31}, 0, "matmul operators take 60%"),
        ({"other_share": 0.07}, 1, "checkpoint 0.15 s"),
        ({"coop_speedup": 4.0}, 2, "text encoder forward and backward"),
        ({"equal": False}, 2, "text encoder forward and backward"),  # fast enough, but metrics differ
    ],
)
def test_targets_missed_name_cause(kwargs, missed, cause):
    target = evaluate_targets(synthetic_report(**kwargs))[missed]
    assert target["met"] is False
    assert cause in target["cause"]


def test_targets_not_measured_without_sections():
    report = synthetic_report()
    for section in ("steps", "speedups", "scale"):
        del report[section]
    assert [t["met"] for t in evaluate_targets(report)] == [None, None, None, None]


@pytest.mark.parametrize("markdown", [False, True])
def test_report_renders_every_section(markdown):
    report = synthetic_report()
    report["targets"] = evaluate_targets(report)
    text = format_report(report, markdown=markdown)
    for fragment in ("Matmul reference: 100.0 GFLOP/s", "Training and evaluation steps", "Rounds of the in-process",
                     "Speed-ups, each on and off", "2000 img/s from it", "Batched clients", "Scale: 100 clients",
                     "Targets:", "random weights."):
        assert fragment in text
    assert ("| target | figure | status | cause of a miss |" in text) is markdown


def test_report_batched_clients_line():
    report = synthetic_report()
    report["targets"] = evaluate_targets(report)
    text = format_report(report)
    # Bound: 5.1 / 5.0 img/s; the switch: 8.0 s of training off, 5.0 s on.
    assert "can speed up training by at most 1.02x here" in text
    assert "the switch itself trained the steady round 1.60x as fast (8.000 s off, 5.000 s on, vit-b-32)." in text
    assert "not implemented" not in text
    batched_row = next(line for line in text.splitlines() if line.startswith("batched_clients"))
    assert "1.4x" in batched_row  # steady round 10.0 s off / 7.0 s on
    assert batched_row.rstrip().endswith("yes")


def test_speedup_case_overrides():
    assert BATCHED_CLIENTS_CASE.on_overrides() == ("perf.batched_clients=2",)
    assert BATCHED_CLIENTS_CASE.off_overrides() == ("perf.batched_clients=1",)
    coop = next(c for c in SPEEDUP_CASES if c.switch == "image_feature_cache")
    assert coop.on_overrides() == ("data.augment=false",)
    assert coop.off_overrides() == ("data.augment=false", "perf.image_feature_cache=false")
    # The int switch stays out of the cases that other code turns off with "=false".
    assert all(case.switch != "batched_clients" for case in SPEEDUP_CASES)


def test_batched_clients_case_equal_results(tmp_path):
    images = write_generated_images(tmp_path / "images", train_per_class=4, test_per_class=2)

    def config(overrides):
        return make_config("tiny", "fl2ora", images, CPU, "fp32", clients=2, train_per_client=12,
                           test_per_client=4, rounds=2, batch_size=8, overrides=("train.lr=0.05", *overrides))

    on, off = config(BATCHED_CLIENTS_CASE.on_overrides()), config(BATCHED_CLIENTS_CASE.off_overrides())
    assert (on.perf.batched_clients, off.perf.batched_clients) == (2, 1)
    pair = measure_pair(on, off, tmp_path / "runs")
    assert pair["equal_within_tolerance"], pair["max_abs_difference"]
    assert pair["max_abs_difference"]["state"] <= 1e-5
    assert len(pair["on"]) == len(pair["off"]) == 2


def parse(argv):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_options_parse_batch_sizes():
    args = parse(["--batch-size", "vit-b-16=8,tiny=64", "--models", "tiny"])
    assert args.batch_size == {"vit-b-16": 8, "tiny": 64}
    assert args.models == ["tiny"]
    assert args.sections == ["steps", "rounds", "speedups", "scale"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "resnet=8"],  # unknown model
        ["--batch-size", "tiny=0"],  # not positive
        ["--batch-size", "tiny"],  # no size
        ["--steps", "0"],
        ["--warmup", "-1"],
        ["--models", "vit-l-14"],
        ["--sections", "everything"],
        ["--matmul-seconds", "0"],
    ],
)
def test_invalid_options_rejected(argv):
    with pytest.raises(SystemExit):
        parse(argv)


@pytest.mark.slow
def test_short_suite_through_cli(tmp_path, capsys):
    output_json, output_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli_main([
        "bench", "--models", "tiny", "--methods", "fl2ora", "coop", "--device", "cpu", "--steps", "1",
        "--warmup", "0", "--speedup-model", "tiny", "--scale-model", "tiny", "--scale-clients", "20",
        "--scale-sampled", "2", "--batch-size", "tiny=8", "--workdir", str(tmp_path / "work"),
        "--sections", "steps", "rounds", "scale", "--matmul-seconds", "0.05",
        "--json", str(output_json), "--markdown", str(output_md),
    ])
    assert code == 0
    report = json.loads(output_json.read_text())
    assert [(s["model"], s["method"]) for s in report["steps"]] == [("tiny", "fl2ora"), ("tiny", "coop")]
    assert all(s["train_images_per_second"] > 0 and s["train_flops_per_step"] > 0 for s in report["steps"])
    for entry in report["rounds"]:
        last = entry["splits"][-1]
        parts = last["train"] + last["aggregate"] + last["eval"] + last["other"]
        assert parts == pytest.approx(last["total"], rel=1e-9)
    assert "speedups" not in report  # measured on and off in test_perf_equivalence.py
    assert report["scale"]["memory"]["clip_models_in_process"] == 1
    assert report["scale"]["clients"] == 20
    assert len(report["targets"]) == 4
    assert "Targets:" in capsys.readouterr().out
    assert "| target |" in output_md.read_text()
