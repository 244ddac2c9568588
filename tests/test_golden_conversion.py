"""Ground truth: each golden checkpoint, converted through the CLI and loaded with
perceiver_torch.load, reproduces what DeepMind's own code computed (outputs.npz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import perceiver_torch
from helpers import run_cli

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
RELATIVE_TOLERANCE = 1e-5


def torch_inputs(name: str, inputs: dict) -> dict:
    """The golden (official, channels-last) inputs in perceiver_torch's layouts."""
    if name == "language_perceiver":
        return {
            "input_ids": torch.from_numpy(inputs["inputs"].astype(np.int64)),
            "attention_mask": torch.from_numpy(inputs["input_mask"].astype(np.int64)),
        }
    if name.startswith("imagenet"):
        return {"images": torch.from_numpy(inputs["images"].transpose(0, 3, 1, 2).copy())}
    if name == "optical_flow":
        return {"frames": torch.from_numpy(inputs["images"].transpose(0, 1, 4, 2, 3).copy())}
    return {
        "images": torch.from_numpy(inputs["images"].transpose(0, 1, 4, 2, 3).copy()),
        "audio": torch.from_numpy(inputs["audio"][..., 0].copy()),
        "subsample": {
            "image": torch.from_numpy(inputs["subsampling_image"]),
            "audio": torch.from_numpy(inputs["subsampling_audio"]),
        },
    }


def official_outputs(name: str, outputs) -> dict:
    """perceiver_torch outputs in the official layouts, keyed like outputs.npz."""
    if name == "optical_flow":
        return {"output": outputs.permute(0, 2, 3, 1).numpy()}  # [B, 2, H, W] -> [B, H, W, 2]
    if isinstance(outputs, dict):
        return {key: value.numpy() for key, value in outputs.items()}
    return {"output": outputs.numpy()}


# Which outputs are logits whose argmax must agree everywhere.
ARGMAX = {"language_perceiver": {"output"}, "video_autoencoding": {"label"}}


def test_golden_checkpoint_converts_to_deepminds_outputs(model_name, golden_path, tmp_path):
    name = model_name  # every official model: a missing golden folder fails here
    folder = GOLDEN / name
    converted = tmp_path / f"{name}.safetensors"
    result = run_cli("convert", golden_path(name), "-o", converted, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model"] == name and document["size_preset"] == "tiny"

    model = perceiver_torch.load(converted).eval()
    inputs = dict(np.load(folder / "inputs.npz"))
    expected = dict(np.load(folder / "outputs.npz"))
    with torch.no_grad():
        actual = official_outputs(name, model(**torch_inputs(name, inputs)))
    assert actual.keys() == expected.keys()
    argmax = ARGMAX.get(name, {"output"} if name.startswith("imagenet") else set())
    for key, reference in expected.items():
        got = actual[key]
        assert got.shape == reference.shape and got.dtype == np.float32, key
        relative = np.abs(got - reference).max() / np.abs(reference).max()
        assert relative <= RELATIVE_TOLERANCE, f"{name}/{key}: relative error {relative:.2e}"
        if key in argmax:
            np.testing.assert_array_equal(got.argmax(-1), reference.argmax(-1))
