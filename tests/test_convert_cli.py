"""convert / export / models through the CLI: provenance, formats, detection, round trips
and every error path (exit codes 2 and 3, nothing half-written)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import converter
import perceiver_torch
from converter import converted_files as outputs_module
from converter import haiku_writer as writer_module
from converter.fixtures import make_fixture, write_fixture
from converter.haiku_reader import load_haiku_checkpoint
from converter.registry import MODEL_NAMES, official_tree
from converter.haiku_writer import save_haiku_checkpoint
from official_facts import OFFICIAL_PARAMETERS
from helpers import assert_same_tree, run_cli

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """One tiny official-format checkpoint per model (seed 1)."""
    folder = tmp_path_factory.mktemp("fixtures")
    paths = {}
    for name in MODEL_NAMES:
        paths[name] = folder / f"{name}.pickle"
        write_fixture(name, paths[name], size="tiny", seed=1, protocol=3, container="flatmapping")
    return paths


def test_convert_records_provenance_in_the_safetensors_metadata(tmp_path):
    source = GOLDEN / "imagenet_conv" / "checkpoint.pickle"
    out = tmp_path / "conv.safetensors"
    result = run_cli("convert", source, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr
    document = json.loads(result.stdout)
    with safe_open(str(out), framework="pt") as reader:
        metadata = reader.metadata()
        keys = set(reader.keys())
    assert metadata["model"] == "imagenet_conv"
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata["source_file"] == "checkpoint.pickle"
    assert metadata["mapping"] == "imagenet_conv"
    assert metadata["mapping_sha256"] == converter.mapping.load_mapping("imagenet_conv").sha256
    assert metadata["converter"] == f"perceiver-convert {converter.__version__}"
    assert metadata["size_preset"] == "tiny"
    assert json.loads(metadata["config"])["num_blocks"] == 3
    assert "parity" not in metadata
    # The BatchNorm accumulators the model does not use travel along for export.
    assert len(json.loads(metadata["haiku_dropped"])) == 3
    model = perceiver_torch.build("imagenet_conv", json.loads(metadata["config"]))
    assert keys == set(model.state_dict())
    assert document["tensors"] == len(keys)
    assert {d["source"].rsplit("/", 1)[-1] for d in document["dropped"]} == {"hidden", "counter"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_output_keeps_integer_buffers(tmp_path, dtype):
    out = tmp_path / "conv.safetensors"
    result = run_cli("convert", GOLDEN / "imagenet_conv" / "checkpoint.pickle", "-o", out, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    model = perceiver_torch.load(out)
    state = model.state_dict()
    assert state["input_preprocessor.batchnorm.num_batches_tracked"].dtype == torch.int64
    with safe_open(str(out), framework="pt") as reader:
        assert reader.get_tensor("encoder.latents").dtype == getattr(torch, dtype)
        assert reader.metadata()["dtype"] == dtype


def test_float16_conversion_notes_the_weights_it_makes_subnormal_or_zero(tmp_path):
    """convert --dtype float16 made weights below float16's smallest normal number
    subnormal or 0 without a word: the summary now notes how many (also with -q: it
    is the summary, not progress) and --json holds the counts under
    "float16_underflow" (null for float32 and bfloat16, which lose none)."""
    from helpers import checkpoint_with_tiny_weights, expected_float16_underflow

    source = checkpoint_with_tiny_weights(tmp_path)
    expected = expected_float16_underflow()
    result = run_cli("convert", source, "-o", tmp_path / "half.safetensors",
                     "--dtype", "float16", "--json", "-q")
    assert result.exit_code == 0, result.output  # noted, not refused
    assert json.loads(result.stdout)["float16_underflow"] == expected
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert note.startswith(
        f"note: float16 loses precision in 5 of the {expected['weights']:,} weights: 3 "
        "become subnormal (magnitudes below float16's smallest normal number, 2**-14 = "
        "6.1e-05: fewer significant bits"
    )
    assert "and 2 nonzero ones become 0 (magnitudes up to 2**-25 = 3.0e-08), in 2 " in note
    bias, kernel = expected["worst"]
    assert (f"tensor(s), worst first: {bias['name']} ({bias['values']} weights: 2 to zero, "
            f"1 subnormal), {kernel['name']} ({kernel['values']} weights: 0 to zero, 2 "
            "subnormal);") in note
    assert note.endswith(f"`perceiver-convert verify {source} --dtype float16` measures "
                         "the effect on the outputs")
    for dtype in ("float32", "bfloat16"):
        result = run_cli("convert", source, "-o", tmp_path / f"{dtype}.safetensors",
                         "--dtype", dtype, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["float16_underflow"] is None
        assert "note:" not in result.stderr and "subnormal" not in result.stderr


def test_pt_output_loads_with_weights_only(tmp_path):
    out = tmp_path / "flow.pt"
    result = run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o", out)
    assert result.exit_code == 0, result.output
    payload = torch.load(out, weights_only=True)
    assert payload["model"] == "optical_flow"
    assert payload["config"]["image_size"] == [24, 32]
    model = perceiver_torch.load(out)
    assert set(model.state_dict()) == set(payload["state_dict"])


def test_the_package_lists_the_names_it_loads_on_first_use():
    """The converter package loads its reader, writer, convert() and export() on first
    use (its __getattr__): dir(converter), which IPython's completion and
    inspect.getmembers read, lost HaikuCheckpoint, load_haiku_checkpoint and
    save_haiku_checkpoint when they became lazy (convert and export were never
    listed). Every name of __all__ is listed, and each is what the package gives."""
    names = dir(converter)
    assert set(converter.__all__) <= set(names), set(converter.__all__) - set(names)
    assert converter.load_haiku_checkpoint is load_haiku_checkpoint
    assert converter.save_haiku_checkpoint is save_haiku_checkpoint
    assert "not_a_name" not in names


def test_python_api_converts_in_memory():
    result = converter.convert(GOLDEN / "language_perceiver" / "checkpoint.pickle")
    assert result.output is None and result.model == "language_perceiver"
    model = result.build_model()
    logits = model(torch.tensor([[10, 20, 30]]))
    assert logits.shape == (1, 3, 262)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_is_detected_from_parameter_names(fixtures, name, tmp_path):
    result = run_cli("convert", fixtures[name], "-o", tmp_path / "out.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == name


def test_export_of_a_conversion_reproduces_the_golden_file_byte_for_byte(
    model_name, golden_path, tmp_path
):
    source = golden_path(model_name)
    converted = tmp_path / "model.safetensors"
    exported = tmp_path / "exported.pickle"
    assert run_cli("convert", source, "-o", converted).exit_code == 0
    result = run_cli("export", converted, "-o", exported, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exact"] is True
    assert exported.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("protocol, container", [(2, "dict"), (4, "flatmapping")])
def test_round_trip_haiku_torch_haiku_is_bit_identical(name, protocol, container, tmp_path):
    source = tmp_path / "source.pickle"
    write_fixture(name, source, size="tiny", seed=3, protocol=protocol, container=container)
    converted = tmp_path / "model.safetensors"
    exported = tmp_path / "exported.pickle"
    assert run_cli("convert", source, "-o", converted).exit_code == 0
    result = run_cli("export", converted, "-o", exported, "--protocol", protocol, "--container", container)
    assert result.exit_code == 0, result.output
    original, back = load_haiku_checkpoint(source), load_haiku_checkpoint(exported)
    assert back.wrapped == original.wrapped
    assert_same_tree(back.params, original.params)
    assert_same_tree(back.state, original.state)


def test_export_of_half_precision_is_flagged_inexact(tmp_path):
    converted = tmp_path / "model.safetensors"
    assert run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o", converted,
               "--dtype", "float16").exit_code == 0
    result = run_cli("export", converted, "-o", tmp_path / "back.pickle", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["exact"] is False
    assert "float16" in result.stderr



def test_export_names_settings_the_official_format_cannot_hold(tmp_path):
    """A model converted with --config num_self_attention_heads=2 exported as "exact"
    and converted back silently with the official 8 heads (logits 0.44 apart): the
    arrays are exact, the model they make is not. The export now says which settings
    the file cannot hold and the --config that gives the model back."""
    source = tmp_path / "fourier.pickle"
    write_fixture("imagenet_fourier", source, size="tiny", seed=6)
    two = tmp_path / "two.safetensors"
    assert run_cli("convert", source, "-o", two, "-q",
                   "--config", "num_self_attention_heads=2").exit_code == 0
    result = run_cli("export", two, "-o", tmp_path / "two.pickle", "--json")
    assert result.exit_code == 0, result.stderr
    flag = "--config num_self_attention_heads=2"
    (note,) = [n for n in json.loads(result.stdout)["notes"] if "cannot hold" in n]
    assert "converts back as num_self_attention_heads=8" in note and note.endswith(flag)
    assert flag in result.stderr
    for args, heads in (((), 8), (flag.split(), 2)):
        back = tmp_path / f"back{heads}.safetensors"
        assert run_cli("convert", tmp_path / "two.pickle", "-o", back, "-q", *args) \
            .exit_code == 0
        assert perceiver_torch.load(back).config.num_self_attention_heads == heads
    # The official settings (here the tiny preset's) need no note.
    assert run_cli("convert", source, "-o", tmp_path / "plain.safetensors", "-q").exit_code == 0
    result = run_cli("export", tmp_path / "plain.safetensors", "-o", tmp_path / "p.pickle")
    assert result.exit_code == 0 and "cannot hold" not in result.stderr

def test_export_of_a_file_converted_with_another_mapping_is_not_called_exact(tmp_path):
    """A mapping of one's own that swaps two same-shaped tensors (the self-attention
    blocks' two LayerNorms) passes every shape check: exporting through the bundled
    mapping then gives other arrays than the original, and was reported "exact". Now
    the export says it is not known to be, and --mapping with the file's own mapping
    gives the original back, byte for byte."""
    bundled = Path(__file__).resolve().parents[1] / "mappings"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "optical_flow.yaml").write_text((bundled / "optical_flow.yaml").read_text())
    blocks = (bundled / "_blocks.yaml").read_text()
    norms = ('{src: "{src}/layer_norm", dst: "{dst}.norm"}',
             '{src: "{src}/layer_norm_1", dst: "{dst}.mlp_norm"}')
    assert all(line in blocks for line in norms)
    swapped = blocks.replace(norms[0], '{src: "{src}/layer_norm_1", dst: "{dst}.norm"}')
    swapped = swapped.replace(norms[1], '{src: "{src}/layer_norm", dst: "{dst}.mlp_norm"}')
    (mine / "_blocks.yaml").write_text(swapped)
    original = GOLDEN / "optical_flow" / "checkpoint.pickle"
    converted = tmp_path / "mine.safetensors"
    assert run_cli("convert", original, "-o", converted, "-q",
                   "--mapping", mine / "optical_flow.yaml").exit_code == 0
    result = run_cli("export", converted, "-o", tmp_path / "back.pickle", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["exact"] is False
    assert "not known to equal the original" in result.stderr
    assert "export with --mapping FILE" in result.stderr
    assert (tmp_path / "back.pickle").read_bytes() != original.read_bytes()
    result = run_cli("export", converted, "-o", tmp_path / "same.pickle", "--json",
                     "--mapping", mine / "optical_flow.yaml")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["exact"] is True
    assert (tmp_path / "same.pickle").read_bytes() == original.read_bytes()


def test_models_lists_the_six_official_files():
    result = run_cli("models", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(MODEL_NAMES)
    assert all(r["url"].startswith("https://storage.googleapis.com/perceiver_io/") for r in rows)
    # The counts agree with the official parameter trees and the published numbers.
    params = [r["params"] for r in rows]
    assert params == [official_tree(n).num_params() for n in MODEL_NAMES]
    assert params == [OFFICIAL_PARAMETERS[n] for n in MODEL_NAMES]


# --------------------------------------------------------------------------------------
# Error paths.


def test_unknown_model_is_a_usage_error(fixtures, tmp_path):
    result = run_cli("convert", fixtures["optical_flow"], "-o", tmp_path / "o.safetensors",
                 "--model", "perceiver_flow")
    assert result.exit_code == 2
    assert "optical_flow" in result.output  # the valid names are listed


def test_wrong_model_forced_on_a_checkpoint(fixtures, tmp_path):
    out = tmp_path / "o.safetensors"
    result = run_cli("convert", fixtures["language_perceiver"], "-o", out, "--model", "optical_flow")
    assert result.exit_code == 3
    assert "does not fit the optical_flow mapping" in result.stderr
    assert "image_preprocessor/patches_linear/w" in result.stderr
    assert not out.exists()


def _modified_fixture(tmp_path, change):
    params, state = make_fixture("imagenet_fourier", size="tiny", seed=2)
    change(params)
    path = tmp_path / "modified.pickle"
    save_haiku_checkpoint(path, params, state)
    return path


def test_missing_parameter_is_listed(tmp_path):
    def remove(params):
        del params["perceiver_encoder/~/cross_attention/mlp/linear_1"]["b"]

    out = tmp_path / "o.safetensors"
    result = run_cli("convert", _modified_fixture(tmp_path, remove), "-o", out, "--model", "imagenet_fourier")
    assert result.exit_code == 3
    assert "missing in the checkpoint: perceiver_encoder/~/cross_attention/mlp/linear_1/b" in result.stderr
    assert not out.exists()


def test_extra_parameter_is_listed(tmp_path):
    def add(params):
        params["extra_head/linear"] = {"w": np.ones((2, 2), np.float32)}

    result = run_cli("convert", _modified_fixture(tmp_path, add), "-o", tmp_path / "o.safetensors",
                 "--model", "imagenet_fourier")
    assert result.exit_code == 3
    assert "unexpected in the checkpoint (no rule uses or drops it): extra_head/linear/w" in result.stderr


def test_a_mapping_file_that_does_not_fit_is_named_in_the_advice(tmp_path):
    """With --mapping the advice was to omit --model (not given): the mapping file,
    which may be the one at fault, is what the last line names now."""
    mapping = Path(__file__).resolve().parents[1] / "mappings" / "imagenet_fourier.yaml"
    source = GOLDEN / "imagenet_conv" / "checkpoint.pickle"
    result = run_cli("convert", source, "-o", tmp_path / "o.safetensors", "--mapping", mapping)
    assert result.exit_code == 3
    assert (f"Is checkpoint.pickle really an imagenet_fourier checkpoint, and does the "
            f"mapping file {mapping} fit it?") in result.stderr
    assert "--model" not in result.stderr
    result = run_cli("convert", source, "-o", tmp_path / "o.safetensors",
                     "--model", "imagenet_fourier")
    assert result.exit_code == 3
    assert "really an imagenet_fourier checkpoint? Omit --model (model= in Python)" \
        in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_shape_mismatch_names_both_keys_and_shapes(tmp_path):
    def reshape(params):
        module = params["classification_decoder/~/basic_decoder/output"]
        module["w"] = np.ones((64, 11), np.float32)

    result = run_cli("convert", _modified_fixture(tmp_path, reshape), "-o", tmp_path / "o.safetensors",
                 "--model", "imagenet_fourier")
    assert result.exit_code == 3
    assert "shape mismatch: classification_decoder/~/basic_decoder/output/w -> " \
           "decoder.output_projection.weight" in result.stderr
    assert "[64, 11] float32 becomes [11, 64]" in result.stderr


def test_without_model_a_foreign_checkpoint_is_explained(tmp_path):
    path = tmp_path / "foreign.pickle"
    save_haiku_checkpoint(path, {"resnet/conv": {"w": np.ones((3, 3), np.float32)}})
    result = run_cli("convert", path, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 3
    assert "match none of the official models" in result.stderr


def test_malformed_mapping_yaml_points_at_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 1\nname: x\nmodel: optical_flow\nconfig: {a: 1}\nrules:\n  - {source: a, target: [b}\n")
    result = run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o",
                 tmp_path / "o.safetensors", "--mapping", bad)
    assert result.exit_code == 3
    assert f"{bad}:6: malformed YAML" in result.stderr


def test_mapping_file_with_unknown_op(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 1\nname: x\nmodel: optical_flow\nconfig: {a: 1}\nrules:\n"
                   "  - {source: a, target: b, ops: [transpose]}\n")
    result = run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o",
                 tmp_path / "o.safetensors", "--mapping", bad)
    assert result.exit_code == 3
    assert "bad.yaml:6: rules[0].ops[0]: unknown op 'transpose'" in result.stderr


def test_missing_output_folder_is_a_usage_error(tmp_path):
    result = run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o",
                 tmp_path / "nowhere" / "o.safetensors")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_unwritable_output_folder_is_a_usage_error(tmp_path, monkeypatch):
    # Running as root ignores permission bits, so simulate the refusal.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    result = run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2
    assert "no write permission" in result.output


def test_unknown_output_suffix_is_a_usage_error(tmp_path):
    result = run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o", tmp_path / "o.bin")
    assert result.exit_code == 2
    assert "*.safetensors" in result.output


def test_unsafe_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(b"\x80\x03cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    result = run_cli("convert", path, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 3
    assert "os.system" in result.stderr


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch, suffix):
    out = tmp_path / f"model.{suffix}"
    out.write_bytes(b"previous content")
    calls = {"n": 0}
    real = outputs_module._tensor_bytes

    def explode_midway(tensor):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("interrupted")
        return real(tensor)

    monkeypatch.setattr(outputs_module, "_tensor_bytes", explode_midway)
    if suffix == "pt":
        def explode(*args, **kwargs):
            raise KeyboardInterrupt("interrupted")

        monkeypatch.setattr(outputs_module.torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(GOLDEN / "language_perceiver" / "checkpoint.pickle", out)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# --------------------------------------------------------------------------------------
# Two runs writing one new output at once: both pass the up-front check (no file yet);
# without --force the one that finishes second must not replace the other's file.


def _appears_while_writing(monkeypatch, module, content: bytes) -> None:
    """``module``'s atomic_write, with another run's file put at the target after the
    data is written and before it is published (after every up-front check)."""
    real = module.atomic_write

    @contextlib.contextmanager
    def racing(path, **options):
        with real(path, **options) as handle:
            yield handle
            Path(path).write_bytes(content)

    monkeypatch.setattr(module, "atomic_write", racing)


def _assert_lost_the_race(result, out: Path, content: bytes) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"refusing to overwrite {out}" in line
    assert "appeared while" in line and "--force" in line
    assert out.read_bytes() == content
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_convert_keeps_an_output_that_appears_while_writing(tmp_path, monkeypatch, suffix):
    source = GOLDEN / "optical_flow" / "checkpoint.pickle"
    out = tmp_path / f"model.{suffix}"
    other = b"the other run's conversion"
    _appears_while_writing(monkeypatch, outputs_module, other)
    _assert_lost_the_race(run_cli("convert", source, "-o", out), out, other)
    out.unlink()  # the Python API: the same check at publication
    with pytest.raises(converter.OutputError, match="appeared while.*overwrite=True"):
        converter.convert(source, out, overwrite=False)
    assert out.read_bytes() == other
    # --force: the last writer replaces it, as asked.
    result = run_cli("convert", source, "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert perceiver_torch.read_checkpoint(out)[1]["model"] == "optical_flow"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_export_keeps_an_output_that_appears_while_writing(tmp_path, monkeypatch):
    converted = tmp_path / "model.safetensors"
    assert run_cli("convert", GOLDEN / "optical_flow" / "checkpoint.pickle", "-o",
                   converted).exit_code == 0
    out = tmp_path / "exported.pickle"
    other = b"the other run's export"
    _appears_while_writing(monkeypatch, writer_module, other)
    _assert_lost_the_race(run_cli("export", converted, "-o", out), out, other)
    result = run_cli("export", converted, "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert load_haiku_checkpoint(out).sha256 != hashlib.sha256(other).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, converted.name]


def test_python_api_checks_the_output_folder_before_any_work(tmp_path, monkeypatch):
    """converter.convert/export with out in a missing folder failed after reading,
    converting and (verify=True) running the JAX reference, as a plain ConverterError
    (the CLI's exit 3); now an OutputError (exit 2) before the checkpoint is read."""
    from converter import conversion, exporter
    from converter.errors import OutputError

    source = tmp_path / "fixture.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=1)
    converted = converter.convert(source, tmp_path / "conv.safetensors").output

    def no_reading(*args, **kwargs):
        raise AssertionError("read before the output was checked")

    monkeypatch.setattr(conversion, "load_haiku_checkpoint", no_reading)
    monkeypatch.setattr(exporter, "converted_to_haiku", no_reading)
    missing = tmp_path / "missing"
    with pytest.raises(OutputError, match=r"the folder .*missing does not exist"):
        converter.convert(source, missing / "x.safetensors", verify=True)
    with pytest.raises(OutputError, match=r"the folder .*missing does not exist"):
        converter.export(converted, missing / "x.pickle")
    assert not missing.exists()


def test_detection_reports_the_closest_models_own_problem(tmp_path):
    """Without --model, a bad override of the closest model, or a missing tensor that
    a derivation reads, was reported as "the parameter names match none of the
    official models": the real problem is reported now."""
    from converter.config_fixtures import HF_TINY_CONFIGS, write_config_fixture
    from converter.errors import ConfigError, MappingError

    learned = tmp_path / "learned.pickle"  # an image size no shape reveals
    write_config_fixture("imagenet_learned", learned, HF_TINY_CONFIGS["imagenet_learned"])
    size = HF_TINY_CONFIGS["imagenet_learned"]["image_size"]
    assert converter.convert(learned, None, config={"image_size": size}).model == \
        "imagenet_learned"
    for bad, key in (({"num_blocks": 0}, "'num_blocks' must be an integer >= 1"),
                     ({"num_self_attention_heads": 3}, "num_self_attention_heads=3")):
        with pytest.raises(ConfigError, match=key):
            converter.convert(learned, None, config={"image_size": size, **bad})

    source = tmp_path / "conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=2)
    checkpoint = load_haiku_checkpoint(source)
    del checkpoint.params["classification_decoder/~/basic_decoder/output"]["b"]
    missing = tmp_path / "missing.pickle"
    save_haiku_checkpoint(missing, checkpoint.params, checkpoint.state)
    with pytest.raises(MappingError) as refused:
        converter.convert(missing, None)
    assert "closest model is imagenet_conv (100% of the tensor names are its)" in str(
        refused.value)
    assert "no tensor 'classification_decoder/~/basic_decoder/output/b'" in str(refused.value)
    # imagenet_conv's mapping knows every name of imagenet_fourier's too: the names
    # the checkpoint lacks tell the two apart.
    source = tmp_path / "fourier.pickle"
    write_fixture("imagenet_fourier", source, size="tiny", seed=2)
    checkpoint = load_haiku_checkpoint(source)
    del checkpoint.params["classification_decoder/~/basic_decoder/output"]["b"]
    save_haiku_checkpoint(missing, checkpoint.params, checkpoint.state)
    with pytest.raises(MappingError, match="closest model is imagenet_fourier "):
        converter.convert(missing, None)


def test_python_api_refuses_extra_metadata_that_would_corrupt_the_file(tmp_path):
    """extra_metadata replaced the converter's own entries: {"dtype": "bfloat16"}
    made a float32 conversion load as bfloat16, {"model": ...} a file that does not
    load, {"source_sha256": ...} false provenance; a non-str value failed deep in
    the writer ("'int' object has no attribute 'encode'")."""
    source = GOLDEN / "imagenet_conv" / "checkpoint.pickle"
    out = tmp_path / "out.safetensors"
    for extra, message in (
        ({"dtype": "bfloat16"}, "may not set 'dtype'"),
        ({"model": "optical_flow"}, "may not set 'model'"),
        ({"source_sha256": "0" * 64}, "may not set 'source_sha256'"),
        ({"note": 1}, "must be str to str"),
        ({1: "x"}, "must be str to str"),
        ([("note", "x")], "must be a mapping"),
    ):
        for target in (out, None):
            with pytest.raises(converter.UsageError, match=message):
                converter.convert(source, target, extra_metadata=extra)
        assert not out.exists()
    converter.convert(source, out, extra_metadata={"note": "kept"})
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["note"] == "kept" and metadata["dtype"] == "float32"
    assert next(perceiver_torch.load(out).parameters()).dtype == torch.float32
