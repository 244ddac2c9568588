"""What the command line prints for people: file names and messages made safe to show.

A file name may hold any character but ``/`` and NUL, so one taken from an archive or
a download can carry terminal escape sequences (``\\x1b[2J`` clears the screen, others
retitle the window or hide text), a carriage return that overwrites the start of the
line, or Unicode bidirectional overrides that show text in another order than it is.
Every human-readable line the CLI prints goes through :func:`echo`, which shows such
characters as Python escapes (``\\x1b``, ``\\r``, ``\\u202e``) instead of obeying them.

Newlines and tabs are kept: reports and multi-line errors use them. JSON documents
need nothing: ``json.dumps`` already escapes every control character (but not NaN
and infinite numbers, which JSON lacks: :func:`json_text`).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Optional

import click

# C0 controls but tab and newline, DEL, the C1 controls (U+0080-U+009F: U+009B is a
# one-character escape sequence on some terminals), and the bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069) and marks (U+200E, U+200F,
# U+061C) that reorder what follows them.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: "re.Match[str]") -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def terminal_safe(text: str) -> str:
    """``text`` with the characters a terminal would obey (see the module docstring)
    shown as Python escapes; unchanged where it has none."""
    return _UNSAFE.sub(_escaped, text)


def echo(message: Any = "", err: bool = False, nl: bool = True, file: Optional[Any] = None) -> None:
    """``click.echo`` of ``message`` made :func:`terminal_safe`.

    A stream that cannot take it (``>/dev/full``: ENOSPC, EIO, ...) is a
    :class:`~converter.errors.ConverterError` naming the stream (exit 3), as
    ``echo_json`` says for a JSON document, not "unexpected OSError ... please report
    it". A reader that went away (BrokenPipeError) is left to the CLI (exit 141)."""
    if file is None and not err and sys.stdout is None:  # started with >&-
        from converter.errors import ConverterError

        raise ConverterError("cannot write to stdout: it is closed")
    try:
        click.echo(terminal_safe(str(message)), err=err, nl=nl, file=file)
    except BrokenPipeError:
        raise
    except OSError as error:
        from converter.errors import ConverterError

        where = "stderr" if err else "stdout" if file is None else "the output"
        raise ConverterError(
            f"cannot write to {where}: {error.strerror or error}; send it to a file or "
            "device that has room"
        ) from None


def json_text(document: Any, indent: int = 2) -> str:
    """``json.dumps(document, indent=indent)`` with every NaN or infinite number null:
    JSON has neither, and json.dumps's NaN/Infinity (verify's differences of outputs
    that overflowed, an HF export's fidelity report of such outputs) made documents
    that JSON parsers refuse."""
    try:
        return json.dumps(document, indent=indent, allow_nan=False)
    except ValueError:
        finite = json.loads(json.dumps(document), parse_constant=lambda _: None)
        return json.dumps(finite, indent=indent)
