"""perceiver_torch: a faithful, fast PyTorch Perceiver IO for DeepMind's six official
checkpoints.

``build(name, config=None)`` makes a model, ``load(path)`` rebuilds one from a
converted file, ``capture_stages(model)`` records intermediate stages, and
``BytesTokenizer`` is the language model's tokenizer::

    import torch
    import perceiver_torch as pt

    model = pt.load("language_perceiver.safetensors")  # eval mode
    tokenizer = pt.BytesTokenizer()
    ids, mask = tokenizer("This is an incomplete sentence where some words are missing.")
    ids[0, 51:60] = tokenizer.MASK
    with torch.no_grad():
        logits = model(ids, mask)  # (1, T, 262)
    print(tokenizer.decode(logits[0, 51:60].argmax(-1)))

Inputs use PyTorch layouts: images (B, 3, H, W), frame pairs (B, 2, 3, H, W), videos
(B, T, 3, H, W); every model checks them at the door and raises ``InputError`` naming
the expected shape (an empty batch included); invalid configs raise ``ConfigError``.
Model names: ``MODEL_NAMES``; configs: ``configs`` (``TINY_CONFIGS`` are the golden
test sizes). Eval-time fast paths (same function, another order of operations) are
listed and switched off in ``fast_paths`` (``fast_paths.plain()``). In bfloat16 on
CPUs with bfloat16 instructions the linear layers also keep a copy of their weights
in oneDNN's layout, for speed (``load(path, pack_weights=False)`` saves that memory;
``linear.Linear`` says what it costs and gains).
"""

from __future__ import annotations

from . import configs, fast_paths, micro_batches
from .configs import (
    CONFIG_CLASSES,
    TINY_CONFIGS,
    ConfigError,
    ImageNetConvConfig,
    ImageNetFourierConfig,
    ImageNetLearnedConfig,
    LanguagePerceiverConfig,
    OpticalFlowConfig,
    VideoAutoencodingConfig,
    config_from_dict,
    config_to_dict,
)
from .fast_paths import AttentionMode, FastPath
from .imagenet_conv import ImageNetConv
from .inputs import InputError
from .imagenet_fourier import ImageNetFourier
from .imagenet_learned import ImageNetLearned
from .language_perceiver import LanguagePerceiver
from .linear import pack_weights, release_packed_weights
from .optical_flow import OpticalFlow
from .perceiver import PerceiverEncoder, PerceiverIO, capture_stages
from .registry import (
    MODEL_CLASSES,
    LoadError,
    OutOfRangeError,
    build,
    load,
    read_checkpoint,
)
from .tokenizer import BytesTokenizer
from .video_autoencoding import VideoAutoencoder

MODEL_NAMES = tuple(MODEL_CLASSES)

__all__ = [
    "AttentionMode",
    "BytesTokenizer",
    "CONFIG_CLASSES",
    "ConfigError",
    "FastPath",
    "ImageNetConv",
    "ImageNetConvConfig",
    "ImageNetFourier",
    "ImageNetFourierConfig",
    "ImageNetLearned",
    "ImageNetLearnedConfig",
    "InputError",
    "LanguagePerceiver",
    "LanguagePerceiverConfig",
    "LoadError",
    "MODEL_CLASSES",
    "MODEL_NAMES",
    "OpticalFlow",
    "OpticalFlowConfig",
    "OutOfRangeError",
    "PerceiverEncoder",
    "PerceiverIO",
    "TINY_CONFIGS",
    "VideoAutoencoder",
    "VideoAutoencodingConfig",
    "build",
    "capture_stages",
    "config_from_dict",
    "config_to_dict",
    "configs",
    "fast_paths",
    "load",
    "pack_weights",
    "read_checkpoint",
    "release_packed_weights",
]
