"""Position encodings: trainable and Fourier (the reference's ``position_encoding.py``).

Fourier features follow the reference exactly: per index dimension d, positions in
[-1, 1]; frequencies ``linspace(1, max_resolution_d / 2, num_bands)``; features ordered
``[positions (d of them), sin(pi*pos_d*f_k) for d then k, cos(...) same order]``.
They are computed in float64 and cast once to the model's dtype (the reference's
float32 arithmetic is off by up to 1e-2 for the 30,720-sample audio encoding; in
bfloat16/float16 the features are thus correctly rounded values, with no error from
computing sines of large arguments in low precision) and, being independent of the
input, cached per module, device and dtype (not kept by copies, pickles and
``torch.save(model)``, which compute them again).

Every feature only depends on the coordinate along one dimension, so they are built
from small per-dimension tables gathered by index: cheap even for 802,816 queries.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


def grid_positions(size: int) -> Tensor:
    """Positions of a full grid axis: ``linspace(-1, 1, size)``, endpoints included.

    Returns (size,) float64.
    """
    return torch.linspace(-1.0, 1.0, size, dtype=torch.float64)


def subsampled_positions(size: int) -> Tensor:
    """Positions the reference gives subsampled decoder queries: ``-1 + 2*i/size``.

    Step 2/size, never reaching +1 (unlike ``grid_positions``: up to 8.9e-3 apart).
    Returns (size,) float64.
    """
    return -1.0 + 2.0 * torch.arange(size, dtype=torch.float64) / size


def unravel(flat_indices: Tensor, index_dims: Sequence[int]) -> Tensor:
    """Row-major unravel of flat indices over ``index_dims``: (n,) -> (n, d) int64.

    An index outside [0, prod(index_dims)) never wraps around to another point: its
    first coordinate is out of range (index_dims[0] for a negative index, not
    Python's count from the end), so that indexing a table with it fails, also in a
    graph (torch.jit.trace, torch.export, torch.compile, ONNX) where the models'
    eager range checks do not run.
    """
    flat_indices = flat_indices.to(torch.int64)
    dims = [int(size) for size in index_dims]
    coords = []
    rest = flat_indices
    for size in reversed(dims[1:]):
        coords.append(torch.remainder(rest, size))
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.append(torch.where(flat_indices < 0, dims[0], rest))
    return torch.stack(coords[::-1], dim=-1)


def fourier_channels(
    num_dims: int, num_bands: int, *, concat_pos: bool = True, sine_only: bool = False
) -> int:
    """Width of the Fourier features: d (positions) + d*K (sin) + d*K (cos)."""
    return (num_dims if concat_pos else 0) + num_dims * num_bands * (
        1 if sine_only else 2
    )


AxisTable = Tuple[Tensor, Tensor, Tensor]

# (kind, axis size, num_bands, resolution) -> (position (n,1), sin (n,K), cos (n,K));
# kind is "grid" (linspace positions) or "subsampled" (-1 + 2 i / n).
AxisTableFunction = Callable[[str, int, int, int], AxisTable]
# The override of the thread that opened an axis_tables_from block, for that thread
# alone: other threads' models (another verify, a pipeline) keep their own tables,
# and blocks of several threads may close in any order. The count of open blocks is
# plain module state, read first, so that torch.compile's guards see no override
# without tracing a thread-local lookup.
_axis_table_overrides = threading.local()
_override_blocks = 0
_override_lock = threading.Lock()


def _axis_table_override() -> Optional[AxisTableFunction]:
    """This thread's axis-table override, or None."""
    if not _override_blocks:
        return None
    return getattr(_axis_table_overrides, "function", None)


@contextlib.contextmanager
def axis_tables_from(function: AxisTableFunction) -> Iterator[None]:
    """Take every Fourier axis table from ``function`` inside the ``with`` block, in
    the thread that opened it (other threads' models are unaffected).

    A diagnostic for parity checks: feeding the JAX reference's own float32 tables
    separates the (documented) rounding of the official Fourier features from
    everything else the model computes. Caches are bypassed while it is active.
    """
    global _override_blocks
    previous = getattr(_axis_table_overrides, "function", None)
    _axis_table_overrides.function = function
    with _override_lock:
        _override_blocks += 1
    try:
        yield
    finally:
        with _override_lock:
            _override_blocks -= 1
        _axis_table_overrides.function = previous


def axis_table(
    positions: Tensor,
    *,
    num_bands: int,
    resolution: int,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> AxisTable:
    """Features of every index along one axis: (position (n,1), sin (n,K), cos (n,K)).

    positions: (n,) positions of the axis' indices. Frequencies are
    ``linspace(1, resolution/2, num_bands)``; everything is computed in float64 and
    cast once to ``dtype``.
    """
    positions = positions.to(torch.float64)
    freqs = torch.linspace(1.0, resolution / 2.0, num_bands, dtype=torch.float64)
    angles = math.pi * (positions[:, None] * freqs[None, :])  # (n, K)
    return tuple(
        t.to(dtype=dtype, device=device)
        for t in (positions[:, None], torch.sin(angles), torch.cos(angles))
    )


def gather_features(
    tables: Sequence[AxisTable],
    coords: Tensor,
    *,
    concat_pos: bool = True,
    sine_only: bool = False,
) -> Tensor:
    """Fourier features of points from per-axis tables: coords (n, d) int64 index of
    each point along each axis -> (n, C) ordered ``[pos_1..pos_d, sin (d-major, then
    k), cos (same order)]``."""
    pos_parts, sin_parts, cos_parts = [], [], []
    for d, (pos, sin, cos) in enumerate(tables):
        index = coords[:, d]
        pos_parts.append(pos[index])
        sin_parts.append(sin[index])
        if not sine_only:
            cos_parts.append(cos[index])
    return torch.cat((pos_parts if concat_pos else []) + sin_parts + cos_parts, dim=-1)


def truncated_normal_(tensor: Tensor, stddev: float = 0.02) -> Tensor:
    """Fills ``tensor`` like Haiku's ``TruncatedNormal(stddev)``: normal(0, stddev)
    cut at +-2 stddev (the reference's init of latents, learned positions, embeddings,
    paddings and mask tokens)."""
    return nn.init.trunc_normal_(tensor, std=stddev, a=-2 * stddev, b=2 * stddev)


class TrainablePositionEncoding(nn.Module):
    """A learned array ``embeddings`` (N, C), broadcast over the batch.

    Args (keyword-only):
        index_dim: number of positions N.
        num_channels: channels C.
        init_scale: std of the (truncated-normal) initialisation, 0.02 as the reference.
    """

    def __init__(self, *, index_dim: int, num_channels: int, init_scale: float = 0.02):
        super().__init__()
        self.embeddings = nn.Parameter(
            truncated_normal_(torch.empty(index_dim, num_channels), init_scale)
        )

    @property
    def num_channels(self) -> int:
        return self.embeddings.shape[1]

    def forward(self, batch_size: int, *, length: Optional[int] = None) -> Tensor:
        """Returns (B, N, C), or the first ``length`` positions (B, length, C)."""
        emb = self.embeddings if length is None else self.embeddings[:length]
        return emb.unsqueeze(0).expand(batch_size, -1, -1)


class FourierPositionEncoding(nn.Module):
    """Fourier features of a grid of positions (no parameters).

    Args (keyword-only):
        num_bands: frequency bands K per dimension.
        max_resolution: per-dimension maximum resolution (the highest frequency is
            max_resolution/2); may differ from the grid it encodes.
        concat_pos: prepend the raw positions (the reference's ``concat_pos``).
        sine_only: only sines (not used by the official models).
        cache_size: how many grids (shape, device, dtype) to keep, and as many
            per-axis tables of subsampled positions (copies and pickles of the
            module start without them).
    """

    def __init__(
        self,
        *,
        num_bands: int,
        max_resolution: Tuple[int, ...],
        concat_pos: bool = True,
        sine_only: bool = False,
        cache_size: int = 2,
    ) -> None:
        super().__init__()
        self.num_bands = num_bands
        self.max_resolution = tuple(int(r) for r in max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self.cache_size = cache_size
        self._cache: "OrderedDict[tuple, Tensor]" = OrderedDict()
        self._table_cache: "OrderedDict[tuple, List[AxisTable]]" = OrderedDict()

    def __getstate__(self):
        # The caches are derived data, as packed weights are: copies, pickles and
        # torch.save(model) start without them (a full-size flow model's grid
        # features are 188 MB, more than its weights).
        state = super().__getstate__()
        return dict(state, _cache=OrderedDict(), _table_cache=OrderedDict())

    # The caches are shared by every thread that runs the model (a web server's): each
    # step below is one OrderedDict operation, atomic on its own, and none assumes that
    # an entry it saw is still there at the next (another thread may have evicted it).
    @staticmethod
    def _recall(cache: "OrderedDict[tuple, Any]", key: tuple) -> Any:
        """The entry ``key`` of an LRU ``cache`` (marked most recent), or None."""
        value = cache.get(key)
        if value is not None:
            try:
                cache.move_to_end(key)
            except KeyError:  # evicted by another thread meanwhile: still a valid value
                pass
        return value

    def _remember(self, cache: "OrderedDict[tuple, Any]", key: tuple, value: Any) -> None:
        """Stores ``value`` in an LRU ``cache`` of ``cache_size`` entries."""
        cache[key] = value
        try:
            cache.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile
            pass
        while len(cache) > self.cache_size:
            try:
                cache.popitem(last=False)
            except KeyError:  # emptied by other threads meanwhile
                break

    @property
    def num_channels(self) -> int:
        """Output width: d + 2*d*K with d = len(max_resolution)."""
        return fourier_channels(
            len(self.max_resolution),
            self.num_bands,
            concat_pos=self.concat_pos,
            sine_only=self.sine_only,
        )

    def extra_repr(self) -> str:
        return f"num_bands={self.num_bands}, max_resolution={self.max_resolution}"

    def _tables(
        self,
        kind: str,
        index_dims: Tuple[int, ...],
        device: Optional[torch.device],
        dtype: torch.dtype,
        override: Optional[AxisTableFunction] = None,
    ) -> List[AxisTable]:
        """Per-axis tables of the grid ("grid": linspace positions) or of its
        subsampled positions ("subsampled"). The subsampled ones are cached (the
        grid's features are cached whole, by :meth:`grid`)."""
        if override is not None:
            return [
                tuple(
                    t.to(dtype=dtype, device=device)
                    for t in override(kind, size, self.num_bands, resolution)
                )
                for size, resolution in zip(index_dims, self.max_resolution)
            ]
        key = (kind, index_dims, str(device), dtype)
        tables = self._recall(self._table_cache, key)
        if tables is None:
            axis_positions = grid_positions if kind == "grid" else subsampled_positions
            # Cached across calls: never inference tensors, which autograd rejects.
            with torch.inference_mode(False):
                tables = [
                    axis_table(
                        axis_positions(size),
                        num_bands=self.num_bands,
                        resolution=resolution,
                        dtype=dtype,
                        device=device,
                    )
                    for size, resolution in zip(index_dims, self.max_resolution)
                ]
            if kind == "subsampled":
                self._remember(self._table_cache, key, tables)
        return tables

    def _check_dims(self, index_dims: Tuple[int, ...]) -> None:
        if len(index_dims) != len(self.max_resolution):
            raise ValueError(
                f"{len(index_dims)} index dimensions {index_dims} but max_resolution "
                f"{self.max_resolution} has {len(self.max_resolution)}"
            )

    def grid(
        self,
        index_dims: Sequence[int],
        *,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Features of the full grid ``index_dims`` (linspace positions), flattened
        row-major: (prod(index_dims), C). Cached."""
        index_dims = tuple(int(n) for n in index_dims)
        key = (index_dims, str(device), dtype)
        override = _axis_table_override()  # read once: the same answer throughout
        cached = None if override is not None else self._recall(self._cache, key)
        if cached is not None:
            return cached
        self._check_dims(index_dims)
        with torch.inference_mode(False):  # cached: not an inference tensor
            n = math.prod(index_dims)
            features = gather_features(
                self._tables("grid", index_dims, device, dtype, override),
                unravel(torch.arange(n, device=device), index_dims),
                concat_pos=self.concat_pos,
                sine_only=self.sine_only,
            )
        if override is not None:
            return features
        self._remember(self._cache, key, features)
        return features

    def subsampled(
        self,
        flat_indices: Tensor,
        index_dims: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Features of the points ``flat_indices`` (n,) of the grid ``index_dims`` at the
        reference's subsampled positions ``-1 + 2*i/N`` per dimension: (n, C)."""
        index_dims = tuple(int(n) for n in index_dims)
        self._check_dims(index_dims)
        return gather_features(
            self._tables(
                "subsampled", index_dims, flat_indices.device, dtype,
                _axis_table_override(),
            ),
            unravel(flat_indices, index_dims),
            concat_pos=self.concat_pos,
            sine_only=self.sine_only,
        )

    def forward(
        self,
        index_dims: Sequence[int],
        batch_size: int,
        *,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Grid features broadcast over the batch: (B, prod(index_dims), C)."""
        grid = self.grid(index_dims, device=device, dtype=dtype)
        return grid.unsqueeze(0).expand(batch_size, -1, -1)
