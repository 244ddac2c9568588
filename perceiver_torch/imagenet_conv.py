"""ImageNet classifier with a conv + BatchNorm + max-pool stem
(``imagenet_conv_preprocessing.pystate``)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .configs import ImageNetConvConfig
from .imagenet import ImageClassifier
from .preprocessors import ConvStemPreprocessor


class ImageNetConv(ImageClassifier):
    """Conv 7x7/2 -> BatchNorm -> ReLU -> max-pool 3x3/2 (TF SAME paddings), tokens ++
    Fourier features of the 4x smaller grid. Any image size: the grid follows the
    feature map, the frequencies follow ``config.max_resolution``."""

    model_name = "imagenet_conv"
    # One image per CPU inference slice, not the two its 3,136 tokens would allow:
    # two images put 1,024 latent rows through the 1,024 x 1,024 layers, which
    # oneDNN's bfloat16 kernel runs far below its rate for 512 rows on an Intel Xeon
    # with AMX (2026-12-06, in one process, batch 8 against batch 1's 3.05 images/s:
    # 2.10 in slices of two, 2.92 in slices of one); in float32 both are level
    # (0.67-0.69 images/s).
    max_items_per_slice = 1

    def __init__(self, config: Optional[ImageNetConvConfig] = None) -> None:
        config = config or ImageNetConvConfig()
        super().__init__(config)
        preprocessor = ConvStemPreprocessor(
            max_resolution=config.max_resolution,
            num_bands=config.num_bands,
            channels=config.conv_channels,
        )
        self._build_perceiver(config, preprocessor)

    def tokens_per_item(self, first_input: Tensor) -> int:
        """One token per pixel of the stem's 4x smaller feature map."""
        return -(-first_input.shape[-2] // 4) * -(-first_input.shape[-1] // 4)
