"""Write checkpoints in the official Perceiver IO layout, without haiku or numpy 1.x.

The output uses exactly the globals of the official files (``docs/OFFICIAL.md``,
"Inside the pickles"):

* every mapping node is ``haiku._src.data_structures.FlatMapping`` called with one
  plain dict (or a plain dict with ``container="dict"``); keys are sorted; the
  ImageNet layout puts ``{'params': ..., 'state': ...}`` in a plain dict on top;
* every array is numpy 1.x's classic reduction
  ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` + BUILD
  ``(1, shape, dtype, False, raw_bytes)``, the dtype being
  ``numpy.dtype('f4', False, True)`` + BUILD ``(3, '<', None, None, None, -1, -1, 0)``;
* protocol 2 stores bytes as ``_codecs.encode(latin-1 text, 'latin1')``, as Python's
  own pickler does.

It subclasses the pure-Python pickler: ``reducer_override`` turns arrays, dtypes and
FlatMapping nodes into those reductions, and ``save_global`` writes the official
module and name for marker classes, whatever numpy is installed (numpy 2 would name
``numpy._core``). The memo pattern matches numpy's: the ``(0,)`` tuple is new for
every array while ``b'b'``, the dtypes and the globals are memoized, so protocol 3
output is byte-identical to the golden files.
"""

from __future__ import annotations

import codecs
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from converter.atomic import HashingWriter, atomic_write
from converter.errors import OutputError
# The plain numeric dtypes the official layout carries: exactly what the reader accepts.
from converter.haiku_reader import _NUMERIC_CODES

__all__ = ["CONTAINERS", "PROTOCOLS", "SavedCheckpoint", "save_haiku_checkpoint"]

PROTOCOLS = (2, 3, 4, 5)
CONTAINERS = ("flatmapping", "dict")



class _OfficialGlobal(type):
    """Metaclass of marker classes that pickle as a fixed ``module name`` global.

    Markers are classes so that the pickler routes them to ``save_global``.
    """

    pickle_module: str
    pickle_name: str


def _marker(module: str, name: str) -> _OfficialGlobal:
    marker = _OfficialGlobal(f"_{name.strip('_')}_marker", (), {})
    marker.pickle_module = module
    marker.pickle_name = name
    return marker


_FLATMAPPING = _marker("haiku._src.data_structures", "FlatMapping")
_RECONSTRUCT = _marker("numpy.core.multiarray", "_reconstruct")
_NDARRAY = _marker("numpy", "ndarray")
_DTYPE = _marker("numpy", "dtype")


class _FlatMappingNode:
    """A mapping node to be pickled as ``FlatMapping(plain_dict)``."""

    __slots__ = ("data",)

    def __init__(self, data: Dict[str, Any]) -> None:
        self.data = data


class _HaikuPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler emitting the official reductions (see module docstring)."""

    def __init__(self, file: Any, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        # One dtype object per dtype: numpy's built-in dtypes are singletons, so the
        # official files memoize them; arrays made elsewhere may carry equal copies.
        self._dtypes: Dict[str, np.dtype] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            dtype = self._dtypes.setdefault(obj.dtype.str, obj.dtype)
            # A new (0,) tuple per array, as numpy builds one per call; b'b' is a
            # cached one-byte bytes object in CPython, hence memoized like numpy's.
            dummy = tuple([0])  # not the literal (0,): that is one shared constant
            shape = tuple(int(d) for d in obj.shape)
            return (
                _RECONSTRUCT,
                (_NDARRAY, dummy, b"b"),
                (1, shape, dtype, False, obj.tobytes(order="C")),
            )
        if isinstance(obj, np.dtype):
            code = f"{obj.kind}{obj.itemsize}"
            endian = "|" if obj.itemsize == 1 else "<"
            return (
                _DTYPE,
                (code, False, True),
                (3, endian, None, None, None, -1, -1, 0),
            )
        if type(obj) is bytes and not obj and self.proto < 3:
            # The stock pickler spells b'' as builtins.bytes() below protocol 3, a
            # global official files do not have; encode('') gives b'' with theirs.
            return (codecs.encode, ("", "latin1"))
        if type(obj) is _FlatMappingNode:
            return (_FLATMAPPING, (obj.data,))
        return NotImplemented

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        if isinstance(obj, _OfficialGlobal):
            module, qualname = obj.pickle_module, obj.pickle_name
            if self.proto >= 4:
                self.save(module)
                self.save(qualname)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(
                    pickle.GLOBAL
                    + module.encode("utf-8")
                    + b"\n"
                    + qualname.encode("utf-8")
                    + b"\n"
                )
            self.memoize(obj)
            return
        if obj is codecs.encode and self.proto < 3:
            # How protocol 2 spells bytes; the stock code writes '_codecs encode'.
            super().save_global(obj, name)
            return
        raise TypeError(
            f"the checkpoint writer only emits the official globals; got {obj!r}. "
            "Pass numpy arrays and str keys only"
        )


@dataclass(frozen=True)
class SavedCheckpoint:
    """What :func:`save_haiku_checkpoint` wrote."""

    path: Path
    size_bytes: int
    sha256: str
    protocol: int
    container: str
    wrapped: bool


def _leaf(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, (np.ndarray, np.generic)):
        hint = (
            " (convert torch tensors with .detach().cpu().numpy())"
            if (type(value).__module__.startswith("torch"))
            else ""
        )
        raise TypeError(
            f"{where} is a {type(value).__name__}, expected a numpy array{hint}"
        )
    array = np.asarray(value)
    code = f"{array.dtype.kind}{array.dtype.itemsize}"
    if code not in _NUMERIC_CODES:
        raise ValueError(
            f"{where} has dtype {array.dtype}, which the official layout cannot carry; "
            "use a bool, int, uint or float (16/32/64-bit) dtype, e.g. "
            "array.astype(np.float32)"
        )
    # Official files are C-ordered and little-endian; same values, canonical bytes.
    # (np.asarray copies only when needed and, unlike np.ascontiguousarray, keeps a
    # 0-d array 0-d.)
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def _two_level(
    tree: Mapping[str, Mapping[str, Any]], collection: str, container: str
) -> Any:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{collection} is a {type(tree).__name__}, expected a mapping "
            "{module: {param: array}}"
        )
    modules: Dict[str, Any] = {}
    for module in _sorted_keys(tree, collection):
        params = tree[module]
        if not isinstance(params, Mapping):
            raise TypeError(
                f"{collection}[{module!r}] is a {type(params).__name__}, expected a "
                "mapping {param: array}"
            )
        node = {
            name: _leaf(params[name], f"{collection}[{module!r}][{name!r}]")
            for name in _sorted_keys(params, f"{collection}[{module!r}]")
        }
        modules[module] = _FlatMappingNode(node) if container == "flatmapping" else node
    return _FlatMappingNode(modules) if container == "flatmapping" else modules


def _sorted_keys(mapping: Mapping[Any, Any], where: str) -> list:
    keys = list(mapping)
    for key in keys:
        if type(key) is not str:
            raise TypeError(
                f"{where} has a key of type {type(key).__name__}: {key!r}; keys "
                "must be str"
            )
    # Interned, so equal names ('w', 'b', ...) are one object and the pickler writes
    # them once and refers back to them, as in the official files, wherever the
    # strings came from.
    return sorted(sys.intern(key) for key in keys)


def save_haiku_checkpoint(
    path: Union[str, os.PathLike],
    params: Mapping[str, Mapping[str, np.ndarray]],
    state: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
    *,
    protocol: int = 3,
    container: str = "flatmapping",
    overwrite: bool = True,
) -> SavedCheckpoint:
    """Write ``params`` (and ``state``) in the official checkpoint layout, atomically.

    Args:
        path: output file; its folder must exist.
        params: ``{module_path: {param_name: numpy array}}``; arrays of a plain
            numeric dtype (finite values are not required here).
        state: ``None`` writes the params alone (language, flow, video layout);
            a mapping (possibly empty) writes ``{'params': ..., 'state': ...}``
            (ImageNet layout).
        protocol: pickle protocol, 2 to 5 (the official files are 3).
        container: ``"flatmapping"`` (Haiku's FlatMapping at every node) or
            ``"dict"`` (plain dicts).
        overwrite: False never replaces an existing file, also one another process
            creates while this one writes (``OutputError``).

    Returns:
        The path, size, sha256 and layout written.

    Raises:
        ValueError: bad protocol, container or dtype.
        TypeError: a node is not a mapping, a key not a str, a leaf not an array.
        ConverterError: the output folder is missing or not writable, or writing
            failed (nothing is left behind; an existing file is untouched).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {CONTAINERS}, not {container!r}")
    # Validate and arrange everything before the output file is created.
    top: Any = _two_level(params, "params", container)
    if state is not None:
        top = {"params": top, "state": _two_level(state, "state", container)}
    with atomic_write(path, overwrite=overwrite) as handle:
        writer = HashingWriter(handle)
        _HaikuPickler(writer, protocol).dump(top)
    return SavedCheckpoint(
        path=Path(path),
        size_bytes=writer.size,
        sha256=writer.hexdigest(),
        protocol=protocol,
        container=container,
        wrapped=state is not None,
    )


# Suffixes that say the file is not a pickle: an export named so is surely a slip
# (e.g. `export model.safetensors -o model.safetensors`).
OTHER_FORMAT_SUFFIXES = {
    ".safetensors": "safetensors",
    ".pt": "a torch.save file",
    ".pth": "a torch.save file",
    ".bin": "a PyTorch/HuggingFace weights file",
    ".onnx": "ONNX",
    ".json": "JSON",
    ".yaml": "YAML",
    ".yml": "YAML",
    ".npz": "a NumPy archive",
    ".npy": "a NumPy array",
    ".h5": "HDF5",
}


def check_pickle_suffix(out: Path) -> None:
    """Refuses a pickle output whose suffix names another format (exit 2)."""
    kind = OTHER_FORMAT_SUFFIXES.get(out.suffix.lower())
    if kind is not None:
        raise OutputError(
            f"refusing to write a Haiku pickle to {out}: the suffix {out.suffix} says "
            f"{kind}; name it *.pickle (the official files use .pickle or .pystate)"
        )
