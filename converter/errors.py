"""Exception types of the converter.

Every error names what is wrong (the file, key or value), shows expected against got
where there is one, and says how to fix it. The CLI maps them to exit codes.
"""

from __future__ import annotations


class ConverterError(Exception):
    """Base class of every error the converter raises on purpose."""


class CheckpointError(ConverterError):
    """A file is not a readable official Perceiver checkpoint (corrupt, truncated, wrong content)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asks for a global outside the allow-list; reading stopped before anything ran."""

    def __init__(self, message: str, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


class MappingError(ConverterError):
    """A mapping file is malformed, or a checkpoint does not fit the mapping."""


class ShapeMismatch(MappingError):
    """A tensor's shape differs from what the mapping and the model expect."""


class ParityError(ConverterError):
    """The converted model's outputs differ from the JAX reference beyond the tolerance."""
