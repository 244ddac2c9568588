"""The ``perceiver-convert demo`` pipeline: fixture -> convert -> verify -> export.

For each model it writes an official-format checkpoint with random weights, converts
it to safetensors, compares the converted model with the JAX reference (when the
``[jax]`` extra is installed), exports it back to the Haiku layout and checks that
the round trip gives the original arrays bit for bit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from converter.errors import ConverterError, OutputError, UsageError
from converter.progress import Progress, quiet



def demo_files(name: str) -> List[str]:
    """The files the demo writes for model ``name``, in its folder."""
    return [f"{name}.pickle", f"{name}.safetensors", f"{name}.exported.pickle"]


# The task pipelines' demo (``run_cli.run_task_demos``) writes into this subfolder of
# ``--workdir``; each task's demo makes its own media there.
TASKS_FOLDER = "tasks"


def check_workdir(
    workdir: Path, names: Sequence[str], *, force: bool = False, with_tasks: bool = False
) -> None:
    """``--workdir`` must be a writable folder (created if missing) and, unless
    ``force``, hold none of the files the demo would write: the models' files, and
    with ``with_tasks`` any file under its ``tasks`` folder (the task demos choose
    their own file names). Raises ``UsageError`` / ``OutputError`` (exit 2) before
    anything is written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"cannot create the demo folder {workdir} ({error.strerror or error}); "
            "choose a writable --workdir"
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write in the demo folder {workdir}: no write permission; choose "
            "a writable --workdir"
        )
    existing = [
        name for model in names for name in demo_files(model) if (workdir / name).exists()
    ]
    if with_tasks and (workdir / TASKS_FOLDER).is_dir():
        existing += sorted(
            str(path.relative_to(workdir))
            for path in (workdir / TASKS_FOLDER).rglob("*")
            if not path.is_dir()
        )
    if existing and not force:
        raise OutputError(
            f"refusing to overwrite {len(existing)} file(s) in {workdir} "
            f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); pass "
            "--force to replace them or choose another --workdir"
        )


def _jax_available() -> bool:
    try:
        import haiku  # noqa: F401
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def _same_arrays(first: Any, second: Any) -> bool:
    from converter.mapping import flatten_tree

    a = flatten_tree(first.params, first.state)
    b = flatten_tree(second.params, second.state)
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def demo_one(name: str, size: str, seed: int, folder: Path, progress: Progress) -> Dict[str, Any]:
    """Runs the whole pipeline for one model; never raises for a model's own failure."""
    from converter.conversion import prepare, write_converted
    from converter.exporter import export
    from converter.fixtures import write_fixture
    from converter.haiku_reader import load_haiku_checkpoint
    from converter.registry import official_tree

    row: Dict[str, Any] = {
        "model": name,
        "size": size,
        "params": official_tree(name, size).num_params(),
        "convert_seconds": None,
        "relative": None,
        "argmax": None,
        "parity": "skipped",
        "round_trip": "-",
        "error": None,
    }
    try:
        source = folder / f"{name}.pickle"
        progress(f"{name}: writing an official-format checkpoint with random weights")
        write_fixture(name, source, size=size, seed=seed, protocol=3, container="flatmapping")
        started = time.perf_counter()
        checkpoint = load_haiku_checkpoint(source)
        prepared = prepare(checkpoint, None)
        convert_seconds = time.perf_counter() - started
        if prepared.model != name:
            raise ConverterError(f"detected {prepared.model!r} instead of {name!r}")
        parity = None
        if _jax_available():
            from converter.verify import verify_prepared

            progress(f"{name}: verifying against the JAX reference")
            report = verify_prepared(prepared, seed=seed)
            parity = report.as_dict()
            outputs = [c for c in report.comparisons if c.kind == "output"]
            row["relative"] = max(c.relative for c in outputs)
            agreements = [c.argmax_agreement for c in outputs if c.argmax_agreement is not None]
            row["argmax"] = min(agreements) if agreements else None
            row["parity"] = "ok" if report.passed else "FAIL"
        progress(f"{name}: converting to safetensors")
        converted = folder / f"{name}.safetensors"
        started = time.perf_counter()
        write_converted(prepared, converted, "float32", parity)
        # Reading and matching, then writing (verification not included).
        row["convert_seconds"] = convert_seconds + time.perf_counter() - started
        progress(f"{name}: exporting back to the Haiku layout")
        exported = folder / f"{name}.exported.pickle"
        export(converted, exported)
        row["round_trip"] = (
            "bit-identical"
            if _same_arrays(checkpoint, load_haiku_checkpoint(exported))
            else "DIFFERENT"
        )
        if row["round_trip"] != "bit-identical":
            row["error"] = "the exported checkpoint differs from the original"
    except ConverterError as error:
        row["error"] = str(error)
    return row


def run_demo(
    names: Sequence[str],
    *,
    size: str = "tiny",
    seed: int = 0,
    workdir: Optional[Path] = None,
    progress: Progress = quiet,
) -> List[Dict[str, Any]]:
    """Runs :func:`demo_one` for each model; files go to ``workdir`` or a temporary folder."""
    if not _jax_available():
        progress("jax/dm-haiku not installed: parity is skipped "
                 "(pip install 'perceiver-convert[jax]')")
    if workdir is not None:
        check_workdir(workdir, names, force=True)
        return [demo_one(name, size, seed, workdir, progress) for name in names]
    folder = Path(tempfile.mkdtemp(prefix="perceiver-demo-"))
    try:
        return [demo_one(name, size, seed, folder, progress) for name in names]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
