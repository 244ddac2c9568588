"""Kinetics-700 video + audio + label autoencoder
(``video_autoencoding_checkpoint.pystate``)."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .configs import VideoAutoencodingConfig
from .decoders import FoldedDecoder, PerceiverDecoder
from .fast_paths import FastPath, enabled
from .inputs import expect, fail, same_batch
from .linear import autocasting, compiling, intercepted_within
from .micro_batches import micro_batched
from .perceiver import PerceiverIO
from .postprocessors import (
    AudioPostprocessor,
    ClassificationPostprocessor,
    MultimodalPostprocessor,
    ProjectionPostprocessor,
)
from .preprocessors import (
    VIDEO_MASK_PROBS,
    AudioPatchPreprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    VideoPatchPreprocessor,
)
from .queries import FourierQueries, MultimodalQueries, TrainableQueries

Subsample = Mapping[str, Optional[Tensor]]


class VideoAutoencoder(PerceiverIO):
    """Multimodal autoencoder of a 16-frame clip, its audio and its label.

    Inputs are preprocessed per modality (audio patches, space-to-depth video, one-hot
    label), padded to a common width and concatenated in sorted order; the label is
    always replaced by its mask token (mask probabilities audio 0, image 0, label 1),
    so the label input has no effect and defaults to zeros. Every decoder query is a
    Fourier feature of an output point at the colab's subsampled positions
    ``-1 + 2*i/N`` (plus the single trainable label query), padded to a common width.

    In eval mode the decoder folds every linear map together
    (:class:`~perceiver_torch.decoders.FoldedDecoder`, the ``FOLDED_DECODER`` fast path
    of :mod:`perceiver_torch.fast_paths`), equal to the reference up to float32
    rounding; training, ``fast_paths.plain()`` and
    :func:`perceiver_torch.capture_stages` use the plain decoder.
    """

    model_name = "video_autoencoding"

    def __init__(self, config: Optional[VideoAutoencodingConfig] = None) -> None:
        config = config or VideoAutoencodingConfig()
        super().__init__(config)
        c = config
        s = c.spatial_downsample
        height, width = c.image_size
        self.num_samples = c.num_frames * c.audio_samples_per_frame
        self.num_audio_patches = self.num_samples // c.samples_per_patch
        self.image_dims = (c.num_frames, height, width)
        image_resolution = (c.num_frames, height // s, width // s)
        self.input_preprocessor = MultimodalPreprocessor(
            modalities={
                "audio": AudioPatchPreprocessor(
                    samples_per_patch=c.samples_per_patch,
                    max_resolution=(self.num_samples,),
                    num_bands=c.audio_num_bands,
                ),
                "image": VideoPatchPreprocessor(
                    spatial_downsample=s,
                    max_resolution=image_resolution,
                    num_bands=c.image_num_bands,
                ),
                "label": OneHotPreprocessor(num_classes=c.num_classes),
            },
            min_padding=c.input_padding,
            mask_probs=VIDEO_MASK_PROBS,
        )
        self.encoder = self._build_encoder(
            input_channels=self.input_preprocessor.num_channels,
            num_self_attends_per_block=c.num_self_attends,
        )
        self.output_queries = MultimodalQueries(
            modalities={
                "audio": FourierQueries(
                    index_dims=(self.num_audio_patches,),
                    num_bands=c.audio_num_bands,
                    max_resolution=(self.num_samples,),
                    always_subsampled=True,
                ),
                "image": FourierQueries(
                    index_dims=self.image_dims,
                    num_bands=c.image_num_bands,
                    max_resolution=image_resolution,
                    always_subsampled=True,
                ),
                "label": TrainableQueries(
                    index_dim=1, num_channels=c.label_query_channels, init_scale=1.0
                ),
            },
            min_padding=c.query_padding,
        )
        self.decoder = PerceiverDecoder(
            query_channels=self.output_queries.num_channels,
            latent_channels=c.d_latents,
            output_channels=c.decoder_channels,
            # The official decoder keeps BasicDecoder's default of one head.
            num_heads=1,
            use_query_residual=False,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
        )
        self.output_postprocessor = MultimodalPostprocessor(
            modalities={
                "audio": AudioPostprocessor(
                    in_channels=c.decoder_channels,
                    samples_per_patch=c.samples_per_patch,
                ),
                "image": ProjectionPostprocessor(
                    in_channels=c.decoder_channels, num_outputs=3
                ),
                "label": ClassificationPostprocessor(
                    in_channels=c.decoder_channels, num_classes=c.num_classes
                ),
            }
        )

    # -- encoding ---------------------------------------------------------------

    def check_inputs(
        self, images: Tensor, audio: Tensor, label: Optional[Tensor] = None
    ) -> None:
        """Raises ``InputError`` unless images is float (B, num_frames, 3, H, W) at
        ``config.image_size``, audio (B, S) or (B, S, 1) with S = num_frames x
        audio_samples_per_frame, and label None or (B, num_classes), one batch size."""
        name, c = type(self).__name__, self.config
        t, (h, w) = c.num_frames, c.image_size
        expect(
            name,
            "images",
            images,
            (("B", None), ("T", t), ("3", 3), ("H", h), ("W", w)),
            what=f"{t} RGB frames of {h}x{w} in [0, 1]",
            floating=True,
            channels_axis=2,
        )
        samples = self.num_samples
        audio_dims = [("B", None), ("S", samples)]
        if isinstance(audio, Tensor) and audio.dim() == 3:
            audio_dims.append(("1", 1))
        expect(
            name,
            "audio",
            audio,
            audio_dims,
            what=f"{samples} samples = {t} frames x {c.audio_samples_per_frame}",
            floating=True,
        )
        if label is not None:
            expect(name, "label", label, (("B", None), ("classes", c.num_classes)),
                   what="label scores", floating=True)
        same_batch(name, {"images": images, "audio": audio, "label": label})

    def check_latents(self, latents: Tensor) -> None:
        """Raises ``InputError`` unless latents is a float (B, num_latents, d_latents)
        tensor, the shape :meth:`encode` returns."""
        c = self.config
        expect(
            type(self).__name__,
            "latents",
            latents,
            (("B", None), ("N", c.num_latents), ("D", c.d_latents)),
            what=f"{c.num_latents} latents of {c.d_latents} channels, as encode() returns",
            floating=True,
        )

    def preprocess(
        self, images: Tensor, audio: Tensor, label: Optional[Tensor] = None
    ) -> Tensor:
        """images: (B, T, 3, H, W); audio: (B, S) or (B, S, 1); label: (B, classes)
        or None (zeros). Returns the encoder's input tokens (B, N, width).
        Floating-point inputs are cast to the model's dtype."""
        self.check_inputs(images, audio, label)
        images, audio, label = self.cast_input((images, audio, label))
        if label is None:
            label = images.new_zeros(images.shape[0], self.config.num_classes)
        tokens, _ = self.input_preprocessor(
            {"audio": audio, "image": images, "label": label}
        )
        return tokens

    def encode(
        self, images: Tensor, audio: Tensor, label: Optional[Tensor] = None
    ) -> Tensor:
        """Returns the latents (B, num_latents, d_latents)."""
        return self.encoder(self.preprocess(images, audio, label))

    # -- decoding ---------------------------------------------------------------

    def decoder_points(self) -> Dict[str, int]:
        """Decoder points per modality: {"audio": audio patches, "image": T*H*W,
        "label": 1} (sorted order)."""
        return {
            name: module.num_points
            for name, module in self.output_queries.modalities.items()
        }

    def check_subsample(self, subsample: Optional[Subsample]) -> None:
        """Raises ``InputError`` unless ``subsample`` is None or a mapping from some
        of "audio", "image", "label" to None (every point of that modality) or a
        non-empty 1-D integer tensor of flat indices in [0, n): n = T*H*W image
        points, the audio patches, or the single label query.

        Negative indices are refused, not counted from the end, and an index past the
        end is refused rather than wrapped around (the reference clips it, which
        hides the mistake). The values are read in eager mode only (a value check
        would be a graph break or frozen into a graph); under torch.jit.trace,
        torch.export, torch.compile and in the ONNX graph an out-of-range index
        fails in the gather instead (:func:`~perceiver_torch.position_encoding.
        unravel`).
        """
        if subsample is None:
            return
        name = type(self).__name__
        points = self.decoder_points()
        if not isinstance(subsample, Mapping):
            fail(
                name,
                f"subsample must be a dict from {', '.join(map(repr, points))} to "
                f"1-D flat index tensors (or None), got {type(subsample).__name__}",
            )
        unknown = [key for key in subsample if key not in points]
        if unknown:
            fail(
                name,
                f"subsample has unknown modality {unknown[0]!r}; the modalities are "
                f"{', '.join(map(repr, points))}",
            )
        for key, index in subsample.items():
            if index is None:
                continue
            argument, n = f"subsample[{key!r}]", points[key]
            if isinstance(index, Tensor) and index.dim() == 1 and index.shape[0] == 0:
                fail(
                    name,
                    f"{argument} is empty; give at least one index in [0, {n}), or "
                    f"None (or leave {key!r} out) to decode all {n} {key} points",
                )
            expect(name, argument, index, (("n", None),),
                   what=f"flat indices in [0, {n})", floating=False)
            if index.dtype == torch.bool:
                fail(
                    name,
                    f"{argument} must be integer flat indices in [0, {n}), got a "
                    f"torch.bool mask; pass mask.nonzero().squeeze(1)",
                )
            if index.device.type == "meta" or compiling():
                continue  # no values here; a graph would freeze or break on them
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= n:
                fail(
                    name,
                    f"{argument} must hold flat indices in [0, {n}) "
                    f"({self._points_described(key)}; negative indices are not "
                    f"counted from the end), got {low if low < 0 else high}",
                )

    def _points_described(self, modality: str) -> str:
        if modality == "image":
            t, h, w = self.image_dims
            return f"{t * h * w} image points over (T, H, W) = ({t}, {h}, {w})"
        if modality == "audio":
            return (
                f"{self.num_audio_patches} audio patches of "
                f"{self.config.samples_per_patch} samples"
            )
        return "1 label query"

    def chunk_subsamples(
        self, num_chunks: Optional[int] = None, device: Optional[torch.device] = None
    ) -> List[Dict[str, Tensor]]:
        """The colab's chunks: contiguous ranges of image points and audio patches.

        Chunk i covers image points [i*n/k, (i+1)*n/k) (n = T*H*W, k = num_chunks) and
        the same share of audio patches; sizes differ by at most one when k does not
        divide n (the colab requires it to).
        """
        k = self.config.num_chunks if num_chunks is None else num_chunks
        n_image = self.image_dims[0] * self.image_dims[1] * self.image_dims[2]
        most = min(n_image, self.num_audio_patches)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
            fail(
                type(self).__name__,
                f"num_chunks must be an integer from 1 to {most} (the clip has "
                f"{self.num_audio_patches} audio patches and {n_image} image points), "
                f"got {k!r}",
            )
        images = torch.arange(n_image, device=device).tensor_split(k)
        audio = torch.arange(self.num_audio_patches, device=device).tensor_split(k)
        return [{"image": i, "audio": a} for i, a in zip(images, audio)]

    def _use_fused(self, latents: Tensor) -> bool:
        # Not under torch.jit.trace / torch.export / torch.compile: the fold chooses
        # its factorisation from the weights' values (decoders.gram_factor), which
        # export cannot branch on, a trace would freeze and torch.compile breaks the
        # graph on (Tensor.item(): four breaks, the fold then ran eagerly per call).
        # Nor under autograd, in eval mode too: the fold is formed from detached
        # weights and latents, so backward() left the encoder, decoder, heads and
        # inputs without gradients (saliency, fine-tuning with the model in eval()).
        # Nor under torch.autocast, which does not cast the fold's own products (it
        # failed there, and the plain decoder computes in autocast's dtype). Nor where
        # a module it computes around is hooked or replaced (linear.intercepted): the
        # fold reads the decoder's, queries' and postprocessors' weights instead of
        # calling them (the encoder is called either way: a hook there may stay).
        return (
            enabled(FastPath.FOLDED_DECODER)
            and not self.training
            and not torch.is_grad_enabled()
            and not compiling()
            and not autocasting(latents.device.type)
            and not intercepted_within(
                self.decoder, self.output_queries, self.output_postprocessor
            )
        )

    def _folded(self, latents: Tensor) -> FoldedDecoder:
        queries = self.output_queries
        post = self.output_postprocessor.modalities
        return FoldedDecoder(
            self.decoder,
            latents,
            {
                name: (
                    queries.modalities[name].num_channels,
                    queries.padding[name],
                    post[name].projection,
                )
                for name in queries.modalities
            },
        )

    def _decode_chunk(
        self, latents: Tensor, subsample: Subsample, folded: Optional[FoldedDecoder]
    ) -> Dict[str, Tensor]:
        batch = latents.shape[0]
        if folded is None:
            queries, sizes = self.output_queries(
                batch, subsample, device=latents.device
            )
            decoded = self.decoder(queries, latents)
            return self.output_postprocessor(decoded, sizes)
        out = {}
        post = self.output_postprocessor.modalities
        for name, module in self.output_queries.modalities.items():
            features = module.features(
                subsample.get(name), device=latents.device, dtype=latents.dtype
            )
            # folded() computes through the projection; the rest is the postprocessor's.
            projected = folded(name, features.unsqueeze(0).expand(batch, -1, -1))
            out[name] = post[name].shape_output(projected)
        return out

    def decode(
        self,
        latents: Tensor,
        subsample: Optional[Subsample] = None,
        *,
        num_chunks: Optional[int] = None,
    ) -> Dict[str, Tensor]:
        """Decodes the points ``subsample`` ({"image": flat indices over (T, H, W),
        "audio": flat indices over audio patches}; a missing modality decodes all its
        points) or, with ``subsample=None``, every point in ``num_chunks`` chunks
        (default ``config.num_chunks``); the label logits then come from the first
        chunk. Returns {"audio": (B, 16*m), "image": (B, n, 3), "label": (B, classes)}.

        ``latents`` is (B, num_latents, d_latents) floating point, as :meth:`encode`
        returns it, and is cast to the model's dtype (as ``forward`` casts its inputs);
        anything else raises ``InputError`` (:meth:`check_latents`). The indices are
        1-D integer tensors, non-empty, each in [0, n) (no negative indices); anything
        else raises ``InputError`` (:meth:`check_subsample`).
        """
        self.check_latents(latents)
        self.check_subsample(subsample)
        return self._decode(self.cast_input(latents), subsample, num_chunks)

    def _decode(
        self,
        latents: Tensor,
        subsample: Optional[Subsample],
        num_chunks: Optional[int] = None,
    ) -> Dict[str, Tensor]:
        folded = self._folded(latents) if self._use_fused(latents) else None
        if subsample is not None:
            return self._decode_chunk(latents, subsample, folded)
        chunks = self.chunk_subsamples(num_chunks, latents.device)
        batch, spp = latents.shape[0], self.config.samples_per_patch
        n_image = sum(len(c["image"]) for c in chunks)
        # Preallocated outputs: no small long-lived tensors pinning freed chunk
        # temporaries (heap fragmentation grew the resident memory by GBs).
        out = {
            "audio": latents.new_empty(batch, self.num_audio_patches * spp),
            "image": latents.new_empty(batch, n_image, 3),
        }
        image_at = audio_at = 0
        for i, chunk in enumerate(chunks):
            part = self._decode_chunk(latents, chunk, folded)
            n, m = part["image"].shape[1], part["audio"].shape[1]
            out["image"][:, image_at : image_at + n] = part["image"]
            out["audio"][:, audio_at : audio_at + m] = part["audio"]
            image_at, audio_at = image_at + n, audio_at + m
            if i == 0:
                out["label"] = part["label"]
            del part
        return out

    def tokens_per_item(self, first_input: Tensor) -> int:
        """The image tokens (4x4 space-to-depth patches); audio and label add 4%."""
        return math.prod(first_input.shape[1:]) // (3 * 16)

    @micro_batched("images", "audio", "label")
    def forward(
        self,
        images: Tensor,
        audio: Tensor,
        subsample: Optional[Subsample] = None,
        label: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """images: (B, T, 3, H, W); audio: (B, S) or (B, S, 1); subsample: see
        :meth:`decode` (checked before encoding). Returns {"audio": (B, 16*m),
        "image": (B, n, 3), "label": (B, classes)}."""
        self.check_subsample(subsample)
        return self._decode(self.encode(images, audio, label), subsample)

    @micro_batched("images", "audio", "label")
    def reconstruct(
        self,
        images: Tensor,
        audio: Tensor,
        num_chunks: Optional[int] = None,
        label: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Autoencodes a whole clip: encodes once, decodes every point in
        ``num_chunks`` chunks (default ``config.num_chunks``, the colab's 128 for the
        official model; the colab re-encodes for every chunk; same result).

        Returns {"image": (B, T, 3, H, W), "audio": (B, S), "label": (B, classes)}.
        """
        out = self._decode(self.encode(images, audio, label), None, num_chunks)
        t, h, w = self.image_dims
        image = (
            out["image"].reshape(images.shape[0], t, h, w, -1).permute(0, 1, 4, 2, 3)
        )
        return {"image": image, "audio": out["audio"], "label": out["label"]}
