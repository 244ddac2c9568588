"""The ``perceiver-convert`` console script: :func:`main` loads the command line.

``converter.cli`` imports click, numpy and the registry before any command runs
(a few tenths of a second, more on a cold disk). A Ctrl-C in that time ended in a
Python traceback, and a SIGTERM killed the process on the spot, where the same
signals a moment later are one line and exit 130 or 143. :func:`main` imports only
the standard library and :mod:`converter.errors` (the ``converter`` package loads
its other modules on first use), then imports the command line with both signals
reported as the command line reports them. Only Python's own start (before this
module runs) is left to Python's default.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn, Sequence

from converter.errors import (
    EXIT_INTERRUPTED,
    Terminated,
    failure_document,
    interrupt_message,
)

__all__ = ["main", "wants_json"]


def wants_json(args: Sequence[str]) -> bool:
    """Whether the command line asks for ``--json`` (options end at ``--``)."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def _report_interrupt(error: KeyboardInterrupt, as_json: bool) -> NoReturn:
    """Exits as ``converter.cli.ConverterGroup`` does on an interrupt: one line on
    stderr and, with ``--json``, its error document on stdout
    (:func:`~converter.errors.failure_document`, which ``converter.cli.error_document``
    fills too). No traceback, even with ``--debug``: the switch is not read yet (as in
    ConverterGroup, whose own reading of it may be interrupted)."""
    code = getattr(error, "exit_code", EXIT_INTERRUPTED)
    message = interrupt_message(error)
    # A stream that cannot take the report (closed, /dev/full): the exit code still
    # says what happened.
    try:
        print(f"error: {message}", file=sys.stderr, flush=True)
    except (OSError, AttributeError, ValueError):
        pass
    if as_json:
        import json  # here: nothing but the report needs it

        try:
            print(json.dumps(failure_document(error, message, code), indent=2), flush=True)
        except (OSError, AttributeError, ValueError):
            pass
    raise SystemExit(code)


def main() -> Any:
    """Imports ``converter.cli`` and runs its ``main`` group on ``sys.argv``.

    While the import runs, Ctrl-C exits 130 and SIGTERM 143 with the one-line report
    (the ``--json`` document too). The SIGTERM handler is only set where SIGTERM has
    Python's default (a parent's ``SIG_IGN`` is kept) and is given back once the
    import is done: the commands set their own (``converter.cli.sigterm_as_interrupt``).
    """
    previous = signal.getsignal(signal.SIGTERM)
    ours = previous == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        try:
            from converter.cli import main as command_line
        finally:
            if ours:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt as error:  # Terminated (SIGTERM) too
        _report_interrupt(error, wants_json(sys.argv[1:]))
    return command_line()
