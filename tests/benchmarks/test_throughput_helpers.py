"""Tests of the throughput benchmark: FLOP counting, MFU arithmetic, its report and a tiny measured run.

The FLOP counter and the matmul reference live in ``fl2ora.perf.measure``, which the script imports.
"""

import math
import os
import platform
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import throughput  # noqa: E402
from fl2ora.model.backbone import RANDOM_INIT_WARNING  # noqa: E402
from fl2ora.perf import measure  # noqa: E402

BATCH, IN_FEATURES, OUT_FEATURES = 8, 16, 12
LINEAR_FLOPS = 2 * BATCH * IN_FEATURES * OUT_FEATURES  # one (B, in) x (in, out) product


def _linear_and_input(input_grad: bool, weight_grad: bool, bias: bool = True):
    torch.manual_seed(0)
    layer = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)
    layer.weight.requires_grad_(weight_grad)
    x = torch.randn(BATCH, IN_FEATURES, requires_grad=input_grad)
    return layer, x


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_flops(bias):
    layer, x = _linear_and_input(input_grad=False, weight_grad=True, bias=bias)
    with torch.no_grad():
        flops = measure.count_flops_detailed(lambda: layer(x))
    assert flops.total == LINEAR_FLOPS


@pytest.mark.parametrize(
    ("input_grad", "weight_grad", "backward_flops"),
    [
        (True, True, 2 * LINEAR_FLOPS),  # grad of input and of weight: 4 * B * in * out
        (False, True, LINEAR_FLOPS),  # grad of weight only: 2 * B * in * out
        (True, False, LINEAR_FLOPS),  # grad of input only (a frozen layer inside the network)
    ],
)
def test_linear_forward_backward_flops(input_grad, weight_grad, backward_flops):
    layer, x = _linear_and_input(input_grad, weight_grad)
    flops = measure.count_flops_detailed(lambda: layer(x).sum().backward())
    assert flops.total == LINEAR_FLOPS + backward_flops
    assert flops.by_operator["aten.addmm"] == LINEAR_FLOPS
    assert flops.by_operator["aten.mm"] == backward_flops


def test_cpu_attention_flops_counted():
    batch, heads, seq, head_dim = 2, 3, 10, 8
    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    one_product = 2 * batch * heads * seq * seq * head_dim  # one (S, d) x (d, S) product per head

    with torch.no_grad():
        forward = measure.count_flops_detailed(lambda: F.scaled_dot_product_attention(q, k, v))
    both = measure.count_flops_detailed(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())

    # Forward: Q K^T and P V. Backward: Q K^T again, then dP, dV, dQ and dK.
    assert forward.total == 2 * one_product
    assert both.total == 7 * one_product


def test_achieved_flops_and_mfu_arithmetic():
    flops_per_step, step_seconds, peak = 6_000_000_000, 2.0, 12e9
    achieved = throughput.achieved_flops_per_second(flops_per_step, step_seconds)
    assert achieved == 3e9
    assert throughput.model_flops_utilisation(achieved, peak) == 0.25
    assert throughput.model_flops_utilisation(0.0, peak) == 0.0
    assert throughput.model_flops_utilisation(peak, peak) == 1.0


def test_measure_matmul_rate_formula():
    sizes = [32, 64]
    result = measure.measure_matmul_detailed(sizes, torch.device("cpu"), min_seconds=0.01)
    for n in sizes:
        entry = result.by_size[n]
        assert entry["seconds"] >= 0.01
        assert entry["flops_per_second"] == pytest.approx(2 * n**3 * entry["reps"] / entry["seconds"])
    best = max(sizes, key=lambda n: result.by_size[n]["flops_per_second"])
    assert result.best_size == best
    assert result.flops_per_second == result.by_size[best]["flops_per_second"]
    assert result.dtype == "float32"
    assert result.device == "cpu"


def test_describe_machine_fields():
    machine = measure.describe_machine(torch.device("cpu"))
    assert machine["logical_cpus"] == os.cpu_count()
    assert 1 <= machine["usable_cpus"] <= os.cpu_count()
    assert machine["torch_threads"] == torch.get_num_threads()
    assert machine["torch"] == torch.__version__
    assert machine["python"] == platform.python_version()
    assert machine["platform"] == platform.platform()
    assert "gpu" not in machine
    if Path("/proc/meminfo").is_file():
        # glibc's sysconf reads the kernel's total RAM through sysinfo(2), the figure behind MemTotal.
        assert machine["memory_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_report_table_alignment():
    header, rows = ["model", "img/s"], [["tiny", "968.8"], ["vit-b-32", "6.9"]]
    assert throughput._render_table(header, rows, markdown=True) == [
        "| model | img/s |",
        "|---|---:|",
        "| tiny | 968.8 |",
        "| vit-b-32 | 6.9 |",
    ]
    assert throughput._render_table(header, rows, markdown=False) == [
        "model     img/s",
        "--------  -----",
        "tiny      968.8",
        "vit-b-32    6.9",
    ]


def _tiny_eval_flops(batch: int, text: bool = True) -> int:
    """Forward FLOPs of the tiny CLIP with LoRA, by hand from its architecture.

    ``text`` False leaves out the text encoder, whose class features a steady-state
    evaluation step reuses.
    """
    width, mlp, rank, layers, classes = 64, 128, 2, 4, 10
    patch, image, context = 8, 32, 77

    def encoder(sequences: int, length: int) -> int:
        tokens = sequences * length
        projections = 4 * 2 * tokens * width * width  # q, k, v, out
        feed_forward = 2 * 2 * tokens * width * mlp
        lora = 3 * (2 * tokens * width * rank + 2 * tokens * rank * width)  # A then B on q, k, v
        attention = 2 * 2 * sequences * length * length * width  # Q K^T and P V over all heads
        return layers * (projections + feed_forward + lora + attention)

    patches = (image // patch) ** 2
    patch_embedding = 2 * batch * patches * (3 * patch * patch) * width
    vision = patch_embedding + encoder(batch, patches + 1) + 2 * batch * width * width  # + visual projection
    text_flops = encoder(classes, context) + 2 * classes * width * width  # + text projection
    logits = 2 * batch * width * classes
    return vision + (text_flops if text else 0) + logits


@pytest.fixture(scope="module")
def tiny_result():
    return throughput.measure_model("tiny", matmul_flops_per_second=50e9, batch_size=4, steps=1, warmup=0)


def test_tiny_images_per_second(tiny_result):
    assert len(tiny_result.train_step_times) == 1
    assert tiny_result.train_step_seconds == tiny_result.train_step_times[0]
    assert tiny_result.train_images_per_second == pytest.approx(4 / tiny_result.train_step_seconds)
    assert tiny_result.eval_images_per_second == pytest.approx(4 / tiny_result.eval_step_seconds)
    assert tiny_result.train_cpu_utilisation > 0
    assert tiny_result.eval_cpu_utilisation > 0


def test_tiny_flops_and_mfu(tiny_result):
    # The timed evaluation steps reuse the class text features, so their FLOPs leave the text encoder out.
    assert tiny_result.eval_flops_per_step == _tiny_eval_flops(batch=4, text=False)
    assert tiny_result.train_flops_per_step > tiny_result.eval_flops_per_step
    expected_rate = tiny_result.train_flops_per_step / tiny_result.train_step_seconds
    assert tiny_result.train_flops_per_second == pytest.approx(expected_rate)
    assert tiny_result.train_mfu == pytest.approx(expected_rate / 50e9)


def test_tiny_trainable_parameters(tiny_result):
    # LoRA on q, k, v of 4 blocks in each of 2 encoders: A (2 x 64) and B (64 x 2) per projection.
    assert tiny_result.trainable_parameters == 2 * 4 * 3 * (2 * 64 + 64 * 2)
    assert tiny_result.random_init is True


def test_matmul_reference_replaced(tiny_result):
    replaced = throughput.with_matmul_reference(tiny_result, 100e9)
    assert replaced.matmul_flops_per_second == 100e9
    assert replaced.train_mfu == pytest.approx(tiny_result.train_flops_per_second / 100e9)
    assert replaced.eval_mfu == pytest.approx(tiny_result.eval_flops_per_second / 100e9)
    assert replaced.train_images_per_second == tiny_result.train_images_per_second


@pytest.mark.parametrize(
    ("times", "cpu_utilisation", "device", "expected_notes"),
    [
        pytest.param([1.0, 1.1, 1.2], 0.99, "cpu", 0, id="idle machine"),
        pytest.param([1.0, 1.3], 0.99, "cpu", 1, id="step spread"),
        pytest.param([1.0, 1.0], 0.5, "cpu", 1, id="threads starved"),
        pytest.param([1.0, 2.0], 0.5, "cpu", 2, id="both signs"),
        pytest.param([1.0, 1.0], 0.1, "cuda", 0, id="CPU time ignored on CUDA"),
    ],
)
def test_contention_notes(times, cpu_utilisation, device, expected_notes):
    notes = throughput._contention_notes("train", times, cpu_utilisation, torch.device(device))
    assert len(notes) == expected_notes


def test_report_names_random_init(tiny_result):
    report = {
        "date": "2026-12-04T00:00:00+00:00",
        "command": "python benchmarks/throughput.py --models tiny",
        "machine": measure.describe_machine(torch.device("cpu")),
        "load_average_at_start": 0.0,
        "matmul": {
            "dtype": "float32",
            "flops_per_second": 50e9,
            "before": {"by_size": {64: {"flops_per_second": 50e9}}},
            "after": {"by_size": {64: {"flops_per_second": 40e9}}},
        },
    }
    markdown = throughput.format_report(report, [tiny_result], markdown=True)
    text = throughput.format_report(report, [tiny_result], markdown=False)
    assert "| tiny |" in markdown
    assert "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" in markdown
    assert RANDOM_INIT_WARNING in markdown
    assert RANDOM_INIT_WARNING in text


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: throughput.model_flops_utilisation(1e9, 0.0), "peak must be", id="zero peak"),
        pytest.param(lambda: throughput.model_flops_utilisation(1e9, -1e9), "peak must be", id="negative peak"),
        pytest.param(lambda: throughput.model_flops_utilisation(1e9, math.nan), "peak must be", id="NaN peak"),
        pytest.param(lambda: throughput.model_flops_utilisation(-1.0, 1e9), "achieved must be", id="negative rate"),
        pytest.param(lambda: throughput.achieved_flops_per_second(10, 0.0), "step_seconds", id="zero time"),
        pytest.param(lambda: throughput.achieved_flops_per_second(10, math.inf), "step_seconds", id="infinite time"),
        pytest.param(lambda: throughput.achieved_flops_per_second(-1, 1.0), "flops_per_step", id="negative FLOPs"),
        pytest.param(lambda: measure.measure_matmul_detailed([], torch.device("cpu")), "sizes", id="no matmul size"),
        pytest.param(lambda: measure.measure_matmul_detailed([0], torch.device("cpu")), "sizes", id="zero matmul size"),
        pytest.param(
            lambda: measure.measure_matmul_detailed([8], torch.device("cpu"), min_seconds=-1), "min_seconds",
            id="negative matmul time",
        ),
        pytest.param(lambda: throughput.measure_model("vit-x", 1e9), "Unknown model", id="unknown model"),
        pytest.param(lambda: throughput.measure_model("tiny", 1e9, steps=0), "steps", id="zero steps"),
        pytest.param(lambda: throughput.measure_model("tiny", 1e9, warmup=-1), "warmup", id="negative warmup"),
        pytest.param(lambda: throughput.measure_model("tiny", 1e9, batch_size=0), "batch_size", id="zero batch"),
        pytest.param(lambda: throughput.measure_model("tiny", 0.0), "matmul_flops_per_second", id="zero peak model"),
    ],
)
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--warmup", "-1"],
        ["--batch-size", "0"],
        ["--models", "vit-x"],
        ["--matmul-seconds", "-1"],
    ],
)
def test_invalid_arguments_exit(argv):
    with pytest.raises(SystemExit) as error:
        throughput.parse_args(argv)
    assert error.value.code == 2


def test_cold_forward_counts_text_encoder():
    model = throughput.build_fl2ora_model("tiny", torch.device("cpu")).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        flops = measure.count_flops_detailed(lambda: model(images)).total
    assert flops == _tiny_eval_flops(batch=4, text=True)
