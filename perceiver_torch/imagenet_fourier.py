"""ImageNet classifier on raw pixels with 2-D Fourier features
(``imagenet_fourier_position_encoding.pystate``)."""

from __future__ import annotations

from typing import Optional

from .configs import ImageNetFourierConfig
from .imagenet import ImageClassifier
from .preprocessors import FourierImagePreprocessor


class ImageNetFourier(ImageClassifier):
    """Pixels ++ Fourier features of the pixel grid. Any image size: the grid follows
    the input, the frequencies follow ``config.max_resolution``."""

    model_name = "imagenet_fourier"

    def __init__(self, config: Optional[ImageNetFourierConfig] = None) -> None:
        config = config or ImageNetFourierConfig()
        super().__init__(config)
        preprocessor = FourierImagePreprocessor(
            max_resolution=config.max_resolution, num_bands=config.num_bands
        )
        self._build_perceiver(config, preprocessor)
