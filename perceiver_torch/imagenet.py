"""What the three ImageNet classifiers share: encoder and classification decoder.

The three models differ only in their input preprocessor (see ``imagenet_learned``,
``imagenet_fourier``, ``imagenet_conv``) and in the decoder's query residual.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import Tensor, nn

from .decoders import PerceiverDecoder
from .inputs import expect
from .micro_batches import micro_batched
from .perceiver import PerceiverIO
from .postprocessors import ClassificationPostprocessor
from .queries import TrainableQueries


class ImageClassifier(PerceiverIO):
    """Perceiver IO classifier: one trainable query, 1-head decoder, Linear to classes.

    Subclasses build ``input_preprocessor`` (with ``num_channels``) and call
    ``_build_perceiver``.
    """

    def _build_perceiver(self, config: Any, input_preprocessor: nn.Module) -> None:
        c = config
        self.input_preprocessor = input_preprocessor
        self.encoder = self._build_encoder(
            input_channels=input_preprocessor.num_channels,
            num_self_attends_per_block=c.num_self_attends_per_block,
            num_blocks=c.num_blocks,
        )
        self.output_queries = TrainableQueries(index_dim=1, num_channels=c.d_latents)
        self.decoder = PerceiverDecoder(
            query_channels=c.d_latents,
            latent_channels=c.d_latents,
            output_channels=c.num_classes,
            # The official decoder keeps BasicDecoder's default of one head.
            num_heads=1,
            use_query_residual=c.decoder_query_residual,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
        )
        self.output_postprocessor = ClassificationPostprocessor()

    def image_size(self) -> Tuple[Optional[int], Optional[int]]:
        """The (H, W) the model requires; None = any size."""
        return (None, None)

    def check_inputs(self, images: Tensor) -> None:
        """Raises ``InputError`` unless images is a float (B, 3, H, W) tensor (at
        ``image_size()`` where the model requires one)."""
        height, width = self.image_size()
        expect(
            type(self).__name__,
            "images",
            images,
            (("B", None), ("3", 3), ("H", height), ("W", width)),
            what="RGB images, ImageNet-normalised",
            floating=True,
            channels_axis=1,
            note=self.size_note(),
        )

    def size_note(self) -> str:
        """Why ``image_size()`` is required (said with a wrong shape)."""
        return ""

    def tokens_per_item(self, first_input: Tensor) -> int:
        """One token per pixel (the learned and Fourier preprocessors)."""
        return first_input.shape[-2] * first_input.shape[-1]

    @micro_batched("images")
    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W), normalised -> logits (B, num_classes)."""
        self.check_inputs(images)
        preprocessed = self.input_preprocessor(images)
        latents = self.encoder(preprocessed)
        queries = self.output_queries(images.shape[0])
        return self.output_postprocessor(self.decoder(queries, latents))
