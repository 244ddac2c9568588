"""perceiver-convert: official Perceiver IO Haiku checkpoints to verified PyTorch models.

Reading never imports jax or haiku and never runs code from the file; see
:func:`load_haiku_checkpoint`.
"""

from __future__ import annotations

from converter._version import __version__
from converter.errors import (
    CheckpointError,
    ConfigError,
    ConverterError,
    MappingError,
    OutputError,
    ParityError,
    ShapeMismatch,
    UnsafeCheckpointError,
    UsageError,
)
from converter.reader import HaikuCheckpoint, load_haiku_checkpoint
from converter.writer import save_haiku_checkpoint


def __getattr__(name: str):
    # convert() and export() import torch and perceiver_torch; load them on first use
    # so that reading, writing and inspecting checkpoints stay light.
    if name in ("convert", "ConversionResult"):
        from converter import conversion

        return getattr(conversion, name)
    if name == "export":
        from converter.exporter import export

        return export
    raise AttributeError(f"module 'converter' has no attribute {name!r}")

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "ConversionResult",
    "ConverterError",
    "HaikuCheckpoint",
    "MappingError",
    "OutputError",
    "ParityError",
    "ShapeMismatch",
    "UnsafeCheckpointError",
    "UsageError",
    "convert",
    "export",
    "load_haiku_checkpoint",
    "save_haiku_checkpoint",
]
