"""verify: per-stage parity against the JAX reference, and its failure paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.errors import ConverterError
from converter.fixtures import write_fixture
from converter.registry import MODEL_NAMES
from converter.verify import STAGES, compare, require_jax
from helpers import run_cli

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"


def test_compare_reports_relative_error_and_argmax():
    reference = np.array([[1.0, 2.0, 4.0], [3.0, 0.0, -8.0]])
    actual = reference + np.array([[0.0, 0.0, 4e-5], [0.0, 0.0, 0.0]])
    result = compare("logits", "output", reference, actual, 1e-5, argmax_axis=-1)
    assert result.max_abs_diff == pytest.approx(4e-5)
    assert result.max_abs_ref == 8.0
    assert result.relative == pytest.approx(5e-6)
    assert result.argmax_agreement == 1.0 and result.passed is True
    worse = compare("logits", "output", reference, reference * 1.001, 1e-5)
    assert worse.passed is False
    flipped = reference.copy()
    flipped[0, 1] = 4.0 + 1e-6  # argmax moves, relative error tiny
    assert compare("logits", "output", reference, flipped, 1.0, argmax_axis=-1).passed is False
    assert compare("x", "output", reference, np.full_like(reference, np.nan), 1.0).passed is False
    assert compare("x", "output", reference, reference[:1], 1.0).passed is False
    assert compare("x", "stage", reference, actual, None).passed is None


def test_missing_jax_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "perceiver_jax", None)
    with pytest.raises(ConverterError, match=r"pip install 'perceiver-convert\[jax\]'") as info:
        require_jax()
    assert info.value.exit_code == 2  # a missing extra, as for run's media libraries


@pytest.fixture(scope="module")
def jax_ready():
    pytest.importorskip("jax")
    pytest.importorskip("haiku")


@pytest.mark.jax
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_verify_passes_for_every_model_with_all_stages(jax_ready, name, tmp_path):
    source = tmp_path / f"{name}.pickle"
    write_fixture(name, source, size="tiny", seed=5, protocol=3, container="flatmapping")
    result = run_cli("verify", source, "--json", "--batch", "2", "--seed", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["model"] == name and report["batch"] == 2
    stages = [c["name"] for c in report["comparisons"] if c["kind"] == "stage"]
    assert stages == list(STAGES)
    for comparison in report["comparisons"]:
        assert comparison["shape"][0] == 2
        if comparison["kind"] == "output":
            assert comparison["passed"] and comparison["relative"] <= comparison["tolerance"]
    # The human table goes to stderr.
    assert "latents (stage)" in result.stderr and "PASSED" in result.stderr


def _broken_mapping(tmp_path: Path) -> Path:
    """imagenet_fourier's mapping with the decoder's query and key/value norms swapped.

    At the tiny size both norms are 64 wide, so every shape check passes: only the
    numbers can reveal the mistake.
    """
    text = (MAPPINGS / "imagenet_fourier.yaml").read_text()
    decoder = (
        "  - use: decoder\n"
        "    with: {src: classification_decoder/~/basic_decoder, dst: decoder}\n"
    )
    assert decoder in text
    source = "classification_decoder/~/basic_decoder"
    swapped = "".join(
        f"  - use: {block}\n    with: {{src: {source}/{src}, dst: decoder.{dst}}}\n"
        for block, src, dst in [
            ("layer_norm", "cross_attention/layer_norm", "cross_attention.kv_norm"),
            ("layer_norm", "cross_attention/layer_norm_1", "cross_attention.q_norm"),
            ("layer_norm", "cross_attention/layer_norm_2", "cross_attention.mlp_norm"),
            ("attention", "cross_attention/attention", "cross_attention.attention"),
            ("mlp", "cross_attention/mlp", "cross_attention.mlp"),
            ("linear", "output", "output_projection"),
        ]
    )
    path = tmp_path / "imagenet_fourier_broken.yaml"
    path.write_text(text.replace(decoder, swapped))
    return path


@pytest.mark.jax
def test_a_wrong_mapping_is_caught_by_parity_and_nothing_is_written(jax_ready, tmp_path):
    source = GOLDEN / "imagenet_fourier" / "checkpoint.pickle"
    broken = _broken_mapping(tmp_path)
    result = run_cli("verify", source, "--mapping", broken)
    assert result.exit_code == 1
    assert "FAIL" in result.stderr and "FAILED" in result.stderr
    out = tmp_path / "model.safetensors"
    result = run_cli("convert", source, "-o", out, "--mapping", broken, "--verify")
    assert result.exit_code == 1
    assert "outside tolerance" in result.stderr
    assert not out.exists()


@pytest.mark.jax
def test_convert_with_verify_stores_the_parity_result(jax_ready, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "model.safetensors"
    result = run_cli("convert", GOLDEN / "video_autoencoding" / "checkpoint.pickle", "-o", out,
                 "--verify", "--json")
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as reader:
        parity = json.loads(reader.metadata()["parity"])
    assert parity["passed"] and parity["model"] == "video_autoencoding"
    assert {c["name"] for c in parity["comparisons"] if c["kind"] == "output"} == {
        "audio", "image", "label"
    }
    assert json.loads(result.stdout)["parity"]["passed"]


@pytest.mark.jax
def test_fourier_exception_is_backed_by_injected_reference_features(jax_ready):
    result = run_cli("verify", GOLDEN / "video_autoencoding" / "checkpoint.pickle", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_kind = {(c["kind"], c["name"]): c for c in report["comparisons"]}
    # End to end the audio output gets the documented allowance ...
    assert by_kind[("output", "audio")]["tolerance"] == 1e-4
    assert by_kind[("output", "image")]["tolerance"] == 1e-5
    # ... and with the reference's own float32 Fourier features it must meet 1e-5.
    injected = by_kind[("fourier", "audio")]
    assert injected["tolerance"] == 1e-5 and injected["passed"]
    assert "audio (JAX Fourier)" in result.stderr


def test_jax_axis_tables_match_the_reference_features():
    pytest.importorskip("jax")
    pytest.importorskip("haiku")
    from perceiver_jax import position_encoding as jax_pe

    from converter.verify import jax_axis_table

    pos, sin, cos = jax_axis_table("grid", 7, 4, 16)
    reference = np.asarray(
        jax_pe.fourier_features(jax_pe.linear_positions((7,)).reshape(7, 1), 4, (16,))
    )
    np.testing.assert_array_equal(np.concatenate([pos, sin, cos], axis=1), reference)
    pos, _, _ = jax_axis_table("subsampled", 4, 4, 16)
    np.testing.assert_array_equal(pos[:, 0].numpy(), np.array([-1, -0.5, 0, 0.5], np.float32))


@pytest.mark.jax
def test_config_override_means_the_same_in_both_implementations(jax_ready):
    # Heads cannot be read from shapes; --config sets them for JAX and PyTorch alike
    # (the encoder's cross-attention; the official flow decoder keeps one head).
    source = GOLDEN / "optical_flow" / "checkpoint.pickle"
    result = run_cli("verify", source, "--config", "num_cross_attention_heads=2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"]
    # And the override really changes the computation: the golden outputs (1 head)
    # are no longer reproduced by the converted model.
    import torch

    import perceiver_torch
    from converter.conversion import convert

    converted = convert(source, config={"num_cross_attention_heads": 2})
    model = converted.build_model()
    assert model.encoder.cross_attention.attention.num_heads == 2
    assert model.decoder.cross_attention.attention.num_heads == 1
    inputs = np.load(GOLDEN / "optical_flow" / "inputs.npz")["images"]
    expected = np.load(GOLDEN / "optical_flow" / "outputs.npz")["output"]
    with torch.no_grad():
        flow = model(torch.from_numpy(inputs.transpose(0, 1, 4, 2, 3).copy()))
    got = flow.permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() > 1e-3
    assert isinstance(model, perceiver_torch.OpticalFlow)


@pytest.mark.jax
@pytest.mark.parametrize("command", ["verify", "demo"])
def test_a_seed_beyond_the_jax_key_range_is_a_usage_error(jax_ready, command, tmp_path):
    """verify's and demo's --seed also keys the JAX reference (a signed 64-bit
    integer): 2**63 is refused as a bad option (exit 2), not an unexpected
    OverflowError (exit 3) after the fixture was written."""
    source = tmp_path / "optical_flow.pickle"
    write_fixture("optical_flow", source, size="tiny")
    args = (
        [source] if command == "verify"
        else ["--models", "optical_flow", "--no-tasks", "--workdir", tmp_path / "demo"]
    )
    result = run_cli(command, *args, "--seed", str(2**63))
    assert result.exit_code == 2, result.output
    assert "--seed" in result.stderr and "unexpected" not in result.stderr
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").iterdir())
    assert run_cli("verify", source, "--seed", str(2**63 - 1), "-q").exit_code == 0


@pytest.mark.jax
def test_verify_api_refuses_a_seed_beyond_the_jax_key_range(jax_ready, tmp_path):
    from converter.errors import UsageError
    from converter.verify import verify

    source = tmp_path / "optical_flow.pickle"
    write_fixture("optical_flow", source, size="tiny")
    with pytest.raises(UsageError, match="seed"):
        verify(source, seed=2**63)
    with pytest.raises(UsageError, match="seed"):
        verify(source, seed=-1)


def test_the_summary_numbers_are_one_outputs():
    from converter.verify import Comparison, ParityReport

    def output(name, relative, tolerance):
        return Comparison(name, "output", (1, 4), relative, 1.0, relative, None, tolerance,
                          relative <= tolerance)

    # The video model: audio at its 1e-4 allowance passes, image past its 1e-5 fails.
    report = ParityReport("video_autoencoding", "tiny", 1, 0, [
        output("audio", 5e-5, 1e-4), output("image", 2e-5, 1e-5), output("label", 1e-7, 1e-5)
    ])
    summary = report.as_dict()
    # It read max_relative 5e-5 (audio) under tolerance 1e-4 (audio) next to passed false.
    assert summary["passed"] is False and summary["worst_output"] == "image"
    assert (summary["max_relative"], summary["tolerance"]) == (2e-5, 1e-5)
    assert ParityReport("m", "tiny", 1, 0, []).as_dict()["max_relative"] is None


@pytest.mark.parametrize(
    "argument, value, message",
    [("batch", 0, "batch must be an integer >= 1"), ("batch", -1, "batch must be"),
     ("batch", True, "batch must be"), ("dtype", "float64", "dtype must be one of"),
     ("seed", -1, "seed must be an integer")],
)
def test_verify_refuses_bad_arguments_before_reading(tmp_path, argument, value, message):
    """batch=0 was a ZeroDivisionError, batch=-1 numpy's "negative dimensions",
    dtype="float64" a KeyError: UsageErrors now, before the checkpoint is read (the
    path here does not even exist)."""
    from converter.errors import UsageError
    from converter.verify import verify

    with pytest.raises(UsageError, match=message):
        verify(tmp_path / "not-read.pickle", **{argument: value})


@pytest.mark.jax
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_names_weights_beyond_the_dtypes_range(jax_ready, dtype, tmp_path):
    """verify --dtype float16 of a checkpoint with a finite weight over 65504 (which
    float16 rounds to inf) names the tensor and refuses (exit 2), as convert --dtype
    and run --dtype do; before, it ran and printed inf differences and "the float16
    outputs are not all finite" without saying why. 1e5 fits bfloat16 (float32's
    range): that verify runs (whether it passes is the parity's business: a weight
    of 1e5 multiplies the upstream rounding of its input by 1e5)."""
    import pickle

    source = tmp_path / "imagenet_conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny")
    with open(source, "rb") as handle:
        tree = pickle.load(handle)
    tree["params"]["classification_decoder/~/basic_decoder/output"]["w"][0, 0] = 1e5
    with open(source, "wb") as handle:
        pickle.dump(tree, handle)
    result = run_cli("verify", source, "--dtype", dtype, "-q")
    if dtype == "float16":
        assert result.exit_code == 2, result.output
        assert "decoder.output_projection.weight (up to 100000)" in result.stderr
        assert "beyond float16's range" in result.stderr
    else:
        assert result.exit_code in (0, 1), result.output
        assert "beyond" not in result.stderr and "parity of imagenet_conv" in result.output


def _strict_json(text: str):
    """json.loads refusing NaN and Infinity, which JSON does not have."""
    def refuse(constant: str):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_documents_hold_no_nan_or_infinity(capsys):
    """Every command's --json goes through echo_json, and an HF export's
    fidelity.json through the same json_text: non-finite numbers are null."""
    from converter.cli import echo_json
    from converter.terminal import json_text

    document = {"relative": float("inf"), "rows": [float("nan"), -float("inf"), 1.5]}
    expected = {"relative": None, "rows": [None, None, 1.5]}
    echo_json(document)
    assert _strict_json(capsys.readouterr().out) == expected
    assert _strict_json(json_text(document)) == expected
    assert json_text({"a": [1, 2.5]}) == json.dumps({"a": [1, 2.5]}, indent=2)


@pytest.mark.jax
def test_verify_json_of_outputs_that_overflow_is_json(jax_ready, tmp_path):
    """verify --dtype float16 of weights within float16's range whose activations
    pass it (every weight x 300: up to about 500, the logits about 1e7) reports
    outputs that are not finite (exit 1); its --json document held NaN and
    Infinity (max |diff|, relative), which JSON parsers refuse. They are null."""
    import pickle

    source = tmp_path / "imagenet_conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny")
    with open(source, "rb") as handle:
        tree = pickle.load(handle)
    for module in tree["params"].values():
        for name, array in module.items():
            module[name] = array * 300
    with open(source, "wb") as handle:
        pickle.dump(tree, handle)
    result = run_cli("verify", source, "--dtype", "float16", "--json", "-q")
    assert result.exit_code == 1, result.output
    fidelity = _strict_json(result.stdout)["fidelity"]
    assert fidelity["finite"] is False and fidelity["passed"] is False
    reduced = [row for row in fidelity["rows"] if row["run"] == "float16"]
    assert reduced and all(row["relative"] is None for row in reduced)
