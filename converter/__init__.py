"""perceiver-convert: official Perceiver IO Haiku checkpoints to verified PyTorch models.

Reading never imports jax or haiku and never runs code from the file; see
:func:`load_haiku_checkpoint`.
"""

from __future__ import annotations

from converter._version import __version__
from converter.errors import (
    CheckpointError,
    ConverterError,
    MappingError,
    ParityError,
    ShapeMismatch,
    UnsafeCheckpointError,
)
from converter.reader import HaikuCheckpoint, load_haiku_checkpoint
from converter.writer import save_haiku_checkpoint

__all__ = [
    "__version__",
    "CheckpointError",
    "ConverterError",
    "HaikuCheckpoint",
    "MappingError",
    "ParityError",
    "ShapeMismatch",
    "UnsafeCheckpointError",
    "load_haiku_checkpoint",
    "save_haiku_checkpoint",
]
