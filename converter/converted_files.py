"""Writing and reading converted checkpoints (safetensors first, ``.pt`` second).

The safetensors file is written by streaming: the header (every name, dtype, shape and
offset, plus the provenance metadata) is known from the mapping plan before any data is
produced, so each tensor is converted, written and released in turn. The reference
library's ``save_file`` needs every tensor in memory at once and copies them again
while serialising; streaming keeps the peak memory of converting the 804 MB language
checkpoint close to the size of the checkpoint itself. Files are read back with the
``safetensors`` library, which validates the layout.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch

from converter.atomic import atomic_write, refuse_bare_suffix
from converter.errors import CheckpointError, OutputError
from perceiver_torch.registry import safetensors_name

# dtype names used on the command line -> torch dtypes.
TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_SAFETENSORS_DTYPES: Mapping[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}

_NUMPY_TO_TORCH: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}


def output_format(path: Path) -> str:
    """``safetensors`` or ``pt`` from the file suffix; anything else is a usage error."""
    refuse_bare_suffix(path)  # ".pt" has no suffix to pathlib
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "pt"
    raise OutputError(
        f"{path}: unknown output format {suffix or '(no suffix)'!r}; "
        "name the file *.safetensors (recommended) or *.pt"
    )


def cast_for_output(array: np.ndarray, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A numpy array as a contiguous torch tensor, floats cast to ``dtype`` if given.

    Integer tensors (BatchNorm's update counter) keep their dtype.
    """
    # np.asarray, not np.ascontiguousarray, which makes a 0-d array (BatchNorm's
    # counter) shape (1,); it copies only a non-contiguous array.
    tensor = torch.from_numpy(np.asarray(array, order="C"))
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def output_dtype(array_dtype: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    base = _NUMPY_TO_TORCH[array_dtype]
    if dtype is not None and base.is_floating_point:
        return dtype
    return base


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy."""
    tensor = tensor.reshape(-1)
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the same bits as int16.
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def metadata_text(value: str) -> str:
    """``value`` as valid UTF-8 text for a safetensors header. A file name that is not
    UTF-8 (Python holds its bytes as lone surrogates, also names like café.pickle in
    an ASCII locale) made a header that safetensors' JSON parser refuses: the file
    written could not be read back. Valid UTF-8 bytes become their characters again,
    others backslash escapes (``\\xff``)."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def header_metadata(metadata: Mapping[str, str]) -> Dict[str, str]:
    """``metadata`` with every key and value :func:`metadata_text`."""
    return {metadata_text(k): metadata_text(v) for k, v in metadata.items()}


def write_safetensors_streaming(
    path: Path,
    layout: Iterable[Tuple[str, Tuple[int, ...], torch.dtype]],
    arrays: Iterator[Tuple[str, np.ndarray]],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = True,
) -> int:
    """Writes a safetensors file from a known layout and a stream of arrays.

    ``layout`` lists ``(name, shape, dtype)`` in the order ``arrays`` yields them.
    The arrays may be strided views (an untransposed Linear kernel) of any float
    dtype: each is copied, transposed and cast in one pass into one of a few reusable
    buffers, which a second thread writes while the next tensor is prepared; arrays
    already in their final layout are written straight from their memory. Returns
    the number of bytes written. ``overwrite=False``: see
    :func:`~converter.atomic.atomic_write`.
    """
    layout = list(layout)
    header: Dict[str, Any] = {"__metadata__": header_metadata(metadata)}
    offset, largest = 0, 0
    for name, shape, dtype in layout:
        nbytes = (
            int(np.prod(shape, dtype=np.int64))
            * torch.empty((), dtype=dtype).element_size()
        )
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        largest = max(largest, nbytes)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The format pads the header with spaces so the data starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)

    def produce(writer: "_BackgroundWriter") -> None:
        expected = iter(layout)
        for name, array in arrays:
            want_name, want_shape, want_dtype = next(expected)
            source = torch.from_numpy(array)
            if (
                name != want_name
                or tuple(source.shape) != tuple(want_shape)
                or (source.is_floating_point() != want_dtype.is_floating_point)
            ):
                raise RuntimeError(
                    f"internal error: tensor {name} {tuple(source.shape)} "
                    f"{source.dtype} does not match the planned {want_name} "
                    f"{tuple(want_shape)} {want_dtype}"
                )
            if source.is_contiguous() and source.dtype == want_dtype:
                writer.write(_tensor_bytes(source))
            else:
                buffer = writer.take_buffer()
                size = source.numel() * torch.empty((), dtype=want_dtype).element_size()
                target = torch.from_numpy(buffer[:size]).view(want_dtype)
                target.view(source.shape).copy_(source)
                writer.write(_tensor_bytes(target), release=buffer)
        if next(expected, None) is not None:
            raise RuntimeError("internal error: fewer tensors than planned")

    with atomic_write(path, overwrite=overwrite) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        with _BackgroundWriter(handle, buffer_size=largest) as writer:
            produce(writer)
    return 8 + len(encoded) + offset


class _BackgroundWriter:
    """Writes buffers on a second thread, so preparing tensor i+1 overlaps writing
    tensor i (file writes release the GIL). A few output buffers of ``buffer_size``
    bytes circulate between the two threads: reusing them avoids page-faulting fresh
    memory for every tensor (a second for the 800 MB language model)."""

    def __init__(self, handle: Any, buffer_size: int, buffers: int = 3) -> None:
        self._handle = handle
        self._buffer_size = max(buffer_size, 1)
        self._pending: "queue.Queue[Any]" = queue.Queue(maxsize=buffers)
        self._free: "queue.Queue[np.ndarray]" = queue.Queue()
        self._made = 0
        self._limit = buffers
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            data, buffer = item
            if self._error is None:
                try:
                    self._handle.write(data)
                except BaseException as error:  # reported to the producer
                    self._error = error
            if buffer is not None:
                self._free.put(buffer)

    def take_buffer(self) -> np.ndarray:
        """A free output buffer (blocks until the writer returns one)."""
        if self._error is not None:
            raise self._error
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < self._limit:
                self._made += 1
                return np.empty(self._buffer_size, dtype=np.uint8)
        return self._free.get()

    def write(self, data: Any, release: Optional[np.ndarray] = None) -> None:
        if self._error is not None:
            raise self._error
        self._pending.put((data, release))

    def __enter__(self) -> "_BackgroundWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # Always stop the thread (also when the producer failed), then report a write
        # error; atomic_write removes the temporary file either way.
        self._pending.put(None)
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error


def write_pt(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = True,
) -> None:
    """A ``.pt`` file loadable with ``torch.load(path, weights_only=True)``;
    ``overwrite=False``: see :func:`~converter.atomic.atomic_write`."""
    payload = {
        "model": metadata["model"],
        "config": json.loads(metadata["config"]),
        "state_dict": dict(state_dict),
        "metadata": dict(metadata),
    }
    with atomic_write(path, overwrite=overwrite) as handle:
        try:
            torch.save(payload, handle)
        except RuntimeError as error:
            # torch's zip writer finishes the archive in a ``finally`` and, the
            # stream being short, raises "[enforce fail at inline_container.cc] ...
            # unexpected pos" over what stopped the write: report that (Ctrl-C: exit
            # 130; a full disk: atomic_write's one line), not an internal error.
            hidden = error.__context__
            if isinstance(hidden, (KeyboardInterrupt, OSError)):
                raise hidden from None
            raise


def read_converted(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads a converted file: ``(state_dict, metadata)``; clear errors for other files."""
    from perceiver_torch.registry import (
        EmptyFileError,
        LoadError,
        folder_refusal,
        read_checkpoint,
    )

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_refusal(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return read_checkpoint(path)
    except EmptyFileError as error:  # no question of who wrote it
        raise CheckpointError(str(error)) from None
    except LoadError as error:
        hint = _transformers_checkpoint_hint(path)
        if hint is not None:
            raise CheckpointError(f"{path}: {hint}") from None
        if "perceiver-convert" in str(error):  # it says what the file is, and the fix
            raise CheckpointError(str(error)) from None
        raise CheckpointError(
            f"{error}; was it written by `perceiver-convert convert`?"
        ) from None
    except Exception as error:  # safetensors and torch raise many types for bad files
        raise CheckpointError(
            f"{path}: cannot read it as a converted checkpoint ({type(error).__name__}: "
            f"{error}); convert an official file with `perceiver-convert convert` first"
        ) from error


def _transformers_checkpoint_hint(path: Path) -> Optional[str]:
    """What to do with a HuggingFace Perceiver checkpoint given where a converted file
    is expected (``perceiver_torch.registry.transformers_weights_advice``: its
    folder's config.json, or, for safetensors, its tensors' ``perceiver.`` names), or
    None for other files."""
    from perceiver_torch.registry import transformers_weights_advice

    names: list = []
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors import safe_open

            with safetensors_name(path) as name, safe_open(name, framework="np") as handle:
                names = list(handle.keys())
        except Exception:  # not safetensors: the reader's own message stands
            pass
    return transformers_weights_advice(path, names=names)
