"""The command-line side of the exports to other projects' formats (HuggingFace, ONNX).

Kept out of :mod:`converter.cli` so that it registers them with a few lines; imported
only when such an export is asked for (transformers and onnx are optional extras).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from converter.cli import echo_json


def export_other(
    converted: Path,
    output: Path,
    fmt: str,
    *,
    as_json: bool,
    progress: Callable[[str], None],
) -> None:
    """``perceiver-convert export CONVERTED -o OUTPUT --format hf|onnx``."""
    try:
        if fmt == "hf":
            from converter.hf import export_hf, format_fidelity

            result = export_hf(converted, output, progress=progress)
            click.echo(format_fidelity(result.fidelity), err=True)
            click.echo(
                f"wrote {result.output}/: {result.model} as transformers' "
                f"{result.architecture}, {result.tensors} tensors, "
                f"{', '.join(result.files)}",
                err=True,
            )
        else:
            from converter.onnx_export import export_onnx, format_onnx_check

            result = export_onnx(converted, output, progress=progress)
            click.echo(format_onnx_check(result.check), err=True)
            click.echo(
                f"wrote {result.output}: {result.model}, {result.form}, opset "
                f"{result.opset}, dynamic batch",
                err=True,
            )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        echo_json(result.as_dict())
