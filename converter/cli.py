"""The ``perceiver-convert`` command line.

Every command is a small function on the :func:`main` group; what they share lives
here as helpers:

* :class:`ConverterGroup` turns a :class:`~converter.errors.ConverterError` raised in
  any command into ``error: <message>`` on stderr and the documented exit code (no
  traceback): :class:`~converter.errors.ParityError` -> 1, any other (bad checkpoint,
  bad mapping) -> 3. Usage errors are click's, exit 2.
* :func:`echo_json` prints one JSON document on stdout; :func:`output_path_callback`
  checks an output file's folder up front (exit 2 when it is missing).

Nothing here imports jax (nor torch): ``fixture`` and ``inspect`` work without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

import click

from converter._version import __version__
from converter.errors import CheckpointError, ConverterError, ParityError
from converter.trees import MODEL_NAMES, SIZES
from converter.writer import CONTAINERS

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_PARITY",
    "EXIT_USAGE",
    "ConverterGroup",
    "echo_json",
    "exit_code_for",
    "fail",
    "main",
    "output_path_callback",
]

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3

_MAIN_HELP = f"""Convert DeepMind's official Perceiver IO Haiku checkpoints to PyTorch,
safely (no jax, haiku or pickle.load needed) and verified numerically.

\b
Exit codes:
  {EXIT_OK}  success
  {EXIT_PARITY}  parity check outside tolerance
  {EXIT_USAGE}  usage error (bad option, unknown model, missing output folder)
  {EXIT_BAD_INPUT}  bad checkpoint or mapping (unsafe, corrupt or unexpected file)
"""


def exit_code_for(error: ConverterError) -> int:
    """The documented exit code of a converter error."""
    return EXIT_PARITY if isinstance(error, ParityError) else EXIT_BAD_INPUT


def fail(error: ConverterError) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with the error's code."""
    click.echo(f"error: {error}", err=True)
    raise click.exceptions.Exit(exit_code_for(error))


class ConverterGroup(click.Group):
    """A click group whose commands report :class:`ConverterError` without traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConverterError as error:
            fail(error)


def echo_json(document: Any) -> None:
    """Print ``document`` as one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2))


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


def output_option(help_text: str) -> Callable[[Any], Any]:
    """The ``-o/--output`` file option of the commands that write one (its folder is
    checked up front: exit 2 when it is missing or not writable)."""
    return click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        callback=output_path_callback,
        help=help_text,
    )


@click.group(
    cls=ConverterGroup,
    help=_MAIN_HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="perceiver-convert")
def main() -> None:
    """The command group (see ``_MAIN_HELP``)."""


# --------------------------------------------------------------------------------------
# fixture


_FIXTURE_HELP = f"""Write a checkpoint of model NAME: random weights, official layout.

NAME is one of: {", ".join(MODEL_NAMES)}.

The values are deterministic in (NAME, --size, --seed) and never zero or constant.
A one-line summary (path, values, bytes, sha256) goes to stderr.
"""


@main.command("fixture", help=_FIXTURE_HELP)
@click.argument("name", type=click.Choice(MODEL_NAMES), metavar="NAME")
@output_option("File to write (its folder must exist).")
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
def fixture_command(
    name: str, output: Path, seed: int, size: str, protocol: int, container: str
) -> None:
    """Write a random-weight checkpoint (help text: ``_FIXTURE_HELP``)."""
    from converter.fixtures import write_fixture

    saved = write_fixture(
        name, output, size=size, seed=seed, protocol=protocol, container=container
    )
    from converter.trees import official_tree

    tree = official_tree(name, size)
    click.echo(
        f"wrote {saved.path}: {name} ({size}, seed {seed}), "
        f"{tree.num_params(include_state=True):,} values in "
        f"{sum(1 for _ in tree.iter_specs()):,} arrays, "
        f"{saved.size_bytes:,} bytes, sha256 {saved.sha256}",
        err=True,
    )


# --------------------------------------------------------------------------------------
# inspect


def _array_rows(tree: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [
        {
            "module": module,
            "param": param,
            "shape": list(array.shape),
            "dtype": array.dtype.name,
            "values": int(array.size),
            "bytes": int(array.nbytes),
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
    from converter.reader import ALLOWED_GLOBALS

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
            f"{row['module']}/{row['param']}",
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
    click.echo("\n".join(lines))


def _print_failure(document: Dict[str, Any]) -> None:
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
    click.echo("\n".join(lines))


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)
def inspect_command(path: Path, as_json: bool) -> None:
    """Describe the checkpoint at PATH without running anything from it.

    Lists modules and params (shape, dtype, values, bytes), totals, the pickle
    protocol, the container kinds and the globals the file names. The report goes
    to stdout (it is the command's result); errors go to stderr. Exit 0 for a
    readable checkpoint; exit 3 for an unsafe or unreadable file, still listing the
    globals found in its opcodes.
    """
    from converter.reader import load_haiku_checkpoint, scan_pickle

    try:
        checkpoint = load_haiku_checkpoint(path)
    except CheckpointError as error:
        try:
            scan = scan_pickle(path)
        except CheckpointError:
            scan = None
        document = _failure_document(path, error, scan)
        click.echo(f"error: {error}", err=True)
        if as_json:
            echo_json(document)
        else:
            _print_failure(document)
        raise click.exceptions.Exit(exit_code_for(error))
    document = _checkpoint_document(checkpoint)
    if as_json:
        echo_json(document)
    else:
        _print_checkpoint(document)


# --------------------------------------------------------------------------------------
# convert, verify, export, models, demo


def _parse_config(values: Tuple[str, ...]) -> Dict[str, Any]:
    """``--config KEY=VALUE`` pairs; values are JSON when they parse (``[32, 32]``, ``3``)."""
    config: Dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(
                f"{item!r} is not KEY=VALUE (e.g. --config image_size=[368,496])",
                param_hint="--config",
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config[key.strip()] = value
    return config


def _progress(quiet: bool):
    def report(message: str) -> None:
        if not quiet:
            click.echo(f"  {message}", err=True)

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
    "(repeatable; VALUE is JSON, e.g. image_size=[368,496]).",
)
_MAPPING_OPTION = click.option(
    "--mapping",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Use this mapping YAML instead of the bundled one.",
)
_JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)
_QUIET_OPTION = click.option(
    "-q", "--quiet", is_flag=True, help="No progress messages on stderr."
)


@main.command("convert")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@output_option("OUT.safetensors (recommended) or OUT.pt; written atomically.")
@_MODEL_OPTION
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the floating-point tensors (recorded in the metadata; "
    "perceiver_torch.load runs the model in it unless told otherwise).",
)
@click.option(
    "--verify",
    "run_verify",
    is_flag=True,
    help="Check parity against the JAX reference before writing (needs the [jax] "
    "extra); outside tolerance: nothing is written, exit 1.",
)
@_CONFIG_OPTION
@_MAPPING_OPTION
@_JSON_OPTION
@_QUIET_OPTION
def convert_command(
    checkpoint: Path,
    output: Path,
    model: Optional[str],
    dtype: str,
    run_verify: bool,
    config_items: Tuple[str, ...],
    mapping: Optional[Path],
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert the official checkpoint CHECKPOINT to a perceiver_torch checkpoint.

    The file is read without jax or haiku through an allow-list unpickler, matched to
    its mapping (mappings/*.yaml), checked tensor by tensor against the model, and
    written atomically. The safetensors metadata records the model, its config, the
    source sha256, the mapping name and hash, the converter version and, with
    --verify, the parity result. Load it with perceiver_torch.load(OUT).
    """
    from converter.conversion import convert

    config = _parse_config(config_items)
    try:
        result = convert(
            checkpoint,
            output,
            model=model,
            dtype=dtype,
            config=config or None,
            mapping=mapping,
            verify=run_verify,
            progress=_progress(quiet),
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if result.parity_report is not None and not quiet:
        click.echo(result.parity_report.format_table(), err=True)
    click.echo(
        f"wrote {result.output}: {result.model} ({result.size_preset or 'custom'} size), "
        f"{result.report.used} tensors, {result.dtype}, {result.seconds:.1f} s",
        err=True,
    )
    if as_json:
        echo_json(result.as_dict())


@main.command("verify")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_MODEL_OPTION
@_CONFIG_OPTION
@_MAPPING_OPTION
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the deterministic test inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Also run the model in bfloat16/float16 and report its fidelity (against "
    "JAX and float32; structured inputs): max relative diff, argmax agreement, flow "
    "end-point error, video PSNR. Fails (exit 1) only on inf/NaN outputs.",
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
    as_json: bool,
    quiet: bool,
) -> None:
    """Check that the converted model computes what the JAX model computes.

    Converts CHECKPOINT in memory, runs perceiver_jax (the official modules restated
    in Haiku, fed the original file) and the perceiver_torch model on the same
    deterministic inputs, and prints per stage (preprocessed inputs, latents after
    the encoder, decoder output, final outputs) max |diff|, max relative diff and
    argmax agreement against the mapping's tolerance. Exit 1 if an output is outside
    it. Needs the [jax] extra.

    With --dtype bfloat16|float16, the float32 parity check is followed by a fidelity
    report of the model in that dtype (converter.precision).
    """
    from converter.verify import verify

    report = verify(
        checkpoint,
        model,
        config=_parse_config(config_items) or None,
        mapping=mapping,
        seed=seed,
        batch=batch,
        progress=_progress(quiet),
    )
    click.echo(report.format_table(), err=True)
    document, passed = report.as_dict(), report.passed
    if dtype != "float32":  # reduced precision (issue 13): the fidelity report too
        from converter.precision import fidelity

        extra = fidelity(
            checkpoint,
            dtype,
            model,
            config=_parse_config(config_items) or None,
            mapping=mapping,
            progress=_progress(quiet),
        )
        click.echo(extra.format_table(), err=True)
        document["fidelity"] = extra.as_dict()
        passed = passed and extra.passed
    if as_json:
        echo_json(document)
    if not passed:
        raise click.exceptions.Exit(EXIT_PARITY)


@main.command("export")
@click.argument("converted", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@output_option("The official-layout pickle to write.")
@click.option("--protocol", type=click.IntRange(2, 5), default=3, show_default=True)
@click.option(
    "--container", type=click.Choice(CONTAINERS), default="flatmapping", show_default=True
)
@_MAPPING_OPTION
@_JSON_OPTION
def export_command(
    converted: Path,
    output: Path,
    protocol: int,
    container: str,
    mapping: Optional[Path],
    as_json: bool,
) -> None:
    """Write CONVERTED (a perceiver-convert output) back in the official Haiku layout.

    Every mapping op is inverted exactly; a float32 conversion exports to the
    original arrays bit for bit (the BatchNorm accumulators the model does not use
    travel in the converted file's metadata).
    """
    from converter.exporter import export

    result = export(converted, output, protocol=protocol, container=container, mapping=mapping)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"wrote {result.output}: {result.model}, {result.tensors} arrays, protocol "
        f"{protocol}, {'exact' if result.exact else 'not bit-exact (see notes)'}",
        err=True,
    )
    if as_json:
        echo_json(result.as_dict())


@main.command("models")
@_JSON_OPTION
def models_command(as_json: bool) -> None:
    """List the six official models: file, download address, parameters, mapping."""
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
        click.echo(f"{row['name']:<{width}}  {row['params']:>12,} params  {row['file']}")
        click.echo(f"{'':<{width}}  {row['url']}")


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

    NAME is a bundled mapping (one of the six model names) or a mapping YAML file.
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
    try:
        description = describe_mapping(name, size, _parse_config(config_items))
    except OverrideError as error:
        raise click.BadParameter(str(error), param_hint="--config") from None
    if as_json:
        echo_json(description.as_dict())
    else:
        click.echo(format_table(description))
    if description.problems:
        raise click.exceptions.Exit(EXIT_BAD_INPUT)


@main.command("demo")
@click.option("--size", type=click.Choice(SIZES), default="tiny", show_default=True,
              help="tiny: seconds per model; full: the official sizes (minutes, GBs).")
@click.option("--models", "names", type=click.Choice(MODEL_NAMES), multiple=True,
              help="Only these models (repeatable); default: all six.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the files here (default: a temporary folder, removed).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_JSON_OPTION
@_QUIET_OPTION
def demo_command(
    size: str,
    names: Tuple[str, ...],
    workdir: Optional[Path],
    seed: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """For each model: write an official-format checkpoint with random weights, convert
    it, verify parity against the JAX reference, export it back and check the round
    trip is bit-identical; then print one summary table. Exit 1 if any parity check
    fails. Without the [jax] extra the parity column says "skipped".
    """
    from converter.demo import run_demo

    rows = run_demo(
        names or MODEL_NAMES, size=size, seed=seed, workdir=workdir, progress=_progress(quiet)
    )
    click.echo(_demo_table(rows, size), err=as_json)
    if as_json:
        echo_json(rows)
    if any(row["parity"] == "FAIL" for row in rows):
        raise click.exceptions.Exit(EXIT_PARITY)
    if any(row["error"] for row in rows):
        raise click.exceptions.Exit(EXIT_BAD_INPUT)


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


if __name__ == "__main__":  # pragma: no cover
    main()
