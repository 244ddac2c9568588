"""Atomic file output: a failed or interrupted write never leaves a half-written file.

Data goes to a temporary file in the target's own folder (so the final rename stays
on one filesystem and is atomic), is flushed and fsynced, then published by
:func:`publish`: renamed over the target with :func:`os.replace` when the caller may
overwrite (``--force``), otherwise put in place only if no file holds the name at that
instant. (:func:`check_outputs` refuses an existing output up front, but another
process may create it during the minutes of work that follow; "nothing is lost" needs
the final step itself to refuse.) On any exception the temporary file is removed and
an existing target is left exactly as it was. Files that must appear together (a run's
outputs) go through :func:`publish_all`: all of them or none, also with ``--force``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union

from converter.errors import ConverterError, OutputError

__all__ = [
    "HashingWriter",
    "atomic_write",
    "check_output_path",
    "check_outputs",
    "durable_publish",
    "fsync_file",
    "fsync_folder",
    "fsync_tree",
    "output_appeared",
    "publish",
    "publish_all",
    "raise_write_error",
    "refuse_special_file",
    "write_failed",
]


def check_output_path(path: Union[str, os.PathLike]) -> Path:
    """Check that ``path`` can be written as a file, before any work is done.

    Raises:
        OutputError (exit 2, a :class:`~converter.errors.ConverterError`): the
            parent folder is missing (or a file stands where it should be) or not
            writable, or ``path`` is a folder, a FIFO, a device or a socket; the
            message says how to fix it.
    """
    path = Path(path)
    parent = path.parent
    refuse_bare_suffix(path)
    _refuse_long_name(path)  # first: stat() of such a name raises ENAMETOOLONG
    _refuse_link_loop(path)
    if not parent.is_dir() or path.is_dir():
        _refuse_output_path_problem(path)
    refuse_special_file(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        _refuse_output_path_problem(path)
    return path


def _refuse_output_path_problem(path: Path) -> None:
    """Raises OutputError with the runners' own words for what stops ``path`` from
    being written (perceiver_torch cannot import the converter, so the check is
    theirs, and a script calling one is told what the CLI says). Imported on a
    refusal only: perceiver_torch brings torch, which the CLI's startup does
    without. Nothing where the problem went meanwhile (the folder appeared)."""
    from perceiver_torch.pipelines.base import output_path_problem

    problem = output_path_problem(path)
    if problem is not None:
        raise OutputError(problem)


# The suffixes this project's outputs are told apart by.
_OUTPUT_SUFFIXES = frozenset(
    "safetensors pt pth pickle pkl pystate onnx json npy npz flo png jpg jpeg gif mp4 "
    "mov mkv webm avi wav".split()
)


def refuse_bare_suffix(path: Union[str, os.PathLike]) -> None:
    """Refuses an output named only by a suffix (``-o .onnx``): to pathlib it is a
    hidden file with no suffix, so the format chosen by suffix was not the one named
    (``export -o .onnx`` wrote a Haiku pickle; ``convert -o .safetensors`` asked for
    "*.safetensors", the name given). OutputError, exit 2."""
    name = Path(path).name
    if name.startswith(".") and name.count(".") == 1 and name[1:].lower() in _OUTPUT_SUFFIXES:
        raise OutputError(
            f"cannot write {path}: {name} is a suffix without a name; give a name such as "
            f"model{name}"
        )


# The longest file name most filesystems take (NAME_MAX), in bytes.
_NAME_MAX = 255


def temporary_name(path: Path, *, keep_suffix: bool = False) -> Path:
    """A fresh hidden name next to ``path`` for the file written before it is renamed
    into place: ``.NAME.<12 hex>.tmp`` (``keep_suffix``: ``.STEM.<hex>.tmp.SUFFIX``,
    for libraries that choose the format by the suffix). For a name near the
    filesystem's limit the name part is shortened, so that a legal output name (a
    255-byte one) does not fail on its temporary file's name."""
    token = secrets.token_hex(6)
    suffix = path.suffix if keep_suffix else ""
    stem = path.stem if keep_suffix else path.name
    extra = len(f"..{token}.tmp{suffix}".encode())
    encoded = os.fsencode(stem)
    if len(encoded) + extra > _NAME_MAX:
        # Cut in bytes (a character cut in two is bytes again, a legal name part).
        stem = os.fsdecode(encoded[: _NAME_MAX - extra])
    return path.with_name(f".{stem}.{token}.tmp{suffix}")


def refuse_non_utf8_name(path: Union[str, os.PathLike], library: str) -> None:
    """Raises OutputError where ``path`` is not valid UTF-8 and is written by
    ``library``, which takes only such names (torch.onnx.export failed with a
    TypeError quoting its whole graph, safetensors' writer with its own error)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(
            f"cannot write {os.fsencode(path)!r}: {library} takes only names that are "
            "valid UTF-8; choose such a name"
        ) from None


def _refuse_link_loop(path: Path) -> None:
    """OutputError where ``path`` is a link that leads back to itself (a -> b -> a),
    which every later check failed on as "unexpected RuntimeError: Symlink loop"."""
    if not path.is_symlink():
        return
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OutputError(
                f"cannot write {path}: it is a link in a loop of links (it leads back "
                "to itself); remove the link or choose another output name"
            ) from None


def _refuse_long_name(path: Path) -> None:
    """OutputError for a name longer than the filesystem takes (NAME_MAX bytes):
    the write failed as "unexpected OSError: File name too long"."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        limit = _NAME_MAX
    length = len(os.fsencode(path.name))
    if limit > 0 and length > limit:
        raise OutputError(
            f"cannot write {path}: its name is {length} bytes long, more than the "
            f"{limit} this filesystem takes; choose a shorter name"
        )


def refuse_special_file(path: Union[str, os.PathLike]) -> None:
    """Raises OutputError where ``path`` exists (through links) as a FIFO, device
    or socket: outputs are written whole to a temporary file and renamed over the name
    (:func:`atomic_write`), which would replace the node itself (``/dev/null`` with
    ``--force``) rather than write into it."""
    special = _special_file_kind(Path(path))
    if special is not None:
        raise OutputError(
            f"cannot write {path}: it is {special}, not a regular file, and outputs "
            "are written to a new file renamed into place, which would replace it; "
            "give the name of a regular file"
        )


def _special_file_kind(path: Path) -> Optional[str]:
    """What ``path`` is ("a FIFO", "a character device", ...) where it exists (through
    links) and is neither a regular file nor a folder; None otherwise."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return None  # missing, a dangling link, or unreadable: the write will say
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return None


def check_outputs(
    out: Union[str, os.PathLike],
    inputs: Sequence[Optional[Union[str, os.PathLike]]] = (),
    *,
    force: bool = True,
) -> Path:
    """Refuses an output that is one of ``inputs`` (the same file, also through a
    link or another spelling) and, unless ``force``, one that exists. Raises
    :class:`~converter.errors.OutputError` (exit 2); returns ``Path(out)``."""
    out = Path(out)
    for given in inputs:
        if given is None:
            continue
        given = Path(given)
        same = out.resolve() == given.resolve()
        if not same and out.exists() and given.exists():
            same = os.path.samefile(out, given)
        if same:
            raise OutputError(
                f"refusing to write {out}: it is the input {given}; choose another "
                "output name"
            )
    # A dangling link is no file, but writing would replace the link itself.
    if (out.exists() or out.is_symlink()) and not force:
        what = "the file exists" if out.exists() else "it is a link to a missing file"
        raise OutputError(
            f"refusing to overwrite {out}: {what}; pass --force (overwrite=True in "
            "Python) to replace it or choose another output name"
        )
    return out


def output_appeared(path: Union[str, os.PathLike]) -> OutputError:
    """The one-line error (exit 2) of a no-clobber publish that found ``path`` taken:
    it did not exist when checked, but something (another run) created it while this
    output was being written. The same words and advice as :func:`check_outputs`."""
    return OutputError(
        f"refusing to overwrite {path}: the file appeared while this output was being "
        "written (another run?) and was kept; pass --force (overwrite=True in Python) "
        "to replace it or choose another output name"
    )


def publish(
    temp: Union[str, os.PathLike], path: Union[str, os.PathLike], *, overwrite: bool = True
) -> None:
    """Puts the finished file ``temp`` (in ``path``'s folder) at ``path``.

    ``overwrite``: :func:`os.replace`, atomic, over whatever is there. Otherwise
    no-clobber: ``path`` is created only if no name (file, folder, link) holds it at
    that instant, else :func:`output_appeared` is raised and both files are left as
    they are (the caller removes ``temp``).
    """
    if overwrite:
        _keep_mode(temp, path)
        os.replace(temp, path)
        return
    try:
        # link(2) creates the name only where none exists, atomically (EEXIST
        # otherwise, even for a dangling link), and the file appears whole.
        os.link(temp, path)
    except FileExistsError:
        raise output_appeared(path) from None
    except OSError:
        # No hard links here (FAT/exFAT, some network or FUSE mounts; EPERM, ENOTSUP,
        # ...); whatever the reason, the fallback is no-clobber too, and its own
        # error is the one reported.
        _claim_then_replace(Path(temp), Path(path))
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)


def _keep_mode(temp: Union[str, os.PathLike], path: Union[str, os.PathLike]) -> None:
    """Gives ``temp`` the permissions of the regular file it is about to replace
    (``--force``): a file kept private (0600) became 0644 (the umask's), where
    ``cp`` over it, which writes into the file, keeps them. Best effort: a file
    that cannot be read or changed keeps the umask's."""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode):
            os.chmod(temp, stat.S_IMODE(info.st_mode))
    except OSError:
        pass


def _claim_then_replace(temp: Path, path: Path) -> None:
    # O_EXCL claims the name atomically (a second writer fails there), then the rename
    # replaces only our own empty placeholder. The cost: for that instant a reader may
    # see an empty file (every reader here reports a 0-byte file as such), never a
    # partly written one, which copying the data into an O_EXCL file would expose for
    # the whole copy; a crash in that instant leaves the empty file.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise output_appeared(path) from None
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # the empty placeholder
        raise


def write_failed(
    path: Union[str, os.PathLike],
    error: OSError,
    *,
    kept: Sequence[Union[str, os.PathLike]] = (),
) -> ConverterError:
    """The one-line error of a write that failed (disk full, folder gone, ...) after
    its temporary file was removed; the CLI prints it and exits 3. The advice follows
    the cause: "free disk space" is no help on a read-only filesystem. ``kept``: the
    existing files the write would have replaced, named as unchanged (a
    :func:`publish_all` that was undone)."""
    advice = {
        errno.ENOSPC: "free disk space or choose another folder",
        errno.EDQUOT: "free space within your disk quota or choose another folder",
        errno.EROFS: "the filesystem is read-only: choose a folder on a writable one",
        errno.EACCES: "choose a folder you may write in",
        errno.EPERM: "choose a folder you may write in",
        # A file-size limit (ulimit -f, RLIMIT_FSIZE), not the disk.
        errno.EFBIG: "the file is larger than this process may write: raise its file-size "
        "limit (ulimit -f) or choose a filesystem that takes files this large",
    }.get(error.errno, "free disk space or choose another folder")
    unchanged = ""
    if kept:
        names = ", ".join(str(name) for name in kept)
        unchanged = f" and {names} " + ("is as it was" if len(kept) == 1 else "are as they were")
    return ConverterError(
        f"writing {path} failed: {error.strerror or error}; nothing was written"
        f"{unchanged} ({advice})"
    )


def raise_write_error(path: Union[str, os.PathLike], error: BaseException) -> NoReturn:
    """Re-raises ``error`` (the writer has removed its temporary file); an OSError
    (disk full, folder gone) as :func:`write_failed`'s one line (exit 3), not
    "unexpected OSError ... please report it"."""
    if isinstance(error, OSError):
        raise write_failed(path, error) from error
    raise error


def fsync_folder(folder: Union[str, os.PathLike]) -> None:
    """Flushes ``folder``'s entries to disk, which makes the renames and creations in
    it durable. Not possible on every platform (Windows opens no folders), and the
    files' data is already safe by then, so failing here is not an error."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def durable_publish(
    temp: Union[str, os.PathLike], path: Union[str, os.PathLike], *, overwrite: bool = True
) -> None:
    """:func:`publish` for a finished ``temp`` that a library wrote by name (no handle
    to fsync): fsyncs ``temp`` first and the folder after, as :func:`atomic_write`
    does, so that a crash never leaves ``path`` naming a file whose data was lost."""
    fsync_file(temp)
    publish(temp, path, overwrite=overwrite)
    path = Path(path)
    fsync_folder(path.parent)


def publish_all(
    pairs: Sequence[Tuple[Union[str, os.PathLike], Union[str, os.PathLike]]],
    *,
    overwrite: bool = True,
) -> None:
    """Puts each finished ``temp`` at its ``path`` (``pairs``: ``(temp, path)``, each
    ``temp`` fsynced and in its ``path``'s folder), all of them or none, then fsyncs
    their folders so that the renames survive a crash.

    One file: :func:`publish`, atomic by itself. Several: each goes in with
    :func:`publish`, and on a failure the files this call put in place are removed
    again. With ``overwrite`` the files they replace must come back too, and a rename
    that has replaced a file cannot be undone, so every existing ``path`` is first
    renamed aside to a hidden backup in its own folder (``.NAME.<hex>.old``), then the
    new files are renamed in; on a failure the backups are renamed back, and only
    when every rename has succeeded are they deleted. (No hard links, so any
    filesystem will do; on Windows, where a file open in another program cannot be
    renamed, that file stops the step before anything was replaced.) A crash in the
    midst (power loss, SIGKILL) can leave old files under their backup names; a
    backup that cannot be deleted after a success is left, hidden.

    The caller removes the temporary files that a failure leaves.

    Raises:
        ConverterError: a rename failed (:func:`write_failed`'s line, naming the
            existing files as unchanged), or so did renaming a backup back (the
            message names the backup that holds the old file).
        OutputError: without ``overwrite``, a ``path`` that appeared meanwhile
            (:func:`output_appeared`).
        Whatever interrupted the step (KeyboardInterrupt), after the same undo.
        ValueError: two ``path`` name one file (also through another spelling or a
            linked folder), before anything is renamed: only one could stay.
    """
    pairs = [(Path(temp), Path(path)) for temp, path in pairs]
    _refuse_a_name_twice([path for _, path in pairs])
    set_aside = overwrite and len(pairs) > 1
    # The files this call would replace: on a failure, each is as it was.
    existing = [path for _, path in pairs if overwrite and os.path.lexists(path)]
    backups: List[Tuple[Path, Path]] = []  # (path, the hidden name of its old file)
    placed: List[Tuple[Path, os.stat_result]] = []  # (path, this call's file there)
    current: Optional[Path] = None
    try:
        # Each rename is noted before it is made, so that an interrupt arriving as
        # os.replace or os.link returns (Ctrl-C during the call) still finds it to undo.
        if set_aside:
            for temp, current in pairs:
                _keep_mode(temp, current)  # while the old file still holds the name
                if os.path.lexists(current):
                    backup = _backup_name(current)
                    backups.append((current, backup))
                    os.replace(current, backup)
        for temp, current in pairs:
            mine = os.stat(temp)
            if set_aside or not overwrite:
                # Not a lone --force file: it replaces its old one, which no undo
                # could bring back, so once renamed it stays.
                placed.append((current, mine))
            publish(temp, current, overwrite=overwrite)
    except BaseException as error:
        not_back = _undo_publish(placed, backups)
        _fsync_folders(path for _, path in pairs)
        if not_back:
            raise _backups_left(current, error, not_back) from error
        if isinstance(error, OSError) and current is not None:
            raise write_failed(current, error, kept=existing) from error
        raise
    _fsync_folders(path for _, path in pairs)
    for _, backup in backups:
        with contextlib.suppress(OSError):
            os.unlink(backup)


def _refuse_a_name_twice(paths: Sequence[Path]) -> None:
    # A name given twice was replaced twice, the first file lost (--force), or, without
    # --force, refused as one that "appeared while this output was being written".
    # The same name is the same entry of the same folder: links to one file are two
    # names, and each is replaced, not its target.
    seen = {}
    for path in paths:
        entry = (os.path.realpath(path.parent), path.name)
        if entry in seen:
            raise ValueError(f"{path} is given twice (as {seen[entry]}): only one could stay")
        seen[entry] = path


def _backup_name(path: Path) -> Path:
    """A free hidden name beside ``path`` for its old file while :func:`publish_all`
    puts new files in place: ``.NAME.<12 hex>.old`` (told apart from the ``.tmp``
    files being written, should a crash leave it)."""
    while True:
        backup = temporary_name(path).with_suffix(".old")
        if not os.path.lexists(backup):
            return backup


def _undo_publish(
    placed: Sequence[Tuple[Path, os.stat_result]], backups: Sequence[Tuple[Path, Path]]
) -> List[Tuple[Path, Path, OSError]]:
    """Removes the files a failed :func:`publish_all` put in place (those still its
    own: a --force run of another process may have replaced one since) and renames the
    backups back; returns ``(path, backup, error)`` for each backup that stayed."""
    for path, mine in reversed(placed):
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), mine):
                os.unlink(path)
    not_back = []
    for path, backup in reversed(backups):
        if not os.path.lexists(backup):
            continue  # its rename aside never happened: the old file is still at path
        try:
            os.replace(backup, path)
        except OSError as error:
            not_back.append((path, backup, error))
    return not_back


def _backups_left(
    path: Optional[Path], error: BaseException, not_back: Sequence[Tuple[Path, Path, OSError]]
) -> ConverterError:
    """The error of a :func:`publish_all` whose undo could not rename every backup
    back: where each old file now is, and what to do."""
    if isinstance(error, OSError):
        first = f"writing {path} failed: {error.strerror or error}"
    else:  # an interrupt: its str() is empty
        first = f"putting {path} in place was interrupted ({type(error).__name__})"
    kept = "; ".join(
        f"the old {target} is kept as {backup} ({problem.strerror or problem})"
        for target, backup, problem in not_back
    )
    return ConverterError(
        f"{first}, and putting the old files back failed too: {kept}; rename "
        f"{'it' if len(not_back) == 1 else 'them'} back by hand"
    )


def _fsync_folders(paths: Iterable[Path]) -> None:
    for folder in {Path(path).parent for path in paths}:
        fsync_folder(folder)


def fsync_file(path: Union[str, os.PathLike]) -> None:
    """Flushes to disk a file a library wrote by name (and closed): the step
    :func:`atomic_write` takes on its own handle before the rename."""
    fd = os.open(path, os.O_RDWR)  # Windows' fsync needs a handle open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Union[str, os.PathLike]) -> None:
    """Flushes every file under ``folder`` that libraries wrote by name (transformers'
    ``save_pretrained``, safetensors), then the folders themselves, before ``folder``
    is renamed into place: a folder rename does not flush its files' data, so a crash
    after it could otherwise leave the published folder holding empty or cut-off
    files. Links are not followed."""
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
        fsync_folder(root)


@contextlib.contextmanager
def atomic_write(
    path: Union[str, os.PathLike], *, overwrite: bool = True
) -> Iterator[BinaryIO]:
    """Open a binary file that appears at ``path`` only if the block succeeds.

    Usage::

        with atomic_write(out, overwrite=force) as f:
            f.write(data)

    The file gets the permissions a plain ``open(path, "wb")`` would give (the
    process umask applies). ``overwrite=False`` never replaces a file, also one that
    another process created after the caller's :func:`check_outputs` (see
    :func:`publish`).

    Raises:
        OutputError: ``overwrite`` is False and ``path`` exists when the block
            starts (:func:`check_outputs`'s message), before anything is written.
        OutputError: ``overwrite`` is False and ``path`` exists when the block ends
            (:func:`output_appeared`; nothing was replaced, the temporary file is gone).
        OutputError: ``path``'s folder is missing or not writable (see
            :func:`check_output_path`).
        ConverterError: the write itself fails (disk full, ...).
    """
    path = check_output_path(path)
    if not overwrite:
        # Up front, before the caller writes (a whole checkpoint: save_haiku_checkpoint
        # pickled it all and then blamed "another run" for a file that was there all
        # along); publish() still refuses one that appears meanwhile.
        check_outputs(path, force=False)
    folder = path.parent
    while True:
        temp = temporary_name(path)
        try:
            # O_EXCL: never reuse a file someone else created; mode 0o666 lets the
            # umask decide the final permissions, as open() would.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConverterError(
                f"cannot write {path}: {exc.strerror or exc}; choose a writable folder"
            ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        publish(temp, path, overwrite=overwrite)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise_write_error(path, exc)
    fsync_folder(folder)


class HashingWriter:
    """A write-only file wrapper that counts and hashes (sha256) what passes through."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Union[bytes, bytearray, memoryview]) -> int:
        self._hash.update(data)
        written = self._file.write(data)
        self.size += len(data)
        return written

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
