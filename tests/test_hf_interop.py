"""HuggingFace transformers in both directions: export, strict reload, fidelity, import.

The tiny sizes are HF_TINY_CONFIGS (the golden sizes with the values transformers'
classes hard-code). The hub's convention is restated here independently of
mappings/hf/ (:func:`hub_state_dict`, from the renames and transposes HuggingFace's
converter documents), so that a mapping that merely inverts itself cannot pass.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch

from converter.config_fixtures import HF_TINY_CONFIGS, write_config_fixture
from converter.conversion import convert
from converter.mapping import flatten_tree
from converter.haiku_reader import load_haiku_checkpoint
from converter.registry import MODEL_NAMES
import perceiver_torch
from perceiver_torch import read_checkpoint
from tests.helpers import run_cli

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """name -> (official-format fixture, its direct conversion), made once."""
    folder = tmp_path_factory.mktemp("hf")
    out = {}
    for name in MODEL_NAMES:
        fixture = folder / f"{name}.pickle"
        write_config_fixture(name, fixture, HF_TINY_CONFIGS[name], seed=3)
        target = folder / f"{name}.safetensors"
        convert(fixture, target, config=HF_TINY_CONFIGS[name])
        out[name] = (fixture, target)
    return out


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """name -> the folder `export --format hf` wrote."""
    folder = tmp_path_factory.mktemp("hf_export")
    out = {}
    for name in MODEL_NAMES:
        target = folder / name
        result = run_cli("export", converted[name][1], "-o", target, "--format", "hf")
        assert result.exit_code == 0, result.stderr
        assert "fidelity of transformers'" in result.stderr
        out[name] = target
    return out


def _architecture(name: str) -> str:
    from converter.hf import architecture

    return architecture(name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_loads_strictly_and_runs(name: str, exported) -> None:
    folder = exported[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [_architecture(name)]
    assert config["model_type"] == "perceiver"
    cls = getattr(transformers, _architecture(name))
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    # The Auto class transformers maps to the architecture (where it maps one).
    if name == "language_perceiver":
        auto = transformers.AutoModelForMaskedLM.from_pretrained(str(folder))
        assert type(auto).__name__ == "PerceiverForMaskedLM"
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        # transformers wraps the bytes (offset 6, as BytesTokenizer) in [CLS] ... [SEP].
        assert tokenizer("hello").input_ids[1:-1] == [b + 6 for b in b"hello"]
    if name.startswith("imagenet_"):
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["image_processor_type"] == "PerceiverImageProcessor"
    # The fidelity report is transformers' forward pass against perceiver_torch's.
    report = json.loads((folder / "fidelity.json").read_text())
    expected = {"video_autoencoding": 3}.get(name, 1)
    assert len(report["outputs"]) == expected
    for row in report["outputs"]:
        assert np.isfinite(row["max_abs_diff"]) and row["max_abs_reference"] > 0
    metadata = _safetensors_metadata(folder / "model.safetensors")
    assert metadata["format"] == "pt"
    assert metadata["perceiver_convert.model"] == name


def _safetensors_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_import_of_the_export_is_bit_identical(name: str, converted, exported, tmp_path) -> None:
    back = tmp_path / "back.safetensors"
    result = run_cli("convert", exported[name], "-o", back)
    assert result.exit_code == 0, result.stderr
    direct, direct_meta = read_checkpoint(converted[name][1])
    again, again_meta = read_checkpoint(back)
    assert sorted(direct) == sorted(again)
    for key, tensor in direct.items():
        assert again[key].dtype == tensor.dtype, key
        assert torch.equal(again[key], tensor), key
    source = json.loads(again_meta["hf_source"])
    assert source["architecture"] == _architecture(name)
    assert source["weights"] == "model.safetensors"
    # The official file it all came from is still named (the round trip lost it).
    exported_from = source["exported_from"]
    assert exported_from["source_sha256"] == direct_meta["source_sha256"]
    assert exported_from["source_file"] == direct_meta["source_file"]
    assert exported_from["dtype"] == direct_meta["dtype"]
    # The whole config comes back: from the shapes, transformers' config.json and (the
    # video model's num_chunks) the export's metadata.
    assert json.loads(again_meta["config"]) == json.loads(direct_meta["config"])


# --------------------------------------------------------------------------------------
# The hub's convention, restated from HuggingFace's converter (its rename table and its
# np.transpose of every "weight" but embeddings, np.squeeze of BatchNorm arrays).

_PREFIXES = [
    # (official module prefix, transformers module prefix), most specific first.
    ("multimodal_decoder/~/basic_decoder/cross_attention", "decoder.decoder.decoding_cross_attention"),
    ("multimodal_decoder/~/basic_decoder/output", "decoder.decoder.final_layer"),
    ("flow_decoder/~/basic_decoder/cross_attention", "decoder.decoder.decoding_cross_attention"),
    ("flow_decoder/~/basic_decoder/output", "decoder.decoder.final_layer"),
    ("classification_decoder/~/basic_decoder/cross_attention", "decoder.decoder.decoding_cross_attention"),
    ("classification_decoder/~/basic_decoder/output", "decoder.decoder.final_layer"),
    ("basic_decoder/cross_attention", "decoder.decoding_cross_attention"),
    ("perceiver_encoder/~/cross_attention", "encoder.cross_attention"),
    ("encoder/~/cross_attention", "encoder.cross_attention"),
]
_LINEAR = {"linear": "query", "linear_1": "key", "linear_2": "value", "linear_3": "output.dense"}


def _layer(prefix: str, rest: str, cross: bool) -> str:
    """Names inside one attention layer (``rest`` = "attention/linear_1/w", ...)."""
    parts = rest.split("/")
    leaf = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias"}[parts[-1]]
    if parts[0] == "attention":
        name = _LINEAR[parts[1]]
        name = name if name == "output.dense" else f"self.{name}"
        return f"{prefix}.attention.{name}.{leaf}"
    if parts[0] == "mlp":
        return f"{prefix}.mlp.{'dense1' if parts[1] == 'linear' else 'dense2'}.{leaf}"
    norms = (
        {"layer_norm": "attention.self.layernorm1", "layer_norm_1": "attention.self.layernorm2",
         "layer_norm_2": "layernorm"}
        if cross
        else {"layer_norm": "attention.self.layernorm1", "layer_norm_1": "layernorm"}
    )
    return f"{prefix}.{norms[parts[0]]}.{leaf}"


_PLAIN = {
    "embed/embeddings": "input_preprocessor.embeddings.weight",
    "trainable_position_encoding/pos_embs": "input_preprocessor.position_embeddings.weight",
    "basic_decoder/~/trainable_position_encoding/pos_embs": "decoder.output_position_encodings.position_embeddings",
    "image_preprocessor/~/conv2_d/w": "input_preprocessor.convnet_1x1.weight",
    "image_preprocessor/~/conv2_d/b": "input_preprocessor.convnet_1x1.bias",
    "image_preprocessor/~_build_network_inputs/trainable_position_encoding/pos_embs": "input_preprocessor.position_embeddings.position_embeddings",
    "image_preprocessor/~_build_network_inputs/position_encoding_projector/linear/w": "input_preprocessor.positions_projection.weight",
    "image_preprocessor/~_build_network_inputs/position_encoding_projector/linear/b": "input_preprocessor.positions_projection.bias",
    "image_preprocessor/~/conv2_d_downsample/~/conv/w": "input_preprocessor.convnet.conv.weight",
    "image_preprocessor/~/conv2_d_downsample/~/batchnorm/offset": "input_preprocessor.convnet.batchnorm.bias",
    "image_preprocessor/~/conv2_d_downsample/~/batchnorm/scale": "input_preprocessor.convnet.batchnorm.weight",
    "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/average": "input_preprocessor.convnet.batchnorm.running_mean",
    "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/var_ema/average": "input_preprocessor.convnet.batchnorm.running_var",
    "image_preprocessor/patches_linear/w": "input_preprocessor.conv_after_patches.weight",
    "image_preprocessor/patches_linear/b": "input_preprocessor.conv_after_patches.bias",
    "perceiver_encoder/~/trainable_position_encoding/pos_embs": "embeddings.latents",
    "encoder/~/trainable_position_encoding/pos_embs": "embeddings.latents",
    "projection_postprocessor/linear/w": "output_postprocessor.modalities.image.classifier.weight",
    "projection_postprocessor/linear/b": "output_postprocessor.modalities.image.classifier.bias",
    "classification_postprocessor/linear/w": "output_postprocessor.modalities.label.classifier.weight",
    "classification_postprocessor/linear/b": "output_postprocessor.modalities.label.classifier.bias",
    "audio_postprocessor/linear/w": "output_postprocessor.modalities.audio.classifier.weight",
    "audio_postprocessor/linear/b": "output_postprocessor.modalities.audio.classifier.bias",
}


def _hub_name(key: str, model: str) -> Optional[str]:
    key = key.replace("state:", "")
    if key.endswith("/counter") or key.endswith("/hidden"):
        return None  # the hub converter skipped them
    if key == "embedding_decoder/bias":
        return "embedding_decoder.bias"  # outside `perceiver.`
    if key == "classification_decoder/~/basic_decoder/~/trainable_position_encoding/pos_embs":
        name = (
            "decoder.modalities.label.decoder.output_position_encodings.position_embeddings"
            if model == "video_autoencoding"
            else "decoder.decoder.output_position_encodings.position_embeddings"
        )
        return f"perceiver.{name}"
    for modality in ("audio", "image", "label"):
        if key == f"multimodal_preprocessor/{modality}_mask_token/pos_embs":
            return f"perceiver.input_preprocessor.mask.{modality}"
        if key == f"multimodal_preprocessor/{modality}_padding/pos_embs":
            return f"perceiver.input_preprocessor.padding.{modality}"
        if key == f"multimodal_decoder/~decoder_query/{modality}_padding/pos_embs":
            return f"perceiver.decoder.padding.{modality}"
    if key in _PLAIN:
        return f"perceiver.{_PLAIN[key]}"
    for source, target in _PREFIXES:
        if key.startswith(source + "/"):
            rest = key[len(source) + 1 :]
            if "cross_attention" in source:
                return f"perceiver.{_layer(target, rest, cross=True)}"
            leaf = {"w": "weight", "b": "bias"}[rest]
            return f"perceiver.{target}.{leaf}"
    for prefix in ("perceiver_encoder/~/", "encoder/~/"):
        if key.startswith(prefix + "self_attention"):
            module, rest = key[len(prefix) :].split("/", 1)
            index = 0 if module == "self_attention" else int(module.rsplit("_", 1)[1])
            return f"perceiver.{_layer(f'encoder.self_attends.{index}', rest, cross=False)}"
    raise AssertionError(f"no hub name for {key}")


def hub_state_dict(fixture: Path, model: str) -> Dict[str, torch.Tensor]:
    """What HuggingFace's converter made of an official file, then save_pretrained."""
    checkpoint = load_haiku_checkpoint(fixture)
    out = {}
    for key, array in flatten_tree(checkpoint.params, checkpoint.state).items():
        name = _hub_name(key, model)
        if name is None:
            continue
        if name.endswith("weight") and "embeddings" not in name:
            array = np.transpose(array)  # all axes reversed: HWIO -> OIWH for a conv
        if "batchnorm" in name:
            array = np.squeeze(array)
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    if model == "imagenet_conv":
        # Not in the file: save_pretrained wrote the freshly built model's count.
        out["perceiver.input_preprocessor.convnet.batchnorm.num_batches_tracked"] = torch.tensor(0)
    return out


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_has_the_hub_converters_tensors(name: str, converted, exported) -> None:
    from safetensors.torch import load_file

    hub = hub_state_dict(converted[name][0], name)
    ours = load_file(str(exported[name] / "model.safetensors"))
    assert sorted(ours) == sorted(hub)
    for key, tensor in hub.items():
        if key.endswith("num_batches_tracked"):
            continue  # ours carries the official update count, the hub's file a 0
        assert torch.equal(ours[key], tensor), key


def _hub_folder(tmp_path: Path, name: str, converted, exported, weights: str) -> Path:
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text((exported[name] / "config.json").read_text())
    state = hub_state_dict(converted[name][0], name)
    if weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.jax
@pytest.mark.parametrize("name", ["imagenet_conv", "imagenet_learned", "imagenet_fourier", "optical_flow"])
def test_hub_state_dict_imports_to_the_official_model(name, converted, exported, tmp_path) -> None:
    """A pytorch_model.bin made the hub's way (conv kernels axis-reversed, BatchNorm
    squeezed) computes the official model again: JAX parity within the mapping's
    tolerance, and (but for the counter) the tensors of the direct conversion."""
    pytest.importorskip("jax")
    folder = _hub_folder(tmp_path, name, converted, exported, "bin")
    back = tmp_path / "back.safetensors"
    result = run_cli("convert", folder, "-o", back, "--verify")
    assert result.exit_code == 0, result.stderr
    assert "PASSED" in result.stderr
    direct, _ = read_checkpoint(converted[name][1])
    again, meta = read_checkpoint(back)
    for key, tensor in direct.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(again[key], tensor), key
    assert json.loads(meta["hf_source"])["kind"] == "pytorch_model.bin"


def test_weights_saved_as_parameters_import_and_export(converted, exported, tmp_path) -> None:
    """``torch.save(dict(model.named_parameters()))`` stores nn.Parameters, which
    require grad: transformers loads such a pytorch_model.bin, and import and inspect
    ended in "unexpected RuntimeError: Can't call numpy() on Tensor that requires
    grad". The same for a converted .pt whose tensors are Parameters, exported back."""
    name = "imagenet_fourier"
    folder = tmp_path / "params"
    folder.mkdir()
    (folder / "config.json").write_text((exported[name] / "config.json").read_text())
    state = hub_state_dict(converted[name][0], name)
    wrapped = {k: torch.nn.Parameter(v) if v.is_floating_point() else v
               for k, v in state.items()}
    torch.save(wrapped, folder / "pytorch_model.bin")
    plain = _hub_folder(tmp_path, name, converted, exported, "bin")
    for source, out in ((folder, "wrapped.safetensors"), (plain, "plain.safetensors")):
        result = run_cli("convert", source, "-o", tmp_path / out, "-q")
        assert result.exit_code == 0, result.stderr
    a, _ = read_checkpoint(tmp_path / "wrapped.safetensors")
    b, _ = read_checkpoint(tmp_path / "plain.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_cli("inspect", folder).exit_code == 0
    # A converted .pt holding Parameters exports to the official format as well.
    result = run_cli("convert", converted[name][0], "-o", tmp_path / "params.pt", "-q",
                     *(f"--config={k}={v}" for k, v in HF_TINY_CONFIGS[name].items()))
    assert result.exit_code == 0, result.stderr
    payload = torch.load(tmp_path / "params.pt", weights_only=True)
    payload["state_dict"] = {k: torch.nn.Parameter(v) if v.is_floating_point() else v
                             for k, v in payload["state_dict"].items()}
    torch.save(payload, tmp_path / "params.pt")
    assert perceiver_torch.load(tmp_path / "params.pt").model_name == name
    result = run_cli("export", tmp_path / "params.pt", "-o", tmp_path / "back.pickle")
    assert result.exit_code == 0, result.stderr
    again = run_cli("export", converted[name][1], "-o", tmp_path / "direct.pickle")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "back.pickle").read_bytes() == (tmp_path / "direct.pickle").read_bytes()


def test_import_and_export_messages_say_what_the_file_is(converted, exported, tmp_path):
    """Three misleading lines: an import's progress claimed a pickle protocol (0) for
    a safetensors file; a training checkpoint's {"state_dict": {...}} was "expected
    a state dict ..., got dict"; and exporting an official pickle named it and the
    command to convert it, then asked "was it written by `perceiver-convert
    convert`?"."""
    name = "imagenet_fourier"
    result = run_cli("convert", exported[name], "-o", tmp_path / "back.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "no pickle, sha256" in result.stderr and "protocol" not in result.stderr
    official = run_cli("convert", converted[name][0], "-o", tmp_path / "o.safetensors")
    assert "protocol 3, sha256" in official.stderr  # a pickle's is named
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text((exported[name] / "config.json").read_text())
    torch.save({"state_dict": hub_state_dict(converted[name][0], name), "epoch": 3},
               nested / "pytorch_model.bin")
    result = run_cli("convert", nested, "-o", tmp_path / "n.safetensors")
    assert result.exit_code == 3, result.stderr
    assert "but its 'state_dict' holds a dict, not a tensor" in result.stderr
    assert "torch.save(checkpoint['state_dict'], 'pytorch_model.bin')" in result.stderr
    result = run_cli("export", converted[name][0], "-o", tmp_path / "x.onnx")
    assert result.exit_code == 3 and "this is an official Haiku checkpoint" in result.stderr
    assert "was it written by" not in result.stderr


@pytest.mark.jax
@pytest.mark.parametrize("name", ["language_perceiver", "video_autoencoding"])
def test_verify_on_an_hf_export(name, exported) -> None:
    pytest.importorskip("jax")
    result = run_cli("verify", exported[name] / "model.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["passed"] is True


# --------------------------------------------------------------------------------------
# Refusals: exit 3, a clear message, nothing written, nothing run.


class _Touch:
    """Unpickling this would create ``path`` (a stand-in for any code execution)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pytorch_model_bin_is_refused(how, converted, exported, tmp_path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((exported["imagenet_conv"] / "config.json").read_text())
    marker = tmp_path / "ran"
    payload = {"perceiver.embeddings.latents": _Touch(marker)}
    if how == "torch.save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload, protocol=2))
    out = tmp_path / "out.safetensors"
    for target in (folder, folder / "pytorch_model.bin"):
        result = run_cli("convert", target, "-o", out)
        assert result.exit_code == 3, result.stderr
        assert "refused" in result.stderr and "weights_only" in result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


def test_a_lone_weights_file_is_detected_by_its_names(converted, exported, tmp_path) -> None:
    """No config.json: the model comes from the tensor names, the sizes shapes cannot
    tell from the export's own metadata."""
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((exported["imagenet_learned"] / "model.safetensors").read_bytes())
    back = tmp_path / "back.safetensors"
    result = run_cli("convert", lone, "-o", back)
    assert result.exit_code == 0, result.stderr
    direct, meta = read_checkpoint(converted["imagenet_learned"][1])
    again, meta_back = read_checkpoint(back)
    assert all(torch.equal(direct[k], again[k]) for k in direct)
    assert json.loads(meta_back["config"]) == json.loads(meta["config"])


def test_wrong_hf_folders_exit_3(converted, exported, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    source = exported["optical_flow"]
    out = tmp_path / "out.safetensors"

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    result = run_cli("convert", no_config, "-o", out)
    assert result.exit_code == 3 and "no config.json" in result.stderr

    wrong_arch = tmp_path / "wrong_arch"
    wrong_arch.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (wrong_arch / "config.json").write_text(json.dumps(config))
    (wrong_arch / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    result = run_cli("convert", wrong_arch, "-o", out)
    assert result.exit_code == 3 and "BertForMaskedLM" in result.stderr

    # Another Perceiver class named: one line saying whose the tensors are, not some
    # forty missing and unexpected tensors.
    config["architectures"] = ["PerceiverForMaskedLM"]
    (wrong_arch / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", wrong_arch, "-o", out)
    assert result.exit_code == 3
    assert ("config.json's architectures name PerceiverForMaskedLM, but the tensors are "
            "those of PerceiverForOpticalFlow (optical_flow)") in result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error")] == [lines[-1]]
    assert "unexpected" not in result.stderr and "missing" not in result.stderr

    missing = tmp_path / "missing_key"
    missing.mkdir()
    (missing / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["perceiver.decoder.decoder.final_layer.bias"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli("convert", missing, "-o", out)
    assert result.exit_code == 3
    assert "perceiver.decoder.decoder.final_layer.bias" in result.stderr

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((source / "config.json").read_text())
    result = run_cli("convert", no_weights, "-o", out)
    assert result.exit_code == 3 and "no model.safetensors" in result.stderr
    assert "sharded" not in result.stderr
    (no_weights / "model.safetensors.index.json").write_text("{}")  # sharded weights
    result = run_cli("convert", no_weights, "-o", out)
    assert result.exit_code == 3 and "sharded weights" in result.stderr
    for result_text in (result.stderr,):
        assert "Traceback" not in result_text
    assert not out.exists()


def test_export_refuses_an_existing_folder_and_unexpressible_sizes(converted, exported, tmp_path) -> None:
    before = sorted(p.name for p in exported["optical_flow"].iterdir())
    result = run_cli("export", converted["optical_flow"][1], "-o", exported["optical_flow"], "--format", "hf")
    # An export never overwrites a folder (the output check may say so first).
    assert result.exit_code == 2
    assert "already exists" in result.stderr or "is a folder" in result.stderr
    assert sorted(p.name for p in exported["optical_flow"].iterdir()) == before
    # The shipped tiny size has 8 Fourier bands; transformers' class fixes 64.
    fixture = tmp_path / "tiny.pickle"
    assert run_cli("fixture", "optical_flow", "-o", fixture).exit_code == 0
    tiny = tmp_path / "tiny.safetensors"
    assert run_cli("convert", fixture, "-o", tiny).exit_code == 0
    result = run_cli("export", tiny, "-o", tmp_path / "hf", "--format", "hf")
    assert result.exit_code == 3
    assert "num_bands=8 (transformers fixes 64)" in result.stderr
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_an_unwritable_folder_up_front(converted, tmp_path, monkeypatch) -> None:
    """`export --format hf -o ro/NAME` with ro not writable: the other outputs are
    refused before any work (exit 2, "no write permission"); the HF folder was
    refused only when its temporary folder was made, after the mapping, exit 3."""
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # root may write anyway: answer as a user
        if Path(path) == parent and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    try:
        result = run_cli("export", converted["imagenet_fourier"][1], "-o", parent / "hf",
                         "--format", "hf")
        assert result.exit_code == 2, result.stderr
        assert "no write permission in" in result.stderr
        assert "mapping" not in result.stderr  # before the work
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("target", ["missing", "empty folder"])
def test_export_refuses_a_link_up_front(target, converted, tmp_path) -> None:
    """A dangling link, or one to an empty folder, passed the up-front check and the
    final rename then failed on the link (exit 3, "writing ... failed") after all the
    work: the rename would replace the link, never write through it. Exit 2, with
    the link's target to give instead; nothing is written."""
    link, pointed = tmp_path / "out", tmp_path / "there"
    if target == "empty folder":
        pointed.mkdir()
    link.symlink_to(pointed)
    result = run_cli("export", converted["imagenet_fourier"][1], "-o", link, "--format", "hf")
    assert result.exit_code == 2, result.stderr
    assert "is a link to" in result.stderr and str(pointed) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert link.is_symlink() and os.readlink(link) == str(pointed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out"] + (["there"] if target == "empty folder" else []))
    if target == "empty folder":
        assert list(pointed.iterdir()) == []


@pytest.mark.parametrize("other", ["folder", "file", "empty folder"])
def test_export_keeps_a_folder_that_appears_while_writing(other, converted, monkeypatch, tmp_path) -> None:
    """Another run puts something at the new folder's name after the up-front check.
    rename(2) replaces an empty folder (which the export may replace: nothing is lost)
    and fails on a full one or a file: that is kept, exit 2 with one line, nothing
    of this export left behind."""
    import converter.hf as hf_module

    out = tmp_path / "hf"
    real = hf_module.load_hf_folder

    def racing(folder, arch):  # the export is written, not yet renamed into place
        if other == "file":
            out.write_bytes(b"the other run's file")
        else:
            out.mkdir()
            if other == "folder":
                (out / "config.json").write_text("the other run's export")
        return real(folder, arch)

    monkeypatch.setattr(hf_module, "load_hf_folder", racing)
    result = run_cli("export", converted["optical_flow"][1], "-o", out, "--format", "hf", "-q")
    names = [p.name for p in tmp_path.iterdir()]
    if other == "empty folder":
        assert result.exit_code == 0, result.output
        assert names == ["hf"] and (out / "model.safetensors").is_file()
        return
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"refusing to write {out}" in result.stderr and "appeared while" in result.stderr
    assert names == ["hf"]  # no temporary folder left
    if other == "file":
        assert out.read_bytes() == b"the other run's file"
    else:
        assert [p.name for p in out.iterdir()] == ["config.json"]
        assert (out / "config.json").read_text() == "the other run's export"


# --------------------------------------------------------------------------------------
# inspect and verify --reference on files from elsewhere.


def test_inspect_describes_converted_hf_and_onnx_files(converted, exported, tmp_path) -> None:
    result = run_cli("inspect", converted["imagenet_conv"][1], "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "converted" and document["model"] == "imagenet_conv"
    assert document["metadata"]["config"]["num_blocks"] == 3
    assert document["totals"]["tensors"] == len(read_checkpoint(converted["imagenet_conv"][1])[0])

    result = run_cli("inspect", exported["imagenet_conv"], "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "huggingface" and document["model"] == "imagenet_conv"
    assert document["fidelity"]["outputs"][0]["output"] == "logits"
    assert "perceiver.input_preprocessor.convnet.conv.weight" in {
        row["name"] for row in document["tensors"]
    }
    human = run_cli("inspect", exported["imagenet_conv"])
    assert human.exit_code == 0 and "fidelity of transformers'" in human.stdout


@pytest.mark.jax
def test_verify_with_reference(converted, exported, tmp_path) -> None:
    pytest.importorskip("jax")
    fixture, target = converted["optical_flow"]
    for candidate in (target, exported["optical_flow"]):
        result = run_cli("verify", candidate, "--reference", fixture, "--json", "-q")
        assert result.exit_code == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["tensors"]["passed"] and document["parity"]["passed"]
    # Another checkpoint of the same model: the tensors differ (exit 3).
    other = tmp_path / "other.pickle"
    write_config_fixture("optical_flow", other, HF_TINY_CONFIGS["optical_flow"], seed=4)
    result = run_cli("verify", target, "--reference", other, "--json", "-q")
    assert result.exit_code == 3
    document = json.loads(result.stdout)
    assert document["tensors"]["passed"] is False
    # An error (exit 3), not a parity failure (exit 1): its line on stderr and the
    # fields of every error document (it looked like a parity failure, without them).
    assert (document["ok"], document["exit_code"]) == (False, 3)
    assert document["error"]["message"].startswith(f"{target} is not a conversion of {other}")
    assert f"error: {target} is not a conversion of {other}" in result.stderr
    # The same model at other sizes (the shipped tiny fixture has 8 Fourier bands,
    # this one 64): the shapes differ, named; exit 3, no model is run.
    small = tmp_path / "small.pickle"
    assert run_cli("fixture", "optical_flow", "-o", small).exit_code == 0
    result = run_cli("verify", target, "--reference", small, "--json", "-q")
    assert result.exit_code == 3 and "unexpected" not in result.stderr
    document = json.loads(result.stdout, parse_constant=pytest.fail)  # no Infinity
    assert document["parity"] is None and document["tensors"]["passed"] is False
    assert document["exit_code"] == 3 and "error: " in result.stderr
    assert "has shape" in result.stderr and "other sizes" in result.stderr
    # The two files the wrong way round: said so, with the command that works (it
    # said to convert the official file first, which had been done), before any work.
    result = run_cli("verify", fixture, "--reference", target)
    assert result.exit_code == 2
    assert "the files are the wrong way round" in result.stderr
    assert f"perceiver-convert verify {target} --reference {fixture}" in result.stderr


@pytest.mark.jax
def test_verify_with_reference_names_settings_unlike_the_official_model(tmp_path) -> None:
    """A converted file's settings that no shape fixes (here flow_scale, set at
    conversion) are applied to the JAX reference too, so parity passes; the report
    says they are not the official model's (it said nothing) and passes (a fine-tuned
    variant may differ on purpose)."""
    pytest.importorskip("jax")
    fixture = tmp_path / "official.pickle"
    assert run_cli("fixture", "optical_flow", "-o", fixture).exit_code == 0
    plain, scaled = tmp_path / "plain.safetensors", tmp_path / "scaled.safetensors"
    assert run_cli("convert", fixture, "-o", plain, "-q").exit_code == 0
    assert run_cli(
        "convert", fixture, "-o", scaled, "--config", "flow_scale=10", "-q"
    ).exit_code == 0
    result = run_cli("verify", plain, "--reference", fixture, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tensors"]["unofficial_settings"] == {}
    assert "not the official model's" not in result.stderr
    result = run_cli("verify", scaled, "--reference", fixture, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["tensors"]["passed"] and document["parity"]["passed"]
    assert document["tensors"]["unofficial_settings"] == {
        "flow_scale": {"converted": 10.0, "official": 20.0}
    }
    assert "settings no shape holds, not the official model's" in result.stderr
    assert "flow_scale=10.0 (official: 20.0)" in result.stderr


@pytest.mark.full
@pytest.mark.parametrize("name", ["video_autoencoding", "imagenet_conv"])
def test_full_size_hf_round_trip(name, tmp_path) -> None:
    """The two smaller official sizes (random weights): export, strict reload,
    transformers' forward, import back bit-identical."""
    fixture, target = tmp_path / "official.pickle", tmp_path / "converted.safetensors"
    assert run_cli("fixture", name, "--size", "full", "-o", fixture).exit_code == 0
    assert run_cli("convert", fixture, "-o", target, "-q").exit_code == 0
    folder = tmp_path / "hf"
    result = run_cli("export", target, "-o", folder, "--format", "hf", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["fidelity"]["outputs"]
    cls = getattr(transformers, _architecture(name))
    _, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    back = tmp_path / "back.safetensors"
    assert run_cli("convert", folder, "-o", back, "-q").exit_code == 0
    direct, meta = read_checkpoint(target)
    again, meta_back = read_checkpoint(back)
    assert sorted(direct) == sorted(again)
    assert all(torch.equal(direct[k], again[k]) for k in direct)
    assert json.loads(meta_back["config"]) == json.loads(meta["config"])


def test_official_class_counts_get_the_class_names() -> None:
    from converter.hf import hf_config
    from perceiver_torch import configs

    for name in ("imagenet_learned", "imagenet_fourier", "imagenet_conv"):
        kwargs = hf_config(name, configs.config_to_dict(configs.CONFIG_CLASSES[name]()))
        assert len(kwargs["id2label"]) == 1000
        assert kwargs["id2label"][0] == "tench, Tinca tinca"
        assert kwargs["id2label"][999] == "toilet tissue, toilet paper, bathroom tissue"
    video = hf_config("video_autoencoding", configs.config_to_dict(configs.VideoAutoencodingConfig()))
    assert len(video["id2label"]) == 700 and video["id2label"][0] == "abseiling"
    assert video["id2label"][699] == "zumba"
    # transformers' image_size is the Fourier resolution after space-to-depth.
    assert video["image_size"] == 56 and video["output_shape"] == [1, 16, 224, 224]
    tiny = hf_config("imagenet_conv", {**configs.config_to_dict(configs.ImageNetConvConfig()),
                                       "num_classes": 10})
    assert "id2label" not in tiny


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_of_a_reduced_precision_file_is_measured_in_float32(dtype, converted, tmp_path) -> None:
    """The folder holds float32 tensors (the stored values), and its fidelity report
    runs perceiver_torch in float32 too: it is the report of a float32 file holding the
    same values (that file made by exporting the reduced one to the official layout and
    converting it back), bit for bit. Computing in the file's dtype would charge its
    rounding (about 2^-8 relative in bfloat16) to transformers' architecture."""
    import safetensors.torch

    name = "imagenet_fourier"
    fixture, _ = converted[name]
    reduced = tmp_path / "reduced.safetensors"
    convert(fixture, reduced, config=HF_TINY_CONFIGS[name], dtype=dtype)
    same_values_pickle = tmp_path / "same_values.pickle"
    assert run_cli("export", reduced, "-o", same_values_pickle, "-q").exit_code == 0
    same_values = tmp_path / "same_values.safetensors"
    convert(same_values_pickle, same_values, config=HF_TINY_CONFIGS[name])
    reports, tensors = [], []
    for source in (reduced, same_values):
        folder = tmp_path / f"{source.stem}_hf"
        result = run_cli("export", source, "-o", folder, "--format", "hf")
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads((folder / "fidelity.json").read_text())["outputs"])
        tensors.append(safetensors.torch.load_file(folder / "model.safetensors"))
        if source == reduced:
            assert f"stored as {dtype}" in result.stderr
    assert reports[0] == reports[1]
    assert sorted(tensors[0]) == sorted(tensors[1])
    for key, tensor in tensors[0].items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, tensors[1][key]), key


def test_export_quiet_prints_nothing_and_file_suffixes_are_refused(converted, tmp_path) -> None:
    """-q: no fidelity table, summary or transformers progress bar on stderr. A
    folder named like a file (x.safetensors, x.onnx, x.pickle) is refused (exit 2)
    before anything is written: a later convert -o x.safetensors would meet a folder."""
    source = converted["imagenet_fourier"][1]
    result = run_cli("export", source, "-o", tmp_path / "quiet", "--format", "hf", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    assert (tmp_path / "quiet" / "model.safetensors").is_file()
    # The weights get the umask's permissions like the folder's other files
    # (safetensors alone creates them 0600).
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "quiet").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    for name in ("x.safetensors", "x.onnx", "x.pickle"):
        result = run_cli("export", source, "-o", tmp_path / name, "--format", "hf")
        assert result.exit_code == 2 and "name the folder without it" in result.stderr
        assert not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiet"]


def test_head_counts_come_from_config_json(converted, exported, tmp_path) -> None:
    """A checkpoint transformers saved itself (no perceiver-convert metadata): the
    head counts, which no tensor shape reveals, are config.json's (else
    PerceiverConfig's defaults, which save_pretrained leaves out). The import then
    equals a conversion of the same official arrays with those heads."""
    from converter.hf import HF_DEFAULT_HEADS

    defaults = transformers.PerceiverConfig()
    assert {k: getattr(defaults, k) for k in HF_DEFAULT_HEADS} == HF_DEFAULT_HEADS
    name = "language_perceiver"
    hf_config = transformers.PerceiverConfig.from_pretrained(str(exported[name]))
    hf_config.num_self_attention_heads = 4
    hf_model = transformers.PerceiverForMaskedLM.from_pretrained(
        str(exported[name]), config=hf_config
    )
    folder = tmp_path / "four_heads"
    hf_model.save_pretrained(str(folder))
    assert json.loads((folder / "config.json").read_text())["num_self_attention_heads"] == 4
    imported = tmp_path / "imported.safetensors"
    result = run_cli("convert", folder, "-o", imported, "-q")
    assert result.exit_code == 0, result.stderr
    expected_file = tmp_path / "expected.safetensors"
    convert(converted[name][0], expected_file,
            config={**HF_TINY_CONFIGS[name], "num_self_attention_heads": 4})
    got, expected = perceiver_torch.load(imported), perceiver_torch.load(expected_file)
    assert got.config == expected.config and got.config.num_self_attention_heads == 4
    ids = torch.randint(6, 262, (2, got.config.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(ids), expected(ids))
    # A head count the official architecture cannot express, and a bad value.
    config = json.loads((folder / "config.json").read_text())
    for key, value, words in (("num_cross_attention_heads", 4, "cannot be imported"),
                              ("num_self_attention_heads", "four", "config.json's")):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        result = run_cli("convert", folder, "-o", tmp_path / "bad.safetensors")
        assert result.exit_code == 3 and words in result.stderr, result.stderr
        assert "--config" not in result.stderr
    assert not (tmp_path / "bad.safetensors").exists()


def test_verify_refuses_options_it_cannot_honour(converted, exported, tmp_path) -> None:
    """--dtype/--mapping on a HuggingFace checkpoint, and any option that would change
    the check with --reference, are usage errors (exit 2) before any work: they were
    silently ignored (or --dtype failed later with exit 3)."""
    fixture, target = converted["optical_flow"]
    mapping = Path(__file__).resolve().parents[1] / "mappings" / "optical_flow.yaml"
    cases = [
        ([exported["optical_flow"], "--dtype", "bfloat16"],
         "--dtype does not apply to a HuggingFace checkpoint (float32 parity); for reduced"),
        # Not the reduced-precision advice, which fits --dtype only.
        ([exported["optical_flow"], "--mapping", mapping],
         "--mapping does not apply to a HuggingFace checkpoint (it is read through its "
         "own mapping)\n"),
        ([target, "--reference", fixture, "--dtype", "float16", "--model", "optical_flow"],
         "--dtype, --model do not apply with --reference"),
        ([target, "--reference", fixture, "--config", "num_blocks=1"], "--config does not"),
    ]
    for args, words in cases:
        result = run_cli("verify", *args)
        assert result.exit_code == 2 and words in result.stderr, result.stderr


def _with_config_value(exported_folder: Path, folder: Path, key: str, value) -> Path:
    """A copy of ``exported_folder`` (an HF export) in ``folder`` whose config.json
    holds ``key: value`` (the tensors unchanged)."""
    folder.mkdir()
    config = json.loads((exported_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    (folder / "model.safetensors").write_bytes((exported_folder / "model.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("language_perceiver", "num_blocks", 2),
        ("optical_flow", "num_blocks", 3),
        ("optical_flow", "use_query_residual", False),
        ("language_perceiver", "hidden_act", "relu"),
        ("video_autoencoding", "image_size", 8),
    ],
)
def test_config_json_values_that_change_the_function_are_refused(
    name, key, value, exported, tmp_path
) -> None:
    """transformers reads these config.json values at no tensor's expense (the whole
    stack repeated num_blocks times, the encoder's query residual, the activation,
    the video Fourier features' resolution); perceiver_torch computes the official
    model, so importing them would give another function without a word."""
    folder = _with_config_value(exported[name], tmp_path / "changed", key, value)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", folder, "-o", out)
    assert result.exit_code == 3, result.stderr
    assert f"{key}=" in result.stderr and "cannot be imported" in result.stderr
    assert not out.exists()
    # transformers' own default activation (erf GELU) is the documented difference.
    folder = _with_config_value(exported[name], tmp_path / "default_act", "hidden_act", "gelu_new")
    assert run_cli("convert", folder, "-o", out, "-q").exit_code == 0


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("optical_flow", "train_size", [0, 32]),
        ("optical_flow", "train_size", "big"),  # was split into ('b', 'i', 'g')
        ("optical_flow", "train_size", 7),  # was a TypeError
        ("video_autoencoding", "output_shape", 7),  # was a TypeError
    ],
)
def test_a_bad_size_in_config_json_names_the_key_the_file_holds(
    name, key, value, exported, tmp_path
) -> None:
    """perceiver_torch's image_size is optical_flow's train_size (and the video's
    output_shape[2:4]) in transformers' config.json, which also has an image_size of
    its own: a bad value is named by the key and value the user wrote."""
    folder = _with_config_value(exported[name], tmp_path / "changed", key, value)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", folder, "-o", out)
    assert result.exit_code == 3, result.stderr
    assert f"config.json's {key}={json.dumps(value)} (read as image_size)" in result.stderr
    assert "config.json's image_size" not in result.stderr and "unexpected" not in result.stderr
    assert not out.exists()


def _official_arrays(path: Path) -> Dict[str, np.ndarray]:
    checkpoint = load_haiku_checkpoint(path)
    return flatten_tree(checkpoint.params, checkpoint.state)


def test_pickle_round_trip_through_hf_is_exact(converted, exported, tmp_path) -> None:
    """official pickle -> convert -> export --format hf -> convert -> export: the
    original arrays, the BatchNorm EMA accumulators and counters included (they travel
    in the export's metadata). A transformers file without them (the hub's) gives
    rebuilt values, and `export` says the pickle is not exact."""
    name = "imagenet_conv"
    back = tmp_path / "back.safetensors"
    assert run_cli("convert", exported[name], "-o", back, "-q").exit_code == 0
    pickle_out = tmp_path / "back.pickle"
    result = run_cli("export", back, "-o", pickle_out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["exact"] is True
    # The imported file's provenance travels on into a new HF export (ONNX kept it,
    # the HF export dropped it).
    from safetensors import safe_open

    again_hf = tmp_path / "again_hf"
    assert run_cli("export", back, "-o", again_hf, "--format", "hf", "-q").exit_code == 0
    with safe_open(str(again_hf / "model.safetensors"), framework="np") as f:
        carried = json.loads(f.metadata()["perceiver_convert.hf_source"])
    assert carried["path"] == str(exported[name])
    original, again = _official_arrays(converted[name][0]), _official_arrays(pickle_out)
    assert sorted(original) == sorted(again)
    for key, array in original.items():
        assert again[key].dtype == array.dtype and np.array_equal(again[key], array), key

    from safetensors.numpy import load_file, save_file

    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((exported[name] / "config.json").read_text())
    save_file(load_file(str(exported[name] / "model.safetensors")),
              str(hub / "model.safetensors"), metadata={"format": "pt"})
    from_hub = tmp_path / "from_hub.safetensors"
    assert run_cli("convert", hub, "-o", from_hub, "-q").exit_code == 0
    result = run_cli("export", from_hub, "-o", tmp_path / "hub.pickle", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exact"] is False
    assert any("restore_from" in note and "ema/hidden" in note for note in report["notes"])


def test_a_short_hf_clip_asks_for_num_chunks(exported, tmp_path) -> None:
    """transformers' config.json has no num_chunks; a clip with fewer audio patches
    than the official 128 (a save_pretrained of a small PerceiverForMultimodalAutoencoding)
    is a usage error naming --config num_chunks, and imports with it."""
    name = "video_autoencoding"
    hub = tmp_path / "hub"
    hf_model = getattr(transformers, _architecture(name)).from_pretrained(str(exported[name]))
    hf_model.save_pretrained(str(hub))  # no perceiver-convert metadata
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", hub, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert "--config num_chunks=N" in result.stderr and "<= 8" in result.stderr
    assert not out.exists()
    assert run_cli("convert", hub, "-o", out, "--config", "num_chunks=4", "-q").exit_code == 0
    assert perceiver_torch.load(out).config.num_chunks == 4


def test_hf_tensors_of_other_shapes_are_explained(exported, tmp_path) -> None:
    """A transformers model whose config shapes its tensors otherwise than the official
    architecture (a widening factor): the error names that config.json value, not
    --model, which the user did not pass."""
    name = "language_perceiver"
    config = transformers.PerceiverConfig.from_pretrained(str(exported[name]))
    config.self_attention_widening_factor = 2
    folder = tmp_path / "wide"
    transformers.PerceiverForMaskedLM(config).save_pretrained(str(folder))
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", folder, "-o", out)
    assert result.exit_code == 3, result.stderr
    assert "self_attention_widening_factor=2" in result.stderr
    assert "cannot be imported" in result.stderr and "--model" not in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------
# Provenance through round trips: what an import rebuilt or rounded stays said.


def _hub_copy(exported_folder: Path, folder: Path, convert_tensors=None) -> Path:
    """``exported_folder`` as the hub holds such a checkpoint: its config.json and its
    tensors (through ``convert_tensors``), without this project's metadata."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    (folder / "config.json").write_text((exported_folder / "config.json").read_text())
    tensors = load_file(str(exported_folder / "model.safetensors"))
    if convert_tensors is not None:
        tensors = {key: convert_tensors(key, tensor) for key, tensor in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_rebuilt_arrays_stay_rebuilt_through_another_hf_round_trip(exported, tmp_path) -> None:
    """hub file -> convert (BatchNorm accumulators rebuilt: not exact) -> export --format
    hf -> convert -> export: the second export carried the rebuilt arrays in its
    metadata, and the pickle was called exact."""
    hub = _hub_copy(exported["imagenet_conv"], tmp_path / "hub")
    first, again = tmp_path / "first.safetensors", tmp_path / "again.safetensors"
    assert run_cli("convert", hub, "-o", first, "-q").exit_code == 0
    assert run_cli("export", first, "-o", tmp_path / "hf", "--format", "hf", "-q").exit_code == 0
    assert run_cli("convert", tmp_path / "hf", "-o", again, "-q").exit_code == 0
    result = run_cli("export", again, "-o", tmp_path / "again.pickle", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exact"] is False
    assert any("restore_from" in note and "ema/hidden" in note for note in report["notes"])
    # The rebuilt values themselves are the same as after the first import.
    assert np.array_equal(
        _official_arrays(tmp_path / "again.pickle")[
            "state:image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/hidden"],
        _official_arrays(_export_pickle(first, tmp_path / "first.pickle"))[
            "state:image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/hidden"],
    )


def _export_pickle(converted_file: Path, out: Path) -> Path:
    assert run_cli("export", converted_file, "-o", out, "-q").exit_code == 0
    return out


def test_reduced_precision_weights_are_not_called_exact_after_an_hf_round_trip(
    converted, exported, tmp_path
) -> None:
    """A bfloat16 conversion exported to HuggingFace (float32 tensors holding bfloat16
    values) says so in its metadata, and its import records it: exporting that to the
    official layout is not the original arrays. The same for a transformers file that
    stores float16, or float64 that float32 cannot hold; float64 holding float32 values
    imports exactly."""
    name = "optical_flow"
    reduced = tmp_path / "reduced.safetensors"
    convert(converted[name][0], reduced, config=HF_TINY_CONFIGS[name], dtype="bfloat16")
    folder = tmp_path / "hf"
    assert run_cli("export", reduced, "-o", folder, "--format", "hf", "-q").exit_code == 0
    assert _safetensors_metadata(folder / "model.safetensors")["perceiver_convert.dtype"] == "bfloat16"
    hub_f16 = _hub_copy(exported[name], tmp_path / "hub_f16",
                        lambda key, t: t.half() if t.is_floating_point() else t)
    hub_f64 = _hub_copy(exported[name], tmp_path / "hub_f64",
                        lambda key, t: t.double() if t.is_floating_point() else t)
    hub_f64_rounded = _hub_copy(
        exported[name], tmp_path / "hub_f64_rounded",
        lambda key, t: t.double() * (1 + 2.0 ** -40) if t.is_floating_point() else t)
    cases = [(folder, ["bfloat16"], "bfloat16"), (hub_f16, ["float16"], "float16"),
             (hub_f64, None, None), (hub_f64_rounded, ["float64"], "rounded to float32")]
    for source, stored, words in cases:
        back = tmp_path / f"{source.name}.safetensors"
        assert run_cli("convert", source, "-o", back, "-q").exit_code == 0
        hf_source = json.loads(read_checkpoint(back)[1]["hf_source"])
        assert hf_source.get("stored_dtypes") == stored, source
        result = run_cli("export", back, "-o", tmp_path / f"{source.name}.pickle", "--json", "-q")
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["exact"] is (stored is None), source
        if words:
            assert any(words in note for note in report["notes"]), report["notes"]
    # Carried on: the import's export to HuggingFace, imported again.
    back = tmp_path / "hf.safetensors"
    assert run_cli("export", back, "-o", tmp_path / "hf2", "--format", "hf", "-q").exit_code == 0
    again = tmp_path / "again.safetensors"
    assert run_cli("convert", tmp_path / "hf2", "-o", again, "-q").exit_code == 0
    assert json.loads(read_checkpoint(again)[1]["hf_source"])["stored_dtypes"] == ["bfloat16"]


# --------------------------------------------------------------------------------------
# Damaged or misused transformers checkpoints: exit 3 (2 for usage), one clear line.


def test_nonfinite_hf_weights_are_refused(exported, tmp_path) -> None:
    """As the official reader refuses them; the converted file was written, and every
    export then refused it as corrupt."""
    def poison(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key == "perceiver.embeddings.latents":
            tensor = tensor.clone()
            tensor[0, 0] = float("nan")
        return tensor

    hub = _hub_copy(exported["imagenet_fourier"], tmp_path / "hub", poison)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", hub, "-o", out)
    assert result.exit_code == 3, result.stderr
    assert "NaN or Inf" in result.stderr and "perceiver.embeddings.latents" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("optical_flow", "train_size", 5),
        ("optical_flow", "train_size", None),
        ("video_autoencoding", "output_shape", 5),
        ("video_autoencoding", "output_shape", None),
        ("video_autoencoding", "image_size", None),
        ("imagenet_conv", "architectures", {"PerceiverForImageClassificationConvProcessing": 1}),
    ],
)
def test_config_json_values_of_other_types_are_named(name, key, value, exported, tmp_path) -> None:
    """They were internal errors ("unexpected TypeError ... please report it")."""
    folder = _with_config_value(exported[name], tmp_path / "changed", key, value)
    result = run_cli("convert", folder, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 3, result.stderr
    assert key.rstrip("s") in result.stderr and "unexpected" not in result.stderr, result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_one_shard_is_named_as_such(exported, tmp_path) -> None:
    """A shard given alone was a checkpoint missing tensors ("is it the right model?")."""
    hf_model = transformers.PerceiverForOpticalFlow.from_pretrained(str(exported["optical_flow"]))
    hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    result = run_cli("convert", shards[1], "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 3, result.stderr
    assert "one shard of sharded weights" in result.stderr
    assert "model.safetensors.index.json" in result.stderr


def test_exporting_a_transformers_checkpoint_says_to_convert_it(exported, tmp_path) -> None:
    for fmt in ("onnx", "hf", "haiku"):
        out = tmp_path / {"onnx": "m.onnx", "hf": "m", "haiku": "m.pickle"}[fmt]
        result = run_cli("export", exported["imagenet_fourier"] / "model.safetensors", "-o",
                         out, "--format", fmt)
        assert result.exit_code == 3, result.stderr
        assert "a HuggingFace transformers checkpoint" in result.stderr
        assert f"perceiver-convert convert {exported['imagenet_fourier']}" in result.stderr
        assert not out.exists()


def test_pickle_options_are_refused_for_other_formats(converted, tmp_path) -> None:
    """--protocol and --container shape the Haiku pickle export, --mapping the way
    back to the official names (pickle and hf); the other exports ignored them
    without a word."""
    source = converted["imagenet_fourier"][1]
    mapping = Path(__file__).resolve().parents[1] / "mappings" / "imagenet_fourier.yaml"
    for args, words in (
        (["-o", tmp_path / "m.onnx", "--protocol", "5", "--mapping", mapping],
         "--protocol, --mapping do not apply to --format onnx"),
        (["-o", tmp_path / "hf", "--format", "hf", "--container", "dict", "--mapping", mapping],
         "--container does not apply to --format hf"),
    ):
        result = run_cli("export", source, *args)
        assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_a_mapping_of_ones_own_exports_through_that_file(converted, tmp_path) -> None:
    """A file converted with a mapping file of another name could not be exported to
    Haiku without --mapping ("no mapping named 'my_fourier'", no hint) nor to
    HuggingFace at all (export_hf took no mapping): the error names --mapping FILE,
    and both exports take it."""
    import shutil

    from converter.errors import MappingError
    from converter.exporter import export
    from converter.hf import export_hf

    mappings = Path(__file__).resolve().parents[1] / "mappings"
    mine = tmp_path / "my_fourier.yaml"
    mine.write_text((mappings / "imagenet_fourier.yaml").read_text().replace(
        "name: imagenet_fourier", "name: my_fourier"))
    shutil.copy(mappings / "_blocks.yaml", tmp_path)
    fixture = converted["imagenet_fourier"][0]
    source = tmp_path / "mine.safetensors"
    convert(fixture, source, config=HF_TINY_CONFIGS["imagenet_fourier"], mapping=mine)
    for call in (lambda: export(source, tmp_path / "back.pickle"),
                 lambda: export_hf(source, tmp_path / "hf")):
        with pytest.raises(MappingError, match=r"converted with the mapping 'my_fourier'.*"
                                               r"--mapping FILE \(mapping= in Python\)"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "_blocks.yaml", "mine.safetensors", "my_fourier.yaml"]
    assert export(source, tmp_path / "back.pickle", mapping=mine).exact
    result = run_cli("export", source, "-o", tmp_path / "hf", "--format", "hf",
                     "--mapping", mine, "--json")
    assert result.exit_code == 0, result.stderr
    plain = run_cli("export", converted["imagenet_fourier"][1], "-o", tmp_path / "hf_plain",
                    "--format", "hf", "--json")
    assert plain.exit_code == 0, plain.stderr
    from safetensors.torch import load_file

    mine_tensors = load_file(tmp_path / "hf" / "model.safetensors")
    plain_tensors = load_file(tmp_path / "hf_plain" / "model.safetensors")
    assert mine_tensors.keys() == plain_tensors.keys()
    assert all(torch.equal(mine_tensors[k], plain_tensors[k]) for k in plain_tensors)


@pytest.mark.jax
def test_verify_with_reference_rounds_to_the_recorded_dtype(converted, tmp_path) -> None:
    """A --dtype bfloat16 file, its HuggingFace export and that export's import hold
    the original rounded to bfloat16 (the last two as float32, with
    hf_source.stored_dtypes saying so): each equals the original rounded so, bit for
    bit; a tensor that is not (here: the unrounded original) still fails, exit 3."""
    pytest.importorskip("jax")
    from safetensors import safe_open
    from safetensors.torch import save_file

    fixture = converted["optical_flow"][0]
    bf16 = tmp_path / "bf16.safetensors"
    convert(fixture, bf16, dtype="bfloat16", config=HF_TINY_CONFIGS["optical_flow"])
    folder, back = tmp_path / "hf", tmp_path / "back.safetensors"
    assert run_cli("export", bf16, "-o", folder, "--format", "hf", "-q").exit_code == 0
    assert run_cli("convert", folder, "-o", back, "-q").exit_code == 0
    for candidate, why in ((bf16, "the file's dtype"), (folder, "hf_source.stored_dtypes"),
                           (back, "hf_source.stored_dtypes")):
        result = run_cli("verify", candidate, "--reference", fixture, "--json", "-q")
        assert result.exit_code == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["tensors"]["passed"] and document["parity"]["passed"]
        assert document["tensors"]["rounded_to"] == "bfloat16"
        assert document["parity"]["dtype"] == "bfloat16"
        assert "equal to the original rounded to bfloat16" in result.stderr
        assert why in result.stderr

    # One tensor of the import replaced by the original's unrounded float32 values.
    with safe_open(str(back), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    official, _ = read_checkpoint(converted["optical_flow"][1])
    key = next(k for k in sorted(tensors)
               if tensors[k].is_floating_point() and not torch.equal(tensors[k], official[k]))
    tensors[key] = official[key].clone()
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata=metadata)
    result = run_cli("verify", wrong, "--reference", fixture, "--json", "-q")
    assert result.exit_code == 3, result.stderr
    document = json.loads(result.stdout)
    assert [d["key"] for d in document["tensors"]["different"]] == [key]
    assert document["tensors"]["equal"] == document["tensors"]["compared"] - 1
