"""The six official Perceiver IO models as Haiku functions, and :func:`get_model`.

One keyword-only builder per model. Its parameters carry exactly the names of the
matching ``perceiver_torch.configs`` dataclass's fields (minus the training-only
dropout fields), so one configuration drives both implementations. They have no
defaults: the official values are written once, as those dataclasses' defaults, and
this package (which never imports torch) takes every value from its caller, as a
dataclass instance or a plain mapping (see :func:`resolve_config`). A builder returns
a *forward function* meant to run inside ``hk.transform_with_state``; it returns
``(outputs, stages)``:

* ``stages["preprocessed"]``: the encoder's input tokens [B, N, C];
* ``stages["latents"]``: the encoder's output [B, N_z, C_z];
* ``stages["decoder_output"]``: the decoder's output [B, M, C] before any
  postprocessing (classification: before taking query 0; flow: before the division
  by ``rescale_factor`` and the reshape; language: before the embedding decoder).

The call sequence is the official ``Perceiver.__call__``: preprocess, latents,
decoder query, encode, decode, postprocess.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax import io_processors as io
from perceiver_jax import modules as m
from perceiver_jax import position_encoding as pe

Stages = Dict[str, jax.Array]
ForwardFn = Callable[..., Tuple[Any, Stages]]


# Keyword inputs of ``apply`` per model (all required).
INPUT_NAMES: Mapping[str, Tuple[str, ...]] = {
    "language_perceiver": ("inputs", "input_mask"),
    "imagenet_learned": ("images",),
    "imagenet_fourier": ("images",),
    "imagenet_conv": ("images",),
    "optical_flow": ("images",),
    "video_autoencoding": ("images", "audio", "subsampling"),
}

# Config fields perceiver_torch has and this inference-only reference ignores.
TRAINING_ONLY_FIELDS: Tuple[str, ...] = ("dropout", "attention_dropout")


def _stages(
    preprocessed: jax.Array, latents: jax.Array, decoder_output: jax.Array
) -> Stages:
    return {
        "preprocessed": preprocessed,
        "latents": latents,
        "decoder_output": decoder_output,
    }


def _check_shape(what: str, x: Any, expected: Tuple[Optional[int], ...]) -> None:
    shape = tuple(np.shape(x))
    ok = len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected)
    )
    if not ok:
        want = ", ".join("B" if e is None else str(e) for e in expected)
        raise ValueError(f"{what} must have shape [{want}], got {list(shape)}")


def _perceiver_encoder(
    *,
    num_latents: int,
    d_latents: int,
    num_self_attends: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    num_blocks: int = 1,
    name: str = "perceiver_encoder",
    **channels: Optional[int],
) -> m.PerceiverEncoder:
    """The official ``PerceiverEncoder`` from configuration fields: ``num_latents`` x
    ``d_latents`` latents, ``num_self_attends`` self-attends applied ``num_blocks``
    times; ``channels``: ``qk_channels``/``v_channels`` where a model sets them."""
    return m.PerceiverEncoder(
        num_self_attends_per_block=num_self_attends,
        num_blocks=num_blocks,
        z_index_dim=num_latents,
        num_z_channels=d_latents,
        num_cross_attend_heads=num_cross_attention_heads,
        num_self_attend_heads=num_self_attention_heads,
        name=name,
        **channels,
    )


# -------------------------------------------------------------------------------------
# language_perceiver
# -------------------------------------------------------------------------------------


def language_perceiver(
    *,
    vocab_size: int,
    max_seq_len: int,
    d_model: int,
    num_latents: int,
    d_latents: int,
    num_self_attends: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    qk_channels: int,
    v_channels: Optional[int],
) -> ForwardFn:
    """Masked language model on UTF-8 bytes (``language_perceiver_io_bytes.pickle``).

    ``forward(inputs, input_mask)``: int [B, max_seq_len] token ids and [B, L] mask
    (nonzero = real token) -> logits [B, L, vocab_size] (padded positions included).

    ``v_channels`` (None: ``d_latents``) is the value width of the encoder's
    attentions; the decoder's value width is ``d_model``. ``qk_channels`` and the
    cross-attention heads apply to both cross-attentions.
    """
    encoder_v = d_latents if v_channels is None else v_channels
    if encoder_v != d_latents:
        # The official self-attention outputs its value width and adds it to the
        # latents, so any other width cannot be built with the official modules.
        raise ValueError(
            f"v_channels ({v_channels}) must be None or equal d_latents ({d_latents})"
        )

    def forward(inputs: jax.Array, input_mask: jax.Array) -> Tuple[jax.Array, Stages]:
        _check_shape("inputs", inputs, (None, max_seq_len))
        _check_shape("input_mask", input_mask, tuple(np.shape(inputs)))
        embed = hk.Embed(vocab_size=vocab_size, embed_dim=d_model, name="embed")
        x = embed(inputs)
        batch = x.shape[0]
        # Learned input positions are *added* to the embeddings (top-level scope).
        x = x + pe.TrainablePositionEncoding(
            max_seq_len, d_model, name="trainable_position_encoding"
        )(batch)
        encoder = _perceiver_encoder(
            num_latents=num_latents,
            d_latents=d_latents,
            num_self_attends=num_self_attends,
            num_self_attention_heads=num_self_attention_heads,
            num_cross_attention_heads=num_cross_attention_heads,
            qk_channels=qk_channels,
            v_channels=encoder_v,
        )
        decoder = m.BasicDecoder(
            output_num_channels=d_latents,  # unused: final_project=False
            query_encoding=pe.PositionEncodingSpec("trainable", num_channels=d_model),
            output_index_dims=(max_seq_len,),
            qk_channels=qk_channels,
            v_channels=d_model,
            num_heads=num_cross_attention_heads,
            final_project=False,
            use_query_residual=False,
            name="basic_decoder",
        )
        z0 = encoder.latents(batch)
        query = decoder.decoder_query(batch)
        z = encoder(x, z0, input_mask=input_mask)
        # The official colab masks the decoder's *queries* with the input mask.
        out = decoder(query, z, query_mask=input_mask)
        logits = io.EmbeddingDecoder(name="embedding_decoder")(out, embed.embeddings)
        return logits, _stages(x, z, out)

    return forward


# -------------------------------------------------------------------------------------
# ImageNet classifiers
# -------------------------------------------------------------------------------------


def _imagenet_forward(
    make_preprocessor: Callable[[], io.ImagePreprocessor],
    image_size: Optional[Tuple[int, int]],
    *,
    num_latents: int,
    d_latents: int,
    num_self_attends_per_block: int,
    num_blocks: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    num_classes: int,
    decoder_query_residual: bool,
) -> ForwardFn:
    def forward(images: jax.Array) -> Tuple[jax.Array, Stages]:
        # image_size None: any height and width.
        _check_shape("images", images, (None, *(image_size or (None, None)), 3))
        preprocessor = make_preprocessor()
        encoder = _perceiver_encoder(
            num_latents=num_latents,
            d_latents=d_latents,
            num_self_attends=num_self_attends_per_block,
            num_blocks=num_blocks,
            num_self_attention_heads=num_self_attention_heads,
            num_cross_attention_heads=num_cross_attention_heads,
        )
        # The official decoder keeps Haiku's default of one head; the configured
        # cross-attention heads are the encoder's.
        decoder = m.ClassificationDecoder(
            num_classes,
            query_channels=d_latents,
            use_query_residual=decoder_query_residual,
            name="classification_decoder",
        )
        x, _ = preprocessor(images, is_training=False)
        batch = x.shape[0]
        z0 = encoder.latents(batch)
        query = decoder.decoder_query(batch)
        z = encoder(x, z0)
        logits, raw = decoder(query, z)
        return logits, _stages(x, z, raw)

    return forward


def imagenet_learned(
    *,
    image_size: Tuple[int, int],
    pos_channels: int,
    num_latents: int,
    d_latents: int,
    num_self_attends_per_block: int,
    num_blocks: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    num_classes: int,
    decoder_query_residual: bool,
) -> ForwardFn:
    """ImageNet classifier: 1x1 conv + learned, projected 2-D position encoding.

    ``forward(images)``: float32 [B, *image_size, 3] normalised -> logits
    [B, num_classes]. The learned table has one row per pixel of ``image_size``.
    """
    image_size = tuple(image_size)

    def make_preprocessor() -> io.ImagePreprocessor:
        return io.ImagePreprocessor(
            prep_type="conv1x1",
            position_encoding=pe.PositionEncodingSpec(
                "trainable",
                num_channels=pos_channels,
                init_scale=0.02,
                project_to=pos_channels,
            ),
            spatial_downsample=1,
            num_channels=pos_channels,
            name="image_preprocessor",
        )

    return _imagenet_forward(
        make_preprocessor,
        image_size,
        num_latents=num_latents,
        d_latents=d_latents,
        num_self_attends_per_block=num_self_attends_per_block,
        num_blocks=num_blocks,
        num_self_attention_heads=num_self_attention_heads,
        num_cross_attention_heads=num_cross_attention_heads,
        num_classes=num_classes,
        decoder_query_residual=decoder_query_residual,
    )


def imagenet_fourier(
    *,
    max_resolution: Tuple[int, int],
    num_bands: int,
    num_latents: int,
    d_latents: int,
    num_self_attends_per_block: int,
    num_blocks: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    num_classes: int,
    decoder_query_residual: bool,
) -> ForwardFn:
    """ImageNet classifier on raw pixels with 2-D Fourier features.

    ``forward(images)``: float32 [B, H, W, 3] normalised (any H, W; the official
    model uses 224 = ``max_resolution``) -> logits [B, num_classes].
    """

    def make_preprocessor() -> io.ImagePreprocessor:
        return io.ImagePreprocessor(
            prep_type="pixels",
            position_encoding=pe.PositionEncodingSpec(
                "fourier", num_bands=num_bands, max_resolution=tuple(max_resolution)
            ),
            spatial_downsample=1,
            name="image_preprocessor",
        )

    return _imagenet_forward(
        make_preprocessor,
        None,
        num_latents=num_latents,
        d_latents=d_latents,
        num_self_attends_per_block=num_self_attends_per_block,
        num_blocks=num_blocks,
        num_self_attention_heads=num_self_attention_heads,
        num_cross_attention_heads=num_cross_attention_heads,
        num_classes=num_classes,
        decoder_query_residual=decoder_query_residual,
    )


def imagenet_conv(
    *,
    max_resolution: Tuple[int, int],
    num_bands: int,
    conv_channels: int,
    num_latents: int,
    d_latents: int,
    num_self_attends_per_block: int,
    num_blocks: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    num_classes: int,
    decoder_query_residual: bool,
) -> ForwardFn:
    """ImageNet classifier: conv + BatchNorm + max-pool stem (4x down) + Fourier.

    ``forward(images)``: float32 [B, H, W, 3] normalised (official: 224, i.e.
    4 x ``max_resolution``) -> logits [B, num_classes]. The BatchNorm statistics
    come from the state (``image_preprocessor/~/conv2_d_downsample/~/batchnorm``).
    """

    def make_preprocessor() -> io.ImagePreprocessor:
        return io.ImagePreprocessor(
            prep_type="conv",
            position_encoding=pe.PositionEncodingSpec(
                "fourier", num_bands=num_bands, max_resolution=tuple(max_resolution)
            ),
            spatial_downsample=4,
            num_channels=conv_channels,
            name="image_preprocessor",
        )

    return _imagenet_forward(
        make_preprocessor,
        None,
        num_latents=num_latents,
        d_latents=d_latents,
        num_self_attends_per_block=num_self_attends_per_block,
        num_blocks=num_blocks,
        num_self_attention_heads=num_self_attention_heads,
        num_cross_attention_heads=num_cross_attention_heads,
        num_classes=num_classes,
        decoder_query_residual=decoder_query_residual,
    )


# -------------------------------------------------------------------------------------
# optical_flow
# -------------------------------------------------------------------------------------


def optical_flow(
    *,
    image_size: Tuple[int, int],
    num_bands: int,
    patch_channels: int,
    num_latents: int,
    d_latents: int,
    num_self_attends: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    rescale_factor: float,
    flow_scale: float,
) -> ForwardFn:
    """Optical flow between two frames.

    ``forward(images)``: float32 [B, 2, *image_size, 3] in [-1, 1] -> flow in pixels
    [B, *image_size, 2]: the network output / ``rescale_factor`` (inside the official
    model) x ``flow_scale`` (the official colab's transformed function). The 3x3
    patch extraction happens inside, as in the colab.
    """
    image_size = tuple(image_size)

    def forward(images: jax.Array) -> Tuple[jax.Array, Stages]:
        _check_shape("images", images, (None, 2, image_size[0], image_size[1], 3))
        preprocessor = io.ImagePreprocessor(
            prep_type="patches",
            position_encoding=pe.PositionEncodingSpec(
                "fourier", num_bands=num_bands, max_resolution=image_size
            ),
            spatial_downsample=1,
            temporal_downsample=2,
            num_channels=patch_channels,
            conv_after_patching=True,
            name="image_preprocessor",
        )
        encoder = _perceiver_encoder(
            num_latents=num_latents,
            d_latents=d_latents,
            num_self_attends=num_self_attends,
            num_self_attention_heads=num_self_attention_heads,
            num_cross_attention_heads=num_cross_attention_heads,
        )
        decoder = m.FlowDecoder(
            image_size, rescale_factor=rescale_factor, name="flow_decoder"
        )
        x, _ = preprocessor(io.flow_patches(images), is_training=False)
        batch = x.shape[0]
        z0 = encoder.latents(batch)
        query = decoder.decoder_query(x)
        z = encoder(x, z0)
        flow, raw = decoder(query, z)
        return flow * flow_scale, _stages(x, z, raw)

    return forward


# -------------------------------------------------------------------------------------
# video_autoencoding
# -------------------------------------------------------------------------------------


def video_autoencoding(
    *,
    num_frames: int,
    image_size: Tuple[int, int],
    audio_samples_per_frame: int,
    samples_per_patch: int,
    spatial_downsample: int,
    num_latents: int,
    d_latents: int,
    num_self_attends: int,
    num_self_attention_heads: int,
    num_cross_attention_heads: int,
    audio_num_bands: int,
    image_num_bands: int,
    num_classes: int,
    decoder_channels: int,
    label_query_channels: int,
    input_padding: int,
    query_padding: int,
    num_chunks: int,
) -> ForwardFn:
    """Kinetics-700 video + audio + label autoencoder (the video colab's model).

    ``forward(images, audio, subsampling, label=None)``:

    * ``images`` float32 [B, num_frames, *image_size, 3];
    * ``audio`` float32 [B, num_frames * audio_samples_per_frame, 1];
    * ``subsampling``: ``{"image": int [n], "audio": int [m]}``, the flat indices of
      the pixels (over (T, H, W)) and audio patches to decode (see
      :func:`video_subsampling`); a ``"label"`` entry, if present, must be None;
    * ``label``: ignored in effect (the label token is always replaced by the mask
      token); zeros [B, num_classes] by default, like the colab.

    Returns ``{"image": [B, n, 3], "audio": [B, samples_per_patch * m],
    "label": [B, num_classes]}``. ``num_chunks`` is only used by
    :func:`video_subsampling`: the colab decodes a clip in that many calls.
    """
    image_size = tuple(image_size)
    n_audio = num_frames * audio_samples_per_frame
    if n_audio % samples_per_patch:
        raise ValueError("the audio length must be a multiple of samples_per_patch")
    if any(s % spatial_downsample for s in image_size):
        raise ValueError("image_size must be a multiple of spatial_downsample")
    # The video's Fourier resolution is the space-to-depth grid.
    image_resolution = (
        num_frames,
        image_size[0] // spatial_downsample,
        image_size[1] // spatial_downsample,
    )
    audio_encoding = pe.PositionEncodingSpec(
        "fourier", num_bands=audio_num_bands, max_resolution=(n_audio,)
    )
    image_encoding = pe.PositionEncodingSpec(
        "fourier", num_bands=image_num_bands, max_resolution=image_resolution
    )

    def forward(
        images: jax.Array,
        audio: jax.Array,
        subsampling: Mapping[str, Any],
        label: Optional[jax.Array] = None,
    ) -> Tuple[Dict[str, jax.Array], Stages]:
        _check_shape(
            "images", images, (None, num_frames, image_size[0], image_size[1], 3)
        )
        _check_shape("audio", audio, (None, n_audio, 1))
        points = _check_subsampling(subsampling)
        batch = images.shape[0]
        if label is None:
            label = jnp.zeros((batch, num_classes), dtype=jnp.float32)
        _check_shape("label", label, (None, num_classes))

        # The modules in the official creation order (Haiku numbers names by it).
        preprocessor = _video_preprocessor(
            samples_per_patch, audio_encoding, image_encoding, spatial_downsample,
            input_padding,
        )
        postprocessors = {
            "audio": io.AudioPostprocessor(samples_per_patch),
            "image": io.ProjectionPostprocessor(3),
            "label": io.ClassificationPostprocessor(num_classes),
        }
        encoder = _perceiver_encoder(
            num_latents=num_latents,
            d_latents=d_latents,
            num_self_attends=num_self_attends,
            num_self_attention_heads=num_self_attention_heads,
            num_cross_attention_heads=num_cross_attention_heads,
            name="encoder",  # the one official model not called perceiver_encoder
        )
        decoder = _video_decoder(
            audio_encoding,
            image_encoding,
            audio_patches=n_audio // samples_per_patch,
            video_shape=(num_frames,) + image_size,
            num_classes=num_classes,
            decoder_channels=decoder_channels,
            label_query_channels=label_query_channels,
            query_padding=query_padding,
        )

        x, _, _ = preprocessor(
            {"image": images, "audio": audio, "label": label}, is_training=False
        )
        z0 = encoder.latents(batch)
        query, sizes = decoder.decoder_query(batch, points)
        z = encoder(x, z0)
        out = decoder(query, z)
        outputs = io.multimodal_postprocess(postprocessors, sizes, out)
        return outputs, _stages(x, z, out)

    return forward


def _video_preprocessor(
    samples_per_patch: int,
    audio_encoding: pe.PositionEncodingSpec,
    image_encoding: pe.PositionEncodingSpec,
    spatial_downsample: int,
    input_padding: int,
) -> io.MultimodalPreprocessor:
    """The video model's input: audio patches, space-to-depth video patches and the
    (always masked) label, each with its Fourier features, padded to one width."""
    # As in the colab, every modality module is built at top level (paths like
    # ``audio_preprocessor/linear``) and handed to the multimodal wrapper.
    return io.MultimodalPreprocessor(
        modalities={
            "audio": io.AudioPreprocessor(
                samples_per_patch, audio_encoding, name="audio_preprocessor"
            ),
            "image": io.ImagePreprocessor(
                prep_type="patches",
                position_encoding=image_encoding,
                spatial_downsample=spatial_downsample,
                temporal_downsample=1,
                name="image_preprocessor",
            ),
            "label": io.OneHotPreprocessor(name="one_hot_preprocessor"),
        },
        # The label is always masked: reconstruction must not see it.
        mask_probs={"image": 0.0, "audio": 0.0, "label": 1.0},
        min_padding_size=input_padding,
        name="multimodal_preprocessor",
    )


def _video_decoder(
    audio_encoding: pe.PositionEncodingSpec,
    image_encoding: pe.PositionEncodingSpec,
    *,
    audio_patches: int,
    video_shape: Tuple[int, int, int],
    num_classes: int,
    decoder_channels: int,
    label_query_channels: int,
    query_padding: int,
) -> m.MultimodalDecoder:
    """One shared decoder over the three modalities' queries, padded to one width.

    The query decoders are parameter-free except the label's trainable query
    (``classification_decoder/~/basic_decoder/~/trainable_position_encoding``). The
    image grid is the full-resolution video (``video_shape``), its Fourier resolution
    the space-to-depth grid; the audio grid is the patches, its resolution the
    samples: both as in the colab.
    """
    query_decoders = {
        "audio": m.BasicDecoder(
            output_num_channels=decoder_channels,
            query_encoding=audio_encoding,
            output_index_dims=(audio_patches,),
            name="basic_decoder",
        ),
        "image": m.BasicDecoder(
            output_num_channels=decoder_channels,
            query_encoding=image_encoding,
            output_index_dims=video_shape,
            name="basic_video_autoencoding_decoder",
        ),
        "label": m.ClassificationDecoder(
            num_classes,
            query_channels=label_query_channels,
            use_query_residual=False,
            name="classification_decoder",
        ),
    }
    return m.MultimodalDecoder(
        query_decoders,
        output_num_channels=decoder_channels,
        min_padding_size=query_padding,
        name="multimodal_decoder",
    )


def _check_subsampling(subsampling: Any) -> Dict[str, Any]:
    if not isinstance(subsampling, Mapping):
        raise ValueError(
            'subsampling must be a mapping {"image": indices, "audio": indices}'
        )
    unknown = set(subsampling) - {"image", "audio", "label"}
    missing = {"image", "audio"} - set(subsampling)
    if unknown or missing:
        raise ValueError(
            "subsampling needs the keys 'image' and 'audio' "
            f"(got {sorted(subsampling)})"
        )
    if subsampling.get("label") is not None:
        raise ValueError("the label query cannot be subsampled (use None)")
    points = {}
    for key in ("image", "audio"):
        if len(np.shape(subsampling[key])) != 1:
            raise ValueError(f"subsampling[{key!r}] must be a 1-D array of indices")
        points[key] = subsampling[key]
    return points


def video_subsampling(
    config: Any, chunk_index: int = 0, num_chunks: Optional[int] = None
) -> Dict[str, np.ndarray]:
    """The colab's decoding chunk ``chunk_index``: consecutive flat indices.

    Args:
      config: video_autoencoding config (see :func:`resolve_config`).
      chunk_index: which chunk, 0 <= chunk_index < num_chunks.
      num_chunks: default: the config's ``num_chunks``.

    Returns:
      ``{"image": int32 [T*H*W / num_chunks], "audio": int32 [S/spp / num_chunks]}``.
    """
    kw = resolve_config("video_autoencoding", config)
    num_chunks = kw["num_chunks"] if num_chunks is None else num_chunks
    if not 0 <= chunk_index < num_chunks:
        raise ValueError(f"chunk_index must be in [0, {num_chunks})")
    pixels = kw["num_frames"] * kw["image_size"][0] * kw["image_size"][1]
    patches = kw["num_frames"] * kw["audio_samples_per_frame"]
    patches //= kw["samples_per_patch"]
    n_img, n_aud = pixels // num_chunks, patches // num_chunks
    return {
        "image": np.arange(
            n_img * chunk_index, n_img * (chunk_index + 1), dtype=np.int32
        ),
        "audio": np.arange(
            n_aud * chunk_index, n_aud * (chunk_index + 1), dtype=np.int32
        ),
    }


# -------------------------------------------------------------------------------------
# Registry and configuration
# -------------------------------------------------------------------------------------

BUILDERS: Mapping[str, Callable[..., ForwardFn]] = {
    "language_perceiver": language_perceiver,
    "imagenet_learned": imagenet_learned,
    "imagenet_fourier": imagenet_fourier,
    "imagenet_conv": imagenet_conv,
    "optical_flow": optical_flow,
    "video_autoencoding": video_autoencoding,
}
MODEL_NAMES: Tuple[str, ...] = tuple(BUILDERS)


def config_fields(name: str) -> Tuple[str, ...]:
    """The configuration fields of model ``name`` (its builder's parameters), in order."""
    _check_name(name)
    return tuple(inspect.signature(BUILDERS[name]).parameters)


def _check_name(name: str) -> None:
    if name not in BUILDERS:
        raise ValueError(
            f"unknown model {name!r}; expected one of: {', '.join(MODEL_NAMES)}"
        )


def resolve_config(name: str, config: Any) -> Dict[str, Any]:
    """Builder keyword arguments for model ``name`` from a configuration.

    Args:
      name: one of :data:`MODEL_NAMES`.
      config: a dataclass instance (``perceiver_torch.configs``: its defaults are the
        official sizes); a mapping with every field; or any other object carrying
        every field as an attribute. ``dropout``/``attention_dropout`` are accepted
        and ignored. Lists become tuples.

    Returns:
      A complete dict of the builder's keyword arguments.

    Raises:
      ValueError: no configuration, unknown field names (the message lists the valid
        ones), or a mapping or object lacking some fields.
    """
    fields = config_fields(name)
    if config is None:
        raise ValueError(
            f"perceiver_jax holds no default configuration; pass the {name} config, "
            f"e.g. perceiver_torch.configs.CONFIG_CLASSES['{name}']() for the official "
            f"sizes, or a mapping with the fields {', '.join(fields)}"
        )
    if isinstance(config, Mapping):
        values: Dict[str, Any] = dict(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        values = {k: getattr(config, k) for k in fields if hasattr(config, k)}
    unknown = sorted(set(values) - set(fields) - set(TRAINING_ONLY_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown config key(s) for {name}: {', '.join(unknown)}; "
            f"valid keys: {', '.join(list(fields) + list(TRAINING_ONLY_FIELDS))}"
        )
    missing = [k for k in fields if k not in values]
    if missing:
        raise ValueError(f"config for {name} lacks the field(s) {', '.join(missing)}")
    return {
        key: tuple(values[key]) if isinstance(values[key], list) else values[key]
        for key in fields
    }


def get_model(
    name: str, config: Any, *, stages: bool = False
) -> hk.TransformedWithState:
    """The official model ``name`` as ``hk.transform_with_state``.

    Args:
      name: one of :data:`MODEL_NAMES`.
      config: see :func:`resolve_config` (``perceiver_torch.configs.OpticalFlowConfig()``
        gives the released model's sizes).
      stages: if True, ``apply`` returns ``(outputs, stages)`` (see module doc).

    Returns:
      ``init(rng, **inputs)`` and ``apply(params, state, rng, **inputs)`` with the
      keyword inputs of :data:`INPUT_NAMES` (channels-last, as in the colabs).
      ``apply`` returns ``(outputs, state)`` like any Haiku stateful function.
      The outputs do not depend on ``rng`` (inference only; None is accepted).
    """
    kwargs = resolve_config(name, config)  # also checks the name
    forward = BUILDERS[name](**kwargs)

    def run(**inputs: Any) -> Any:
        outputs, captured = forward(**inputs)
        return (outputs, captured) if stages else outputs

    return hk.transform_with_state(run)


def input_specs(name: str, config: Any, batch_size: int = 1) -> Dict[str, Any]:
    """Abstract inputs (``jax.ShapeDtypeStruct``) of model ``name`` at ``config``'s sizes.

    Enough for ``jax.eval_shape(model.init, rng, **specs)``. Image sizes that are not
    config fields follow the official models: imagenet_fourier uses
    ``max_resolution``, imagenet_conv 4 x ``max_resolution``; video decodes chunk 0
    of ``num_chunks``.
    """
    kw = resolve_config(name, config)
    b = batch_size
    f32, i32 = jnp.float32, jnp.int32
    spec = jax.ShapeDtypeStruct
    if name == "language_perceiver":
        shape = (b, kw["max_seq_len"])
        return {"inputs": spec(shape, i32), "input_mask": spec(shape, i32)}
    if name == "imagenet_learned":
        return {"images": spec((b, *kw["image_size"], 3), f32)}
    if name == "imagenet_fourier":
        return {"images": spec((b, *kw["max_resolution"], 3), f32)}
    if name == "imagenet_conv":
        h, w = (4 * r for r in kw["max_resolution"])
        return {"images": spec((b, h, w, 3), f32)}
    if name == "optical_flow":
        return {"images": spec((b, 2, *kw["image_size"], 3), f32)}
    # video_autoencoding
    chunk = video_subsampling(kw)
    n_audio = kw["num_frames"] * kw["audio_samples_per_frame"]
    return {
        "images": spec((b, kw["num_frames"], *kw["image_size"], 3), f32),
        "audio": spec((b, n_audio, 1), f32),
        "subsampling": {k: spec(v.shape, i32) for k, v in chunk.items()},
    }


def num_params(tree: Mapping[str, Mapping[str, Any]]) -> int:
    """Total number of scalars in a two-level Haiku parameter tree."""
    return sum(
        int(math.prod(np.shape(v))) for mod in tree.values() for v in mod.values()
    )
