"""Helpers that several test modules share."""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

from click.testing import CliRunner, Result

from converter.cli import main


def run_cli(*args: Any) -> Result:
    """Runs ``perceiver-convert ARGS`` in-process (stdout and stderr kept apart).

    An exception escaping the CLI fails the test instead of turning into exit code 1,
    which would be indistinguishable from a parity failure.
    """
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_same_tree(got: dict, expected: dict) -> None:
    """Bit-identical ``{module: {param: array}}`` trees: the same names (the written
    order is sorted), dtypes, shapes and bytes."""
    assert list(got) == sorted(expected)
    for module, params in expected.items():
        assert list(got[module]) == sorted(params), module
        for name, array in params.items():
            back = got[module][name]
            assert back.dtype == array.dtype, (module, name)
            assert back.shape == array.shape, (module, name)
            assert back.tobytes() == array.tobytes(), (module, name)


def assert_kept_the_other_runs_file(result: Result, out: Path, other: bytes) -> None:
    """A CLI write without --force whose output appeared meanwhile (another run):
    exit 2 with the one-line refusal, the other run's bytes kept and no temporary
    file left beside them."""
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"refusing to overwrite {out}" in result.stderr
    assert "appeared while" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == other
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file


def truncated_video(folder: Path, frames: int = 30, size=(40, 56)) -> Path:
    """An H.264 MP4 of ``frames`` textured frames (index at the front, so that a cut
    file still opens) cut to its first two thirds: FFmpeg decodes the frames that are
    there without an error, while the container still declares ``frames``."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    whole = folder / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = whole.read_bytes()
    cut = folder / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    whole.unlink()
    return cut


def alive_counts() -> Dict[str, int]:
    """Counts for :func:`track_alive`: how many tracked objects are alive now, the
    most alive at once, and how many were made."""
    return {"now": 0, "most": 0, "made": 0}


def _one_gone(counts: Dict[str, int]) -> None:
    counts["now"] -= 1


def track_alive(counts: Dict[str, int], value: Any) -> Any:
    """``value``, counted in ``counts`` (:func:`alive_counts`) until it is garbage
    (a weak reference's finalizer): what a runner holds at once, without timing or
    measuring memory."""
    counts["now"] += 1
    counts["made"] += 1
    counts["most"] = max(counts["most"], counts["now"])
    weakref.finalize(value, _one_gone, counts)
    return value


def full_disk_temporary_files(monkeypatch: Any, room: int) -> List[Any]:
    """Makes ``tempfile.TemporaryFile`` give real unnamed files (in the folder asked)
    whose disk is full once ``room`` bytes have been written to each: the system's
    write raises ENOSPC, below Python's buffer, as a full disk does. Returns the list
    of the files made (buffered; their ``.raw`` below)."""
    import errno
    import io
    import os
    import tempfile

    class FullDisk(io.FileIO):
        def write(self, data: Any) -> int:
            size = memoryview(data).nbytes
            if size > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= size
            return super().write(data)

    made: List[Any] = []

    def full_disk(*args: Any, dir: Any = None, **kwargs: Any) -> Any:
        handle, name = tempfile.mkstemp(dir=dir)
        os.unlink(name)
        raw = FullDisk(handle, "r+")
        raw.room = room
        made.append(io.BufferedRandom(raw))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", full_disk)
    return made


def act_at_read(monkeypatch: Any, module: Any, name: str, at: int,
                action: Callable[[], None]) -> None:
    """Wraps the reading function ``module.name`` so that ``action()`` runs just before
    its ``at``-th call (from 1): with ``at = len(inputs) + 1``, once every input has
    been checked and before the first read for the model (a file rewritten, removed
    or replaced between a runner's two reads)."""
    real, calls = getattr(module, name), []

    def reading(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == at:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, reading)


@contextlib.contextmanager
def batch_sizes_of_calls(model: Any) -> Iterator[List[int]]:
    """The batch size (the output's length) of each forward call ``model`` makes in
    the block, in order: a forward hook, removed at the end."""
    sizes: List[int] = []
    hook = model.register_forward_hook(lambda module, args, out: sizes.append(len(out)))
    try:
        yield sizes
    finally:
        hook.remove()


def fail_on_call(monkeypatch: Any, owner: Any, method: str, call: int,
                 message: str) -> List[int]:
    """Makes ``owner.method`` raise ``RuntimeError(message)`` on its ``call``-th call
    (from 1), and behave as before on the others. Returns the list that counts the
    calls (one entry each)."""
    real, calls = getattr(owner, method), []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, method, failing)
    return calls


def _damage_packet_midway(path: Path, kind: str) -> Path:
    """Overwrites, in place, the packet halfway through the first ``kind`` ("audio"
    or "video") stream of the media file ``path`` with 0xFF bytes: FFmpeg decodes
    the packets before it, then refuses that one, as in a file damaged on a disk or
    in a download. Returns ``path``."""
    import av

    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        packets = [(p.pos, p.size) for p in container.demux(stream) if p.size]
    position, size = packets[len(packets) // 2]
    data = bytearray(path.read_bytes())
    data[position : position + size] = b"\xff" * size
    path.write_bytes(bytes(data))
    return path


def damage_sound_midway(path: Path) -> Path:
    """:func:`_damage_packet_midway` of the sound track: its AAC decoder fails on the
    frame header."""
    return _damage_packet_midway(path, "audio")


def damage_video_midway(path: Path) -> Path:
    """:func:`_damage_packet_midway` of the video stream: an H.264 NAL unit length
    past the packet's end ("Invalid data found when processing input")."""
    return _damage_packet_midway(path, "video")


def same_size_mp4s(*paths: Path) -> None:
    """Pads the MP4 files ``paths`` to one size with zero bytes after their last box,
    which FFmpeg ignores (their frames decode as before): a file replaced by another
    of these keeps its size."""
    sizes = [path.stat().st_size for path in paths]
    for path, size in zip(paths, sizes):
        path.write_bytes(path.read_bytes() + bytes(max(sizes) - size))


def replace_once_checked(monkeypatch: Any, module: Any, path: Path, other: Path,
                         keep_time: bool = True) -> None:
    """Patches ``module.check_video`` so that once it has checked ``path``, ``other``
    replaces it, keeping its modification time unless not ``keep_time`` (``cp -p``: a
    replacement that base.file_state cannot tell where the sizes are the same too)."""
    import os

    real = module.check_video

    def check_then_replace(*args: Any, **kwargs: Any) -> Any:
        checked = real(*args, **kwargs)
        before = path.stat()
        other.replace(path)
        if keep_time:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return checked

    monkeypatch.setattr(module, "check_video", check_then_replace)


def record_video_checks(monkeypatch: Any, module: Any) -> List[str]:
    """Patches ``module.check_video`` to record the name of each file it checks (the
    returned list), then check it."""
    import os

    checked: List[str] = []
    real = module.check_video

    def recorded_check(path: Any, *args: Any, **kwargs: Any) -> Any:
        checked.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, "check_video", recorded_check)
    return checked


def track_checked_frames(monkeypatch: Any) -> Dict[str, int]:
    """Counts (:func:`alive_counts`) the frames media.iter_video_frames gives while
    alive: media.check_video's, since the pipelines' own reads go through their
    modules' names for it, which stay as they are."""
    from perceiver_torch.pipelines import media

    counts = alive_counts()
    real = media.iter_video_frames

    def tracked_frames(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for frame in real(*args, **kwargs):
            yield track_alive(counts, frame)

    monkeypatch.setattr(media, "iter_video_frames", tracked_frames)
    return counts


def frames_before_the_damage(video: Path) -> int:
    """How many frames of :func:`damage_video_midway`'s ``video`` decode before the
    decoder's error (which must come: the damage is real)."""
    import re

    import pytest

    from perceiver_torch.pipelines.base import InputError
    from perceiver_torch.pipelines.media import iter_video_frames

    decoded = 0
    with pytest.raises(InputError, match=re.escape(f"{video}: the video cannot be decoded")):
        for _ in iter_video_frames(video):
            decoded += 1
    return decoded


# Weights planted by checkpoint_with_tiny_weights, against float16's thresholds
# (perceiver_torch.registry.Underflow has the analysis): up to 2**-25 = 3.0e-8 a
# weight becomes 0, from there to 2**-14 - 2**-25 (6.1e-5) subnormal, above normal.
TINY_BIAS = [1e-9, -1e-9, 1e-6, 1e-3, 0.0]  # 2 become 0, 1 subnormal; 0 is no loss
TINY_KERNEL = [5e-6, -3e-5, 2e-3]  # 2 subnormal


def checkpoint_with_tiny_weights(folder: Path) -> Path:
    """A tiny imagenet_conv checkpoint (random weights) whose every magnitude below
    1e-3 is raised to 1e-3 (keeping its sign), so that float16 rounds none of the
    random ones below its smallest normal number; then the classifier's bias starts
    with ``TINY_BIAS`` and its kernel's first row with ``TINY_KERNEL``
    (decoder.output_projection.bias and .weight)."""
    import numpy as np

    from converter import load_haiku_checkpoint, save_haiku_checkpoint
    from converter.fixtures import write_fixture

    source = folder / "random.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=4)
    checkpoint = load_haiku_checkpoint(source)
    for tree in (checkpoint.params, checkpoint.state):
        for module in tree.values():
            for name, array in module.items():
                if array.dtype.kind == "f":
                    small = np.abs(array) < 1e-3
                    module[name] = np.where(
                        small, np.copysign(np.float32(1e-3), array), array
                    ).astype(array.dtype)
    output = checkpoint.params["classification_decoder/~/basic_decoder/output"]
    output["b"][: len(TINY_BIAS)] = TINY_BIAS
    output["w"][0, : len(TINY_KERNEL)] = TINY_KERNEL
    planted = folder / "tiny_weights.pickle"
    save_haiku_checkpoint(planted, checkpoint.params, checkpoint.state)
    return planted


def expected_float16_underflow() -> Dict[str, Any]:
    """The ``float16_underflow`` document of :func:`checkpoint_with_tiny_weights`'s
    conversion, from the planted values: the bias (more made 0) before the kernel;
    ``weights``: every floating value of the tiny imagenet_conv model's state."""
    import perceiver_torch

    config = perceiver_torch.TINY_CONFIGS["imagenet_conv"]
    state = perceiver_torch.build("imagenet_conv", config).state_dict()
    weights = sum(t.numel() for t in state.values() if t.is_floating_point())
    bias, kernel = "decoder.output_projection.bias", "decoder.output_projection.weight"
    return {
        "dtype": "float16",
        "smallest_normal": 2.0**-14,
        "weights": weights,
        "subnormal": 3,
        "zero": 2,
        "tensors": 2,
        "worst": [
            {"name": bias, "zero": 2, "subnormal": 1, "values": state[bias].numel()},
            {"name": kernel, "zero": 0, "subnormal": 2, "values": state[kernel].numel()},
        ],
    }
