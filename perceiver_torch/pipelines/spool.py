"""Arrays kept on disk as they are computed, for the outputs of ``run`` that need the
whole of them (flow of a video: the wheel's scale and ``--npy``/``--npz``;
autoencode: the ``.wav`` and ``--npy``/``--npz``), so that memory holds one item
(a flow, a clip), not all of them.

A :class:`DiskSpool` appends rows of one shape and dtype to an anonymous temporary
file in the output's folder, then gives them back one at a time or copies them out
behind a ``.npy`` header (:meth:`DiskSpool.write_npy`; several into one ``.npz``:
:func:`write_npz`), with the bytes ``np.save``/``np.savez`` write for the stacked
array.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Tuple

import numpy as np

from .base import PipelineError

__all__ = ["DiskSpool", "write_npz"]

_COPY_CHUNK = 1 << 20  # bytes a copy step, whatever a row's size


class DiskSpool:
    """Rows (each of ``row_shape``, one dtype) on disk rather than in memory, in the
    order they were appended.

    The file has no name (``tempfile.TemporaryFile``: removed from its folder at
    once on POSIX, on close on Windows) and is closed by the ``with`` block however
    the run ends, so a failed or interrupted run leaves nothing (a killed one
    neither, on POSIX). It grows with the rows: nothing is reserved for a count
    given in advance (a video's declared frame count, which a cut file overstates
    and a damaged header can make absurd).

    Args:
        folder: where the file is made: the output's, not the system's temporary
            folder, which is often a tmpfs, in memory (which this file is to spare),
            or a small partition, while the output's folder is where the user chose
            to put a large result (a ``.npy`` as large as this file) and the CLI
            checked it writable before the model ran.
        what: the rows, for the error message ("the flows").
        why: why they are kept, for the error message.

    Raises:
        PipelineError: the file cannot be made or written (disk full), naming the
            folder and the rows kept so far.
    """

    def __init__(self, folder: Path, what: str, why: str) -> None:
        self.folder = Path(folder)
        self.what, self.why = what, why
        self.rows = 0
        self.row_shape: Tuple[int, ...] = ()
        self.dtype = np.dtype(np.float32)
        try:
            self._file = tempfile.TemporaryFile(dir=self.folder)
        except OSError as error:
            raise self._failed(error) from error

    def __enter__(self) -> "DiskSpool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # The rows are thrown away: a close whose flush fails (the full disk that
        # append has reported) frees the file all the same, and says nothing new.
        with contextlib.suppress(OSError):
            self._file.close()

    def _failed(self, error: OSError) -> PipelineError:
        return PipelineError(
            f"keeping {self.what} on disk in {self.folder} failed after {self.rows} of "
            f"them: {error.strerror or error}; free disk space there or give -o in a "
            f"folder with room ({self.why})"
        )

    def append(self, rows: np.ndarray) -> None:
        """Adds ``rows`` (n, *row_shape); the first call sets the row shape and dtype."""
        if self.rows == 0:
            self.row_shape, self.dtype = tuple(int(n) for n in rows.shape[1:]), rows.dtype
        elif tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(
                f"rows of {rows.dtype} {tuple(rows.shape[1:])} after rows of "
                f"{self.dtype} {self.row_shape}"
            )
        try:
            self._file.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
            # Now, not at the next seek or at close: what the file buffers (a row under
            # its 8 KiB, a short write's rest) would meet a full disk there, as a bare
            # OSError.
            self._file.flush()
        except OSError as error:
            raise self._failed(error) from error
        self.rows += len(rows)

    def _row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __iter__(self) -> Iterator[np.ndarray]:
        """Each row, read back as a new array when it is asked for."""
        size = self._row_bytes()
        for index in range(self.rows):
            row = np.empty(self.row_shape, self.dtype)
            self._file.seek(index * size)  # the next row whatever read the file since
            read = self._file.readinto(memoryview(row).cast("B"))
            assert read == size  # the file holds what append wrote
            yield row

    def copy_to(self, handle: BinaryIO) -> None:
        """The rows' bytes (C order, native byte order), in order, into ``handle``."""
        self._file.seek(0)
        shutil.copyfileobj(self._file, handle, _COPY_CHUNK)

    def write_npy(self, handle: BinaryIO) -> None:
        """The ``.npy`` of the rows stacked, (rows, *row_shape), into ``handle``: the
        bytes ``np.save`` writes for that stack, without the stack."""
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.row_shape),
        }
        # Version 1.0, as np.save chooses for any header under 64 KiB (these are about
        # 100 bytes).
        np.lib.format.write_array_header_1_0(handle, header)
        self.copy_to(handle)


def write_npz(handle: BinaryIO, **spools: DiskSpool) -> None:
    """``np.savez(handle, NAME=stack, ...)`` of the spools' rows: a ZIP of stored
    members ``NAME.npy`` in that order, each opened with ``force_zip64`` (its size is
    not known in advance) and its ``.npy`` streamed in; ``np.load`` reads it as
    ``np.savez``'s."""
    with zipfile.ZipFile(
        handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True
    ) as archive:
        for name, spool in spools.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                spool.write_npy(member)
