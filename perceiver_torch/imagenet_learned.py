"""ImageNet classifier with a 1x1 conv and a learned 2-D position encoding
(``imagenet_learned_position_encoding.pystate``)."""

from __future__ import annotations

from typing import Optional, Tuple

from .configs import ImageNetLearnedConfig
from .imagenet import ImageClassifier
from .preprocessors import LearnedImagePreprocessor


class ImageNetLearned(ImageClassifier):
    """Pixels -> 1x1 conv (P) ++ Linear(learned positions) (P). Only accepts images of
    ``config.image_size`` (the learned encoding has one row per pixel). The official
    decoder has no query residual."""

    model_name = "imagenet_learned"

    def __init__(self, config: Optional[ImageNetLearnedConfig] = None) -> None:
        config = config or ImageNetLearnedConfig()
        super().__init__(config)
        preprocessor = LearnedImagePreprocessor(
            image_size=config.image_size, channels=config.pos_channels
        )
        self._build_perceiver(config, preprocessor)

    def image_size(self) -> Tuple[Optional[int], Optional[int]]:
        """``config.image_size``: the learned encoding has one row per pixel."""
        return tuple(self.config.image_size)

    def size_note(self) -> str:
        h, w = self.config.image_size
        return f"the learned position encoding covers {h}x{w} images only"
