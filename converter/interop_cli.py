"""The command-line side of the exports to other projects' formats (HuggingFace, ONNX).

Kept out of :mod:`converter.cli` so that it registers them with a few lines; imported
only when such an export is asked for (transformers and onnx are optional extras).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import click

from converter.cli import EXIT_BAD_INPUT, EXIT_PARITY, echo_json
from converter.terminal import echo


def export_other(
    converted: Path,
    output: Path,
    fmt: str,
    *,
    as_json: bool,
    quiet: bool,
    progress: Callable[[str], None],
    overwrite: bool = True,
    mapping: Optional[Path] = None,
) -> None:
    """``perceiver-convert export CONVERTED -o OUTPUT --format hf|onnx``: the check's
    table, the notes and the summary on stderr unless ``quiet``. Errors keep their own
    exit codes: a bad output name is a usage error (2), a bad file is 3. ``overwrite``
    (``--force``) applies to the ONNX file; an hf folder is never overwritten.
    ``mapping`` (``--mapping``, hf only): the file's own mapping file."""
    from converter.exporter import PrecisionWarning

    with warnings.catch_warnings():
        # The same message is one of result.notes, printed once below.
        warnings.simplefilter("ignore", PrecisionWarning)
        if fmt == "hf":
            from converter.hf import export_hf, format_fidelity

            result = export_hf(converted, output, progress=progress, mapping=mapping)
            report = format_fidelity(result.fidelity)
            summary = (
                f"wrote {result.output}/: {result.model} as transformers' "
                f"{result.architecture}, {result.tensors} tensors, "
                f"{', '.join(result.files)}"
            )
        else:
            from converter.onnx_export import export_onnx, format_onnx_check

            result = export_onnx(converted, output, progress=progress, overwrite=overwrite)
            report = format_onnx_check(result.check)
            summary = (
                f"wrote {result.output}: {result.model}, {result.form}, opset "
                f"{result.opset}, dynamic batch"
            )
    if not quiet:
        echo(report, err=True)
        for note in result.notes:
            echo(f"note: {note}", err=True)
        echo(summary, err=True)
    if as_json:
        echo_json(result.as_dict())


def _refuse_converted_without_reference(checkpoint: Path) -> None:
    """A perceiver-convert output given to ``verify`` alone: its parity is checked
    against the official file it came from, which the command needs (--reference)."""
    from converter.errors import CheckpointError
    from converter.hf_import import is_converted_metadata, safetensors_metadata

    if checkpoint.suffix.lower() != ".safetensors":
        return  # a converted .pt is a zip: the Haiku reader names it as such
    metadata = safetensors_metadata(checkpoint)
    if metadata is not None and is_converted_metadata(metadata):
        raise CheckpointError(
            f"{checkpoint} is a perceiver-convert output ({metadata['model']}, "
            f"{metadata.get('dtype', 'float32')}), not an official checkpoint; verify "
            f"it against the official file it came from: perceiver-convert verify "
            f"{checkpoint} --reference ORIGINAL.pickle"
        )


def verify_other(
    checkpoint: Path,
    reference: Optional[Path],
    *,
    model: Optional[str],
    config: Optional[Mapping[str, Any]],
    seed: int,
    batch: int,
    as_json: bool,
    progress: Callable[[str], None],
) -> Any:
    """``verify`` for a HuggingFace checkpoint (returns its ParityReport for the
    command to print) and ``verify CONVERTED --reference ORIGINAL`` (prints and exits
    here); None for an official checkpoint."""
    from converter.hf_import import is_hf_input, prepare_hf
    from converter.verify import require_jax, verify_prepared

    if reference is not None:
        from converter.verify_reference import verify_against_reference

        check, report = verify_against_reference(
            checkpoint, reference, seed=seed, batch=batch, progress=progress
        )
        echo(check.format(), err=True)
        if report is not None:
            echo(report.format_table(), err=True)
        document = {"tensors": check.as_dict(),
                    "parity": None if report is None else report.as_dict()}
        if not check.passed:
            # Not a parity failure (exit 1) but a file that is not this original's
            # conversion: the error line, and the error document's fields, say so.
            message = (
                f"{checkpoint} is not a conversion of {reference}: its tensors differ "
                f"from the original's through the mapping ({check.equal} of "
                f"{check.compared} equal, the rest listed above); give the official "
                "file it was made from"
            )
            echo(f"error: {message}", err=True)
            document.update(ok=False, error={"type": "TensorMismatch", "message": message},
                            exit_code=EXIT_BAD_INPUT)
        if as_json:
            echo_json(document)
        if not check.passed:
            raise click.exceptions.Exit(EXIT_BAD_INPUT)
        raise click.exceptions.Exit(0 if report.passed else EXIT_PARITY)
    if not is_hf_input(checkpoint):
        _refuse_converted_without_reference(checkpoint)
        return None
    require_jax()
    prepared = prepare_hf(checkpoint, model=model, config=config, progress=progress)[0]
    return verify_prepared(prepared, seed=seed, batch=batch, progress=progress)
