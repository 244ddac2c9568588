"""Exception types of the converter.

Every error names what is wrong (the file, key or value), shows expected against got
where there is one, and says how to fix it. The CLI maps them to exit codes.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional


class ConverterError(Exception):
    """Base class of every error the converter raises on purpose.

    ``exit_code`` is the command line's exit status for it (3: bad input).
    """

    exit_code = 3


class UsageError(ConverterError, ValueError):
    """A bad request (an option, an output path, a dtype): exit 2. Also a
    ``ValueError``, as the Python API raised before it existed."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value (``--config KEY=VALUE``, ``config=``) is unknown, of the
    wrong type, out of range or contradicts the checkpoint; ``key`` names it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class OutputError(UsageError):
    """An output would overwrite an input or an existing file (without ``--force``),
    or its name says another format."""


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

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a CI timeout, ``docker stop``), raised in the main thread by
    the CLI's handler: a ``KeyboardInterrupt``, so every cleanup of an interrupt runs
    (temporary files removed, an existing output kept); exit code 128 + 15."""

    exit_code = 143


# Ctrl-C's exit code: 128 + SIGINT, as shells report it. Here rather than in
# converter.cli with the other codes: the console script (converter.console_script)
# reports an interrupt of its startup imports before converter.cli is loaded.
EXIT_INTERRUPTED = 130


def failure_document(
    error: BaseException, message: str, exit_code: int,
    details: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The ``--json`` document of a failed command: ``{"ok": false, "error": {"type",
    "message", ...details}, "exit_code"}``. Here rather than in converter.cli
    (``error_document`` fills it for every command): the console script prints it for
    an interrupt of converter.cli's imports."""
    body: Dict[str, Any] = {"type": type(error).__name__, "message": message}
    body.update(details or {})
    return {"ok": False, "error": body, "exit_code": exit_code}


def interrupt_message(error: KeyboardInterrupt) -> str:
    """The CLI's one-line report of an interrupt (Ctrl-C, or SIGTERM as
    :class:`Terminated`); every write is atomic, so no partial file is left."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM); no partial file was left"
    return "interrupted; no partial file was left"


def check_positive_int(value: object, name: str) -> None:
    """Raises UsageError unless ``value`` is an integer of at least 1 (not a bool): a
    count such as ``batch``, where 0 or -1 failed deep in numpy or torch."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}")


def nonfinite_message(names: "list[str]", noun: str = "tensor") -> str:
    """The start of every message about weights holding NaN or Inf values: how many,
    and the first five names (inspect's pickles and other files, the exports)."""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} {noun}(s) hold NaN or Inf values ({shown})"


def extra_import_error(error: ImportError, missing: str, extra: str) -> UsageError:
    """The error (exit 2) for an optional extra whose import failed: ``missing`` (the
    message saying what needs it and how to install it) where a module is not there
    (``ModuleNotFoundError``); where one is installed but could not be loaded (a shared
    library that could not be mapped under a memory limit, ``ulimit -v``, or a broken
    install), that, and how to mend it: "install it" was no help for a package that
    is there."""
    if isinstance(error, ModuleNotFoundError):
        return UsageError(missing)
    return UsageError(
        f"{error.name or 'a library it needs'} is installed but could not be loaded "
        f"({error}); with a memory limit (ulimit -v) give it more memory, otherwise "
        f"reinstall it (pip install --force-reinstall 'perceiver-convert[{extra}]')"
    )
