"""Tests for fl2ora.config: defaults, YAML loading, overrides and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fl2ora.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_match_study():
    config = RunConfig()

    # LoRA as released: r=2, alpha=1, rsLoRA scale, dropout 0.25 on q, k, v of both encoders.
    assert config.lora.rank == 2
    assert config.lora.alpha == 1.0
    assert config.lora.dropout == 0.25
    assert config.lora.scaling == "rslora"
    assert config.lora.projections == ["q", "k", "v"]
    assert config.lora.encoder == "both"
    assert config.lora.layers == "all"

    # SGD with a constant rate, one local epoch, batch 32.
    assert config.train.lr == 1e-3
    assert config.train.momentum == 0.9
    assert config.train.weight_decay == 5e-4
    assert config.train.batch_size == 32
    assert config.train.local_epochs == 1

    # In-distribution federation: 100 clients, 10% per round, Dirichlet beta 0.5, 50 rounds.
    assert config.federated.rounds == 50
    assert config.federated.fraction == 0.1
    assert config.federated.aggregation == "fedavg"
    assert config.partition.method == "dirichlet"
    assert config.partition.beta == 0.5
    assert config.partition.num_clients == 100

    # Calibration metrics with 10 bins over the last 5 rounds, temperature 1.
    assert config.eval.n_bins == 10
    assert config.eval.last_rounds == 5
    assert config.eval.calibration == "standard"
    assert config.model.tau == 1.0
    assert config.model.name == "openai/clip-vit-base-patch16"
    assert config.model.random_init is False
    assert config.model.allow_download is False


def test_default_lists_not_shared():
    first, second = LoraConfig(), LoraConfig()
    first.projections.append("out")
    assert second.projections == ["q", "k", "v"]


def test_load_none_gives_defaults():
    assert load_config(None) == RunConfig()


def test_load_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "name: probe\n"
        "seed: 7\n"
        "model:\n  name: tiny\n  random_init: true\n  tau: 2\n"
        "lora:\n  rank: 4\n  projections: [q, v]\n  layers: [0, 3]\n"
        "data:\n  max_train_per_class: 50\n"
    )
    config = load_config(path)

    assert config.name == "probe"
    assert config.seed == 7
    assert config.model.name == "tiny"
    assert config.model.random_init is True
    assert config.lora.rank == 4
    assert config.lora.projections == ["q", "v"]
    assert config.lora.layers == [0, 3]
    assert config.data.max_train_per_class == 50
    # Keys absent from the file keep their defaults.
    assert config.lora.alpha == 1.0
    assert config.train == RunConfig().train


def test_int_accepted_as_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  tau: 2\nlora:\n  alpha: 4\ntrain:\n  lr: 1\n")
    config = load_config(path)

    assert config.model.tau == 2.0
    assert type(config.model.tau) is float
    assert type(config.lora.alpha) is float
    assert type(config.train.lr) is float
    assert config.train.lr == 1.0


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    assert load_config(path) == RunConfig()


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  rank: 4\n  alpha: 2.0\nfederated:\n  rounds: 3\n")
    config = load_config(
        path,
        [
            "lora.rank=8",  # int
            "train.lr=0.01",  # float
            "model.random_init=true",  # bool
            "model.name=tiny",  # str
            "lora.projections=[q, k, v, out]",  # flow-style list
            "data.max_train_per_class=null",  # None
            "seed=3",  # top-level key
            "name=a=b",  # only the first '=' separates key and value
        ],
    )

    assert config.lora.rank == 8
    assert config.lora.alpha == 2.0  # from the file, untouched by the overrides
    assert config.federated.rounds == 3
    assert config.train.lr == 0.01
    assert config.model.random_init is True
    assert config.model.name == "tiny"
    assert config.lora.projections == ["q", "k", "v", "out"]
    assert config.data.max_train_per_class is None
    assert config.seed == 3
    assert config.name == "a=b"


def test_overrides_apply_in_order():
    config = load_config(None, ["lora.rank=4", "lora.rank=6"])
    assert config.lora.rank == 6


def test_apply_overrides_leaves_input_unchanged():
    values = {"lora": {"rank": 4, "alpha": 2.0}, "seed": 1}
    result = apply_overrides(values, ["lora.rank=8", "train.lr=0.5"])

    assert result == {"lora": {"rank": 8, "alpha": 2.0}, "seed": 1, "train": {"lr": 0.5}}
    assert values == {"lora": {"rank": 4, "alpha": 2.0}, "seed": 1}


def test_apply_overrides_nested_keys():
    result = apply_overrides({}, ["a.b.c=1", "a.b.d= x y ", "a.e=[1, 2]"])
    # The value is parsed as YAML, so surrounding spaces are dropped.
    assert result == {"a": {"b": {"c": 1, "d": "x y"}, "e": [1, 2]}}


def test_quoted_override_stays_string():
    result = apply_overrides({}, ['name="123"', "seed=123"])
    assert result == {"name": "123", "seed": 123}


INVALID_VALUES = [
    # (nested values, expected message fragment)
    ({"lora": {"rnak": 3}}, r"Unknown configuration key 'lora\.rnak'\. Did you mean 'lora\.rank'\?"),
    ({"seeed": 1}, r"Unknown configuration key 'seeed'\. Did you mean 'seed'\?"),
    ({"federated": {"fracton": 0.5}}, r"Did you mean 'federated\.fraction'\?"),
    ({"lora": {"zzzz": 1}}, r"Unknown configuration key 'lora\.zzzz'\. Valid keys here"),
    ({"lora": {"rank": 0}}, r"lora\.rank must be >= 1, got 0"),
    ({"lora": {"rank": -2}}, r"lora\.rank must be >= 1, got -2"),
    ({"lora": {"dropout": 1.0}}, r"lora\.dropout must be in \[0, 1\)"),
    ({"lora": {"projections": []}}, r"lora\.projections must be a non-empty subset"),
    ({"lora": {"projections": ["q", "w"]}}, r"lora\.projections must be a non-empty subset"),
    ({"federated": {"fraction": 0}}, r"federated\.fraction must be in \(0, 1\], got 0\.0"),
    ({"federated": {"fraction": 1.5}}, r"federated\.fraction must be in \(0, 1\], got 1\.5"),
    ({"federated": {"rounds": 0}}, r"federated\.rounds must be >= 1"),
    ({"partition": {"beta": 0}}, r"partition\.beta must be > 0, got 0\.0"),
    ({"partition": {"beta": -1}}, r"partition\.beta must be > 0, got -1\.0"),
    ({"partition": {"num_clients": 0}}, r"partition\.num_clients must be >= 1"),
    ({"model": {"tau": 0}}, r"model\.tau must be > 0, got 0\.0"),
    ({"model": {"tau": float("nan")}}, r"model\.tau must be > 0"),
    ({"train": {"lr": 0}}, r"train\.lr must be a finite number > 0"),
    ({"train": {"lr": float("inf")}}, r"train\.lr must be a finite number > 0"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ({"train": {"momentum": 1.0}}, r"train\.momentum must be in \[0, 1\)"),
    ({"eval": {"n_bins": 0}}, r"eval\.n_bins must be >= 1"),
    ({"data": {"max_train_per_class": 0}}, r"data\.max_train_per_class must be >= 1 or null"),
    ({"lora": {"rank": "two"}}, r"lora\.rank must be an integer, got 'two' \(str\)"),
    ({"lora": {"rank": 2.0}}, r"lora\.rank must be an integer, got 2\.0 \(float\)"),
    ({"lora": {"rank": True}}, r"lora\.rank must be an integer, got True \(bool\)"),
    ({"model": {"random_init": "yes"}}, r"model\.random_init must be bool, got 'yes' \(str\)"),
    ({"model": {"tau": "1"}}, r"model\.tau must be a number, got '1' \(str\)"),
    ({"model": {"tau": True}}, r"model\.tau must be a number, got True \(bool\)"),
    ({"model": {"name": 3}}, r"model\.name must be str, got 3 \(int\)"),
    ({"lora": {"projections": "q"}}, r"lora\.projections must be a list of str, got 'q'"),
    ({"lora": {"projections": ["q", 1]}}, r"lora\.projections\[1\] must be str, got 1 \(int\)"),
    ({"lora": {"layers": 3}}, r"lora\.layers must be "),
    ({"lora": {"encoder": "audio"}}, r"lora\.encoder must be one of \['vision', 'text', 'both'\], got 'audio'"),
    ({"eval": {"calibration": "guo"}}, r"eval\.calibration must be one of \['standard', 'reference'\]"),
    ({"lora": 3}, r"lora must be a mapping of keys to values, got 3"),
    ({"model": ["tiny"]}, r"model must be a mapping of keys to values"),
]


@pytest.mark.parametrize("values,message", INVALID_VALUES)
def test_invalid_values_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


INVALID_OVERRIDES = [
    # (overrides, expected message fragment)
    (["lora.rnak=3"], r"Did you mean 'lora\.rank'\?"),
    (["seeed=1"], r"Did you mean 'seed'\?"),
    (["lora.rank=0"], r"lora\.rank must be >= 1"),
    (["federated.fraction=0"], r"federated\.fraction must be in \(0, 1\]"),
    (["federated.fraction=1.5"], r"federated\.fraction must be in \(0, 1\]"),
    (["partition.beta=0"], r"partition\.beta must be > 0"),
    (["partition.beta=-1"], r"partition\.beta must be > 0"),
    (["model.tau=0"], r"model\.tau must be > 0"),
    (["lora.rank=two"], r"lora\.rank must be an integer"),
    # Unquoted `yes` is YAML 1.1's true, so the string needs quotes to reach the type check.
    (['model.random_init="yes"'], r"model\.random_init must be bool"),
    (["lora.projections=q"], r"lora\.projections must be a list of str"),
    (["lora.encoder=audio"], r"lora\.encoder must be one of"),
    (["lora=3"], r"lora must be a mapping"),
    (["lora.rank"], r"Override 'lora\.rank' must have the form section\.key=value"),
    (["=4"], r"Override '=4' must have the form section\.key=value"),
    ([" =4"], r"must have the form section\.key=value"),
    (["lora.rank=["], r"Override 'lora\.rank=\[': the value is not valid YAML \(.*\)\. Quote it"),
    (["name=../../x"], r"name must be a plain run name without path separators, got '\.\./\.\./x'"),
    (["name=.."], r"name must be a plain run name"),
    (["name=a\\b"], r"name must be a plain run name"),
]


@pytest.mark.parametrize("overrides,message", INVALID_OVERRIDES)
def test_invalid_overrides_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


INVALID_FILES = [
    # (file text, expected message fragment)
    ("- lora\n- rank\n", r"must contain a YAML mapping at the top level, got list"),
    ("just a string\n", r"must contain a YAML mapping at the top level, got str"),
    ("lora: [rank\n", r"is not valid YAML"),
    ("lora:\n  rank: two\n", r"lora\.rank must be an integer"),
]


@pytest.mark.parametrize("text,message", INVALID_FILES)
def test_invalid_files_rejected(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_raises(tmp_path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(FileNotFoundError, match="absent.yaml.*not found"):
        load_config(missing)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="model.tau must be > 0"):
        ModelConfig(tau=-1.0)


def test_dict_round_trip():
    config = load_config(
        None,
        ["lora.layers=[0, 2]", "model.name=tiny", "model.random_init=true", "data.max_test_per_class=5"],
    )
    values = config_to_dict(config)

    assert values["lora"]["layers"] == [0, 2]
    assert values["model"]["random_init"] is True
    assert config_from_dict(values) == config
    # The dict holds only plain values, so it survives a YAML dump and load.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(values))) == config


def test_dict_lists_every_field():
    values = config_to_dict(RunConfig())
    expected_sections = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(values) == expected_sections
    assert set(values["lora"]) == {f.name for f in dataclasses.fields(LoraConfig)}


PRESETS = sorted(CONFIGS.glob("**/*.yaml"))


def test_presets_found():
    assert PRESETS, f"no YAML presets under {CONFIGS}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    # Every key written in the preset is kept in the resolved configuration.
    written = yaml.safe_load(path.read_text())
    resolved = config_to_dict(config)
    for section, value in written.items():
        if isinstance(value, dict):
            for key, item in value.items():
                assert resolved[section][key] == item, f"{section}.{key}"
        else:
            assert resolved[section] == value, section
