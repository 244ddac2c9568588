"""Read official Perceiver IO Haiku checkpoints without jax, haiku or ``pickle.load``.

The official files are pickles of ``{module_path: {param_name: numpy.ndarray}}``
(the ImageNet ones wrapped as ``{'params': ..., 'state': ...}``); their byte layout is
described in ``docs/OFFICIAL.md`` ("Inside the pickles"). A pickle is a small program,
so reading one with ``pickle.load`` can run anything. This module reads them through an *allow-list*
unpickler instead:

* ``find_class`` knows exactly the globals an official checkpoint uses (haiku's
  ``FlatMapping``, numpy's array and dtype reconstruction, ``_codecs.encode``) and
  refuses every other one with :class:`~converter.errors.UnsafeCheckpointError`
  *before anything is called*;
* even the allowed names never resolve to the real callables: they resolve to
  stand-ins defined here, which check their arguments and only record them in inert
  stub objects;
* opcodes official files never use (extension codes, persistent ids, ``INST``/``OBJ``/
  ``NEWOBJ``, out-of-band buffers) are refused, and ``REDUCE``/``BUILD`` only act on
  the stand-ins and stubs;
* once the stream is read, the stubs become numpy arrays (``np.frombuffer`` on the
  recorded bytes) and the tree shape, key types, dtypes, byte counts and finiteness
  are validated.

:func:`scan_pickle` lists a file's globals without executing anything
(``pickletools.genops``), for reporting on files the reader refuses.
"""

from __future__ import annotations

import copyreg
import hashlib
import math
import mmap
import os
import pickle
import pickletools
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from converter.errors import CheckpointError, ConverterError, UnsafeCheckpointError
from converter.registry import DOWNLOAD_BASE_URL

__all__ = [
    "ALLOWED_GLOBALS",
    "ArrayTree",
    "FoundGlobal",
    "HaikuCheckpoint",
    "PickleScan",
    "load_haiku_checkpoint",
    "looks_like_onnx",
    "onnx_refusal",
    "scan_pickle",
    "sniff_not_pickle",
]

#: ``{module_path: {param_name: array}}``.
ArrayTree = Dict[str, Dict[str, np.ndarray]]

_NOT_A_CHECKPOINT = (
    "the file is damaged or is not an official Perceiver IO checkpoint; "
    f"download the official file again ({DOWNLOAD_BASE_URL}<file>) or check the path"
)

# (module, name) pairs, kept apart rather than joined with a dot: a protocol-4 name
# such as ("numpy.core", "multiarray._reconstruct") must not pass for the real one.
_FLATMAPPING_GLOBALS = (
    ("haiku._src.data_structures", "FlatMapping"),
    ("haiku._src.data_structures", "FlatMap"),
)
_RECONSTRUCT_GLOBALS = (
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
)
_SCALAR_GLOBALS = (
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
)
_FROMBUFFER_GLOBALS = (
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
)
_NDARRAY_GLOBAL = ("numpy", "ndarray")
_DTYPE_GLOBAL = ("numpy", "dtype")
_ENCODE_GLOBAL = ("_codecs", "encode")

_ALLOWED_PAIRS = frozenset(
    _FLATMAPPING_GLOBALS
    + _RECONSTRUCT_GLOBALS
    + _SCALAR_GLOBALS
    + _FROMBUFFER_GLOBALS
    + (_NDARRAY_GLOBAL, _DTYPE_GLOBAL, _ENCODE_GLOBAL)
)

#: Every global an official checkpoint may name, as ``"module.name"``.
ALLOWED_GLOBALS = frozenset(f"{module}.{name}" for module, name in _ALLOWED_PAIRS)

# numpy dtype codes of plain numeric arrays (what numpy's dtype pickling writes as the
# first argument). Object ('O'), strings, void/structured, datetimes, complex and
# platform-dependent long doubles are never in checkpoints.
_NUMERIC_CODES = frozenset(
    ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"]
)
_MAX_NDIM = 64
# Dict keys whose hash is computed without recursion.
_ATOM_KEYS = frozenset([str, bytes, int, float, bool, type(None)])


def _global_name(module: str, name: str) -> str:
    return f"{module}.{name}"


def _type_name(value: Any) -> str:
    """Describe a value by type only: a hostile value's repr could be huge."""
    if isinstance(value, _Stub):
        return value.describe()
    if isinstance(value, _StandIn):
        return f"global {value.name}"
    return type(value).__name__


# --------------------------------------------------------------------------------------
# Stand-ins and stubs: what the allowed globals resolve to.


class _Stub:
    """An inert object a stand-in returned; BUILD may only reach these."""

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def describe(self) -> str:
        return type(self).__name__

    def build(self, state: Any) -> None:
        raise CheckpointError(
            f"{self.where}: BUILD is applied to {self.describe()}, which official "
            f"files never do; {_NOT_A_CHECKPOINT}"
        )


class _DtypeStub(_Stub):
    """A numeric dtype as ``numpy.dtype(code, False, True)`` + BUILD described it."""

    __slots__ = ("code", "endian")

    def __init__(self, where: str, code: str) -> None:
        super().__init__(where)
        self.code = code
        self.endian: Optional[str] = None

    def describe(self) -> str:
        return f"numpy.dtype({self.code!r})"

    def build(self, state: Any) -> None:
        fail = f"{self.where}: the state of dtype {self.code!r}"
        if self.endian is not None:
            raise CheckpointError(f"{fail} is set twice; {_NOT_A_CHECKPOINT}")
        if type(state) is not tuple or len(state) not in (8, 9):
            raise CheckpointError(
                f"{fail} is a {_type_name(state)} of length "
                f"{len(state) if type(state) is tuple else '-'}, expected numpy's "
                f"8-tuple (3, '<', None, None, None, -1, -1, 0); {_NOT_A_CHECKPOINT}"
            )
        version, endian, subarray, names, fields, elsize, alignment, flags = state[:8]
        expected_version = 3 if len(state) == 8 else 4
        if type(version) is not int or version != expected_version:
            raise CheckpointError(
                f"{fail} has version {version!r}, expected {expected_version}; "
                f"{_NOT_A_CHECKPOINT}"
            )
        if len(state) == 9 and state[8] is not None:
            raise CheckpointError(
                f"{fail} carries metadata; plain numeric arrays have none; "
                f"{_NOT_A_CHECKPOINT}"
            )
        if subarray is not None or names is not None or fields is not None:
            raise CheckpointError(
                f"{fail} describes a structured or sub-array dtype; checkpoints hold "
                f"plain numeric arrays only; {_NOT_A_CHECKPOINT}"
            )
        if not all(type(v) is int for v in (elsize, alignment, flags)) or (
            elsize,
            alignment,
            flags,
        ) != (-1, -1, 0):
            raise CheckpointError(
                f"{fail} has (elsize, alignment, flags) = "
                f"({elsize!r}, {alignment!r}, {flags!r}), expected (-1, -1, 0) of a "
                f"plain numeric dtype; {_NOT_A_CHECKPOINT}"
            )
        itemsize = int(self.code[1:])
        valid = ("<", ">", "=", "|") if itemsize == 1 else ("<", ">", "=")
        if type(endian) is not str or endian not in valid:
            raise CheckpointError(
                f"{fail} has byte order {endian!r}, expected one of {valid}; "
                f"{_NOT_A_CHECKPOINT}"
            )
        self.endian = endian

    def to_numpy(self) -> np.dtype:
        if self.endian is None:
            raise CheckpointError(
                f"{self.where}: dtype {self.code!r} is used without its state (no "
                f"BUILD); {_NOT_A_CHECKPOINT}"
            )
        endian = "=" if self.endian == "|" else self.endian
        return np.dtype(endian + self.code)


def _check_shape(shape: Any, where: str, what: str) -> Tuple[int, ...]:
    if type(shape) is not tuple or len(shape) > _MAX_NDIM:
        raise CheckpointError(
            f"{where}: {what} has shape of type {_type_name(shape)}, expected a tuple "
            f"of at most {_MAX_NDIM} non-negative ints; {_NOT_A_CHECKPOINT}"
        )
    # type() rather than isinstance(): True is an int too, and never a dimension.
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(
            f"{where}: {what} has a shape entry that is not a non-negative int; "
            f"{_NOT_A_CHECKPOINT}"
        )
    return shape


class _ArrayStub(_Stub):
    """An ndarray as ``_reconstruct`` + BUILD, ``scalar`` or ``_frombuffer`` set it."""

    __slots__ = ("shape", "dtype", "fortran", "raw", "array")

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.shape: Optional[Tuple[int, ...]] = None
        self.dtype: Optional[_DtypeStub] = None
        self.fortran = False
        self.raw: Union[bytes, bytearray, _FileBytes, None] = None
        self.array: Optional[np.ndarray] = None

    def describe(self) -> str:
        return "numpy array"

    def fill(
        self, shape: Any, dtype: Any, fortran: Any, raw: Any, what: str = "an array"
    ) -> None:
        shape = _check_shape(shape, self.where, what)
        if not isinstance(dtype, _DtypeStub):
            raise CheckpointError(
                f"{self.where}: {what} has a dtype of type {_type_name(dtype)}, "
                f"expected numpy.dtype; {_NOT_A_CHECKPOINT}"
            )
        if type(fortran) is not bool:
            raise CheckpointError(
                f"{self.where}: {what} has an is_fortran flag of type "
                f"{_type_name(fortran)}, expected a bool; {_NOT_A_CHECKPOINT}"
            )
        if type(raw) not in (bytes, bytearray, _FileBytes):
            raise CheckpointError(
                f"{self.where}: {what} has data of type {_type_name(raw)}, expected "
                f"bytes (object arrays are never in checkpoints); {_NOT_A_CHECKPOINT}"
            )
        expected = math.prod(shape) * int(dtype.code[1:])
        if len(raw) != expected:
            raise CheckpointError(
                f"{self.where}: {what} of shape {list(shape)} and dtype {dtype.code!r} "
                f"needs {expected:,} bytes but holds {len(raw):,}; {_NOT_A_CHECKPOINT}"
            )
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, fortran, raw

    def build(self, state: Any) -> None:
        if self.shape is not None:
            raise CheckpointError(
                f"{self.where}: an array's state is set twice; {_NOT_A_CHECKPOINT}"
            )
        if type(state) is tuple and len(state) == 5:
            version = state[0]
            if type(version) is not int or version != 1:
                raise CheckpointError(
                    f"{self.where}: an array's state has version {version!r}, "
                    f"expected 1; {_NOT_A_CHECKPOINT}"
                )
            state = state[1:]
        elif not (type(state) is tuple and len(state) == 4):
            raise CheckpointError(
                f"{self.where}: an array's state is a {_type_name(state)}, expected "
                f"numpy's (1, shape, dtype, is_fortran, bytes); {_NOT_A_CHECKPOINT}"
            )
        self.fill(*state)

    def to_numpy(
        self, label: str, claimed: Optional[set] = None, check_finite: bool = True
    ) -> np.ndarray:
        """Return the array as native-endian, C-ordered, writable numpy data.

        When the data was read into a buffer of ours (large payloads) that no other array
        uses (``claimed`` holds the ids of buffers already given to arrays), the
        array is a view of it: no copy.
        """
        if self.array is not None:
            # The same array reached twice through the memo: give each place its own
            # copy so that editing one parameter never changes another.
            return self.array.copy()
        if self.shape is None or self.dtype is None or self.raw is None:
            raise CheckpointError(
                f"{self.where}: {label} is an array whose contents were never set "
                f"(its BUILD is missing); {_NOT_A_CHECKPOINT}"
            )
        dtype = self.dtype.to_numpy()
        count = math.prod(self.shape)
        try:
            raw = self.raw.data if type(self.raw) is _FileBytes else self.raw
            flat = np.frombuffer(raw, dtype=dtype, count=count)
            shaped = flat.reshape(self.shape, order="F" if self.fortran else "C")
            own = (
                type(self.raw) is _FileBytes
                and claimed is not None
                and id(self.raw) not in claimed
                and dtype.isnative
                and (not self.fortran or len(self.shape) < 2)
            )
            if own:
                claimed.add(id(self.raw))
                array = shaped
            else:
                # One copy makes it writable, C-ordered and native-endian at once.
                array = np.array(shaped, dtype=dtype.newbyteorder("="), order="C")
        except (ValueError, MemoryError) as exc:
            raise CheckpointError(
                f"{self.where}: {label} of shape {list(self.shape)} cannot be built "
                f"({exc}); {_NOT_A_CHECKPOINT}"
            ) from exc
        if check_finite and array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                bad = np.argwhere(~finite)
                first = tuple(int(i) for i in bad[0])
                raise CheckpointError(
                    f"{self.where}: {label} holds {len(bad):,} non-finite value(s) "
                    f"(NaN or Inf), the first at index {list(first)}; the weights are "
                    "corrupt: download the official file again"
                )
        self.raw = None  # free the file bytes as soon as the array owns a copy
        self.array = array
        return array


class _FlatMappingStub(_Stub):
    """A haiku ``FlatMapping``: only its single plain-dict argument is kept."""

    __slots__ = ("kind", "data")

    def __init__(self, where: str, kind: str, data: Dict[Any, Any]) -> None:
        super().__init__(where)
        self.kind = kind
        self.data = data

    def describe(self) -> str:
        return self.kind


class _StandIn:
    """What an allowed global resolves to: a checked, side-effect-free function."""

    __slots__ = ("name", "_call", "_where")

    def __init__(
        self, name: str, call: Optional[Callable[[str, tuple], Any]], where: str
    ) -> None:
        self.name = name
        self._call = call
        self._where = where

    def __call__(self, *args: Any) -> Any:
        if self._call is None:
            raise CheckpointError(
                f"{self._where}: {self.name} is called directly; official files only "
                f"pass it to numpy's _reconstruct; {_NOT_A_CHECKPOINT}"
            )
        return self._call(self._where, args)


def _arity(name: str, where: str, args: tuple, count: int) -> None:
    if len(args) != count:
        raise CheckpointError(
            f"{where}: {name} is called with {len(args)} argument(s), expected "
            f"{count}; {_NOT_A_CHECKPOINT}"
        )


def _make_reconstruct(ndarray: _StandIn) -> Callable[[str, tuple], Any]:
    def reconstruct(where: str, args: tuple) -> _ArrayStub:
        _arity("_reconstruct", where, args, 3)
        subtype, shape, dummy = args
        if subtype is not ndarray:
            raise CheckpointError(
                f"{where}: _reconstruct builds a {_type_name(subtype)}, expected "
                f"numpy.ndarray; {_NOT_A_CHECKPOINT}"
            )
        if not (type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int):
            raise CheckpointError(
                f"{where}: _reconstruct's shape argument is not numpy's (0,); "
                f"{_NOT_A_CHECKPOINT}"
            )
        if type(dummy) is not bytes or dummy != b"b":
            raise CheckpointError(
                f"{where}: _reconstruct's dtype argument is not numpy's b'b'; "
                f"{_NOT_A_CHECKPOINT}"
            )
        return _ArrayStub(where)

    return reconstruct


def _dtype(where: str, args: tuple) -> _DtypeStub:
    _arity("numpy.dtype", where, args, 3)
    code, align, copy = args
    if type(code) is not str or code not in _NUMERIC_CODES:
        shown = repr(code[:20]) if type(code) is str else _type_name(code)
        raise CheckpointError(
            f"{where}: numpy.dtype({shown}) is not a plain numeric dtype (allowed: "
            f"{', '.join(sorted(_NUMERIC_CODES))}); object, string and structured "
            f"arrays are never in checkpoints; {_NOT_A_CHECKPOINT}"
        )
    if type(align) is not bool or type(copy) is not bool:
        raise CheckpointError(
            f"{where}: numpy.dtype({code!r}, ...) has non-bool flags; "
            f"{_NOT_A_CHECKPOINT}"
        )
    return _DtypeStub(where, code)


def _encode(where: str, args: tuple) -> bytes:
    # Protocol 2 stores bytes as _codecs.encode(latin-1 text, 'latin1'); any other
    # codec (zlib, rot13, ...) would be a way to run codec machinery on file data.
    _arity("_codecs.encode", where, args, 2)
    text, codec = args
    if (
        type(text) is not str
        or type(codec) is not str
        or codec
        not in (
            "latin1",
            "latin-1",
        )
    ):
        shown = repr(codec[:20]) if type(codec) is str else _type_name(codec)
        raise CheckpointError(
            f"{where}: _codecs.encode is called with codec {shown} on a "
            f"{_type_name(text)}; official files only use (str, 'latin1'); "
            f"{_NOT_A_CHECKPOINT}"
        )
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise CheckpointError(
            f"{where}: _codecs.encode gets text that is not latin-1 ({exc.reason}); "
            f"{_NOT_A_CHECKPOINT}"
        ) from exc


def _make_flatmapping(kind: str) -> Callable[[str, tuple], Any]:
    def flatmapping(where: str, args: tuple) -> _FlatMappingStub:
        if len(args) != 1 or type(args[0]) is not dict:
            got = ", ".join(_type_name(a) for a in args) or "nothing"
            raise CheckpointError(
                f"{where}: {kind} is called with ({got}); official files call it "
                f"with one plain dict; {_NOT_A_CHECKPOINT}"
            )
        return _FlatMappingStub(where, kind, args[0])

    return flatmapping


def _scalar(where: str, args: tuple) -> _ArrayStub:
    _arity("numpy scalar", where, args, 2)
    dtype, data = args
    stub = _ArrayStub(where)
    stub.fill((), dtype, False, data, what="a numpy scalar")
    return stub


def _frombuffer(where: str, args: tuple) -> _ArrayStub:
    _arity("_frombuffer", where, args, 4)
    data, dtype, shape, order = args
    if type(order) is not str or order not in ("C", "F"):
        raise CheckpointError(
            f"{where}: _frombuffer has an order of type {_type_name(order)} or an "
            f"unknown value, expected 'C' or 'F'; {_NOT_A_CHECKPOINT}"
        )
    stub = _ArrayStub(where)
    stub.fill(shape, dtype, order == "F", data, what="a protocol-5 array")
    return stub


# --------------------------------------------------------------------------------------
# The file wrapper and the unpickler.


class _CheckedReader:
    """A file as the unpickler sees it (scanning): never reads past EOF.

    Reads are checked against the bytes left *before* they happen, so a record that
    claims an absurd length is refused instead of allocating memory for it.
    """

    def __init__(self, raw: BinaryIO, size: int, where: str) -> None:
        self._raw = raw
        self.size = size
        self._where = where
        self.pos = 0

    def check(self, n: int) -> None:
        left = self.size - self.pos
        if n > left:
            if left == 0:
                raise CheckpointError(
                    f"{self._where}: the pickle stops at byte {self.size:,} before its "
                    "end (no STOP opcode): the file is truncated, e.g. by an "
                    "interrupted download or copy; download it again"
                )
            raise CheckpointError(
                f"{self._where}: a record at byte {self.pos:,} needs {n:,} bytes but "
                f"only {left:,} remain: the file is truncated or corrupt; download it "
                "again"
            )

    def _got(self, data: Union[bytes, bytearray, memoryview]) -> None:
        self.pos += len(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        self.check(n)
        data = self._raw.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise CheckpointError(
                f"{self._where}: the file changed while it was read; retry"
            )
        self._got(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self.check(len(view))
        got = self._raw.readinto(view)
        if got != len(view):
            raise CheckpointError(
                f"{self._where}: the file changed while it was read; retry"
            )
        self._got(view)
        return got

    def readline(self) -> bytes:
        line = self._raw.readline()
        self._got(line)
        if not line.endswith(b"\n"):
            self.check(self.size + 1)  # always fails, with the truncation message
        return line

    def tell(self) -> int:
        return self.pos

    def remaining(self) -> int:
        return self.size - self.pos



class _MemoryReader(_CheckedReader):
    """The whole file, read into memory at once, as the unpickler sees it.

    Reading a checkpoint means holding all its arrays anyway, so the file is read in
    one go (as fast as reading gets) and each array payload becomes a view of that
    memory: nothing is copied, and the arrays are writable. The sha256 was computed
    on a second thread while the file was read (see :func:`_read_all`).
    """

    def __init__(self, data: np.ndarray, hasher: "_ChunkHasher", where: str) -> None:
        self._data = data
        self._view = memoryview(data)
        self.size = len(data)
        self._where = where
        self.pos = 0
        self._hasher = hasher

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        self.check(n)
        data = bytes(self._view[self.pos : self.pos + n])
        self.pos += n
        return data

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        n = len(target)
        self.check(n)
        target[:] = self._view[self.pos : self.pos + n]
        self.pos += n
        return n

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` bytes as a view of the file's memory (no copy)."""
        self.check(n)
        out = self._data[self.pos : self.pos + n]
        self.pos += n
        return out

    def readline(self) -> bytes:
        start, window = self.pos, 256
        while True:
            chunk = bytes(self._view[start : min(self.size, start + window)])
            found = chunk.find(b"\n")
            if found >= 0:
                end = start + found + 1
                break
            if start + window >= self.size:
                end = self.size
                break
            window *= 4
        line = bytes(self._view[self.pos : end])
        self.pos = end
        if not line.endswith(b"\n"):
            self.check(self.size + 1)  # always fails, with the truncation message
        return line

    def close(self) -> None:
        self._hasher.hexdigest()

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def _opcode_code(name: str) -> int:
    return ord(next(op.code for op in pickletools.opcodes if op.name == name))


def _refuse_opcode(name: str, why: str) -> Callable[["_SafeUnpickler"], None]:
    def load(self: "_SafeUnpickler") -> None:
        raise CheckpointError(
            f"{self._where}: the pickle uses the {name} opcode near byte "
            f"{self._reader.pos:,} ({why}); official checkpoints never do; "
            f"{_NOT_A_CHECKPOINT}"
        )

    return load


class _Dispatch(dict):
    """The opcode table; an unknown byte names itself instead of raising KeyError."""

    def __missing__(self, code: int) -> Any:
        def unknown(self: "_SafeUnpickler") -> None:
            text = _describe_text(self.head) if self.head[:1] != b"\x80" else None
            what = f"it looks like {text}; " if text else ""
            raise CheckpointError(
                f"{self._where}: byte 0x{code:02x} near offset "
                f"{self._reader.pos - 1:,} is not a pickle opcode: the file is not a "
                "pickle or is corrupt; "
                f"{what}{_NOT_A_CHECKPOINT}"
            )

        return unknown


class _SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The allow-list unpickler.

    It builds on the pure-Python unpickler because its opcode table can be replaced
    per class: the C unpickler would answer extension codes from copyreg's process-wide
    cache without asking ``find_class``. Official files have a few thousand opcodes and
    their size is in the ``BINBYTES`` payloads, so the Python loop costs nothing
    measurable.
    """

    dispatch = _Dispatch(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, reader: _CheckedReader, where: str, head: bytes = b"") -> None:
        super().__init__(reader)
        self.head = head  # the file's first bytes, to describe a non-pickle
        self._reader = reader
        self._where = where
        self.seen_globals: Dict[str, None] = {}  # ordered set
        self.saw_binary = False
        ndarray = _StandIn("numpy.ndarray", None, where)
        reconstruct = _make_reconstruct(ndarray)
        self._stand_ins: Dict[Tuple[str, str], _StandIn] = {
            _NDARRAY_GLOBAL: ndarray,
            _DTYPE_GLOBAL: _StandIn("numpy.dtype", _dtype, where),
            _ENCODE_GLOBAL: _StandIn("_codecs.encode", _encode, where),
        }
        for module, name in _FLATMAPPING_GLOBALS:
            self._stand_ins[module, name] = _StandIn(
                name, _make_flatmapping(name), where
            )
        for pairs, call in (
            (_RECONSTRUCT_GLOBALS, reconstruct),
            (_SCALAR_GLOBALS, _scalar),
            (_FROMBUFFER_GLOBALS, _frombuffer),
        ):
            for module, name in pairs:
                self._stand_ins[module, name] = _StandIn(
                    _global_name(module, name), call, where
                )
        assert set(self._stand_ins) == _ALLOWED_PAIRS

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global to its stand-in; refuse every other one."""
        stand_in = self._stand_ins.get((module, name))
        if stand_in is None:
            raise _unsafe_global(self._where, _global_name(module, name))
        self.seen_globals[_global_name(module, name)] = None
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self._where}: the pickle refers to persistent ids (external objects, as "
            "torch.save files do); a Haiku checkpoint is self-contained; "
            f"{_NOT_A_CHECKPOINT}"
        )

    # Opcode handlers replacing the stock ones (registered below).

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(func, _StandIn):
            raise CheckpointError(
                f"{self._where}: REDUCE near byte {self._reader.pos:,} calls a "
                f"{_type_name(func)}; only allow-listed globals may be called; "
                f"{_NOT_A_CHECKPOINT}"
            )
        if type(args) is not tuple:
            raise CheckpointError(
                f"{self._where}: REDUCE near byte {self._reader.pos:,} passes a "
                f"{_type_name(args)} as arguments, expected a tuple; "
                f"{_NOT_A_CHECKPOINT}"
            )
        self.stack[-1] = func(*args)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _Stub):
            raise CheckpointError(
                f"{self._where}: BUILD near byte {self._reader.pos:,} sets the state "
                f"of a {_type_name(inst)}; official files only build numpy arrays and "
                f"dtypes; {_NOT_A_CHECKPOINT}"
            )
        inst.build(state)

    def _load_inst(self) -> None:
        # Resolve first so that a forbidden global is reported by name.
        module = self.readline()[:-1].decode("utf-8")
        name = self.readline()[:-1].decode("utf-8")
        self.find_class(module, name)
        raise CheckpointError(
            f"{self._where}: the pickle instantiates {_global_name(module, name)} with "
            f"the INST opcode; official checkpoints never do; {_NOT_A_CHECKPOINT}"
        )

    def _load_ext(self, size: int) -> None:
        code = int.from_bytes(self.read(size), "little")
        key = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        if key is None:
            raise CheckpointError(
                f"{self._where}: the pickle refers to extension code {code}, which is "
                "not registered; official checkpoints never use extension codes; "
                f"{_NOT_A_CHECKPOINT}"
            )
        # Never consult copyreg's cache nor import: an extension code is a global by
        # another name, and official files have none.
        raise _unsafe_global(
            self._where, _global_name(*key), how=f"through extension code {code}"
        )

    def _check_key(self, key: Any) -> None:
        # Hashing a hostile key can crash the interpreter (CPython hashes nested
        # tuples recursively in C), so only keys with a flat hash get in.
        if type(key) not in _ATOM_KEYS:
            raise CheckpointError(
                f"{self._where}: a dict key near byte {self._reader.pos:,} is a "
                f"{_type_name(key)}; official files only use str keys; "
                f"{_NOT_A_CHECKPOINT}"
            )

    def _target(self, wanted: type, opcode: str) -> Any:
        target = self.stack[-1]
        if type(target) is not wanted:
            raise CheckpointError(
                f"{self._where}: {opcode} near byte {self._reader.pos:,} adds items to "
                f"a {_type_name(target)}, expected a {wanted.__name__}; "
                f"{_NOT_A_CHECKPOINT}"
            )
        return target

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._check_key(key)
        self._target(dict, "SETITEM")[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(dict, "SETITEMS")
        if len(items) % 2:
            raise CheckpointError(
                f"{self._where}: SETITEMS near byte {self._reader.pos:,} has an odd "
                f"number of items; {_NOT_A_CHECKPOINT}"
            )
        for index in range(0, len(items), 2):
            self._check_key(items[index])
            target[items[index]] = items[index + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise CheckpointError(
                f"{self._where}: DICT near byte {self._reader.pos:,} has an odd "
                f"number of items; {_NOT_A_CHECKPOINT}"
            )
        for index in range(0, len(items), 2):
            self._check_key(items[index])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    def _load_large_bytes(self, length: int) -> None:
        # Array data: read straight into memory of our own, so the numpy array can use
        # these very bytes (writable) instead of copying them.
        if length > self._reader.size:
            self._reader.check(length)
        if length < _ZERO_COPY_BYTES:
            self.append(self.read(length))
            return
        if not getattr(self._unframer, "current_frame", None) and isinstance(
            self._reader, _MemoryReader
        ):
            self.append(_FileBytes(self._reader.take(length)))  # a view, no copy
            return
        # Inside a protocol-4 frame (or reading a stream): copy into memory of ours.
        buffer = _FileBytes(np.empty(length, dtype=np.uint8))
        self.readinto(memoryview(buffer.data))
        self.append(buffer)

    def _load_binbytes(self) -> None:
        (length,) = struct.unpack("<I", self.read(4))
        self._load_large_bytes(length)

    def _load_binbytes8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        self._load_large_bytes(length)

    def _load_bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        # The stock handler allocates before reading; bound the size by the file's
        # (the bytes may sit in an already-read frame, so not by what remains).
        if length > self._reader.size:
            self._reader.check(length)
        buffer = bytearray(length)
        self.readinto(buffer)
        self.append(buffer)


# Payloads at least this large are read into buffers that the arrays then share.
_ZERO_COPY_BYTES = 1 << 12


class _FileBytes:
    """A payload of the file read into writable memory of our own (not a bytes
    object): arrays can use it without a copy. Only our BINBYTES handlers make these,
    so a pickle cannot forge one."""

    __slots__ = ("data",)

    def __init__(self, data: np.ndarray) -> None:
        self.data = data  # uint8, 1-D, writable

    def __len__(self) -> int:
        return len(self.data)


# Globals of a checkpoint pickled straight from JAX: jax arrays rebuild themselves
# with jax code (jax._src.array._reconstruct_array), bfloat16 numpy arrays name
# ml_dtypes' type. Refused like any other global, but said for what they are: the
# user's own file, which one line of JAX code saves in the official form.
_JAX_ROOTS = ("jax", "jaxlib", "ml_dtypes")


def _unsafe_global(where: str, name: str, how: str = "") -> UnsafeCheckpointError:
    via = f" {how}" if how else ""
    if name.split(".")[0] in _JAX_ROOTS:
        return UnsafeCheckpointError(
            f"{where}: refused to load: the pickle asks for the global {name!r}{via}: "
            "it holds jax arrays or bfloat16 values (parameters pickled from JAX "
            "without converting them to numpy), which only jax's own code could "
            "rebuild, and this reader runs none; nothing from the file was run. Save "
            "it again with numpy leaves, as the official files hold them: "
            "pickle.dump(jax.device_get(params), f), bfloat16 leaves cast to float32 "
            "first",
            name,
        )
    return UnsafeCheckpointError(
        f"{where}: refused to load: the pickle asks for the global {name!r}{via}, "
        "which is not on the allow-list of official checkpoint globals; nothing from "
        "the file was run. A Perceiver IO checkpoint never needs it, so this file is "
        "not one or was tampered with: do not open it with pickle.load; delete it and "
        f"download the official file again ({DOWNLOAD_BASE_URL}<file>)",
        name,
    )


def _install_handlers() -> None:
    table = _SafeUnpickler.dispatch
    table[_opcode_code("REDUCE")] = _SafeUnpickler._load_reduce
    table[_opcode_code("BUILD")] = _SafeUnpickler._load_build
    table[_opcode_code("INST")] = _SafeUnpickler._load_inst
    table[_opcode_code("BYTEARRAY8")] = _SafeUnpickler._load_bytearray8
    table[_opcode_code("BINBYTES")] = _SafeUnpickler._load_binbytes
    table[_opcode_code("BINBYTES8")] = _SafeUnpickler._load_binbytes8
    table[_opcode_code("SETITEM")] = _SafeUnpickler._load_setitem
    table[_opcode_code("SETITEMS")] = _SafeUnpickler._load_setitems
    table[_opcode_code("DICT")] = _SafeUnpickler._load_dict
    table[_opcode_code("APPEND")] = _SafeUnpickler._load_append
    table[_opcode_code("APPENDS")] = _SafeUnpickler._load_appends
    for name, size in (("EXT1", 1), ("EXT2", 2), ("EXT4", 4)):
        table[_opcode_code(name)] = lambda self, size=size: self._load_ext(size)
    for name, why in (
        ("OBJ", "it instantiates a class"),
        ("NEWOBJ", "it instantiates a class"),
        ("NEWOBJ_EX", "it instantiates a class"),
        ("NEXT_BUFFER", "it needs out-of-band buffers the file does not contain"),
        ("READONLY_BUFFER", "it belongs to out-of-band buffers"),
        # Sets hash their items, which hostile nesting can turn into a crash, and
        # official files have none.
        ("EMPTY_SET", "it builds a set"),
        ("ADDITEMS", "it builds a set"),
        ("FROZENSET", "it builds a frozenset"),
    ):
        table[_opcode_code(name)] = _refuse_opcode(name, why)
    # Remember whether protocol-1 opcodes occur, to report protocol 0 versus 1 for
    # files without a PROTO opcode.
    for op in pickletools.opcodes:
        if op.proto == 1:
            stock = table[ord(op.code)]

            def marked(self: _SafeUnpickler, stock: Callable = stock) -> None:
                self.saw_binary = True
                stock(self)

            table[ord(op.code)] = marked


_install_handlers()


# --------------------------------------------------------------------------------------
# Sniffing what a non-pickle file is, for a useful message.

_MAGICS = (
    (b"PK\x03\x04", "a zip archive (a torch.save .pt/.pth file, an .npz or a .zip)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "gzip-compressed data (decompress it with gunzip first)"),
    (b"\x93NUMPY", "a numpy .npy file"),
    (b"\x89HDF", "an HDF5 file"),
    (
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19",
        "a legacy torch.save file (several pickles with persistent storages)",
    ),
)


# ONNX has no magic number: a serialised ModelProto starts with its ir_version (field
# 1, varint: tag 0x08, then a one-byte version) followed by the next field protobuf
# writes in number order: producer_name 2, producer_version 3, domain 4,
# model_version 5, doc_string 6, graph 7 or opset_import 8. No pickle starts with
# 0x08 (not an opcode).
_ONNX_SECOND_TAGS = frozenset((0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42))


def looks_like_onnx(head: bytes) -> bool:
    """Whether a file's first bytes (3 are enough) are those of an ONNX model."""
    return (
        len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F
        and head[2] in _ONNX_SECOND_TAGS
    )


def onnx_refusal(where: str) -> str:
    """Why an ONNX model is not read where an official checkpoint is expected, and
    what to give instead."""
    return (
        f"{where}: the file is an ONNX model, not a checkpoint: ONNX is an export "
        "format (`perceiver-convert export` writes it) that is not read back; "
        "`perceiver-convert convert` takes the official checkpoint "
        f"({DOWNLOAD_BASE_URL}<file>) or a HuggingFace transformers folder "
        "(config.json + model.safetensors), and `perceiver-convert inspect "
        f"{where}` describes the graph"
    )


def _sniff(head: bytes) -> Optional[str]:
    """Name the kind of a file that is clearly not a pickle, from its first bytes."""
    for magic, what in _MAGICS:
        if head.startswith(magic):
            return what
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file (already converted?)"
    return None


def sniff_not_pickle(path: Union[str, os.PathLike]) -> Optional[str]:
    """What the file at ``path`` clearly is when its first bytes already say it is not
    a pickle to read opcode by opcode (``"empty (0 bytes)"``, ``"a numpy .npy
    file"``, ``"a zip archive (...)"``, ...); None otherwise, also when it cannot be
    read. ``inspect`` then has no opcodes to scan."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return None
    return head_not_pickle(head)


def head_not_pickle(head: bytes) -> Optional[str]:
    """:func:`sniff_not_pickle` of a file's first 64 bytes, already read."""
    return "empty (0 bytes)" if not head else _sniff(head)


def _describe_text(head: bytes) -> Optional[str]:
    """``"text starting with '...'"`` when the first bytes read as text, else None."""
    # The 64-byte head may end inside a multi-byte character: ignore only that end.
    text = head.decode("utf-8", "replace").rstrip("\ufffd")
    if not text.strip() or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return None
    shown = text.strip().splitlines()[0][:40]
    html = shown.startswith("<")
    hint = (
        " (an HTML page: a failed download often saves the error page)" if html else ""
    )
    return f"text starting with {shown!r}{hint}"


# --------------------------------------------------------------------------------------
# The tree.


@dataclass(frozen=True, eq=False)
class HaikuCheckpoint:
    """An official checkpoint read by :func:`load_haiku_checkpoint`.

    Attributes:
        path: the file read.
        params: ``{module_path: {param_name: array}}``, in file order; arrays are
            native-endian, C-ordered and writable.
        state: the same for Haiku state (BatchNorm EMA of ``imagenet_conv``); ``{}``
            where the file has none.
        sha256: hex digest of the file's bytes.
        size_bytes: file size.
        protocol: pickle protocol (the PROTO opcode; 0 or 1 for files without it).
        containers: mapping kinds met, in order of first appearance, e.g.
            ``("FlatMapping",)`` or ``("dict", "FlatMapping")``.
        wrapped: ``True`` when the file stores ``{'params': ..., 'state': ...}``.
        globals: the allowed globals the file named, ``"module.name"``, in order.
    """

    path: Path
    params: ArrayTree = field(repr=False)  # a repr of every array helps nobody
    state: ArrayTree = field(repr=False)
    sha256: str
    size_bytes: int
    protocol: int
    containers: Tuple[str, ...]
    wrapped: bool
    globals: Tuple[str, ...]

    def iter_arrays(
        self, include_state: bool = True
    ) -> Iterator[Tuple[str, str, str, np.ndarray]]:
        """Yield ``(collection, module, param, array)``; collection is params/state."""
        collections = [("params", self.params)]
        if include_state:
            collections.append(("state", self.state))
        for collection, tree in collections:
            for module, params in tree.items():
                for name, array in params.items():
                    yield collection, module, name, array

    def flat(self, collection: str = "params") -> Dict[Tuple[str, str], np.ndarray]:
        """Return ``{(module, param): array}`` of ``"params"`` or ``"state"``."""
        if collection not in ("params", "state"):
            raise ValueError(
                f"collection must be 'params' or 'state', not {collection!r}"
            )
        tree = self.params if collection == "params" else self.state
        return {(m, p): a for m, params in tree.items() for p, a in params.items()}

    def num_arrays(self, include_state: bool = False) -> int:
        """Number of arrays (parameters in Haiku's sense)."""
        return sum(1 for _ in self.iter_arrays(include_state))

    def num_params(self, include_state: bool = False) -> int:
        """Number of scalar values in the params (and optionally the state)."""
        return sum(a.size for *_, a in self.iter_arrays(include_state))

    def nbytes(self, include_state: bool = False) -> int:
        """Bytes the arrays take in memory."""
        return sum(a.nbytes for *_, a in self.iter_arrays(include_state))


class _TreeBuilder:
    """Validate the unpickled object and turn its stubs into numpy arrays."""

    def __init__(self, where: str, check_finite: bool = True) -> None:
        self.where = where
        self.check_finite = check_finite
        self.containers: Dict[str, None] = {}
        self.claimed: set = set()  # ids of byte buffers already owned by an array

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(
            f"{self.where}: {message}; a Haiku checkpoint is "
            "{module: {param: array}} or {'params': ..., 'state': ...} of those; "
            f"{_NOT_A_CHECKPOINT}"
        )

    @staticmethod
    def is_mapping(node: Any) -> bool:
        return type(node) is dict or isinstance(node, _FlatMappingStub)

    def open(self, node: Any, label: str) -> Dict[str, Any]:
        if type(node) is dict:
            kind, items = "dict", node
        elif isinstance(node, _FlatMappingStub):
            kind, items = node.kind, node.data
        else:
            raise self.fail(f"{label} is a {_type_name(node)}, expected a mapping")
        self.containers.setdefault(kind, None)
        for key in items:
            if type(key) is not str:
                raise self.fail(
                    f"{label} has a key of type {_type_name(key)}, expected str"
                )
        return items

    def two_level(self, node: Any, collection: str) -> ArrayTree:
        modules = self.open(node, f"the {collection} tree")
        tree: ArrayTree = {}
        for module, sub in modules.items():
            params = self.open(sub, f"{collection} module {module!r}")
            tree[module] = {}
            for name, leaf in params.items():
                label = f"{collection} {module}/{name}"
                if not isinstance(leaf, _ArrayStub):
                    deeper = (
                        " (the tree is deeper than module -> param -> array)"
                        if (self.is_mapping(leaf))
                        else ""
                    )
                    raise self.fail(
                        f"{label} is a {_type_name(leaf)}, expected a numpy array"
                        + deeper
                    )
                tree[module][name] = leaf.to_numpy(label, self.claimed, self.check_finite)
        return tree

    def build(self, top: Any) -> Tuple[ArrayTree, ArrayTree, bool]:
        items = self.open(top, "the top level")
        wrapped = set(items) == {"params", "state"} and all(
            self.is_mapping(v) for v in items.values()
        )
        if wrapped:
            params = self.two_level(items["params"], "params")
            state = self.two_level(items["state"], "state")
        else:
            params, state = self.two_level(top, "params"), {}
        if not any(params.values()):
            # Also {"params": {}} (a module named "params" with nothing in it), which
            # read as a checkpoint of 0 arrays where {} was refused.
            raise self.fail("the checkpoint holds no parameters")
        return params, state, wrapped


# --------------------------------------------------------------------------------------
# Public entry points.


def _file_size(path: Path, where: str) -> int:
    try:
        info = path.stat()
    except OSError as exc:
        raise CheckpointError(
            f"{where}: cannot read the file ({exc.strerror or exc}); check the path"
        ) from exc
    if path.is_dir():
        # A HuggingFace folder is the likely one: its importer is another function.
        raise CheckpointError(
            f"{where}: is a folder; pass the checkpoint file (a HuggingFace "
            "transformers folder: converter.hf_import.convert_hf, or "
            "`perceiver-convert convert FOLDER`)"
        )
    if not path.is_file():
        raise CheckpointError(f"{where}: not a regular file; pass the checkpoint file")
    return info.st_size


def _wrap_failure(
    exc: BaseException, where: str, head: bytes, pos: int, size: int
) -> CheckpointError:
    """Turn an exception from inside pickle into a CheckpointError with a cause."""
    if isinstance(exc, EOFError):
        return CheckpointError(
            f"{where}: the pickle ends at byte {pos:,} of {size:,} before its end: the "
            "file is truncated; download it again"
        )
    if isinstance(exc, MemoryError):
        return CheckpointError(
            f"{where}: reading ran out of memory at byte {pos:,}: the file asks for "
            f"absurd sizes or the machine has too little memory; {_NOT_A_CHECKPOINT}"
        )
    if isinstance(exc, RecursionError):
        return CheckpointError(
            f"{where}: the pickle nests too deeply (near byte {pos:,}); "
            f"{_NOT_A_CHECKPOINT}"
        )
    text = _describe_text(head) if head[:1] != b"\x80" else None
    what = f"it looks like {text}; " if text else ""
    detail = str(exc)[:200] or type(exc).__name__
    return CheckpointError(
        f"{where}: not a readable pickle ({type(exc).__name__} near byte {pos:,}: "
        f"{detail}); {what}{_NOT_A_CHECKPOINT}"
    )


def _read_all(
    raw: BinaryIO, size: int, where: str
) -> Tuple[np.ndarray, "_ChunkHasher"]:
    """The file's ``size`` bytes in one writable buffer, and their sha256 (running).

    An anonymous memory map rather than ``np.empty``: numpy asks for transparent huge
    pages on large arrays, which made filling 800 MB three times slower on the
    machines this was measured on, and ``bytearray(size)`` zero-fills it first.
    """
    try:
        memory = mmap.mmap(-1, size)
    except (OSError, ValueError, OverflowError) as exc:
        raise CheckpointError(
            f"{where}: the file ({size:,} bytes) does not fit in memory; official "
            "checkpoints are at most 804 MB"
        ) from exc
    data = np.frombuffer(memory, dtype=np.uint8)
    view = memoryview(data)
    hasher = _ChunkHasher()
    got = 0
    try:
        while got < size:
            n = raw.readinto(view[got : got + _READ_CHUNK])
            if not n:
                break
            hasher.update(view[got : got + n])  # hashed on the other core meanwhile
            got += n
        if got != size or raw.read(1):
            raise CheckpointError(
                f"{where}: the file changed while it was read; retry"
            )
    except BaseException:
        hasher.hexdigest()  # stop the thread
        raise
    return data, hasher


_READ_CHUNK = 32 << 20


class _ChunkHasher:
    """sha256 of chunks handed over in order, computed on a second thread (hashlib
    releases the GIL), so hashing overlaps reading the next chunk."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._chunks: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._digest: Optional[str] = None

    def _run(self) -> None:
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                return
            self._sha.update(chunk)

    def update(self, chunk: memoryview) -> None:
        self._chunks.put(chunk)

    def hexdigest(self) -> str:
        if self._digest is None:
            self._chunks.put(None)
            self._thread.join()
            self._digest = self._sha.hexdigest()
        return self._digest


def load_haiku_checkpoint(
    path: Union[str, os.PathLike], *, check_finite: bool = True
) -> HaikuCheckpoint:
    """Read an official Perceiver IO Haiku checkpoint safely.

    ``check_finite=False`` keeps arrays holding NaN or Inf (``inspect`` lists and
    marks them); by default they are an error.

    The file is read into memory once; the unpickler parses it there while a second
    thread computes its sha256, and the arrays are views of that memory (writable, no
    copy). Nothing from the file is ever called; see the module docstring.

    Raises:
        UnsafeCheckpointError: the file names a global outside the allow-list
            (``.global_name`` says which); nothing was called.
        CheckpointError: the file is missing, empty, truncated, not a pickle, not a
            two-level tree of numeric arrays, or holds non-finite weights.
    """
    path = Path(path)
    where = str(path)
    size = _file_size(path, where)
    if size == 0:
        raise CheckpointError(
            f"{where}: the file is empty (0 bytes), e.g. an interrupted download; "
            "download it again"
        )
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(
            f"{where}: cannot open the file ({exc.strerror or exc}); check the path "
            "and its permissions"
        ) from exc
    with raw:
        head = raw.peek(64)[:64] if hasattr(raw, "peek") else b""
        if looks_like_onnx(head):
            raise CheckpointError(onnx_refusal(where))
        kind = _sniff(head)
        if kind is not None:
            raise CheckpointError(
                f"{where}: the file is {kind}, not a Haiku pickle; pass the official "
                f"checkpoint file ({DOWNLOAD_BASE_URL}<file>)"
            )
        data, hasher = _read_all(raw, size, where)
    reader = _MemoryReader(data, hasher, where)
    # The file is closed: the opcodes are parsed from its bytes in memory.
    unpickler = _SafeUnpickler(reader, where, head)
    try:
        top = unpickler.load()
        if reader.remaining():
            raise CheckpointError(
                f"{where}: {reader.remaining():,} bytes follow the end of the "
                f"pickle at byte {reader.pos:,}: the file is corrupt (two files "
                "joined, or a bad copy); download it again"
            )
    except ConverterError:
        raise
    except Exception as exc:  # anything from inside pickle becomes ours
        raise _wrap_failure(exc, where, head, reader.pos, size) from exc
    finally:
        reader.close()  # stops the hashing thread, also after an error
    protocol = (
        unpickler.proto if unpickler.proto >= 2 else int(unpickler.saw_binary)
    )
    seen = tuple(unpickler.seen_globals)
    digest = reader.hexdigest()
    # Drop the memo now: it holds every small byte string, and the arrays about to
    # be built should replace them rather than sit beside them.
    unpickler.memo.clear()
    del unpickler
    builder = _TreeBuilder(where, check_finite)
    params, state, wrapped = builder.build(top)
    return HaikuCheckpoint(
        path=path,
        params=params,
        state=state,
        sha256=digest,
        size_bytes=size,
        protocol=protocol,
        containers=tuple(builder.containers),
        wrapped=wrapped,
        globals=seen,
    )


@dataclass(frozen=True)
class FoundGlobal:
    """A global a pickle names: ``name`` is ``"module.name"`` when it can be known."""

    name: str
    opcode: str
    offset: Optional[int]
    allowed: bool


@dataclass(frozen=True)
class PickleScan:
    """What :func:`scan_pickle` learned from a file's opcodes, without running them.

    ``problems`` lists constructs official files never use (extension codes,
    persistent ids, INST/OBJ/NEWOBJ, out-of-band buffers, unresolvable
    STACK_GLOBALs); ``error`` says why the scan stopped early, if it did.
    """

    path: Path
    size_bytes: int
    protocol: Optional[int]
    globals: Tuple[FoundGlobal, ...]
    problems: Tuple[str, ...]
    complete: bool
    error: Optional[str]

    @property
    def global_names(self) -> Tuple[str, ...]:
        """Distinct global names, in order of first appearance."""
        return tuple(dict.fromkeys(g.name for g in self.globals))

    @property
    def unsafe_globals(self) -> Tuple[str, ...]:
        """Distinct names outside the allow-list."""
        return tuple(dict.fromkeys(g.name for g in self.globals if not g.allowed))

    @property
    def safe(self) -> bool:
        """Every global allowed, nothing suspicious, and the stream read to its STOP."""
        return self.complete and not self.problems and not self.unsafe_globals


_STRING_OPCODES = frozenset(
    [
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    ]
)
_PUT_OPCODES = frozenset(["PUT", "BINPUT", "LONG_BINPUT"])
_GET_OPCODES = frozenset(["GET", "BINGET", "LONG_BINGET"])


class _SymbolicStack:
    """Track which strings sit on the pickle stack, to name STACK_GLOBAL's target.

    Every opcode's stack effect comes from ``pickletools``' own descriptions
    (``stack_before``/``stack_after``); only strings and memo traffic are followed,
    everything else is an unknown placeholder.
    """

    _UNKNOWN = object()

    def __init__(self) -> None:
        self.stack: List[Any] = []
        self.marks: List[int] = []
        self.memo: Dict[int, Any] = {}

    def _pop(self, count: int) -> List[Any]:
        if count <= 0:
            return []
        taken = self.stack[-count:]
        del self.stack[-count:]
        return [self._UNKNOWN] * (count - len(taken)) + taken

    def step(self, op: pickletools.OpcodeInfo, arg: Any) -> List[Any]:
        """Apply one opcode; return the values it popped (for STACK_GLOBAL)."""
        name = op.name
        if name == "MARK":
            self.marks.append(len(self.stack))
            return []
        if name in _PUT_OPCODES or name == "MEMOIZE":
            index = len(self.memo) if name == "MEMOIZE" else arg
            self.memo[index] = self.stack[-1] if self.stack else self._UNKNOWN
            return []
        if name in _GET_OPCODES:
            self.stack.append(self.memo.get(arg, self._UNKNOWN))
            return []
        before = op.stack_before
        popped: List[Any] = []
        if pickletools.markobject in before:
            below = before.index(pickletools.markobject)
            mark = self.marks.pop() if self.marks else 0
            popped = self.stack[mark:]
            del self.stack[mark:]
            self._pop(below)
        else:
            popped = self._pop(len(before))
        if name in _STRING_OPCODES and isinstance(arg, str):
            self.stack.append(arg)
        else:
            self.stack.extend(self._UNKNOWN for _ in op.stack_after)
        return popped


def scan_pickle(path: Union[str, os.PathLike]) -> PickleScan:
    """List a pickle's protocol and globals by reading its opcodes, running nothing.

    GLOBAL and INST name their target directly; STACK_GLOBAL's module and name are
    followed from the string pushes and memo lookups before it; EXT1/2/4 codes are
    reported with what this process's copyreg registry says they mean (never
    resolved). A truncated or corrupt stream stops the scan and sets ``error``; the
    globals found up to there are still listed.

    Raises:
        CheckpointError: the file cannot be opened.
    """
    path = Path(path)
    where = str(path)
    size = _file_size(path, where)
    found: List[FoundGlobal] = []
    problems: List[str] = []
    protocol: Optional[int] = None
    highest = 0
    complete = False
    parsed_any = False
    error: Optional[str] = None
    symbolic = _SymbolicStack()

    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(
            f"{where}: cannot open the file ({exc.strerror or exc}); check the path"
        ) from exc
    with raw:
        reader = _CheckedReader(raw, size, where)
        try:
            for op, arg, pos in pickletools.genops(reader):
                parsed_any = True
                highest = max(highest, op.proto)
                popped = symbolic.step(op, arg)
                if op.name == "PROTO":
                    protocol = arg
                elif op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    found.append(_found(module, name, op.name, pos))
                    if op.name == "INST":
                        problems.append(f"INST at byte {pos}: instantiates a class")
                elif op.name == "STACK_GLOBAL":
                    module, name = popped[-2:] if len(popped) >= 2 else (None, None)
                    if isinstance(module, str) and isinstance(name, str):
                        found.append(_found(module, name, op.name, pos))
                    else:
                        found.append(FoundGlobal("<unresolved>", op.name, pos, False))
                        problems.append(
                            f"STACK_GLOBAL at byte {pos}: its module and name are not "
                            "plain strings; the target cannot be known without running "
                            "the pickle"
                        )
                elif op.name in ("EXT1", "EXT2", "EXT4"):
                    registry = copyreg._inverted_registry  # type: ignore[attr-defined]
                    key = registry.get(arg)
                    label = _global_name(*key) if key else f"<extension code {arg}>"
                    found.append(FoundGlobal(label, op.name, pos, False))
                    problems.append(
                        f"{op.name} at byte {pos}: extension code {arg}"
                        + (f" (registered in this process as {label})" if key else "")
                    )
                elif op.name in ("PERSID", "BINPERSID"):
                    problems.append(f"{op.name} at byte {pos}: persistent id")
                elif op.name in ("OBJ", "NEWOBJ", "NEWOBJ_EX"):
                    problems.append(f"{op.name} at byte {pos}: instantiates a class")
                elif op.name in ("NEXT_BUFFER", "READONLY_BUFFER"):
                    problems.append(f"{op.name} at byte {pos}: out-of-band buffer")
                elif op.name == "STOP":
                    complete = True
            if complete and reader.remaining():
                problems.append(
                    f"{reader.remaining():,} bytes follow the STOP opcode at byte "
                    f"{reader.pos - 1:,}"
                )
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # pickletools reports bad streams as ValueError etc.
            error = (
                f"{where}: the opcode stream is corrupt ({type(exc).__name__}: "
                f"{str(exc)[:200]})"
            )
    if protocol is None and parsed_any:
        protocol = highest  # files without PROTO are protocol 0 or 1
    return PickleScan(
        path=path,
        size_bytes=size,
        protocol=protocol,
        globals=tuple(found),
        problems=tuple(problems),
        complete=complete,
        error=error,
    )


def _found(module: str, name: str, opcode: str, pos: Optional[int]) -> FoundGlobal:
    return FoundGlobal(
        _global_name(module, name), opcode, pos, (module, name) in _ALLOWED_PAIRS
    )
