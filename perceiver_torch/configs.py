"""Frozen configuration dataclasses for the six official Perceiver IO models.

Every default is the value DeepMind's colabs use for the released checkpoint, so
``Config()`` is the official model. This is the one place those values are written:
the mappings (``mappings/*.yaml``) take their official configuration from these
defaults, and the builders of :mod:`perceiver_jax.models` (the parity reference)
have no defaults of their own; their keyword parameters carry these field names,
letter for letter, so one configuration drives both. Training-only knobs
(:data:`TRAINING_ONLY_FIELDS`) exist here only.

``TINY_CONFIGS`` holds one small version of each architecture: the sizes of the golden
test checkpoints (tiny random-weight models DeepMind's own code was run on). They keep
every structural choice of the official model and shrink only the sizes; the mappings'
``tiny`` preset is derived from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple


@dataclass(frozen=True)
class LanguagePerceiverConfig:
    """Masked language model on UTF-8 bytes (``language_perceiver_io_bytes.pickle``)."""

    vocab_size: int = 262
    max_seq_len: int = 2048
    d_model: int = 768
    num_latents: int = 256
    d_latents: int = 1280
    num_self_attends: int = 26
    num_self_attention_heads: int = 8
    # Heads of both cross-attentions (encoder and decoder).
    num_cross_attention_heads: int = 8
    # qk width of every attention in the model (encoder cross, self, decoder cross).
    qk_channels: int = 256
    # Value width of the encoder's attentions; None means d_latents (the official 1280).
    # The decoder's value width is always d_model.
    v_channels: Optional[int] = None
    dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class ImageNetLearnedConfig:
    """ImageNet classifier with a 1x1 conv and a learned 2-D position encoding."""

    # Training resolution: the learned position encoding has image_size[0]*image_size[1] rows.
    image_size: Tuple[int, int] = (224, 224)
    # Width of the 1x1 conv, of the position encoding and of its projection.
    pos_channels: int = 256
    num_latents: int = 512
    d_latents: int = 1024
    num_self_attends_per_block: int = 6
    # The block of self-attends is applied num_blocks times with shared weights.
    num_blocks: int = 8
    num_self_attention_heads: int = 8
    # Heads of the encoder's cross-attention (the decoder's has one head).
    num_cross_attention_heads: int = 1
    num_classes: int = 1000
    # The official learned-position model has no decoder query residual.
    decoder_query_residual: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class ImageNetFourierConfig:
    """ImageNet classifier on raw pixels with 2-D Fourier position features."""

    # Fourier max_resolution (the frequencies' Nyquist limit), not the input size.
    max_resolution: Tuple[int, int] = (224, 224)
    num_bands: int = 64
    num_latents: int = 512
    d_latents: int = 1024
    num_self_attends_per_block: int = 6
    num_blocks: int = 8
    num_self_attention_heads: int = 8
    # Heads of the encoder's cross-attention (the decoder's has one head).
    num_cross_attention_heads: int = 1
    num_classes: int = 1000
    decoder_query_residual: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class ImageNetConvConfig:
    """ImageNet classifier with a conv+BatchNorm+max-pool stem (4x downsampling)."""

    # Fourier max_resolution of the 4x-downsampled feature map (224 / 4 = 56).
    max_resolution: Tuple[int, int] = (56, 56)
    num_bands: int = 64
    conv_channels: int = 64
    num_latents: int = 512
    d_latents: int = 1024
    num_self_attends_per_block: int = 6
    num_blocks: int = 8
    num_self_attention_heads: int = 8
    # Heads of the encoder's cross-attention (the decoder's has one head).
    num_cross_attention_heads: int = 1
    num_classes: int = 1000
    decoder_query_residual: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class OpticalFlowConfig:
    """Optical flow between two frames (``optical_flow_checkpoint.pystate``)."""

    # Training size: the Fourier max_resolution (and the JAX model's output shape).
    image_size: Tuple[int, int] = (368, 496)
    num_bands: int = 64
    # Width of the linear projection of the 54 patch channels (2 frames x 3x3x3).
    patch_channels: int = 64
    num_latents: int = 2048
    d_latents: int = 512
    num_self_attends: int = 24
    num_self_attention_heads: int = 16
    # Heads of the encoder's cross-attention (the decoder's has one head).
    num_cross_attention_heads: int = 1
    # The network's output is divided by rescale_factor inside the model ...
    rescale_factor: float = 100.0
    # ... and the colab multiplies it by flow_scale to get pixels.
    flow_scale: float = 20.0
    dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class VideoAutoencodingConfig:
    """Kinetics-700 video + audio + label autoencoder (``video_autoencoding_checkpoint.pystate``)."""

    num_frames: int = 16
    image_size: Tuple[int, int] = (224, 224)
    # 48 kHz audio at 25 frames per second: 1920 samples per video frame.
    audio_samples_per_frame: int = 1920
    samples_per_patch: int = 16
    # Image space-to-depth factor; also the ratio of image size to its Fourier max_resolution.
    spatial_downsample: int = 4
    num_latents: int = 784
    d_latents: int = 512
    num_self_attends: int = 8
    num_self_attention_heads: int = 8
    # Heads of the encoder's cross-attention (the decoder's has one head).
    num_cross_attention_heads: int = 1
    audio_num_bands: int = 192
    image_num_bands: int = 32
    num_classes: int = 700
    # Output width of the shared decoder (input of the three postprocessors).
    decoder_channels: int = 512
    # Width of the trainable label query.
    label_query_channels: int = 1024
    # Minimum trainable padding of the multimodal input (704 = 700 + 4) ...
    input_padding: int = 4
    # ... and of the multimodal decoder queries (1026 = 1024 + 2).
    query_padding: int = 2
    # The colab decodes a clip in this many chunks.
    num_chunks: int = 128
    dropout: float = 0.0
    attention_dropout: float = 0.0


# Fields that only matter for training: not part of a mapping's configuration, and
# ignored by the JAX reference.
TRAINING_ONLY_FIELDS: Tuple[str, ...] = ("dropout", "attention_dropout")

CONFIG_CLASSES: Mapping[str, type] = {
    "language_perceiver": LanguagePerceiverConfig,
    "imagenet_learned": ImageNetLearnedConfig,
    "imagenet_fourier": ImageNetFourierConfig,
    "imagenet_conv": ImageNetConvConfig,
    "optical_flow": OpticalFlowConfig,
    "video_autoencoding": VideoAutoencodingConfig,
}

_TINY_IMAGENET = dict(
    num_latents=16,
    d_latents=64,
    num_self_attends_per_block=2,
    num_blocks=3,
    num_self_attention_heads=8,
    num_classes=10,
)

# The sizes of the golden checkpoints (shared/official/golden/*/config.json).
TINY_CONFIGS: Mapping[str, Any] = {
    "language_perceiver": LanguagePerceiverConfig(
        max_seq_len=64,
        d_model=32,
        num_latents=8,
        d_latents=48,
        num_self_attends=2,
        qk_channels=16,
    ),
    "imagenet_learned": ImageNetLearnedConfig(
        image_size=(32, 32), pos_channels=16, **_TINY_IMAGENET
    ),
    "imagenet_fourier": ImageNetFourierConfig(
        max_resolution=(32, 32), num_bands=8, **_TINY_IMAGENET
    ),
    "imagenet_conv": ImageNetConvConfig(
        max_resolution=(8, 8), num_bands=8, **_TINY_IMAGENET
    ),
    "optical_flow": OpticalFlowConfig(
        image_size=(24, 32), num_bands=8, num_latents=32, d_latents=32, num_self_attends=2
    ),
    "video_autoencoding": VideoAutoencodingConfig(
        num_frames=2,
        image_size=(16, 16),
        audio_samples_per_frame=64,
        num_latents=8,
        d_latents=32,
        num_self_attends=2,
        audio_num_bands=8,
        image_num_bands=4,
        num_classes=10,
        decoder_channels=24,
        label_query_channels=40,
        num_chunks=4,
    ),
}


def config_from_dict(name: str, values: Mapping[str, Any]) -> Any:
    """Builds the config of model ``name`` from plain values (JSON, YAML or CLI).

    Lists become tuples; unknown keys raise ``ValueError`` naming the valid ones.
    """
    cls = CONFIG_CLASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) for {name}: {', '.join(unknown)}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict:
    """Plain, JSON-serialisable values of a config (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(config).items()
    }
