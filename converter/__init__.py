"""perceiver-convert: official Perceiver IO Haiku checkpoints to verified PyTorch models.

Reading never imports jax or haiku and never runs code from the file; see
:func:`load_haiku_checkpoint`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

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

if TYPE_CHECKING:
    from converter.conversion import ConversionResult, convert
    from converter.exporter import export
    from converter.haiku_reader import HaikuCheckpoint, load_haiku_checkpoint
    from converter.haiku_writer import save_haiku_checkpoint

# Loaded on first use: convert() and export() import torch, the reader and writer
# numpy. Importing the package (and with it converter.errors) stays light: the
# console script (converter.console_script) reports a Ctrl-C once it has
# converter.errors, and everything it imports before that is time in which a Ctrl-C
# is a Python traceback.
_LAZY = {
    "convert": "converter.conversion",
    "ConversionResult": "converter.conversion",
    "export": "converter.exporter",
    "HaikuCheckpoint": "converter.haiku_reader",
    "load_haiku_checkpoint": "converter.haiku_reader",
    "save_haiku_checkpoint": "converter.haiku_writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'converter' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> List[str]:
    # The names __getattr__ gives are not in the module's dict: listed here, so that
    # dir() (IPython's completion, inspect.getmembers) shows them as it did.
    return sorted(set(globals()) | set(_LAZY))

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
