"""Hostile pickles: each would create a sentinel file if anything from it ran.

Every payload is refused with UnsafeCheckpointError naming the offending global (or
CheckpointError for abuse of an allowed one), and the sentinel never appears.
"""

from __future__ import annotations

import copyreg
import os
import pickle
import shlex
import struct
import subprocess
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

import converter.haiku_writer as writer_module
from converter import CheckpointError, UnsafeCheckpointError, load_haiku_checkpoint
from converter.haiku_reader import _ALLOWED_PAIRS, _CheckedReader, _SafeUnpickler, scan_pickle

# ---- opcode builders (see pickletools for the meaning of each opcode) ----------------


def proto(number: int) -> bytes:
    return pickle.PROTO + bytes([number])


def text(value: str) -> bytes:
    data = value.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def short_text(value: str) -> bytes:
    data = value.encode("utf-8")
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("utf-8")


def stack_global(module: str, name: str) -> bytes:
    return short_text(module) + short_text(name) + pickle.STACK_GLOBAL


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: func and each arg are opcode sequences pushing one object."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def text_list(*items: str) -> bytes:
    return (
        pickle.EMPTY_LIST
        + pickle.MARK
        + b"".join(text(i) for i in items)
        + pickle.APPENDS
    )


def p3(body: bytes) -> bytes:
    return proto(3) + body + pickle.STOP


# ---- payloads ------------------------------------------------------------------------


def shell(sentinel: Path) -> str:
    return f"touch {shlex.quote(str(sentinel))}"


def python(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def getattr_chain(sentinel: Path) -> bytes:
    # getattr(__import__('os'), 'system')('touch ...')
    get_system = call(
        global_("builtins", "getattr"),
        call(global_("builtins", "__import__"), text("os")),
        text("system"),
    )
    return p3(call(get_system, text(shell(sentinel))))


def runpy_script(sentinel: Path) -> bytes:
    script = sentinel.parent / "evil_script.py"
    script.write_text(python(sentinel) + "\n")
    return p3(call(global_("runpy", "run_path"), text(str(script))))


def runpy_module(sentinel: Path) -> bytes:
    return p3(
        call(global_("runpy", "_run_code"), text(python(sentinel)), pickle.EMPTY_DICT)
    )


def inst(sentinel: Path) -> bytes:
    # Protocol 0: MARK, the argument, then INST naming os.system.
    arg = b"S" + repr(shell(sentinel)).encode() + b"\n"
    return pickle.MARK + arg + b"ios\nsystem\n" + pickle.STOP


def obj(sentinel: Path) -> bytes:
    return p3(
        pickle.MARK + global_("os", "system") + text(shell(sentinel)) + pickle.OBJ
    )


def stack_global_payload(sentinel: Path) -> bytes:
    body = call(stack_global("os", "system"), text(shell(sentinel)))
    return proto(4) + body + pickle.STOP


def stack_global_via_memo(sentinel: Path) -> bytes:
    # The module and name come back from the memo, as pickle itself writes them.
    body = (
        short_text("subprocess")
        + pickle.MEMOIZE
        + short_text("check_output")
        + pickle.MEMOIZE
        + pickle.POP
        + pickle.POP
        + pickle.BINGET
        + b"\x00"
        + pickle.BINGET
        + b"\x01"
        + pickle.STACK_GLOBAL
    )
    return proto(4) + call(body, text_list("touch", str(sentinel))) + pickle.STOP


class _Payload:
    """A leaf that the test pickler below turns into ``os.system(cmd)``."""

    def __init__(self, command: str) -> None:
        self.command = command


class _PayloadPickler(writer_module._HaikuPickler):
    """The project's own writer, plus one hostile leaf: valid arrays all around it."""

    def reducer_override(self, obj):
        if isinstance(obj, _Payload):
            return (os.system, (obj.command,))
        return super().reducer_override(obj)

    def save_global(self, obj, name=None):
        if obj is os.system:
            return pickle._Pickler.save_global(self, obj, name)
        return super().save_global(obj, name)


def nested_in_tree(sentinel: Path) -> bytes:
    node = writer_module._FlatMappingNode
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = node(
        {
            "encoder/linear": node({"b": array[0], "w": array}),
            "encoder/~/self_attention/mlp": node(
                {"a": array, "payload": _Payload(shell(sentinel)), "z": array}
            ),
            "zz": node({"w": array}),
        }
    )
    path = sentinel.parent / "tree.pickle"
    with open(path, "wb") as handle:
        _PayloadPickler(handle, 3).dump(tree)
    data = path.read_bytes()
    path.unlink()
    assert b"haiku._src.data_structures" in data and b"posix" in data
    return data


UNSAFE_CASES = [
    # (id, builder, global the error must name)
    (
        "os.system",
        lambda s: p3(call(global_("os", "system"), text(shell(s)))),
        "os.system",
    ),
    (
        "posix.system",
        lambda s: p3(call(global_("posix", "system"), text(shell(s)))),
        "posix.system",
    ),
    (
        "subprocess.Popen",
        lambda s: p3(call(global_("subprocess", "Popen"), text_list("touch", str(s)))),
        "subprocess.Popen",
    ),
    (
        "subprocess.check_output",
        lambda s: p3(
            call(global_("subprocess", "check_output"), text_list("touch", str(s)))
        ),
        "subprocess.check_output",
    ),
    (
        "builtins.eval",
        lambda s: p3(call(global_("builtins", "eval"), text(python(s)))),
        "builtins.eval",
    ),
    (
        "builtins.exec",
        lambda s: p3(call(global_("builtins", "exec"), text(python(s)))),
        "builtins.exec",
    ),
    (
        "__builtin__.eval",
        lambda s: p3(call(global_("__builtin__", "eval"), text(python(s)))),
        "__builtin__.eval",
    ),
    ("getattr chain", getattr_chain, "builtins.getattr"),
    (
        "builtins.__import__",
        lambda s: p3(call(global_("builtins", "__import__"), text("os"))),
        "builtins.__import__",
    ),
    (
        "importlib.import_module",
        lambda s: p3(call(global_("importlib", "import_module"), text("os"))),
        "importlib.import_module",
    ),
    ("runpy.run_path", runpy_script, "runpy.run_path"),
    ("runpy._run_code", runpy_module, "runpy._run_code"),
    ("nested in a valid tree", nested_in_tree, "posix.system"),
    ("INST", inst, "os.system"),
    ("OBJ", obj, "os.system"),
    ("STACK_GLOBAL", stack_global_payload, "os.system"),
    ("STACK_GLOBAL via memo", stack_global_via_memo, "subprocess.check_output"),
    (
        "numpy runstring",
        lambda s: p3(
            call(
                global_("numpy.testing._private.utils", "runstring"),
                text(python(s)),
                pickle.EMPTY_DICT,
            )
        ),
        "numpy.testing._private.utils.runstring",
    ),
    (
        "numpy.load",
        lambda s: p3(call(global_("numpy", "load"), text(str(s)))),
        "numpy.load",
    ),
    (
        "dotted name past an allowed module",
        lambda s: proto(4)
        + call(stack_global("numpy.core", "multiarray._reconstruct"), text("x"))
        + pickle.STOP,
        "numpy.core.multiarray._reconstruct",
    ),
    (
        "attribute of an allowed global",
        lambda s: proto(4)
        + call(stack_global("numpy", "dtype.__init__.__globals__"), text("x"))
        + pickle.STOP,
        "numpy.dtype.__init__.__globals__",
    ),
    (
        "pickle.loads of an inner payload",
        lambda s: p3(
            call(
                global_("pickle", "loads"),
                pickle.BINBYTES
                + struct.pack(
                    "<I", len(p3(call(global_("os", "system"), text(shell(s)))))
                )
                + p3(call(global_("os", "system"), text(shell(s)))),
            )
        ),
        "pickle.loads",
    ),
    (
        "torch rebuild",
        lambda s: p3(call(global_("torch._utils", "_rebuild_tensor_v2"), text("x"))),
        "torch._utils._rebuild_tensor_v2",
    ),
    (
        "copyreg._reconstructor",
        lambda s: p3(call(global_("copyreg", "_reconstructor"), text("x"))),
        "copyreg._reconstructor",
    ),
]


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the payload ran"


def load(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "evil.pickle"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "builder, name", [pytest.param(b, n, id=i) for i, b, n in UNSAFE_CASES]
)
def test_unsafe_global_is_refused_before_anything_runs(
    tmp_path, sentinel, builder, name
):
    path = load(tmp_path, builder(sentinel))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_haiku_checkpoint(path)
    assert info.value.global_name == name
    assert repr(name) in str(info.value)
    assert "nothing from the file was run" in str(info.value)
    assert not sentinel.exists()
    # The opcode scan names the same global without running it either.
    scan = scan_pickle(path)
    assert not scan.safe
    assert name in scan.unsafe_globals
    assert not sentinel.exists()


def test_the_payloads_are_real(tmp_path, sentinel):
    """Guard against toothless tests: plain pickle would run these payloads."""
    ran = tmp_path / "ran"
    data = p3(call(global_("os", "system"), text(shell(ran))))
    pickle.loads(data)
    assert ran.exists()
    ran.unlink()
    data = p3(call(global_("builtins", "exec"), text(python(ran))))
    pickle.loads(data)
    assert ran.exists()
    ran.unlink()


EXTENSION_CODES = {"EXT1": (0xF1, 1), "EXT2": (0xF1F1, 2), "EXT4": (0x7FF1F1F1, 4)}


@pytest.mark.parametrize("opcode", sorted(EXTENSION_CODES))
def test_extension_codes_are_refused(tmp_path, sentinel, opcode):
    code, size = EXTENSION_CODES[opcode]
    ext = getattr(pickle, opcode) + code.to_bytes(size, "little")
    path = load(tmp_path, proto(2) + call(ext, text(shell(sentinel))) + pickle.STOP)
    copyreg.add_extension("os", "system", code)
    try:
        # A stock unpickler takes the object from this cache without asking
        # find_class; the reader must not even look.
        copyreg._extension_cache[code] = lambda cmd: Path(sentinel).touch()
        with pytest.raises(UnsafeCheckpointError) as info:
            load_haiku_checkpoint(path)
        scan = scan_pickle(path)
    finally:
        copyreg.remove_extension("os", "system", code)
    assert info.value.global_name == "os.system"
    assert f"extension code {code}" in str(info.value)
    assert "os.system" in scan.unsafe_globals
    assert any(opcode in problem for problem in scan.problems)
    assert not sentinel.exists()


ARGUMENT_ABUSE = [
    # (id, payload body, text the message must contain)
    (
        "_codecs.encode with zlib",
        call(
            global_("_codecs", "encode"),
            pickle.SHORT_BINBYTES + b"\x03abc",
            text("zlib_codec"),
        ),
        "codec 'zlib_codec'",
    ),
    (
        "_codecs.encode with rot13",
        call(global_("_codecs", "encode"), text("abc"), text("rot13")),
        "codec 'rot13'",
    ),
    (
        "_codecs.encode with three arguments",
        call(global_("_codecs", "encode"), text("abc"), text("latin1"), text("strict")),
        "3 argument(s), expected 2",
    ),
    (
        "object dtype",
        call(global_("numpy", "dtype"), text("O8"), pickle.NEWFALSE, pickle.NEWTRUE),
        "numpy.dtype('O8') is not a plain numeric dtype",
    ),
    (
        "structured dtype",
        call(global_("numpy", "dtype"), text("V8"), pickle.NEWFALSE, pickle.NEWTRUE),
        "numpy.dtype('V8')",
    ),
    (
        "FlatMapping of a list",
        call(global_("haiku._src.data_structures", "FlatMapping"), pickle.EMPTY_LIST),
        "FlatMapping is called with (list)",
    ),
    (
        "FlatMapping with two arguments",
        call(
            global_("haiku._src.data_structures", "FlatMapping"),
            pickle.EMPTY_DICT,
            pickle.EMPTY_DICT,
        ),
        "FlatMapping is called with (dict, dict)",
    ),
    (
        "FlatMap of a string",
        call(global_("haiku._src.data_structures", "FlatMap"), text("x")),
        "FlatMap is called with (str)",
    ),
    (
        "ndarray called directly",
        call(global_("numpy", "ndarray"), pickle.EMPTY_TUPLE),
        "numpy.ndarray is called directly",
    ),
    (
        "_reconstruct of a dtype",
        call(
            global_("numpy.core.multiarray", "_reconstruct"),
            global_("numpy", "dtype"),
            pickle.EMPTY_TUPLE,
            pickle.SHORT_BINBYTES + b"\x01b",
        ),
        "_reconstruct builds a global numpy.dtype, expected numpy.ndarray",
    ),
    (
        "BUILD on an allowed global",
        global_("numpy", "dtype") + pickle.EMPTY_DICT + pickle.BUILD,
        "BUILD near byte",
    ),
    (
        "REDUCE on a non-callable",
        text("os.system") + pickle.EMPTY_TUPLE + pickle.REDUCE,
        "REDUCE near byte",
    ),
    (
        "OBJ of an allowed class",
        pickle.MARK + global_("numpy", "dtype") + text("f4") + pickle.OBJ,
        "OBJ opcode",
    ),
    (
        "NEWOBJ of an allowed class",
        global_("numpy", "ndarray") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
        "NEWOBJ opcode",
    ),
    (
        "persistent id",
        text("storage") + pickle.BINPERSID,
        "persistent ids",
    ),
]


@pytest.mark.parametrize(
    "body, message", [pytest.param(b, m, id=i) for i, b, m in ARGUMENT_ABUSE]
)
def test_abuse_of_allowed_globals_is_refused(tmp_path, body, message):
    path = load(tmp_path, p3(body))
    with pytest.raises(CheckpointError) as info:
        load_haiku_checkpoint(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert message in str(info.value)


def test_object_array_with_real_pickle_is_refused(tmp_path, sentinel):
    # numpy pickles an object array's elements as objects: here a callable.
    data = pickle.dumps({"m": {"w": np.array([os.system], dtype=object)}}, protocol=3)
    with pytest.raises(CheckpointError) as info:
        load_haiku_checkpoint(load(tmp_path, data))
    assert "O8" in str(info.value) or "posix.system" in str(info.value)


def test_stand_ins_are_never_the_real_callables(tmp_path):
    """find_class hands out the reader's own stand-ins, for every allowed name."""
    path = load(tmp_path, p3(pickle.NONE))
    with open(path, "rb") as raw:
        unpickler = _SafeUnpickler(_CheckedReader(raw, path.stat().st_size, "x"), "x")
        for module, name in _ALLOWED_PAIRS:
            stand_in = unpickler.find_class(module, name)
            real: Optional[Callable] = None
            if module == "numpy":
                real = getattr(np, name)
            elif module == "_codecs":
                import _codecs

                real = getattr(_codecs, name)
            assert stand_in is not real
            assert type(stand_in).__module__ == "converter.haiku_reader"


def test_unsafe_file_in_a_fresh_interpreter_runs_nothing(tmp_path):
    """End to end in a new process: nothing from the payload is imported or run."""
    sentinel = tmp_path / "fresh"
    path = load(tmp_path, getattr_chain(sentinel))
    code = (
        "import sys\n"
        "from converter import load_haiku_checkpoint, UnsafeCheckpointError\n"
        "try:\n"
        f"    load_haiku_checkpoint({str(path)!r})\n"
        "except UnsafeCheckpointError as e:\n"
        "    print(e.global_name)\n"
    )
    result = subprocess.run(
        [os.sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "builtins.getattr"
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "module, name",
    [("jax._src.array", "_reconstruct_array"), ("ml_dtypes", "bfloat16")],
)
def test_parameters_pickled_from_jax_are_refused_for_what_they_are(tmp_path, module, name):
    """A user's own checkpoint pickled straight from JAX names jax's array rebuilder
    (jax arrays) or ml_dtypes' bfloat16: refused as every unlisted global is, but
    the message said the file "was tampered with" and to download the official one
    again; it says what the file holds and the one line that saves it readably."""
    body = stack_global(module, name) + pickle.EMPTY_TUPLE + pickle.REDUCE
    path = tmp_path / "finetuned.pickle"
    path.write_bytes(proto(4) + body + pickle.STOP)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_haiku_checkpoint(path)
    message = str(info.value)
    assert info.value.global_name == f"{module}.{name}"
    assert "nothing from the file was run" in message
    assert "pickled from JAX" in message and "jax.device_get(params)" in message
    assert "tampered" not in message
