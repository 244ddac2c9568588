"""The ``perceiver-convert demo`` pipeline: fixture -> convert -> verify -> export.

For each model it writes an official-format checkpoint with random weights, converts
it to safetensors, compares the converted model with the JAX reference (when the
``[jax]`` extra is installed), exports it back to the Haiku layout and checks that
the round trip gives the original arrays bit for bit. In a ``--workdir`` it records
the files it wrote (:class:`DemoFiles`), so that a rerun replaces them, also after an
interrupted run, and refuses (without ``--force``) any other file in their way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from converter.errors import ConverterError, OutputError, UsageError
from converter.progress import Progress, quiet



def demo_files(name: str) -> List[str]:
    """The files the demo writes for model ``name``, in its folder."""
    return [f"{name}.pickle", f"{name}.safetensors", f"{name}.exported.pickle"]


# The task pipelines' demo (``run_cli.run_task_demos``) writes into this subfolder of
# ``--workdir``; each task's demo makes its own media there.
TASKS_FOLDER = "tasks"

#: The demo's record of what it wrote in ``--workdir`` (:class:`DemoFiles`).
MANIFEST = ".perceiver-demo.json"


class DemoFiles:
    """The files the demo wrote in a ``--workdir``, recorded in its :data:`MANIFEST`,
    so that a rerun (also after Ctrl-C) replaces them without ``--force`` while a
    file the demo did not write is never replaced without it.

    A written file is recorded by its size, modification time and inode; before a
    step writes, the paths it will write (files, or a folder whose files the step
    names itself: the task demos') are recorded as pending, so that an interrupted
    step's files are known too. :meth:`owns` is true for a recorded file that is
    unchanged since (not replaced, not edited) and for any file under a pending path.
    Without a readable manifest nothing is the demo's. Paths are relative to the
    workdir, with ``/``.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.files: Dict[str, Dict[str, int]] = {}
        self.pending: List[str] = []
        try:
            document = json.loads((self.workdir / MANIFEST).read_text(encoding="utf-8"))
            files, pending = document["files"], document["pending"]
            if isinstance(files, dict) and isinstance(pending, list):
                self.files = {str(k): v for k, v in files.items() if isinstance(v, dict)}
                self.pending = [str(p) for p in pending]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no manifest (or not one this version reads): nothing is the demo's

    def _stamp(self, path: str) -> Optional[Dict[str, int]]:
        try:
            info = os.stat(self.workdir / path)
        except OSError:
            return None
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}

    def _files_under(self, path: str) -> List[str]:
        """``path`` if it is a file, the files under it if it is a folder."""
        full = self.workdir / path
        if full.is_dir():
            return sorted(
                p.relative_to(self.workdir).as_posix() for p in full.rglob("*") if not p.is_dir()
            )
        return [path] if full.exists() else []

    def owns(self, path: str) -> bool:
        """Whether the demo wrote the file ``path`` (relative to the workdir)."""
        if any(path == p or path.startswith(p + "/") for p in self.pending):
            return True
        recorded = self.files.get(path)
        return recorded is not None and recorded == self._stamp(path)

    @contextlib.contextmanager
    def writing(self, paths: Sequence[str]) -> Iterator[None]:
        """A block that writes ``paths`` (files or folders): pending during the
        block; afterwards (also after an error or Ctrl-C) each file under them that
        the block made or changed, or that was the demo's before, is recorded. A
        file that was not the demo's and that the block left alone stays not the
        demo's."""
        before = {f: self._stamp(f) for p in paths for f in self._files_under(p)}
        owned = {f for f in before if self.owns(f)}
        self.pending = sorted(set(self.pending) | set(paths))
        self._save()
        try:
            yield
        finally:
            for path in paths:
                for name in [n for n in self.files if n == path or n.startswith(path + "/")]:
                    if self._stamp(name) is None:
                        del self.files[name]  # gone
                for name in self._files_under(path):
                    stamp = self._stamp(name)
                    if stamp is not None and (name in owned or before.get(name) != stamp):
                        self.files[name] = stamp
            self.pending = [p for p in self.pending if p not in paths]
            self._save()

    def _save(self) -> None:
        from converter.atomic import atomic_write

        document = {"written_by": "perceiver-convert demo", "pending": self.pending,
                    "files": dict(sorted(self.files.items()))}
        try:
            with atomic_write(self.workdir / MANIFEST) as handle:
                handle.write((json.dumps(document, indent=2) + "\n").encode("utf-8"))
        except (OSError, ConverterError):
            # Without the record a rerun only asks for --force; the demo's own
            # error (a full disk) is the one to report.
            pass


def check_workdir(
    workdir: Path, names: Sequence[str], *, force: bool = False, with_tasks: bool = False
) -> None:
    """``--workdir`` must be a writable folder (created if missing) and, unless
    ``force``, hold none of the files the demo would write but did not write itself
    (:class:`DemoFiles`: those of an earlier run, finished or interrupted, are
    replaced): the models' files, and with ``with_tasks`` any file under its
    ``tasks`` folder (the task demos choose their own file names). Raises
    ``UsageError`` / ``OutputError`` (exit 2) before anything is written."""
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
    if force:
        return
    ours = DemoFiles(workdir)
    existing = [
        name for model in names for name in demo_files(model)
        if (workdir / name).exists() and not ours.owns(name)
    ]
    if with_tasks and (workdir / TASKS_FOLDER).is_dir():
        existing += sorted(
            path.relative_to(workdir).as_posix()
            for path in (workdir / TASKS_FOLDER).rglob("*")
            if not path.is_dir() and not ours.owns(path.relative_to(workdir).as_posix())
        )
    if existing:
        raise OutputError(
            f"refusing to overwrite {len(existing)} file(s) in {workdir} that the demo "
            f"did not write ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}"
            "); pass --force to replace them or choose another --workdir"
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
        ours = DemoFiles(workdir)
        rows = []
        for name in names:
            with ours.writing(demo_files(name)):  # recorded for a rerun (check_workdir)
                rows.append(demo_one(name, size, seed, workdir, progress))
        return rows
    folder = Path(tempfile.mkdtemp(prefix="perceiver-demo-"))
    try:
        return [demo_one(name, size, seed, folder, progress) for name in names]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
