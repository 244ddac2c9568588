"""The writer: byte identity with the golden files, round trips, atomic output."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import pickle
import sys
import pickletools
from pathlib import Path

import numpy as np
import pytest

import converter.haiku_writer as writer_module
from converter import ConverterError, load_haiku_checkpoint, save_haiku_checkpoint
from converter.atomic import atomic_write
from converter.errors import OutputError
from converter.fixtures import make_fixture
from converter.haiku_reader import ALLOWED_GLOBALS, scan_pickle
from converter.registry import describe, official_tree
from helpers import assert_same_tree

PROTOCOLS = (2, 3, 4, 5)
CONTAINERS = ("flatmapping", "dict")


@functools.lru_cache(maxsize=None)
def tiny_fixture(name: str):
    return make_fixture(name, "tiny", seed=3)


# --------------------------------------------------------------------------------------
# Byte identity with the golden files


def test_rewriting_golden_file_is_byte_identical(tmp_path, model_name, golden_path):
    golden = golden_path(model_name)
    checkpoint = load_haiku_checkpoint(golden)
    out = tmp_path / "rewritten.pickle"
    saved = save_haiku_checkpoint(
        out,
        checkpoint.params,
        checkpoint.state if checkpoint.wrapped else None,
        protocol=3,
        container="flatmapping",
    )
    assert out.read_bytes() == golden.read_bytes()
    assert saved.sha256 == checkpoint.sha256
    assert saved.size_bytes == checkpoint.size_bytes
    assert saved.wrapped is checkpoint.wrapped


def _normalized_opcodes(data: bytes) -> list:
    """(opcode, arg) pairs with numpy 2's module spelling mapped to numpy 1's."""
    ops = []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "FRAME":  # frame sizes change with the spelling
            continue
        if isinstance(arg, str):
            arg = arg.replace("numpy._core.", "numpy.core.")
        ops.append((op.name, arg))
    return ops


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_dict_layout_matches_pythons_own_pickler_opcode_for_opcode(tmp_path, protocol):
    # The C pickler with the installed numpy gives the reference stream; it differs
    # from ours only in numpy's module spelling (numpy._core in numpy 2).
    params, state = tiny_fixture("imagenet_conv")
    out = tmp_path / "ours.pickle"
    save_haiku_checkpoint(out, params, state, protocol=protocol, container="dict")
    # The writer interns names (equal names are written once, as in the official
    # files); give Python's pickler the same interned strings.
    def interned(tree):
        return {
            sys.intern(m): {sys.intern(n): a for n, a in entries.items()}
            for m, entries in tree.items()
        }

    reference = pickle.dumps(
        {"params": interned(params), "state": interned(state)}, protocol=protocol
    )
    assert _normalized_opcodes(out.read_bytes()) == _normalized_opcodes(reference)


# --------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_trip_tiny_fixtures(tmp_path, model_name, protocol, container):
    params, state = tiny_fixture(model_name)
    out = tmp_path / f"{model_name}.pickle"
    saved = save_haiku_checkpoint(
        out, params, state, protocol=protocol, container=container
    )
    checkpoint = load_haiku_checkpoint(out)

    assert checkpoint.protocol == protocol
    assert checkpoint.wrapped is (state is not None)
    assert_same_tree(checkpoint.params, params)
    assert_same_tree(checkpoint.state, state or {})
    tree = official_tree(model_name, "tiny")
    assert describe(checkpoint.params) == tree.params
    kind = "FlatMapping" if container == "flatmapping" else "dict"
    expected = ("dict", kind) if state is not None else (kind,)
    assert checkpoint.containers == tuple(dict.fromkeys(expected))
    assert saved.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert saved.size_bytes == out.stat().st_size

    # Only official globals, spelled the numpy 1.x way, whatever numpy is installed.
    scan = scan_pickle(out)
    assert scan.safe
    names = set(scan.global_names)
    assert names <= ALLOWED_GLOBALS
    assert "numpy.core.multiarray._reconstruct" in names
    assert ("haiku._src.data_structures.FlatMapping" in names) is (
        container == "flatmapping"
    )
    assert ("_codecs.encode" in names) is (protocol == 2)
    expected_opcode = "STACK_GLOBAL" if protocol >= 4 else "GLOBAL"
    assert {g.opcode for g in scan.globals} == {expected_opcode}


class _TrustedUnpickler(pickle.Unpickler):
    """Test-only reference: the real unpickler, with FlatMapping read as a dict."""

    def find_class(self, module: str, name: str):
        if module == "haiku._src.data_structures":
            return lambda mapping: dict(mapping)
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_real_unpickler_reads_the_same_arrays(tmp_path, protocol):
    params, state = tiny_fixture("imagenet_conv")
    out = tmp_path / "c.pickle"
    save_haiku_checkpoint(out, params, state, protocol=protocol)
    with open(out, "rb") as handle:
        loaded = _TrustedUnpickler(handle).load()
    assert set(loaded) == {"params", "state"}
    assert_same_tree(loaded["params"], params)
    assert_same_tree(loaded["state"], state)


def test_inputs_are_normalized_to_c_order_little_endian(tmp_path):
    rng = np.random.default_rng(0)
    fortran = np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32))
    big = rng.standard_normal(5).astype(">f4")
    params = {
        "m": {
            "f": fortran,
            "big": big,
            "scalar": np.float32(2.5),
            "big_scalar": np.array(7, ">i4"),  # e.g. BatchNorm's counter, byte-swapped
            "empty": np.zeros((0, 2), np.float32),
            "i8": np.arange(3, dtype=np.int64),
            "bool": np.array([True, False]),
        }
    }
    for protocol in PROTOCOLS:
        out = tmp_path / f"n{protocol}.pickle"
        save_haiku_checkpoint(out, params, protocol=protocol)
        got = load_haiku_checkpoint(out).params["m"]
        np.testing.assert_array_equal(got["f"], fortran)
        np.testing.assert_array_equal(got["big"], big)
        assert got["big"].dtype == np.dtype("<f4")
        assert got["scalar"].shape == () and got["scalar"] == np.float32(2.5)
        assert got["big_scalar"].shape == () and got["big_scalar"] == 7
        assert got["big_scalar"].dtype == np.dtype("<i4")
        assert got["empty"].shape == (0, 2)
        assert got["i8"].dtype == np.int64 and got["bool"].dtype == np.bool_
        assert set(scan_pickle(out).global_names) <= ALLOWED_GLOBALS


@pytest.mark.full
@pytest.mark.parametrize("name", ["video_autoencoding", "optical_flow"])
@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_round_trip_full_size(tmp_path, name, protocol):
    params, state = make_fixture(name, "full", seed=1)
    out = tmp_path / f"{name}.pickle"
    save_haiku_checkpoint(out, params, state, protocol=protocol)
    checkpoint = load_haiku_checkpoint(out)
    assert_same_tree(checkpoint.params, params)
    assert describe(checkpoint.params) == official_tree(name, "full").params
    assert checkpoint.num_params() == official_tree(name, "full").num_params()


# --------------------------------------------------------------------------------------
# Input validation: nothing is written when the input is wrong


ARRAY = np.ones((2, 2), np.float32)


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({1: {"w": ARRAY}}, TypeError, "params has a key of type int"),
        ({"m": {("w",): ARRAY}}, TypeError, "params['m'] has a key of type tuple"),
        ({"m": ARRAY}, TypeError, "params['m'] is a ndarray, expected a mapping"),
        ([("m", {"w": ARRAY})], TypeError, "params is a list, expected a mapping"),
        ({"m": {"w": [1.0, 2.0]}}, TypeError, "params['m']['w'] is a list"),
        ({"m": {"w": np.array(["a"])}}, ValueError, "dtype <U1"),
        ({"m": {"w": np.array([object()])}}, ValueError, "dtype object"),
        ({"m": {"w": np.ones(2, np.complex64)}}, ValueError, "complex64"),
    ],
)
def test_invalid_inputs(tmp_path, params, error, message):
    out = tmp_path / "x.pickle"
    with pytest.raises(error) as info:
        save_haiku_checkpoint(out, params)
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_invalid_state_protocol_and_container(tmp_path):
    out = tmp_path / "x.pickle"
    with pytest.raises(TypeError, match=r"state\['s'\]\['c'\] is a int"):
        save_haiku_checkpoint(out, {"m": {"w": ARRAY}}, {"s": {"c": 3}})
    with pytest.raises(ValueError, match="protocol must be one of"):
        save_haiku_checkpoint(out, {"m": {"w": ARRAY}}, protocol=1)
    with pytest.raises(ValueError, match="container must be one of"):
        save_haiku_checkpoint(out, {"m": {"w": ARRAY}}, container="FlatMap")
    assert list(tmp_path.iterdir()) == []


def test_torch_tensor_gets_a_hint(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"\.detach\(\)\.cpu\(\)\.numpy\(\)"):
        save_haiku_checkpoint(tmp_path / "x.pickle", {"m": {"w": torch.ones(2)}})


# --------------------------------------------------------------------------------------
# Atomic output


def test_failure_midway_leaves_no_partial_file_and_target_untouched(
    tmp_path, monkeypatch
):
    params, _ = tiny_fixture("optical_flow")
    out = tmp_path / "weights.pickle"
    out.write_bytes(b"previous contents")
    calls = {"n": 0}
    original = writer_module._HaikuPickler.reducer_override

    def exploding(self, obj):
        if isinstance(obj, np.ndarray):
            calls["n"] += 1
            if calls["n"] == 20:  # well after the first bytes reached the file
                raise RuntimeError("disk on fire")
        return original(self, obj)

    monkeypatch.setattr(writer_module._HaikuPickler, "reducer_override", exploding)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_haiku_checkpoint(out, params)
    assert calls["n"] == 20
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pickle"]


def test_failure_of_the_rename_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "w.pickle"

    def no_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(ConverterError, match="No space left on device"):
        save_haiku_checkpoint(out, {"m": {"w": ARRAY}})
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_and_folder_as_target(tmp_path):
    with pytest.raises(ConverterError, match=r"does not exist; create it first"):
        save_haiku_checkpoint(
            tmp_path / "no" / "such" / "x.pickle", {"m": {"w": ARRAY}}
        )
    with pytest.raises(ConverterError, match="is a folder"):
        save_haiku_checkpoint(tmp_path, {"m": {"w": ARRAY}})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # Root ignores permission bits, so the refusal is also simulated for it.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    with pytest.raises(ConverterError, match="no write permission"):
        save_haiku_checkpoint(locked / "x.pickle", {"m": {"w": ARRAY}})
    assert list(locked.iterdir()) == []


def test_atomic_write_replaces_and_respects_umask(tmp_path):
    out = tmp_path / "f.bin"
    out.write_bytes(b"old")
    with atomic_write(out) as handle:
        handle.write(b"new contents")
        assert out.read_bytes() == b"old"  # not visible until the block succeeds
    assert out.read_bytes() == b"new contents"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("hard_links", [True, False], ids=["link", "no-hard-links"])
def test_atomic_write_without_overwrite_keeps_a_file_that_appeared(
    tmp_path, monkeypatch, hard_links
):
    """Two runs writing one new name both pass the up-front check; the one that
    finishes second refuses (no silent "last rename wins"), also where the filesystem
    has no hard links (FAT, some network mounts)."""
    if not hard_links:
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", refuse)
    out = tmp_path / "f.bin"
    with pytest.raises(OutputError) as caught:
        with atomic_write(out, overwrite=False) as handle:
            handle.write(b"the loser's bytes")
            out.write_bytes(b"the winner's bytes")  # published by the other run
    message = str(caught.value)
    assert "\n" not in message and str(out) in message
    assert "appeared while" in message and "--force" in message
    assert out.read_bytes() == b"the winner's bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no .f.bin.*.tmp left
    # Without a race the file appears whole, with open()'s permissions.
    fresh = tmp_path / "g.bin"
    with atomic_write(fresh, overwrite=False) as handle:
        handle.write(b"new")
    assert fresh.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    # With overwrite (--force) the last writer replaces it.
    with atomic_write(out, overwrite=True) as handle:
        handle.write(b"forced")
        out.write_bytes(b"the winner's bytes")
    assert out.read_bytes() == b"forced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "g.bin"]


def test_save_haiku_checkpoint_without_overwrite_refuses_an_existing_file(tmp_path):
    out = tmp_path / "x.pickle"
    out.write_bytes(b"kept")
    with pytest.raises(OutputError, match="--force"):
        save_haiku_checkpoint(out, {"m": {"w": ARRAY}}, overwrite=False)
    assert out.read_bytes() == b"kept"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pickle"]


def test_writer_refuses_to_emit_any_other_global(tmp_path):
    with open(tmp_path / "x.pickle", "wb") as handle:
        pickler = writer_module._HaikuPickler(handle, 3)
        with pytest.raises(TypeError, match="only emits the official globals"):
            pickler.dump({"m": {"w": print}})


def test_save_without_overwrite_refuses_an_existing_file_up_front(tmp_path, monkeypatch):
    """save_haiku_checkpoint(..., overwrite=False) over an existing file pickled the
    whole checkpoint first and then refused it with "the file appeared while this
    output was being written (another run?)", which it had not."""
    out = tmp_path / "existing.pickle"
    out.write_bytes(b"keep me")
    pickled = []
    original = writer_module._HaikuPickler.dump

    def dump(self, obj):
        pickled.append(True)
        return original(self, obj)

    monkeypatch.setattr(writer_module._HaikuPickler, "dump", dump)
    params = {"linear": {"w": np.zeros((2, 3), np.float32)}}
    with pytest.raises(OutputError, match="the file exists") as caught:
        save_haiku_checkpoint(out, params, overwrite=False)
    assert "appeared" not in str(caught.value)
    assert not pickled and out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["existing.pickle"]
    save_haiku_checkpoint(out, params)  # overwrite=True (the default) replaces it
    assert load_haiku_checkpoint(out).params["linear"]["w"].shape == (2, 3)


def test_write_fixture_without_overwrite_refuses_an_existing_file_before_the_weights(
    tmp_path, monkeypatch
):
    """write_fixture(..., overwrite=False) (``perceiver-convert fixture`` without
    --force) generated every weight (up to 800 MB for the official sizes) before
    save_haiku_checkpoint's up-front check refused the existing file."""
    import converter.fixtures as fixtures_module

    out = tmp_path / "existing.pickle"
    out.write_bytes(b"keep me")
    made = []
    original = fixtures_module.make_fixture

    def make_fixture(*args, **kwargs):
        made.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(fixtures_module, "make_fixture", make_fixture)
    with pytest.raises(OutputError, match="the file exists"):
        fixtures_module.write_fixture("imagenet_fourier", out, overwrite=False)
    assert not made and out.read_bytes() == b"keep me"
    fixtures_module.write_fixture("imagenet_fourier", out)  # overwrite=True replaces it
    assert made and out.read_bytes() != b"keep me"
