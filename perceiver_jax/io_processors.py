"""Input preprocessors and output postprocessors of the official Perceiver IO.

A preprocessor turns raw inputs (channels-last) into the encoder's tokens [B, N, C]:
features first, position encoding concatenated after. Each returns
``(tokens, inputs_without_position_encoding)``.

Haiku paths follow the official modules: modules built in ``__init__`` sit under
``<name>/~/``, position encodings under ``<name>/~_build_network_inputs/`` (they are
created by a method of that name once the grid is known), everything else built in
``__call__`` directly under ``<name>/``.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver_jax import position_encoding as pe
from perceiver_jax.modules import restructure

# -------------------------------------------------------------------------------------
# Array rearrangements
# -------------------------------------------------------------------------------------


def space_to_depth(
    frames: jax.Array, temporal_block: int = 1, spatial_block: int = 1
) -> jax.Array:
    """Moves blocks of pixels into channels.

    Args:
      frames: [B, H, W, C] or [B, T, H, W, C].
      temporal_block: dt (video only).
      spatial_block: dh = dw.

    Returns:
      [B, H/dh, W/dw, dh*dw*C] or [B, T/dt, H/dh, W/dw, dt*dh*dw*C]; the new channel
      axis is ordered (dt, dh, dw, c) with c fastest.
    """
    s = spatial_block
    if frames.ndim == 4:
        b, h, w, c = frames.shape
        x = jnp.reshape(frames, [b, h // s, s, w // s, s, c])
        x = jnp.transpose(x, [0, 1, 3, 2, 4, 5])
        return jnp.reshape(x, [b, h // s, w // s, s * s * c])
    if frames.ndim == 5:
        t_ = temporal_block
        b, t, h, w, c = frames.shape
        x = jnp.reshape(frames, [b, t // t_, t_, h // s, s, w // s, s, c])
        x = jnp.transpose(x, [0, 1, 3, 5, 2, 4, 6, 7])
        return jnp.reshape(x, [b, t // t_, h // s, w // s, t_ * s * s * c])
    raise ValueError(f"expected rank 4 or 5 frames, got shape {frames.shape}")


def _patches_3x3(frames: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, H, W, 9C]: zero-padded 3x3 neighbourhoods, (row, col, c)."""
    padded = jnp.pad(frames, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="constant")
    c = padded.shape[-1]
    nchw = jnp.transpose(padded, [0, 3, 1, 2])
    # The official route: XLA's patch extraction on NCHW gives channels ordered
    # (c, row, col); they are then reordered to (row, col, c).
    patches = jax.lax.conv_general_dilated_patches(
        nchw, (3, 3), (1, 1), "VALID", rhs_dilation=(1, 1)
    )  # [N, C*9, H, W]
    n, _, h, w = patches.shape
    patches = jnp.reshape(patches, [n, c, 3, 3, h, w])
    patches = jnp.transpose(patches, [0, 4, 5, 2, 3, 1])
    return jnp.reshape(patches, [n, h, w, 9 * c])


def flow_patches(images: jax.Array) -> jax.Array:
    """Per-frame 3x3 patches of an image pair, as the official flow model takes them.

    Args:
      images: [B, T, H, W, C] (T = 2 frames).

    Returns:
      [B, T, H, W, 9C]; each pixel's channels are its zero-padded 3x3 neighbourhood
      ordered (row, col, channel).
    """
    # Mapped over the time axis like the official helper.
    return jax.vmap(_patches_3x3, in_axes=1, out_axes=1)(images)


# -------------------------------------------------------------------------------------
# Preprocessors
# -------------------------------------------------------------------------------------


class Conv2DDownsample(hk.Module):
    """4x downsampling per layer: 7x7/2 conv (no bias, SAME) -> BatchNorm -> ReLU ->
    3x3/2 max-pool (SAME). Modules ``~/conv``, ``~/batchnorm``."""

    def __init__(
        self,
        num_layers: int = 1,
        num_channels: int = 64,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._layers = []
        for _ in range(num_layers):
            conv = hk.Conv2D(
                output_channels=num_channels,
                kernel_shape=7,
                stride=2,
                with_bias=False,
                padding="SAME",
                name="conv",
            )
            norm = hk.BatchNorm(
                create_scale=True,
                create_offset=True,
                decay_rate=0.9,
                eps=1e-5,
                name="batchnorm",
            )
            self._layers.append((conv, norm))

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        """[B, H, W, C] -> [B, H/4, W/4, num_channels] per layer (SAME rounding up)."""
        for conv, norm in self._layers:
            x = conv(x)
            # Inference uses the EMA averages stored in the state (mean_ema/var_ema).
            # Those state entries only come into being in a training-mode call, so
            # init runs one (the values it leaves are placeholders for checkpoints).
            x = norm(x, is_training or hk.running_init(), test_local_stats=False)
            x = jax.nn.relu(x)
            # hk.max_pool's SAME padding is XLA's: asymmetric, padded with -inf.
            x = hk.max_pool(
                x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME"
            )
        return x


class _PositionEncodedPreprocessor(hk.Module):
    """What the image and audio preprocessors share: appending the position encoding
    ``self._position_encoding`` (a ``PositionEncodingSpec``) to their tokens."""

    _position_encoding: pe.PositionEncodingSpec

    def _build_network_inputs(self, inputs: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Flattens [B, *grid, C] to [B, N, C] and appends the position encoding.

        Keeps this name: the encodings created here are stored under
        ``<preprocessor>/~_build_network_inputs/``.
        """
        batch = inputs.shape[0]
        grid = inputs.shape[1:-1]
        if inputs.ndim > 3:
            inputs = jnp.reshape(inputs, [batch, math.prod(grid), -1])
        pos = self._position_encoding.build(grid)(batch_size=batch)
        return jnp.concatenate([inputs, pos], axis=-1), inputs


class ImagePreprocessor(_PositionEncodedPreprocessor):
    """Image (or video) featurisation plus a concatenated position encoding.

    ``prep_type``:
      * ``"conv"``: :class:`Conv2DDownsample` (``~/conv2_d_downsample``), 4x smaller;
      * ``"conv1x1"``: a 1x1 ``hk.Conv2D`` (``~/conv2_d``) to ``num_channels``;
      * ``"patches"``: space-to-depth, then optionally a Linear ``patches_linear``;
      * ``"pixels"``: the pixels, strided by the downsampling factors.
    """

    def __init__(
        self,
        prep_type: str,
        position_encoding: pe.PositionEncodingSpec,
        spatial_downsample: int = 4,
        temporal_downsample: int = 1,
        num_channels: int = 64,
        conv_after_patching: bool = False,
        name: str = "image_preprocessor",
    ):
        super().__init__(name=name)
        self._prep_type = prep_type
        self._position_encoding = position_encoding
        self._spatial = spatial_downsample
        self._temporal = temporal_downsample
        self._num_channels = num_channels
        self._conv_after_patching = conv_after_patching
        if prep_type == "conv":
            layers = round(math.log(spatial_downsample, 4))
            if 4**layers != spatial_downsample or temporal_downsample != 1:
                raise ValueError(
                    "conv preprocessing downsamples by powers of 4 in space only"
                )
            self.convnet = Conv2DDownsample(
                num_layers=layers,
                num_channels=num_channels,
                name="conv2_d_downsample",
            )
        elif prep_type == "conv1x1":
            self.convnet_1x1 = hk.Conv2D(
                num_channels,
                kernel_shape=[1, 1],
                stride=[spatial_downsample, spatial_downsample],
                name="conv2_d",
            )
        elif prep_type not in ("patches", "pixels"):
            raise ValueError(f"unknown prep_type {prep_type!r}")

    def __call__(
        self, inputs: jax.Array, is_training: bool = False
    ) -> Tuple[jax.Array, jax.Array]:
        """Images [B, H, W, C] or video [B, T, H, W, C] -> (tokens [B, N, C'],
        features without position encoding [B, N, F])."""
        if self._prep_type == "conv":
            if inputs.ndim != 4:
                raise ValueError("conv preprocessing expects [B, H, W, C] images")
            inputs = self.convnet(inputs, is_training=is_training)
        elif self._prep_type == "conv1x1":
            if inputs.ndim != 4:
                raise ValueError("conv1x1 preprocessing expects [B, H, W, C] images")
            inputs = self.convnet_1x1(inputs)
        elif self._prep_type == "patches":
            inputs = space_to_depth(inputs, self._temporal, self._spatial)
            if inputs.ndim == 5 and inputs.shape[1] == 1:
                # Optical flow: both frames were folded into channels.
                inputs = jnp.squeeze(inputs, axis=1)
            if self._conv_after_patching:
                inputs = hk.Linear(self._num_channels, name="patches_linear")(inputs)
        else:  # pixels
            s, t = self._spatial, self._temporal
            if inputs.ndim == 4:
                inputs = inputs[:, ::s, ::s]
            else:
                inputs = inputs[:, ::t, ::s, ::s]
        return self._build_network_inputs(inputs)


class AudioPreprocessor(_PositionEncodedPreprocessor):
    """Audio [B, S, 1] -> patches of ``samples_per_patch`` consecutive samples plus a
    concatenated position encoding."""

    def __init__(
        self,
        samples_per_patch: int,
        position_encoding: pe.PositionEncodingSpec,
        name: str = "audio_preprocessor",
    ):
        super().__init__(name=name)
        self._samples_per_patch = samples_per_patch
        self._position_encoding = position_encoding

    def __call__(
        self, inputs: jax.Array, is_training: bool = False
    ) -> Tuple[jax.Array, jax.Array]:
        """[B, S, 1] -> (tokens [B, S/spp, spp + P], patches [B, S/spp, spp])."""
        inputs = jnp.reshape(inputs, [inputs.shape[0], -1, self._samples_per_patch])
        return self._build_network_inputs(inputs)


class OneHotPreprocessor(hk.Module):
    """A [B, C] vector becomes one token [B, 1, C] (no position encoding)."""

    def __init__(self, name: str = "one_hot_preprocessor"):
        super().__init__(name=name)

    def __call__(
        self, inputs: jax.Array, is_training: bool = False
    ) -> Tuple[jax.Array, jax.Array]:
        tokens = inputs[:, None, :]
        return tokens, tokens


class MultimodalPreprocessor(hk.Module):
    """Runs one preprocessor per modality, pads every modality to a common width and
    concatenates them along the token axis in sorted modality order.

    Per modality ``m`` (created in ``__call__``): ``m_padding`` [1, pad] (trainable
    channels appended to every token) and, with ``mask_probs``, ``m_mask_token``
    [1, width] that replaces each token with probability ``mask_probs[m]``.

    The modality preprocessors must be constructed by the caller (at top level, like
    the official model), not here, or their paths would move under this module.
    """

    def __init__(
        self,
        modalities: Mapping[str, hk.Module],
        mask_probs: Optional[Mapping[str, float]] = None,
        min_padding_size: int = 2,
        name: str = "multimodal_preprocessor",
    ):
        super().__init__(name=name)
        self._modalities = dict(modalities)
        self._mask_probs = None if mask_probs is None else dict(mask_probs)
        self._min_padding_size = min_padding_size

    def __call__(
        self, inputs: Mapping[str, jax.Array], is_training: bool = False
    ) -> Tuple[jax.Array, Dict[str, int], Dict[str, jax.Array]]:
        """Returns (tokens [B, N, C], tokens per modality, features per modality)."""
        tokens, features = {}, {}
        for modality, preprocessor in self._modalities.items():
            tokens[modality], features[modality] = preprocessor(
                inputs[modality], is_training=is_training
            )
        width = max(t.shape[2] for t in tokens.values()) + self._min_padding_size
        padded, sizes = {}, {}
        for modality, x in tokens.items():
            batch, n, _ = x.shape
            x = pe.pad_to_width(x, width, name=f"{modality}_padding")
            if self._mask_probs is not None:
                token = pe.TrainablePositionEncoding(
                    1,
                    num_channels=width,
                    init_scale=0.02,
                    name=f"{modality}_mask_token",
                )(batch)
                # The official model draws the mask from the apply rng. With the
                # released probabilities (0 or 1) the draw cannot change the result,
                # so a missing rng falls back to a fixed key instead of failing.
                key = hk.maybe_next_rng_key()
                if key is None:
                    key = jax.random.PRNGKey(0)
                mask = jax.random.bernoulli(
                    key, self._mask_probs[modality], shape=[batch, n]
                )
                mask = jnp.expand_dims(mask, axis=2)
                # Same arithmetic as the official blend (exact for 0/1 masks).
                x = (1 - mask) * x + mask * token
            padded[modality] = x
            sizes[modality] = n
        ordered = [padded[m] for m in sorted(padded)]
        return jnp.concatenate(ordered, axis=1), sizes, features


# -------------------------------------------------------------------------------------
# Postprocessors
# -------------------------------------------------------------------------------------


class AudioPostprocessor(hk.Module):
    """[B, n, C] -> Linear to ``samples_per_patch`` -> [B, n * samples_per_patch]."""

    def __init__(self, samples_per_patch: int, name: str = "audio_postprocessor"):
        super().__init__(name=name)
        self._samples_per_patch = samples_per_patch

    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = hk.Linear(self._samples_per_patch)(inputs)
        return jnp.reshape(out, [inputs.shape[0], -1])


class ProjectionPostprocessor(hk.Module):
    """[B, n, C] -> Linear -> [B, n, num_outputs]."""

    def __init__(self, num_outputs: int, name: str = "projection_postprocessor"):
        super().__init__(name=name)
        self._num_outputs = num_outputs

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return hk.Linear(self._num_outputs)(inputs)


class ClassificationPostprocessor(hk.Module):
    """[B, 1, C] -> Linear -> logits [B, num_classes] (first token)."""

    def __init__(self, num_classes: int, name: str = "classification_postprocessor"):
        super().__init__(name=name)
        self._num_classes = num_classes

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return hk.Linear(self._num_classes)(inputs)[:, 0, :]


def multimodal_postprocess(
    postprocessors: Mapping[str, hk.Module],
    sizes: Mapping[str, int],
    outputs: jax.Array,
) -> Dict[str, jax.Array]:
    """Splits the decoder output [B, M, C] by modality (sorted order, ``sizes``
    tokens each) and applies each modality's postprocessor."""
    parts = restructure(sizes, outputs)
    return {m: post(parts[m]) for m, post in postprocessors.items()}


class EmbeddingDecoder(hk.Module):
    """Logits from the input embedding (tied weights) plus a bias ``bias`` [V]."""

    def __init__(self, name: str = "embedding_decoder"):
        super().__init__(name=name)

    def __call__(self, embeddings: jax.Array, embedding_matrix: jax.Array) -> jax.Array:
        """[B, L, D] decoder output, [V, D] embedding matrix -> logits [B, L, V]."""
        batch, length, width = embeddings.shape
        vocab = embedding_matrix.shape[0]
        # Flattened 2-D matmul against the transposed table, as the official decoder
        # computes it (the same contraction, hence the same bits).
        logits = jnp.matmul(
            embeddings.reshape([-1, width]), jnp.transpose(embedding_matrix)
        )
        bias = hk.get_parameter("bias", shape=[vocab], init=jnp.zeros)
        logits = logits + bias
        return logits.reshape([batch, length, vocab])
