"""``perceiver-convert inspect`` on good, unsafe and broken files."""

from __future__ import annotations

import json
import pickle
import struct

import pytest

from converter.fixtures import write_fixture
from converter.registry import official_tree
from helpers import run_cli


def malicious(tmp_path):
    sentinel = tmp_path / "PWNED"
    command = f"touch {sentinel}".encode()
    body = b"cposix\nsystem\n" + b"X" + struct.pack("<I", len(command)) + command
    path = tmp_path / "evil.pickle"
    path.write_bytes(b"\x80\x03" + body + b"\x85R.")
    return path, sentinel


@pytest.fixture
def conv_fixture(tmp_path):
    path = tmp_path / "conv.pickle"
    write_fixture("imagenet_conv", path, size="tiny", seed=2)
    return path


def test_inspect_text_report(conv_fixture):
    result = run_cli("inspect", str(conv_fixture))
    assert result.exit_code == 0, result.output
    out = result.stdout
    tree = official_tree("imagenet_conv", "tiny")
    assert str(conv_fixture) in out
    assert "protocol    3" in out
    assert "containers  dict, FlatMapping" in out
    assert "{'params': ..., 'state': ...} wrapper" in out
    assert "all on the allow-list" in out
    assert "numpy.core.multiarray._reconstruct" in out
    assert f"{tree.num_params():,} values" in out
    assert f"total: 81 arrays, {tree.num_params(include_state=True):,} values" in out
    # One row per array with its shape and dtype.
    ema = "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/counter"
    row = next(line for line in out.splitlines() if ema in line)
    assert "[]" in row and "int32" in row
    conv = next(
        line for line in out.splitlines() if "conv2_d_downsample/~/conv/w" in line
    )
    assert "[7, 7, 3, 64]" in conv and "float32" in conv and "37,632" in conv


def test_inspect_json_report(conv_fixture):
    result = run_cli("inspect", "--json", str(conv_fixture))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    tree = official_tree("imagenet_conv", "tiny")
    assert document["ok"] is True and document["safe"] is True
    assert document["protocol"] == 3
    assert document["wrapped"] is True
    assert document["containers"] == ["dict", "FlatMapping"]
    assert all(g["allowed"] for g in document["globals"])
    assert document["params"]["values"] == tree.num_params()
    assert document["params"]["arrays"] == sum(len(p) for p in tree.params.values())
    assert document["state"]["arrays"] == 6
    assert document["total"]["bytes"] == tree.nbytes(include_state=True)
    entry = next(e for e in document["params"]["entries"] if e["param"] == "w")
    assert set(entry) == {"module", "param", "shape", "dtype", "values", "bytes", "nonfinite"}
    assert entry["nonfinite"] == 0
    shapes = {
        (e["module"], e["param"]): tuple(e["shape"])
        for e in document["params"]["entries"]
    }
    assert shapes == {
        (m, p): spec[0] for m, group in tree.params.items() for p, spec in group.items()
    }
    assert document["size_bytes"] == conv_fixture.stat().st_size


def test_inspect_golden_unwrapped(golden_path):
    result = run_cli("inspect", str(golden_path("language_perceiver")))
    assert result.exit_code == 0
    assert "params only (no wrapper)" in result.stdout
    assert "\nstate:" not in result.stdout


def test_inspect_malicious_file(tmp_path):
    path, sentinel = malicious(tmp_path)
    result = run_cli("inspect", str(path))
    assert result.exit_code == 3
    assert "refused to load" in result.stderr and "'posix.system'" in result.stderr
    assert "posix.system  [GLOBAL, NOT ALLOWED]" in result.stdout
    assert "safe        NO" in result.stdout
    assert "Traceback" not in result.output
    assert not sentinel.exists()

    result = run_cli("inspect", "--json", str(path))
    assert result.exit_code == 3
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["safe"] is False
    assert document["error_type"] == "UnsafeCheckpointError"
    assert document["globals"] == [
        {"name": "posix.system", "allowed": False, "opcode": "GLOBAL", "offset": 2}
    ]
    assert not sentinel.exists()


def test_inspect_lists_allowed_and_forbidden_globals_of_a_mixed_file(
    tmp_path, golden_path
):
    # A real checkpoint with an extra payload global after its arrays.
    data = golden_path("optical_flow").read_bytes()[:-1]  # drop STOP
    data += b"0cbuiltins\neval\n."  # POP the tree, push builtins.eval, STOP
    path = tmp_path / "mixed.pickle"
    path.write_bytes(data)
    result = run_cli("inspect", "--json", str(path))
    assert result.exit_code == 3
    names = {g["name"]: g["allowed"] for g in json.loads(result.stdout)["globals"]}
    assert names["builtins.eval"] is False
    assert names["numpy.ndarray"] is True


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"\x80\x03}q\x00(X\x01\x00\x00\x00m", "truncated"),
        (b"PK\x03\x04" + bytes(40), "zip archive"),
        (pickle.dumps([1, 2, 3]), "top level is a list"),
    ],
)
def test_inspect_broken_files(tmp_path, data, message):
    path = tmp_path / "broken.pickle"
    path.write_bytes(data)
    for extra in ([], ["--json"]):
        result = run_cli("inspect", *extra, str(path))
        assert result.exit_code == 3
        assert result.stderr.startswith("error: ")
        assert message in result.stderr
        assert "Traceback" not in result.output
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["error_type"] == "CheckpointError"
    # the error document every command shares: {"ok", "error": {"type", "message"}, "exit_code"}
    assert document["error"]["type"] == "CheckpointError"
    assert message in document["error"]["message"]
    assert document["exit_code"] == 3



def test_inspect_labels_another_transformers_models_folder_and_exits_3(tmp_path):
    """A transformers folder of another model (a BERT: config.json beside its
    weights) was described as a HuggingFace Perceiver folder with a "problem" line,
    exit 0, where the same weights without the config.json are another project's
    file (exit 3, as `inspect --help` says)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32}))
    rng = np.random.default_rng(0)
    save_file({"embeddings.word_embeddings.weight": rng.random((10, 4), np.float32),
               "encoder.layer.0.output.dense.bias": rng.random(4, np.float32)},
              str(folder / "model.safetensors"))
    for path in (folder, folder / "model.safetensors"):
        result = run_cli("inspect", path)
        assert result.exit_code == 3, result.output
        assert result.stdout.startswith(f"{path}  (another project's safetensors file)\n")
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: {path}: config.json names architecture(s) "
                               '"BertModel"; this converter reads Perceiver'), line
        document = json.loads(run_cli("inspect", "--json", path).stdout)
        assert document["kind"] == "other" and document["exit_code"] == 3
    # Either half of the config suffices: a model_type without architectures (the
    # advice was "add the folder's config.json"), architectures without a model_type
    # (exit 0 with a "problem" line).
    for config, words in (({"model_type": "bert"}, 'config.json is of model_type "bert"'),
                          ({"architectures": ["Foo"]}, 'names architecture(s) "Foo"')):
        (folder / "config.json").write_text(json.dumps(config))
        for command in ("inspect", "convert"):
            args = ("-o", tmp_path / "x.safetensors") if command == "convert" else ()
            result = run_cli(command, folder, *args)
            assert result.exit_code == 3, (config, result.output)
            assert words in result.stderr and "add the folder's config.json" not in \
                result.stderr, result.stderr


def test_inspect_shows_reduced_precision_tensors_as_the_file_stores_them(tmp_path):
    """Transformers-format and other projects' files are read as float32 copies;
    inspect listed those copies: float16 and bfloat16 tensors as float32, with twice
    their bytes."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "half.safetensors"
    save_file({"a": torch.randn(2, 3).half(), "b": torch.randn(4).bfloat16(),
               "c": torch.randn(5, dtype=torch.float64), "d": torch.arange(3)}, str(path))
    document = json.loads(run_cli("inspect", "--json", path).stdout)
    rows = {row["name"]: (row["dtype"], row["bytes"]) for row in document["tensors"]}
    assert rows == {"a": ("float16", 12), "b": ("bfloat16", 8), "c": ("float64", 40),
                    "d": ("int64", 24)}
    assert document["totals"]["bytes"] == 84

def test_inspect_labels_another_projects_safetensors_and_exits_3(tmp_path):
    """A safetensors (or torch.save) file of some other project is neither a
    converted file nor a HuggingFace Perceiver checkpoint: inspect lists its tensors
    under that label and exits 3, as for any file that is not a checkpoint it
    knows; one error line, nothing written."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.int64)}, str(other),
              metadata={"foo": "bar"})
    state = tmp_path / "state.bin"
    torch.save({"encoder.w": torch.zeros(2)}, state)
    before = sorted(p.name for p in tmp_path.iterdir())
    for path, what in ((other, "safetensors"), (state, "torch.save")):
        result = run_cli("inspect", str(path))
        assert result.exit_code == 3, result.output
        assert result.stdout.startswith(f"{path}  (another project's {what} file)\n")
        assert "huggingface" not in result.stdout and "problem" not in result.stdout
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: {path}: another project's {what} file")
        assert "Traceback" not in result.output
        result = run_cli("inspect", "--json", str(path))
        assert result.exit_code == 3
        document = json.loads(result.stdout)
        assert document["kind"] == "other" and document["format"] == what
        assert document["ok"] is False and document["exit_code"] == 3
    assert [row["name"] for row in document["tensors"]] == ["encoder.w"]
    document = json.loads(run_cli("inspect", "--json", str(other)).stdout)
    assert document["metadata"] == {"foo": "bar"}
    assert [(r["name"], r["shape"]) for r in document["tensors"]] == [("a", [2, 3]), ("b", [4])]
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    # transformers' Perceiver names, incomplete: still described as a HuggingFace file.
    partial = tmp_path / "partial.safetensors"
    save_file({"perceiver.embeddings.latents": np.zeros((4, 8), np.float32)}, str(partial))
    result = run_cli("inspect", "--json", str(partial))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["kind"] == "huggingface" and document["problem"]

def test_inspect_missing_path_is_a_usage_error(tmp_path):
    result = run_cli("inspect", str(tmp_path / "nope.pickle"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


@pytest.mark.parametrize(
    "name, make, kind",
    [
        ("a.npy", lambda np, path: np.save(path, np.arange(3.0)), "a numpy .npy file"),
        ("b.npz", lambda np, path: np.savez(path, x=np.arange(3.0)), "a zip archive"),
        ("empty.pickle", lambda np, path: path.write_bytes(b""), "empty (0 bytes)"),
    ],
)
def test_inspect_does_not_scan_a_file_its_first_bytes_name(tmp_path, name, make, kind):
    """A file the reader names from its first bytes (not a pickle) gets no opcode
    scan: its bytes read as opcodes would list made-up globals (the .npy magic as
    STACK_GLOBAL) or a corrupt opcode stream."""
    import numpy as np

    path = tmp_path / name
    make(np, path)
    result = run_cli("inspect", str(path))
    assert result.exit_code == 3, result.output
    assert kind in result.stderr and len(result.stderr.splitlines()) == 1
    assert result.stdout == f"{path}\n  file        {result.stdout.split('file        ')[1]}"
    assert kind in result.stdout and "not scanned" in result.stdout
    for noise in ("STACK_GLOBAL", "NOT ALLOWED", "opcode", "protocol", "scan "):
        assert noise not in result.stdout, noise
    document = json.loads(run_cli("inspect", "--json", str(path)).stdout)
    assert document["ok"] is False and document["exit_code"] == 3
    assert kind in document["not_a_pickle"]
    assert document["globals"] == [] and document["problems"] == []
    assert document["scan_error"] is None and document["protocol"] is None


@pytest.mark.parametrize("name", ["conv.pickle", "conv.pystate", "conv_backup"])
def test_inspect_describes_a_renamed_converted_file(conv_fixture, tmp_path, name):
    """load, run, export and verify read a converted file by its first bytes, whatever
    its name; inspect describes it too, instead of refusing it as a pickle."""
    converted = tmp_path / "conv.safetensors"
    assert run_cli("convert", str(conv_fixture), "-o", str(converted)).exit_code == 0
    renamed = tmp_path / name
    renamed.write_bytes(converted.read_bytes())
    result = run_cli("inspect", str(renamed), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["kind"] == "converted"
    assert document["format"] == "safetensors"


def test_inspect_describes_a_renamed_pt_file(conv_fixture, tmp_path):
    converted = tmp_path / "conv.pt"
    assert run_cli("convert", str(conv_fixture), "-o", str(converted)).exit_code == 0
    renamed = tmp_path / "conv.pickle"
    renamed.write_bytes(converted.read_bytes())
    result = run_cli("inspect", str(renamed), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "pt"
