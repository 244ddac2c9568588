"""Output postprocessors: decoder outputs (B, M, C) -> task outputs.

The reference's ``EmbeddingDecoder``, ``ClassificationPostprocessor``,
``ProjectionPostprocessor``, ``AudioPostprocessor``, the flow decoder's rescaling and
``MultimodalPostprocessor`` (split by modality sizes in sorted order).
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor, nn

from .linear import Linear


class EmbeddingDecoder(nn.Module):
    """Logits against the (tied) input embedding: ``x @ embedding^T + bias``.

    Key: ``bias`` (V,). The embedding matrix belongs to the input preprocessor and is
    passed in, so the state dict stores it once.

    Args (keyword-only):
        vocab_size: V.
    """

    def __init__(self, *, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """x: (B, T, D); embedding: (V, D) -> logits (B, T, V)."""
        return torch.matmul(x, embedding.t()) + self.bias


class ClassificationPostprocessor(nn.Module):
    """Logits of the single classification query: (B, 1, C) -> (B, C).

    With ``in_channels`` a Linear ``projection`` (in_channels -> num_classes) comes first
    (the video model's label head); without, the decoder already projected.

    Args (keyword-only):
        in_channels: None = no projection.
        num_classes: classes (only with in_channels).
    """

    def __init__(
        self, *, in_channels: int | None = None, num_classes: int | None = None
    ):
        super().__init__()
        if in_channels is not None:
            if num_classes is None:
                raise ValueError("num_classes is required with in_channels")
            self.projection = Linear(in_channels, num_classes)
        else:
            self.projection = None

    def forward(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            x = self.projection(x)
        return self.shape_output(x)

    def shape_output(self, projected: Tensor) -> Tensor:
        """The part after the projection: (B, 1, num_classes) -> (B, num_classes)."""
        return projected[:, 0]


class ProjectionPostprocessor(nn.Module):
    """A Linear ``projection`` per query: (B, M, C) -> (B, M, num_outputs).

    Args (keyword-only):
        in_channels: C.
        num_outputs: outputs per query (3 for RGB pixels).
    """

    def __init__(self, *, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.projection = Linear(in_channels, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.shape_output(self.projection(x))

    def shape_output(self, projected: Tensor) -> Tensor:
        """The part after the projection: nothing (B, M, num_outputs)."""
        return projected


class AudioPostprocessor(nn.Module):
    """A Linear ``projection`` to the samples of each patch, flattened:
    (B, M, C) -> (B, M * samples_per_patch).

    Args (keyword-only):
        in_channels: C.
        samples_per_patch: samples per query (16).
    """

    def __init__(self, *, in_channels: int, samples_per_patch: int) -> None:
        super().__init__()
        self.projection = Linear(in_channels, samples_per_patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.shape_output(self.projection(x))

    def shape_output(self, projected: Tensor) -> Tensor:
        """The part after the projection: (B, M, spp) -> (B, M * spp)."""
        return projected.reshape(projected.shape[0], -1)


class FlowPostprocessor(nn.Module):
    """Network output (B, H*W, 2) -> flow in pixels (B, 2, H, W).

    The reference divides by ``rescale_factor`` (100) inside the model and the colab
    multiplies by ``flow_scale`` (20) to get pixels; both happen here.

    Args (keyword-only):
        rescale_factor: divisor inside the model.
        flow_scale: multiplier to pixels.
    """

    def __init__(self, *, rescale_factor: float = 100.0, flow_scale: float = 20.0):
        super().__init__()
        self.rescale_factor = rescale_factor
        self.flow_scale = flow_scale

    def forward(self, x: Tensor, image_size: Tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        flow = (x / self.rescale_factor) * self.flow_scale
        return flow.reshape(b, image_size[0], image_size[1], c).permute(0, 3, 1, 2)


def split_modalities(x: Tensor, sizes: Mapping[str, int]) -> Dict[str, Tensor]:
    """Splits (B, M, C) along M into the modalities in sorted order (the reference's
    ``restructure``)."""
    out, start = {}, 0
    for name in sorted(sizes):
        out[name] = x[:, start : start + sizes[name]]
        start += sizes[name]
    if start != x.shape[1]:
        raise ValueError(f"modality sizes {dict(sizes)} do not add up to {x.shape[1]}")
    return out


class MultimodalPostprocessor(nn.Module):
    """Applies each modality's postprocessor to its slice of the decoder output.

    Keys: ``modalities.{m}.*``.

    Args (keyword-only):
        modalities: {name: postprocessor}.
    """

    def __init__(self, *, modalities: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.modalities = nn.ModuleDict(dict(sorted(modalities.items())))

    def forward(self, x: Tensor, sizes: Mapping[str, int]) -> Dict[str, Tensor]:
        """x: (B, M, C); sizes: {modality: n_m} -> {modality: output}."""
        parts = split_modalities(x, sizes)
        return {name: self.modalities[name](parts[name]) for name in parts}
