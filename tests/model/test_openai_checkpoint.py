"""Tests for fl2ora.model.openai_checkpoint: OpenAI-format CLIP files loaded into CLIPModel.

open_clip's ``CLIP`` class is an independent implementation of OpenAI's architecture with
OpenAI's state dict names, so a tiny random open_clip model, saved as a plain state dict and
as a traced TorchScript archive, replaces ``ViT-B-16.pt`` in these tests.
"""

from __future__ import annotations

import copy
import pickle
import warnings
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPModel

from fl2ora.model.backbone import build_architecture
from fl2ora.model.openai_checkpoint import (
    convert_openai_state_dict,
    infer_openai_config,
    load_openai_checkpoint,
    read_openai_state_dict,
)
from fl2ora.model.tokenizer import VOCAB_SIZE, bundled_clip_tokenizer

# Parameters of Hugging Face's openai/clip-vit-base-patch16 (CLIP ViT-B/16).
VIT_B_16_PARAMETERS = 149_620_737

# Widths of 128 give OpenAI's rule (width // 64) two attention heads per encoder.
WIDTH = 128
EMBED_DIM = 32
TEXTS = ["a photo of a dog.", "a blurry photo of an airplane, seen from far away", "hi"]


def build_open_clip(seed: int = 0) -> CLIP:
    """A tiny OpenAI-layout CLIP whose every weight, LayerNorm and bias included, is random."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=EMBED_DIM,
        vision_cfg=CLIPVisionCfg(layers=2, width=WIDTH, head_width=64, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=VOCAB_SIZE, width=WIDTH, heads=WIDTH // 64, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.logit_scale.fill_(2.3)
    return model.eval()


def trace(model: CLIP, path: Path, float16: bool = False) -> None:
    """Save ``model`` as a traced TorchScript archive, as OpenAI published its weights (in float16)."""
    example = (torch.randn(1, 3, 32, 32), open_clip.tokenize(["a photo"]))
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, and tracing warns about Python control flow.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced.half() if float16 else traced, str(path))


@pytest.fixture(scope="module")
def reference() -> CLIP:
    return build_open_clip()


@pytest.fixture(scope="module")
def reference_float16(reference) -> CLIP:
    """The reference with every weight rounded to float16, computing in float32."""
    return copy.deepcopy(reference).half().float().eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("openai_checkpoints")
    paths = {
        "plain": folder / "ViT-tiny.pt",
        "torchscript": folder / "ViT-tiny-jit.pt",
        "torchscript-float16": folder / "ViT-tiny-jit-fp16.pt",
        "plain-float16": folder / "ViT-tiny-fp16.pt",
    }
    torch.save(reference.state_dict(), paths["plain"])
    trace(reference, paths["torchscript"])
    trace(copy.deepcopy(reference), paths["torchscript-float16"], float16=True)
    torch.save({key: value.half() for key, value in reference.state_dict().items()}, paths["plain-float16"])
    return paths


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    tokens = bundled_clip_tokenizer()(TEXTS, padding="max_length", max_length=77, return_tensors="pt")
    return {
        "images": torch.randn(4, 3, 32, 32),
        "open_clip_ids": open_clip.tokenize(TEXTS),
        "hf_ids": tokens["input_ids"],
        "hf_mask": tokens["attention_mask"],
    }


def state_dict(reference: CLIP) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in reference.state_dict().items()}


# --- outputs equal open_clip's --------------------------------------------------------------------


def test_tokenizers_agree_before_padding(inputs):
    # open_clip pads with 0 and the bundled tokenizer with <|endoftext|>. Causal attention makes
    # the text feature independent of what follows the first <|endoftext|>.
    for row in range(len(TEXTS)):
        length = int(inputs["hf_mask"][row].sum())
        assert torch.equal(inputs["hf_ids"][row, :length], inputs["open_clip_ids"][row, :length])
        assert int(inputs["open_clip_ids"][row, length - 1]) == VOCAB_SIZE - 1


@pytest.mark.parametrize(
    ("kind", "reference_name"),
    [
        ("plain", "reference"),
        ("torchscript", "reference"),
        ("plain-float16", "reference_float16"),
        ("torchscript-float16", "reference_float16"),
    ],
)
def test_features_match_open_clip(kind, reference_name, checkpoints, inputs, request):
    reference = request.getfixturevalue(reference_name)
    model = load_openai_checkpoint(checkpoints[kind])
    assert isinstance(model, CLIPModel)
    assert not model.training

    with torch.no_grad():
        expected_image = reference.encode_image(inputs["images"])  # (N, D)
        expected_text = reference.encode_text(inputs["open_clip_ids"])  # (T, D)
        image = model.get_image_features(pixel_values=inputs["images"]).pooler_output
        text = model.get_text_features(input_ids=inputs["hf_ids"], attention_mask=inputs["hf_mask"]).pooler_output
        output = model(input_ids=inputs["hf_ids"], pixel_values=inputs["images"], attention_mask=inputs["hf_mask"])

    assert image.shape == (4, EMBED_DIM)
    torch.testing.assert_close(image, expected_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(text, expected_text, atol=1e-4, rtol=0)

    image_unit = expected_image / expected_image.norm(dim=-1, keepdim=True)
    text_unit = expected_text / expected_text.norm(dim=-1, keepdim=True)
    expected_logits = reference.logit_scale.exp() * image_unit @ text_unit.T  # (N, T)
    torch.testing.assert_close(output.logits_per_image, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.logit_scale.detach(), reference.logit_scale.detach(), atol=1e-3, rtol=0)


def test_features_differ_between_images(checkpoints, inputs):
    # Guards the comparison above against a degenerate model that maps every input alike.
    model = load_openai_checkpoint(checkpoints["plain"])
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["images"]).pooler_output
    assert (image[0] - image[1]).abs().max() > 1e-2


# --- reading ------------------------------------------------------------------------------------


def test_torchscript_read_equals_jit_load(checkpoints):
    tensors = read_openai_state_dict(checkpoints["torchscript"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = torch.jit.load(str(checkpoints["torchscript"]), map_location="cpu").state_dict()
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key


def test_torchscript_float16_dtype_kept(checkpoints):
    tensors = read_openai_state_dict(checkpoints["torchscript-float16"])
    assert tensors["visual.proj"].dtype == torch.float16
    assert tensors["visual.proj"].shape == (WIDTH, EMBED_DIM)


def test_wrapper_and_module_prefix_stripped(tmp_path, reference):
    expected = reference.state_dict()
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in expected.items()}}, path)
    tensors = read_openai_state_dict(path)
    assert tensors.keys() == expected.keys()
    assert torch.equal(tensors["visual.conv1.weight"], expected["visual.conv1.weight"])


class _CreateFile:
    """Unpickling this object opens (and so creates) ``target`` for writing."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_pickle_payload_rejected(tmp_path, reference):
    target = tmp_path / "created_by_unpickling"
    path = tmp_path / "payload.pt"
    torch.save({**reference.state_dict(), "payload": _CreateFile(target)}, path)

    with pytest.raises(ValueError, match="weights-only loading rejected it"):
        read_openai_state_dict(path)
    assert not target.exists()


def test_torchscript_payload_rejected(tmp_path):
    # A zip laid out like a TorchScript archive whose data.pkl calls open() when unpickled.
    target = tmp_path / "created_by_unpickling"
    path = tmp_path / "payload-jit.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_CreateFile(target), protocol=2))
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__/model.py", "")

    with pytest.raises(ValueError, match="is not allowed"):
        read_openai_state_dict(path)
    assert not target.exists()


def test_torchscript_storage_out_of_bounds_rejected(tmp_path, checkpoints):
    # Rewrite one storage record with fewer bytes than its persistent id declares.
    path = tmp_path / "truncated-jit.pt"
    with zipfile.ZipFile(checkpoints["torchscript"]) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data/0"):
                data = data[:8]
            target.writestr(item.filename, data)
    with pytest.raises(ValueError, match="bytes, expected"):
        read_openai_state_dict(path)


@pytest.mark.parametrize("kind", ["torchscript", "torchscript-float16", "plain"])
def test_truncated_file_rejected(kind, checkpoints, tmp_path):
    # The first half of the file, as a download cut short leaves it.
    data = checkpoints[kind].read_bytes()
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError) as raised:
        read_openai_state_dict(path)
    assert str(raised.value) == (
        f"OpenAI CLIP checkpoint {str(path)!r} is truncated or is not a CLIP checkpoint "
        "(PytorchStreamReader failed reading zip archive: failed finding central directory). Download it again."
    )


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as raised:
        read_openai_state_dict(path)
    assert str(raised.value) == (
        f"OpenAI CLIP checkpoint {str(path)!r} is truncated or is not a CLIP checkpoint (EOFError). Download it again."
    )


def test_damaged_zip_member_rejected(checkpoints, tmp_path):
    # A complete zip whose tensor bytes were altered fails the member's CRC check.
    data = bytearray(checkpoints["torchscript"].read_bytes())
    with zipfile.ZipFile(checkpoints["torchscript"]) as archive:
        member = next(item for item in archive.infolist() if item.filename.endswith("/data/0"))
    # A local file header is 30 bytes, then the name and the extra field (its length at offset 28); the data follows.
    header = member.header_offset
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + len(member.filename.encode()) + extra_length] ^= 0xFF
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))

    with pytest.raises(ValueError, match=r"is truncated or is not a CLIP checkpoint \(Bad CRC-32"):
        read_openai_state_dict(path)


def test_truncated_file_reported_by_cli(checkpoints, tiny_image_folder, tmp_path, capsys):
    from fl2ora.cli import main

    data = checkpoints["torchscript"].read_bytes()
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(data[: len(data) // 2])
    overrides = [f"model.name={path}", "model.random_init=false", "data.dataset=image_folder",
                 f"data.root={tiny_image_folder}", "partition.num_clients=2", "partition.min_samples=2"]
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

    code = main(["run", str(config), "--output", str(tmp_path / "run"), "--quiet",
                 *[arg for value in overrides for arg in ("--set", value)]])

    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"fl2ora: error: OpenAI CLIP checkpoint {str(path)!r} is truncated")
    assert lines[-1].endswith("Download it again.")
    assert not any(line.startswith("Traceback") for line in lines)
    assert not (tmp_path / "run").exists()


# --- architecture and mapping --------------------------------------------------------------------


def test_infer_config_tiny(reference):
    config = infer_openai_config(reference.state_dict())
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (WIDTH, 2, 2)
    assert (vision.patch_size, vision.image_size, vision.intermediate_size) == (8, 32, 4 * WIDTH)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (WIDTH, 2, 2)
    assert (text.max_position_embeddings, text.vocab_size, text.eos_token_id) == (77, VOCAB_SIZE, VOCAB_SIZE - 1)
    assert config.projection_dim == EMBED_DIM
    assert vision.hidden_act == text.hidden_act == "quick_gelu"
    assert config.logit_scale_init_value == pytest.approx(2.3)


def openai_vit_b_16_shapes() -> dict[str, torch.Tensor]:
    """OpenAI ViT-B/16's state dict as shape-only tensors, built by open_clip on the meta device."""
    spec = open_clip.get_model_config("ViT-B-16")
    with torch.device("meta"):
        model = CLIP(
            embed_dim=spec["embed_dim"],
            vision_cfg=CLIPVisionCfg(**spec["vision_cfg"]),
            text_cfg=CLIPTextCfg(**spec["text_cfg"]),
            quick_gelu=True,
        )
    return model.state_dict()


def test_vit_b_16_matches_hugging_face():
    shapes = openai_vit_b_16_shapes()
    config = infer_openai_config(shapes)
    published = build_architecture("vit-b-16")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config.vision_config, name) == getattr(published.vision_config, name), name
        assert getattr(config.text_config, name) == getattr(published.text_config, name), name
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (224, 16)
    assert config.projection_dim == 512

    with torch.device("meta"):
        model = CLIPModel(config)
    assert sum(parameter.numel() for parameter in model.parameters()) == VIT_B_16_PARAMETERS
    converted = convert_openai_state_dict(shapes)
    expected = model.state_dict()
    assert converted.keys() == expected.keys()
    for key, tensor in converted.items():
        assert tensor.shape == expected[key].shape, key


def test_convert_splits_qkv_and_transposes(reference):
    source = reference.state_dict()
    converted = convert_openai_state_dict(source)
    in_proj = source["transformer.resblocks.1.attn.in_proj_weight"]  # (3 W, W)
    in_bias = source["visual.transformer.resblocks.0.attn.in_proj_bias"]  # (3 W,)
    for index, name in enumerate(("q", "k", "v")):
        rows = slice(index * WIDTH, (index + 1) * WIDTH)
        assert torch.equal(converted[f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"], in_proj[rows])
        assert torch.equal(converted[f"vision_model.encoder.layers.0.self_attn.{name}_proj.bias"], in_bias[rows])
    assert torch.equal(converted["visual_projection.weight"], source["visual.proj"].T)
    assert torch.equal(converted["text_projection.weight"], source["text_projection"].T)
    assert torch.equal(converted["vision_model.pre_layrnorm.weight"], source["visual.ln_pre.weight"])
    fc2_bias = converted["text_model.encoder.layers.0.mlp.fc2.bias"]
    assert torch.equal(fc2_bias, source["transformer.resblocks.0.mlp.c_proj.bias"])


def test_openai_metadata_keys_dropped(reference):
    source = {**reference.state_dict(), "input_resolution": torch.tensor(32), "vocab_size": torch.tensor(VOCAB_SIZE)}
    source["context_length"] = torch.tensor(77)
    assert convert_openai_state_dict(source).keys() == convert_openai_state_dict(reference.state_dict()).keys()


# --- invalid checkpoints --------------------------------------------------------------------------


def drop(key: str):
    return lambda tensors: {name: value for name, value in tensors.items() if name != key}


def with_key(key: str, value: torch.Tensor):
    return lambda tensors: {**tensors, key: value}


def narrow_vision(tensors):
    # 48 channels give 48 // 64 = 0 attention heads under OpenAI's rule.
    return {**tensors, "visual.conv1.weight": torch.zeros(48, 3, 8, 8)}


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (drop("visual.ln_post.weight"), ValueError, r"Missing keys: \['visual.ln_post.weight'\]"),
        (drop("transformer.resblocks.1.attn.in_proj_bias"), ValueError, "transformer.resblocks.1.attn.in_proj_bias"),
        (drop("text_projection"), ValueError, "missing keys \\['text_projection'\\]"),
        (drop("logit_scale"), ValueError, "logit_scale"),
        (with_key("visual.layer1.0.conv1.weight", torch.zeros(64, 64, 1, 1)), ValueError, "ResNet"),
        (with_key("visual.head.weight", torch.zeros(2)), ValueError, r"Unexpected keys: \['visual.head.weight'\]"),
        (with_key("visual.positional_embedding", torch.zeros(20, WIDTH)), ValueError, "grid\\*\\*2 \\+ 1"),
        (with_key("visual.proj", torch.zeros(WIDTH, EMBED_DIM + 1)), ValueError, "visual.proj has shape"),
        (narrow_vision, ValueError, "must be at least 64"),
    ],
)
def test_invalid_state_dict_rejected(edit, error, match, reference):
    with pytest.raises(error, match=match):
        convert_openai_state_dict(edit(state_dict(reference)))


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (None, FileNotFoundError, "not found"),
        (torch.zeros(3), ValueError, "object of type Tensor, not a state dict"),
        ({"visual.proj": torch.zeros(2), "epoch": 3}, ValueError, "'epoch' has type int, not a tensor"),
        ({0: torch.zeros(2)}, ValueError, "key 0 is not a string"),
    ],
)
def test_invalid_file_rejected(content, error, match, tmp_path):
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=match):
        read_openai_state_dict(path)


def test_resnet_file_rejected(tmp_path, reference):
    path = tmp_path / "RN50.pt"
    torch.save({**reference.state_dict(), "visual.attnpool.c_proj.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ValueError, match="only ViT checkpoints are supported"):
        load_openai_checkpoint(path)


def test_shape_mismatch_named(tmp_path, reference):
    # Block 1's MLP is narrower than block 0's, from which the architecture is inferred.
    tensors = state_dict(reference)
    tensors["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(2 * WIDTH, WIDTH)
    path = tmp_path / "mismatch.pt"
    torch.save(tensors, path)
    with pytest.raises(ValueError, match=r"vision_model.encoder.layers.1.mlp.fc1.weight: checkpoint \(256, 128\)"):
        load_openai_checkpoint(path)


def test_load_backbone_reads_openai_checkpoint(checkpoints, reference, inputs):
    from fl2ora.config import ModelConfig
    from fl2ora.model.backbone import load_backbone

    path = next(iter(checkpoints.values()))
    backbone = load_backbone(ModelConfig(name=str(path)))
    assert backbone.random_init is False
    assert backbone.image_size == reference.visual.image_size[0] if isinstance(reference.visual.image_size, tuple) else reference.visual.image_size
    model = load_openai_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], tensor), name
    assert len(backbone.tokenizer) == 49408
