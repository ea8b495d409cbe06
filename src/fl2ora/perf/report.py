"""The benchmark suite's targets and its report as plain text or Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MFU_TARGET = 0.5
"""FL²oRA training on ViT-B/32 on the CPU: model FLOPs over the fp32 matmul reference."""
OTHER_SHARE_TARGET = 0.05
"""Work outside training and evaluation (aggregation, checkpoint, records) in a 100-client round."""
COOP_SPEEDUP_TARGET = 10.0
"""CoOp round time without the image-feature cache over the time with it."""
GPU_SECONDS_TARGET = 600.0
"""Wall time of the whole suite on a GPU."""
BUSY_LOAD_SHARE = 0.5
"""Load average, as a share of the usable CPUs, above which other work competes for the cores."""
SCALE_CLIENTS = 100
"""Clients of the round that the work-outside-training target is judged on: the study's CIFAR protocol."""
PROTOCOL_MODEL = "vit-b-16"
"""Architecture of the protocol-shaped round that the CoOp target is judged on: the study's."""

_MiB = 2**20


def _find(entries: Sequence[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    for entry in entries:
        if all(entry.get(k) == v for k, v in keys.items()):
            return entry
    return None


def machine_busy(load: float, cpus: int | None) -> bool:
    """Return whether ``load`` (a load average, possibly NaN) exceeds :data:`BUSY_LOAD_SHARE` of ``cpus``."""
    return load > BUSY_LOAD_SHARE * (cpus or 1)


def _mfu_cause(entry: dict[str, Any], report: dict[str, Any]) -> str:
    profile = entry.get("profile")
    parts = []
    if profile:
        shares = profile["shares"]
        reference = report["matmul"]["flops_per_second"]
        slowest = ", ".join(f"{op['op']} {op['share']:.0%}" for op in profile["slowest_other"][:3])
        parts.append(
            f"matmul operators take {shares['matmul']:.0%} of the step's {profile['time']} time and run at "
            f"{profile['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s "
            f"({profile['matmul_flops_per_second'] / reference:.0%} of the reference, on skinnier matrices than "
            f"its square ones); attention kernels take {shares['attention']:.0%}, other operators "
            f"{shares['other']:.0%} (slowest: {slowest})"
        )
    load = max(report.get("load_average_at_start", 0.0), report.get("load_average_at_end", 0.0))
    cpus = report["machine"].get("usable_cpus") or 1
    if machine_busy(load, cpus):
        parts.append(f"load average up to {load:.1f} on {cpus} CPUs: other processes shared the cores")
    return "; ".join(parts) or "no profile was recorded"


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return each target with its measured figure, whether it is met (None: not measured) and the cause of a miss."""
    targets = []
    on_cpu = report["device"] == "cpu"

    entry = _find(report.get("steps", []), model="vit-b-32", method="fl2ora")
    target = {"target": f"FL²oRA ViT-B/32 training MFU >= {MFU_TARGET:.0%} on the CPU", "figure": None,
              "met": None, "cause": None}
    if not on_cpu:
        target["cause"] = "not measured: this run used the GPU"
    elif entry is None:
        target["cause"] = "not measured: run the steps section with --models vit-b-32 and --methods fl2ora"
    else:
        target["figure"] = f"{entry['train_mfu']:.1%} at batch {entry['batch_size']}"
        target["met"] = entry["train_mfu"] >= MFU_TARGET
        if not target["met"]:
            target["cause"] = _mfu_cause(entry, report)
    targets.append(target)

    scale = report.get("scale")
    target = {"target": f"work outside training and evaluation < {OTHER_SHARE_TARGET:.0%} of a "
                        f"{SCALE_CLIENTS}-client round", "figure": None, "met": None, "cause": None}
    if scale is None:
        target["cause"] = "not measured: add scale to --sections"
    else:
        split = scale["split"]
        target["figure"] = (f"{scale['other_share']:.1%} ({split['aggregate'] + split['other']:.2f} s of "
                            f"{split['total']:.1f} s, {scale['clients']} clients, {scale['sampled']} sampled, "
                            f"{scale['model']})")
        if scale["clients"] != SCALE_CLIENTS:
            target["cause"] = (f"not measured: the scale section ran with --scale-clients {scale['clients']}; "
                               f"run it with --scale-clients {SCALE_CLIENTS}")
        else:
            target["met"] = scale["other_share"] < OTHER_SHARE_TARGET
        if target["met"] is False:
            target["cause"] = (f"aggregation {split['aggregate']:.2f} s, checkpoint {split['checkpoint']:.2f} s, "
                               f"records and sampling {split['other'] - split['checkpoint']:.2f} s")
    targets.append(target)

    targets.append(_coop_target(report))

    target = {"target": f"GPU: the suite in < {GPU_SECONDS_TARGET / 60:.0f} min with bf16 MFU of ViT-B/16",
              "figure": None, "met": None, "cause": None}
    if on_cpu:
        target["cause"] = "not measured: no GPU in this run"
    else:
        entry = _find(report.get("steps", []), model="vit-b-16", method="fl2ora")
        mfu = f", FL²oRA ViT-B/16 bf16 MFU {entry['train_mfu']:.1%}" if entry else ", ViT-B/16 not measured"
        target["figure"] = f"{report['seconds'] / 60:.1f} min{mfu}"
        target["met"] = report["seconds"] < GPU_SECONDS_TARGET and entry is not None
    targets.append(target)
    return targets


def _coop_target(report: dict[str, Any]) -> dict[str, Any]:
    """Judge the CoOp speed-up on the protocol-shaped round on :data:`PROTOCOL_MODEL`, and on no other run."""
    cases = report.get("speedups", {}).get("cases", [])
    case = _find(cases, switch="image_feature_cache", method="coop", protocol=True)
    target = {"target": f"CoOp rounds >= {COOP_SPEEDUP_TARGET:.0f}x faster with the image-feature cache, "
                        "same metrics", "figure": None, "met": None, "cause": None}
    if "speedups" not in report:
        target["cause"] = "not measured: add speedups to --sections"
    elif case is None:
        target["cause"] = "not measured: this report has no protocol-shaped CoOp round"
    else:
        speedup = case["speedup_steady_round"]
        model = case.get("model", report["speedups"]["model"])
        target["figure"] = (f"{speedup:.1f}x on {model} (protocol-shaped round, steady), metrics "
                            f"{'equal' if case['equal_within_tolerance'] else 'DIFFERENT'} within tolerance")
        if model != PROTOCOL_MODEL:
            target["cause"] = (f"not measured: the protocol-shaped round ran on {model}; run it with "
                               f"--protocol-model {PROTOCOL_MODEL}")
        else:
            target["met"] = speedup >= COOP_SPEEDUP_TARGET and case["equal_within_tolerance"]
        if target["met"] is False:
            on = case["on"][-1]
            target["cause"] = (
                f"with the cache a round still takes {on['total']:.2f} s: training {on['train']:.2f} s (every "
                f"step runs the text encoder forward and backward over all class prompts), evaluation "
                f"{on['eval']:.2f} s, other {on['aggregate'] + on['other']:.2f} s"
            )
    return target


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def render_table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    """Render a table as Markdown, or as plain-text columns with numbers right-aligned."""
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / _MiB:,.0f}"


def _seconds(value: float) -> str:
    return f"{value:.2f}"


def _status(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def _header(report: dict[str, Any], code: str) -> list[str]:
    machine = report["machine"]
    matmul = report["matmul"]
    memory = f", {machine['memory_bytes'] / 2**30:.0f} GiB RAM" if machine.get("memory_bytes") else ""
    load = report["load_average_at_start"]
    busy = []
    if machine_busy(load, machine.get("usable_cpus")):
        busy = ["", f"Measured beside other work: the load average at the start, {load:.2f}, exceeded half of "
                    f"the {machine['usable_cpus']} usable CPUs, so the figures are lower and noisier than on an "
                    "idle machine."]
    return [
        f"Measured {report['date']} with {code}{report['command']}{code} in {report['seconds'] / 60:.1f} min.",
        "",
        f"Machine: {machine['cpu_model']} ({machine['cpu_capability']}), {machine['usable_cpus']} usable of "
        f"{machine['logical_cpus']} logical CPUs{memory}, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}" + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
        + f". Load average (1 min) {report['load_average_at_start']:.2f} at the start, "
        f"{report['load_average_at_end']:.2f} at the end.",
        *busy,
        "",
        f"Matmul reference: {matmul['flops_per_second'] / 1e9:.1f} GFLOP/s {matmul['dtype']} (best sustained "
        f"{code}torch.mm{code} on n x n matrices; before the sections "
        + ", ".join(f"n={n}: {rate / 1e9:.1f}" for n, rate in matmul["before"]["by_size"].items())
        + "; after: " + ", ".join(f"n={n}: {rate / 1e9:.1f}" for n, rate in matmul["after"]["by_size"].items())
        + "). Images: generated 32 px PNG files in the rounds; "
        + ("real CIFAR-10" if report["data"]["real_images_in_scale"] else "the same generated ones")
        + " in the scale section.",
    ]


def _steps_lines(report: dict[str, Any], markdown: bool) -> list[str]:
    header = ["model", "method", "batch", "trainable", "train img/s", "eval img/s", "train GFLOP/step",
              "train MFU %", "eval MFU %", "peak MiB"]
    rows = [[e["model"], e["method"], str(e["batch_size"]), f"{e['trainable_parameters']:,}",
             f"{e['train_images_per_second']:.1f}", f"{e['eval_images_per_second']:.1f}",
             f"{e['train_flops_per_step'] / 1e9:.1f}", f"{100 * e['train_mfu']:.1f}", f"{100 * e['eval_mfu']:.1f}",
             _mib(e["peak_memory_bytes"])] for e in report["steps"]]
    kind = report["steps"][0]["peak_memory_kind"] if report["steps"] else "rss"
    return ["Training and evaluation steps on random batches (median of the timed steps, data loading "
            f"excluded; peak memory is the process {kind} while training):", "",
            *render_table(header, rows, markdown)]


def _rounds_lines(report: dict[str, Any], markdown: bool) -> list[str]:
    header = ["model", "method", "train img", "eval img", "round 1 s", "round s", "train s", "aggregate s",
              "eval s", "other s", "other %", "peak MiB"]
    rows = []
    for e in report["rounds"]:
        last = e["splits"][-1]
        other = last["aggregate"] + last["other"]
        rows.append([e["model"], e["method"], f"{e['train_images_per_round']:.0f}", str(e["eval_images_per_round"]),
                     _seconds(e["splits"][0]["total"]), _seconds(last["total"]), _seconds(last["train"]),
                     _seconds(last["aggregate"]), _seconds(last["eval"]), _seconds(last["other"]),
                     f"{100 * other / last['total']:.1f}", _mib(e["peak_memory_bytes"])])
    return ["Rounds of the in-process simulation with every speed-up on (default configuration; the split is "
            "of the last round, caches warm; other % counts aggregation and other):", "",
            *render_table(header, rows, markdown)]


def _speedup_lines(report: dict[str, Any], markdown: bool) -> list[str]:
    section = report["speedups"]
    header = ["switch", "model", "method", "saves", "round 1 off / on s", "steady off / on s", "train off / on s",
              "eval off / on s", "speed-up", "max |Δ| state", "max |Δ| prob", "max |Δ| metric", "equal"]
    rows = []
    for c in section["cases"]:
        overrides = ", ".join(c["overrides"])
        difference = c["max_abs_difference"]
        off, on = c["off"][-1], c["on"][-1]
        rows.append([c["switch"], c.get("model", section["model"]), c["method"] + (f" ({overrides})" if overrides else ""),
                     c["reason"], f"{c['off'][0]['total']:.2f} / {c['on'][0]['total']:.2f}",
                     f"{off['total']:.2f} / {on['total']:.2f}", f"{off['train']:.2f} / {on['train']:.2f}",
                     f"{off['eval']:.2f} / {on['eval']:.2f}", f"{c['speedup_steady_round']:.1f}x",
                     f"{difference['state']:.1e}", f"{difference['probabilities']:.1e}",
                     f"{difference['metrics']:.1e}", "yes" if c["equal_within_tolerance"] else "NO"])
    tolerance = report["tolerance"]
    lines = [f"Speed-ups, each on and off in this run (the steady round is the last, caches warm; the train and "
             f"eval columns split the steady round; equal: trained tensors within {tolerance['state']:g}, "
             f"probabilities within {tolerance['probabilities']:g} and client-mean metrics within "
             f"{tolerance['metrics']:g}):", "", *render_table(header, rows, markdown)]
    loader = section.get("loader")
    if loader:
        lines += ["", (
            f"Data loading of {loader['images']} generated 32 px PNG images through the {loader['size']} px "
            f"evaluation transform: {loader['uncached_images_per_second']:.0f} img/s without the decoded-image "
            f"cache, {loader['filling_images_per_second']:.0f} img/s while it fills, "
            f"{loader['cached_images_per_second']:.0f} img/s from it."
        )]
    if "autocast" in section:
        lines += ["", f"bf16 autocast: {section['autocast']}."]
    batched = _find(section["cases"], switch="batched_clients")
    for bound in section["batched_clients"]:
        joined = bound["clients"] * bound["batch_size"]
        measured = (
            f"Batched clients (perf.batched_clients): FL²oRA on {bound['model']} trains "
            f"{bound['images_per_second']:.1f} img/s at batch {bound['batch_size']} (MFU {bound['mfu']:.0%}) and "
            f"{bound['joined_images_per_second']:.1f} img/s with one adapter at batch {joined} (MFU "
            f"{bound['joined_mfu']:.0%}). One adapter on the joined batch bounds what {bound['clients']} adapters "
            "in one pass can reach: the same image FLOPs, but one text-encoder pass where separate adapters "
            f"need one each. So batching can speed up training by at most {bound['bound']:.2f}x here"
        )
        if batched is not None:
            off, on = batched["off"][-1], batched["on"][-1]
            measured += (
                f"; the switch itself trained the steady round {off['train'] / on['train']:.2f}x as fast "
                f"({off['train']:.3f} s off, {on['train']:.3f} s on, {batched.get('model', section['model'])})"
            )
        lines += ["", measured + "."]
    return lines


def _scale_lines(report: dict[str, Any], code: str) -> list[str]:
    scale = report["scale"]
    memory = scale["memory"]
    split = scale["split"]
    images = f"{memory['training_images']:,} training images in memory, " if memory.get("training_images") else ""
    return [
        f"Scale: {scale['clients']} clients on {scale['model']} in one process: {memory['clip_models_in_process']} "
        f"CLIP model object(s) in the process, {_mib(memory['backbone_parameter_bytes'])} MiB of backbone "
        f"parameters. RSS {_mib(memory['rss_before_build'])} MiB before building, "
        f"{_mib(memory['rss_after_build'])} MiB after building the model and the {scale['clients']} client "
        f"datasets ({images}decoded-image cache {_mib(memory['decoded_image_cache_bytes'])} MiB), "
        f"{_mib(memory['rss_after_rounds'])} MiB after the round; peak {scale['peak_memory_kind']} "
        f"{_mib(scale['peak_memory_bytes'])} MiB.",
        "",
        f"A round with {scale['sampled']} sampled clients of {scale['train_images_per_client']} training images "
        f"and {scale['test_images_per_client']} test images per client ({scale['clients']} clients evaluated): "
        f"{split['total']:.2f} s = training {split['train']:.2f} + aggregation {split['aggregate']:.3f} + "
        f"evaluation {split['eval']:.2f} + other {split['other']:.3f} (checkpoint {split['checkpoint']:.3f}); "
        f"outside training and evaluation: {scale['other_share']:.1%}.",
    ]


def format_report(report: dict[str, Any], markdown: bool = False) -> str:
    """Return the whole report: machine, reference, each section's table, the targets and the warning."""
    code = "`" if markdown else ""
    lines = _header(report, code)
    if "steps" in report:
        lines += ["", *_steps_lines(report, markdown)]
    if "rounds" in report:
        lines += ["", *_rounds_lines(report, markdown)]
    if "speedups" in report:
        lines += ["", *_speedup_lines(report, markdown)]
    if "scale" in report:
        lines += ["", *_scale_lines(report, code)]
    rows = [[t["target"], t["figure"] or "-", _status(t["met"]), t["cause"] or ""] for t in report["targets"]]
    lines += ["", "Targets:", "", *render_table(["target", "figure", "status", "cause of a miss"], rows, markdown)]
    lines += ["", str(report["warning"]) + " Speed does not depend on the weights."]
    return "\n".join(lines) + "\n"
