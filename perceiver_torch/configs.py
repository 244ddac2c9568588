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
``tiny`` preset is derived from them. It is read-only: derive a variant with
``dataclasses.replace(TINY_CONFIGS[name], ...)``.

Every config checks itself when it is made (``__post_init__`` calls ``validate()``):
types, ranges (sizes >= 1, dropout in [0, 1)) and the relations the model needs
(every head count divides the widths its attention splits, the video's frame size
is a multiple of the space-to-depth factor, ...). A config that passes builds a model
whose forward pass works; one that does not raises :class:`ConfigError` naming the
key. :func:`parse_value` reads a command-line value (``8x8``, ``8,8``, JSON).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, out of range or
    inconsistent with another; ``key`` names the (first) key at fault."""

    def __init__(self, message: str, key: Optional[str] = None) -> None:
        super().__init__(message)
        self.key = key


# Field kinds, from the annotations: how a value is checked and parsed.
_KINDS = {
    "int": "an integer",
    "optional_int": "an integer or null",
    "float": "a number",
    "bool": "true or false",
    "pair": "two integers",
}
# How a pair is written, said after "two integers": a list or tuple from Python, JSON
# or YAML (check_value, whose callers never see a string parsed), or the text
# forms of --config KEY=VALUE (parse_value). Each message names only forms its path
# accepts ('8x8' from Python was refused with "e.g. 8x8").
_PAIR_EXAMPLE = "[8, 8]"
_COMMAND_LINE_PAIR_EXAMPLE = "8x8, 8,8 or [8, 8]"

# Lower bounds of the integer fields that may be 0 (every other size must be >= 1).
_MAY_BE_ZERO = frozenset({"input_padding", "query_padding"})
# Float fields and their allowed ranges: (low, high, low inclusive, high inclusive).
_FLOAT_RANGES = {
    "dropout": (0.0, 1.0, True, False),
    "attention_dropout": (0.0, 1.0, True, False),
    "rescale_factor": (0.0, math.inf, False, False),
    "flow_scale": (-math.inf, math.inf, False, False),
}


def _kind(annotation: Any) -> str:
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and set(args) == {int, type(None)}:
        return "optional_int"
    if origin is tuple and args == (int, int):
        return "pair"
    raise TypeError(f"no config kind for annotation {annotation!r}")  # pragma: no cover


def field_kinds(cls: type) -> Dict[str, str]:
    """``{field name: kind}`` of a config class (kinds: see ``_KINDS``)."""
    return dict(_field_kinds(cls))


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> Tuple[Tuple[str, str], ...]:
    # Resolving the (string) annotations costs more than checking every value.
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _kind(hints[f.name])) for f in dataclasses.fields(cls))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_value(
    cls: type, key: str, value: Any, *, pair_example: str = _PAIR_EXAMPLE
) -> Any:
    """``value`` checked (type and range) and normalised for field ``key`` of ``cls``.

    Lists become tuples, integral numbers plain ints; a pair is a list or tuple of two
    integers (a string such as ``"8x8"`` is read by :func:`parse_value` only). Raises
    ``ConfigError``; for a pair it shows ``pair_example``.
    """
    kinds = field_kinds(cls)
    if key not in kinds:
        raise ConfigError(
            f"unknown config key {key!r} for {cls.__name__}; valid keys: "
            f"{', '.join(kinds)}",
            key,
        )
    kind = kinds[key]

    def wrong(detail: str = "") -> ConfigError:
        example = f" (e.g. {pair_example})" if kind == "pair" else ""
        return ConfigError(
            f"config key {key!r} must be {_KINDS[kind]}{example}{detail}, got {value!r}",
            key,
        )

    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong()
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise wrong()
        value = float(value)
        low, high, low_in, high_in = _FLOAT_RANGES.get(
            key, (-math.inf, math.inf, False, False)
        )
        ok = math.isfinite(value) and (value >= low if low_in else value > low)
        ok = ok and (value <= high if high_in else value < high)
        if key == "flow_scale":
            ok = ok and value != 0.0
        if not ok:
            interval = (
                f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            )
            raise wrong(
                " other than 0 (finite)" if key == "flow_scale" else f" in {interval}"
            )
        return value
    low = 0 if key in _MAY_BE_ZERO else 1
    if kind == "optional_int" and value is None:
        return None
    if kind in ("int", "optional_int"):
        if not _is_int(value):
            raise wrong()
        if value < low:
            raise wrong(f" >= {low}")
        return int(value)
    # pair
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise wrong()
    if not all(_is_int(v) for v in value):
        raise wrong()
    if min(value) < 1:
        raise wrong(", each >= 1")
    return (int(value[0]), int(value[1]))


def parse_value(cls: type, key: str, raw: str) -> Any:
    """A command-line ``--config KEY=VALUE`` value read for field ``key`` of ``cls``
    and checked (:func:`check_value`): integers, numbers, ``true``/``false``, ``null``
    for an optional width, pairs as ``8x8``, ``8,8`` or JSON ``[8, 8]``."""
    kind = field_kinds(cls).get(key)
    text = raw.strip()
    value: Any = text
    if kind == "pair" and not text.startswith("["):
        parts = text.lower().replace("x", ",").split(",")
        try:
            value = [int(part) for part in parts]
        except ValueError:
            value = text
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if kind == "bool" and text.lower() in ("true", "false"):
                value = text.lower() == "true"
    return check_value(cls, key, value, pair_example=_COMMAND_LINE_PAIR_EXAMPLE)


class _Validated:
    """Mixin of the config dataclasses: checks every field when the config is made."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ``ConfigError`` for a wrong type, a value out of range or values
        that cannot build a working model together (see the module docstring)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = check_value(type(self), f.name, getattr(self, f.name))
            # Frozen: normalise (list -> tuple, numpy int -> int) through object.
            object.__setattr__(self, f.name, value)
        for keys, ok, message in self._relations():
            if not ok:
                raise ConfigError(
                    f"{type(self).__name__}: {message} (keys: {', '.join(keys)})",
                    keys[0],
                )

    def _relations(self) -> List[Tuple[Tuple[str, ...], bool, str]]:
        """``(keys, holds, message)`` for every relation between fields."""
        return []


def _divides(heads_key: str, heads: int, what: str, width: int) -> Tuple[bool, str]:
    return (
        width % heads == 0,
        f"{heads_key}={heads} must divide {what} ({width})",
    )


def _fourier_width(dims: int, num_bands: int) -> int:
    """Channels of the Fourier features of a ``dims``-D grid: positions, sin, cos."""
    return dims * (2 * num_bands + 1)


class _EncoderRelations(_Validated):
    """Relations shared by the ImageNet, optical-flow and video configs: the heads
    divide the latent width and the encoder's input width (``input_width``)."""

    def input_width(self) -> int:  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    def _relations(self) -> List[Tuple[Tuple[str, ...], bool, str]]:
        c: Any = self
        self_ok, self_msg = _divides(
            "num_self_attention_heads", c.num_self_attention_heads,
            "d_latents", c.d_latents,
        )
        cross_ok, cross_msg = _divides(
            "num_cross_attention_heads", c.num_cross_attention_heads,
            "the encoder's input width", self.input_width(),
        )
        return [
            (("num_self_attention_heads", "d_latents"), self_ok, self_msg),
            (("num_cross_attention_heads",), cross_ok, cross_msg),
        ]


@dataclass(frozen=True)
class LanguagePerceiverConfig(_Validated):
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

    def _relations(self) -> List[Tuple[Tuple[str, ...], bool, str]]:
        # Every attention uses qk_channels; the encoder's values are v_channels
        # (default d_latents) wide, the decoder's d_model.
        v = self.d_latents if self.v_channels is None else self.v_channels
        checks = []
        for heads_key, widths in (
            ("num_self_attention_heads", (("qk_channels", self.qk_channels), ("v_channels", v))),
            (
                "num_cross_attention_heads",
                (("qk_channels", self.qk_channels), ("v_channels", v), ("d_model", self.d_model)),
            ),
        ):
            heads = getattr(self, heads_key)
            for what, width in widths:
                ok, message = _divides(heads_key, heads, what, width)
                checks.append(((heads_key, what), ok, message))
        return checks


@dataclass(frozen=True)
class ImageNetLearnedConfig(_EncoderRelations):
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

    def input_width(self) -> int:
        """Width of the preprocessed inputs: 1x1 conv ++ projected positions."""
        return 2 * self.pos_channels

    @property
    def training_image_size(self) -> Tuple[int, int]:
        """(H, W) of the images the model was trained on: the learned table's grid."""
        return tuple(self.image_size)


@dataclass(frozen=True)
class ImageNetFourierConfig(_EncoderRelations):
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

    def input_width(self) -> int:
        """Width of the preprocessed inputs: RGB ++ 2-D Fourier features."""
        return 3 + _fourier_width(2, self.num_bands)

    @property
    def training_image_size(self) -> Tuple[int, int]:
        """(H, W) of the images the model was trained on: its Fourier resolution."""
        return tuple(self.max_resolution)


@dataclass(frozen=True)
class ImageNetConvConfig(_EncoderRelations):
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

    def input_width(self) -> int:
        """Width of the preprocessed inputs: conv channels ++ 2-D Fourier features."""
        return self.conv_channels + _fourier_width(2, self.num_bands)

    @property
    def training_image_size(self) -> Tuple[int, int]:
        """(H, W) of the images the model was trained on. The conv stem (stride-2
        conv, stride-2 max-pool) downsamples by 4, and the Fourier features'
        max_resolution is that of its output (56 for 224)."""
        return (4 * self.max_resolution[0], 4 * self.max_resolution[1])


@dataclass(frozen=True)
class OpticalFlowConfig(_EncoderRelations):
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

    def input_width(self) -> int:
        """Width of the preprocessed inputs: projected patches ++ 2-D Fourier features."""
        return self.patch_channels + _fourier_width(2, self.num_bands)


@dataclass(frozen=True)
class VideoAutoencodingConfig(_EncoderRelations):
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

    def num_samples(self) -> int:
        """Audio samples of a clip: num_frames x audio_samples_per_frame."""
        return self.num_frames * self.audio_samples_per_frame

    def input_width(self) -> int:
        """Width of the padded multimodal inputs: the widest modality + input_padding
        (audio: a patch ++ 1-D Fourier features; image: space-to-depth pixels ++ 3-D
        Fourier features; label: one-hot)."""
        audio = self.samples_per_patch + _fourier_width(1, self.audio_num_bands)
        image = 3 * self.spatial_downsample**2 + _fourier_width(3, self.image_num_bands)
        return max(audio, image, self.num_classes) + self.input_padding

    def _relations(self) -> List[Tuple[Tuple[str, ...], bool, str]]:
        s = self.spatial_downsample
        height, width = self.image_size
        samples = self.num_samples()
        patches = samples // self.samples_per_patch
        points = self.num_frames * height * width
        return super()._relations() + [
            (
                ("image_size", "spatial_downsample"),
                height % s == 0 and width % s == 0,
                f"image_size {height}x{width} must be a multiple of spatial_downsample={s}",
            ),
            (
                ("samples_per_patch", "num_frames", "audio_samples_per_frame"),
                samples % self.samples_per_patch == 0,
                f"samples_per_patch={self.samples_per_patch} must divide the clip's "
                f"{samples} audio samples (num_frames x audio_samples_per_frame)",
            ),
            (
                ("num_chunks",),
                self.num_chunks <= min(points, patches),
                f"num_chunks={self.num_chunks} must be at most the number of audio "
                f"patches ({patches}) and image points ({points}), so that every "
                "chunk decodes at least one of each",
            ),
        ]


# Fields that only matter for training: not part of a mapping's configuration, and
# ignored by the JAX reference.
TRAINING_ONLY_FIELDS: Tuple[str, ...] = ("dropout", "attention_dropout")

# Read-only like TINY_CONFIGS: build() and config_from_dict() look classes up here, so
# an entry changed by any caller would change every later build.
CONFIG_CLASSES: Mapping[str, type] = types.MappingProxyType({
    "language_perceiver": LanguagePerceiverConfig,
    "imagenet_learned": ImageNetLearnedConfig,
    "imagenet_fourier": ImageNetFourierConfig,
    "imagenet_conv": ImageNetConvConfig,
    "optical_flow": OpticalFlowConfig,
    "video_autoencoding": VideoAutoencodingConfig,
})

_TINY_IMAGENET = dict(
    num_latents=16,
    d_latents=64,
    num_self_attends_per_block=2,
    num_blocks=3,
    num_self_attention_heads=8,
    num_classes=10,
)

# The sizes of the golden checkpoints (shared/official/golden/*/config.json). Read-only
# (its configs are frozen dataclasses of immutable values), so that no caller can
# change what every later build, fixture and mapping preset takes as "tiny".
TINY_CONFIGS: Mapping[str, Any] = types.MappingProxyType({
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
})


def config_class(name: str) -> type:
    """The config dataclass of model ``name``; another name raises ``ValueError``
    listing the known models (``perceiver_torch.build`` says the same)."""
    try:
        return CONFIG_CLASSES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(CONFIG_CLASSES)}"
        ) from None


def config_from_dict(name: str, values: Mapping[str, Any]) -> Any:
    """Builds the config of model ``name`` from plain values (JSON, YAML or CLI).

    Lists become tuples; unknown keys, wrong types, values out of range and values
    that do not fit together raise :class:`ConfigError` (a ``ValueError``) naming the
    key (and, for an unknown key, the valid ones). An unknown model name raises
    ``ValueError`` listing the known ones (:func:`config_class`).
    """
    cls = config_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - set(fields)))  # keys need not be text
    if unknown:
        raise ConfigError(
            f"unknown config key(s) for {name}: {', '.join(unknown)}; "
            f"valid keys: {', '.join(fields)}",
            unknown[0],
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict:
    """Plain, JSON-serialisable values of a config (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(config).items()
    }
