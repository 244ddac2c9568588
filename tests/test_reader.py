"""The allow-list reader on official files, real numpy pickles and broken input."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converter import CheckpointError, HaikuCheckpoint, load_haiku_checkpoint
from converter.haiku_reader import ALLOWED_GLOBALS, scan_pickle
from converter.registry import describe, official_tree
from converter.haiku_writer import save_haiku_checkpoint

OFFICIAL_GLOBALS = (
    "haiku._src.data_structures.FlatMapping",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)


def write(tmp_path: Path, data: bytes, name: str = "file.pickle") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path) -> CheckpointError:
    """Load ``path`` expecting our CheckpointError (never an exception of pickle's)."""
    with pytest.raises(CheckpointError) as info:
        load_haiku_checkpoint(path)
    assert str(path) in str(info.value), "the message must name the file"
    return info.value


# --------------------------------------------------------------------------------------
# The golden files


def test_golden_checkpoint_details(model_name, golden_path):
    path = golden_path(model_name)
    checkpoint = load_haiku_checkpoint(path)
    tree = official_tree(model_name, "tiny")

    assert isinstance(checkpoint, HaikuCheckpoint)
    assert checkpoint.path == path
    assert checkpoint.protocol == 3
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint.size_bytes == path.stat().st_size
    assert checkpoint.globals == OFFICIAL_GLOBALS
    assert set(checkpoint.globals) <= ALLOWED_GLOBALS
    assert checkpoint.wrapped is tree.wrapped
    if tree.wrapped:
        assert checkpoint.containers == ("dict", "FlatMapping")
    else:
        assert checkpoint.containers == ("FlatMapping",)
    # Names, shapes and dtypes are exactly the tiny official tree.
    assert describe(checkpoint.params) == tree.params
    assert describe(checkpoint.state) == tree.state
    assert list(checkpoint.params) == sorted(checkpoint.params)  # file order kept


def test_golden_helpers_count_what_the_tree_says(golden_path):
    checkpoint = load_haiku_checkpoint(golden_path("imagenet_conv"))
    tree = official_tree("imagenet_conv", "tiny")
    assert checkpoint.num_params() == tree.num_params() == 127932
    assert checkpoint.num_params(include_state=True) == tree.num_params(True)
    assert checkpoint.nbytes() == tree.nbytes()
    assert checkpoint.num_arrays() == sum(len(p) for p in tree.params.values())
    counter = checkpoint.state[
        "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema"
    ]
    assert counter["counter"].shape == () and counter["counter"].dtype == np.int32
    flat = checkpoint.flat("state")
    assert len(flat) == 6 and all(isinstance(k, tuple) for k in flat)
    collections = {c for c, *_ in checkpoint.iter_arrays()}
    assert collections == {"params", "state"}
    with pytest.raises(ValueError, match="params' or 'state"):
        checkpoint.flat("nope")


def test_arrays_are_writable_native_and_c_ordered(golden_path):
    checkpoint = load_haiku_checkpoint(golden_path("optical_flow"))
    for _, _, _, array in checkpoint.iter_arrays():
        assert array.flags.writeable and array.flags.c_contiguous
        assert array.dtype.isnative
        assert np.isfinite(array).all()


def test_reader_never_imports_jax_or_haiku(golden_path):
    code = (
        "import sys\n"
        "from converter import load_haiku_checkpoint\n"
        f"load_haiku_checkpoint({str(golden_path('imagenet_conv'))!r})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'haiku')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# Files written by real numpy (2.x here) with pickle, any protocol


def numpy_tree() -> dict:
    rng = np.random.default_rng(1)
    return {
        "mod/~/linear": {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
        },
        "other": {
            "counter": np.array(7, np.int32),
            "fortran": np.asfortranarray(rng.standard_normal((2, 3))),
            "big_endian": rng.standard_normal(5).astype(">f4"),
            "scalar": np.float32(3.5),
            "u8": np.arange(3, dtype=np.uint8),
            "flags": np.array([True, False]),
            "half": rng.standard_normal(2).astype(np.float16),
            "empty": np.zeros((0, 3), np.float32),
        },
    }


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_reads_real_numpy_pickles(tmp_path, protocol):
    tree = numpy_tree()
    if protocol < 3:
        # Python spells b'' as builtins.bytes() below protocol 3: not an official
        # global (checkpoints never hold empty arrays), so leave the empty one out.
        del tree["other"]["empty"]
    path = write(tmp_path, pickle.dumps(tree, protocol=protocol))
    checkpoint = load_haiku_checkpoint(path)
    assert checkpoint.protocol == protocol
    assert checkpoint.containers == ("dict",)
    assert not checkpoint.wrapped and checkpoint.state == {}
    for module, params in tree.items():
        for name, expected in params.items():
            got = checkpoint.params[module][name]
            expected = np.asarray(expected)
            assert got.dtype == expected.dtype.newbyteorder("=")
            assert got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
            assert got.flags.c_contiguous and got.dtype.isnative
    if protocol == 5:
        assert "numpy._core.numeric._frombuffer" in checkpoint.globals
    if protocol <= 2:
        assert "_codecs.encode" in checkpoint.globals


def test_wrapper_with_empty_state_and_flatmapping_top(tmp_path):
    params = {"m": {"w": np.ones((2, 2), np.float32)}}
    path = tmp_path / "w.pickle"
    save_haiku_checkpoint(path, params, {}, container="flatmapping")
    checkpoint = load_haiku_checkpoint(path)
    assert checkpoint.wrapped and checkpoint.state == {}
    assert checkpoint.containers == ("dict", "FlatMapping")

    plain = tmp_path / "d.pickle"
    save_haiku_checkpoint(plain, params, None, container="dict", protocol=4)
    checkpoint = load_haiku_checkpoint(plain)
    assert not checkpoint.wrapped and checkpoint.containers == ("dict",)
    assert checkpoint.protocol == 4


def test_an_array_reached_twice_gives_independent_copies(tmp_path):
    shared = np.arange(4, dtype=np.float32)
    path = write(tmp_path, pickle.dumps({"m": {"a": shared, "b": shared}}, protocol=3))
    checkpoint = load_haiku_checkpoint(path)
    a, b = checkpoint.params["m"]["a"], checkpoint.params["m"]["b"]
    np.testing.assert_array_equal(a, b)
    a[0] = 100.0
    assert b[0] == 0.0


# --------------------------------------------------------------------------------------
# Broken files


def test_missing_file_and_folder(tmp_path):
    error = refused(tmp_path / "nope.pickle")
    assert "cannot read" in str(error)
    error = refused(tmp_path)
    # A folder is most likely a HuggingFace one: its importer is named.
    assert "is a folder; pass the checkpoint file" in str(error)
    assert "converter.hf_import.convert_hf" in str(error)
    fifo = tmp_path / "pipe.pickle"
    os.mkfifo(fifo)
    assert "not a regular file" in str(refused(fifo))


def test_empty_file(tmp_path):
    error = refused(write(tmp_path, b""))
    assert "empty" in str(error) and "download it again" in str(error)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.5, 0.999])
def test_truncated_golden_file(tmp_path, golden_path, fraction):
    data = golden_path("imagenet_conv").read_bytes()
    cut = max(1, int(len(data) * fraction))
    error = refused(write(tmp_path, data[:cut]))
    assert type(error) is CheckpointError
    assert "truncated" in str(error)


def test_truncated_by_one_byte_and_trailing_garbage(tmp_path, golden_path):
    data = golden_path("optical_flow").read_bytes()
    assert "truncated" in str(refused(write(tmp_path, data[:-1])))
    error = refused(write(tmp_path, data + b"\x00junk"))
    assert "5 bytes follow the end of the pickle" in str(error)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(tmp_path, seed):
    data = np.random.default_rng(seed).bytes(2000)
    refused(write(tmp_path, data))


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "HTML page"),
        (b"hello, this is a text file\nsecond line\n", "text starting with"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
        (b"\x93NUMPY\x01\x00" + bytes(100), ".npy"),
        (
            b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.",
            "legacy torch.save",
        ),
    ],
)
def test_files_that_are_not_pickles_are_named(tmp_path, data, expected):
    error = refused(write(tmp_path, data))
    assert expected in str(error)


def test_zip_and_gzip_files(tmp_path, golden_path):
    archive = tmp_path / "weights.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("data.pkl", golden_path("optical_flow").read_bytes())
    assert "zip archive" in str(refused(archive))
    packed = write(tmp_path, gzip.compress(golden_path("optical_flow").read_bytes()))
    assert "gunzip" in str(refused(packed))


def test_torch_save_file(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path)
    assert "torch.save" in str(refused(path))


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2, 3], "the top level is a list, expected a mapping"),
        ({"m": {"p": {"x": np.ones(2, np.float32)}}}, "params m/p is a dict"),
        ({"m": {1: np.ones(2, np.float32)}}, "has a key of type int"),
        ({2: {"w": np.ones(2, np.float32)}}, "has a key of type int"),
        ({"m": {"w": "a string"}}, "params m/w is a str, expected a numpy array"),
        ({"m": {"w": 5}}, "params m/w is a int, expected a numpy array"),
        ({"m": [np.ones(2, np.float32)]}, "params module 'm' is a list"),
        ({}, "holds no parameters"),
        ({"params": {}}, "holds no parameters"),  # read as 0 arrays, exit 0
        ({"params": {}, "state": {}}, "holds no parameters"),
        ({"m": {}}, "holds no parameters"),
        (
            {
                "params": {"m": {"w": np.ones(2, np.float32)}},
                "state": {"s": {"c": 1.5}},
            },
            "state s/c is a float",
        ),
    ],
)
def test_wrong_structure(tmp_path, obj, message):
    error = refused(write(tmp_path, pickle.dumps(obj, protocol=3)))
    assert type(error) is CheckpointError
    assert message in str(error)


def test_deeper_tree_is_explained(tmp_path):
    obj = {"m": {"p": {"x": np.ones(2, np.float32)}}}
    error = refused(write(tmp_path, pickle.dumps(obj, protocol=3)))
    assert "deeper than module -> param -> array" in str(error)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_parameter(tmp_path, bad):
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    weights[1, 2] = bad
    path = tmp_path / "nan.pickle"
    save_haiku_checkpoint(path, {"enc/linear": {"w": weights}})
    error = refused(path)
    assert "params enc/linear/w" in str(error)
    assert "non-finite" in str(error) and "[1, 2]" in str(error)


def test_byte_count_mismatching_the_shape(tmp_path):
    path = tmp_path / "bad.pickle"
    save_haiku_checkpoint(path, {"m": {"w": np.ones(4, np.float32)}})
    data = path.read_bytes()
    # The BUILD state begins (MARK, BININT1 1, BININT1 4, TUPLE1): claim 5 elements.
    assert data.count(b"(K\x01K\x04\x85") == 1
    error = refused(
        write(tmp_path, data.replace(b"(K\x01K\x04\x85", b"(K\x01K\x05\x85"))
    )
    assert "needs 20 bytes but holds 16" in str(error)


def test_absurd_lengths_do_not_allocate(tmp_path):
    # BINBYTES8 / BYTEARRAY8 / BINUNICODE8 claiming about 1 EiB, and a FRAME too.
    for opcode in (b"\x8e", b"\x96", b"\x8d", b"\x95"):
        data = b"\x80\x05" + opcode + struct.pack("<Q", 2**60) + b"x" * 16
        error = refused(write(tmp_path, data))
        assert "truncated or corrupt" in str(error) or "exceeds" in str(error)


def test_persistent_ids_and_unregistered_extension_codes(tmp_path):
    error = refused(write(tmp_path, b"\x80\x02X\x01\x00\x00\x00aQ."))
    assert "persistent ids" in str(error)
    error = refused(
        write(tmp_path, b"\x80\x02\x82\xfe.")
    )  # EXT1 254, registered nowhere
    assert "extension code 254" in str(error) and "not registered" in str(error)


def test_unknown_opcode(tmp_path):
    error = refused(write(tmp_path, b"\x80\x03\xff."))
    assert "0xff" in str(error) and "not a pickle opcode" in str(error)


def test_deep_nesting_neither_crashes_nor_recurses(tmp_path):
    depth = 100_000
    # A dict key that is a deeply nested tuple: hashing it recurses in C and can
    # overflow the stack; the reader refuses non-atomic keys before hashing them.
    key = b"\x80\x03}" + b")" + b"\x85" * depth + b"Ns."
    assert "a dict key near byte" in str(refused(write(tmp_path, key)))
    nested = b"\x80\x03" + b"]" * depth + b"a" * (depth - 1) + b"."
    assert "top level is a list" in str(refused(write(tmp_path, nested)))
    marks = b"\x80\x03" + b"(" * depth + b"."
    refused(write(tmp_path, marks))


def test_errors_keep_the_cause_but_are_ours(tmp_path):
    error = refused(write(tmp_path, b"\x80\x03K\x01K\x02."))  # stops with junk on stack
    assert type(error) is CheckpointError
    error = refused(write(tmp_path, b"\x80\x03h\x05."))  # BINGET of an unset memo slot
    assert isinstance(error.__cause__, Exception)
    assert "not a readable pickle" in str(error)


# --------------------------------------------------------------------------------------
# scan_pickle


def test_scan_of_golden_files(model_name, golden_path):
    scan = scan_pickle(golden_path(model_name))
    assert scan.safe and scan.complete and scan.error is None
    assert scan.protocol == 3
    assert scan.global_names == OFFICIAL_GLOBALS
    assert all(g.opcode == "GLOBAL" and g.allowed for g in scan.globals)


def test_scan_resolves_stack_global_through_the_memo(tmp_path):
    path = write(tmp_path, pickle.dumps(numpy_tree(), protocol=4))
    scan = scan_pickle(path)
    assert scan.safe and scan.protocol == 4
    # Each global is named once by STACK_GLOBAL, from module strings that protocol 4
    # memoizes: "numpy" for numpy.dtype comes back through BINGET, and so on. Every
    # later use of a global is a memo read of the object and names nothing new.
    assert scan.global_names == (
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy._core.multiarray.scalar",
    )
    assert all(g.opcode == "STACK_GLOBAL" for g in scan.globals)


def test_scan_of_truncated_file_keeps_what_it_found(tmp_path, golden_path):
    data = golden_path("video_autoencoding").read_bytes()
    scan = scan_pickle(write(tmp_path, data[: len(data) // 2]))
    assert not scan.safe and not scan.complete
    assert "truncated" in scan.error
    assert scan.global_names == OFFICIAL_GLOBALS


def test_scan_names_a_global_outside_the_allow_list(tmp_path):
    # That scanning runs nothing is shown with real payloads in test_malicious_pickles.
    data = pickle.dumps(io.BytesIO)  # any global outside the allow-list
    scan = scan_pickle(write(tmp_path, data))
    assert scan.unsafe_globals == ("_io.BytesIO",) and not scan.safe


# --------------------------------------------------------------------------------------
# Zero-copy reading


def _shared_payload_pickle(tmp_path: Path) -> Path:
    """Two arrays whose BUILD states point at the very same bytes object (via BINGET)."""
    first = np.arange(4096, dtype=np.float32).reshape(64, 64)
    second = np.ones((64, 64), np.float32)
    path = tmp_path / "plain.pickle"
    save_haiku_checkpoint(path, {"m": {"a": first, "b": second}}, container="dict")
    data = path.read_bytes()
    ops = list(pickletools.genops(data))
    payloads = [i for i, (op, _, _) in enumerate(ops) if op.name == "BINBYTES"]
    assert len(payloads) == 2
    first_memo = ops[payloads[0] + 1][1]  # the BINPUT right after the first payload
    start = ops[payloads[1]][2]
    end = ops[payloads[1] + 2][2]  # after the payload and its BINPUT
    shared = tmp_path / "shared.pickle"
    shared.write_bytes(data[:start] + b"h" + bytes([first_memo]) + data[end:])
    return shared


def test_arrays_sharing_file_bytes_are_still_independent(tmp_path):
    checkpoint = load_haiku_checkpoint(_shared_payload_pickle(tmp_path))
    a, b = checkpoint.params["m"]["a"], checkpoint.params["m"]["b"]
    expected = np.arange(4096, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)  # the file says: the same bytes
    a[0, 0] = -1.0
    assert b[0, 0] == 0.0, "editing one parameter must never change another"


def test_large_arrays_are_writable_views_without_a_copy(golden_path):
    checkpoint = load_haiku_checkpoint(golden_path("optical_flow"))
    for module in checkpoint.params.values():
        for array in module.values():
            assert array.flags.writeable and array.flags.c_contiguous
    big = checkpoint.params["image_preprocessor/patches_linear"]["w"]
    assert isinstance(big.base, (np.ndarray, bytearray))
