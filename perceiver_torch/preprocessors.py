"""Input preprocessors: raw inputs -> (B, N, C) channels-last tokens for the encoder.

The reference's ``io_processors.py`` works on channels-last arrays and flattens the
index dimensions row-major, features first and the position encoding after. Our
modules take PyTorch layouts (NCHW images, (B, T, C, H, W) videos) and convert them
with :func:`channels_last_tokens` *before* flattening.

Every preprocessor exposes ``num_channels`` (its output width) so that a container
(the multimodal preprocessor) can size its parameters at construction.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear, func_transforming, intercepted
from .position_encoding import (
    FourierPositionEncoding,
    TrainablePositionEncoding,
    truncated_normal_,
)

# Official mask probabilities of the video autoencoder's multimodal preprocessor.
VIDEO_MASK_PROBS: Mapping[str, float] = {"audio": 0.0, "image": 0.0, "label": 1.0}


def channels_last_tokens(x: Tensor) -> Tensor:
    """(B, C, *index_dims) -> (B, prod(index_dims), C).

    The reference is channels-last: tokens are the index dimensions flattened
    row-major with channels innermost, so NCHW must be permuted *before* flattening.
    """
    b, c = x.shape[:2]
    return x.reshape(b, c, -1).transpose(1, 2)


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TF/XLA "SAME" padding (low, high) of one spatial axis.

    XLA pads ``max((ceil(n/s)-1)*s + k - n, 0)`` in total, the low side getting the
    smaller half: (2, 3) for the 7x7/2 conv on 224, (0, 1) for the 3x3/2 pool on 112.
    PyTorch's symmetric ``padding=`` cannot express this.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: int, stride: int, *, value: float = 0.0) -> Tensor:
    """Pads the last two axes of (B, C, H, W) for a TF "SAME" conv or pool."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


def max_pool_same(x: Tensor, kernel: int = 3, stride: int = 2) -> Tensor:
    """Max-pool with TF "SAME" padding by -inf (Haiku's ``hk.max_pool``).

    An unpadded pool gives 55x55 instead of 56x56 on 112x112 inputs.
    """
    return F.max_pool2d(pad_same(x, kernel, stride, value=-math.inf), kernel, stride)


def flow_patches(frames: Tensor) -> Tensor:
    """3x3 patches of every pixel of both frames, as the flow model's input.

    frames: (B, F, C, H, W). Each frame is zero-padded by 1 and every pixel gets its 3x3
    neighbourhood ordered (row, col, channel) (``F.unfold`` gives (channel, row, col));
    frames are then stacked along channels (frame 0's 9*C first).
    Returns (B, H*W, F*9*C).
    """
    b, f, c, h, w = frames.shape
    padded = F.pad(frames, (1, 1, 1, 1))
    x = padded.permute(0, 3, 4, 1, 2)  # (B, H+2, W+2, F, C): channels-last
    shifts = [x[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
    patches = torch.stack(shifts, dim=4)  # (B, H, W, F, 9 (row, col), C)
    return patches.reshape(b, h * w, f * 9 * c)


def space_to_depth(video: Tensor, block: int) -> Tensor:
    """Folds ``block``x``block`` pixel blocks into channels ordered (dh, dw, c).

    video: (B, T, C, H, W) -> (B, T*(H/block)*(W/block), block*block*C), tokens
    flattened row-major over (T, H/block, W/block) as the reference's einops rearrange
    ``b t (h dh) (w dw) c -> b t h w (dh dw c)``.
    """
    b, t, c, h, w = video.shape
    if h % block or w % block:
        raise ValueError(f"image size {(h, w)} is not divisible by {block}")
    x = video.reshape(b, t, c, h // block, block, w // block, block)
    x = x.permute(0, 1, 3, 5, 4, 6, 2)  # (B, T, h, w, dh, dw, C)
    return x.reshape(b, t * (h // block) * (w // block), block * block * c)


def audio_patches(audio: Tensor, samples_per_patch: int) -> Tensor:
    """Consecutive samples as tokens: (B, S) or (B, S, 1) -> (B, S/spp, spp)."""
    if audio.dim() == 3:
        if audio.shape[-1] != 1:
            raise ValueError(
                f"audio must be (B, S) or (B, S, 1), got {tuple(audio.shape)}"
            )
        audio = audio[..., 0]
    b, s = audio.shape
    if s % samples_per_patch:
        raise ValueError(f"{s} audio samples are not a multiple of {samples_per_patch}")
    return audio.reshape(b, s // samples_per_patch, samples_per_patch)


def concat_position(features: Tensor, position: Tensor) -> Tensor:
    """[features, position encoding] along channels: features first, as the reference.

    features: (B, N, C); position: (N, P) or (B, N, P). Returns (B, N, C+P).
    """
    if position.dim() == 2:
        position = position.unsqueeze(0).expand(features.shape[0], -1, -1)
    return torch.cat([features, position.to(features.dtype)], dim=-1)


class TextPreprocessor(nn.Module):
    """Token embedding plus a trainable position encoding (added, not concatenated).

    Keys: ``embedding.weight`` (V, D), ``position_encoding.embeddings`` (L, D).

    Args (keyword-only):
        vocab_size: V.
        max_seq_len: L, the longest sequence.
        d_model: D.
    """

    def __init__(self, *, vocab_size: int, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_channels = d_model
        # Given its (uninitialised) weight, nn.Embedding skips its own normal_ init,
        # which the line after would overwrite anyway (and which, on the meta device,
        # costs a second of one-off imports).
        self.embedding = nn.Embedding(
            vocab_size, d_model, _weight=torch.empty(vocab_size, d_model)
        )
        truncated_normal_(self.embedding.weight)
        self.position_encoding = TrainablePositionEncoding(
            index_dim=max_seq_len, num_channels=d_model
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, T) int, T <= max_seq_len -> (B, T, D)."""
        t = input_ids.shape[1]
        if t > self.max_seq_len:
            raise ValueError(
                f"sequence of {t} tokens exceeds max_seq_len {self.max_seq_len}"
            )
        return self.embedding(input_ids) + self.position_encoding(1, length=t)


class LearnedImagePreprocessor(nn.Module):
    """1x1 conv of the pixels + a learned 2-D position encoding projected by a Linear.

    Keys: ``conv1x1.{weight,bias}`` (P, C, 1, 1), ``position_encoding.embeddings``
    (H*W, P), ``position_projection.{weight,bias}`` (P, P).

    Args (keyword-only):
        image_size: (H, W) the position encoding was trained for (required size).
        in_channels: image channels.
        channels: P, width of the conv, of the position encoding and its projection.
    """

    def __init__(
        self, *, image_size: Tuple[int, int], in_channels: int = 3, channels: int = 256
    ) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        self.num_channels = 2 * channels
        self.conv1x1 = nn.Conv2d(in_channels, channels, kernel_size=1)
        self.position_encoding = TrainablePositionEncoding(
            index_dim=self.image_size[0] * self.image_size[1], num_channels=channels
        )
        self.position_projection = Linear(channels, channels)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, C, H, W) at ``image_size`` -> (B, H*W, 2P)."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"the learned position encoding covers {self.image_size[0]}x"
                f"{self.image_size[1]} images only, got {images.shape[-2]}x{images.shape[-1]}"
            )
        if intercepted(self.conv1x1):  # hooked or replaced: called as a module
            features = channels_last_tokens(self.conv1x1(images))
        else:
            # A 1x1 conv is a Linear on channels-last tokens (no big NCHW permute).
            tokens = channels_last_tokens(images)
            features = F.linear(tokens, self.conv1x1.weight.flatten(1), self.conv1x1.bias)
        position = self.position_projection(self.position_encoding.embeddings)
        return concat_position(features, position)


class FourierImagePreprocessor(nn.Module):
    """Raw pixels concatenated with 2-D Fourier features of the pixel grid.

    Args (keyword-only):
        max_resolution: Fourier max_resolution (H, W); the grid follows the input.
        num_bands: Fourier bands.
        in_channels: image channels.
    """

    def __init__(
        self, *, max_resolution: Tuple[int, int], num_bands: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.position_encoding = FourierPositionEncoding(
            num_bands=num_bands, max_resolution=tuple(max_resolution)
        )
        self.num_channels = in_channels + self.position_encoding.num_channels

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, C, H, W) -> (B, H*W, C + 2 + 4K)."""
        pos = self.position_encoding.grid(
            images.shape[-2:], device=images.device, dtype=images.dtype
        )
        return concat_position(channels_last_tokens(images), pos)


class ConvStemPreprocessor(nn.Module):
    """Conv 7x7/2 (no bias, SAME) -> BatchNorm -> ReLU -> max-pool 3x3/2 (SAME) ->
    channels-last tokens + 2-D Fourier features of the 4x smaller grid.

    Keys: ``conv.weight`` (C, 3, 7, 7), ``batchnorm.{weight,bias,running_mean,
    running_var,num_batches_tracked}``.

    Args (keyword-only):
        max_resolution: Fourier max_resolution of the downsampled grid (56, 56).
        num_bands: Fourier bands.
        channels: conv width.
        in_channels: image channels.
    """

    def __init__(
        self,
        *,
        max_resolution: Tuple[int, int],
        num_bands: int,
        channels: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, channels, kernel_size=7, stride=2, bias=False
        )
        self.batchnorm = nn.BatchNorm2d(channels, eps=1e-5)
        self.position_encoding = FourierPositionEncoding(
            num_bands=num_bands, max_resolution=tuple(max_resolution)
        )
        self.num_channels = channels + self.position_encoding.num_channels

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) -> (B, ceil(H/4)*ceil(W/4), C + 2 + 4K)."""
        x = self.conv(pad_same(images, 7, 2))
        x = max_pool_same(F.relu(self.batchnorm(x)), 3, 2)
        pos = self.position_encoding.grid(x.shape[-2:], device=x.device, dtype=x.dtype)
        return concat_position(channels_last_tokens(x), pos)


class FlowPatchPreprocessor(nn.Module):
    """3x3 patches of two frames, a Linear 54 -> 64, and 2-D Fourier features.

    Key: ``projection.{weight,bias}`` (64, 54).

    Args (keyword-only):
        max_resolution: Fourier max_resolution (the training size (368, 496)).
        num_bands: Fourier bands.
        channels: projection width.
        in_channels: image channels; num_frames: frames (2).
    """

    def __init__(
        self,
        *,
        max_resolution: Tuple[int, int],
        num_bands: int,
        channels: int = 64,
        in_channels: int = 3,
        num_frames: int = 2,
    ) -> None:
        super().__init__()
        self.projection = Linear(num_frames * 9 * in_channels, channels)
        self.position_encoding = FourierPositionEncoding(
            num_bands=num_bands, max_resolution=tuple(max_resolution)
        )
        self.num_channels = channels + self.position_encoding.num_channels

    def forward(self, frames: Tensor) -> Tensor:
        """frames: (B, 2, 3, H, W) -> (B, H*W, channels + 2 + 4K)."""
        features = self.projection(flow_patches(frames))
        pos = self.position_encoding.grid(
            frames.shape[-2:], device=frames.device, dtype=features.dtype
        )
        return concat_position(features, pos)


class VideoPatchPreprocessor(nn.Module):
    """Space-to-depth of a video plus 3-D Fourier features over (T, H/s, W/s).

    Args (keyword-only):
        spatial_downsample: s, the space-to-depth block.
        max_resolution: Fourier max_resolution (T, H/s, W/s).
        num_bands: Fourier bands.
        in_channels: image channels.
    """

    def __init__(
        self,
        *,
        spatial_downsample: int,
        max_resolution: Tuple[int, int, int],
        num_bands: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.spatial_downsample = spatial_downsample
        self.position_encoding = FourierPositionEncoding(
            num_bands=num_bands, max_resolution=tuple(max_resolution)
        )
        self.num_channels = (
            spatial_downsample**2 * in_channels + self.position_encoding.num_channels
        )

    def features_and_position(self, video: Tensor) -> Tuple[Tensor, Tensor]:
        """video: (B, T, C, H, W) -> the space-to-depth features (B, N, s^2*C) and
        their Fourier features (N, 3 + 6K), N = T*H*W/s^2."""
        s = self.spatial_downsample
        t, h, w = video.shape[1], video.shape[3] // s, video.shape[4] // s
        pos = self.position_encoding.grid(
            (t, h, w), device=video.device, dtype=video.dtype
        )
        return space_to_depth(video, s), pos

    def forward(self, video: Tensor) -> Tensor:
        """video: (B, T, C, H, W) -> (B, T*H*W/s^2, s^2*C + 3 + 6K)."""
        return concat_position(*self.features_and_position(video))


class AudioPatchPreprocessor(nn.Module):
    """Patches of consecutive samples plus 1-D Fourier features over the patches.

    Args (keyword-only):
        samples_per_patch: samples per token.
        max_resolution: Fourier max_resolution (the number of samples, 30720).
        num_bands: Fourier bands.
    """

    def __init__(
        self, *, samples_per_patch: int, max_resolution: Tuple[int], num_bands: int
    ) -> None:
        super().__init__()
        self.samples_per_patch = samples_per_patch
        self.position_encoding = FourierPositionEncoding(
            num_bands=num_bands, max_resolution=tuple(max_resolution)
        )
        self.num_channels = samples_per_patch + self.position_encoding.num_channels

    def features_and_position(self, audio: Tensor) -> Tuple[Tensor, Tensor]:
        """audio: (B, S) or (B, S, 1) -> the patches (B, S/spp, spp) and their
        Fourier features (S/spp, 1 + 2K)."""
        patches = audio_patches(audio, self.samples_per_patch)
        pos = self.position_encoding.grid(
            patches.shape[1:2], device=audio.device, dtype=audio.dtype
        )
        return patches, pos

    def forward(self, audio: Tensor) -> Tensor:
        """audio: (B, S) or (B, S, 1) -> (B, S/spp, spp + 1 + 2K)."""
        return concat_position(*self.features_and_position(audio))


class OneHotPreprocessor(nn.Module):
    """A label vector as a single token: (B, K) -> (B, 1, K).

    Args (keyword-only):
        num_classes: K.
    """

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.num_channels = num_classes

    def forward(self, label: Tensor) -> Tensor:
        return label[:, None, :]


class PaddedModalities(nn.Module):
    """Per-modality modules in sorted name order, each with a trainable padding vector
    that brings its channels to a common width (the reference's multimodal
    preprocessor and decoder queries both pad this way).

    Keys: ``modalities.{m}.*``, ``padding.{m}`` (width - C_m,), where
    width = ``num_channels`` = max_m C_m + min_padding.
    """

    def __init__(self, *, modalities: Mapping[str, nn.Module], min_padding: int) -> None:
        super().__init__()
        self.modalities = nn.ModuleDict(dict(sorted(modalities.items())))
        self.num_channels = (
            max(m.num_channels for m in modalities.values()) + min_padding
        )
        self.padding = nn.ParameterDict(
            {
                name: nn.Parameter(
                    truncated_normal_(torch.empty(self.num_channels - m.num_channels))
                )
                for name, m in self.modalities.items()
            }
        )


class MultimodalPreprocessor(PaddedModalities):
    """Preprocesses each modality, pads it to a common width with a trainable vector,
    optionally replaces tokens by a trainable mask token, and concatenates the
    modalities in sorted order (audio, image, label).

    Keys: ``padding.{m}`` (width - C_m,), ``mask_tokens.{m}`` (width,) where width =
    max_m C_m + min_padding. Modalities with mask probability 0 still own a mask token
    (the reference creates one for every modality).

    Mask: ``x = (1 - mask) * x + mask * token`` per token. mask_probs 0 and 1 (the
    official image 0, audio 0, label 1) are applied deterministically; other
    probabilities are sampled with torch's RNG in training and applied as their
    expectation in eval (deterministic).

    Args (keyword-only):
        modalities: {name: preprocessor with ``num_channels``}.
        min_padding: minimum trainable padding (4).
        mask_probs: {name: probability}; missing = 0.
    """

    def __init__(
        self,
        *,
        modalities: Mapping[str, nn.Module],
        min_padding: int,
        mask_probs: Optional[Mapping[str, float]] = None,
    ) -> None:
        super().__init__(modalities=modalities, min_padding=min_padding)
        self.mask_probs = {m: float((mask_probs or {}).get(m, 0.0)) for m in modalities}
        self.mask_tokens = nn.ParameterDict(
            {
                name: nn.Parameter(truncated_normal_(torch.empty(self.num_channels)))
                for name in self.modalities
            }
        )

    def pad_and_mask(self, name: str, x: Tensor) -> Tensor:
        """Pads one modality's tokens (B, N, C_m) to (B, N, width) and applies its mask."""
        b, n, _ = x.shape
        padding = self.padding[name].to(x.dtype).expand(b, n, -1)
        x = torch.cat([x, padding], dim=-1)
        p = self.mask_probs[name]
        token = self.mask_tokens[name].to(x.dtype)
        if p == 0.0:
            return x
        if p == 1.0:
            # (1 - 1) * x + 1 * token is exactly the token for finite inputs.
            return token.expand(b, n, -1) + 0.0 * x
        if self.training:
            mask = torch.bernoulli(
                torch.full((b, n, 1), p, device=x.device, dtype=x.dtype)
            )
        else:
            mask = torch.full((b, n, 1), p, device=x.device, dtype=x.dtype)
        return (1 - mask) * x + mask * token

    def forward(self, inputs: Mapping[str, Tensor]) -> Tuple[Tensor, Dict[str, int]]:
        """inputs: {modality: raw input}. Returns the tokens (B, sum N_m, width) in
        sorted modality order and the number of tokens of each modality.

        Unmasked modalities' features, position encodings and padding are written
        straight into the output (the same values as concatenating them: the video
        model's 52,097 tokens of 704 channels are written once instead of three
        times), except under ``torch.jit.trace`` (the ONNX export), which does not
        record writes into slices of a new tensor, and under ``torch.func``
        transforms, where a vmapped block (a stacked model's padding) cannot be
        written into a tensor that is not."""
        # Each modality's tokens as channel blocks: [features, position, padding] for
        # unmasked modalities that give their features and positions apart,
        # [tokens, padding] for other unmasked ones, the padded, masked tokens else.
        blocks: Dict[str, list] = {}
        for name, module in self.modalities.items():
            if self.mask_probs[name] != 0.0:
                blocks[name] = [self.pad_and_mask(name, module(inputs[name]))]
            elif hasattr(module, "features_and_position"):
                blocks[name] = [*module.features_and_position(inputs[name]), self.padding[name]]
            else:
                blocks[name] = [module(inputs[name]), self.padding[name]]
        sizes = {name: parts[0].shape[1] for name, parts in blocks.items()}
        first = next(iter(blocks.values()))[0]
        batch, dtype = first.shape[0], first.dtype
        if torch.jit.is_tracing() or func_transforming():
            return torch.cat(
                [
                    torch.cat(
                        [b.to(dtype).expand(batch, sizes[name], -1) for b in parts], dim=-1
                    )
                    for name, parts in blocks.items()
                ],
                dim=1,
            ), sizes
        tokens = first.new_empty(batch, sum(sizes.values()), self.num_channels)
        at = 0
        for name, parts in blocks.items():
            out = tokens[:, at : at + sizes[name]]
            at += sizes[name]
            channels = 0
            for block in parts:  # broadcast over the batch and the tokens
                width = block.shape[-1]
                out[..., channels : channels + width] = block
                channels += width
        return tokens, sizes
