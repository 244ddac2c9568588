"""Optical flow between two frames (``optical_flow_checkpoint.pystate``)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .configs import OpticalFlowConfig
from .decoders import PerceiverDecoder
from .perceiver import PerceiverIO
from .postprocessors import FlowPostprocessor
from .preprocessors import FlowPatchPreprocessor
from .queries import InputQueries


def tile_starts(size: int, tile: int, min_overlap: int) -> List[int]:
    """Tile origins along one axis: a step of ``tile - min_overlap``, the last tile
    flush with the border (the colab's ``compute_grid_indices``, without its duplicate
    or overhanging tiles)."""
    if size < tile:
        raise ValueError(f"image axis of {size} px is smaller than the {tile} px tile")
    if min_overlap >= tile:
        raise ValueError(
            f"min_overlap {min_overlap} must be smaller than the tile {tile}"
        )
    return list(range(0, size - tile, tile - min_overlap)) + [size - tile]


def tile_weights(height: int, width: int) -> Tensor:
    """Blending weights of a tile: min(x+1, W-x, y+1, H-y), (H, W) float32."""
    y = torch.arange(height)
    x = torch.arange(width)
    wy = torch.minimum(y + 1, height - y)[:, None]
    wx = torch.minimum(x + 1, width - x)[None, :]
    return torch.minimum(wy, wx).to(torch.float32)


class OpticalFlow(PerceiverIO):
    """Flow from two frames in [-1, 1].

    Every pixel's 3x3 patches of both frames (54 values) are projected to 64 channels
    and concatenated with Fourier features (max_resolution = ``config.image_size``); the
    decoder's queries are these preprocessed inputs themselves, decoded in chunks. The
    network's output is divided by ``rescale_factor`` (inside the reference model) and
    multiplied by ``flow_scale`` (the colab) to give pixels. Any frame size works (the
    Fourier grid follows the input); :meth:`tiled` reproduces the colab's tiling for
    frames larger than the training size.
    """

    model_name = "optical_flow"

    def __init__(self, config: Optional[OpticalFlowConfig] = None) -> None:
        config = config or OpticalFlowConfig()
        super().__init__(config)
        c = config
        self.input_preprocessor = FlowPatchPreprocessor(
            max_resolution=c.image_size,
            num_bands=c.num_bands,
            channels=c.patch_channels,
        )
        channels = self.input_preprocessor.num_channels
        self.encoder = self._build_encoder(
            input_channels=channels, num_self_attends_per_block=c.num_self_attends
        )
        self.output_queries = InputQueries()
        self.decoder = PerceiverDecoder(
            query_channels=channels,
            latent_channels=c.d_latents,
            output_channels=2,
            # The official decoder keeps BasicDecoder's default of one head.
            num_heads=1,
            use_query_residual=False,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
        )
        self.output_postprocessor = FlowPostprocessor(
            rescale_factor=c.rescale_factor, flow_scale=c.flow_scale
        )

    def forward(self, frames: Tensor) -> Tensor:
        """frames: (B, 2, 3, H, W) in [-1, 1] -> flow in pixels (B, 2, H, W)
        (channel 0 horizontal, 1 vertical, as the reference)."""
        preprocessed = self.input_preprocessor(frames)
        latents = self.encoder(preprocessed)
        decoded = self.decoder(self.output_queries(preprocessed), latents)
        return self.output_postprocessor(decoded, tuple(frames.shape[-2:]))

    def tiled(
        self,
        frames: Tensor,
        *,
        tile_size: Optional[Tuple[int, int]] = None,
        min_overlap: int = 20,
    ) -> Tensor:
        """Flow of frames larger than the training size, as the colab computes it.

        Tiles of ``tile_size`` (default ``config.image_size``) overlapping by at least
        ``min_overlap`` px, the last one flush with the border, blended with weights
        min(x+1, W-x, y+1, H-y) inside each tile. frames: (B, 2, 3, H, W) with H, W at
        least the tile size -> (B, 2, H, W) in the model's dtype.

        The blending sums are float32 whatever the model's dtype: the weights reach
        min(H, W)/2 = 184 and a pixel sums up to four tiles, beyond the integers
        bfloat16 holds exactly (256) at its 3 significant digits.
        """
        th, tw = tile_size or self.config.image_size
        height, width = frames.shape[-2:]
        sum_dtype = torch.promote_types(self.dtype, torch.float32)
        weights = tile_weights(th, tw).to(device=frames.device, dtype=sum_dtype)
        flow = frames.new_zeros(frames.shape[0], 2, height, width, dtype=sum_dtype)
        total = frames.new_zeros(height, width, dtype=sum_dtype)
        for y in tile_starts(height, th, min_overlap):
            for x in tile_starts(width, tw, min_overlap):
                piece = self(frames[..., y : y + th, x : x + tw])
                flow[..., y : y + th, x : x + tw] += piece.to(sum_dtype) * weights
                total[y : y + th, x : x + tw] += weights
        return (flow / total).to(self.dtype)
