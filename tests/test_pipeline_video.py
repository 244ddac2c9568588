"""The autoencode pipeline: the colab's crop and resize, the sound's resampling and
framing, PSNR, and ``perceiver-convert run autoencode`` on videos the tests make."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

import perceiver_torch as pt
from perceiver_torch.labels import kinetics700_labels
from perceiver_torch.pipelines.base import InputError, PipelineError, softmax_top_k
from perceiver_torch.pipelines.media import encode_wav, read_audio
from perceiver_torch.pipelines.video import (
    AutoencodePipeline,
    crop_center_square,
    make_test_video,
    preprocess_frame,
    psnr,
)

from helpers import (
    act_at_read,
    alive_counts,
    damage_sound_midway,
    damage_video_midway,
    fail_on_call,
    full_disk_temporary_files,
    run_cli,
    track_alive,
)

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

TINY = pt.TINY_CONFIGS["video_autoencoding"]  # 2 frames of 16x16, 64 samples per frame


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return pt.build("video_autoencoding", TINY).eval()


def write_pcm_wav(path: Path, channels: np.ndarray, rate: int) -> None:
    """channels (C, S) int16 -> a PCM WAV (stdlib writer, independent of the code)."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels.shape[0])
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.ascontiguousarray(channels.T.astype("<i2")).tobytes())


# -- frames --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, box",
    [
        # (H, W) -> (top, left, side), from the colab's (n // 2) - (side // 2).
        ((48, 64), (0, 8, 48)),
        ((48, 65), (0, 8, 48)),  # ((65 - 48) + 1) // 2 would give 9: the colab's is 8
        ((65, 48), (8, 0, 48)),
        ((49, 64), (0, 8, 49)),
        ((30, 30), (0, 0, 30)),
    ],
)
def test_crop_center_square(shape, box):
    frame = np.arange(shape[0] * shape[1] * 3, dtype=np.int64).reshape(*shape, 3)
    top, left, side = box
    assert np.array_equal(crop_center_square(frame), frame[top : top + side, left : left + side])


def test_resize_is_opencv_bilinear():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    square = frame[:, 16:64]
    # Scale 3: OpenCV's INTER_LINEAR samples at (i + 0.5) * 3 - 0.5 = 3i + 1, whole
    # pixels, so the result is exactly every third pixel from the second.
    got = preprocess_frame(frame, (16, 16))
    assert got.dtype == np.float32
    assert np.array_equal(got, (square[1::3, 1::3].astype(np.float64) / 255).astype(np.float32))
    # A non-integer scale (48 -> 20): float bilinear with half-pixel centres, clamped at
    # the border, rounded; OpenCV's 11-bit fixed-point weights stay within 1 level.
    got = np.round(preprocess_frame(frame, (20, 20)).astype(np.float64) * 255)
    src = (np.arange(20) + 0.5) * 48 / 20 - 0.5
    src = np.clip(src, 0, 47)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, 47)
    f = src - i0
    s = square.astype(np.float64)
    rows = s[i0] * (1 - f)[:, None, None] + s[i1] * f[:, None, None]
    expected = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i1] * f[None, :, None]
    assert np.abs(got - expected).max() <= 1.0


# -- sound ---------------------------------------------------------------------------


def test_first_channel_without_resampling_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    channels = rng.integers(-32768, 32768, (2, 3000)).astype(np.int16)
    write_pcm_wav(tmp_path / "s.wav", channels, 1600)
    samples, rate, count = read_audio(tmp_path / "s.wav", 1600)
    assert (rate, count) == (1600, 2)
    # int16 / 2**15, as the colab; channel 0, not a mix of both.
    assert np.array_equal(samples, channels[0].astype(np.float32) / 2**15)


def test_resampling_matches_the_continuous_signal(tmp_path):
    # Two tones well inside both bands, sampled at 44.1 kHz, resampled to 48 kHz,
    # compared with the same tones sampled directly at 48 kHz.
    n = 44100 // 2
    t = np.arange(n) / 44100
    tones = lambda t: 0.5 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 3000 * t)  # noqa: E731
    second = np.round(0.3 * np.sin(2 * np.pi * 97 * t) * 32767)
    write_pcm_wav(tmp_path / "s.wav", np.stack([np.round(tones(t) * 32767), second]), 44100)
    samples, rate, _ = read_audio(tmp_path / "s.wav", 48000)
    assert rate == 44100
    # Length: the same duration at the new rate (within a sample of rounding).
    assert abs(len(samples) - n * 48000 / 44100) <= 1
    expected = tones(np.arange(len(samples)) / 48000)
    # Bound: int16 quantisation (3e-5) plus the resampler's passband ripple and
    # aliasing at 3 kHz (FFmpeg's Kaiser-windowed sinc, far below 1e-3 of full scale);
    # away from the first and last 100 samples, where the filter sees the zero padding.
    # A wrong rate, delay of one sample or the second channel gives errors above 0.1.
    assert np.abs(samples[100:-100] - expected[100:-100]).max() < 1e-3


@pytest.mark.parametrize("samples, rate, expected", [(480, 1600, 16), (700, 1600, 23),
                                                    (1, 1600, 1), (38, 8000, 6)])
def test_a_sound_shorter_than_the_resampling_filter(tmp_path, samples, rate, expected):
    # libswresample's flush returns nothing (or too little) for a sound shorter than its
    # filter: 0.01 s at 48 kHz to 1600 Hz gave no sample ("empty sound track"). The
    # samples come out, at least one; the sound's start is the plain resampling's.
    t = np.arange(3000) / 48000
    tone = np.round(0.5 * np.sin(2 * np.pi * 50 * t) * 32767)
    write_pcm_wav(tmp_path / "short.wav", tone[None, :samples], 48000)
    short, source_rate, _ = read_audio(tmp_path / "short.wav", rate)
    assert source_rate == 48000 and short.dtype == np.float32 and len(short) == expected
    assert np.array_equal(short * 32768, np.round(short * 32768))  # 16-bit, as the rest
    write_pcm_wav(tmp_path / "long.wav", tone[None], 48000)
    long, _, _ = read_audio(tmp_path / "long.wav", rate)
    # The sound itself, not silence: its first half is the longer sound's resampling
    # (up to the filter's reach of the zeros after the short one, well under 1%).
    half = expected // 2
    assert np.abs(short[:half] - long[:half]).max(initial=0) < 5e-3
    assert expected == 1 or np.abs(short).max() > 0.01


def test_a_video_cut_short_is_noted(tmp_path, model):
    """Fewer frames decoded than the container declares (a truncated file, which
    FFmpeg decodes to its end without an error): a note, where the run went on
    silently with a third of the video missing; a whole video gets none."""
    from helpers import truncated_video
    from perceiver_torch.pipelines.media import iter_video_frames

    cut = truncated_video(tmp_path)
    decoded = sum(1 for _ in iter_video_frames(cut))
    sound = np.zeros(30 * 64, np.float32)
    result = AutoencodePipeline(model)(cut, sound)
    assert f"{decoded} of the 30 frames the video declares were decoded" in " ".join(
        result.notes)
    make_test_video(tmp_path / "whole.mp4", 4, size=(24, 40), sample_rate=None)
    whole = AutoencodePipeline(model)(tmp_path / "whole.mp4", sound[: 4 * 64])
    assert not any("declares" in note for note in whole.notes)


def test_framing_and_clips(tmp_path, model, monkeypatch):
    # 5 frames at 1600 Hz (64 samples per frame): 2 clips of 2 frames, 1 frame dropped.
    video, _ = make_test_video(tmp_path / "v.mp4", 5, size=(24, 40), sample_rate=None)
    # 2 clips need 4 x 64 samples: the WAV is 10 short (padded with silence).
    ramp = ((np.arange(4 * 64 - 10) % 2000) - 1000).astype(np.int16)
    write_pcm_wav(tmp_path / "s.wav", ramp[None], 1600)
    pipeline = AutoencodePipeline(model)
    assert pipeline.sample_rate == 1600 and pipeline.samples_per_frame == 64
    seen: List[Dict[str, Any]] = []
    original = model.reconstruct

    def spy(images, audio, num_chunks=128, label=None):
        seen.append({"images": images.clone(), "audio": audio.clone(), "chunks": num_chunks})
        return original(images, audio, num_chunks=num_chunks)

    monkeypatch.setattr(model, "reconstruct", spy)
    result = pipeline(tmp_path / "v.mp4", tmp_path / "s.wav")
    assert len(seen) == 2 and result.dropped_frames == 1
    assert [c["chunks"] for c in seen] == [TINY.num_chunks] * 2
    # Frames: decoded from the file, then the colab's crop and resize, in order.
    with av.open(str(tmp_path / "v.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    sound = np.concatenate([ramp.astype(np.float32) / 2**15, np.zeros(10, np.float32)])
    for c, call in enumerate(seen):
        assert call["images"].shape == (1, 2, 3, 16, 16)
        expected = np.stack([
            cv2.resize(np.ascontiguousarray(f[:, 8:32]), (16, 16)) / 255.0
            for f in decoded[2 * c : 2 * c + 2]
        ]).astype(np.float32)
        assert np.array_equal(call["images"][0].permute(0, 2, 3, 1).numpy(), expected)
        # Sound: 2 x 64 consecutive samples per clip; the last 10 are the padding.
        assert call["audio"].shape == (1, 128, 1)
        assert np.array_equal(call["audio"][0, :, 0].numpy(), sound[128 * c : 128 * (c + 1)])
    assert result.padded_samples == 10
    assert result.frames.shape == (4, 16, 16, 3) and result.audio.shape == (256,)
    assert any("dropped" in note for note in result.notes)


def test_result_as_dict_is_a_json_summary(model):
    # AutoencodeResult had no as_dict (ClipResult and the other tasks' results do);
    # run --json built the same fields by hand.
    frames = np.random.default_rng(1).integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    result = AutoencodePipeline(model, top_k=2)(frames, np.zeros(5 * 64, np.float32))
    document = result.as_dict()
    assert json.loads(json.dumps(document, allow_nan=False)) == document  # no arrays
    assert document == {
        "clips": [clip.as_dict() for clip in result.clips],
        "frames": 4,
        "size": [16, 16],
        "dropped_frames": 1,
        "padded_samples": 0,
        "sample_rate": 1600,
        "fps": 25,
        "notes": result.notes,
    }
    assert [c["frames"] for c in document["clips"]] == [[0, 2], [2, 4]]
    assert all(len(c["top_k"]) == 2 for c in document["clips"])
    assert any("dropped" in note for note in document["notes"])


def test_official_rate_and_labels():
    # A pipeline needs a model with weights, and a full-size one is large: the official
    # config's numbers, then a tiny model with its sound framing and classes.
    official = pt.VideoAutoencodingConfig()
    assert (official.audio_samples_per_frame, official.num_frames) == (1920, 16)
    assert official.image_size == (224, 224) and official.num_chunks == 128
    config = dataclasses.replace(TINY, audio_samples_per_frame=1920, num_classes=700)
    pipeline = AutoencodePipeline(pt.build("video_autoencoding", config))
    # 48000 // 25 = 1920 samples per frame, as the colab.
    assert (pipeline.sample_rate, pipeline.samples_per_frame) == (48000, 1920)
    assert (pipeline.num_frames, pipeline.size) == (2, (16, 16))
    assert pipeline.num_chunks == TINY.num_chunks
    assert pipeline.labels == list(kinetics700_labels())
    small = AutoencodePipeline(pt.build("video_autoencoding", dataclasses.replace(TINY)))
    assert small.labels[3] == "class 3"  # 10 random classes: no names


def test_psnr():
    reference = np.full((2, 4, 4, 3), 0.5)
    assert psnr(reference, reference) == float("inf")
    assert psnr(reference + 0.1, reference) == pytest.approx(20.0)  # MSE 0.01
    # The reconstruction is clipped to [0, 1] first (as the colab shows it).
    assert psnr(np.full_like(reference, 3.0), reference) == pytest.approx(10 * np.log10(4))


def test_too_few_frames(model):
    frames = np.zeros((1, 20, 20, 3), np.uint8)
    with pytest.raises(InputError, match="clips of 2 frames"):
        AutoencodePipeline(model)(frames, np.zeros(64, np.float32))


def test_no_frames_and_empty_frames_are_named_as_such(model):
    # An empty list was "must be uint8 (T, H, W, 3) RGB, got float64 (0,)" where an
    # empty array says the video has 0 frames; frames of width 0 were cv2.error.
    pipeline = AutoencodePipeline(model)
    sound = np.zeros(128, np.float32)
    for no_frames in (np.zeros((0, 16, 16, 3), np.uint8), [], (), iter([])):
        with pytest.raises(InputError, match=r"the video has 0 frame\(s\)"):
            pipeline(no_frames, sound)
    for empty in (np.zeros((2, 16, 0, 3), np.uint8), [np.zeros((0, 16, 3), np.uint8)] * 2):
        with pytest.raises(InputError, match=r"the video frames are empty \(\d+x\d+ px"):
            pipeline(empty, sound)


@pytest.mark.parametrize("num_chunks", [16, 9, 0, -1])
def test_num_chunks_is_checked_at_construction(model, num_chunks):
    # The tiny clip has 8 audio patches: 16 failed only at the call, after decoding
    # the video; 0 quietly meant the default.
    message = f"num_chunks must be an integer from 1 to 8 .*got {num_chunks}"
    with pytest.raises(PipelineError, match=message) as info:
        AutoencodePipeline(model, num_chunks=num_chunks)
    assert info.value.exit_code == 2


def test_num_chunks_none_is_the_default(model):
    assert AutoencodePipeline(model).num_chunks == TINY.num_chunks
    assert AutoencodePipeline(model, num_chunks=None).num_chunks == TINY.num_chunks
    assert AutoencodePipeline(model, num_chunks=np.int64(8)).num_chunks == 8


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one_is_refused(model, top_k):
    # -1 was torch's "selected index k out of range", after the first clip's model run.
    with pytest.raises(PipelineError, match=f"top_k must be .* at least 1, got {top_k}") as info:
        AutoencodePipeline(model, top_k=top_k)
    assert info.value.exit_code == 2
    # Above the classes: all of them (10 in the tiny model), as before.
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    result = AutoencodePipeline(model, top_k=50)(frames, np.zeros(128, np.float32))
    assert len(result.clips[0].top_k) == TINY.num_classes


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_sound_is_refused(model, value):
    # It gave NaN frames, labels and PSNR without a word.
    sound = np.zeros(128, np.float32)
    sound[5] = value
    with pytest.raises(InputError, match=r"1 NaN or infinite sample\(s\), the first at sample 5"):
        AutoencodePipeline(model)(np.zeros((2, 16, 16, 3), np.uint8), sound)


def test_integer_sound_is_pcm_scaled_to_plus_minus_one(model):
    # int16 sound reached the model unscaled (up to 32767); now as a WAV reader scales it.
    pipeline = AutoencodePipeline(model)
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    pcm = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
    assert np.array_equal(
        pipeline.load_audio(frames, pcm, []), pcm.astype(np.float32) / 32768
    )
    assert np.array_equal(  # (S, channels): the first channel
        pipeline.load_audio(frames, np.stack([pcm, -pcm], 1), []), pcm / np.float32(32768)
    )
    wide = np.array([-(2**31), 2**30, 2**31 - 1], np.int32)
    assert np.array_equal(
        pipeline.load_audio(frames, wide, []), np.array([-1.0, 0.5, 1.0], np.float32)
    )
    unsigned = np.array([0, 64, 128, 255], np.uint8)  # 8-bit WAV: centred on 128
    assert np.array_equal(
        pipeline.load_audio(frames, unsigned, []), np.array([-1, -0.5, 0, 127 / 128], np.float32)
    )
    with pytest.raises(InputError, match="int64 are not PCM"):
        pipeline.load_audio(frames, np.array([0, 1], np.int64), [])
    # The model sees the same clip as with the float sound.
    pcm_sound = (np.arange(128) * 500 - 32000).astype(np.int16)
    as_pcm = pipeline(frames, pcm_sound)
    as_float = pipeline(frames, pcm_sound.astype(np.float32) / 32768)
    assert np.array_equal(as_pcm.input_audio, as_float.input_audio)
    assert np.array_equal(as_pcm.audio, as_float.audio)


def test_frames_of_different_sizes_are_refused(model):
    # It was NumPy's "inhomogeneous shape" ValueError.
    frames = [np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8),
              np.zeros((12, 16, 3), np.uint8)]
    message = r"frames differ in size: frame 0 is \(16, 16, 3\), frame 2 is \(12, 16, 3\)"
    with pytest.raises(InputError, match=message):
        AutoencodePipeline(model)(frames, np.zeros(192, np.float32))
    # A list of frames of one size is the array.
    same = AutoencodePipeline(model).load_frames(frames[:2])
    assert np.array_equal(same, AutoencodePipeline(model).load_frames(np.stack(frames[:2])))
    # So is any iterable of them (a generator was refused as "got object ()"), and
    # the odd frame of a generator is named as in a list.
    pipeline = AutoencodePipeline(model)
    for iterable in ((f for f in frames[:2]), tuple(frames[:2]), iter(frames[:2])):
        assert np.array_equal(pipeline.load_frames(iterable), same)
    with pytest.raises(InputError, match=message):
        pipeline((f for f in frames), np.zeros(192, np.float32))
    clip = pipeline((f for f in frames[:2]), np.zeros(128, np.float32))
    assert np.array_equal(clip.inputs, same)


def test_a_model_without_weights_is_refused():
    # It ran the whole clip on the meta device, then "Cannot copy out of meta tensor".
    with torch.device("meta"):
        meta = pt.build("video_autoencoding", TINY)
    with pytest.raises(PipelineError, match="meta device.*load it on cpu or cuda") as info:
        AutoencodePipeline(meta)
    assert info.value.exit_code == 2


# -- perceiver-convert run autoencode ------------------------------------------------------


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video_model") / "video_autoencoding.pickle"
    assert run_cli("fixture", "video_autoencoding", "--size", "tiny", "-o", path).exit_code == 0
    return path


def read_float_wav(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    fmt_tag, channels, rate = struct.unpack("<HHI", data[20:28])
    at = data.index(b"data")
    size = struct.unpack("<I", data[at + 4 : at + 8])[0]
    return fmt_tag, channels, rate, np.frombuffer(data[at + 8 : at + 8 + size], "<f4")


def test_run_autoencode_writes_a_playable_video_sound_and_labels(tmp_path, video_checkpoint,
                                                                model):
    make_test_video(tmp_path / "in.mp4", 5, size=(36, 48))
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "in.mp4", "--json",
                     "-o", tmp_path / "out.mp4")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]
    assert document["files"] == [str(tmp_path / "out.mp4"), str(tmp_path / "out.wav")]
    assert document["dropped_frames"] == 1 and document["frames"] == 4
    assert document["size"] == [16, 16]
    assert "dropped" in result.stderr
    # The document is AutoencodeResult.as_dict with the input, sound and files.
    summary = AutoencodePipeline(model)(np.zeros((2, 16, 16, 3), np.uint8),
                                        np.zeros(128, np.float32)).as_dict()
    assert list(document) == ["input", "audio", "files", *summary]
    # Playable: PyAV decodes 4 frames of the model's 16x16 and an AAC sound track.
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert container.streams.audio and container.streams.audio[0].codec_context.name == "aac"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (16, 16, 3)
    # The WAV: float32 mono at 1600 Hz, 4 frames x 64 samples.
    fmt_tag, channels, rate, samples = read_float_wav(tmp_path / "out.wav")
    assert (fmt_tag, channels, rate, len(samples)) == (3, 1, 1600, 4 * 64)
    # Labels: top-5 per clip, most probable first, as the softmax of the raw logits.
    assert len(document["clips"]) == 2
    arrays = run_cli("run", "autoencode", video_checkpoint, tmp_path / "in.mp4", "--npz",
                     "-o", tmp_path / "raw.npz")
    assert arrays.exit_code == 0, arrays.stderr
    raw = np.load(tmp_path / "raw.npz")
    assert raw["frames"].shape == (4, 16, 16, 3) and raw["audio"].shape == (256,)
    assert raw["label_logits"].shape == (2, 10)
    assert np.array_equal(raw["audio"].astype("<f4"), samples)
    for clip, logits in zip(document["clips"], raw["label_logits"]):
        values, indices = softmax_top_k(torch.from_numpy(logits), 5)
        assert [e["index"] for e in clip["top_k"]] == indices.tolist()
        assert [e["label"] for e in clip["top_k"]] == [f"class {i}" for i in indices.tolist()]
        np.testing.assert_allclose([e["probability"] for e in clip["top_k"]], values.numpy())
        assert clip["psnr"] is not None


def test_run_autoencode_gif_and_separate_wav(tmp_path, video_checkpoint):
    make_test_video(tmp_path / "mute.mp4", 4, size=(32, 32), sample_rate=None)
    ramp = ((np.arange(4 * 64) % 200) - 100).astype(np.int16) * 50
    write_pcm_wav(tmp_path / "s.wav", ramp[None], 1600)
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "mute.mp4",
                     "--audio", tmp_path / "s.wav", "-o", tmp_path / "r.gif", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["files"] == [
        str(tmp_path / "r.gif"), str(tmp_path / "r.wav")]
    # Pillow merges identical consecutive frames into one longer frame (the random
    # model's frames may be identical), so check the playing time: 4 frames of 40 ms.
    Image = pytest.importorskip("PIL.Image")
    with Image.open(tmp_path / "r.gif") as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            assert gif.size == (16, 16)
    assert sum(durations) == 4 * 40


def test_run_autoencode_pads_a_very_short_sound(tmp_path, video_checkpoint):
    # 0.01 s at 48 kHz is 16 samples at the tiny model's 1600 Hz (fewer than the
    # resampler's filter holds back): padded with silence, as documented.
    make_test_video(tmp_path / "mute.mp4", 4, size=(32, 32), sample_rate=None)
    tone = np.round(0.5 * np.sin(2 * np.pi * 50 * np.arange(480) / 48000) * 32767)
    write_pcm_wav(tmp_path / "short.wav", tone[None], 48000)
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "mute.mp4",
                     "--audio", tmp_path / "short.wav", "--json", "-o", tmp_path / "r.mp4")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]
    assert document["padded_samples"] == 4 * 64 - 16
    assert "padded with silence" in result.stderr


@pytest.mark.parametrize("fps", [50, 20, 25])
def test_run_autoencode_names_a_frame_rate_other_than_25(tmp_path, video_checkpoint, fps):
    # The model (as the colab) takes the frames as 25 fps, each with 64 samples (1920
    # officially), whatever the video's rate: a 50 fps video's sound covers only half
    # of its frames (padded with silence), a 20 fps video's is cut short. The frames
    # are not resampled; a note says what the rate means, and the padding note does
    # not blame the sound.
    make_test_video(tmp_path / "in.mp4", 8, size=(32, 32), fps=fps, sample_rate=48000)
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "in.mp4", "--json",
                     "-o", tmp_path / "out.mp4")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]
    assert document["frames"] == 8 and len(document["clips"]) == 4  # every frame kept
    notes = document["notes"]
    assert all(f"  note: {note}" in result.stderr.splitlines() for note in notes)
    rate_notes = [note for note in notes if note.startswith("the video is")]
    padding = [note for note in notes if "padded with silence" in note]
    if fps == 25:
        assert rate_notes == [] and padding == []
        return
    assert rate_notes == [
        f"the video is {fps} fps; the model takes its frames as 25 fps (64 sound samples "
        "each, as the colab), so the sound is matched to frames at that rate: the "
        f"reconstruction plays at {25 / fps:g}x speed, out of step with the sound; give "
        "a 25 fps copy for real time (ffmpeg -i IN -r 25 OUT.mp4)"
    ]
    if fps == 20:
        assert padding == []
    else:
        assert len(padding) == 1 and padding[0].endswith(
            " s shorter than the 8 frames taken as 25 fps (0.320 s; 0.160 s at the "
            "video's 50 fps); padded with silence"
        )


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("no-sound", 3, "has no sound track; give the sound as a WAV file with --audio"),
        ("garbage", 3, "cannot read"),
        ("one-frame", 3, "clips of 2 frames"),
        ("two-videos-one-output", 2, "-o names one output"),
        ("garbage-audio", 3, "cannot read"),
    ],
)
def test_run_autoencode_errors(tmp_path, video_checkpoint, case, code, message):
    inputs = [tmp_path / "v.mp4"]
    if case == "no-sound":
        make_test_video(inputs[0], 4, size=(32, 32), sample_rate=None)
    elif case == "garbage":
        inputs[0].write_bytes(b"\x00\x01 definitely not a video" * 10)
    elif case == "one-frame":
        make_test_video(inputs[0], 1, size=(32, 32))
    elif case == "garbage-audio":
        make_test_video(inputs[0], 4, size=(32, 32), sample_rate=None)
        (tmp_path / "s.wav").write_bytes(b"RIFF nonsense" * 5)
        inputs += ["--audio", tmp_path / "s.wav"]
    else:
        make_test_video(inputs[0], 4, size=(32, 32))
        make_test_video(tmp_path / "w.mp4", 4, size=(32, 32))
        inputs.append(tmp_path / "w.mp4")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("run", "autoencode", video_checkpoint, *inputs, "-o", tmp_path / "out.mp4")
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


_VIDEOS_NAMED = "it writes the video as .mp4, .mov, .mkv or .gif"


@pytest.mark.parametrize(
    "name, words",
    [
        # -o out.webm wrote out.webm.mp4 and out.webm.wav: neither honoured nor refused.
        ("out.webm", f"autoencode does not write .webm; {_VIDEOS_NAMED}"),
        ("out.avi", f"autoencode does not write .avi; {_VIDEOS_NAMED}"),
        ("out.png", f"autoencode does not write .png; {_VIDEOS_NAMED}"),
        # -o out.npy without --npy took out as a stem and wrote out.mp4 and out.wav.
        ("out.npy", "add --npy for the raw arrays"),
        ("out.NPZ", "add --npz for the raw arrays"),
    ],
)
def test_run_autoencode_refuses_an_output_name_it_would_not_write(
    tmp_path, video_checkpoint, name, words, monkeypatch
):
    import converter.run_cli as run_cli_module

    def refuse_load(*args, **kwargs):
        raise AssertionError("the model was loaded before -o was checked")

    make_test_video(tmp_path / "in.mp4", 4, size=(32, 32))
    monkeypatch.setattr(run_cli_module, "load_any_model", refuse_load)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "in.mp4",
                     "-o", tmp_path / name)
    assert result.exit_code == 2, result.stderr
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_run_autoencode_takes_a_wav_name_as_the_stem(tmp_path, video_checkpoint):
    # -o out.wav names the sound file; the video goes beside it as out.mp4.
    make_test_video(tmp_path / "in.mp4", 4, size=(32, 32))
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "in.mp4", "--json",
                     "-o", tmp_path / "out.wav")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["files"] == [
        str(tmp_path / "out.mp4"), str(tmp_path / "out.wav")]


@pytest.mark.parametrize("suffix, container", [(".mov", "mov"), (".mkv", "matroska")])
def test_run_autoencode_writes_the_container_its_suffix_names(
    tmp_path, video_checkpoint, suffix, container
):
    make_test_video(tmp_path / "in.mp4", 4, size=(32, 32))
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "in.mp4", "--json",
                     "-o", tmp_path / f"out{suffix}")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["files"] == [
        str(tmp_path / f"out{suffix}"), str(tmp_path / "out.wav")]
    with av.open(str(tmp_path / f"out{suffix}")) as opened:
        assert container in opened.format.name.split(",")
        assert opened.streams.audio and len(list(opened.decode(video=0))) == 4


def test_run_autoencode_refuses_a_flow_model(tmp_path):
    checkpoint = tmp_path / "flow.pickle"
    assert run_cli("fixture", "optical_flow", "-o", checkpoint).exit_code == 0
    make_test_video(tmp_path / "v.mp4", 4, size=(32, 32))
    result = run_cli("run", "autoencode", checkpoint, tmp_path / "v.mp4")
    assert result.exit_code == 2 and "video_autoencoding" in result.stderr


def test_wav_encoding_layout():
    data = encode_wav(np.array([0.5, -1.25, 2.0], np.float32), 48000)
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert struct.unpack("<4sIHHIIHH", data[12:36]) == (b"fmt ", 16, 3, 1, 48000, 192000, 4, 32)
    assert read_float_wav_bytes(data).tolist() == [0.5, -1.25, 2.0]


def read_float_wav_bytes(data: bytes) -> np.ndarray:
    at = data.index(b"data")
    size = struct.unpack("<I", data[at + 4 : at + 8])[0]
    return np.frombuffer(data[at + 8 : at + 8 + size], "<f4")


def test_video_frames_are_turned_upright_by_the_rotation_metadata(tmp_path):
    # A phone's portrait video is stored landscape with a display rotation; OpenCV's
    # reader (the colab's) and players turn it upright, so the pipeline must too.
    from fractions import Fraction

    from perceiver_torch.pipelines.media import iter_video_frames

    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display rotation")
    stored = np.zeros((3, 32, 48, 3), np.uint8)
    stored[..., 1] = 90
    stored[:, :8, :8] = 255  # a white corner, top-left as stored
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
        stream.set_display_rotation(90)  # counter-clockwise, as VideoFrame.rotation
        for array in stored:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    frames = list(iter_video_frames(path))
    assert len(frames) == 3 and frames[0].shape == (48, 32, 3)  # upright: portrait
    white = np.argwhere(frames[0].min(-1) > 200)
    # 90 degrees counter-clockwise: the stored top-left corner is now bottom-left.
    assert white[:, 0].min() >= 40 and white[:, 1].max() < 8
    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    capture.release()
    if ok and bgr.shape[:2] == (48, 32):  # this OpenCV applies the rotation (>= 4.5)
        assert np.abs(bgr[..., ::-1].astype(int) - frames[0]).mean() < 2


def test_a_separate_sound_file_without_sound_is_named_as_such(tmp_path, model):
    # read_audio's advice for a mute video ("give the sound ... with --audio") is
    # wrong when the mute file *is* the --audio.
    video, _ = make_test_video(tmp_path / "mute.mp4", 2, size=(16, 16), sample_rate=None)
    with pytest.raises(InputError) as caught:
        AutoencodePipeline(model)(tmp_path / "mute.mp4", audio=tmp_path / "mute.mp4")
    message = str(caught.value)
    assert "given as the sound (--audio; audio= in Python)" in message
    assert "with --audio" not in message
    # The video's own missing track keeps the advice to use --audio.
    with pytest.raises(InputError, match="give the sound as a WAV file with --audio"):
        AutoencodePipeline(model)(tmp_path / "mute.mp4")


def _with_cover_picture(path: Path, frames: int) -> None:
    """An MP4 with an AAC sound track, ``frames`` H.264 frames (none: a music file)
    and a cover picture (an attached picture: MP4's ``covr``, which FFmpeg lists as a
    one-frame video stream after the others, as it does MKV attachments and MP3 APIC)."""
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=44100, layout="mono")
        video = None
        if frames:
            video = container.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24")
        for packet in cover.encode(picture.reformat(format="yuvj420p")) + cover.encode(None):
            container.mux(packet)
        for i in range(frames):
            pixels = np.full((48, 64, 3), 10 * i, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        if video is not None:
            for packet in video.encode(None):
                container.mux(packet)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)).astype(np.float32)
        samples = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 44100, 0
        for packet in sound.encode(samples) + sound.encode(None):
            container.mux(packet)


def test_a_cover_picture_is_not_read_as_the_video(tmp_path, video_checkpoint):
    from perceiver_torch.pipelines.media import (
        iter_video_frames, video_frame_count, video_frame_rate)

    # A music file (AAC in MP4) with cover art: its only "video stream" is the
    # picture. It was read as a one-frame video: "the video has 1 frame(s) ... give a
    # longer video" (autoencode), "has a single frame" (flow), and a frame rate of None.
    _with_cover_picture(tmp_path / "song.mp4", 0)
    with av.open(str(tmp_path / "song.mp4")) as container:
        assert [s.type for s in container.streams] == ["audio", "video"]
        assert container.streams.video[0].disposition & av.stream.Disposition.attached_pic
    for read in (lambda p: list(iter_video_frames(p)), video_frame_rate, video_frame_count):
        with pytest.raises(InputError, match="has no video stream, only a still picture"):
            read(tmp_path / "song.mp4")
    result = run_cli("run", "autoencode", video_checkpoint, tmp_path / "song.mp4",
                     "-o", tmp_path / "out.mp4")
    assert result.exit_code == 3, result.stderr
    assert "song.mp4 has no video stream, only a still picture (cover art)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.mp4").exists()
    # A video with cover art: the frames, rate and count are the video's.
    _with_cover_picture(tmp_path / "clip.mp4", 5)
    frames = list(iter_video_frames(tmp_path / "clip.mp4"))
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
    assert video_frame_rate(tmp_path / "clip.mp4") == 25
    assert video_frame_count(tmp_path / "clip.mp4") == 5


def _vp9_webm(path: Path, frames: int, size=(16, 16), fps: int = 25) -> None:
    """A WebM (VP9, no sound) of ``frames`` random frames: WebM cannot hold the H.264
    that write_video writes."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("name", ["v.mkv", "v.webm", "v.ts", "v.mp4", "longer-sound.mkv"])
def test_the_progress_bar_has_a_total_where_the_container_declares_no_count(
        tmp_path, model, name):
    """The bar over the clips took its total from the frame count the container
    declares; Matroska, WebM and MPEG-TS declare none, and got no bar. Their
    duration and frame rate give an estimate; an MP4 keeps its declared count.

    10 frames at 25 fps: 5 clips of 2. The video's duration is the frames' 0.4 s (the
    stream's own, or the DURATION tag FFmpeg's Matroska muxer writes), or up to a
    frame more where it is the container's, which includes the AAC sound's end
    padding (under 1024 samples at 44.1 kHz, 0.023 s): an estimate of 10 or 11
    frames, 5 clips either way. A sound track 1 s longer than the video makes the
    container's duration over 1.4 s (35 frames): the stream's tag is taken first."""
    from perceiver_torch.pipelines.media import video_frame_count, write_video

    t, frames = TINY.num_frames, 10
    video = tmp_path / name
    suffix = video.suffix
    audio = None
    if suffix == ".webm":
        _vp9_webm(video, frames)
        audio = np.zeros(frames * TINY.audio_samples_per_frame, np.float32)
    elif name.startswith("longer-sound"):
        pixels, _ = make_test_video(tmp_path / "pixels.mp4", frames, size=(16, 16))
        write_video(video, pixels, 25, np.zeros(44100 * (frames + 25) // 25), 44100)
    else:
        make_test_video(video, frames, size=(16, 16))
    declared = video_frame_count(video)
    assert declared == (frames if suffix == ".mp4" else 0)  # what the container says
    totals: List[tuple] = []

    def progress(items, total, label):
        totals.append((total, label))
        return items

    result = AutoencodePipeline(model, progress=progress)(video, audio)
    assert len(result.clips) == frames // t
    assert totals == [(frames // t, "clips")]  # was [] but for the MP4


def test_an_estimated_frame_count_is_for_the_progress_bar_only(tmp_path, model, monkeypatch):
    """A frame count estimated from the duration (a container that declares none) may
    be off: it sizes the bar, and is not the declared count that a video decoding to
    fewer frames is checked against (a note that the file may be truncated)."""
    from perceiver_torch.pipelines import video as video_module

    make_test_video(tmp_path / "v.mkv", 10, size=(16, 16))
    monkeypatch.setattr(video_module, "estimated_frame_count", lambda path: 40)  # far off
    totals: List[int] = []

    def progress(items, total, label):
        totals.append(total)
        return items

    result = AutoencodePipeline(model, progress=progress)(tmp_path / "v.mkv")
    assert totals == [20] and len(result.clips) == 5
    assert not any("declares" in note for note in result.notes), result.notes

def test_channels_first_torch_and_non_numeric_sound(model):
    pipeline = AutoencodePipeline(model)
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    sound = np.linspace(-0.5, 0.5, 128, dtype=np.float32)
    # torchaudio.load's (channels, S): the first sample of each channel was taken as
    # the sound, and the rest of the clip padded with silence (a note blamed its length).
    for layout in (sound[None], np.stack([sound, -sound])):
        with pytest.raises(InputError, match=r"looks like \(channels, S\).*audio\.T"):
            pipeline(frames, layout)
    assert np.array_equal(pipeline.load_audio(frames, np.stack([sound, -sound], 1), []), sound)
    # A torch tensor, bfloat16 too ("Got unsupported ScalarType BFloat16" before).
    exact = torch.tensor([-0.5, 0.25, 0.0, 1.0])
    for tensor in (exact, exact.bfloat16(), exact[:, None]):
        assert np.array_equal(pipeline.load_audio(frames, tensor, []), exact.numpy())
    # Bytes (a file's contents), strings, booleans, complex numbers: a clear refusal,
    # not NumPy's "could not convert string to float" or a dropped imaginary part.
    for bad in (b"RIFF....WAVE", np.array(["a", "b"]), np.zeros(4, bool), np.zeros(4, complex)):
        with pytest.raises(InputError, match="audio samples must be numbers"):
            pipeline.load_audio(frames, bad, [])
    # A WAV file's contents as a bytearray or memoryview were read as uint8 samples
    # (its header played as sound); every bytes-like object is refused alike.
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200))
    for contents in (wav, bytearray(wav), memoryview(wav)):
        with pytest.raises(InputError, match=r"of 216 bytes; a sound file goes in as its path"):
            pipeline.load_audio(frames, contents, [])
    # Any iterable of numbers is its array, as load_frames takes any iterable of
    # frames (a generator was refused as "not numbers", a 0-d object array).
    values = [-0.5, 0.25, 0.0, 1.0]
    for iterable in ((v for v in values), tuple(values), iter(values), map(float, values)):
        assert np.array_equal(pipeline.load_audio(frames, iterable, []), exact.numpy())
    stereo = pipeline.load_audio(frames, ((v, -v) for v in values), [])
    assert np.array_equal(stereo, exact.numpy())
    for bad in ((c for c in "ab"), iter([True, False]), iter([1j, 2j])):
        with pytest.raises(InputError, match="audio samples must be numbers"):
            pipeline.load_audio(frames, bad, [])


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le"])
def test_video_frames_are_the_colabs_readers_pixels(tmp_path, pix_fmt):
    """The colab reads frames with cv2.VideoCapture (libswscale to BGR24, bicubic).
    PyAV's default conversion (RGB24, bilinear) gave the same pixels for 8-bit
    video only: a 10-bit clip (phones' HDR video, HEVC, AV1) reached the model up to
    47 levels off. Frames must equal OpenCV's, channels swapped, exactly."""
    from fractions import Fraction

    from perceiver_torch.pipelines.media import iter_video_frames

    rng = np.random.default_rng(3)
    path = tmp_path / f"clip_{pix_fmt}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height = 64, 48
        try:
            stream.pix_fmt = pix_fmt
            for _ in range(3):
                smooth = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
                                    (64, 48), interpolation=cv2.INTER_CUBIC)
                for packet in stream.encode(av.VideoFrame.from_ndarray(smooth, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        except (av.error.FFmpegError, ValueError) as error:
            pytest.skip(f"this PyAV's libx264 cannot encode {pix_fmt} ({error})")
    capture = cv2.VideoCapture(str(path))
    colab = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        colab.append(bgr[:, :, ::-1])
    capture.release()
    if not colab:
        pytest.skip("this OpenCV cannot read the clip")
    ours = list(iter_video_frames(path))
    assert len(ours) == len(colab) == 3
    for got, expected in zip(ours, colab):
        assert got.dtype == np.uint8 and np.array_equal(got, expected)


@pytest.mark.parametrize("colorspace, color_range", [(1, 2), (1, None), (None, 2)])
def test_video_colour_tags_are_ignored_as_the_colabs_reader_ignores_them(
    tmp_path, colorspace, color_range
):
    """The colab's reader (OpenCV 4: its requirements pin 4.5.2) converts every frame
    with libswscale's defaults: the BT.601 matrix and the range the pixel format
    implies (full for yuvj and grey formats, limited otherwise), whatever the stream's
    colour tags say. Recent PyAV follows the tags instead: a BT.709 clip (nearly every HD
    or phone video) or a full-range VP9/HEVC one reached the model up to 56 levels
    off the colab's pixels (5 on average for a BT.709 clip).

    Independent oracle: lossless yuv444p frames (no chroma resampling), tagged BT.709
    and/or full range, against the BT.601 limited-range formula in float64. Bound:
    the exact value rounds to the nearest level (half a level) and libswscale's
    fixed-point matrix (its SIMD kernels keep fewer fractional bits than the C code)
    adds a little more; 3 levels allows that, while the readings that follow the
    tags are 20 (full range), 49 (BT.709) and 56 (both) levels off on these frames."""
    from perceiver_torch.pipelines.media import iter_video_frames

    rng = np.random.default_rng(5)
    height, width = 24, 32
    yuv = np.stack([
        rng.integers(16, 236, (height, width)),  # Y: limited-range luma
        rng.integers(16, 241, (height, width)),  # U
        rng.integers(16, 241, (height, width)),  # V
    ]).astype(np.uint8)
    path = tmp_path / "tagged.mkv"
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream("ffv1", rate=25)  # lossless
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
            if colorspace is not None:
                stream.codec_context.colorspace = colorspace  # 1: BT.709
            if color_range is not None:
                stream.codec_context.color_range = color_range  # 2: full (JPEG)
            for _ in range(2):
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv444p")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    except (av.error.FFmpegError, ValueError) as error:
        pytest.skip(f"this PyAV cannot write a tagged FFV1 clip ({error})")
    with av.open(str(path)) as container:
        decoded = next(container.decode(container.streams.video[0]))
        assert decoded.format.name == "yuv444p"
        if colorspace is not None:
            assert int(decoded.colorspace) == colorspace  # the tag reached the frames
    y, u, v = yuv.astype(np.float64) - np.array([16.0, 128.0, 128.0])[:, None, None]
    y, u, v = y * 255 / 219, u * 255 / 224, v * 255 / 224  # limited range
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    expected = np.clip(np.rint(rgb), 0, 255)  # BT.601 (Kr 0.299, Kb 0.114)
    frames = list(iter_video_frames(path))
    assert len(frames) == 2
    for got in frames:
        assert got.dtype == np.uint8
        assert np.abs(got.astype(np.float64) - expected).max() <= 3


def test_sound_files_are_read_as_the_colabs_16_bit_wav(tmp_path):
    """The colab's `ffmpeg -i VIDEO -c copy -f wav -map 0:a pcm_f32le -ar 48000
    output.wav` takes pcm_f32le for a file name: output.wav is the WAV default, 16-bit
    PCM, which the colab reads as x / 2**15. So the model's sound is rounded to 16
    bits and clipped, where the pipeline fed the decoded floats (a loud track's
    samples beyond full scale, up to 0.98 apart)."""
    rng = np.random.default_rng(4)
    sound = np.concatenate([rng.uniform(-0.6, 0.6, 4000), rng.uniform(-1.4, 1.4, 4000),
                            [1.0, -1.0, 0.5 / 32768, 1.5 / 32768, 32767.5 / 32768]])
    sound = sound.astype(np.float32)
    (tmp_path / "f.wav").write_bytes(encode_wav(sound, 48000))
    samples, rate, channels = read_audio(tmp_path / "f.wav", 48000)  # no resampling
    assert (rate, channels) == (48000, 1)
    # Independent: IEEE round-half-to-even to int16 (FFmpeg's lrintf), clipped.
    expected = np.clip(np.rint(sound.astype(np.float64) * 32768), -32768, 32767) / 32768
    assert samples.dtype == np.float32
    assert np.array_equal(samples, expected.astype(np.float32))
    assert samples[-3:].tolist() == [0.0, 2 / 32768, 32767 / 32768]  # ties to even; clip


def _aac_mp4(path: Path, sound: np.ndarray, rate: int) -> None:
    """``sound`` (S,) float as mono AAC in MP4, timestamps from 0 so that the
    encoder's priming gets an edit list (as write_video and ffmpeg write it)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(sound[None].astype(np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame) + stream.encode(None):
            container.mux(packet)


def _aac_layout(path: Path):
    """(packets, priming) of ``path``'s sound, from the file itself: AAC packets hold
    1024 samples each, and the priming is the first packet's negative timestamp (the
    start of the edit list)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.frame_size == 1024
        packets = [p for p in container.demux(stream) if p.size]
    assert packets[0].time_base == Fraction(1, 48000)
    return len(packets), -packets[0].pts


def _ffmpeg9_container(real: Any, discard: int) -> Any:
    """``real`` (an opened MP4) as FFmpeg 9's MP4 demuxer (PyAV 19) gives it: its last
    packet marked to drop ``discard`` samples at the end (the second field of the
    skip-samples side data), the part past the edit list. PyAV 18 bundles FFmpeg 8,
    whose demuxer leaves that part unmarked, as the colab's FFmpeg did."""

    class Container:
        def __getattr__(self, name):
            return getattr(real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return real.__exit__(*exc)

        def demux(self, *streams):
            packets = list(real.demux(*streams))
            sound = [p for p in packets if p.size]
            side = sound[0].get_sidedata("skip_samples")  # the priming's, (1024, 0)
            side.update(struct.pack("<IIBB", 0, discard, 0, 0))
            sound[-1].set_sidedata(side)
            return iter(packets)

        def decode(self, *streams):  # as PyAV's: the packets of demux, decoded
            return (frame for packet in self.demux(*streams) for frame in packet.decode())

    return Container()


def test_aac_in_mp4_is_read_as_the_colabs_ffmpeg_reads_it(tmp_path, monkeypatch):
    """The colab's FFmpeg (and every FFmpeg up to 8) drops an MP4 AAC track's
    priming (the edit list's start) and keeps the encoder's end padding: every AAC
    frame but the priming, packets x 1024 - 1024 samples, the sound from its first
    sample. FFmpeg 9's MP4 demuxer (PyAV 19 bundles it) marks that padding to be
    dropped, and read_audio gave 720 samples fewer for this clip there; the mark is
    taken off, so the sound does not depend on the PyAV (the FFmpeg) installed."""
    import perceiver_torch.pipelines.media as media

    if not hasattr(av.Packet, "has_sidedata"):
        pytest.skip("this PyAV has no packet side data (nor FFmpeg 9)")
    rng = np.random.default_rng(7)
    n = 30000  # 0.625 s at 48 kHz: it ends inside the 30th AAC frame after the priming
    sound = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000) + 0.1 * rng.standard_normal(n)
    _aac_mp4(tmp_path / "s.mp4", sound, 48000)
    packets, priming = _aac_layout(tmp_path / "s.mp4")
    assert priming == 1024
    expected = packets * 1024 - priming  # the priming dropped, the end padding kept
    assert expected > n

    samples, rate, channels = read_audio(tmp_path / "s.mp4", 48000)
    assert (rate, channels, len(samples)) == (48000, 1, expected)
    # The sound starts with its first sample (the priming dropped, not kept): the
    # cross-correlation with the noisy input peaks at lag 0, far above other lags.
    lags = range(-1100, 1101)
    scores = [np.dot(samples[2048 + k:2048 + k + 16384], sound[2048:2048 + 16384]) for k in lags]
    assert list(lags)[int(np.argmax(scores))] == 0

    # Other containers' end padding (Matroska's DiscardPadding, here Opus) is
    # dropped, as every FFmpeg drops it: 30000 samples in, 30000 out.
    if "libopus" in av.codecs_available:
        with av.open(str(tmp_path / "s.webm"), "w") as container:
            stream = container.add_stream("libopus", rate=48000, layout="mono")
            frame = av.AudioFrame.from_ndarray(sound[None].astype(np.float32),
                                               format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, 0, Fraction(1, 48000)
            for packet in stream.encode(frame) + stream.encode(None):
                container.mux(packet)
        assert len(read_audio(tmp_path / "s.webm", 48000)[0]) == n

    # FFmpeg 9's mark on the last packet: what lies past the edit list (n samples).
    opened = media._open_container
    monkeypatch.setattr(media, "_open_container",
                        lambda path: _ffmpeg9_container(opened(path), expected - n))
    marked, _, _ = read_audio(tmp_path / "s.mp4", 48000)
    assert np.array_equal(marked, samples)


def test_any_os_pathlike_is_a_path(tmp_path, model):
    """A video or sound named by an os.DirEntry (os.scandir) or a pure pathlib path is
    read as a file, as str and Path are: it was taken as frames ("video frames must be
    uint8 (T, H, W, 3) RGB, got object ()") or samples ("audio samples must be
    numbers ... a sound file goes in as its path")."""
    import os
    from pathlib import PurePath

    make_test_video(tmp_path / "v.mp4", 4, size=(24, 40), sample_rate=1600)
    (tmp_path / "s.wav").write_bytes(encode_wav(np.zeros(4 * 64, np.float32), 1600))
    entries = {e.name: e for e in os.scandir(tmp_path)}
    pipeline = AutoencodePipeline(model)
    expected = pipeline(tmp_path / "v.mp4", tmp_path / "s.wav")
    for video, sound in ((entries["v.mp4"], entries["s.wav"]),
                         (PurePath(tmp_path / "v.mp4"), PurePath(tmp_path / "s.wav"))):
        result = pipeline(video, sound)
        assert np.array_equal(result.frames, expected.frames)
        assert np.array_equal(result.audio, expected.audio)
    alone = pipeline(entries["v.mp4"])  # its own sound track
    assert np.array_equal(alone.audio, pipeline(tmp_path / "v.mp4").audio)


def test_frames_and_sound_as_tensors(model):
    """Frames given as a tensor, or a list of tensors, are read as the array (they
    are detached and brought to the CPU: np.asarray failed on GPU tensors); a meta
    tensor, which holds no values, is refused by name (it was torch's "can't convert
    meta device type tensor to numpy"); frames in PyTorch's (T, 3, H, W) layout are
    told the permute that gives (T, H, W, 3)."""
    pipeline = AutoencodePipeline(model)
    frames = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    expected = pipeline.load_frames(frames)
    tensor = torch.from_numpy(frames)
    assert np.array_equal(pipeline.load_frames(tensor), expected)
    assert np.array_equal(pipeline.load_frames(list(tensor)), expected)
    meta = torch.empty(2, 16, 16, 3, dtype=torch.uint8, device="meta")
    with pytest.raises(InputError, match="^the video frames are a meta tensor"):
        pipeline.load_frames(meta)
    with pytest.raises(InputError, match="^the video frames are a meta tensor"):
        pipeline.load_frames(list(meta))
    with pytest.raises(InputError, match=r"\.permute\(0, 2, 3, 1\) gives it"):
        pipeline.load_frames(tensor.permute(0, 3, 1, 2))
    with pytest.raises(InputError, match="^the audio samples are a meta tensor"):
        pipeline.load_audio(frames, torch.empty(128, device="meta"), [])


def test_non_finite_reconstructions_are_noted(model, monkeypatch):
    """NaN or inf in the reconstruction (a float16 model past 65504) came without a
    word; each output that holds some is noted."""
    frames = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    sound = np.zeros(2 * 64, np.float32)
    pipeline = AutoencodePipeline(model)
    assert not [n for n in pipeline(frames, sound).notes if "non-finite" in n]
    original = type(model).reconstruct

    def reconstruct(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out["label"][..., 0] = float("nan")
        return out

    monkeypatch.setattr(type(model), "reconstruct", reconstruct)
    notes = [n for n in pipeline(frames, sound).notes if "non-finite" in n]
    assert len(notes) == 1 and "reconstructed labels there are not meaningful" in notes[0]


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_write_video_takes_frames_one_by_one(tmp_path, suffix):
    """write_video encodes the frames of a generator as they come (run flow hands it
    each picture as its flow is computed): the same file as the stacked frames, an
    odd size padded as before (the whole stack padded up front, a row and a column
    repeated), and a frame of another size refused."""
    from perceiver_torch.pipelines.media import write_video

    frames = np.random.default_rng(0).integers(0, 256, (4, 41, 57, 3), dtype=np.uint8)
    write_video(tmp_path / f"stacked{suffix}", frames, 25)
    write_video(tmp_path / f"streamed{suffix}", (f for f in frames), 25)
    stacked = (tmp_path / f"stacked{suffix}").read_bytes()
    assert (tmp_path / f"streamed{suffix}").read_bytes() == stacked
    if suffix == ".mp4":
        even = np.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
        write_video(tmp_path / "even.mp4", even, 25)
        assert (tmp_path / "even.mp4").read_bytes() == stacked
    with pytest.raises(ValueError, match="one size"):
        write_video(tmp_path / f"mixed{suffix}", iter([frames[0], frames[1, :40]]), 25)
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(tmp_path / f"none{suffix}", iter([]), 25)


@pytest.mark.parametrize("rate", [1600, 44100])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".gif"])
def test_video_writer_takes_frames_and_sound_in_pieces(tmp_path, rate, suffix):
    """VideoWriter, which run autoencode hands each clip's frames and sound as they
    come: the decoded frames and sound of write_video's file of the whole (sound
    resampled for AAC at 1600 Hz, not at 44.1 kHz; NaN samples silent), however the
    sound is cut, some of it before the first frame; a GIF ignores the sound."""
    from perceiver_torch.pipelines.media import VideoWriter, iter_video_frames, write_video

    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (10, 17, 23, 3), dtype=np.uint8)
    sound = (0.5 * np.sin(np.arange(10 * rate // 25) * 0.05)).astype(np.float32)
    sound[7] = np.nan
    whole, pieces = tmp_path / f"whole{suffix}", tmp_path / f"pieces{suffix}"
    write_video(whole, frames, 25, sound, rate)
    cuts = [0, 5, 5 + rate // 25, len(sound) // 2, len(sound) - 3, len(sound)]
    with VideoWriter(pieces, 25, rate) as writer:
        writer.add_sound(sound[cuts[0] : cuts[1]])  # before any frame
        for i in range(0, 10, 2):
            writer.add_frames(frames[i : i + 2])
            if i // 2 + 2 < len(cuts):
                writer.add_sound(sound[cuts[i // 2 + 1] : cuts[i // 2 + 2]])
    if suffix == ".gif":
        assert pieces.read_bytes() == whole.read_bytes()
        return
    assert np.array_equal(np.stack(list(iter_video_frames(pieces))),
                          np.stack(list(iter_video_frames(whole))))
    with av.open(str(whole)) as a, av.open(str(pieces)) as b:
        assert b.streams.audio[0].rate == a.streams.audio[0].rate
        decoded = [np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
                   for c in (a, b)]
    assert np.array_equal(decoded[1], decoded[0])
    with pytest.raises(ValueError, match="one size"):
        with VideoWriter(tmp_path / f"mixed{suffix}", 25) as writer:
            writer.add_frames([frames[0], frames[1, :16]])
    with pytest.raises(ValueError, match="no sound track"):
        with VideoWriter(tmp_path / f"mute{suffix}", 25) as writer:
            writer.add_frames(frames[:1])
            writer.add_sound(sound)


def _open_in_this_process(path: Path) -> bool:
    """Whether this process holds a descriptor of the file ``path`` (Linux's /proc)."""
    folder = Path("/proc/self/fd")
    targets = []
    for fd in folder.iterdir():
        try:
            targets.append(Path(os.readlink(fd)))
        except OSError:  # the descriptor of the listing itself, closed meanwhile
            pass
    return path.resolve() in targets


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_writer_close_twice_does_nothing_more(tmp_path, suffix):
    """close() called twice, or before the with block's end, did it all again: a
    GIF's failed to unpack its pictures, gone with the first save (ValueError), a
    video's flushed its flushed encoders (PyAV's EOFError). As a file object's, only
    the first close finishes the file now; a frame or sound added after it is
    refused (a GIF's was kept for no file); a close that fails (a full disk) leaves
    the writer closed and the file let go, the error raised once."""
    from perceiver_torch.pipelines.media import VideoWriter, iter_video_frames

    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    sound = (0.5 * np.sin(np.arange(4 * 64) * 0.05)).astype(np.float32)

    path = tmp_path / f"twice{suffix}"
    writer = VideoWriter(path, 25, 1600)
    writer.add_frames(frames)
    writer.add_sound(sound)
    assert not writer.closed
    writer.close()
    written = path.read_bytes()
    writer.close()
    assert writer.closed and path.read_bytes() == written
    assert len(list(iter_video_frames(path))) == len(frames)
    with pytest.raises(ValueError, match="closed VideoWriter"):
        writer.add_frame(frames[0])
    with pytest.raises(ValueError, match="closed VideoWriter"):
        writer.add_sound(sound)
    writer.close()
    assert path.read_bytes() == written

    in_block = tmp_path / f"in_block{suffix}"
    with VideoWriter(in_block, 25, 1600) as writer:
        writer.add_frames(frames)
        writer.add_sound(sound)
        writer.close()
        written = in_block.read_bytes()
    assert in_block.read_bytes() == written
    assert len(list(iter_video_frames(in_block))) == len(frames)

    if suffix == ".gif" or not Path("/proc/self/fd").is_dir():
        return  # a GIF is saved whole by Pillow, which opens the file only then
    failing = tmp_path / f"failing{suffix}"

    def full_disk(packets):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with VideoWriter(failing, 25, 1600) as writer:
            writer.add_frames(frames)
            writer.add_sound(sound)
            assert _open_in_this_process(failing)
            writer._mux = full_disk  # the packets that the close flushes
            writer.close()
    assert writer.closed and not _open_in_this_process(failing)
    writer.close()  # nothing more: no second error


_WRITE_AFTER_A_FAILED_WRITE = """
import sys
import numpy as np
from perceiver_torch.pipelines.media import VideoWriter

writer = VideoWriter(sys.argv[1], 25, 1600)  # 1600 Hz: resampled for AAC
frames = np.zeros((3, 16, 16, 3), np.uint8)
errors = []
for step in (lambda: writer.add_frames(frames), lambda: writer.add_sound(np.zeros(192, np.float32)),
             writer.close, lambda: writer.add_frames(frames), writer.close):
    try:
        step()
    except Exception as error:
        errors.append(f"{type(error).__name__} {getattr(error, 'errno', '')}".strip())
print(errors)
"""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full: Linux")
def test_video_writer_writes_nothing_after_a_failed_write(tmp_path):
    """A full disk fails a writer's first write, the file's header (here add_sound's:
    the picture encoder holds its first packets); close(), as ``try: ... finally:
    writer.close()`` calls it, flushed the encoders into the file again, and PyAV,
    writing its header a second time, crashed the process (a segmentation fault).
    After a failed write the writer writes nothing: close() raises that error again
    (the file is unfinished), as do frames added after it (a closed writer's
    ValueError), and a second close() does nothing. /dev/full, through a link with
    the video's suffix, is a disk that is always full; a process of its own, so
    that a crash fails the test rather than ending the session."""
    import errno
    import subprocess
    import sys

    failing = tmp_path / "full.mp4"
    failing.symlink_to("/dev/full")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_AFTER_A_FAILED_WRITE, str(failing)],
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    no_space = f"OSError {errno.ENOSPC}"  # add_sound's, then close()'s: the same
    assert done.stdout.splitlines() == [repr([no_space, no_space, "ValueError"])]


def test_wav_header_is_encode_wavs(tmp_path):
    """A .wav written as its header for S samples, then the samples (run autoencode
    copies them from a temporary file), is encode_wav's file byte for byte."""
    from perceiver_torch.pipelines.media import wav_header

    samples = np.random.default_rng(5).standard_normal(1001).astype(np.float32)
    assert wav_header(1001, 1600) + samples.astype("<f4").tobytes() == encode_wav(samples, 1600)


@pytest.mark.parametrize("arrays", [None, "npz"])
def test_run_autoencode_lets_each_video_go_before_the_next(tmp_path, model, monkeypatch,
                                                           arrays):
    """The runner's loop variable held a video's result (its reconstructed and input
    frames) while the next video was autoencoded; --npz copied the arrays into bytes
    first. The runner now goes clip by clip: no clip's reconstruction is held while
    the next clip is computed, in the next video either. The files and documents are
    those of the pipeline on each video."""
    import io

    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.video import run_task

    live = alive_counts()
    real = AutoencodePipeline._autoencode

    def counted(self, *args, **kwargs):
        return track_alive(live, real(self, *args, **kwargs))

    videos = [make_test_video(tmp_path / f"v{i}.mp4", 4, size=(24, 32), seed=i) and
              str(tmp_path / f"v{i}.mp4") for i in range(3)]
    out = tmp_path / ("out.npz" if arrays else "out")
    if arrays is None:
        out.mkdir()
    monkeypatch.setattr(AutoencodePipeline, "_autoencode", counted)
    documents = run_task(AutoencodePipeline(model), videos[:1] if arrays else videos,
                         RunOptions(output=out, arrays=arrays))
    assert live["made"] == (2 if arrays else 6) and live["most"] == 1
    monkeypatch.setattr(AutoencodePipeline, "_autoencode", real)
    for path, document in zip(videos, documents):
        result = AutoencodePipeline(model)(path)
        assert {k: v for k, v in document.items() if k not in ("input", "audio", "files")} \
            == result.as_dict()
        if arrays:
            expected = io.BytesIO()
            np.savez(expected, frames=result.frames, audio=result.audio,
                     label_logits=result.label_logits)
            assert out.read_bytes() == expected.getvalue()
        else:
            wav = out / (Path(path).stem + ".autoencoded.wav")
            assert wav.read_bytes() == encode_wav(result.audio, result.sample_rate)


# -- autoencoding clip by clip ---------------------------------------------------------


def _whole_video_reference(model: torch.nn.Module, video: Path, sound: Path) -> Dict[str, Any]:
    """The autoencoding of ``video`` with the sound of ``sound`` as the pipeline made it
    before it went clip by clip, computed here from its parts: every frame decoded
    and preprocessed, the whole sound read, padded with silence to the clips' length
    (or cut), then the model on each run of ``num_frames`` frames. Independent of the
    pipeline's loop, its sound pieces and its writers."""
    from perceiver_torch.pipelines.media import iter_video_frames

    t, per_frame = TINY.num_frames, TINY.audio_samples_per_frame
    frames = np.stack([preprocess_frame(f, TINY.image_size) for f in iter_video_frames(video)])
    samples, _, _ = read_audio(sound, per_frame * 25)
    clips = len(frames) // t
    needed = clips * t * per_frame
    padded = max(needed - len(samples), 0)
    samples = np.concatenate([samples, np.zeros(padded, np.float32)])[:needed]
    outputs: Dict[str, List[np.ndarray]] = {"image": [], "audio": [], "label": []}
    with torch.inference_mode():
        for c in range(clips):
            images = torch.from_numpy(frames[c * t : (c + 1) * t]).permute(0, 3, 1, 2)[None]
            audio = torch.from_numpy(samples[c * t * per_frame : (c + 1) * t * per_frame])
            out = model.reconstruct(images, audio[None, :, None], num_chunks=TINY.num_chunks)
            for key in outputs:
                outputs[key].append(out[key][0].numpy().copy())
    recon = np.concatenate([clip.transpose(0, 2, 3, 1) for clip in outputs["image"]])
    return {
        "frames": recon,
        "audio": np.concatenate(outputs["audio"]),
        "label_logits": np.stack(outputs["label"]),
        "inputs": frames[: clips * t],
        "input_audio": samples,
        "dropped_frames": len(frames) - clips * t,
        "padded_samples": padded,
        "psnr": [psnr(recon[c * t : (c + 1) * t], frames[c * t : (c + 1) * t])
                 for c in range(clips)],
    }


def _sound_cases(tmp_path: Path, case: str) -> tuple:
    """(video, --audio file or None, the sound file) for 5 clips of 2 frames and a
    frame dropped: the video's own sound (44.1 kHz AAC, resampled), or a 1600 Hz WAV
    that ends in the 4th clip (padded) or goes on past the video (cut)."""
    video = tmp_path / "v.mp4"
    make_test_video(video, 11, size=(24, 32), sample_rate=None if case != "own" else 44100)
    if case == "own":
        return video, None, video
    samples = {"short": 7 * 64 + 20, "long": 30 * 64}[case]
    ramp = (((np.arange(samples) * 37) % 4000) - 2000).astype(np.int16)
    write_pcm_wav(tmp_path / "s.wav", ramp[None], 1600)
    return video, tmp_path / "s.wav", tmp_path / "s.wav"


@pytest.mark.parametrize("arrays", [None, "npy", "npz", "python"])
def test_run_autoencode_holds_one_clip_at_a_time(tmp_path, model, monkeypatch, arrays):
    """run autoencode (and the pipeline call) held the whole video: every frame was
    decoded and preprocessed before the first clip reached the model, and every
    clip's reconstruction was kept until the files were written. At each clip's model
    call now: the frames decoded are that clip's and the earlier ones', and of the
    clips' input frames and sound, and of their reconstructed frames, only the
    current clip's (and at most one earlier reconstruction) are alive; in Python,
    ``AutoencodePipeline.clips`` with its parts let go, likewise."""
    from perceiver_torch.pipelines import video as video_module
    from perceiver_torch.pipelines.base import RunOptions

    t = TINY.num_frames
    video, audio, _ = _sound_cases(tmp_path, "own")
    decoded = [0]
    real_frames = video_module.iter_video_frames

    def counting_frames(*args, **kwargs):
        for frame in real_frames(*args, **kwargs):
            decoded[0] += 1
            yield frame

    live = {kind: alive_counts() for kind in ("inputs", "reconstructions")}
    calls: List[Dict[str, int]] = []
    original = type(model).reconstruct
    autoencode = AutoencodePipeline._autoencode

    def counted_inputs(self, inputs, samples, start):
        # The clip's frames and sound as the pipeline hands them to the model.
        return autoencode(self, track_alive(live["inputs"], inputs),
                          track_alive(live["inputs"], samples), start)

    def reconstruct(self, images, sound, **kwargs):
        calls.append({"decoded": decoded[0], "inputs": live["inputs"]["now"],
                      "reconstructions": live["reconstructions"]["now"]})
        out = original(self, images, sound, **kwargs)
        # The frames in an array counted while alive: any view of it (the pipeline's
        # reconstruction is one) keeps it alive; a copy does not.
        recon = out["image"].numpy().copy()
        out["image"] = torch.from_numpy(track_alive(live["reconstructions"], recon))
        return out

    monkeypatch.setattr(video_module, "iter_video_frames", counting_frames)
    monkeypatch.setattr(AutoencodePipeline, "_autoencode", counted_inputs)
    monkeypatch.setattr(type(model), "reconstruct", reconstruct)
    pipeline = AutoencodePipeline(model)
    if arrays == "python":
        for part in pipeline.clips(video, audio):
            del part  # what a caller that writes each clip away does
    else:
        out = tmp_path / {None: "out.mp4", "npy": "out.npy", "npz": "out.npz"}[arrays]
        video_module.run_task(pipeline, [str(video)], RunOptions(output=out, arrays=arrays))
    assert len(calls) == 5  # 11 frames: 5 clips of 2
    for c, call in enumerate(calls):
        assert call["decoded"] <= (c + 1) * t, (c, call)  # was all 11 from the first
        assert call["inputs"] == 2, (c, call)  # this clip's frames and sound only
        assert call["reconstructions"] <= 1, (c, call)  # was c: every earlier clip's


def test_the_sound_is_read_as_the_clips_need_it(tmp_path, model, monkeypatch):
    """The whole sound track was decoded and resampled before the first clip. Now the
    sound file's samples are taken as the clips need them: at each clip's model call,
    those taken from the reader are that clip's and the earlier ones', and at most
    one decoded piece more (here 1024 samples at 48 kHz: at most 35 at the model's
    1600 Hz). (The reader itself holds back the first second, SoundReader.)"""
    from perceiver_torch.pipelines import video as video_module
    from perceiver_torch.pipelines.media import SoundReader

    make_test_video(tmp_path / "v.mp4", 75, size=(16, 16), sample_rate=48000)  # 3 s
    read = [0]

    class CountingReader(SoundReader):
        def __iter__(self):
            for piece in super().__iter__():
                read[0] += len(piece)
                yield piece

    calls: List[int] = []
    original = type(model).reconstruct

    def reconstruct(self, *args, **kwargs):
        calls.append(read[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(video_module, "SoundReader", CountingReader)
    monkeypatch.setattr(type(model), "reconstruct", reconstruct)
    for part in AutoencodePipeline(model).clips(tmp_path / "v.mp4"):
        del part
    per_clip, piece = 2 * 64, 35
    assert len(calls) == 37 and read[0] >= 37 * per_clip
    for c, samples in enumerate(calls):
        assert samples <= (c + 1) * per_clip + piece, (c, samples)  # was 4800 from the first


@pytest.mark.parametrize("caller", ["clips", "call", "cli"])
@pytest.mark.parametrize("sound", ["own", "audio"])
def test_a_sound_that_cannot_be_decoded_partway_is_named_before_the_model_runs(
        tmp_path, model, video_checkpoint, monkeypatch, sound, caller):
    """The sound is read as the clips need it, so a track damaged halfway through (the
    video's own, or a sound file given as audio=/--audio) was named only once the
    clips before the damage had gone through the model (minutes for a long video).
    It is decoded whole when the clips are made, keeping only its length: the error
    comes before any model call."""
    from perceiver_torch.pipelines.media import SoundReader

    video = tmp_path / "v.mp4"
    make_test_video(video, 75, size=(16, 16), sample_rate=48000 if sound == "own" else None)
    audio = None
    if sound == "audio":
        audio = tmp_path / "s.mp4"
        make_test_video(audio, 75, size=(16, 16), sample_rate=48000)
    damaged = damage_sound_midway(audio or video)
    with SoundReader(damaged, 1600) as reader:
        assert len(next(iter(reader))) > 0  # the damage is partway: a first piece comes
    calls = fail_on_call(monkeypatch, type(model), "reconstruct", 1,
                         "the model ran before the sound was checked")
    pipeline = AutoencodePipeline(model)
    message = f"{damaged}: the sound cannot be decoded"
    if caller == "clips":
        with pytest.raises(InputError, match=re.escape(message)):
            pipeline.clips(video, audio)  # made, not yet iterated
    elif caller == "call":
        with pytest.raises(InputError, match=re.escape(message)):
            pipeline(video, audio)
    else:
        (tmp_path / "out").mkdir()
        flags = ["--audio", audio] if audio else []
        result = run_cli("run", "autoencode", video_checkpoint, video, *flags,
                         "-o", tmp_path / "out" / "r.mp4")
        assert result.exit_code == 3 and message in result.stderr, result.stderr
        assert list((tmp_path / "out").iterdir()) == []
    assert calls == []


def test_the_sound_check_holds_one_piece_at_a_time(tmp_path, model, monkeypatch):
    """The check before the clips decodes the whole sound (3 s at 48 kHz, well over a
    hundred pieces) before the first model call, and holds one piece at a time: it
    keeps the length, not the samples."""
    from perceiver_torch.pipelines.media import SoundReader

    video = tmp_path / "v.mp4"
    make_test_video(video, 75, size=(16, 16), sample_rate=48000)
    length = len(read_audio(video, 1600)[0])
    counts = alive_counts()
    real_iter, real_check = SoundReader.__iter__, SoundReader.check
    checked: List[Dict[str, int]] = []

    def tracked_pieces(self):
        for piece in real_iter(self):
            yield track_alive(counts, piece)

    def check(self):
        assert counts["made"] == 0  # no piece yet taken for the clips
        result = real_check(self)
        checked.append({**counts, "length": result})
        return result

    calls = fail_on_call(monkeypatch, type(model), "reconstruct", 2, "one clip is enough")
    monkeypatch.setattr(SoundReader, "__iter__", tracked_pieces)
    monkeypatch.setattr(SoundReader, "check", check)
    with pytest.raises(RuntimeError, match="one clip is enough"):
        AutoencodePipeline(model)(video)
    assert len(calls) == 2 and len(checked) == 1
    assert checked[0]["length"] == length and checked[0]["made"] > 100
    assert checked[0]["most"] == 1, checked  # was every piece of the first second


def test_a_sound_named_by_an_open_descriptor_is_decoded_once(tmp_path, model):
    """``--audio /dev/stdin`` redirected from a WAV (a name for an open descriptor)
    is decoded once, for the clips: on macOS and the BSDs a second open shares the
    descriptor's offset, so the check's decode would leave nothing for the clips,
    and the run would end in a "changed" error. /dev/fd/N of a file opened here is
    such a name; the answer is that of the file by its own name."""
    from perceiver_torch.pipelines.media import SoundReader

    video, audio, _ = _sound_cases(tmp_path, "long")
    opened: List[str] = []
    real_init = SoundReader.__init__

    def counted_init(self, path, sample_rate):
        opened.append(os.fspath(path))
        real_init(self, path, sample_rate)

    pipeline = AutoencodePipeline(model)
    expected = pipeline(video, audio)
    with pytest.MonkeyPatch.context() as patch, open(audio, "rb") as handle:
        patch.setattr(SoundReader, "__init__", counted_init)
        by_descriptor = f"/dev/fd/{handle.fileno()}"
        result = pipeline(video, by_descriptor)
    assert opened == [by_descriptor]  # the clips' reader only, no check
    np.testing.assert_array_equal(result.frames, expected.frames)
    np.testing.assert_array_equal(result.input_audio, expected.input_audio)


@pytest.mark.parametrize("new_samples", [7 * 64 + 20, 3000])
def test_a_sound_file_changed_between_its_two_reads_is_refused(tmp_path, model, monkeypatch,
                                                                new_samples):
    """The sound is decoded twice (checked, then read for the clips): a file replaced
    between the reads by a shorter or longer sound would have been answered with a
    sound other than the one checked; the second read's length is compared with the
    first's."""
    from perceiver_torch.pipelines import media as media_module

    video, audio, _ = _sound_cases(tmp_path, "long")  # 30 frames' worth of sound
    ramp = ((np.arange(new_samples) * 11) % 3000 - 1500).astype(np.int16)
    write_pcm_wav(tmp_path / "other.wav", ramp[None], 1600)
    # The check's reader is the second made (the clips' own is opened first): the
    # check reads the new file, the clips' reader the one it already had open.
    act_at_read(monkeypatch, media_module, "SoundReader", 1,
                lambda: (tmp_path / "other.wav").replace(audio))
    message = (f"{audio} changed during the run: its sound, decoded again for the work, "
               f"has ")
    with pytest.raises(InputError, match=re.escape(message)) as error:
        AutoencodePipeline(model)(video, audio)
    assert f"not {new_samples} as when it was checked" in str(error.value)


@pytest.mark.parametrize("caller", ["clips", "call", "cli"])
def test_a_video_that_cannot_be_decoded_partway_is_named_before_the_model_runs(
        tmp_path, model, video_checkpoint, monkeypatch, caller):
    """The frames are decoded as the clips need them, so a video damaged halfway
    through was named only once the clips before the damage had gone through the
    model (minutes each at full size). It is decoded whole when the clips are made,
    keeping only its frame count and first frame size: the decoder's error, with the
    same words, comes before any model call."""
    from helpers import frames_before_the_damage

    video = tmp_path / "v.mp4"
    make_test_video(video, 75, size=(16, 16), sample_rate=48000)
    damage_video_midway(video)
    message = f"{video}: the video cannot be decoded"
    # The damage is past the first clips.
    assert frames_before_the_damage(video) >= 2 * TINY.num_frames
    calls = fail_on_call(monkeypatch, type(model), "reconstruct", 1,
                         "the model ran before the video was checked")
    pipeline = AutoencodePipeline(model)
    if caller == "clips":
        with pytest.raises(InputError, match=re.escape(message)):
            pipeline.clips(video)  # made, not yet iterated
    elif caller == "call":
        with pytest.raises(InputError, match=re.escape(message)):
            pipeline(video)
    else:
        (tmp_path / "out").mkdir()
        result = run_cli("run", "autoencode", video_checkpoint, video,
                         "-o", tmp_path / "out" / "r.mp4")
        assert result.exit_code == 3 and message in result.stderr, result.stderr
        assert list((tmp_path / "out").iterdir()) == []
    assert calls == []


def test_the_video_check_holds_one_frame_at_a_time(tmp_path, model, monkeypatch):
    """The check before the clips decodes every frame (75, well over a clip) before
    the first model call, and holds one frame at a time: it keeps their count and
    the first one's size, not the frames."""
    from helpers import track_checked_frames

    video = tmp_path / "v.mp4"
    make_test_video(video, 75, size=(16, 16), sample_rate=48000)
    counts = track_checked_frames(monkeypatch)
    at_first_call: List[Dict[str, int]] = []

    def reconstruct(self, *args, **kwargs):
        at_first_call.append(dict(counts))
        raise RuntimeError("one clip is enough")

    monkeypatch.setattr(type(model), "reconstruct", reconstruct)
    with pytest.raises(RuntimeError, match="one clip is enough"):
        AutoencodePipeline(model)(video)
    assert len(at_first_call) == 1
    assert at_first_call[0]["made"] == 75  # every frame, before the first clip
    assert at_first_call[0]["most"] == 1, at_first_call  # not a list of them


@pytest.mark.parametrize("case", ["written", "fewer frames", "more frames", "another size"])
def test_a_video_file_changed_between_its_two_reads_is_refused(tmp_path, model, monkeypatch,
                                                               case):
    """The video is decoded twice (checked, then again for the clips): a file replaced
    between the reads would have been answered with another video than the one
    checked. A file whose size or modification time changed is refused before its
    second read (base.file_state, as classify's images); one replaced by a file of
    the same size and time (cp -p), which that cannot tell, by its frame count or
    its first frame's size."""
    from helpers import replace_once_checked, same_size_mp4s
    from perceiver_torch.pipelines import video as video_module

    video, other = tmp_path / "v.mp4", tmp_path / "other.mp4"
    make_test_video(video, 40, size=(16, 16), sample_rate=None)
    frames = {"fewer frames": 30, "more frames": 50}.get(case, 40)
    make_test_video(other, frames, size=(24, 16) if case == "another size" else (16, 16),
                    sample_rate=None, seed=1)
    if case != "written":
        same_size_mp4s(video, other)
    replace_once_checked(monkeypatch, video_module, video, other, keep_time=case != "written")
    message = {
        "written": f"{video} changed during the run: it was written to or replaced after "
                   "the inputs were checked",
        "fewer frames": f"{video} changed during the run: its video, decoded again for "
                        "the work, has 30 frames, not 40 as when it was checked",
        "more frames": f"{video} changed during the run: its video, decoded again for "
                       "the work, has at least 41 frames, not 40 as when it was checked",
        "another size": f"{video} changed during the run: its video, decoded again for "
                        "the work, has a first frame of 16x24 px (width x height), not "
                        "16x16 px as when it was checked",
    }[case]
    with pytest.raises(InputError, match=re.escape(message)):
        AutoencodePipeline(model)(video, np.zeros(50 * 64, np.float32))


def test_a_video_named_by_an_open_descriptor_is_decoded_once(tmp_path, model, monkeypatch):
    """A video named by an open descriptor (/dev/stdin redirected from a file,
    /dev/fd/N) is not checked (base.readable_twice): on macOS and the BSDs a second
    open shares the descriptor's offset. Its frames are decoded once, for the clips,
    and the answer is that of the file by its own name."""
    from helpers import record_video_checks
    from perceiver_torch.pipelines import video as video_module

    video, _, _ = _sound_cases(tmp_path, "own")
    sound = np.zeros(11 * 64, np.float32)
    checked = record_video_checks(monkeypatch, video_module)
    pipeline = AutoencodePipeline(model)
    expected = pipeline(video, sound)
    assert checked == [str(video)]
    with open(video, "rb") as handle:
        result = pipeline(f"/dev/fd/{handle.fileno()}", sound)
    assert checked == [str(video)]  # not the descriptor's name
    np.testing.assert_array_equal(result.frames, expected.frames)
    np.testing.assert_array_equal(result.inputs, expected.inputs)


@pytest.mark.parametrize("damage", ["video", "sound", "short"])
def test_run_autoencode_checks_every_video_before_the_first_clip(
        tmp_path, model, video_checkpoint, monkeypatch, damage):
    """Several videos went one at a time, each checked at its turn: a third video
    that cannot be decoded partway through (its frames or its sound), or shorter than
    a clip, was named after the first two had gone through the model, and the run,
    which writes nothing when it fails, lost their work. Every video and its sound
    are now decoded (and a video's frames counted) before the first model call."""
    videos = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for i, video in enumerate(videos):
        frames = 1 if damage == "short" and i == 2 else 75
        make_test_video(video, frames, size=(16, 16), sample_rate=48000, seed=i)
    last = videos[2]
    if damage == "video":
        damage_video_midway(last)
    elif damage == "sound":
        damage_sound_midway(last)
    message = {
        "video": f"{last}: the video cannot be decoded",
        "sound": f"{last}: the sound cannot be decoded",
        "short": f"{last} has 1 frame(s); the model autoencodes clips of 2 frames: give a "
                 "longer video",
    }[damage]
    calls = fail_on_call(monkeypatch, type(model), "reconstruct", 1,
                         "the model ran before every video was checked")
    (tmp_path / "out").mkdir()
    result = run_cli("run", "autoencode", video_checkpoint, *videos, "-o", tmp_path / "out")
    assert result.exit_code == 3 and message in result.stderr, result.stderr
    assert list((tmp_path / "out").iterdir()) == []
    assert calls == []


def test_run_autoencode_decodes_each_video_twice_not_three_times(tmp_path, model,
                                                                 monkeypatch):
    """The checks before every video's work are those the clips would make: the clips
    take their counts (to compare with the second read) rather than decode each
    video and sound a third time. The answers are the pipeline's."""
    from perceiver_torch.pipelines import video as video_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.media import SoundReader

    videos = [tmp_path / f"v{i}.mp4" for i in range(2)]
    for i, video in enumerate(videos):
        make_test_video(video, 5, size=(16, 16), sample_rate=48000, seed=i)
    events: List[str] = []
    real_check, real_sound_check = video_module.check_video, SoundReader.check

    def check_video(path, *args, **kwargs):
        events.append(f"video {Path(path).name}")
        return real_check(path, *args, **kwargs)

    def sound_check(self):
        events.append(f"sound {Path(self.path).name}")
        return real_sound_check(self)

    original = type(model).reconstruct

    def reconstruct(self, *args, **kwargs):
        events.append("model")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(video_module, "check_video", check_video)
    monkeypatch.setattr(SoundReader, "check", sound_check)
    monkeypatch.setattr(type(model), "reconstruct", reconstruct)
    (tmp_path / "out").mkdir()
    documents = video_module.run_task(AutoencodePipeline(model), [str(v) for v in videos],
                                      RunOptions(output=tmp_path / "out"))
    assert events == ["video v0.mp4", "sound v0.mp4", "video v1.mp4", "sound v1.mp4",
                      *["model"] * 4]  # 5 frames: 2 clips of 2 each
    monkeypatch.undo()
    for video, document in zip(videos, documents):
        assert document["clips"] == AutoencodePipeline(model)(video).as_dict()["clips"]


@pytest.mark.parametrize("changed", ["video", "sound"])
def test_run_autoencode_refuses_a_file_changed_after_the_checks(tmp_path, model,
                                                                 monkeypatch, changed):
    """The checks before every video's work keep the video's count and file state and
    the sound's length: a video or --audio file written to or replaced before its
    work (hours later, for the last of many videos) is refused rather than answered
    from another file than the one checked."""
    from perceiver_torch.pipelines import video as video_module
    from perceiver_torch.pipelines.base import RunOptions

    video, audio, _ = _sound_cases(tmp_path, "long")  # 30 frames' worth of sound
    if changed == "video":
        replacement = tmp_path / "other.mp4"
        make_test_video(replacement, 13, size=(24, 32), sample_rate=None, seed=3)
        target = video
        message = (f"{video} changed during the run: it was written to or replaced after "
                   "the inputs were checked")
    else:
        replacement = tmp_path / "other.wav"
        write_pcm_wav(replacement, np.zeros((1, 3000), np.int16), 1600)
        target = audio
        message = (f"{audio} changed during the run: its sound, decoded again for the "
                   "work, has ")
    real = video_module._check_video_files

    def check_then_replace(*args, **kwargs):
        checks = real(*args, **kwargs)
        replacement.replace(target)
        return checks

    monkeypatch.setattr(video_module, "_check_video_files", check_then_replace)
    (tmp_path / "out").mkdir()
    options = RunOptions(output=tmp_path / "out", extra={"audio": str(audio)})
    with pytest.raises(InputError, match=re.escape(message)):
        video_module.run_task(AutoencodePipeline(model), [str(video)], options)


def test_run_autoencode_opens_a_sound_named_by_an_open_descriptor_once(tmp_path, model,
                                                                        monkeypatch):
    """--audio /dev/stdin (here /dev/fd/N of a file opened here) is neither checked
    nor opened by the checks before the work: on macOS and the BSDs a second open
    shares the descriptor's offset, and the clips would find the sound read. The
    clips' reader is the one opening; the answers are those of the file's name."""
    from perceiver_torch.pipelines import video as video_module
    from perceiver_torch.pipelines.base import RunOptions

    video, audio, _ = _sound_cases(tmp_path, "long")
    opened: List[str] = []
    real = video_module.SoundReader

    class CountedReader(real):
        def __init__(self, path, *args, **kwargs):
            opened.append(os.fspath(path))
            super().__init__(path, *args, **kwargs)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    expected = video_module.run_task(
        AutoencodePipeline(model), [str(video)],
        RunOptions(output=tmp_path / "a", extra={"audio": str(audio)}))
    monkeypatch.setattr(video_module, "SoundReader", CountedReader)
    with open(audio, "rb") as handle:
        by_descriptor = f"/dev/fd/{handle.fileno()}"
        documents = video_module.run_task(
            AutoencodePipeline(model), [str(video)],
            RunOptions(output=tmp_path / "b", extra={"audio": by_descriptor}))
    assert opened == [by_descriptor]  # the clips' reader only
    assert documents[0]["clips"] == expected[0]["clips"]


@pytest.fixture(scope="module")
def checkpoint_model(video_checkpoint: Path) -> torch.nn.Module:
    """The model ``run`` loads from ``video_checkpoint``."""
    from converter.run_cli import load_any_model

    return load_any_model(video_checkpoint)[0]


@pytest.mark.parametrize("sound", ["own", "short", "long"])
@pytest.mark.parametrize("arrays", [None, "npy", "npz"])
def test_run_autoencode_clip_by_clip_writes_the_whole_video_results(
    tmp_path, checkpoint_model, video_checkpoint, sound, arrays
):
    """The files, the document and the lines of run autoencode, which goes clip by
    clip, are those of the whole video computed at once (here, from the pipeline's
    parts: :func:`_whole_video_reference`): the arrays and the .wav byte for byte,
    the video's decoded frames and sound those write_video makes of the whole
    reconstruction, each clip's PSNR and labels, the dropped frame and the padding.
    So is the pipeline call's result, and AutoencodePipeline.clips' parts."""
    import io

    from perceiver_torch.pipelines.media import iter_video_frames, write_video

    model = checkpoint_model
    video, audio, sound_file = _sound_cases(tmp_path, sound)
    expected = _whole_video_reference(model, video, sound_file)
    out = tmp_path / "out" / {None: "r.mp4", "npy": "r.npy", "npz": "r.npz"}[arrays]
    out.parent.mkdir()
    flags = ["--audio", audio] if audio else []
    flags += [f"--{arrays}"] if arrays else []
    result = run_cli("run", "autoencode", video_checkpoint, video, *flags, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]

    # The pipeline call: the same arrays as the reference, the document's summary.
    pipeline = AutoencodePipeline(model)
    whole = pipeline(video, audio)
    for name in ("frames", "audio", "label_logits", "inputs", "input_audio"):
        assert np.array_equal(getattr(whole, name), expected[name]), name
    assert (whole.dropped_frames, whole.padded_samples) == (
        expected["dropped_frames"], expected["padded_samples"])
    assert [clip.psnr for clip in whole.clips] == expected["psnr"]
    assert {k: v for k, v in document.items() if k not in ("input", "audio", "files")} \
        == whole.as_dict()
    assert (expected["padded_samples"] > 0) == (sound == "short")
    # AutoencodePipeline.clips: the same parts, the whole video's facts once finished.
    stream = pipeline.clips(video, audio)
    assert not stream.finished and stream.notes == []
    parts = list(stream)
    assert stream.finished and stream.as_dict() == whole.as_dict()
    assert np.array_equal(np.concatenate([p.frames for p in parts]), expected["frames"])
    assert np.array_equal(np.concatenate([p.video_uint8() for p in parts]), whole.video_uint8())

    # Each clip's line and the notes, as the document has them.
    lines = result.stderr.splitlines()
    for clip, psnr_value in zip(document["clips"], expected["psnr"]):
        start, stop = clip["frames"]
        assert any(line.startswith(f"  frames {start}-{stop - 1}: PSNR {psnr_value:.2f} dB; ")
                   for line in lines)
    assert [line[len("  note: "):] for line in lines if line.startswith("  note: ")] \
        == document["notes"]

    if arrays == "npz":
        assert document["files"] == [str(out)]
        with np.load(out) as written:
            assert written.files == ["frames", "audio", "label_logits"]
            for name in written.files:
                assert written[name].dtype == np.float32
                assert np.array_equal(written[name], expected[name]), name
    elif arrays == "npy":
        names = [out, out.with_name("r.audio.npy"), out.with_name("r.label_logits.npy")]
        assert document["files"] == [str(n) for n in names]
        for name, key in zip(names, ("frames", "audio", "label_logits")):
            saved = io.BytesIO()
            np.save(saved, expected[key])
            assert name.read_bytes() == saved.getvalue(), name
    else:
        wav = out.with_suffix(".wav")
        assert document["files"] == [str(out), str(wav)]
        assert wav.read_bytes() == encode_wav(expected["audio"], 1600)
        reference = tmp_path / "reference.mp4"
        pictures = np.clip(np.nan_to_num(expected["frames"] * 255, nan=0.0), 0, 255)
        write_video(reference, pictures.astype(np.uint8), 25, expected["audio"], 1600)
        assert np.array_equal(np.stack(list(iter_video_frames(out))),
                              np.stack(list(iter_video_frames(reference))))
        assert np.array_equal(read_audio(out, 48000)[0], read_audio(reference, 48000)[0])
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        Path(f).name for f in document["files"])  # no temporary file left


@pytest.mark.parametrize("caller", ["cli", "run_task"])
@pytest.mark.parametrize("output", ["r.mp4", "r.gif", "r.npy", "r.npz"])
def test_run_autoencode_failing_mid_video_writes_nothing(tmp_path, model, video_checkpoint,
                                                         monkeypatch, output, caller):
    """The video and .wav are written as the clips come (and --npy/--npz spooled):
    a model that fails on the second clip (exit 3, as anything unexpected) leaves no
    file and no temporary file; so does the runner called from a script with
    RunOptions' defaults (they wrote straight to the file, a partial video)."""
    video, _, _ = _sound_cases(tmp_path, "own")
    (tmp_path / "out").mkdir()
    calls = fail_on_call(monkeypatch, type(model), "reconstruct", 2,
                         "the model failed on the second clip")
    arrays = {".npy": "npy", ".npz": "npz"}.get(Path(output).suffix)
    if caller == "run_task":
        from perceiver_torch.pipelines.base import RunOptions
        from perceiver_torch.pipelines.video import run_task

        options = RunOptions(output=tmp_path / "out" / output, arrays=arrays)
        with pytest.raises(RuntimeError, match="the model failed on the second clip"):
            run_task(AutoencodePipeline(model), [str(video)], options)
    else:
        flags = [f"--{arrays}"] if arrays else []
        result = run_cli("run", "autoencode", video_checkpoint, video, *flags,
                         "-o", tmp_path / "out" / output)
        assert result.exit_code == 3 and "the model failed on the second clip" in result.stderr
    assert len(calls) == 2
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("output", ["r.mp4", "r.npy", "r.npz"])
def test_run_autoencode_disk_full_while_spooling_is_one_line(
    tmp_path, video_checkpoint, monkeypatch, output
):
    """The .wav's sound and the --npy/--npz arrays go to temporary files as the clips
    come; a full disk there is a one-line error naming the folder (exit 3, nothing
    written, the temporary files closed), not "unexpected OSError ... please report
    it"."""
    video, _, _ = _sound_cases(tmp_path, "own")
    (tmp_path / "out").mkdir()
    spools = full_disk_temporary_files(monkeypatch, room=1)
    flags = {".npy": ["--npy"], ".npz": ["--npz"]}.get(Path(output).suffix, [])
    result = run_cli("run", "autoencode", video_checkpoint, video, *flags,
                     "-o", tmp_path / "out" / output)
    assert result.exit_code == 3, result.stderr
    assert re.search(f"keeping the [a-z' ]+ on disk in {re.escape(str(tmp_path / 'out'))} "
                     "failed after 0 of them: No space left on device", result.stderr)
    assert "unexpected" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
    assert spools and all(spool.closed and spool.raw.closed for spool in spools)


def _tracked_files(monkeypatch) -> Dict[str, List[str]]:
    """Records, per kind ("video", "sound"), the files the autoencode pipeline opens
    for decoding and those it has closed again: the video's frame decoder (a
    generator, closed when its ``finally`` runs) and the SoundReader."""
    from perceiver_torch.pipelines import video as video_module

    files: Dict[str, List[str]] = {"video": [], "video closed": [], "sound": [],
                                   "sound closed": []}
    real_frames, real_reader = video_module.iter_video_frames, video_module.SoundReader

    def tracked_frames(path, *args, **kwargs):
        files["video"].append(str(path))
        try:
            yield from real_frames(path, *args, **kwargs)
        finally:
            files["video closed"].append(str(path))

    class TrackedReader(real_reader):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            files["sound"].append(str(path))

        def close(self):
            if not getattr(self, "closed_once", False):  # each reader once
                self.closed_once = True
                files["sound closed"].append(str(self.path))
            super().close()

    monkeypatch.setattr(video_module, "iter_video_frames", tracked_frames)
    monkeypatch.setattr(video_module, "SoundReader", TrackedReader)
    return files


@pytest.mark.parametrize("caller", ["call", "clips"])
def test_a_failed_clip_closes_the_video_and_sound_files(tmp_path, model, monkeypatch, caller):
    """A model (or anything) failing on the second clip: the video's decoder was let
    go with the iteration's frame, which the exception's traceback keeps as long as
    the exception is kept (a REPL keeps the last one): the video file stayed open
    (on Windows, neither deletable nor replaceable). The pipeline call before clip by
    clip had decoded every frame, and closed the file, before the model ran."""
    video, audio, _ = _sound_cases(tmp_path, "long")
    files = _tracked_files(monkeypatch)
    fail_on_call(monkeypatch, type(model), "reconstruct", 2,
                 "the model failed on the second clip")
    pipeline = AutoencodePipeline(model)
    with pytest.raises(RuntimeError, match="second clip") as kept:
        if caller == "call":
            pipeline(video, audio)
        else:
            for part in pipeline.clips(video, audio):
                pass
    assert kept.traceback  # the exception, and its frames, still held here
    assert files["video"] == files["video closed"] == [str(video)]
    assert files["sound"] == files["sound closed"] == [str(audio)]


@pytest.mark.parametrize("output", ["r.mp4", "r.npy"])
def test_a_failed_write_closes_the_video_and_sound_files(tmp_path, model, monkeypatch,
                                                         output):
    """The runner's own failure between clips (the encoder, a write: not the clips'
    iteration) left the iteration suspended, the video and sound files open as long
    as the exception was kept; run autoencode now closes the clips however it ends."""
    from perceiver_torch.pipelines import video as video_module
    from perceiver_torch.pipelines.base import RunOptions

    video, audio, _ = _sound_cases(tmp_path, "long")
    (tmp_path / "out").mkdir()
    files = _tracked_files(monkeypatch)
    # The video encoder's sound, or the arrays' spool.
    owner, method = {"r.mp4": (video_module.VideoWriter, "add_sound"),
                     "r.npy": (video_module.DiskSpool, "append")}[output]
    fail_on_call(monkeypatch, owner, method, 2, "the writer failed on the second clip")
    options = RunOptions(output=tmp_path / "out" / output, extra={"audio": str(audio)},
                         arrays="npy" if output.endswith(".npy") else None)
    with pytest.raises(RuntimeError, match="second clip") as kept:
        video_module.run_task(AutoencodePipeline(model), [str(video)], options)
    assert kept.traceback  # the exception, and its frames, still held here
    assert files["video"] == files["video closed"] == [str(video)]
    # The reader of the check before every video's work, then the clips'.
    assert files["sound"] == files["sound closed"] == [str(audio)] * 2
    assert list((tmp_path / "out").iterdir()) == []


def test_clips_left_early_are_closed_by_close_or_a_with_block(tmp_path, model, monkeypatch):
    """A loop over AutoencodePipeline.clips left with break kept the video and sound
    files open, with their decoders, as long as the AutoencodeClips object lived, and
    nothing could close them; close() (or a with block) does, also before any clip
    (the sound file is opened when the clips are made). After it, no clip comes (a
    new loop raises: test_clips_are_iterated_once)."""
    video, audio, _ = _sound_cases(tmp_path, "long")
    files = _tracked_files(monkeypatch)
    pipeline = AutoencodePipeline(model)

    stream = pipeline.clips(video, audio)
    for part in stream:
        break
    assert files["video"] == [str(video)] and files["video closed"] == []
    assert files["sound"] == [str(audio)] and files["sound closed"] == []
    stream.close()
    assert files["video closed"] == [str(video)] and files["sound closed"] == [str(audio)]
    assert not stream.finished and len(stream.clips) == 1

    files["video closed"].clear(), files["sound closed"].clear()
    with pipeline.clips(video, audio) as stream:
        for part in stream:
            break
    assert files["video closed"] == [str(video)] and files["sound closed"] == [str(audio)]

    files["sound closed"].clear()
    unused = pipeline.clips(video, audio)  # never iterated: only the sound file is open
    unused.close()
    assert files["sound closed"] == [str(audio)]


def test_clips_are_iterated_once(model):
    """A second loop over one AutoencodeClips was silently empty after a whole pass,
    and after a break went on from the next clip (a "pass" without the first clips);
    after close() it was empty too. Each raises now, saying to call clips() again;
    going on after a break stays possible through the one iterator."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)  # 3 clips of 2 frames
    audio = rng.uniform(-0.5, 0.5, 6 * 64).astype(np.float32)
    pipeline = AutoencodePipeline(model)
    again = r"iterated once .*call pipeline\.clips\(video\) again for a new pass"

    stream = pipeline.clips(frames, audio)
    assert [part.clip.start for part in stream] == [0, 2, 4] and stream.finished
    with pytest.raises(RuntimeError, match=again):
        iter(stream)

    stream = pipeline.clips(frames, audio)
    for part in stream:
        break
    with pytest.raises(RuntimeError, match=again):
        for part in stream:
            pass
    assert len(stream.clips) == 1 and not stream.finished

    # The one iterator goes on where the loop stopped (a generator's way).
    stream = pipeline.clips(frames, audio)
    parts = iter(stream)
    for part in parts:
        break
    assert [part.clip.start for part in parts] == [2, 4] and stream.finished

    for closed_after in (0, 1):  # closed before any clip, or after the first
        stream = pipeline.clips(frames, audio)
        if closed_after:
            next(iter(stream))
        stream.close()
        with pytest.raises(RuntimeError, match=again):
            list(stream)
        assert len(stream.clips) == closed_after and not stream.finished

    # The pipeline call, built on clips(), makes one pass of a new AutoencodeClips.
    assert [clip.start for clip in pipeline(frames, audio).clips] == [0, 2, 4]
