"""Run configuration: typed dataclasses, YAML loading, ``key=value`` overrides.

A configuration file is YAML with one mapping per section (``model``, ``lora``,
``data``, ``partition``, ``federated``, ``train``, ``eval``, ``perf``) plus the top-level
keys ``name``, ``seed`` and ``method``. Every field is documented once, on its
dataclass. Unknown keys and values of the wrong type are rejected with the
closest valid key or the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fl2ora.errors import ConfigError
from fl2ora.losses import CalibrationLossConfig
from fl2ora.methods.maple import MaPLeSettings

__all__ = [
    "CalibrationLossConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FederatedConfig",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "PerfConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


@dataclass
class ModelConfig:
    """CLIP backbone and zero-shot head."""

    name: str = "openai/clip-vit-base-patch16"
    """Hugging Face hub id, local model folder, OpenAI-format checkpoint file (``ViT-B-16.pt``,
    as the CoOp family of code caches it), or an architecture name (``tiny``,
    ``vit-b-32``, ``vit-b-16``) that only exists with ``random_init``."""
    random_init: bool = False
    """Build the architecture with random weights instead of loading weights. Every
    output of such a run says that its numbers are a pipeline check."""
    init_seed: int = 0
    """Seed of the random initialisation (only with ``random_init``)."""
    allow_download: bool = False
    """Let ``transformers`` download hub weights. When false, only the local cache and
    local folders are read, so a missing model fails at once."""
    tau: float = 1.0
    """Softmax temperature: logits = exp(logit_scale) * cos(image, text) / tau."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run; ``auto`` picks CUDA when available."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype on CUDA; trainable parameters and optimizer state stay fp32.
    Ignored on the CPU."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"model.tau must be > 0, got {self.tau!r}; it must be finite. The study uses 1.0.")


@dataclass
class LoraConfig:
    """FL²oRA: LoRA on the attention projections of CLIP's encoders."""

    encoder: Literal["vision", "text", "both"] = "both"
    """Which encoder(s) get LoRA."""
    projections: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    """Attention projections to adapt, a subset of ``q``, ``k``, ``v``, ``out``."""
    layers: str | list[int] = "all"
    """``all``, a list of 0-based block indices, or a named range: ``bottom``,
    ``mid``, ``up`` (thirds), ``half-bottom``, ``half-up``, ``top-K`` (last K)."""
    rank: int = 2
    """LoRA rank r."""
    alpha: float = 1.0
    """LoRA alpha."""
    dropout: float = 0.25
    """Dropout on the LoRA input during training (off in evaluation)."""
    scaling: Literal["rslora", "standard"] = "rslora"
    """``rslora``: scale alpha / sqrt(r), as the study; ``standard``: alpha / r."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank!r}. The study uses 2.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}. The study uses 1.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}. The study uses 0.25.")
        unknown = [p for p in self.projections if p not in ("q", "k", "v", "out")]
        if unknown or not self.projections:
            raise ConfigError(
                f"lora.projections must be a non-empty subset of ['q', 'k', 'v', 'out'], "
                f"got {self.projections!r}."
            )


@dataclass
class DataConfig:
    """Dataset and loading."""

    dataset: str = "cifar10"
    """Dataset name (``cifar10``, ``image_folder``)."""
    root: str = "data/cifar10"
    """Dataset folder, or a ``.tar.gz`` archive unpacked once into the cache."""
    download: bool = False
    """Download the dataset through torchvision when it is missing."""
    max_train_per_class: int | None = None
    """Keep at most this many training images per class (seeded), for quick runs."""
    max_test_per_class: int | None = None
    """Keep at most this many test images per class (seeded), for quick runs."""
    augment: bool = True
    """Random resized crop and horizontal flip on training images."""
    num_workers: int = 0
    """DataLoader worker processes."""
    bad_images: Literal["error", "skip"] = "error"
    """Handling of image files that cannot be decoded, including images larger than
    Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``. Every split is checked at once before the
    first round: ``error`` stops with an error naming them, ``skip`` leaves them out
    and logs their count."""

    def __post_init__(self) -> None:
        for key in ("max_train_per_class", "max_test_per_class"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be >= 1 or null, got {value!r}.")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers!r}.")


@dataclass
class PartitionConfig:
    """How the training and test sets are split across clients."""

    method: Literal["dirichlet", "iid"] = "dirichlet"
    """Label-skew Dirichlet split, or a uniform random split."""
    num_clients: int = 100
    """Number of clients K."""
    beta: float = 0.5
    """Dirichlet concentration; smaller is more skewed."""
    min_samples: int = 10
    """Every client needs at least this many training and test samples."""
    max_tries: int = 1000
    """Dirichlet redraws before giving up with an error."""

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"partition.num_clients must be >= 1, got {self.num_clients!r}.")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(
                f"partition.beta must be > 0, got {self.beta!r}. The study uses 0.5; larger is closer to IID."
            )
        if self.min_samples < 1:
            raise ConfigError(f"partition.min_samples must be >= 1, got {self.min_samples!r}.")
        if self.max_tries < 1:
            raise ConfigError(f"partition.max_tries must be >= 1, got {self.max_tries!r}.")


@dataclass
class FederatedConfig:
    """Rounds, client sampling and aggregation."""

    rounds: int = 50
    """Communication rounds."""
    fraction: float = 0.1
    """Fraction of clients sampled each round, in (0, 1]."""
    all_clients_first_round: bool = False
    """Train every client in round 1, as the study's scripts do."""
    aggregation: Literal["fedavg", "fedprox", "feddyn", "fednova"] = "fedavg"
    """Aggregation rule: FedAvg weighted by training-set size; FedProx (FedAvg plus a
    proximal term on the client); FedDyn (dynamic regularisation with per-client
    state); FedNova (averaging normalised by each client's local steps)."""
    mu: float = 0.01
    """FedProx proximal weight: the client loss adds mu/2 ||w - w_global||^2."""
    alpha: float = 0.01
    """FedDyn regularisation weight."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"federated.mu must be a finite number >= 0, got {self.mu!r}. Try 0.01.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"federated.alpha must be a finite number > 0, got {self.alpha!r}. Try 0.01.")
        if self.rounds < 1:
            raise ConfigError(f"federated.rounds must be >= 1, got {self.rounds!r}.")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"federated.fraction must be in (0, 1], got {self.fraction!r}. "
                "Use 1.0 to train every client every round."
            )


@dataclass
class TrainConfig:
    """Local training on each client: SGD with a constant learning rate."""

    lr: float = 1e-3
    """Learning rate."""
    momentum: float = 0.9
    """SGD momentum; the buffer starts from zero at every client update."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    batch_size: int = 32
    """Training batch size."""
    local_epochs: int = 1
    """Passes over the client's training split per round."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr!r}. The study uses 0.001.")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size!r}.")
        if self.local_epochs < 1:
            raise ConfigError(f"train.local_epochs must be >= 1, got {self.local_epochs!r}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay!r}.")


@dataclass
class EvalConfig:
    """Evaluation of the global model on every client's local test split."""

    every: int = 1
    """Evaluate every this many rounds; the last round is always evaluated."""
    n_bins: int = 10
    """Equal-width bins for ECE and MCE, equal-mass bins for ACE."""
    batch_size: int = 128
    """Evaluation batch size."""
    last_rounds: int = 5
    """Mean and standard deviation are reported over this many last evaluated rounds."""
    calibration: Literal["standard", "reference"] = "standard"
    """``standard``: ECE and MCE of Guo et al. 2017. ``reference``: the released FL²oRA
    code's variants (confidence 1.0 left out of every bin, MCE weighted by bin share),
    only for comparison with its published numbers; outputs are labelled."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"eval.every must be >= 1, got {self.every!r}.")
        if self.n_bins < 1:
            raise ConfigError(f"eval.n_bins must be >= 1, got {self.n_bins!r}. The study uses 10.")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size!r}.")
        if self.last_rounds < 1:
            raise ConfigError(f"eval.last_rounds must be >= 1, got {self.last_rounds!r}.")


@dataclass
class PromptConfig:
    """CoOp / PromptFL and KgCoOp: learnable context vectors before the class name."""

    n_ctx: int | None = None
    """Number of context vectors M. ``null`` means 16 with random initialisation and the
    phrase's token count with a phrase; a number given with a phrase must equal that count."""
    class_specific: bool = False
    """One context per class (CoOp's CSC) instead of one shared by all classes."""
    init: str = "random"
    """``random`` (normal, std 0.02) or a phrase such as ``a photo of a`` whose token
    embeddings initialise the context."""
    kgcoop_weight: float = 8.0
    """KgCoOp's lambda: weight of the squared distance between learned and hand-written
    class text features. Used by method ``kgcoop`` only; ``coop`` trains without it."""

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ConfigError(f"coop.n_ctx must be >= 1 or null, got {self.n_ctx!r}. CoOp uses 16.")
        if not self.init.strip():
            raise ConfigError("coop.init must be 'random' or a phrase such as 'a photo of a', got ''.")
        if not (math.isfinite(self.kgcoop_weight) and self.kgcoop_weight >= 0):
            raise ConfigError(f"coop.kgcoop_weight must be >= 0, got {self.kgcoop_weight!r}. KgCoOp uses 8.")


@dataclass
class TuningConfig:
    """Which encoder(s) LayerNorm tuning, BitFit and full fine-tuning train."""

    encoder: Literal["vision", "text", "both"] = "both"
    """Encoder(s) whose parameters train."""


@dataclass
class TemperatureConfig:
    """Post-hoc temperature scaling after the last round, reported before and after."""

    mode: Literal["none", "central", "federated", "per_client"] = "none"
    """``central``: fitted on the pooled validation splits on the server; ``federated``:
    each client sends only its local NLL and gradient; ``per_client``: fitted per client
    and averaged by sample count; ``none``: skipped."""
    validation_fraction: float = 0.1
    """Share of each client's training split held out (seeded) as its validation split
    when ``mode`` is not ``none``; those images are not trained on."""

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                f"temperature.validation_fraction must be in (0, 1), got {self.validation_fraction!r}. Try 0.1."
            )


@dataclass
class SettingConfig:
    """The federated setting: label skew, domain skew, leave-one-domain-out or base-to-new."""

    kind: Literal["label_skew", "domain_skew", "leave_one_domain_out", "base_to_new"] = "label_skew"
    """``label_skew``: one dataset split across ``partition.num_clients`` clients.
    ``domain_skew``: each domain split across ``clients_per_domain`` clients, tested on
    held-out images of their own domain. ``leave_one_domain_out``: as domain skew
    without ``held_out_domain``, which is scored on all its images after training.
    ``base_to_new``: base classes (the first half, rounded up) dealt to
    ``partition.num_clients`` clients with ``shots`` images each; new classes only tested."""
    clients_per_domain: int = 2
    """Clients per domain in the domain settings (replaces ``partition.num_clients``)."""
    domains: list[str] | None = None
    """Domains to use; null means all of the dataset's domains."""
    held_out_domain: str | None = None
    """The unseen domain of ``leave_one_domain_out``."""
    shots: int = 16
    """Training images per base class in ``base_to_new``: 1, 2, 4, 8 or 16."""
    pacs_test_split: Literal["crossval", "test_kfold"] = "crossval"
    """PACS in-domain test list. ``crossval`` is held out from training; ``test_kfold``
    reproduces the reference code, whose test list contains every training image."""

    def __post_init__(self) -> None:
        if self.clients_per_domain < 1:
            raise ConfigError(f"setting.clients_per_domain must be >= 1, got {self.clients_per_domain!r}.")
        if self.shots not in (1, 2, 4, 8, 16):
            raise ConfigError(f"setting.shots must be one of 1, 2, 4, 8, 16, got {self.shots!r}.")
        if self.kind == "leave_one_domain_out" and not self.held_out_domain:
            raise ConfigError("setting.kind=leave_one_domain_out needs setting.held_out_domain, e.g. sketch.")


@dataclass
class PerfConfig:
    """Speed-ups: each changes how a result is computed, never which method runs.

    Setting a switch to false restores the plain computation. The switches marked
    bit-identical give the same results either way; the others change features by
    float rounding only (``docs/performance.md`` lists the measured differences).
    """

    text_feature_cache: bool = True
    """Compute the class text features once per evaluation, and once per client update
    when no text parameter trains, instead of for every batch. Bit-identical."""
    trim_text_padding: bool = True
    """Run the text encoder on prompts cut after the longest prompt's end-of-text token
    instead of the whole 77-token context. The causal mask already hides the cut
    positions from the pooled token, so features change by float rounding only. LoRA
    dropout on the text encoder then draws its masks for the whole context, which on
    the CPU gives the same masks as without the cut. On CUDA, training with LoRA
    dropout keeps the whole context."""
    image_feature_cache: bool = True
    """Compute each image's features once and reuse them in later rounds while no
    image-encoder parameter trains (``zeroshot``, ``coop``, ``kgcoop``, and ``fl2ora``,
    ``layernorm``, ``bitfit`` or ``full`` on the text encoder only): every test set, and
    the training sets too when ``data.augment`` is false. MaPLe feeds learned prompts
    into the image encoder, so it never uses the cache. Features differ from per-batch
    ones by float rounding only."""
    decoded_image_cache: bool = True
    """Keep each image in memory as uint8 after its first read: decoded, and resized and
    center-cropped when the transform starts with that (evaluation, or training with
    ``data.augment`` false). Up to ``image_cache_mb``, shared by all clients. Bit-identical."""
    image_cache_mb: int = 2048
    """Memory budget of ``decoded_image_cache`` in MiB; images past it are read from
    their source on every access."""
    batched_clients: int = 1
    """Clients of a round trained together in one forward and backward pass over the
    shared frozen backbone, each with its own LoRA tensors, data order, dropout masks
    and SGD state; 1 trains them one after another. Applies to ``fl2ora`` (LoRA) in
    the in-process simulation. Other methods, and a backbone with dropout outside the
    LoRA inputs (attention dropout), train one after another, and a warning gives the
    reason. The Flower runtime runs one client per SuperNode, so it never batches.
    Results change by float rounding only."""

    def __post_init__(self) -> None:
        if isinstance(self.batched_clients, bool) or not isinstance(self.batched_clients, int):
            raise ConfigError(
                f"perf.batched_clients must be an integer, got {self.batched_clients!r} "
                f"({type(self.batched_clients).__name__}). Use 1 to train clients one after another."
            )
        if self.batched_clients < 1:
            raise ConfigError(
                f"perf.batched_clients must be >= 1, got {self.batched_clients!r}. "
                "Use 1 to train clients one after another, or the number of clients to train together."
            )
        if self.image_cache_mb < 0:
            raise ConfigError(
                f"perf.image_cache_mb must be >= 0, got {self.image_cache_mb!r}. "
                "Use 0 or perf.decoded_image_cache=false to turn the cache off."
            )


METHODS = ("zeroshot", "fl2ora", "coop", "kgcoop", "maple", "layernorm", "bitfit", "full")


@dataclass
class RunConfig:
    """One federated run."""

    name: str = "fl2ora"
    """Run name, used for the default output folder."""
    seed: int = 0
    """Seed of partitioning, client sampling, data order and dropout."""
    method: Literal["zeroshot", "fl2ora", "coop", "kgcoop", "maple", "layernorm", "bitfit", "full"] = "fl2ora"
    """Fine-tuning method: ``zeroshot`` (no training), ``fl2ora`` (LoRA, section ``lora``),
    ``coop`` (PromptFL when federated) and ``kgcoop`` (section ``coop``), ``maple``
    (section ``maple``), ``layernorm``, ``bitfit`` and ``full`` (section ``tuning``)."""
    setting: SettingConfig = field(default_factory=SettingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    coop: PromptConfig = field(default_factory=PromptConfig)
    maple: MaPLeSettings = field(default_factory=MaPLeSettings)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    loss: CalibrationLossConfig = field(default_factory=CalibrationLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed!r}.")
        if not self.name.strip() or any(mark in self.name for mark in ("/", "\\")) or self.name in (".", ".."):
            raise ConfigError(
                f"name must be a plain run name without path separators, got {self.name!r}: it names the "
                "default folder under runs/. Choose the folder with --output instead."
            )


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting int to float where a float is expected."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key} must be {_type_name(annotation)}, got {value!r} ({type(value).__name__}).")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_type_name(item_type)}, got {value!r}.")
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key} must be null, got {value!r}.")
        return None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__}).")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r} ({type(value).__name__}).")
        return value
    if annotation in (bool, str):
        if not isinstance(value, annotation):
            raise ConfigError(f"{key} must be {annotation.__name__}, got {value!r} ({type(value).__name__}).")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "the configuration"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown configuration key '{prefix}{key}'.{hint} Valid keys here: {names}.")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, annotation, f"{prefix}{key}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from nested plain values.

    Raises:
        ConfigError: on an unknown key (with the closest valid one), a value of the
            wrong type, or a value out of range.
    """
    return _build(RunConfig, values, "")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Return the fully resolved configuration as nested plain values."""
    return dataclasses.asdict(config)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides, each value parsed as YAML.

    Raises:
        ConfigError: when an override has no ``=``, an empty key or a value that is not YAML.
    """
    result = dict(values)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {override!r} must have the form section.key=value, e.g. lora.rank=4.")
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            reason = str(error).splitlines()[0]
            raise ConfigError(
                f"Override {override!r}: the value is not valid YAML ({reason}). Quote it, e.g. "
                f"{key.strip()}='\"text\"', or fix the brackets."
            ) from None
    return result


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML configuration file and apply ``key=value`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``section.key=value`` strings applied in order.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ConfigError: on invalid YAML, keys or values.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Configuration file {str(path)!r} not found. See configs/ for presets.")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must contain a YAML mapping at the top level, got {type(loaded).__name__}.")
        values = loaded or {}
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)
