"""Decoder queries: what the decoder's cross-attention asks the latents about.

The reference builds them in each decoder's ``decoder_query``; here they are separate
modules (``output_queries`` of every task model): trainable arrays
(:class:`~perceiver_torch.position_encoding.TrainablePositionEncoding`), Fourier
features of an output grid (full or subsampled), the preprocessed input itself
(optical flow), and a multimodal container that pads every modality's queries to a
common width and concatenates them in sorted order.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .position_encoding import FourierPositionEncoding, TrainablePositionEncoding
from .preprocessors import PaddedModalities, concat_position


class FourierQueries(nn.Module):
    """Fourier features of the points of an output grid.

    Without indices, the full grid at the reference's ``linspace`` positions; with flat
    indices (``subsample``), those points at the reference's subsampled positions
    ``-1 + 2*i/N``. ``always_subsampled=True`` uses the subsampled positions for the full
    grid too (the video colab decodes every point that way, in chunks).

    Args (keyword-only):
        index_dims: the output grid, e.g. (16, 224, 224).
        num_bands: Fourier bands.
        max_resolution: Fourier max_resolution (may differ from index_dims).
        always_subsampled: see above.
    """

    def __init__(
        self,
        *,
        index_dims: Tuple[int, ...],
        num_bands: int,
        max_resolution: Tuple[int, ...],
        always_subsampled: bool = False,
    ) -> None:
        super().__init__()
        self.index_dims = tuple(int(n) for n in index_dims)
        self.always_subsampled = always_subsampled
        self.position_encoding = FourierPositionEncoding(
            num_bands=num_bands, max_resolution=tuple(max_resolution)
        )
        self.num_channels = self.position_encoding.num_channels

    @property
    def num_points(self) -> int:
        return math.prod(self.index_dims)

    def features(
        self,
        subsample: Optional[Tensor] = None,
        *,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Per-point features without batch: (n, C), computed in float64 and cast to
        ``dtype`` once."""
        if subsample is None and not self.always_subsampled:
            return self.position_encoding.grid(self.index_dims, device=device, dtype=dtype)
        if subsample is None:
            subsample = torch.arange(self.num_points, device=device)
        return self.position_encoding.subsampled(
            subsample.to(device), self.index_dims, dtype=dtype
        )

    def forward(
        self,
        batch_size: int,
        subsample: Optional[Tensor] = None,
        *,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """(B, n, C) with n = len(subsample) or every point."""
        return (
            self.features(subsample, device=device, dtype=dtype)
            .unsqueeze(0)
            .expand(batch_size, -1, -1)
        )


class InputQueries(nn.Module):
    """The preprocessed inputs themselves as queries (optical flow); no parameters."""

    def forward(self, preprocessed: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        return preprocessed


class TrainableQueries(TrainablePositionEncoding):
    """A trainable query array (N, C) (``embeddings``) broadcast over the batch."""

    def features(
        self,
        subsample: Optional[Tensor] = None,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        """(N, C) or the rows ``subsample``, in the parameter's dtype (``dtype`` is
        accepted for the same signature as :class:`FourierQueries`)."""
        return self.embeddings if subsample is None else self.embeddings[subsample]

    @property
    def num_points(self) -> int:
        return self.embeddings.shape[0]


class MultimodalQueries(PaddedModalities):
    """Per-modality queries, each padded with a trainable vector to a common width,
    concatenated in sorted modality order.

    Keys: ``modalities.{m}.*`` (parameters of the per-modality queries, e.g. the label's
    ``embeddings``), ``padding.{m}`` (width - C_m,), width = max_m C_m + min_padding.

    Args (keyword-only):
        modalities: {name: query module with ``num_channels`` and ``features()``}.
        min_padding: minimum padding (2 in the video model).
    """

    def modality_queries(
        self,
        name: str,
        batch_size: int,
        subsample: Optional[Tensor] = None,
        *,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """One modality's padded queries: (B, n_m, width), [features, padding], in
        the paddings' (the model's) dtype."""
        padding = self.padding[name]
        features = self.modalities[name].features(
            subsample, device=device, dtype=padding.dtype
        )
        features = features.unsqueeze(0).expand(batch_size, -1, -1)
        n = features.shape[1]
        return concat_position(features, padding.expand(n, -1))

    def forward(
        self,
        batch_size: int,
        subsample: Optional[Mapping[str, Optional[Tensor]]] = None,
        *,
        device: Optional[torch.device] = None,
    ) -> Tuple[Tensor, Dict[str, int]]:
        """Returns the queries (B, sum n_m, width) and {modality: n_m} (sorted order)."""
        subsample = subsample or {}
        parts, sizes = [], {}
        for name in self.modalities:
            q = self.modality_queries(
                name, batch_size, subsample.get(name), device=device
            )
            sizes[name] = q.shape[1]
            parts.append(q)
        return torch.cat(parts, dim=1), sizes
