"""The ``perceiver-convert`` command line.

Every command is a small function on the :func:`main` group; what they share lives
here as helpers:

* :class:`ConverterGroup` runs every command under one error policy: a
  :class:`~converter.errors.ConverterError` becomes ``error: <message>`` on stderr and
  its ``exit_code`` (:class:`~converter.errors.ParityError` 1, usage and config errors
  2, bad input 3), Ctrl-C exits 130, anything unexpected one line (exit 3); never a
  traceback, unless ``--debug`` (or ``PERCEIVER_CONVERT_DEBUG=1``). With ``--json``
  on the command line, an error is also one JSON document on stdout
  (:func:`error_document`).
* :func:`output_option` gives a command ``-o/--output`` and ``--force`` and refuses,
  before the command runs, an output that is one of the command's inputs or that
  exists (without ``--force``); :func:`echo_json` prints one JSON document on stdout.

The console script runs :func:`main` through :mod:`converter.console_script`, which
reports an interrupt of this module's imports the same way.

Nothing here imports jax (nor torch): ``fixture`` and ``inspect`` work without them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

import click

from converter._version import __version__
from converter.atomic import check_outputs
from converter.terminal import echo, json_text, terminal_safe
from converter.errors import (
    EXIT_INTERRUPTED,
    CheckpointError,
    ConfigError,
    ConverterError,
    Terminated,
    UsageError,
    failure_document,
    interrupt_message,
    nonfinite_message,
)
from converter.console_script import wants_json
from converter.registry import MODEL_NAMES, SIZES
from converter.haiku_writer import CONTAINERS, check_pickle_suffix

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARITY",
    "EXIT_USAGE",
    "ConverterGroup",
    "echo_json",
    "error_document",
    "exit_code_for",
    "fail",
    "main",
    "output_option",
    "output_path_callback",
]

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
# EXIT_INTERRUPTED (130, 128 + SIGINT) comes from converter.errors, which the console
# script's startup uses before this module is loaded.
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as shells report a reader that went away
DEBUG_ENV = "PERCEIVER_CONVERT_DEBUG"

_MAIN_HELP = f"""Convert DeepMind's official Perceiver IO Haiku checkpoints to PyTorch,
safely (no jax, haiku or pickle.load needed) and verified numerically.

\b
Exit codes:
  {EXIT_OK}    success
  {EXIT_PARITY}    parity check outside tolerance
  {EXIT_USAGE}    usage error (bad option or --config value, unknown model, missing or
       unwritable output folder, an output that is an input or exists without
       --force, a wrong output suffix, a missing or unloadable optional extra)
  {EXIT_BAD_INPUT}    bad checkpoint or mapping (unsafe, empty, corrupt, unreadable or
       unexpected file, malformed YAML), or a write that failed (disk full, a
       stdout that cannot take the output)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); no partial file is left
  {EXIT_BROKEN_PIPE}  the reader of stdout went away (a pipe into head); nothing is said
  {Terminated.exit_code}  terminated (SIGTERM); no partial file is left

Errors are one line on stderr; --debug (or {DEBUG_ENV}=1) adds the traceback.
With --json, every outcome, errors included, is one JSON document on stdout.
"""


def exit_code_for(error: BaseException) -> int:
    """The documented exit code of an error raised inside a command."""
    if isinstance(error, ConverterError):
        return error.exit_code
    torch_configs = sys.modules.get("perceiver_torch.configs")
    if torch_configs is not None and isinstance(error, torch_configs.ConfigError):
        return EXIT_USAGE
    return EXIT_BAD_INPUT


def error_document(error: BaseException, exit_code: int) -> Dict[str, Any]:
    """The ``--json`` document of a failed command: ``{"ok": false, "error": {"type",
    "message", ...details}, "exit_code"}``."""
    details: Dict[str, Any] = {}
    key = getattr(error, "key", None)
    if key is not None:
        details["key"] = key
    details.update(getattr(error, "details", None) or {})
    return failure_document(error, _message(error), exit_code, details)


def _message(error: BaseException) -> str:
    if isinstance(error, click.ClickException):
        return error.format_message()
    if isinstance(error, KeyboardInterrupt):  # Terminated (SIGTERM) too
        return interrupt_message(error)
    if isinstance(error, MemoryError):
        return (
            "not enough memory for this (e.g. a --batch or a size too large for this "
            "machine); lower it or free memory; no partial file was left"
        )
    if isinstance(error, (ConverterError, ValueError)):
        return str(error)
    return (
        f"unexpected {type(error).__name__}: {error}; rerun with --debug (or "
        f"{DEBUG_ENV}=1) for the traceback and please report it"
    )


def fail(error: ConverterError) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with the error's code."""
    echo(f"error: {error}", err=True)
    raise click.exceptions.Exit(exit_code_for(error))


def _debug_from_environment() -> bool:
    """PERCEIVER_CONVERT_DEBUG as an on/off switch (``false``/``off`` are off, as
    ``0``); a value that is neither still shows the traceback, the safer reading
    for a variable whose only use is diagnosis."""
    if not os.environ.get(DEBUG_ENV, "").strip():
        return False  # unset: no need to import the parser, and with it torch
    from perceiver_torch.fast_paths import switch

    try:
        return bool(switch(DEBUG_ENV))
    except ValueError:
        return True


class ConverterGroup(click.Group):
    """A click group whose commands share one error policy (see the module docstring).

    Any command added to the group gets it: exit codes from ``exit_code_for``, 130 on
    Ctrl-C, one line on stderr (the traceback only with ``--debug``), and with
    ``--json`` on its command line, one :func:`error_document` on stdout.
    """

    def invoke(self, ctx: click.Context) -> Any:
        args = [
            *(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])),
            *ctx.args,
        ]
        as_json = wants_json(args)
        try:
            # Reading the switch imports perceiver_torch, hence torch: about a second
            # in which Ctrl-C used to end in click's "Aborted!" and exit code 1.
            debug = bool(ctx.params.get("debug")) or _debug_from_environment()
        except KeyboardInterrupt as error:
            self._report(error, EXIT_INTERRUPTED, as_json, False)
        try:
            with sigterm_as_interrupt(), deliver_swallowed_interrupts():
                return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.exceptions.Abort:
            self._report(KeyboardInterrupt(), EXIT_INTERRUPTED, as_json, False)
        except click.ClickException as error:
            error.message = terminal_safe(error.message)  # click prints it, not echo
            if not as_json:
                raise  # click prints "Usage: ... Error: ..." itself (exit 2)
            error.show()
            echo_json(error_document(error, error.exit_code))
            raise click.exceptions.Exit(error.exit_code) from None
        except KeyboardInterrupt as error:  # Terminated (SIGTERM) too
            self._report(error, getattr(error, "exit_code", EXIT_INTERRUPTED), as_json, debug)
        except BrokenPipeError:
            # `models | head`: the reader has what it wanted; as other command-line
            # tools, end quietly (this was "unexpected BrokenPipeError ... report it").
            _discard_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None
        except Exception as error:  # every other failure: one line, never a traceback
            self._report(error, exit_code_for(error), as_json, debug)

    @staticmethod
    def _report(
        error: BaseException, code: int, as_json: bool, debug: bool
    ) -> NoReturn:
        # The report itself may not be writable (stderr or stdout at /dev/full, the
        # error being that very write): the exit code still says what happened,
        # where a traceback of the failed report ended with exit 1 (parity).
        with contextlib.suppress(OSError, ConverterError):
            if debug:
                traceback.print_exception(type(error), error, error.__traceback__)
            echo(f"error: {_message(error)}", err=True)
        if as_json:
            with contextlib.suppress(OSError, ConverterError):
                echo_json(error_document(error, code))
        raise click.exceptions.Exit(code)


def _discard_stdout() -> None:
    """Points the process's stdout at the null device, so that flushing what is left
    at exit does not fail again on the closed pipe ("Exception ignored ...
    BrokenPipeError"); nothing to do where stdout is no file (a test's runner)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`~converter.errors.Terminated` (a
    ``KeyboardInterrupt``) in the main thread instead of killing the process on the
    spot, so that the temporary file of an atomic write is removed and the exit is
    one line (code 143). The previous handler comes back afterwards; outside the main
    thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deliver_swallowed_interrupts() -> Iterator[None]:
    """While the block runs, an interrupt that Python could not raise where it
    arrived is raised again in the main thread. A Ctrl-C (or SIGTERM) landing in a
    garbage-collection callback (jax's, during its import: a second or so of verify,
    convert --verify and demo) is "unraisable": Python printed "Exception ignored"
    and the command went on to report success with exit 0. The hook only records it;
    a watcher thread hands it back with ``_thread.interrupt_main``. That runs the
    signal's Python handler and does nothing where there is none (SIGINT ignored, as
    in a shell's background job, or left to the default): such an interrupt goes to
    the previous hook (Python's "Exception ignored"), as without this block, instead
    of being lost without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import _thread

    pending = threading.Event()
    finished = threading.Event()
    signals: List[int] = []
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            terminated = isinstance(unraisable.exc_value, Terminated)
            signum = signal.SIGTERM if terminated else signal.SIGINT
            # SIG_IGN and SIG_DFL are not callable; None: a handler set outside Python.
            if callable(signal.getsignal(signum)):
                signals.append(signum)
                pending.set()
                return
        previous_hook(unraisable)

    def watch() -> None:
        while True:
            pending.wait()
            if finished.is_set():
                return
            pending.clear()
            signum = signals.pop() if signals else signal.SIGINT
            try:
                _thread.interrupt_main(signum)
            except TypeError:  # Python 3.9: SIGINT only
                _thread.interrupt_main()

    watcher = threading.Thread(target=watch, name="interrupts", daemon=True)
    sys.unraisablehook = hook
    watcher.start()
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        finished.set()
        pending.set()
        watcher.join(timeout=1)


def echo_json(document: Any) -> None:
    """Print ``document`` as one JSON document on stdout; a stdout that cannot take
    it (``>/dev/full``) is a ConverterError saying so (exit 3), not "unexpected",
    and so is a closed one (``>&-``), where the document was lost with exit 0."""
    if sys.stdout is None:
        raise ConverterError("cannot write the JSON document to stdout: it is closed")
    text = json_text(document)  # NaN and infinite numbers null
    try:
        click.echo(text)
    except BrokenPipeError:
        raise
    except OSError as error:
        raise ConverterError(
            f"cannot write the JSON document to stdout: {error.strerror or error}"
        ) from None


def output_path_callback(
    ctx: click.Context, param: click.Parameter, value: Optional[Path]
) -> Optional[Path]:
    """Click callback: the output file's folder must exist and be writable (exit 2)."""
    from converter.atomic import check_output_path

    if value is None:
        return value
    try:
        return check_output_path(value)
    except ConverterError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


def output_option(
    help_text: str,
    *,
    inputs: Sequence[str] = (),
    check_name: Optional[Callable[[Path], None]] = None,
) -> Callable[[Any], Any]:
    """``-o/--output FILE`` and ``--force`` for a command that writes a file.

    Before the command runs: the folder must exist and be writable, ``check_name``
    (e.g. :func:`~converter.haiku_writer.check_pickle_suffix`) may refuse the name, the
    output may not be any of the parameters named in ``inputs`` (the same file, by
    any path), and an existing output needs ``--force``; each refusal exits 2 and
    nothing is read or written. The command receives ``output`` and ``force``, which
    it passes on as the write's ``overwrite``: without it the write refuses a file
    that appears after this check, too (another run writing the same name).
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            force = kwargs["force"]
            output = kwargs.get("output")
            if output is not None:
                if check_name is not None:
                    check_name(output)
                check_outputs(output, [kwargs.get(name) for name in inputs], force=force)
            return command(*args, **kwargs)

        checked = click.option(
            "--force",
            is_flag=True,
            help="Replace the output file if it exists (never an input).",
        )(checked)
        return click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            required=True,
            callback=output_path_callback,
            help=help_text,
        )(checked)

    return decorate


@click.group(
    cls=ConverterGroup,
    help=_MAIN_HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="perceiver-convert")
@click.option(
    "--debug",
    is_flag=True,
    help=f"Show the traceback of an error (also: {DEBUG_ENV}=1).",
)
def main(debug: bool) -> None:
    """The command group (see ``_MAIN_HELP``)."""


# --------------------------------------------------------------------------------------
# fixture


# verify's and demo's seed also keys the JAX reference (jax.random.PRNGKey: a signed
# 64-bit integer); converter.verify.MAX_SEED, not imported here (it imports torch).
_MAX_SEED = 2**63 - 1

_JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)


_FIXTURE_HELP = f"""Write a checkpoint of model NAME: random weights, official layout.

NAME is one of: {", ".join(MODEL_NAMES)}.

The values are deterministic in (NAME, --size, --seed) and never zero or constant.
A one-line summary (path, values, bytes, sha256) goes to stderr; --json also
prints them (and the options) as one document on stdout.
"""


@main.command("fixture", help=_FIXTURE_HELP)
@click.argument("name", type=click.Choice(MODEL_NAMES), metavar="NAME")
@output_option(
    "The pickle to write (its folder must exist).", check_name=check_pickle_suffix
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--size",
    type=click.Choice(SIZES),
    default="tiny",
    show_default=True,
    help="tiny: the golden test sizes; full: the released checkpoint's shapes.",
)
@click.option(
    "--protocol",
    type=click.IntRange(2, 5),
    default=3,
    show_default=True,
    help="Pickle protocol (the official files use 3).",
)
@click.option(
    "--container",
    type=click.Choice(CONTAINERS),
    default="flatmapping",
    show_default=True,
    help="Mapping nodes as Haiku FlatMapping (official) or plain dicts.",
)
@_JSON_OPTION
def fixture_command(
    name: str, output: Path, force: bool, seed: int, size: str, protocol: int,
    container: str, as_json: bool,
) -> None:
    """Write a random-weight checkpoint (help text: ``_FIXTURE_HELP``)."""
    from converter.fixtures import write_fixture

    saved = write_fixture(
        name, output, size=size, seed=seed, protocol=protocol, container=container,
        overwrite=force,
    )
    from converter.registry import official_tree

    tree = official_tree(name, size)
    document = {
        "path": str(saved.path), "model": name, "size": size, "seed": seed,
        "protocol": protocol, "container": container,
        "values": tree.num_params(include_state=True),
        "arrays": sum(1 for _ in tree.iter_specs()),
        "bytes": saved.size_bytes, "sha256": saved.sha256,
    }
    echo(
        f"wrote {saved.path}: {name} ({size}, seed {seed}), {document['values']:,} "
        f"values in {document['arrays']:,} arrays, {saved.size_bytes:,} bytes, sha256 "
        f"{saved.sha256}",
        err=True,
    )
    if as_json:
        echo_json(document)


# --------------------------------------------------------------------------------------
# inspect


def _nonfinite(array: Any) -> int:
    """How many NaN/Inf values a float array holds (0 for other dtypes)."""
    import numpy as np

    return int(array.size - np.isfinite(array).sum()) if array.dtype.kind == "f" else 0


def _array_rows(tree: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [
        {
            "module": module,
            "param": param,
            "shape": list(array.shape),
            "dtype": array.dtype.name,
            "values": int(array.size),
            "bytes": int(array.nbytes),
            "nonfinite": _nonfinite(array),
        }
        for module, params in tree.items()
        for param, array in params.items()
    ]


def _summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "modules": len({row["module"] for row in rows}),
        "arrays": len(rows),
        "values": sum(row["values"] for row in rows),
        "bytes": sum(row["bytes"] for row in rows),
    }


def _checkpoint_document(checkpoint: Any) -> Dict[str, Any]:
    from converter.haiku_reader import ALLOWED_GLOBALS

    params = _array_rows(checkpoint.params)
    state = _array_rows(checkpoint.state)
    total = _summary(params + state)
    del total["modules"]
    return {
        "path": str(checkpoint.path),
        "ok": True,
        "safe": True,
        "sha256": checkpoint.sha256,
        "size_bytes": checkpoint.size_bytes,
        "protocol": checkpoint.protocol,
        "containers": list(checkpoint.containers),
        "wrapped": checkpoint.wrapped,
        "globals": [
            {"name": name, "allowed": name in ALLOWED_GLOBALS}
            for name in checkpoint.globals
        ],
        "params": dict(_summary(params), entries=params),
        "state": dict(_summary(state), entries=state),
        "total": total,
    }


def _error_shaped(document: Dict[str, Any]) -> Dict[str, Any]:
    """The ``--json`` form of an ``inspect`` report: a failed one carries its error as
    ``{"type", "message"}``, as every other command's error document does (the
    ``error_type`` key stays for older readers)."""
    error = document.get("error")
    if document.get("ok") is False and isinstance(error, str):
        kind = document.get("error_type") or (
            "CheckpointError" if document.get("exit_code") == EXIT_BAD_INPUT else "Error"
        )
        return dict(document, error={"type": kind, "message": error})
    return document


def _failure_document(path: Path, error: CheckpointError, scan: Any) -> Dict[str, Any]:
    return {
        "path": str(path),
        "ok": False,
        "safe": bool(scan is not None and scan.safe),
        "error": str(error),
        "error_type": type(error).__name__,
        "protocol": None if scan is None else scan.protocol,
        "globals": (
            []
            if scan is None
            else [
                {
                    "name": found.name,
                    "allowed": found.allowed,
                    "opcode": found.opcode,
                    "offset": found.offset,
                }
                for found in scan.globals
            ]
        ),
        "problems": [] if scan is None else list(scan.problems),
        "scan_error": None if scan is None else scan.error,
    }


def _table(rows: List[Dict[str, Any]]) -> List[str]:
    cells: List[Tuple[str, ...]] = [
        (
            f"{row['module']}/{row['param']}"
            + (f"  [{row['nonfinite']:,} NaN/Inf]" if row.get("nonfinite") else ""),
            str(row["shape"]),
            row["dtype"],
            f"{row['values']:,}",
            f"{row['bytes']:,}",
        )
        for row in rows
    ]
    header = ("module/param", "shape", "dtype", "values", "bytes")
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]
    lines = []
    for cell in [header] + cells:
        left = "  ".join(cell[i].ljust(widths[i]) for i in range(3))
        right = "  ".join(cell[i].rjust(widths[i]) for i in range(3, 5))
        lines.append(f"  {left}  {right}")
    return lines


def _print_checkpoint(document: Dict[str, Any]) -> None:
    layout = (
        "{'params': ..., 'state': ...} wrapper"
        if document["wrapped"]
        else "params only (no wrapper)"
    )
    names = [g["name"] for g in document["globals"]]
    lines = [
        document["path"],
        f"  sha256      {document['sha256']}",
        f"  size        {document['size_bytes']:,} bytes",
        f"  protocol    {document['protocol']}",
        f"  containers  {', '.join(document['containers'])}",
        f"  layout      {layout}",
        f"  safe        yes: {len(names)} globals, all on the allow-list",
    ]
    lines += [f"              {name}" for name in names]
    for collection in ("params", "state"):
        part = document[collection]
        if collection == "state" and not document["wrapped"]:
            continue
        lines.append("")
        lines.append(
            f"{collection}: {part['modules']:,} modules, {part['arrays']:,} arrays, "
            f"{part['values']:,} values, {part['bytes']:,} bytes"
        )
        if part["entries"]:
            lines += _table(part["entries"])
    total = document["total"]
    lines.append("")
    lines.append(
        f"total: {total['arrays']:,} arrays, {total['values']:,} values, "
        f"{total['bytes']:,} bytes"
    )
    echo("\n".join(lines))


def _print_failure(document: Dict[str, Any]) -> None:
    if document.get("not_a_pickle"):  # named by its first bytes; nothing scanned
        echo(
            f"{document['path']}\n  file        {document['not_a_pickle']} (named "
            "by its first bytes; not scanned)"
        )
        return
    lines = [document["path"], f"  protocol    {document['protocol']}"]
    if document["globals"]:
        lines.append("  globals     (read from the opcodes; nothing was run)")
        for found in document["globals"]:
            verdict = "allowed" if found["allowed"] else "NOT ALLOWED"
            lines.append(
                f"              {found['name']}  [{found['opcode']}, {verdict}]"
            )
    else:
        lines.append("  globals     none found")
    lines += [f"  problem     {problem}" for problem in document["problems"]]
    if document["scan_error"]:
        lines.append(f"  scan        stopped early: {document['scan_error']}")
    lines.append(f"  safe        {'yes' if document['safe'] else 'NO'}")
    echo("\n".join(lines))


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)
def inspect_command(path: Path, as_json: bool) -> None:
    """Describe the checkpoint at PATH without running anything from it.

    Lists modules and params (shape, dtype, values, bytes), totals, the pickle
    protocol, the container kinds and the globals the file names. The report goes
    to stdout (it is the command's result); errors go to stderr. Exit 0 for a
    readable checkpoint; exit 3 for an unsafe or unreadable file, still listing the
    globals found in its opcodes. Arrays holding NaN or Inf are listed and marked
    ([N NaN/Inf]; "nonfinite" in the JSON), and the exit code is 3: the weights
    are corrupt.

    PATH may also be a converted file (.safetensors/.pt: provenance, config, parity,
    tensors), a HuggingFace transformers folder or weights file, or an ONNX graph.
    A safetensors or .bin file of another project (neither converted nor a
    HuggingFace Perceiver checkpoint) is labelled so, its tensors listed; exit 3.
    """
    from converter.inspect_other import describe, is_other, print_document
    from converter.haiku_reader import load_haiku_checkpoint, scan_pickle

    if is_other(path):  # other formats: converter/inspect_other.py
        document = describe(path)
        echo_json(_error_shaped(document)) if as_json else print_document(document)
        if document.get("error"):  # NaN/Inf weights, as for pickles below
            echo(f"error: {path}: {document['error']}", err=True)
            raise click.exceptions.Exit(document["exit_code"])
        return

    try:
        checkpoint = load_haiku_checkpoint(path, check_finite=False)
    except CheckpointError as error:
        # A file its first bytes already name (empty, .npy, zip, image, ...) is not
        # scanned: its bytes read as opcodes would list made-up globals and problems.
        from converter.haiku_reader import sniff_not_pickle

        named = sniff_not_pickle(path)
        scan = None
        if named is None:
            try:
                scan = scan_pickle(path)
            except CheckpointError:
                scan = None
        document = _failure_document(path, error, scan)
        document["not_a_pickle"] = named
        document["exit_code"] = exit_code_for(error)
        echo(f"error: {error}", err=True)
        if as_json:
            echo_json(_error_shaped(document))
        else:
            _print_failure(document)
        raise click.exceptions.Exit(exit_code_for(error))
    document = _checkpoint_document(checkpoint)
    bad = [
        f"{row['module']}/{row['param']}"
        for part in ("params", "state")
        for row in document[part]["entries"]
        if row["nonfinite"]
    ]
    if bad:
        document["ok"] = False
        document["exit_code"] = EXIT_BAD_INPUT
        document["error"] = (
            f"{nonfinite_message(bad, 'array')}; the weights are corrupt: download "
            "the official file again"
        )
    if as_json:
        echo_json(_error_shaped(document))
    else:
        _print_checkpoint(document)
    if bad:
        echo(f"error: {path}: {document['error']}", err=True)
        raise click.exceptions.Exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------------------
# convert, verify, export, models, demo


def _parse_config(values: Tuple[str, ...], model: Optional[str]) -> Dict[str, Any]:
    """``--config KEY=VALUE`` pairs, checked against the config dataclass of ``model``
    (or, before the model is detected, of every model that has the key): unknown
    keys, wrong types and values out of range raise ``ConfigError`` (exit 2) before
    anything is read. Relations between keys are checked once the model is known."""
    from perceiver_torch import configs

    classes = (
        {model: configs.CONFIG_CLASSES[model]} if model else dict(configs.CONFIG_CLASSES)
    )
    config: Dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--config {item!r} is not KEY=VALUE (e.g. --config "
                "image_size=368x496)"
            )
        owners = {n: c for n, c in classes.items() if key in configs.field_kinds(c)}
        if not owners:
            valid = sorted({k for c in classes.values() for k in configs.field_kinds(c)})
            scope = f"model {model}" if model else "any model"
            raise ConfigError(
                f"--config {key}: unknown config key for {scope}; valid keys: "
                f"{', '.join(valid)}",
                key,
            )
        try:
            parsed = [configs.parse_value(c, key, raw) for c in owners.values()]
        except configs.ConfigError as error:
            raise ConfigError(f"--config {key}={raw}: {error}", key) from None
        config[key] = parsed[0]
    return config


def _output_format(path: Path) -> str:
    from converter.converted_files import output_format

    return output_format(path)


def _model_names(
    ctx: click.Context, param: click.Parameter, values: Tuple[str, ...]
) -> Tuple[str, ...]:
    """``--models a,b --models c`` -> ("a", "b", "c"); unknown names exit 2."""
    names: List[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if not name:
                continue
            if name not in MODEL_NAMES:
                raise click.BadParameter(
                    f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}",
                    ctx=ctx,
                    param=param,
                )
            if name not in names:
                names.append(name)
    if values and not names:  # --models "" or "," names none: not "all of them"
        raise click.BadParameter(
            f"no model named; choose from {', '.join(MODEL_NAMES)}", ctx=ctx, param=param
        )
    return tuple(names)


def _progress(quiet: bool):
    def report(message: str) -> None:
        if not quiet:
            echo(f"  {message}", err=True)

    return report


_MODEL_OPTION = click.option(
    "--model",
    type=click.Choice(MODEL_NAMES),
    default=None,
    help="Force the model; by default it is detected from the parameter names.",
)
_CONFIG_OPTION = click.option(
    "--config",
    "config_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a configuration value the checkpoint's shapes cannot reveal "
    "(repeatable; checked against the model's config: exit 2 naming a bad key; "
    "pairs as 368x496, 368,496 or [368, 496]).",
)
_MAPPING_OPTION = click.option(
    "--mapping",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Use this mapping YAML instead of the bundled one.",
)
_QUIET_OPTION = click.option(
    "-q", "--quiet", is_flag=True, help="No progress messages on stderr."
)


@main.command("convert")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@output_option(
    "OUT.safetensors (recommended) or OUT.pt; written atomically.",
    inputs=("checkpoint", "mapping"),
    check_name=lambda path: _output_format(path),
)
@_MODEL_OPTION
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the floating-point tensors (recorded in the metadata; "
    "perceiver_torch.load runs the model in it unless told otherwise). float16 "
    "refuses weights beyond its range of 65504 (exit 2, naming them), and notes how "
    "many nonzero weights below its smallest normal number, 2**-14, it makes "
    "subnormal (less precise) or 0.",
)
@click.option(
    "--verify",
    "run_verify",
    is_flag=True,
    help="Check parity against the JAX reference before writing (needs the [jax] "
    "extra), with the weights in the --dtype written; outside tolerance: nothing is "
    "written, exit 1.",
)
@_CONFIG_OPTION
@_MAPPING_OPTION
@_JSON_OPTION
@_QUIET_OPTION
def convert_command(
    checkpoint: Path,
    output: Path,
    force: bool,
    model: Optional[str],
    dtype: str,
    run_verify: bool,
    config_items: Tuple[str, ...],
    mapping: Optional[Path],
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert the official checkpoint CHECKPOINT to a perceiver_torch checkpoint.

    CHECKPOINT may also be a HuggingFace transformers checkpoint (a folder with
    config.json, a model.safetensors or a pytorch_model.bin, read without running
    code): it is mapped back through mappings/hf/ to the official model.

    The file is read without jax or haiku through an allow-list unpickler, matched to
    its mapping (mappings/*.yaml), checked tensor by tensor against the model, and
    written atomically. The safetensors metadata records the model, its config, the
    source sha256, the mapping name and hash, the converter version and, with
    --verify, the parity result. Load it with perceiver_torch.load(OUT).
    """
    config = _parse_config(config_items, model)
    from converter.conversion import convert
    from converter.hf_import import convert_hf, is_hf_input

    run = convert
    if is_hf_input(checkpoint):  # HuggingFace import (converter/hf_import.py)
        if mapping is not None:
            raise click.UsageError("--mapping applies to official checkpoints only")
        run = convert_hf
    result = run(
        checkpoint,
        output,
        model=model,
        dtype=dtype,
        config=config or None,
        mapping=mapping,
        verify=run_verify,
        progress=_progress(quiet),
        overwrite=force,
    )
    if result.parity_report is not None and not quiet:
        echo(result.parity_report.format_table(), err=True)
    echo(
        f"wrote {result.output}: {result.model} ({result.size_preset or 'custom'} size), "
        f"{result.report.used} tensors, {result.dtype}, {result.seconds:.1f} s",
        err=True,
    )
    note = result.underflow_note()  # float16 only; part of the summary, also with -q
    if note is not None:
        echo(f"note: {note}", err=True)
    if as_json:
        echo_json(result.as_dict())


@main.command("verify")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@_MODEL_OPTION
@_CONFIG_OPTION
@_MAPPING_OPTION
@click.option("--seed", type=click.IntRange(0, _MAX_SEED), default=0, show_default=True,
              help="Seed of the deterministic test inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of the deterministic test inputs.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Check the weights rounded to this storage dtype (convert --dtype) against "
    "the dtype's tolerance, then run the model in that dtype and report its fidelity "
    "(against JAX and float32; structured inputs): max relative diff, argmax "
    "agreement, flow end-point error, video PSNR.",
)
@click.option(
    "--reference",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CHECKPOINT is a converted file (or HuggingFace checkpoint) someone made from "
    "this official file: compare their tensors through the mapping, then the converted "
    "model's forward pass with the JAX reference on this file (run with the "
    "settings the converted file records; those no shape holds that differ from the "
    "official model's, such as flow_scale or head counts, are named).",
)
@_JSON_OPTION
@_QUIET_OPTION
def verify_command(
    checkpoint: Path,
    model: Optional[str],
    config_items: Tuple[str, ...],
    mapping: Optional[Path],
    seed: int,
    batch: int,
    dtype: str,
    reference: Optional[Path],
    as_json: bool,
    quiet: bool,
) -> None:
    """Check that the converted model computes what the JAX model computes.

    Converts CHECKPOINT in memory, runs perceiver_jax (the official modules restated
    in Haiku, fed the original file) and the perceiver_torch model on the same
    deterministic inputs, and prints per stage (preprocessed inputs, latents after
    the encoder, decoder output, final outputs) max |diff|, max relative diff and
    argmax agreement against the mapping's tolerance. Exit 1 if an output is outside
    it. Needs the [jax] extra. A HuggingFace checkpoint (folder, model.safetensors or
    pytorch_model.bin) is mapped back to the official arrays first, which the JAX
    reference then runs as it would the official file.

    With --dtype bfloat16|float16, the parity check runs the weights rounded to that
    dtype (with the dtype's tolerance) and is followed by a fidelity report of the
    model computing in that dtype (converter.precision); exit 1 also on inf/NaN
    outputs there. --dtype and --mapping apply to official checkpoints only; with
    --reference, --model, --config, --mapping and --dtype are refused (the converted
    file records them; exit 2 if given), while --seed and --batch apply.
    """
    config = _parse_config(config_items, model)
    from converter.hf_import import is_hf_input
    from converter.interop_cli import verify_other
    from converter.verify import verify

    # The options these two forms cannot honour are refused, not silently dropped.
    if reference is not None:
        _refuse_options(
            {"--dtype": dtype != "float32", "--model": model is not None,
             "--config": bool(config_items), "--mapping": mapping is not None},
            "with --reference: the converted file records its model, config, mapping "
            "and dtype, and is checked as it is",
        )
        _refuse_swapped_reference(Path(checkpoint), Path(reference))
    elif is_hf_input(checkpoint):
        _refuse_options(
            {"--mapping": mapping is not None},
            "to a HuggingFace checkpoint (it is read through its own mapping)",
        )
        _refuse_options(
            {"--dtype": dtype != "float32"},
            "to a HuggingFace checkpoint (float32 parity); for reduced precision "
            "convert it first (convert HF -o OUT.safetensors --dtype bfloat16)",
        )
    report = verify_other(checkpoint, reference, model=model, config=config or None,
                          seed=seed, batch=batch, as_json=as_json,
                          progress=_progress(quiet))
    if report is None:
        report = verify(
            checkpoint,
            model,
            config=config or None,
            mapping=mapping,
            seed=seed,
            batch=batch,
            dtype=dtype,
            progress=_progress(quiet),
        )
    echo(report.format_table(), err=True)
    document, passed = report.as_dict(), report.passed
    if dtype != "float32":  # reduced precision (issue 13): the fidelity report too
        from converter.precision import fidelity
        from converter.run_cli import emulated_dtype_note

        note = emulated_dtype_note(dtype, advice="the report holds all the same")
        if note and not quiet:
            echo(note, err=True)

        extra = fidelity(
            checkpoint,
            dtype,
            model,
            config=config or None,
            mapping=mapping,
            progress=_progress(quiet),
        )
        echo(extra.format_table(), err=True)
        document["fidelity"] = {**extra.as_dict(), "passed": extra.passed}
        passed = passed and extra.passed
        # The exit code's verdict: the parity check and the fidelity report (a JSON
        # reader must not see "passed": true next to exit 1).
        document["passed"] = passed
    if as_json:
        echo_json(document)
    if not passed:
        raise click.exceptions.Exit(EXIT_PARITY)


@main.command("export")
@click.argument("converted", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="The file (haiku: a pickle; onnx: model.onnx) or, for --format hf, the new "
    "folder to write.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["haiku", "hf", "onnx"]),
    default=None,
    help="haiku: the official pickle; hf: a HuggingFace transformers folder with a "
    "fidelity report; onnx: an ONNX graph checked with onnxruntime. Default: onnx "
    "for *.onnx, else haiku.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the output file if it exists (never an input; a --format hf folder "
    "must be new or an empty folder, not a link).",
)
@click.option("--protocol", type=click.IntRange(2, 5), default=3, show_default=True)
@click.option(
    "--container", type=click.Choice(CONTAINERS), default="flatmapping", show_default=True
)
@_MAPPING_OPTION
@_JSON_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No notes or summary on stderr.")
def export_command(
    converted: Path,
    output: Path,
    fmt: Optional[str],
    protocol: int,
    container: str,
    mapping: Optional[Path],
    as_json: bool,
    quiet: bool,
    force: bool,
) -> None:
    """Write CONVERTED (a perceiver-convert output) back in the official Haiku layout,
    or as a HuggingFace transformers folder (--format hf) or an ONNX graph (*.onnx).

    Every mapping op is inverted exactly; a float32 conversion exports to the
    original arrays bit for bit (the BatchNorm accumulators the model does not use
    travel in the converted file's metadata). Every format is written in float32: a
    file converted with --dtype bfloat16/float16 exports its stored values as float32
    (a note says so), and the hf fidelity report and the onnx check run
    perceiver_torch in float32 on them.
    """
    import warnings

    from converter.atomic import check_outputs
    from perceiver_torch.registry import folder_refusal

    if converted.is_dir():
        # click's "File '...' is a directory." gave no hint: a HuggingFace folder is
        # named as one, with the command that converts it (as run says: exit 2).
        raise UsageError(folder_refusal(converted))
    fmt = fmt or ("onnx" if output.suffix.lower() == ".onnx" else "haiku")
    if fmt != "haiku":
        # Options of the pickle writer, not read by these formats: refused, not dropped.
        ctx = click.get_current_context()
        # The HuggingFace export goes through the official names, hence the mapping
        # the file was converted with; the ONNX graph is traced from the file itself.
        refused = ("protocol", "container") + (("mapping",) if fmt == "onnx" else ())
        given = {
            f"--{name}": ctx.get_parameter_source(name)
            not in (None, click.core.ParameterSource.DEFAULT)
            for name in refused
        }
        kind = {"hf": "HuggingFace", "onnx": "ONNX"}[fmt]
        _refuse_options(given, f"to --format {fmt} (options of the Haiku pickle "
                               f"export; the {kind} export reads the converted file "
                               "as it is)")
    if fmt == "hf":
        # A folder: export_hf wants a new or empty one (--force replaces files only).
        check_outputs(output, [converted, mapping], force=True)
    else:
        output = output_path_callback(click.get_current_context(), None, output)
        if fmt == "haiku":
            check_pickle_suffix(output)
        check_outputs(output, [converted, mapping], force=force)
    if fmt != "haiku":  # other projects' formats: converter/hf.py, converter/onnx_export.py
        from converter.interop_cli import export_other

        export_other(converted, output, fmt, as_json=as_json, quiet=quiet,
                     progress=_progress(quiet), overwrite=force, mapping=mapping)
        return
    from converter.exporter import PrecisionWarning, export

    with warnings.catch_warnings():
        # The same message is one of result.notes, printed once below.
        warnings.simplefilter("ignore", PrecisionWarning)
        result = export(
            converted, output, protocol=protocol, container=container, mapping=mapping,
            overwrite=force,
        )
    if not quiet:
        for note in result.notes:
            echo(f"note: {note}", err=True)
        echo(
            f"wrote {result.output}: {result.model}, {result.tensors} arrays, protocol "
            f"{protocol}, {'exact' if result.exact else 'not bit-exact (see notes)'}",
            err=True,
        )
    if as_json:
        echo_json(result.as_dict())


def _refuse_swapped_reference(checkpoint: Path, reference: Path) -> None:
    """``verify OFFICIAL --reference CONVERTED``: the files the wrong way round, said
    so with the command that works (it said to convert the official file first, which
    the user had done)."""
    from converter.inspect_other import head_bytes
    from perceiver_torch.registry import file_kind

    if checkpoint.is_file() and reference.is_file():
        if file_kind(head_bytes(checkpoint)) == "pickle" and file_kind(head_bytes(reference)) in (
            "safetensors",
            "torch",
        ):
            raise UsageError(
                f"the files are the wrong way round: the converted file goes first and "
                f"the official checkpoint after --reference: `perceiver-convert verify "
                f"{reference} --reference {checkpoint}`"
            )


def _refuse_options(given: Dict[str, bool], why: str) -> None:
    """A usage error naming the options in ``given`` that were used (True)."""
    used = [name for name, is_used in given.items() if is_used]
    if used:
        verb = "does" if len(used) == 1 else "do"
        raise click.UsageError(f"{', '.join(used)} {verb} not apply {why}")


@main.command("models")
@_JSON_OPTION
def models_command(as_json: bool) -> None:
    """List the six official models: file, download address and parameters (--json:
    also the mapping file and its sha256, and a description)."""
    from converter.mapping import load_mapping

    rows = []
    for name in MODEL_NAMES:
        spec = load_mapping(name)
        rows.append(
            {
                "name": name,
                "file": spec.source.get("file"),
                "url": spec.source.get("url"),
                "params": spec.source.get("params"),
                "mapping": spec.file,
                "mapping_sha256": spec.sha256,
                "description": spec.description,
            }
        )
    if as_json:
        echo_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        echo(f"{row['name']:<{width}}  {row['params']:>12,} params  {row['file']}")
        echo(f"{'':<{width}}  {row['url']}")


# --------------------------------------------------------------------------------------
# mapping: the expanded rule table (converter/mapping_table.py)


@main.command("mapping")
@click.argument("name", metavar="NAME|FILE.yaml")
@click.option("--size", type=click.Choice(SIZES), default="tiny", show_default=True,
              help="The parameter tree to expand the mapping for.")
@_CONFIG_OPTION
@_JSON_OPTION
def mapping_command(
    name: str, size: str, config_items: Tuple[str, ...], as_json: bool
) -> None:
    """Print the table mapping NAME expands to: where every PyTorch key comes from.

    NAME is a bundled mapping (one of the six model names) or a mapping YAML file
    to perceiver_torch (not one of mappings/hf/, which map to transformers' keys).
    One line per rule: the Haiku source key and shape, the ops, the PyTorch target key
    and shape, and the file:line of the rule (< the file:line of the outermost use:
    that inserted it; --json lists the whole chain); then the dropped source keys with
    their reasons. The shapes are those of the shipped tiny or full parameter tree.
    Exit 2 for an unknown NAME or a bad --config, 3 for a malformed mapping file.
    """
    from converter.mapping import available_mappings
    from converter.mapping_table import OverrideError, describe_mapping, format_table

    is_file = name.endswith((".yaml", ".yml")) or Path(name).exists()
    if not is_file and name not in available_mappings():
        raise click.BadParameter(
            f"no mapping named {name!r}; available: {', '.join(available_mappings())} "
            "(or the path of a mapping YAML)",
            param_hint="NAME",
        )
    if is_file and not Path(name).is_file():
        raise click.BadParameter(f"{name}: no such mapping file", param_hint="NAME")
    if is_file:
        from converter.mapping import load_mapping

        try:
            spec = load_mapping(name)
        except ConverterError:
            spec = None  # describe_mapping reports a malformed file (exit 3)
        if spec is not None and spec.target.get("architecture"):
            raise click.BadParameter(
                f"{name} maps the official arrays to transformers' "
                f"{spec.target['architecture']} keys (`export --format hf` and "
                "HuggingFace imports use it); this command prints the mappings to "
                f"perceiver_torch: give a model name ({spec.model}) or such a file",
                param_hint="NAME",
            )
    try:
        config = _parse_config(config_items, name if name in MODEL_NAMES else None)
        description = describe_mapping(name, size, config)
    except OverrideError as error:
        if not config_items:
            # No --config given: the bad value is the file's own (its config: or a
            # derive rule), a malformed mapping rather than a usage error.
            from converter.errors import MappingError

            raise MappingError(f"{name}: {error}") from None
        raise click.BadParameter(str(error), param_hint="--config") from None
    if as_json:
        echo_json(description.as_dict())
    else:
        echo(format_table(description))
    if description.problems:
        raise click.exceptions.Exit(EXIT_BAD_INPUT)


@main.command("demo")
@click.option("--size", type=click.Choice(SIZES), default="tiny", show_default=True,
              help="tiny: seconds per model; full: the official sizes (minutes, GBs).")
@click.option("--models", "names", multiple=True, callback=_model_names,
              metavar="NAME[,NAME...]",
              help="Only these models (comma-separated or repeated); default: all six.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the files here (default: a temporary folder, removed).")
@click.option("--force", is_flag=True,
              help="Replace files in --workdir that the demo would write but did not "
              "write itself (the models' files, and with --tasks anything in its tasks "
              "folder); its own, from an earlier or interrupted run (recorded in "
              ".perceiver-demo.json), are replaced without it.")
@click.option("--seed", type=click.IntRange(0, _MAX_SEED), default=0, show_default=True)
@click.option("--tasks/--no-tasks", "with_tasks", default=True, show_default=True,
              help="Also run each task pipeline (run TASK) once on a tiny model.")
@_JSON_OPTION
@_QUIET_OPTION
def demo_command(
    size: str,
    names: Tuple[str, ...],
    workdir: Optional[Path],
    force: bool,
    seed: int,
    with_tasks: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """For each model: write an official-format checkpoint with random weights, convert
    it, verify parity against the JAX reference, export it back and check the round
    trip is bit-identical; then print one summary table. Exit 1 if any parity check
    fails. Without the [jax] extra the parity column says "skipped".

    Then (unless --no-tasks) each task of `run` (fill-mask, classify, ...) runs once
    on a tiny model with random weights and media the demo makes itself (its answers
    are noise). --json prints {"models": [...], "tasks": [...]}.
    """
    from converter.demo import check_workdir, run_demo

    names = names or MODEL_NAMES
    if workdir is not None:
        check_workdir(workdir, names, force=force, with_tasks=with_tasks)
    rows = run_demo(
        names, size=size, seed=seed, workdir=workdir, progress=_progress(quiet)
    )
    echo(_demo_table(rows, size), err=as_json)
    task_rows = _demo_tasks(workdir, seed, quiet, as_json) if with_tasks else []
    if as_json:
        echo_json({"models": rows, "tasks": task_rows})
    if any(row["parity"] == "FAIL" for row in rows):
        raise click.exceptions.Exit(EXIT_PARITY)
    if any(row["error"] for row in rows + task_rows):
        raise click.exceptions.Exit(EXIT_BAD_INPUT)


def _demo_tasks(
    workdir: Optional[Path], seed: int, quiet: bool, as_json: bool
) -> List[Dict[str, Any]]:
    """The task pipelines once each (converter/run_cli.py), and their table."""
    import tempfile

    from converter.demo import TASKS_FOLDER, DemoFiles
    from converter.run_cli import format_task_demos, run_task_demos

    if workdir is not None:
        # The task demos name their own files: the whole folder is the demo's while
        # they run, and what they wrote is recorded for a rerun (check_workdir).
        with DemoFiles(workdir).writing([TASKS_FOLDER]):
            rows = run_task_demos(workdir / TASKS_FOLDER, seed=seed, progress=_progress(quiet))
    else:
        with tempfile.TemporaryDirectory(prefix="perceiver-demo-tasks-") as folder:
            rows = run_task_demos(Path(folder), seed=seed, progress=_progress(quiet))
    echo(format_task_demos(rows), err=as_json)
    return rows


def _demo_table(rows: List[Dict[str, Any]], size: str) -> str:
    header = ("model", "params", "convert", "max rel err", "argmax", "parity", "round trip")
    cells = []
    for row in rows:
        rel = "-" if row["relative"] is None else f"{row['relative']:.1e}"
        argmax = "-" if row["argmax"] is None else f"{row['argmax']:.0%}"
        cells.append(
            (
                row["model"],
                f"{row['params']:,}",
                "-" if row["convert_seconds"] is None else f"{row['convert_seconds']:.1f} s",
                rel,
                argmax,
                row["parity"],
                row["round_trip"],
            )
        )
    widths = [max(len(str(c[i])) for c in cells + [header]) for i in range(len(header))]
    lines = [f"perceiver-convert demo ({size} size): fixture -> convert -> verify -> export"]
    for cell in [header] + cells:
        lines.append("  " + "  ".join(str(cell[i]).ljust(widths[i]) for i in range(len(header))))
    for row in rows:
        if row["error"]:
            lines.append(f"  {row['model']}: {row['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# run: the task pipelines (converter/run_cli.py; tasks from perceiver_torch.pipelines)

from converter.run_cli import run_command  # noqa: E402  (needs main's helpers defined)

main.add_command(run_command)


if __name__ == "__main__":  # pragma: no cover
    main()
