"""The benchmark suite: its measuring tools, round split, targets, report and a short run."""

from __future__ import annotations

import argparse
import json
import math
import time

import pytest
import torch

from fl2ora.cli import main as cli_main
from fl2ora.errors import ConfigError
from fl2ora.perf import measure
from fl2ora.perf.options import DEFAULT_BATCH, add_bench_arguments, check_bench_arguments
from fl2ora.perf.report import evaluate_targets, format_report, machine_busy
from fl2ora.perf.suite import (
    BATCHED_CLIENTS_CASE,
    LOADER_IMAGES,
    PROTOCOL_ROUND,
    SPEEDUP_CASES,
    DataSource,
    generated_images_per_class,
    make_config,
    measure_loader,
    measure_pair,
    split_round,
    write_generated_images,
)
from fl2ora.perf.suite import main as suite_main

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


@pytest.mark.parametrize(
    ("clients", "met"),
    [(1, None), (20, None), (100, True)],
)
def test_scale_target_needs_100_clients(clients, met):
    report = synthetic_report()
    report["scale"]["clients"] = clients
    target = evaluate_targets(report)[1]
    assert target["met"] is met
    if met is None:
        assert target["cause"] == (f"not measured: the scale section ran with --scale-clients {clients}; "
                                   "run it with --scale-clients 100")
        assert f"{clients} clients" in target["figure"]


def test_scale_target_small_round_not_missed():
    # A share above 5% on 1 client says nothing about a 100-client round.
    report = synthetic_report(other_share=0.3)
    report["scale"]["clients"] = 1
    target = evaluate_targets(report)[1]
    assert target["met"] is None
    assert "--scale-clients 100" in target["cause"]


@pytest.mark.parametrize("model", ["tiny", "vit-b-32"])
def test_coop_target_needs_protocol_model(model):
    report = synthetic_report(coop_speedup=2.0)
    report["speedups"]["cases"][0]["model"] = model
    target = evaluate_targets(report)[2]
    assert target["met"] is None
    assert target["cause"] == (f"not measured: the protocol-shaped round ran on {model}; run it with "
                               "--protocol-model vit-b-16")
    assert target["figure"].startswith(f"2.0x on {model} (protocol-shaped round")


def test_coop_target_ignores_small_round():
    # A small-round case of the same switch is no stand-in for the protocol-shaped one.
    report = synthetic_report()
    report["speedups"]["cases"][0]["protocol"] = False
    target = evaluate_targets(report)[2]
    assert target["met"] is None
    assert target["figure"] is None
    assert target["cause"] == "not measured: this report has no protocol-shaped CoOp round"


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


@pytest.mark.parametrize(
    ("load", "cpus", "busy"),
    [(1.5, 2, True), (1.0, 2, False), (0.1, 2, False), (float("nan"), 2, False), (0.6, None, True)],
)
def test_machine_busy_above_half_the_cpus(load, cpus, busy):
    assert machine_busy(load, cpus) is busy


@pytest.mark.parametrize("markdown", [False, True])
def test_report_header_names_busy_machine(markdown):
    line = ("Measured beside other work: the load average at the start, 1.50, exceeded half of the 2 usable "
            "CPUs, so the figures are lower and noisier than on an idle machine.")
    report = synthetic_report()
    report["targets"] = evaluate_targets(report)
    assert line not in format_report(report, markdown=markdown)

    report["load_average_at_start"] = 1.5
    text = format_report(report, markdown=markdown)
    assert line in text
    # In the header: after the machine line, before the matmul reference.
    assert text.index("Machine:") < text.index(line) < text.index("Matmul reference:")


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


def test_generated_images_cover_every_reader():
    # The options of a run that once read 64 loader images from a folder of 50.
    args = parse(["--models", "tiny", "--round-clients", "1", "--round-test-images", "1", "--scale-clients", "1",
                  "--scale-sampled", "1", "--scale-train-images", "1", "--scale-test-images", "1"])
    train, test = generated_images_per_class(args, dict(DEFAULT_BATCH))
    # Training: the loader's 64 images beat 1 client x batch 32, the protocol's 30 and the scale's 1.
    assert (train, test) == (math.ceil(LOADER_IMAGES / 10) + 1, math.ceil(PROTOCOL_ROUND["test_per_client"] / 10) + 1)
    assert 10 * train >= LOADER_IMAGES
    assert 10 * test >= PROTOCOL_ROUND["clients"] * PROTOCOL_ROUND["test_per_client"]


def test_generated_images_default_and_steps_only():
    # Defaults: the scale section's 100 clients x 10 training and x 2 test images are the most.
    train, test = generated_images_per_class(parse([]), dict(DEFAULT_BATCH))
    assert (train, test) == (100 * 10 // 10 + 1, 100 * 2 // 10 + 1)
    # The steps section reads no images; real scale images need no generated ones.
    assert generated_images_per_class(parse(["--sections", "steps"]), dict(DEFAULT_BATCH)) == (1, 1)
    args = parse(["--sections", "scale", "--data", "cifar10.tar.gz"])
    assert generated_images_per_class(args, dict(DEFAULT_BATCH)) == (1, 1)


def test_loader_reads_at_most_available(tmp_path):
    images = write_generated_images(tmp_path / "images", train_per_class=2, test_per_class=1)  # 20 training
    everything = measure_loader(images, LOADER_IMAGES, 32)
    assert everything["images"] == 20
    assert everything["uncached_images_per_second"] > 0
    assert everything["cached_images_per_second"] > 0
    assert measure_loader(images, 5, 32)["images"] == 5


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


def test_scale_sampled_above_clients_rejected():
    message = ("--scale-sampled 10 is larger than --scale-clients 1: the scale round cannot sample more clients "
               "than exist. Use --scale-sampled 1 or less, or raise --scale-clients.")
    with pytest.raises(ConfigError) as error:
        check_bench_arguments(parse(["--scale-clients", "1"]))
    assert str(error.value) == message
    check_bench_arguments(parse(["--scale-clients", "3", "--scale-sampled", "3"]))  # equal is fine


def test_missing_data_rejected_only_with_scale(tmp_path):
    missing = tmp_path / "cifar10.tar.gz"
    with pytest.raises(ConfigError, match=f"--data {missing} does not exist"):
        check_bench_arguments(parse(["--data", str(missing)]))
    check_bench_arguments(parse(["--data", str(missing), "--sections", "steps"]))
    missing.write_bytes(b"")
    check_bench_arguments(parse(["--data", str(missing)]))


def test_cross_option_error_before_any_work(tmp_path, capsys):
    workdir = tmp_path / "work"
    code = cli_main(["bench", "--scale-clients", "1", "--workdir", str(workdir)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fl2ora: error: --scale-sampled 10 is larger than --scale-clients 1")
    assert "\n" not in error
    assert "federated.fraction" not in error
    assert not workdir.exists()  # rejected before the suite made its folder

    with pytest.raises(SystemExit) as exit_info:
        suite_main(["--scale-clients", "1", "--workdir", str(workdir)])
    assert exit_info.value.code == 2
    assert "--scale-sampled 10 is larger than --scale-clients 1" in capsys.readouterr().err


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


@pytest.mark.parametrize("method", ["fl2ora", "coop"])
def test_eval_flops_leave_out_reused_text(method):
    from fl2ora.methods.registry import build_classifier
    from fl2ora.model.backbone import load_backbone
    from fl2ora.perf.suite import CIFAR10_CLASSES, TEMPLATE, DataSource, make_config, measure_steps

    batch = 4
    result = measure_steps("tiny", method, batch, 1, 0, torch.device("cpu"), "fp32", 1e9)

    config = make_config("tiny", method, DataSource("cifar10", "", False), torch.device("cpu"), "fp32", clients=1,
                         train_per_client=1, test_per_client=1, rounds=1, batch_size=batch)
    model = build_classifier(config, load_backbone(config.model), list(CIFAR10_CLASSES), TEMPLATE).eval()
    images = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        image_flops = measure.count_flops(lambda: model.encode_image(images))
    logits_flops = 2 * batch * model.clip.config.projection_dim * 10  # image @ text.T over the 10 classes
    # The timed evaluation steps reuse the class text features, so no text-encoder FLOPs are counted.
    assert result["eval_flops_per_step"] == image_flops + logits_flops
