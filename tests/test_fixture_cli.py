"""The model registry and trees, random fixtures, and ``perceiver-convert fixture``."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from converter import (
    CheckpointError,
    MappingError,
    ParityError,
    __version__,
    load_haiku_checkpoint,
)
from converter.cli import ConverterGroup
from converter.fixtures import make_fixture
from converter.registry import MODEL_NAMES, MODELS, describe, model_info, official_tree
from official_facts import OFFICIAL_FLOAT32_BYTES, OFFICIAL_PARAMETERS
from helpers import assert_kept_the_other_runs_file, run_cli


# --------------------------------------------------------------------------------------
# Registry and trees


def test_registry_names_files_and_urls():
    assert MODEL_NAMES == tuple(OFFICIAL_PARAMETERS)
    info = model_info("imagenet_conv")
    assert info.official_file == "imagenet_conv_preprocessing.pystate"
    base = "https://storage.googleapis.com/perceiver_io/"
    assert info.url == base + "imagenet_conv_preprocessing.pystate"
    assert model_info("language_perceiver").official_file == (
        "language_perceiver_io_bytes.pickle"
    )
    assert {n for n, i in MODELS.items() if i.wrapped} == {
        "imagenet_learned",
        "imagenet_fourier",
        "imagenet_conv",
    }


def test_full_trees_match_the_official_counts(model_name):
    tree = official_tree(model_name)
    assert tree.num_params() == OFFICIAL_PARAMETERS[model_name]
    assert tree.nbytes() == OFFICIAL_FLOAT32_BYTES[model_name]
    assert tree.wrapped is MODELS[model_name].wrapped
    assert bool(tree.state) is (model_name == "imagenet_conv")
    # The tiny trees use the same names, with fewer self-attention layers.
    assert official_tree(model_name, "tiny").params.keys() <= tree.params.keys()


def test_conv_state_tree():
    state = official_tree("imagenet_conv").state
    ema = "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/"
    assert state[ema + "mean_ema"]["counter"] == ((), "int32")
    assert state[ema + "var_ema"]["average"] == ((1, 1, 1, 64), "float32")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError) as info:
        official_tree("imagenet")
    for name in MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid sizes: full, tiny"):
        official_tree("optical_flow", "small")
    with pytest.raises(ValueError, match="valid names"):
        make_fixture("bert")


# --------------------------------------------------------------------------------------
# Fixtures


def test_fixture_follows_the_official_tree_and_layout(model_name):
    params, state = make_fixture(model_name)
    tree = official_tree(model_name, "tiny")
    assert describe(params) == tree.params
    if tree.wrapped:
        assert describe(state) == tree.state
    else:
        assert state is None


def test_fixture_values_are_never_zero_constant_or_repeated(model_name):
    params, state = make_fixture(model_name)
    arrays = [a for m in params.values() for a in m.values()]
    arrays += [a for m in (state or {}).values() for a in m.values()]
    for array in arrays:
        assert np.all(array != 0)
        assert np.isfinite(array).all()
        if array.size > 1:
            assert len(np.unique(array)) >= 0.99 * array.size


def test_fixture_scales_keep_a_forward_pass_sane():
    params, state = make_fixture("imagenet_conv", "tiny")
    for module, group in params.items():
        for name, array in group.items():
            if name == "scale":
                assert abs(float(array.mean()) - 1.0) < 0.2
            if name in ("b", "offset"):
                assert float(np.abs(array).max()) < 1.0
            if name == "w" and array.ndim == 2 and array.size >= 4096:
                fan_in = array.shape[0]
                assert abs(float(array.std()) * math.sqrt(fan_in) - 1.0) < 0.1
            if name == "w" and array.ndim == 4:
                fan_in = array.shape[0] * array.shape[1] * array.shape[2]
                assert abs(float(array.std()) * math.sqrt(fan_in) - 1.0) < 0.25
    ema = "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/"
    assert (state[ema + "var_ema"]["average"] > 0).all()
    counters = {state[ema + k]["counter"].item() for k in ("mean_ema", "var_ema")}
    assert len(counters) == 2 and all(c > 0 for c in counters)
    assert state[ema + "mean_ema"]["counter"].dtype == np.int32
    # The official flow head starts at zero; ours must not.
    flow, _ = make_fixture("optical_flow")
    head = flow["flow_decoder/~/basic_decoder/output"]
    assert np.all(head["w"] != 0) and np.all(head["b"] != 0)


def test_fixture_is_deterministic_and_seeded():
    first, _ = make_fixture("video_autoencoding", seed=0)
    again, _ = make_fixture("video_autoencoding", seed=0)
    other, _ = make_fixture("video_autoencoding", seed=1)
    for module, group in first.items():
        for name, array in group.items():
            assert array.tobytes() == again[module][name].tobytes()
            assert not np.array_equal(array, other[module][name])
    # Equal shapes in different places still get different values.
    a = first["encoder/~/cross_attention/attention/linear"]["b"]
    b = first["encoder/~/cross_attention/attention/linear_1"]["b"]
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="non-negative int"):
        make_fixture("video_autoencoding", seed=-1)


@pytest.mark.full
def test_full_size_language_fixture():
    params, state = make_fixture("language_perceiver", "full")
    assert state is None
    assert describe(params) == official_tree("language_perceiver").params
    total = sum(a.size for m in params.values() for a in m.values())
    assert total == OFFICIAL_PARAMETERS["language_perceiver"]


# --------------------------------------------------------------------------------------
# The CLI: fixture, help, version, error handling


def test_fixture_command_for_every_model(tmp_path, model_name):
    out = tmp_path / f"{model_name}.pickle"
    result = run_cli("fixture", model_name, "-o", str(out))
    assert result.exit_code == 0, result.output
    checkpoint = load_haiku_checkpoint(out)
    assert describe(checkpoint.params) == official_tree(model_name, "tiny").params
    assert checkpoint.wrapped is MODELS[model_name].wrapped
    assert checkpoint.protocol == 3
    summary = result.stderr.strip()
    assert result.stdout == ""
    assert len(summary.splitlines()) == 1
    assert str(out) in summary
    assert hashlib.sha256(out.read_bytes()).hexdigest() in summary
    assert f"{out.stat().st_size:,} bytes" in summary


def test_fixture_json_document(tmp_path):
    """--json: the summary as one document on stdout, read back against the file."""
    import json

    out = tmp_path / "flow.pickle"
    result = run_cli("fixture", "optical_flow", "-o", out, "--seed", "3", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert document["bytes"] == out.stat().st_size and document["path"] == str(out)
    checkpoint = load_haiku_checkpoint(out)
    arrays = [a for tree in (checkpoint.params, checkpoint.state)
              for params in tree.values() for a in params.values()]
    assert document["arrays"] == len(arrays)
    assert document["values"] == sum(a.size for a in arrays)
    assert (document["model"], document["seed"], document["size"]) == ("optical_flow", 3, "tiny")


def test_fixture_keeps_an_output_that_appears_while_writing(tmp_path, monkeypatch):
    """Another run writes the same new name after the up-front check: without
    --force that file is kept (exit 2, one line), with --force it is replaced."""
    import contextlib

    import converter.haiku_writer as writer_module

    out, other = tmp_path / "flow.pickle", b"the other run's fixture"
    real = writer_module.atomic_write

    @contextlib.contextmanager
    def racing(path, **options):
        with real(path, **options) as handle:
            yield handle
            out.write_bytes(other)

    monkeypatch.setattr(writer_module, "atomic_write", racing)
    result = run_cli("fixture", "optical_flow", "-o", out)
    assert_kept_the_other_runs_file(result, out, other)
    assert run_cli("fixture", "optical_flow", "-o", out, "--force").exit_code == 0
    assert load_haiku_checkpoint(out).size_bytes > len(other)
    assert [p.name for p in tmp_path.iterdir()] == ["flow.pickle"]


def test_fixture_command_options(tmp_path):
    out = tmp_path / "flow.pickle"
    result = run_cli(
        "fixture",
        "optical_flow",
        "--output",
        str(out),
        "--seed",
        "7",
        "--protocol",
        "2",
        "--container",
        "dict",
        "--size",
        "tiny",
    )
    assert result.exit_code == 0, result.output
    checkpoint = load_haiku_checkpoint(out)
    assert checkpoint.protocol == 2 and checkpoint.containers == ("dict",)
    expected, _ = make_fixture("optical_flow", "tiny", seed=7)
    for module, group in expected.items():
        for name, array in group.items():
            assert checkpoint.params[module][name].tobytes() == array.tobytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["fixture", "bert", "-o", "x.pickle"], "'bert' is not one of"),
        (["fixture", "optical_flow"], "Missing option '-o' / '--output'"),
        (
            ["fixture", "optical_flow", "-o", "f.pickle", "--protocol", "1"],
            "--protocol",
        ),
        (["fixture", "optical_flow", "-o", "f.pickle", "--size", "huge"], "--size"),
        (["fixture", "optical_flow", "-o", "f.pickle", "--seed", "-3"], "--seed"),
        (["nonsense"], "No such command"),
    ],
)
def test_fixture_usage_errors_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_lists_valid_names(tmp_path):
    result = run_cli("fixture", "imagenet", "-o", str(tmp_path / "x.pickle"))
    assert result.exit_code == 2
    for name in MODEL_NAMES:
        assert name in result.stderr


def test_missing_output_folder_is_a_usage_error(tmp_path):
    result = run_cli("fixture", "optical_flow", "-o", str(tmp_path / "no" / "x.pickle"))
    assert result.exit_code == 2
    assert "does not exist; create it first" in result.stderr


def test_fixture_and_inspect_run_without_importing_torch(tmp_path):
    """converter.cli's promise: fixture and inspect need neither jax nor torch. Reading
    PERCEIVER_CONVERT_DEBUG through perceiver_torch's switch parser imported torch for
    every command, also where the variable is unset."""
    pickle = tmp_path / "fixture.pickle"
    code = f"""
import sys
from click.testing import CliRunner
import converter.cli
runner = CliRunner()
for args in (["fixture", "imagenet_conv", "-o", {str(pickle)!r}], ["inspect", {str(pickle)!r}]):
    result = runner.invoke(converter.cli.main, args)
    assert result.exit_code == 0, result.output
print(sorted(name for name in ("torch", "jax") if name in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k != "PERCEIVER_CONVERT_DEBUG"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True,
                               text=True, timeout=300, env=env)
    assert completed.stdout.strip() == "[]", completed.stdout + completed.stderr


def test_help_documents_exit_codes_and_version():
    result = run_cli("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for line in (
        "0 success",
        "1 parity check outside tolerance",
        "2 usage error",
        "3 bad checkpoint or mapping",
    ):
        assert line in text
    assert "fixture" in text and "inspect" in text
    result = run_cli("--version")
    assert result.exit_code == 0 and __version__ in result.output
    fixture_help = run_cli("fixture", "--help").output
    for name in MODEL_NAMES:
        assert name in " ".join(fixture_help.split()).replace("- ", "-")


@pytest.mark.parametrize(
    "error, code",
    [
        (CheckpointError("bad.pickle: truncated; download it again"), 3),
        (MappingError("mapping x: key y missing"), 3),
        (ParityError("max |diff| 1e-2 > 1e-4"), 1),
    ],
)
def test_converter_errors_become_messages_and_exit_codes(error, code):
    @click.group(cls=ConverterGroup)
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise error

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == code
    assert result.stderr == f"error: {error}\n"
    assert "Traceback" not in result.output
