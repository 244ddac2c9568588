"""Position encodings of the official Perceiver IO, restated in Haiku.

Three kinds exist in the released models:

* :class:`TrainablePositionEncoding`: a learned ``pos_embs`` table [N, C]. It is also
  how the official code stores every learned vector that is not a position at all
  (latent array, decoder queries, multimodal padding and mask tokens), which is why
  those parameters are all called ``pos_embs``.
* :class:`FourierPositionEncoding`: parameter-free sine/cosine features of positions
  in [-1, 1] (:func:`fourier_features`).
* :class:`PositionEncodingProjector`: a Linear on top of another encoding (ImageNet
  with learned positions).

Everything here is computed with jax in float32 exactly like the official code
(``jnp.linspace`` grids and frequencies, vmapped over the batch), because a float32
re-derivation with different operations drifts by up to 1e-2 on the audio encoding
(frequencies up to 15360): the reference must produce the same bits, not merely
close values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp


def linear_positions(index_dims: Sequence[int]) -> jax.Array:
    """Grid of positions in [-1, 1] (both ends included) over ``index_dims``.

    Args:
      index_dims: the grid's shape (d_1, ..., d_n).

    Returns:
      float32 [d_1, ..., d_n, n]; entry [i_1, ..., i_n] is
      (linspace(-1, 1, d_1)[i_1], ..., linspace(-1, 1, d_n)[i_n]).
    """
    # jnp.linspace rather than an arithmetic formula: XLA evaluates linspace with
    # its own constants, and the reference must reproduce those bits.
    axes = [
        jnp.linspace(-1.0, 1.0, num=n, endpoint=True, dtype=jnp.float32)
        for n in index_dims
    ]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def subsampled_positions(points: jax.Array, index_dims: Sequence[int]) -> jax.Array:
    """Positions of selected flat indices of a grid, as the official decoders map them.

    The official subsampled decoder query maps grid index ``i`` of a dimension of size
    ``n`` to ``-1 + 2 * i / n`` (step 2/n, +1 never reached), which is *not* the
    ``linspace(-1, 1, n)`` grid of :func:`linear_positions` (step 2/(n-1)). The two
    differ by up to 9e-3 on the video queries; the official behaviour is kept.

    Args:
      points: int [P] flat (row-major) indices into a grid of shape ``index_dims``.
      index_dims: the grid's shape (d_1, ..., d_n).

    Returns:
      float32 [P, n].
    """
    coords = jnp.stack(jnp.unravel_index(points, tuple(index_dims)), axis=1)
    # The official int32 / int32 true division happens in float32; the explicit
    # casts (exact for grid indices) give the same bits and keep float32 even when
    # jax runs with x64 enabled.
    coords = coords.astype(jnp.float32)
    dims = jnp.array(tuple(index_dims), dtype=jnp.float32)
    return -1 + 2 * coords / dims[None, :]


def fourier_features(
    pos: jax.Array,
    num_bands: int,
    max_resolution: Sequence[int],
    concat_pos: bool = True,
    sine_only: bool = False,
) -> jax.Array:
    """Sine/cosine features of points, with linearly spaced frequencies.

    Frequencies of dimension j are ``linspace(1, max_resolution[j] / 2, num_bands)``
    (up to the Nyquist frequency of ``max_resolution``, which may differ from the grid
    being encoded).

    Args:
      pos: float32 [P, d] positions (normally in [-1, 1]).
      num_bands: K, the number of frequencies per dimension.
      max_resolution: d resolutions fixing the highest frequency of each dimension.
      concat_pos: put the raw positions first.
      sine_only: sines only (no cosines).

    Returns:
      float32 [P, C] with C = d * (concat_pos) + d * K * (1 if sine_only else 2),
      ordered [pos_1..pos_d, sin(pi f_k pos_j) for j then k, cos(...) same order].
    """
    if len(max_resolution) != pos.shape[-1]:
        raise ValueError(
            f"max_resolution {tuple(max_resolution)} has {len(max_resolution)} "
            f"entries but the positions have {pos.shape[-1]} dimensions"
        )
    freqs = jnp.stack(
        [
            # float32 is jax's default here; explicit so x64 mode changes nothing.
            jnp.linspace(1.0, res / 2, num=num_bands, endpoint=True, dtype=jnp.float32)
            for res in max_resolution
        ],
        axis=0,
    )  # [d, K]
    scaled = pos[:, :, None] * freqs[None, :, :]  # [P, d, K]
    scaled = jnp.reshape(scaled, [-1, math.prod(scaled.shape[1:])])  # j-major, k-minor
    if sine_only:
        feats = jnp.sin(jnp.pi * scaled)
    else:
        feats = jnp.concatenate(
            [jnp.sin(jnp.pi * scaled), jnp.cos(jnp.pi * scaled)], axis=-1
        )
    if concat_pos:
        feats = jnp.concatenate([pos, feats], axis=-1)
    return feats


def fourier_num_channels(
    num_dims: int, num_bands: int, concat_pos: bool = True, sine_only: bool = False
) -> int:
    """Width of :func:`fourier_features` for ``num_dims`` dimensions."""
    return num_dims * int(concat_pos) + num_dims * num_bands * (1 if sine_only else 2)


class TrainablePositionEncoding(hk.Module):
    """A learned table ``pos_embs`` [index_dim, num_channels] broadcast over a batch."""

    def __init__(
        self,
        index_dim: int,
        num_channels: int = 128,
        init_scale: float = 0.02,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._index_dim = int(index_dim)
        self._num_channels = int(num_channels)
        self._init_scale = init_scale

    def __call__(
        self, batch_size: Optional[int], pos: Optional[jax.Array] = None
    ) -> jax.Array:
        """Returns [batch_size, index_dim, num_channels] ([index_dim, C] if None).

        ``pos`` is accepted for interface parity with the Fourier encoding and ignored.
        """
        del pos
        table = hk.get_parameter(
            "pos_embs",
            [self._index_dim, self._num_channels],
            init=hk.initializers.TruncatedNormal(stddev=self._init_scale),
        )
        if batch_size is None:
            return table
        return jnp.broadcast_to(table[None], (batch_size,) + table.shape)


def pad_to_width(x: jax.Array, width: int, name: str) -> jax.Array:
    """[B, N, C] -> [B, N, width]: appends the official multimodal padding, a trainable
    one-position encoding of width - C channels (module ``name``, created in the
    calling module's scope) shared by every token."""
    batch, n, channels = x.shape
    pad = TrainablePositionEncoding(
        1, num_channels=width - channels, init_scale=0.02, name=name
    )(batch)
    return jnp.concatenate(
        [x, jnp.broadcast_to(pad, [batch, n, width - channels])], axis=2
    )


class FourierPositionEncoding(hk.Module):
    """Parameter-free Fourier features of a grid (or of given positions)."""

    def __init__(
        self,
        index_dims: Optional[Sequence[int]],
        num_bands: int,
        max_resolution: Optional[Sequence[int]] = None,
        concat_pos: bool = True,
        sine_only: bool = False,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._index_dims = None if index_dims is None else tuple(index_dims)
        self._num_bands = num_bands
        self._max_resolution = tuple(max_resolution or index_dims)
        self._concat_pos = concat_pos
        self._sine_only = sine_only

    def __call__(self, batch_size: int, pos: Optional[jax.Array] = None) -> jax.Array:
        """Features [batch_size, P, C].

        Args:
          batch_size: B.
          pos: optional float32 [B, P, d] positions; default: the whole
            :func:`linear_positions` grid of ``index_dims`` flattened row-major.
        """
        if pos is None:
            grid = linear_positions(self._index_dims)
            grid = jnp.broadcast_to(grid[None], (batch_size,) + grid.shape)
            pos = jnp.reshape(grid, [batch_size, math.prod(self._index_dims), -1])
        # fourier_features checks the positions' dimensions against max_resolution.
        features = functools.partial(
            fourier_features,
            num_bands=self._num_bands,
            max_resolution=self._max_resolution,
            concat_pos=self._concat_pos,
            sine_only=self._sine_only,
        )
        # Per-example computation mapped over the batch, as the official encoder does;
        # the primitives (and so the bits) are the same as the reference's.
        return jax.vmap(features, 0, 0)(pos)


class PositionEncodingProjector(hk.Module):
    """A Linear (``linear``) applied to another position encoding."""

    def __init__(
        self,
        output_size: int,
        base_position_encoding: hk.Module,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._output_size = output_size
        self._base = base_position_encoding

    def __call__(self, batch_size: int, pos: Optional[jax.Array] = None) -> jax.Array:
        """[batch_size, N, output_size]."""
        base = self._base(batch_size, pos)
        # Created here, in __call__, so its path is ``<projector>/linear``.
        return hk.Linear(output_size=self._output_size)(base)


@dataclasses.dataclass(frozen=True)
class PositionEncodingSpec:
    """What position encoding to build once the index dimensions are known.

    Preprocessors and decoders learn their grid only when they see their input, so
    they hold a spec and call :meth:`build` then; the modules are created in the
    caller's current method, which is what puts them under the official paths (e.g.
    ``image_preprocessor/~_build_network_inputs/trainable_position_encoding``).

    Attributes:
      kind: ``"trainable"`` or ``"fourier"``.
      num_channels: width of a trainable table.
      init_scale: stddev of a trainable table's truncated-normal initialiser.
      num_bands: Fourier bands per dimension.
      max_resolution: Fourier resolution (defaults to the grid's own dims).
      project_to: if > 0, a Linear projects the encoding to this width.
    """

    kind: str
    num_channels: Optional[int] = None
    init_scale: float = 0.02
    num_bands: Optional[int] = None
    max_resolution: Optional[Sequence[int]] = None
    project_to: int = -1

    def __post_init__(self):
        if self.kind not in ("trainable", "fourier"):
            raise ValueError(f"unknown position encoding kind {self.kind!r}")

    def build(
        self, index_dims: Sequence[int]
    ) -> Union[
        TrainablePositionEncoding, FourierPositionEncoding, PositionEncodingProjector
    ]:
        """Creates the encoding module(s) for a grid of shape ``index_dims``."""
        index_dims = tuple(int(d) for d in index_dims)
        if self.kind == "trainable":
            # A trainable table is flat: one row per grid point.
            enc = TrainablePositionEncoding(
                index_dim=math.prod(index_dims),
                num_channels=self.num_channels,
                init_scale=self.init_scale,
                name="trainable_position_encoding",
            )
        else:
            enc = FourierPositionEncoding(
                index_dims=index_dims,
                num_bands=self.num_bands,
                max_resolution=self.max_resolution,
                name="fourier_position_encoding",
            )
        if self.project_to > 0:
            enc = PositionEncodingProjector(
                self.project_to, enc, name="position_encoding_projector"
            )
        return enc
