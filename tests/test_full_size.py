"""Full-size tier (``pytest -m full``): the official sizes of all six models.

Parity through the CLI against the JAX reference, and the haiku -> torch -> haiku round
trip of the two smaller checkpoints. Minutes of CPU and a few GB of memory.
"""

from __future__ import annotations

import json

import pytest

from converter.fixtures import write_fixture
from converter.haiku_reader import load_haiku_checkpoint
from converter.registry import MODEL_NAMES
from helpers import assert_same_tree, run_cli

pytestmark = pytest.mark.full


@pytest.fixture
def full_fixture(tmp_path):
    def write(name: str):
        path = tmp_path / f"{name}.pickle"
        write_fixture(name, path, size="full", seed=11, protocol=3, container="flatmapping")
        return path

    return write


@pytest.mark.jax
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_size_parity(full_fixture, name):
    pytest.importorskip("jax")
    pytest.importorskip("haiku")
    result = run_cli("verify", full_fixture(name), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["size_preset"] == "official"
    outputs = [c for c in report["comparisons"] if c["kind"] == "output"]
    assert outputs
    for comparison in outputs:
        assert comparison["passed"], comparison
        if comparison["argmax_agreement"] is not None:
            assert comparison["argmax_agreement"] == 1.0


@pytest.mark.parametrize("name", ["video_autoencoding", "optical_flow"])
def test_full_size_round_trip_is_bit_identical(full_fixture, name, tmp_path):
    source = full_fixture(name)
    converted = tmp_path / "model.safetensors"
    exported = tmp_path / "exported.pickle"
    assert run_cli("convert", source, "-o", converted).exit_code == 0
    assert run_cli("export", converted, "-o", exported).exit_code == 0
    original, back = load_haiku_checkpoint(source), load_haiku_checkpoint(exported)
    assert_same_tree(back.params, original.params)
    # Written by the same writer from the same arrays: the files are identical too.
    assert exported.read_bytes() == source.read_bytes()
