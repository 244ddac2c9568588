"""Optical flow between two frames (``optical_flow_checkpoint.pystate``)."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .configs import OpticalFlowConfig
from .decoders import PerceiverDecoder
from .inputs import expect, expect_positive_int, fail
from .micro_batches import micro_batched
from .perceiver import PerceiverIO
from .postprocessors import FlowPostprocessor
from .preprocessors import FlowPatchPreprocessor
from .queries import InputQueries


def tile_starts(size: int, tile: int, min_overlap: int) -> List[int]:
    """Tile origins along one axis, as the colab's ``compute_grid_indices`` lists them.

    The colab takes ``list(range(0, size, tile - min_overlap))`` and replaces its last
    element by ``size - tile`` (the last tile flush with the border). So:

    * an origin can repeat: when ``size % step == min_overlap`` (``step = tile -
      min_overlap``; e.g. ``size == tile`` gives ``[0, 0]``, 716 px with 368 px tiles
      ``[0, 348, 348]``), the second-last origin already equals
      ``size - tile`` and the colab computes that tile twice, which doubles its weight
      in the blend. The repeat is kept: it changes the result wherever other tiles
      overlap the repeated one.
    * when ``0 < size % step < min_overlap``, the colab's second-last (or earlier)
      origins lie past ``size - tile``; its own code then fails (a tile cut short by
      the border does not match its weights). Here such origins are clamped to
      ``size - tile``: more repeats of the last tile, the continuation of the case
      above.

    Examples: (436, 368, 20) -> [0, 68]; (1024, 496, 20) -> [0, 476, 528];
    (368, 368, 20) -> [0, 0]; (716, 368, 20) -> [0, 348, 348].
    """
    if size < tile:
        raise ValueError(f"image axis of {size} px is smaller than the {tile} px tile")
    if not 0 <= min_overlap < tile:
        # A negative overlap steps past the tile's end: pixels between tiles that no
        # tile covers.
        raise ValueError(
            f"min_overlap {min_overlap} must be from 0 to the tile {tile} - 1"
        )
    starts = list(range(0, size, tile - min_overlap))
    starts[-1] = size - tile
    return [min(start, size - tile) for start in starts]


def min_overlap_problem(min_overlap: Any, tile: Tuple[int, int]) -> Optional[str]:
    """Why ``min_overlap`` cannot tile frames with ``tile`` (height, width) tiles, or
    None when it can: it must be an integer from 0 to the smaller side - 1.

    An overlap of the tile's side or more never steps forward; a negative one steps
    past the tile's end and leaves pixels that no tile covers, whose blend is 0 / 0
    (NaN). :meth:`OpticalFlow.tiled` and the flow pipeline refuse both with this
    message.
    """
    integral = isinstance(min_overlap, numbers.Integral) and not isinstance(min_overlap, bool)
    if integral and 0 <= min_overlap < min(tile):
        return None
    return (
        f"min_overlap must be between 0 and {min(tile) - 1} for {tile[0]}x{tile[1]} "
        f"tiles (an integer), got {min_overlap!r}"
    )


def tile_grid(
    height: int, width: int, tile: Tuple[int, int], min_overlap: int
) -> List[Tuple[int, int, int]]:
    """The colab's tile grid as distinct origins with their multiplicity:
    ``[(y, x, count)]`` in the colab's order (rows, then columns; first occurrence).

    ``count`` is how often the colab's ``itertools.product(ys, xs)`` lists the origin
    (see :func:`tile_starts`); a tile listed ``count`` times is computed once and
    weighted ``count`` times, which is the same blend.
    """
    counts: Dict[Tuple[int, int], int] = {}
    for y in tile_starts(height, tile[0], min_overlap):
        for x in tile_starts(width, tile[1], min_overlap):
            counts[(y, x)] = counts.get((y, x), 0) + 1
    return [(y, x, n) for (y, x), n in counts.items()]


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

    def check_inputs(self, frames: Tensor) -> None:
        """Raises ``InputError`` unless frames is a float (B, 2, 3, H, W) pair."""
        expect(
            type(self).__name__,
            "frames",
            frames,
            (("B", None), ("2", 2), ("3", 3), ("H", None), ("W", None)),
            what="two RGB frames in [-1, 1]",
            floating=True,
            channels_axis=2,
        )

    def tokens_per_item(self, first_input: Tensor) -> int:
        """One token per pixel of a frame pair."""
        return first_input.shape[-2] * first_input.shape[-1]

    @micro_batched("frames")
    def forward(self, frames: Tensor) -> Tensor:
        """frames: (B, 2, 3, H, W) in [-1, 1] -> flow in pixels (B, 2, H, W)
        (channel 0 horizontal, 1 vertical, as the reference)."""
        self.check_inputs(frames)
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
        batch_size: int = 1,
        progress: Optional[Callable[[Iterable, int, str], Iterable]] = None,
    ) -> Tensor:
        """Flow of frames larger than the training size, as the colab computes it.

        Tiles of ``tile_size`` (default ``config.image_size``) on the colab's grid
        (:func:`tile_starts`: a step of ``tile - min_overlap``, the last tile flush
        with the border, repeated origins kept as weights), blended with weights
        min(x+1, W-x, y+1, H-y) inside each tile. ``batch_size`` tiles (of every
        frame pair) go through the model at once. ``progress(items, total, label)``,
        if given, wraps the loop over tile batches (e.g. a progress bar).

        frames: (B, 2, 3, H, W) in [-1, 1] with H, W at least the tile size ->
        flow in pixels (B, 2, H, W).

        The blending sums are float32 whatever the model's dtype: the weights reach
        min(H, W)/2 = 184 and a pixel sums up to four tiles, beyond the integers
        bfloat16 holds exactly (256) at its 3 significant digits.
        """
        self.check_inputs(frames)
        name = type(self).__name__
        batch_size = expect_positive_int(name, "batch_size", batch_size)
        th, tw = tile_size or self.config.image_size
        problem = min_overlap_problem(min_overlap, (th, tw))
        if problem is not None:
            fail(name, problem)
        batch = frames.shape[0]
        height, width = frames.shape[-2:]
        grid = tile_grid(height, width, (th, tw), min_overlap)
        sum_dtype = torch.promote_types(self.dtype, torch.float32)
        weights = tile_weights(th, tw).to(device=frames.device, dtype=sum_dtype)
        flow = frames.new_zeros(batch, 2, height, width, dtype=sum_dtype)
        total = frames.new_zeros(height, width, dtype=sum_dtype)
        groups = [grid[i : i + batch_size] for i in range(0, len(grid), batch_size)]
        if progress is not None:
            groups = progress(groups, len(groups), "flow tiles")
        for group in groups:
            pieces = torch.cat(
                [frames[..., y : y + th, x : x + tw] for y, x, _ in group]
            )
            out = self(pieces).to(sum_dtype)  # (len(group) * B, 2, th, tw), tile-major
            for i, (y, x, count) in enumerate(group):
                w = weights * count
                flow[..., y : y + th, x : x + tw] += out[i * batch : (i + 1) * batch] * w
                total[y : y + th, x : x + tw] += w
        return (flow / total).to(self.dtype)
