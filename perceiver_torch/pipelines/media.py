"""Reading and writing the media of the flow and autoencode tasks: video frames and
sound tracks (PyAV, which bundles FFmpeg), WAV and video files. (Still images are
read by :func:`~.image.load_rgb`, the one image loader of the pipelines.)

PyAV and Pillow are imported inside the functions (the ``[media]`` extra), so
importing this module needs none of them. Errors on unreadable input are
:class:`~.base.InputError` (exit 3 in the CLI) with a one-line message.

Arrays: images and video frames are uint8 RGB (H, W, 3) / (T, H, W, 3); sound is
float32 (S,) in [-1, 1] (one channel).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np

# atomic_path is base's (RunOptions' defaults stage through it), offered here too.
from .base import (
    InputError,
    atomic_path,
    file_state,
    modified_input_error,
    no_such_file,
    require,
    rewritten_since,
)

__all__ = [
    "SoundReader",
    "VideoCheck",
    "VideoWriter",
    "atomic_path",
    "check_video",
    "encode_wav",
    "estimated_frame_count",
    "is_video_path",
    "iter_video_frames",
    "read_audio",
    "size_change_error",
    "video_frame_count",
    "video_frame_rate",
    "wav_header",
    "write_video",
]

PathLike = Union[str, os.PathLike]

# Containers read as videos (anything else is opened as a still image): the common
# ones, and those of phones (.3gp), camcorders and broadcasts (.ts, .mts, .m2ts), Flash
# and Windows Media (.flv, .wmv, .asf), Ogg (.ogv), DVDs (.vob) and MXF.
VIDEO_SUFFIXES = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".gif",
    ".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".flv", ".wmv", ".asf", ".ogv", ".vob",
    ".mxf",
)

# The suffixes write_video writes: H.264 (with AAC sound) in MP4, QuickTime and
# Matroska, and GIF. (FFmpeg picks the container from the suffix; WebM cannot hold
# H.264, and AVI, MPEG-TS and FLV, which take it, are not checked for sound in step.)
WRITTEN_VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".gif")

# Suffixes that name a picture, sound or video format: an output named so is meant
# to be that format, so a task that does not write it refuses the name rather than
# taking it as part of a stem (out.webm -> out.webm.mp4).
MEDIA_SUFFIXES = VIDEO_SUFFIXES + (
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff",
    ".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac",
)

# Sample rates FFmpeg's AAC encoder accepts; other rates are resampled to 48 kHz
# for the muxed sound track (the .wav keeps the model's rate).
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


def is_video_path(path: PathLike) -> bool:
    """Whether ``path``'s suffix names a video container (:data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _open_container(path: Path) -> Any:
    av = require("av")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a video or sound file")
    if not path.exists():
        raise no_such_file(path)
    if not path.is_file():
        # A pipe (<(cat clip.mp4)) can be read once, and a video is opened for its
        # frame rate and count before its frames are decoded.
        raise InputError(
            f"{path} is not a regular file (a pipe, such as <(...), or a device); save "
            "it to a file and give that"
        )
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise InputError(
            f"cannot read {path} as a video or sound file ({error}); give a file "
            "FFmpeg reads (MP4, MKV, AVI, WAV, ...)"
        ) from None


def _video_stream(container: Any, path: PathLike) -> Any:
    """The first video stream of ``container`` that is not an attached picture.

    FFmpeg lists a file's cover art (MP4's ``covr``, Matroska's image attachments, an
    MP3's or FLAC's embedded picture) as a video stream of one frame with the
    ``attached_pic`` disposition, after the other streams: a music file with a cover
    would be read as a one-frame video.

    Raises:
        InputError: no video stream, or only attached pictures.
    """
    av = require("av")
    attached = int(getattr(getattr(av.stream, "Disposition", None), "attached_pic", 1024))
    videos = container.streams.video
    for stream in videos:
        if not int(stream.disposition or 0) & attached:
            return stream
    if videos:
        raise InputError(
            f"{path} has no video stream, only a still picture (cover art); give a "
            "video file"
        )
    raise InputError(f"{path} has no video stream; give a video file")


def video_frame_rate(path: PathLike) -> Optional[Fraction]:
    """The frame rate of ``path``'s first video stream (cover art aside, see
    :func:`_video_stream`), or None if unknown."""
    container = _open_container(Path(path))
    with container:
        rate = _video_stream(container, path).average_rate
        return Fraction(rate) if rate else None


def video_frame_count(path: PathLike) -> int:
    """The number of frames the container declares for its first video stream (cover
    art aside, see :func:`_video_stream`; 0 when it does not say)."""
    container = _open_container(Path(path))
    with container:
        return int(_video_stream(container, path).frames or 0)


def estimated_frame_count(path: PathLike) -> int:
    """The number of frames of ``path``'s first video stream (cover art aside, see
    :func:`_video_stream`) for a progress bar: the count the container declares
    (:func:`video_frame_count`), or, where it declares none (Matroska, WebM,
    MPEG-TS), an estimate: the stream's duration times its average frame rate,
    rounded. The duration is the stream's own (MPEG-TS), else its ``DURATION`` tag
    (Matroska's and WebM's muxers write one), else the container's, which spans
    every stream (a longer sound track counts); 0 when none is known.

    Only an estimate: a variable frame rate, a sound track that outlasts the
    pictures or a damaged file puts it off, so it is for showing progress, never
    for checks or results (those count the frames decoded)."""
    av = require("av")
    container = _open_container(Path(path))
    with container:
        stream = _video_stream(container, path)
        if stream.frames:
            return int(stream.frames)
        rate = stream.average_rate or stream.guessed_rate
        seconds: Optional[float] = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = _duration_tag((stream.metadata or {}).get("DURATION"))
            if seconds is None and container.duration:
                seconds = container.duration / av.time_base  # in AV_TIME_BASE units
        if not seconds or not rate:
            return 0
        return max(int(round(seconds * float(rate))), 0)


def _duration_tag(value: Optional[str]) -> Optional[float]:
    """Seconds of a Matroska ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``); None if absent
    or not of that form."""
    try:
        hours, minutes, seconds = str(value).split(":")
        total = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
    return total if math.isfinite(total) else None  # float() takes "nan" and "inf"


def missing_frames_note(declared: int, decoded: int) -> Optional[str]:
    """A note where a video decoded to fewer frames than its container ``declared``
    (:func:`video_frame_count`; by two or more: an edit list may hide one): FFmpeg
    stops at the end of a truncated file without an error, so a third of a video could
    go missing silently. None where the count matches or the container declares none."""
    if declared - decoded < 2:
        return None
    return (
        f"{decoded} of the {declared} frames the video declares were decoded: the file "
        "may be truncated or damaged (the missing frames are not in the results)"
    )


def iter_video_frames(
    path: PathLike, max_frames: Optional[int] = None, checked: Optional["VideoCheck"] = None
) -> Iterator[np.ndarray]:
    """The frames of ``path``'s first video stream (cover art aside: a music file's
    picture is no video, see :func:`_video_stream`) in display order, each (H, W, 3)
    uint8 RGB (converted as the colab's OpenCV reader converts them, :func:`_rgb24`),
    at most ``max_frames``, turned upright by the stream's display rotation (a phone's
    portrait video is stored landscape with a rotation in its metadata), as OpenCV's
    reader (the colab's) and players show it (:func:`_upright`).

    checked: what :func:`check_video` found of this file (with the same
        ``max_frames``): the frames decoded now must be those it counted, the first
        of the size it saw, from a file not written to since (:func:`~.base.file_state`);
        if not, the file changed between the two reads, and :class:`InputError` says
        so, before the file is opened or as soon as the frames differ, rather than
        give the frames of another video than the one checked.

    Raises:
        InputError: unreadable file, no video stream (or only cover art), a decoding
            error, or (``checked``) a file that changed since it was checked.
    """
    av = require("av")
    path = Path(path)
    if checked is not None and rewritten_since(path, checked.state):
        raise modified_input_error(path)
    container = _open_container(path)
    with container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        count = 0
        try:
            for frame in container.decode(stream):
                if max_frames is not None and count >= max_frames:
                    break
                array = _upright(_rgb24(frame), frame)
                if checked is not None:
                    checked._compare(count, array.shape)
                yield array
                del array  # let go before the next frame is decoded
                count += 1
        except av.error.FFmpegError as error:
            raise InputError(f"{path}: the video cannot be decoded ({error})") from None
        if checked is not None and count != checked.frames:
            raise checked._changed(f"{count} frames", f"{checked.frames}")
        if count == 0:
            raise InputError(f"{path} has a video stream without frames")


@dataclass(frozen=True)
class VideoCheck:
    """What :func:`check_video` keeps of a video file, for its second read
    (:func:`iter_video_frames`'s ``checked``).

    Attributes:
        path: the file.
        frames: the number of frames decoded (at most the ``max_frames`` asked for).
        size: (height, width) of the first frame, upright.
        state: the file's :func:`~.base.file_state` before it was decoded.
    """

    path: Path
    frames: int
    size: Tuple[int, int]
    state: Optional[Tuple[int, int]]

    def _compare(self, index: int, shape: Tuple[int, ...]) -> None:
        """Raises :meth:`_changed` unless frame ``index`` (from 0) of the second read,
        of this ``shape``, fits what was checked: one frame more than were counted, or
        a first frame of another size, is another video."""
        if index >= self.frames:
            raise self._changed(f"at least {index + 1} frames", f"{self.frames}")
        if index == 0 and tuple(shape[:2]) != self.size:
            (h0, w0), (h1, w1) = self.size, shape[:2]
            raise self._changed(
                f"a first frame of {w1}x{h1} px (width x height)", f"{w0}x{h0} px"
            )

    def _changed(self, now: str, then: str) -> InputError:
        return InputError(
            f"{self.path} changed during the run: its video, decoded again for the work, "
            f"has {now}, not {then} as when it was checked (the file was written to or "
            "replaced); run again once nothing writes to it"
        )


def check_video(
    path: PathLike, max_frames: Optional[int] = None, *, one_size: bool = False
) -> VideoCheck:
    """Decodes the frames of ``path`` (:func:`iter_video_frames`'s, at most
    ``max_frames``) once, now, and keeps only their count and the first frame's
    size, one frame held at a time: a video that cannot be decoded partway through
    (a damaged packet) is named before any work on its frames, which are decoded a
    second time afterwards. Give the result to that second read
    (:func:`iter_video_frames`'s ``checked``): a file written to or replaced between
    the two reads then ends in :class:`InputError` rather than in an answer from
    another video than the one checked.

    one_size: every frame must have the first frame's size (flow's frame pairs): the
        first that has not is named (:func:`size_change_error`), and the decoding
        stops there, as the work on the frames would.

    Raises:
        InputError: :func:`iter_video_frames`'s (unreadable file, no video stream, no
            frames, a decoding error), or with ``one_size`` a change of size.
    """
    path = Path(path)
    state = file_state(path)  # before the decode: a write from now on is seen later
    count, size = 0, None
    frames = iter_video_frames(path, max_frames)
    try:
        # map lets each frame go once its shape is taken (a loop variable would hold
        # it while the next is decoded).
        for shape in map(np.shape, frames):
            if size is None:
                size = (int(shape[0]), int(shape[1]))
            elif one_size and tuple(shape[:2]) != size:
                raise size_change_error(path, count, size, shape)
            count += 1
    finally:
        # Now, not when the error's traceback (which holds this frame) goes.
        frames.close()
    assert size is not None  # iter_video_frames raises for a video without frames
    return VideoCheck(path, count, size, state)


def size_change_error(
    path: PathLike, index: int, before: Tuple[int, ...], after: Tuple[int, ...]
) -> InputError:
    """The :class:`InputError` of a video whose frame ``index`` (from 0) has the shape
    ``after`` (H, W, ...) where the frames before it had ``before``: flow needs frames
    of one size. A stream may switch resolution (broadcasts, screen recordings)."""
    (h0, w0), (h1, w1) = before[:2], after[:2]
    return InputError(
        f"{path} changes size at frame {index} (from 0): {w0}x{h0} px before, {w1}x{h1} "
        "px from there (width x height); flow needs frames of one size: give a copy "
        f"scaled to one size (ffmpeg -i IN -vf scale={w0}:{h0} OUT.mp4)"
    )


def _rgb24(frame: Any) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB, converted as the colab's reader
    (``cv2.VideoCapture`` of OpenCV 4; the colab's requirements pin 4.5.2) converts
    it: libswscale to BGR24 with bicubic filtering, then the channels swapped. PyAV's
    default (RGB24, bilinear) gives the same pixels for 8-bit video, but for 10-bit
    video (phones' HDR clips, HEVC, AV1, VP9 profile 2) it is up to 47 levels off, 2.5
    on average, biased darker in red and blue.

    That reader gives libswscale no colour details, so a YUV frame is read with its
    default BT.601 matrix and the range its pixel format implies (full for the yuvj
    and grey formats, limited for the others), whatever the stream's colour tags say.
    PyAV (18) follows the tags by default: a BT.709 clip (nearly every HD or phone
    video) was up to 30 levels off the colab's pixels, 5 on average, and a full-range
    yuv420p one (VP9, HEVC) up to 19. The tags are overridden accordingly."""
    fmt = frame.format
    if fmt.is_rgb or fmt.has_palette or getattr(fmt, "is_bayer", False):
        details = {}  # no matrix, no range: nothing for the tags to change
    else:
        full = fmt.name.startswith(("yuvj", "gray", "ya"))
        details = {"src_colorspace": "ITU601", "src_color_range": "JPEG" if full else "MPEG"}
    try:
        bgr = frame.to_ndarray(format="bgr24", interpolation="BICUBIC", **details)
    except TypeError:
        # An older PyAV without the colour-range argument: its own defaults.
        bgr = frame.to_ndarray(format="bgr24", interpolation="BICUBIC")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _upright(array: np.ndarray, frame: Any) -> np.ndarray:
    """A decoded frame turned by its display rotation (PyAV's ``VideoFrame.rotation``:
    degrees counter-clockwise, from the container's display matrix), as FFmpeg's
    autorotate and OpenCV's ``CAP_PROP_ORIENTATION_AUTO`` (on by default) do."""
    rotation = frame.rotation or 0  # PyAV >= 14 (the [media] extra asks for it)
    turns = int(round(float(rotation) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def read_audio(path: PathLike, sample_rate: int) -> Tuple[np.ndarray, int, int]:
    """The first channel of ``path``'s first sound track at ``sample_rate`` Hz, whole:
    :class:`SoundReader`'s pieces joined (it says how they are decoded and resampled).

    Returns (audio float32 (S,), source sample rate, source channel count).

    Raises:
        InputError: unreadable file or no sound track (the message names ``--audio``).
    """
    with SoundReader(path, sample_rate) as sound:
        pieces = list(sound)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return audio.astype(np.float32), sound.source_rate, sound.channels


class SoundReader:
    """The first channel of ``path``'s first sound track at ``sample_rate`` Hz, as
    float32 pieces (S_i,) in decoding order, so that a long sound need not be held
    whole (:func:`read_audio` joins them). The file is opened, and its sound track
    found, when the reader is made (:attr:`source_rate`, :attr:`channels`); it is
    decoded as the pieces are taken, once, and closed at the end or by :meth:`close`
    (``with SoundReader(...) as sound:``). :meth:`check` decodes the whole sound
    beforehand, keeping only its length, so that its decoding errors come before
    the work on its pieces. Of the pieces it has given, the reader holds only the
    last, until the next is taken.

    Decoded and, if needed, resampled with FFmpeg's libswresample (PyAV's
    ``AudioResampler``: windowed-sinc polyphase filter, FFmpeg's defaults), the
    resampler the colab's ``ffmpeg -ar 48000`` uses; every channel is resampled and
    the first one kept (the colab's ``audio[..., 0:1]``), never a down-mix. The
    samples are 16-bit, as in the WAV file the colab's command writes (rounded, and
    clipped to [-1, 32767/32768]), read as the colab does: x / 32768.

    The samples are those the colab's ``ffmpeg`` (a Colab system package, 3.4 or 4.x)
    decodes, as every FFmpeg up to 8 does: an encoder's priming at the start is
    dropped (MP4 edit lists, Opus pre-skip, MP3 gapless headers), and so is the end
    padding that Matroska/WebM (Opus) and MP3 headers mark; the end padding of AAC in
    MP4/MOV (up to 1023 samples at the source rate) is kept. FFmpeg 9, which PyAV 19
    bundles, drops that too (its MP4 demuxer marks it): the mark is taken off
    (:func:`_colab_packets`), so the sound is the same whichever FFmpeg PyAV bundles.

    A sound of at most one second (at its own rate) comes as one piece at its end: it
    may be too short for the resampler and be resampled again (:meth:`_pieces`).

    Raises:
        InputError: unreadable file or no sound track (the message names ``--audio``)
            when made; an empty sound track or a decoding error while the pieces are
            taken (or by :meth:`check`), or, after :meth:`check` (or :meth:`expect`),
            pieces that do not add up to the length it found.
    """

    def __init__(self, path: PathLike, sample_rate: int) -> None:
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self._container = _open_container(self.path)
        try:
            if not self._container.streams.audio:
                raise InputError(
                    f"{self.path} has no sound track; give the sound as a WAV file with "
                    "--audio (audio= in Python)"
                )
            stream = self._container.streams.audio[0]
            #: The track's own sample rate (Hz) and channel count.
            self.source_rate = int(stream.rate or stream.codec_context.sample_rate)
            self.channels = int(stream.codec_context.channels)
        except BaseException:
            self._container.close()
            raise
        self._checked_length: Optional[int] = None  # check()'s
        self._iterator = self._counted(self._pieces(stream))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._iterator

    def check(self) -> int:
        """Decodes the whole sound once, now, in a reader of its own, and keeps only
        its length, one piece held at a time: a sound that cannot be decoded partway
        through is named before any work on this reader's pieces, which are taken
        afterwards (decoded a second time). Those pieces must then add up to that
        length; if not (the file was written to or replaced between the two reads),
        they end with :class:`InputError` rather than give another sound than the
        one checked. Returns the length (samples at :attr:`sample_rate`).

        Raises:
            InputError: an empty sound track or a decoding error.
        """
        with SoundReader(self.path, self.sample_rate) as again:
            length = sum(map(len, again))  # each piece let go once counted
        self.expect(length)
        return length

    def expect(self, length: int) -> None:
        """As :meth:`check`, with the ``length`` an earlier :meth:`check` of this file
        found in another reader (``run autoencode`` checks every video's sound before
        the first clip of the first video): the pieces must add up to it, without
        decoding the sound again now."""
        self._checked_length = int(length)

    def _counted(self, pieces: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """``pieces`` as they come, ended by :class:`InputError` as soon as they are
        more, or at their end fewer, samples than :meth:`check` found (or
        :meth:`expect` was told)."""
        given = 0
        try:
            for piece in pieces:
                given += len(piece)
                if self._checked_length is not None and given > self._checked_length:
                    raise self._changed(f"at least {given}")
                yield piece
        finally:
            pieces.close()
        if self._checked_length is not None and given != self._checked_length:
            raise self._changed(str(given))

    def _changed(self, samples: str) -> InputError:
        return InputError(
            f"{self.path} changed during the run: its sound, decoded again for the work, "
            f"has {samples} samples at {self.sample_rate} Hz, not {self._checked_length} "
            "as when it was checked (the file was written to or replaced); run again "
            "once nothing writes to it"
        )

    def close(self) -> None:
        """Stops decoding and closes the file (the pieces end)."""
        self._iterator.close()
        self._container.close()

    def __enter__(self) -> "SoundReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pieces(self, stream: Any) -> Iterator[np.ndarray]:
        av = require("av")
        path, container, rate = self.path, self._container, self.sample_rate
        source_rate = self.source_rate
        with container:
            # 16-bit samples, as the colab's command writes them: its `ffmpeg ... -c copy
            # -f wav -map 0:a pcm_f32le -ar 48000 output.wav` takes pcm_f32le for a file
            # name, so output.wav gets the WAV default, 16-bit PCM (hence the colab's
            # int16 branch); louder-than-full-scale samples are clipped there. The layout
            # stays the source's so that channel 0 is kept as is.
            resampler = av.AudioResampler(format="s16p", rate=rate)
            # The first second of channel 0 at the source rate, for a sound too short
            # for the resampler (below); the format only: no delay.
            to_float = av.AudioResampler(format="fltp")
            head: List[np.ndarray] = []
            # Pieces held back while the sound is at most a second long: such a sound
            # may be resampled again at its end, replacing them.
            held: List[np.ndarray] = []
            decoded = 0  # source samples
            try:
                frames = (f for p in _colab_packets(container, stream) for f in p.decode())
                for frame in frames:
                    decoded += frame.samples
                    frame.pts = None  # let the resampler count samples itself
                    pieces = [_from_int16(out.to_ndarray()[0]) for out in resampler.resample(frame)]
                    if decoded <= source_rate:
                        head.extend(out.to_ndarray()[0] for out in to_float.resample(frame))
                        held.extend(pieces)
                        continue
                    # Longer than a second: these samples are final, and the first
                    # second is not needed again. Each piece is let go as it is given
                    # (popped), so that the caller alone says how many are held.
                    head = []
                    held.extend(pieces)
                    del pieces
                    while held:
                        yield held.pop(0)
                tail = [_from_int16(out.to_ndarray()[0]) for out in resampler.resample(None)]
                head.extend(out.to_ndarray()[0] for out in to_float.resample(None))
            except av.error.FFmpegError as error:
                raise InputError(f"{path}: the sound cannot be decoded ({error})") from None
        if decoded == 0:
            raise InputError(f"{path} has an empty sound track")
        if decoded > source_rate:
            yield from tail
            return
        audio = np.concatenate(held + tail) if held or tail else np.zeros(0, np.float32)
        # libswresample holds back about one filter length of samples, and its flush
        # does not return them when the sound is shorter than that (0.01 s at 48 kHz to
        # 1600 Hz gives no sample at all; longer sounds give at least floor(S * rate /
        # source)). A short sound is resampled again followed by silence: its own samples
        # come out, at least one, and the caller pads the rest with silence as for any
        # short track. (A filter is far shorter than a second, so such a sound is all in
        # ``head``.)
        wanted = max(1, decoded * rate // source_rate)
        if len(audio) < wanted:
            audio = _resample_padded(np.concatenate(head), source_rate, rate)[:wanted]
        yield audio.astype(np.float32)


def _colab_packets(container: Any, stream: Any) -> Iterator[Any]:
    """``container.demux(stream)`` with the end trimming that FFmpeg 9's MP4/MOV
    demuxer adds taken off, so that a sound decodes to the samples of the colab's
    FFmpeg and of every FFmpeg up to 8 (checked: 4.4, 5.1 and PyAV 18's 8.x).

    FFmpeg 9 marks the part of an MP4 track's last packet that lies past its edit
    list (the AAC encoder's end padding: FFmpeg's encoder leaves 768 samples after a
    1.2 s, 48 kHz track) as
    discard padding (the second field of the packet's skip-samples side data), and
    the decoder drops it; the FFmpegs before it had no such mark for MP4 and kept
    those samples. The start skip (the priming the edit list skips) is left as it is,
    and so is every other container's end padding (Matroska's DiscardPadding, MP3
    gapless headers), which every FFmpeg has trimmed."""
    packets = container.demux(stream)
    names = str(getattr(container.format, "name", "") or "").split(",")
    if "mov" not in names:
        yield from packets
        return
    for packet in packets:
        # A PyAV without packet side data is an older release, with an older FFmpeg.
        has = getattr(packet, "has_sidedata", None)
        if packet.size and has is not None and has("skip_samples"):
            side = packet.get_sidedata("skip_samples")
            data = bytes(side)
            # skip at the start (u32le), discard at the end (u32le), two reasons (u8)
            if len(data) >= 8 and struct.unpack_from("<I", data, 4)[0]:
                side.update(data[:4] + bytes(4) + data[8:])
                packet.set_sidedata(side)
        yield packet


def _from_int16(samples: np.ndarray) -> np.ndarray:
    """16-bit samples as the colab reads its WAV file's: float32 x / 32768."""
    return samples.astype(np.float32) / 32768


def _resample_padded(channel: np.ndarray, source_rate: int, sample_rate: int) -> np.ndarray:
    """``channel`` (float, at ``source_rate``) followed by a second of silence, at
    ``sample_rate`` in 16 bits (the same resampler as :func:`read_audio`; channels are
    resampled independently, so resampling the first alone gives the same samples)."""
    av = require("av")
    padded = np.concatenate([channel, np.zeros(source_rate, np.float32)])
    frame = av.AudioFrame.from_ndarray(
        padded.astype(np.float32)[None], format="fltp", layout="mono"
    )
    frame.sample_rate = source_rate
    resampler = av.AudioResampler(format="s16p", rate=sample_rate)
    pieces = [out.to_ndarray()[0] for out in resampler.resample(frame)]
    pieces += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return _from_int16(np.concatenate(pieces))


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """A mono IEEE-float WAV file (format tag 3, 32-bit little-endian samples), as the
    colab's ``scipy.io.wavfile.write`` of float32 sound; values are stored unclipped.

    audio: (S,) float.
    """
    data = np.ascontiguousarray(np.asarray(audio, dtype="<f4").reshape(-1)).tobytes()
    return wav_header(len(data) // 4, sample_rate) + data


def wav_header(samples: int, sample_rate: int) -> bytes:
    """The bytes of :func:`encode_wav`'s file before its samples, for ``samples``
    float32 samples: a WAV written piece by piece gets this header, then the samples
    as little-endian float32 (``"<f4"``)."""
    channels, bits = 1, 32
    block = channels * bits // 8
    fmt = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, 3, channels, int(sample_rate),
        int(sample_rate) * block, block, bits,
    )
    size = int(samples) * block
    # Non-PCM formats carry a "fact" chunk with the number of samples per channel.
    fact = struct.pack("<4sII", b"fact", 4, int(samples))
    body = b"WAVE" + fmt + fact + struct.pack("<4sI", b"data", size)
    return struct.pack("<4sI", b"RIFF", len(body) + size) + body


def _even(frame: np.ndarray) -> np.ndarray:
    # H.264 in yuv420p needs even sizes: repeat the last row/column when odd.
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frame


def _video_frames(frames: Any) -> Tuple[Tuple[int, int], Iterator[np.ndarray]]:
    """``(height, width)`` and an iterator over the (H, W, 3) uint8 frames of
    :func:`write_video`'s ``frames``: an array (T, H, W, 3) or a list of frames as
    before, or any other iterable (a generator), whose frames are taken one at a time
    as they are encoded. Raises ValueError for no frame or one of another shape."""
    if isinstance(frames, (np.ndarray, list, tuple)):
        array = np.asarray(frames, dtype=np.uint8)
        if array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
            raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got {array.shape}")
        return array.shape[1:3], iter(array)
    stream = iter(frames)
    first = next(stream, None)
    if first is None:
        raise ValueError("frames must hold at least one frame, got none")
    first = np.asarray(first, dtype=np.uint8)
    if first.ndim != 3 or first.shape[-1] != 3:
        raise ValueError(f"each frame must be (H, W, 3), got {first.shape}")

    def checked(frame: np.ndarray, shape: Tuple[int, ...]) -> Iterator[np.ndarray]:
        yield frame  # then no longer held: only the frame being encoded is
        for frame in stream:
            frame = np.asarray(frame, dtype=np.uint8)
            if frame.shape != shape:
                raise ValueError(f"the frames must be of one size: {shape}, then {frame.shape}")
            yield frame

    shape = first.shape
    return shape[:2], checked(first, shape)


def write_video(
    path: PathLike,
    frames: Any,
    fps: float,
    audio: Optional[np.ndarray] = None,
    sample_rate: Optional[int] = None,
) -> None:
    """Writes frames (T, H, W, 3) uint8 RGB as a video chosen by ``path``'s suffix
    (the run tasks take :data:`WRITTEN_VIDEO_SUFFIXES`):
    ``.gif`` (Pillow, adaptive palette per frame, no sound) or any other (``.mp4``):
    H.264 (libx264, yuv420p, crf 18; an odd height or width gets its last row or
    column repeated) with ``audio`` (S,) float at ``sample_rate`` muxed as AAC
    (resampled to 48 kHz when AAC cannot take the rate; NaN or infinite samples,
    which the AAC encoder refuses, are silence).

    ``frames`` may also be any iterable of (H, W, 3) frames (a generator): H.264
    encodes each as it comes, so that a long video's pictures need not all be in
    memory (a GIF is made whole: Pillow holds every picture). :class:`VideoWriter`
    takes the sound in pieces too.
    """
    path = Path(path)
    _, frames = _video_frames(frames)
    gif = path.suffix.lower() == ".gif"
    if audio is not None and sample_rate is None and not gif:
        raise ValueError("sample_rate is needed with audio")
    with VideoWriter(path, fps, None if audio is None else sample_rate) as writer:
        writer.add_frames(frames)
        # The whole picture track before the sound, as this function always wrote it
        # (the muxer interleaves them by time either way).
        writer._end_frames()
        if audio is not None:
            writer.add_sound(audio)


class VideoWriter:
    """:func:`write_video` in pieces: frames and sound added as they come, so that
    neither need be all in memory (``run autoencode`` adds each clip's reconstruction
    as it is computed). ``with VideoWriter(path, fps, sample_rate) as video:
    video.add_frames(frames); video.add_sound(samples); ...``: the file is finished
    when the block ends (encoders flushed, container closed); a block that fails
    leaves it unfinished, for the caller to remove. As a file object's, :meth:`close`
    may be called more than once (the block's end after it too): only the first
    finishes the file, and nothing can be added after it (ValueError).

    The format, codecs and settings are :func:`write_video`'s (H.264 with AAC sound;
    ``.gif``: Pillow, no sound, made whole at the end: Pillow holds every picture),
    and so are the decoded frames and samples, however the frames and the sound are
    cut into pieces: the encoders and the resampler take a continuous stream (the
    sound's timestamps run on from piece to piece). Only the order of the packets in
    the file may differ (they are interleaved as they come).

    Args:
        path: the file; its suffix chooses the format.
        fps: the frame rate.
        sample_rate: that of the sound given to :meth:`add_sound`; None: no sound
            track (:meth:`add_sound` is then an error, except for a GIF, which has
            none and ignores the sound).

    Attributes:
        closed: whether :meth:`close` has been called (or a ``with`` block has ended).
    """

    def __init__(self, path: PathLike, fps: float, sample_rate: Optional[int] = None) -> None:
        self.path = Path(path)
        self.fps = fps
        self.sample_rate = None if sample_rate is None else int(sample_rate)
        self._gif = self.path.suffix.lower() == ".gif"
        require("PIL.Image" if self._gif else "av")
        self._shape: Optional[Tuple[int, ...]] = None  # the first frame's
        self._pictures: List[Any] = []  # a GIF's, saved at the end
        self._container: Any = None  # opened at the first frame, which gives the size
        self._video: Any = None
        self._sound: Any = None
        self._resampler: Any = None
        self._early_sound: List[np.ndarray] = []  # sound added before the first frame
        self._sound_samples = 0  # samples encoded: the next piece's timestamp
        self._frames_ended = False
        self._write_error: Optional[BaseException] = None  # see _mux
        self.closed = False

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.close()  # nothing more after an explicit close()
        elif not self.closed:
            self.closed = True
            if self._container is not None:
                # Unfinished: the error is the news; a failure to close would hide it.
                with contextlib.suppress(Exception):
                    self._container.close()

    def add_frames(self, frames: Any) -> None:
        """Encodes each (H, W, 3) uint8 RGB frame of the iterable ``frames`` (all of one
        size). Raises ValueError for a frame of another shape."""
        for frame in frames:
            self.add_frame(frame)

    def add_frame(self, frame: np.ndarray) -> None:
        """Encodes one (H, W, 3) uint8 RGB frame (see :meth:`add_frames`)."""
        self._refuse_closed("frame")
        if self._frames_ended:
            raise ValueError("no frame can follow the end of the frames")
        frame = np.asarray(frame, dtype=np.uint8)
        if self._shape is None:
            if frame.ndim != 3 or frame.shape[-1] != 3:
                raise ValueError(f"each frame must be (H, W, 3), got {frame.shape}")
            self._shape = frame.shape
            if not self._gif:
                self._open(frame.shape[0], frame.shape[1])
        elif frame.shape != self._shape:
            raise ValueError(f"the frames must be of one size: {self._shape}, then {frame.shape}")
        if self._gif:
            self._pictures.append(require("PIL.Image").fromarray(frame))
            return
        av = require("av")
        self._mux(self._video.encode(av.VideoFrame.from_ndarray(_even(frame), format="rgb24")))

    def add_sound(self, samples: np.ndarray) -> None:
        """Encodes the next sound samples (S,) float at :attr:`sample_rate`, after those
        added before (NaN or infinite samples are silence, see :func:`write_video`)."""
        self._refuse_closed("sound")
        if self.sample_rate is None:
            if self._gif:
                return
            raise ValueError("this video has no sound track: give sample_rate")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._container is None and not self._gif:
            self._early_sound.append(samples.copy())  # the streams need the frame size
            return
        if not self._gif:
            self._encode_sound(samples)

    def close(self) -> None:
        """Flushes the encoders and finishes the file (a GIF: saves it); a second
        call does nothing, as a file's. A close that fails (a full disk) leaves the
        writer closed all the same, its file unfinished. (Where the file's very first
        write, its header, failed, PyAV keeps its descriptor of the file until the
        process ends: it lets go only of a file whose header it wrote.)

        Raises:
            ValueError: no frame was added (the writer stays open for one).
            OSError (or PyAV's error): a write of :meth:`add_frame` or :meth:`add_sound`
                failed before (its error again; the file is unfinished).
        """
        if self.closed:
            # Not again: the flushed encoders refuse a second flush (PyAV's EOFError),
            # and a GIF's pictures, given to the first save, are gone.
            return
        if self._shape is None:
            raise ValueError("frames must hold at least one frame, got none")
        self.closed = True
        if self._gif:
            # GIF delays are in hundredths of a second (Pillow takes milliseconds).
            duration = max(int(round(1000.0 / self.fps / 10.0)) * 10, 10)
            first, *rest = self._pictures
            self._pictures = []
            first.save(
                self.path, format="GIF", save_all=True, append_images=rest,
                duration=duration, loop=0,
            )
            return
        try:
            self._end_frames()
            if self._sound is not None:
                if self._resampler is not None:
                    for piece in self._resampler.resample(None):
                        self._mux(self._sound.encode(piece))
                self._mux(self._sound.encode(None))
            self._container.close()
        except BaseException:
            # Closed all the same, so nothing else would let the file go (the block's
            # end after this close() neither); the error is the news.
            with contextlib.suppress(Exception):
                self._container.close()
            raise

    def _refuse_closed(self, what: str) -> None:
        if self.closed:
            # A GIF's pictures were kept, silently, for no file.
            raise ValueError(f"no {what} can be added to a closed VideoWriter ({self.path})")

    def _open(self, height: int, width: int) -> None:
        av = require("av")
        rate = Fraction(self.fps).limit_denominator(1001)
        self._container = av.open(str(self.path), mode="w")
        video = self._container.add_stream("libx264", rate=rate)
        video.width, video.height = width + width % 2, height + height % 2  # _even's
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "18"}
        self._video = video
        if self.sample_rate is not None:
            out_rate = self.sample_rate if self.sample_rate in _AAC_RATES else 48000
            self._sound = self._container.add_stream("aac", rate=out_rate, layout="mono")
            if out_rate != self.sample_rate:
                self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=out_rate)
        early, self._early_sound = self._early_sound, []
        for samples in early:
            self._encode_sound(samples)

    def _end_frames(self) -> None:
        """No more frames: the picture encoder's delayed packets are written."""
        if self._frames_ended or self._gif or self._video is None:
            return
        self._frames_ended = True
        self._mux(self._video.encode(None))

    def _encode_sound(self, samples: np.ndarray) -> None:
        av = require("av")
        if not len(samples):
            return
        samples = np.where(np.isfinite(samples), samples, np.float32(0))[None]
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples), format="fltp", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        # A first timestamp of 0 lets the AAC encoder mark its 1024 priming samples
        # (negative pts, an edit list in MP4) so that decoders drop them and the sound
        # stays in sync; without it the sound starts 1024 samples late. The next pieces
        # follow on, one stream for the resampler and the encoder.
        frame.pts = self._sound_samples
        frame.time_base = Fraction(1, self.sample_rate)
        self._sound_samples += samples.shape[1]
        pieces = [frame] if self._resampler is None else self._resampler.resample(frame)
        for piece in pieces:
            self._mux(self._sound.encode(piece))

    def _mux(self, packets: Any) -> None:
        """Writes ``packets``; after a write that failed (a full disk), raises its error
        again and writes nothing: PyAV writes the header before the first packet, and
        writing one after a header that failed crashed the process (a segmentation
        fault: close() after a failed add_sound, or a frame added after it)."""
        if self._write_error is not None:
            raise self._write_error
        try:
            for packet in packets:
                self._container.mux(packet)
        except Exception as error:
            self._write_error = error
            raise
