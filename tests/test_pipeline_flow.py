"""The flow pipeline: the colab's tiling and blending, .flo files, the colour renderings
and ``perceiver-convert run flow`` (on frames and videos the tests make)."""

from __future__ import annotations

import colorsys
import functools
import json
import re
import struct
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

import perceiver_torch as pt
from perceiver_torch.optical_flow import tile_grid, tile_starts
from perceiver_torch.pipelines.base import InputError, PipelineError
from perceiver_torch.pipelines.flow import FlowPipeline, FlowResult, textured_pair
from perceiver_torch.pipelines.flow_io import (
    colour_wheel,
    decode_flo,
    encode_flo,
    flow_to_hsv,
    flow_to_wheel,
    max_magnitude,
    render_flow,
    wheel_legend,
)

from helpers import (
    act_at_read,
    alive_counts,
    batch_sizes_of_calls,
    fail_on_call,
    full_disk_temporary_files,
    run_cli,
    track_alive,
)

pytest.importorskip("av")
pytest.importorskip("cv2")
Image = pytest.importorskip("PIL.Image")

TILE = (24, 32)  # the tiny optical_flow config's training size


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"]).eval()
    # Random, non-zero weights everywhere (the official output layer starts at zero).
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def colab_origins(size: int, tile: int, min_overlap: int) -> List[int]:
    """The colab's compute_grid_indices along one axis, spelled out independently."""
    origins = [o for o in range(0, size, tile - min_overlap)]
    origins[-1] = size - tile
    return origins


def colab_blend(model: torch.nn.Module, frames: torch.Tensor, min_overlap: int) -> np.ndarray:
    """The colab's loop over every listed origin (repeats included), float64 blend.
    frames (1, 2, 3, H, W) -> (H, W, 2)."""
    th, tw = TILE
    height, width = frames.shape[-2:]
    num = np.zeros((height, width, 2))
    den = np.zeros((height, width, 1))
    ys = colab_origins(height, th, min_overlap)
    xs = colab_origins(width, tw, min_overlap)
    assert max(ys) <= height - th and max(xs) <= width - tw  # the colab's valid regime
    yy, xx = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
    weights = np.minimum(np.minimum(xx + 1, tw - xx), np.minimum(yy + 1, th - yy))[..., None]
    for y in ys:
        for x in xs:
            with torch.no_grad():
                piece = model(frames[..., y : y + th, x : x + tw])[0].permute(1, 2, 0)
            num[y : y + th, x : x + tw] += piece.double().numpy() * weights
            den[y : y + th, x : x + tw] += weights
    return num / den


def test_tile_starts_follow_the_colab_formula():
    # 44 = 2 * 20 + 4: range(0, 44, 20) = [0, 20, 40], the last set to 20: a repeat.
    assert tile_starts(44, 24, 4) == colab_origins(44, 24, 4) == [0, 20, 20]
    assert tile_starts(60, 32, 4) == colab_origins(60, 32, 4) == [0, 28, 28]
    # 50 and 70: no repeat.
    assert tile_starts(50, 24, 4) == colab_origins(50, 24, 4) == [0, 20, 26]
    assert tile_starts(70, 32, 4) == colab_origins(70, 32, 4) == [0, 28, 38]
    # Where the colab overhangs (its code fails), the origins are clamped to the border.
    assert tile_starts(42, 24, 4) == [0, 18, 18]
    assert tile_grid(44, 60, TILE, 4) == [(0, 0, 1), (0, 28, 2), (20, 0, 2), (20, 28, 4)]


# Bound: the pipeline batches 3 tiles per call and accumulates in float32, the reference
# runs tiles one by one and blends in float64. Both blend the same float32 tile outputs
# up to the batched kernels' rounding (a few float32 ulps of values of order 1 through
# a 2-layer tiny model); a convex combination does not amplify them: 1e-5 relative and
# 1e-6 absolute hold with a wide margin, while a wrong weight, origin or repeat moves
# the result by 1e-2 or more (checked below).
@pytest.mark.parametrize("size", [(44, 60), (50, 70)], ids=["repeated-origins", "no-repeat"])
def test_tiling_equals_the_colab_loop(model, size):
    first, second = textured_pair(*size, shift=(1, 2), seed=5)
    pipeline = FlowPipeline(model, min_overlap=4, batch_size=3)
    got = pipeline(first, second).flow
    frames = torch.from_numpy(
        (np.stack([first, second]).astype(np.float64) / 255 * 2 - 1).astype(np.float32)
    ).permute(0, 3, 1, 2)[None]
    expected = colab_blend(model, frames, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if size == (44, 60):
        # The repeats matter: the same origins, each counted once, blend differently.
        th, tw = TILE
        num = np.zeros(size + (2,))
        den = np.zeros(size + (1,))
        w = pt.optical_flow.tile_weights(th, tw).double().numpy()[..., None]
        for y, x, _ in tile_grid(*size, TILE, 4):
            with torch.no_grad():
                piece = model(frames[..., y : y + th, x : x + tw])[0].permute(1, 2, 0)
            num[y : y + th, x : x + tw] += piece.double().numpy() * w
            den[y : y + th, x : x + tw] += w
        assert np.abs(num / den - expected).max() > 1e-3


def test_one_tile_frames_equal_the_model(model):
    first, second = textured_pair(*TILE, seed=2)
    got = FlowPipeline(model)(first, second).flow
    frames = torch.from_numpy(
        (np.stack([first, second]).astype(np.float64) / 255 * 2 - 1).astype(np.float32)
    ).permute(0, 3, 1, 2)[None]
    with torch.no_grad():
        direct = model(frames)[0].permute(1, 2, 0).numpy()
    # The colab lists this tile several times; the blend is the tile itself.
    np.testing.assert_allclose(got, direct, rtol=1e-6, atol=1e-7)


def test_result_as_dict_is_a_json_summary(model):
    # FlowResult had no as_dict (ClassifyResult, FillMaskResult and ClipResult do);
    # run --json built the same fields by hand.
    first, second = textured_pair(TILE[0] + 4, TILE[1] + 8, seed=3)
    result = FlowPipeline(model)(first, second)
    result.notes.append("a note")
    document = result.as_dict()
    assert json.loads(json.dumps(document, allow_nan=False)) == document  # no arrays
    flow = result.flow.astype(np.float64)
    assert document == {
        "size": [TILE[0] + 4, TILE[1] + 8],
        "tiles": result.tiles,
        "max_flow": pytest.approx(float(np.sqrt((flow**2).sum(-1)).max()), rel=1e-12),
        "mean_flow": pytest.approx(flow.reshape(-1, 2).mean(0).tolist(), rel=1e-5),
        "notes": ["a note"],
    }
    assert result.tiles == len(tile_grid(TILE[0] + 4, TILE[1] + 8, TILE, 20)) > 1


def test_small_frames_are_refused_or_padded(model):
    first, second = textured_pair(20, 30)
    # Sizes as width x height, as classify and image viewers give them.
    with pytest.raises(InputError, match=r"are 30x20 px \(width x height\), smaller than "
                       r"the model's 32x24 tile.*\(--pad; pad=True in Python\)"):
        FlowPipeline(model)(first, second)
    padded = FlowPipeline(model, pad=True)(first, second).flow
    assert padded.shape == (20, 30, 2) and np.isfinite(padded).all()
    # Padding is edge replication to the tile, then the crop of the model's flow.
    big_first = np.pad(first, ((0, 4), (0, 2), (0, 0)), mode="edge")
    big_second = np.pad(second, ((0, 4), (0, 2), (0, 0)), mode="edge")
    direct = FlowPipeline(model)(big_first, big_second).flow[:20, :30]
    np.testing.assert_allclose(padded, direct, rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match=r"differ in size \(30x20 and 30x19 px, width x"):
        FlowPipeline(model)(first, second[:-1])


def test_bfloat16_frames_equal_uint8_frames(model):
    # load_rgb could not turn a bfloat16 tensor into NumPy; 0..255 is exact in it.
    first, second = textured_pair(*TILE, seed=4)
    as_bf16 = [torch.from_numpy(f).permute(2, 0, 1).bfloat16() for f in (first, second)]
    pipeline = FlowPipeline(model)
    assert np.array_equal(pipeline(*as_bf16).flow, pipeline(first, second).flow)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "batch_size must be .*at least 1, got 0"),
        ({"batch_size": -2}, "batch_size must be .*at least 1, got -2"),
        ({"min_overlap": -1}, "min_overlap must be between 0 and 23"),
        ({"min_overlap": 24}, "min_overlap must be between 0 and 23"),
    ],
)
def test_bad_options_are_usage_errors(model, options, message):
    # Usage errors (exit 2), not bad input (PipelineError's default, exit 3).
    with pytest.raises(PipelineError, match=message) as info:
        FlowPipeline(model, **options)
    assert info.value.exit_code == 2


def test_max_frames_below_one_is_refused(model, tmp_path):
    from perceiver_torch.pipelines.video import make_test_video

    path = tmp_path / "v.mp4"
    make_test_video(path, 3, size=TILE, sample_rate=None)
    pipeline = FlowPipeline(model)
    for bad in (0, -1):
        # It was "v.mp4 has no frames" (an InputError), once iterated.
        message = f"max_frames must be .* at least 1, got {bad}"
        with pytest.raises(PipelineError, match=message) as info:
            list(pipeline.video(path, max_frames=bad))
        assert info.value.exit_code == 2
    assert len(list(pipeline.video(path, max_frames=2))) == 1
    assert len(list(pipeline.video(path))) == 2


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        meta = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"])
    with pytest.raises(PipelineError, match="meta device.*load it on cpu or cuda") as info:
        FlowPipeline(meta)
    assert info.value.exit_code == 2


# -- .flo ---------------------------------------------------------------------------


def test_flo_bytes_field_by_field_and_round_trip():
    height, width = 3, 5
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    flow = np.stack([y * 100 + x + 0.25, -(y * 100 + x) - 0.5], axis=-1)
    data = encode_flo(flow)
    assert len(data) == 12 + height * width * 2 * 4
    assert data[:4] == b"PIEH"  # the tag: float32 202021.25, little-endian
    assert struct.unpack("<f", data[:4])[0] == 202021.25
    assert struct.unpack("<i", data[4:8])[0] == width
    assert struct.unpack("<i", data[8:12])[0] == height
    values = struct.unpack(f"<{height * width * 2}f", data[12:])
    # Row-major, u and v interleaved: pixel (y, x) at 2 * (y * W + x).
    for yy in range(height):
        for xx in range(width):
            i = 2 * (yy * width + xx)
            assert values[i] == yy * 100 + xx + 0.25
            assert values[i + 1] == -(yy * 100 + xx) - 0.5
    back = decode_flo(data)
    assert back.dtype == np.float32 and back.shape == flow.shape
    assert back.tobytes() == flow.astype(np.float32).tobytes()
    with pytest.raises(InputError, match="PIEH"):
        decode_flo(b"XXXX" + data[4:])
    with pytest.raises(InputError, match="should be"):
        decode_flo(data[:-1])
    # An empty flow was written, then refused by the reader; a path given to the
    # reader read as "only N bytes".
    with pytest.raises(ValueError, match="H, W >= 1"):
        encode_flo(np.zeros((0, 4, 2), np.float32))
    with pytest.raises(TypeError, match="read_bytes"):
        decode_flo("flow.flo")


# -- colours ----------------------------------------------------------------------------


def test_colour_wheel_segments():
    wheel = colour_wheel()
    assert wheel.shape == (55, 3)
    # The six segments (RY 15, YG 6, GC 4, CB 11, BM 13, MR 6) start at pure colours.
    starts = {0: (255, 0, 0), 15: (255, 255, 0), 21: (0, 255, 0), 25: (0, 255, 255),
              36: (0, 0, 255), 49: (255, 0, 255)}
    for index, colour in starts.items():
        assert tuple(wheel[index]) == colour, index
    # Inside a segment one channel moves by floor(255 * i / n): RY i = 1 -> g = 17.
    assert tuple(wheel[1]) == (255, 17, 0)
    assert tuple(wheel[54]) == (255, 0, 255 - np.floor(255 * 5 / 6))


def test_wheel_colours_at_known_angles():
    # One picture, normalised by its largest flow (3 px): +x, -x, +y (down), none.
    flow = np.array([[[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, 0.0]]], dtype=np.float32)
    picture = flow_to_wheel(flow)
    # +x: angle position 0 -> the wheel's first colour, red.
    assert tuple(picture[0, 0]) == (255, 0, 0)
    # -x: position (0 + 1) / 2 * 54 = 27, CB's third colour: g = 255 - floor(255 * 2 / 11).
    assert tuple(picture[0, 1]) == (0, 209, 255)
    # +y: position 13.5, halfway between RY's g = 221 and 238 -> floor(229.5) = 229.
    assert tuple(picture[0, 2]) == (255, 229, 0)
    assert tuple(picture[0, 3]) == (255, 255, 255)  # no motion: white
    # Half the largest flow: halfway to white. Beyond max_flow: darkened by 0.75.
    half = flow_to_wheel(np.array([[[1.0, 0.0], [2.0, 0.0]]]), max_flow=2.0)
    assert tuple(half[0, 0]) == (255, 127, 127)
    beyond = flow_to_wheel(np.array([[[4.0, 0.0]]]), max_flow=2.0)
    assert tuple(beyond[0, 0]) == (191, 0, 0)  # floor(0.75 * 255)


def test_hsv_rendering_is_the_colab_without_the_swap():
    flow = np.array([[[30.0, 0.0], [0.0, 30.0], [-12.0, 0.0]]], dtype=np.float32)
    picture = flow_to_hsv(flow)
    # +x at full saturation is red (the colab's BGR-shown-as-RGB would show blue).
    assert tuple(picture[0, 0]) == (255, 0, 0)
    # Independent: hue = angle, saturation = min(|f| * 255 / 24, 255) truncated, value 1.
    for i, (u, v) in enumerate(flow[0]):
        angle = np.degrees(np.arctan2(v, u)) % 360
        saturation = int(min(np.hypot(u, v) * 255 / 24, 255)) / 255
        expected = np.array(colorsys.hsv_to_rgb(angle / 360, saturation, 1.0)) * 255
        # OpenCV's hue has 2-degree steps and 8-bit arithmetic: within 3 levels.
        assert np.abs(picture[0, i].astype(float) - expected).max() <= 3, (i, picture[0, i], expected)


# -- perceiver-convert run flow ----------------------------------------------------------


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flow_model")
    path = folder / "optical_flow.pickle"
    assert run_cli("fixture", "optical_flow", "--size", "tiny", "-o", path).exit_code == 0
    return path


def _frames(folder: Path, size=(40, 56), count=2) -> List[Path]:
    paths = []
    frames = textured_pair(*size, shift=(1, 2), seed=1)
    for i in range(count):
        path = folder / f"frame{i}.png"
        Image.fromarray(frames[i % 2]).save(path)
        paths.append(path)
    return paths


def test_run_flow_writes_flo_and_png(tmp_path, flow_checkpoint):
    a, b = _frames(tmp_path)
    result = run_cli("run", "flow", flow_checkpoint, a, b, "-o", tmp_path / "out.png", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]
    assert document["files"] == [str(tmp_path / "out.flo"), str(tmp_path / "out.png")]
    flow = decode_flo((tmp_path / "out.flo").read_bytes())
    assert flow.shape == (40, 56, 2)
    # The human line gives width x height (as classify and image viewers do); the
    # document's "size" stays [height, width], the arrays' order.
    assert f"{a} -> {b}: 56x40, " in result.stderr
    assert document["size"] == [40, 56]
    # The document is FlowResult.as_dict of the pair, with its inputs and files.
    summary = FlowResult(flow=flow, tiles=document["tiles"]).as_dict()
    assert document == {"input": [str(a), str(b)], **summary, "files": document["files"]}
    picture = np.asarray(Image.open(tmp_path / "out.png"))
    assert picture.shape == (40, 56, 3)
    assert np.array_equal(picture, flow_to_wheel(flow))
    # --npy: the same flow in pixels, [H, W, 2].
    result = run_cli("run", "flow", flow_checkpoint, a, b, "--npy", "-o", tmp_path / "raw.npy")
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "raw.npy").tobytes() == flow.tobytes()


def test_run_flow_on_a_video(tmp_path, flow_checkpoint):
    av = pytest.importorskip("av")
    from perceiver_torch.pipelines.video import make_test_video

    make_test_video(tmp_path / "clip.mp4", 4, size=(40, 56), sample_rate=None)
    result = run_cli("run", "flow", flow_checkpoint, tmp_path / "clip.mp4", "--json",
                     "--render", "hsv")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]
    assert document["pairs"] == 3 and document["files"] == [str(tmp_path / "clip.flow.mp4")]
    with av.open(str(tmp_path / "clip.flow.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (40, 56, 3)
    result = run_cli("run", "flow", flow_checkpoint, tmp_path / "clip.mp4", "--npz",
                     "-o", tmp_path / "flows.npz")
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "flows.npz")["flow"].shape == (3, 40, 56, 2)


def _listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("small", 3, "smaller than the model's 32x24 tile"),
        ("garbage", 3, "cannot read"),
        ("one-frame", 2, "needs two frames"),
        ("mixed", 2, "one video or two or more frames"),
        ("missing-video", 3, "no such file"),
        ("folder-video", 3, "folder-video.mp4 is a folder; give the frames (image files"),
    ],
)
def test_run_flow_errors(tmp_path, flow_checkpoint, case, code, message):
    a, b = _frames(tmp_path, size=(20, 30) if case == "small" else (40, 56))
    inputs = [a, b]
    if case == "garbage":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png at all")
        inputs = [a, bad]
    elif case == "one-frame":
        inputs = [a]
    elif case == "mixed":
        inputs = [a, tmp_path / "clip.mp4"]
    elif case == "missing-video":
        inputs = [tmp_path / "absent.mp4"]
    elif case == "folder-video":  # was "no such file", though the folder exists
        inputs = [tmp_path / "folder-video.mp4"]
        inputs[0].mkdir()
    before = _listing(tmp_path)
    result = run_cli("run", "flow", flow_checkpoint, *inputs, "-o", tmp_path / "out")
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert _listing(tmp_path) == before  # no partial output, no temporary files
    # With --json the same error is one JSON document on stdout, same exit code.
    result = run_cli("run", "flow", flow_checkpoint, *inputs, "-o", tmp_path / "out",
                     "--json", "-q")
    assert result.exit_code == code, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == code
    assert message in document["error"]["message"]
    assert _listing(tmp_path) == before


def test_run_flow_on_gif_frames(tmp_path, flow_checkpoint):
    # Several GIFs are frames (GIF is a picture format too); one GIF alone is a video.
    gifs = []
    for i, frame in enumerate(textured_pair(48, 64, shift=(1, 2), seed=1)):
        gifs.append(tmp_path / f"still{i}.gif")
        Image.fromarray(frame).save(gifs[-1])
    result = run_cli("run", "flow", flow_checkpoint, *gifs, "-o", tmp_path / "gif.png",
                     "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)["results"][0]
    assert document["input"] == [str(g) for g in gifs]
    assert document["files"] == [str(tmp_path / "gif.flo"), str(tmp_path / "gif.png")]
    assert decode_flo((tmp_path / "gif.flo").read_bytes()).shape == (48, 64, 2)
    # An animated GIF among frames would be read as its first picture: refused.
    animated = tmp_path / "animated.gif"
    pictures = [Image.fromarray(f) for f in textured_pair(48, 64, shift=(1, 2), seed=2)]
    pictures[0].save(animated, save_all=True, append_images=pictures[1:], duration=100)
    before = _listing(tmp_path)
    result = run_cli("run", "flow", flow_checkpoint, gifs[0], animated, "-o",
                     tmp_path / "mixed.png")
    assert result.exit_code == 2 and "animated GIF (2 frames)" in result.stderr
    assert _listing(tmp_path) == before
    # Alone, the animated GIF is a video: the flow of its one frame pair.
    result = run_cli("run", "flow", flow_checkpoint, animated, "--npz", "-o",
                     tmp_path / "anim.npz")
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "anim.npz")["flow"].shape == (1, 48, 64, 2)


def test_run_flow_video_output_suffix_is_honoured_or_refused(tmp_path, flow_checkpoint):
    # -o X.mov wrote X.mov.mp4 and -o X.webm X.webm.mp4: the suffix asked for was
    # neither honoured nor refused.
    av = pytest.importorskip("av")
    from perceiver_torch.pipelines.video import make_test_video

    make_test_video(tmp_path / "clip.mp4", 3, size=(40, 56), sample_rate=None)
    result = run_cli("run", "flow", flow_checkpoint, tmp_path / "clip.mp4", "--json",
                     "-o", tmp_path / "flow.mov")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["files"] == [str(tmp_path / "flow.mov")]
    with av.open(str(tmp_path / "flow.mov")) as opened:
        assert "mov" in opened.format.name.split(",")
        assert len(list(opened.decode(video=0))) == 2
    before = _listing(tmp_path)
    for suffix in (".webm", ".avi"):
        result = run_cli("run", "flow", flow_checkpoint, tmp_path / "clip.mp4",
                         "-o", tmp_path / f"flow{suffix}")
        assert result.exit_code == 2, result.stderr
        assert f"flow does not write {suffix}" in result.stderr
        assert ".mp4, .mov, .mkv or .gif for a video" in result.stderr
        assert "flow with" not in result.stderr  # refused before the model is loaded
        assert _listing(tmp_path) == before


def test_run_flow_refuses_an_output_suffix_the_run_would_swap(tmp_path, flow_checkpoint):
    """-o names one of flow's formats that this run does not write: refused before the
    model is loaded. Frames with -o X.mp4 wrote X.flo and X.png, a video with -o X.flo
    wrote X.mp4, and -o X.npy without --npy wrote X.flo and X.png: each silently."""
    pytest.importorskip("av")
    from perceiver_torch.pipelines.video import make_test_video

    a, b = _frames(tmp_path)
    make_test_video(tmp_path / "clip.mp4", 3, size=(40, 56), sample_rate=None)
    before = _listing(tmp_path)
    cases = [
        ((a, b), "pair.mp4", "frames give a .flo and a .png per pair, not .mp4"),
        ((a, b), "pair.gif", "frames give a .flo and a .png per pair, not .gif"),
        ((a, b), "pair.npy", "add --npy for the raw arrays"),
        ((tmp_path / "clip.mp4",), "video.flo",
         "the flow of a video is written as a video (.mp4, .mov, .mkv, .gif), not .flo"),
        ((tmp_path / "clip.mp4",), "video.png", "not .png"),
        ((tmp_path / "clip.mp4",), "video.npz", "add --npz for the raw arrays"),
    ]
    for inputs, name, message in cases:
        result = run_cli("run", "flow", flow_checkpoint, *inputs, "-o", tmp_path / name)
        assert result.exit_code == 2, (name, result.stderr)
        assert message in result.stderr, (name, result.stderr)
        assert "flow with" not in result.stderr  # refused before the model is loaded
        assert _listing(tmp_path) == before
    # The suffixes each run writes, and a bare stem, still name its files.
    result = run_cli("run", "flow", flow_checkpoint, a, b, "-o", tmp_path / "pair", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["files"] == [
        str(tmp_path / "pair.flo"), str(tmp_path / "pair.png")]


def test_run_flow_notes_a_video_cut_short(tmp_path, flow_checkpoint):
    """A truncated video decodes to fewer frames than its container declares, without
    an error from FFmpeg: the run says so (it went on silently with a third missing);
    a whole video gets no such note."""
    pytest.importorskip("av")
    from helpers import truncated_video
    from perceiver_torch.pipelines.media import iter_video_frames, video_frame_count

    cut = truncated_video(tmp_path)
    decoded = sum(1 for _ in iter_video_frames(cut))
    assert video_frame_count(cut) == 30 and 2 <= decoded <= 28
    result = run_cli("run", "flow", flow_checkpoint, cut, "--json", "-o", tmp_path / "f.mp4")
    assert result.exit_code == 0, result.stderr
    note = f"{decoded} of the 30 frames the video declares were decoded"
    assert note in result.stderr
    (document,) = json.loads(result.stdout)["results"]
    assert document["pairs"] == decoded - 1 and note in document["notes"][0]
    from perceiver_torch.pipelines.video import make_test_video

    make_test_video(tmp_path / "whole.mp4", 3, size=(40, 56), sample_rate=None)
    result = run_cli("run", "flow", flow_checkpoint, tmp_path / "whole.mp4", "--json",
                     "-o", tmp_path / "w.mp4")
    assert result.exit_code == 0 and "note:" not in result.stderr
    assert json.loads(result.stdout)["results"][0]["notes"] == []


def _size_changing_video(path: Path, sizes) -> None:
    """An H.264 MPEG-TS video of 3 frames per (H, W) in ``sizes``: each part encoded
    alone (its own SPS, in band), the parts' packets muxed in one stream, as a
    broadcast or a screen recording switches resolution."""
    import av
    from fractions import Fraction

    packets = []
    for height, width in sizes:
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
        codec.time_base, codec.framerate = Fraction(1, 25), 25
        codec.options = {"bf": "0"}
        for i in range(3):
            pixels, _ = textured_pair(height, width, seed=i)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            packets += codec.encode(frame)
        packets += codec.encode(None)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = sizes[0]
        stream.pix_fmt = "yuv420p"
        for i, packet in enumerate(packets):
            packet.stream, packet.pts, packet.dts = stream, i, i
            packet.time_base = Fraction(1, 25)
            container.mux(packet)


def test_run_flow_names_a_video_that_changes_size(tmp_path, flow_checkpoint, model,
                                                  monkeypatch):
    """Frames 2 and 3 were refused as "the two frames differ in size (...); give
    frames of one size", which names neither the frames nor the video; the change is
    named, and now before any model call (it came after the flows of the pairs
    before it): the video is decoded whole first (media.check_video, one_size)."""
    from perceiver_torch.pipelines.media import iter_video_frames

    path = tmp_path / "switch.ts"
    _size_changing_video(path, [(40, 56), (56, 40)])
    assert [f.shape[:2] for f in iter_video_frames(path)] == [(40, 56)] * 3 + [(56, 40)] * 3
    calls = fail_on_call(monkeypatch, type(model), "tiled", 1,
                         "the model ran before the video was checked")
    result = run_cli("run", "flow", flow_checkpoint, path, "-o", tmp_path / "f.mp4")
    assert result.exit_code == 3, result.stderr
    assert (f"{path} changes size at frame 3 (from 0): 56x40 px before, 40x56 px from "
            "there (width x height)") in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "f.mp4").exists()
    with pytest.raises(InputError, match="changes size at frame 3"):
        FlowPipeline(model).video(path)  # at the call, no flow asked for yet
    assert calls == []


@pytest.mark.parametrize("caller", ["video", "cli"])
def test_a_video_that_cannot_be_decoded_partway_is_named_before_the_model_runs(
        tmp_path, model, flow_checkpoint, monkeypatch, caller):
    """The frames were decoded as the flows were computed, so a video damaged halfway
    through was named only after the flows of the pairs before the damage (minutes
    each at full size). It is decoded whole first, keeping only its frame count and
    first frame size: the decoder's error, with the same words, comes before any
    model call, at pipeline.video()'s call."""
    from helpers import damage_video_midway, frames_before_the_damage
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 11, size=(40, 56), sample_rate=None)
    damage_video_midway(video)
    message = f"{video}: the video cannot be decoded"
    assert frames_before_the_damage(video) >= 2  # the damage is past a first pair
    calls = fail_on_call(monkeypatch, type(model), "tiled", 1,
                         "the model ran before the video was checked")
    if caller == "video":
        with pytest.raises(InputError, match=re.escape(message)):
            FlowPipeline(model).video(video)  # at the call, no flow asked for yet
    else:
        (tmp_path / "out").mkdir()
        result = run_cli("run", "flow", flow_checkpoint, video, "-o", tmp_path / "out" / "f.mp4")
        assert result.exit_code == 3 and message in result.stderr, result.stderr
        assert list((tmp_path / "out").iterdir()) == []
    assert calls == []


def test_the_video_check_holds_one_frame_at_a_time(tmp_path, model, monkeypatch):
    """The check of a video decodes every frame before the first model call, and holds
    one frame at a time: it keeps their count and the first one's size."""
    from helpers import track_checked_frames
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 9, size=(40, 56), sample_rate=None)
    counts = track_checked_frames(monkeypatch)
    at_first_call: List[dict] = []

    def tiled(self, *args, **kwargs):
        at_first_call.append(dict(counts))
        raise RuntimeError("one pair is enough")

    monkeypatch.setattr(type(model), "tiled", tiled)
    with pytest.raises(RuntimeError, match="one pair is enough"):
        next(FlowPipeline(model).video(video))
    assert len(at_first_call) == 1
    assert at_first_call[0]["made"] == 9  # every frame, before the first pair
    assert at_first_call[0]["most"] == 1, at_first_call  # not a list of them


def test_a_video_of_frames_smaller_than_a_tile_is_refused_at_the_call(tmp_path, model):
    """The check gives the first frame's size: frames smaller than a tile are refused
    with the video's other errors, at pipeline.video()'s call (they were at the
    first flow asked for); pad=True takes them."""
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "small.mp4"
    make_test_video(video, 3, size=(20, 30), sample_rate=None)
    message = f"the frames of {video} are 30x20 px (width x height), smaller than"
    with pytest.raises(InputError, match=re.escape(message)):
        FlowPipeline(model).video(video)  # no flow asked for yet
    assert len(list(FlowPipeline(model, pad=True).video(video))) == 2


def test_a_video_changed_between_its_two_reads_is_refused(tmp_path, model, monkeypatch):
    """The video is decoded twice (checked, then again for the pairs): a file replaced
    between the reads by one of the same size and modification time (cp -p), which
    base.file_state cannot tell, is refused by its frame count rather than answered
    from another video (the autoencode tests go through the other cases)."""
    from helpers import replace_once_checked, same_size_mp4s
    from perceiver_torch.pipelines import flow as flow_module
    from perceiver_torch.pipelines.video import make_test_video

    video, other = tmp_path / "clip.mp4", tmp_path / "other.mp4"
    make_test_video(video, 7, size=(40, 56), sample_rate=None)
    make_test_video(other, 5, size=(40, 56), sample_rate=None, seed=1)
    same_size_mp4s(video, other)
    replace_once_checked(monkeypatch, flow_module, video, other)
    message = (f"{video} changed during the run: its video, decoded again for the work, "
               "has 5 frames, not 7 as when it was checked")
    with pytest.raises(InputError, match=re.escape(message)):
        list(FlowPipeline(model).video(video))


def test_a_video_named_by_an_open_descriptor_is_decoded_once(tmp_path, model, monkeypatch):
    """A video named by an open descriptor (/dev/stdin redirected from a file,
    /dev/fd/N) is not checked (base.readable_twice): on macOS and the BSDs a second
    open shares the descriptor's offset. It is decoded once, for the pairs, and the
    flows are those of the file by its own name."""
    from helpers import record_video_checks
    from perceiver_torch.pipelines import flow as flow_module
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 4, size=(40, 56), sample_rate=None)
    checked = record_video_checks(monkeypatch, flow_module)
    pipeline = FlowPipeline(model)
    expected = list(pipeline.video(video))
    assert checked == [str(video)]
    with open(video, "rb") as handle:
        flows = list(pipeline.video(f"/dev/fd/{handle.fileno()}"))
    assert checked == [str(video)]  # not the descriptor's name
    assert len(flows) == len(expected) == 3
    for got, want in zip(flows, expected):
        np.testing.assert_array_equal(got, want)


def test_run_flow_refuses_a_video_model(tmp_path):
    checkpoint = tmp_path / "video.pickle"
    assert run_cli("fixture", "video_autoencoding", "-o", checkpoint).exit_code == 0
    a, b = _frames(tmp_path)
    result = run_cli("run", "flow", checkpoint, a, b)
    assert result.exit_code == 2 and "optical_flow" in result.stderr


def test_run_flow_pads_small_frames_on_request(tmp_path, flow_checkpoint):
    a, b = _frames(tmp_path, size=(20, 30))
    result = run_cli("run", "flow", flow_checkpoint, a, b, "--pad", "-o", tmp_path / "p.flo")
    assert result.exit_code == 0, result.stderr
    assert decode_flo((tmp_path / "p.flo").read_bytes()).shape == (20, 30, 2)


def test_run_flow_errors_name_the_frame_pair(tmp_path, flow_checkpoint):
    # Among many frames, "the two frames differ in size" must say which two.
    frames = _frames(tmp_path, count=3)
    odd = tmp_path / "frame_odd.png"
    Image.fromarray(textured_pair(44, 56, seed=3)[0]).save(odd)
    inputs = [*frames, odd]
    before = _listing(tmp_path)
    result = run_cli("run", "flow", flow_checkpoint, *inputs, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.stderr
    assert f"{frames[2]} -> {odd}: the two frames differ in size" in result.stderr
    assert _listing(tmp_path) == before  # nothing written


@pytest.mark.parametrize("suffix, kind", [(".webp", "animated WebP (2 frames)"),
                                          (".png", "animated PNG (APNG) (2 frames)"),
                                          (".tif", "multi-page TIFF (2 pages)")])
def test_run_flow_refuses_an_animated_webp_or_apng_among_frames(
    tmp_path, flow_checkpoint, suffix, kind
):
    # Like an animated GIF, an animated WebP or APNG, or a multi-page TIFF, among the
    # frames would be read as its first picture only, silently.
    still = _frames(tmp_path)[0]
    animated = tmp_path / f"animated{suffix}"
    pictures = [Image.fromarray(f) for f in textured_pair(40, 56, shift=(1, 2), seed=2)]
    options = {"lossless": True} if suffix == ".webp" else {}
    pictures[0].save(animated, save_all=True, append_images=pictures[1:], duration=100,
                     **options)
    with Image.open(animated) as check:
        if getattr(check, "n_frames", 1) != 2:
            pytest.skip(f"this Pillow cannot write an animated {suffix}")
    before = _listing(tmp_path)
    result = run_cli("run", "flow", flow_checkpoint, still, animated, "-o",
                     tmp_path / "mixed.png")
    assert result.exit_code == 2, result.stderr
    assert kind in result.stderr
    assert _listing(tmp_path) == before


def test_run_flow_reads_a_tiff_with_a_damaged_page_list(tmp_path, flow_checkpoint):
    """A one-page TIFF whose next-page pointer points past the file's end: counting
    its pages (to refuse a multi-page TIFF) raised TypeError, "unexpected ... please
    report it", where classify reads it. Its one picture is the frame."""
    import io

    a, b = _frames(tmp_path)
    buffer = io.BytesIO()
    Image.open(b).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * entries, len(data) + 1000)
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(bytes(data))
    for second, out in ((b, "plain.npy"), (damaged, "damaged.npy")):
        result = run_cli("run", "flow", flow_checkpoint, a, second, "--npy", "-o",
                         tmp_path / out)
        assert result.exit_code == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "damaged.npy"))


def test_run_flow_names_the_frame_whose_pixels_are_refused(tmp_path, flow_checkpoint):
    values = np.full((40, 56), 100.0, np.float32)
    values[3, 4] = np.nan
    frames = [tmp_path / f"f{i}.tif" for i in range(3)]
    for i, frame in enumerate(frames):
        Image.fromarray(values if i == 1 else np.full((40, 56), 90.0, np.float32),
                        mode="F").save(frame)
    result = run_cli("run", "flow", flow_checkpoint, *frames, "--npz", "-o",
                     tmp_path / "f.npz")
    assert result.exit_code == 3
    assert f"error: {frames[1]}: the image has 1 non-finite value(s)" in result.stderr


# --------------------------------------------------------------------------------------
# run flow of frames: memory bounded by a pair, the outputs unchanged


def _moving_frames(folder: Path, count: int, noted=()) -> List[str]:
    """``count`` frames of 40x56 px, each a texture moved from the one before; the
    frames at ``noted`` are 16-bit greyscale with values within 0..255 (a note)."""
    paths = []
    for i in range(count):
        frame = textured_pair(40, 56, shift=(1, 2), seed=i)[0]
        path = folder / f"frame{i}.png"
        Image.fromarray(frame[..., 0].astype(np.uint16) if i in noted else frame).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def live(monkeypatch) -> dict:
    """Counts, through weak references, the frames run_task reads (arrays from
    _still_frame) and the FlowResults it makes, alive at once: ``{"frames":
    {"now", "most", "made"}, "results": {...}}``."""
    import perceiver_torch.pipelines.flow as flow_module

    live = {kind: alive_counts() for kind in ("frames", "results")}

    def track(kind: str, value):
        return track_alive(live[kind], value)

    read, compute = flow_module._still_frame, FlowPipeline._flow_of_rgb
    monkeypatch.setattr(flow_module, "_still_frame",
                        lambda *a, **k: track("frames", read(*a, **k)))
    monkeypatch.setattr(FlowPipeline, "_flow_of_rgb",
                        lambda self, *a, **k: track("results", compute(self, *a, **k)))
    return live


@pytest.mark.parametrize("arrays", [None, "npy", "npz"])
def test_run_flow_holds_two_frames_and_one_flow(tmp_path, model, live, arrays):
    """run flow read every frame, then computed every pair's flow and kept each
    FlowResult until the end (a 1080p pair: 23 MB with its .flo and picture); it now
    reads each frame to check it, then again for its pairs, and writes each pair's
    files as soon as its flow is computed. The files, documents and lines are those
    of the pipeline called on each pair."""
    import io

    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.flow import run_task
    from perceiver_torch.pipelines.image import load_rgb

    paths = _moving_frames(tmp_path, 6, noted=(2, 5))
    out = tmp_path / (f"out.{arrays}" if arrays else "out")
    lines: list = []
    options = RunOptions(output=out, arrays=arrays, echo=lines.append)
    documents = run_task(FlowPipeline(model, batch_size=2), paths, options)
    assert live["frames"]["most"] <= 2 and live["results"]["most"] <= 1  # were 6 and 5
    del live  # the pipeline's own calls below are not run_task's

    notes = {2: [], 5: []}
    for i, frame_notes in notes.items():
        load_rgb(paths[i], frame_notes)
        assert len(frame_notes) == 1
    pipeline = FlowPipeline(model, batch_size=2)
    results = [pipeline(a, b) for a, b in zip(paths, paths[1:])]
    for i, result in enumerate(results):
        # A frame's note goes with the first pair it is in, the last frame's with
        # the last pair; printed once.
        result.notes[:] = {2: notes[2], 4: notes[5]}.get(i, [])
    if arrays:
        expected = io.BytesIO()
        stack = np.stack([r.flow for r in results])
        np.save(expected, stack) if arrays == "npy" else np.savez(expected, flow=stack)
        assert out.read_bytes() == expected.getvalue()
        files = [[str(out)]] * len(results)
    else:
        files = []
        for i, result in enumerate(results):
            flo, png = tmp_path / f"out_{i:04d}.flo", tmp_path / f"out_{i:04d}.png"
            assert flo.read_bytes() == encode_flo(result.flow)
            assert np.array_equal(np.asarray(Image.open(png)), flow_to_wheel(result.flow))
            files.append([str(flo), str(png)])
    assert documents == [
        {"input": [a, b], **result.as_dict(), "files": written}
        for a, b, result, written in zip(paths, paths[1:], results, files)
    ]
    shown = []
    for a, b, result in zip(paths, paths[1:], results):
        u, v = result.flow.reshape(-1, 2).mean(0)
        largest = float(np.sqrt((result.flow.astype(np.float64) ** 2).sum(-1)).max())
        shown.append(f"{a} -> {b}: 56x40, {result.tiles} tiles, mean flow ({u:+.2f}, "
                     f"{v:+.2f}) px, max |flow| {largest:.2f} px")
        shown.extend(f"  note: {n}" for n in result.notes)
    assert lines == shown


@pytest.mark.parametrize("bad", ["other size", "unreadable"])
def test_run_flow_checks_every_pair_before_the_model(tmp_path, model, bad):
    """A last frame of another size was found after every other pair's flow."""
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.flow import run_task

    paths = _moving_frames(tmp_path, 4)
    last = tmp_path / "last.png"
    if bad == "other size":
        Image.fromarray(textured_pair(44, 56)[0]).save(last)
        message = f"{paths[-1]} -> {last}: the two frames differ in size"
    else:
        last.write_bytes(b"no image")
        message = f"cannot read {last}"
    with batch_sizes_of_calls(model) as calls:
        with pytest.raises(InputError, match=re.escape(message)):
            run_task(FlowPipeline(model), paths + [str(last)],
                     RunOptions(output=tmp_path / "out"))
    assert calls == []


def test_run_flow_refuses_a_frame_changed_before_its_pair(tmp_path, model, monkeypatch):
    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions

    paths = _moving_frames(tmp_path, 3)

    def rewritten_after_the_checks():
        Image.fromarray(textured_pair(44, 60)[0]).save(paths[2])

    # Before the first read for a pair, once every frame is checked.
    act_at_read(monkeypatch, flow_module, "_still_frame", len(paths) + 1,
                rewritten_after_the_checks)
    with pytest.raises(InputError, match=f"{paths[2]} changed during the run"):
        flow_module.run_task(FlowPipeline(model), paths,
                             RunOptions(output=tmp_path / "out"))


def test_run_flow_names_a_frame_removed_before_its_pair_as_missing(tmp_path, model,
                                                                 monkeypatch):
    """A frame removed between the checks and its pair was refused as "changed during
    the run: it was written to or replaced" (its state could not be taken, which is
    not a rewrite); its read says it is missing, as that of a name that never was."""
    import os

    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions

    paths = _moving_frames(tmp_path, 3)
    never = str(tmp_path / "never.png")
    with pytest.raises(InputError) as never_existed:
        flow_module._still_frame(never, [])
    missing_words = str(never_existed.value).replace(never, paths[2])

    def removed_after_the_checks():
        os.remove(paths[2])

    # Before the first read for a pair, once every frame is checked.
    act_at_read(monkeypatch, flow_module, "_still_frame", len(paths) + 1,
                removed_after_the_checks)
    with pytest.raises(InputError) as raised:
        flow_module.run_task(FlowPipeline(model), paths, RunOptions(output=tmp_path / "out"))
    assert "changed during the run" not in str(raised.value)
    assert str(raised.value).endswith(missing_words)


@pytest.mark.parametrize("count, reads", [(2, 2), (3, 6)])
def test_run_flow_reads_the_two_frames_of_one_pair_once(tmp_path, model, monkeypatch,
                                                        count, reads):
    """Two frames were read twice each (checked, then again for their pair), though
    their pair holds both anyway: now once; three or more frames are still read twice,
    so that memory holds two frames, not all."""
    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions

    paths = _moving_frames(tmp_path, count)
    read, seen = flow_module._still_frame, []

    def counted(path, *args, **kwargs):
        seen.append(path)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(flow_module, "_still_frame", counted)
    flow_module.run_task(FlowPipeline(model), paths, RunOptions(output=tmp_path / "out"))
    assert len(seen) == reads and sorted(set(seen)) == sorted(paths)


def test_run_flow_refuses_a_frame_rewritten_with_the_same_size(tmp_path, model, monkeypatch):
    """Only the frames' shape was compared: a frame rewritten with other pixels of the
    same size between the checks and its pair gave the flow of the new frame. A BMP of
    one size is one byte count, so only the modification time tells (set a second
    later, as a later write sets it)."""
    import os

    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"frame{i}.bmp"))
        Image.fromarray(textured_pair(40, 56, shift=(1, 2), seed=i)[0]).save(paths[-1])
    size, mtime = os.path.getsize(paths[2]), os.stat(paths[2]).st_mtime_ns

    def rewritten_after_the_checks():
        Image.fromarray(textured_pair(40, 56, seed=9)[0]).save(paths[2])
        os.utime(paths[2], ns=(mtime + 10**9, mtime + 10**9))
        assert os.path.getsize(paths[2]) == size

    # Before the first read for a pair, once every frame is checked.
    act_at_read(monkeypatch, flow_module, "_still_frame", len(paths) + 1,
                rewritten_after_the_checks)
    with pytest.raises(InputError, match=f"^{re.escape(paths[2])} changed during the run"):
        flow_module.run_task(FlowPipeline(model), paths, RunOptions(output=tmp_path / "out"))


def test_run_flow_failing_after_staged_pairs_leaves_no_file(tmp_path, flow_checkpoint,
                                                            monkeypatch):
    """The pairs' files are now staged as each flow is computed: a failure at a
    later pair (a frame rewritten meanwhile) still leaves none of them."""
    import perceiver_torch.pipelines.flow as flow_module

    paths = _moving_frames(tmp_path, 4)

    def rewritten_before_the_last_pair():
        Image.fromarray(textured_pair(44, 60)[0]).save(paths[-1])

    # Before the last frame is read again.
    act_at_read(monkeypatch, flow_module, "_still_frame", 2 * len(paths),
                rewritten_before_the_last_pair)
    before = _listing(tmp_path)
    result = run_cli("run", "flow", flow_checkpoint, *paths, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.stderr
    assert f"{paths[-1]} changed during the run" in result.stderr
    assert _listing(tmp_path) == before  # no pair's file, no temporary file


@pytest.fixture
def live_video(monkeypatch) -> dict:
    """Counts, through weak references, the flows FlowPipeline.video yields and the
    pictures run flow draws of them (render_flow), alive at once: ``{"flows":
    {"now", "most", "made"}, "pictures": {...}}``."""
    import perceiver_torch.pipelines.flow as flow_module

    live = {kind: alive_counts() for kind in ("flows", "pictures")}

    def track(kind: str, value):
        return track_alive(live[kind], value)

    video, render = FlowPipeline.video, flow_module.render_flow
    monkeypatch.setattr(FlowPipeline, "video", lambda self, *a, **k: (
        track("flows", flow) for flow in video(self, *a, **k)))
    monkeypatch.setattr(flow_module, "render_flow",
                        lambda *a, **k: track("pictures", render(*a, **k)))
    return live


@pytest.mark.parametrize("output", ["wheel.mp4", "hsv.mp4", "wheel.gif", "flows.npy",
                                    "flows.npz"])
def test_run_flow_of_a_video_holds_no_list_of_flows_nor_of_pictures(
    tmp_path, model, live_video, output
):
    """run flow of a video kept the list of flows, a stacked copy of it (and a float64
    copy of that for the largest length) and a stack of every picture; the pictures
    now go to the encoder one by one, and where the wheel's scale or the arrays'
    output needs every flow they are kept on disk (the memory test below). The
    files, the document and the line are those of the flows computed and stacked in
    full."""
    import io

    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.flow import run_task
    from perceiver_torch.pipelines.media import write_video
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 7, size=(40, 56), sample_rate=None)
    render = "hsv" if output.startswith("hsv") else "wheel"
    arrays = output.rsplit(".", 1)[1] if output.startswith("flows") else None
    lines: list = []
    options = RunOptions(output=tmp_path / output, arrays=arrays, echo=lines.append,
                         extra={"render": render})
    (document,) = run_task(FlowPipeline(model, batch_size=2), [str(video)], options)
    assert live_video["flows"]["made"] == 6
    assert live_video["flows"]["most"] <= 2  # was 6, and a stack beside them
    assert live_video["pictures"]["most"] <= 2  # was 6, and a stack beside them
    del live_video

    flows = list(FlowPipeline(model, batch_size=2).video(video))
    stack = np.stack(flows)
    expected = io.BytesIO()
    if arrays:
        np.save(expected, stack) if arrays == "npy" else np.savez(expected, flow=stack)
    else:
        scale = max(max_magnitude(f) for f in flows)
        pictures = np.stack([render_flow(f, render, scale if render == "wheel" else None)
                             for f in flows])
        expected = tmp_path / f"expected{Path(output).suffix}"
        write_video(expected, pictures, 25.0)
        expected = io.BytesIO(expected.read_bytes())
    assert (tmp_path / output).read_bytes() == expected.getvalue()
    largest = float(np.sqrt((stack.astype(np.float64) ** 2).sum(-1)).max())
    assert document == {"input": str(video), "size": [40, 56], "pairs": 6, "fps": 25.0,
                        "max_flow": largest, "files": [str(tmp_path / output)],
                        "notes": []}
    assert lines == [f"{video}: 6 frame pairs, 56x40, max |flow| {largest:.2f} px"]


def test_run_flow_of_a_video_counts_non_finite_flow_over_every_pair(
    tmp_path, model, monkeypatch
):
    """The summary's numbers, gathered flow by flow, are those of the whole stack: a
    NaN in any flow makes the largest length NaN, and the note counts every flow's
    non-finite values."""
    import math

    from perceiver_torch.pipelines.base import RunOptions, non_finite_output_note
    from perceiver_torch.pipelines.flow import run_task
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 7, size=(40, 56), sample_rate=None)
    real = FlowPipeline.video

    def with_holes(self, *args, **kwargs):
        for i, flow in enumerate(real(self, *args, **kwargs)):
            flow = flow.copy()
            flow.reshape(-1)[:i] = np.nan  # flow i has i NaN values: 15 in all
            yield flow

    monkeypatch.setattr(FlowPipeline, "video", with_holes)
    out = tmp_path / "flows.npy"
    (document,) = run_task(FlowPipeline(model), [str(video)],
                           RunOptions(output=out, arrays="npy"))
    note = non_finite_output_note(np.load(out), model, "those flow vectors are unknown")
    assert "holds 15 non-finite value(s)" in note
    assert document["notes"] == [note]
    assert math.isnan(document["max_flow"])


def _numpy_bytes() -> int:
    """The bytes of NumPy's array data alive now, as tracemalloc traces them (NumPy
    reports its allocations in a domain of their own; torch's are not traced)."""
    import tracemalloc

    domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    return sum(trace.size for trace in tracemalloc.take_snapshot().filter_traces([domain]).traces)


def _most_numpy_memory_of_a_video_run(folder: Path, model, frames: int, output: str,
                                      traced: bool = True, video: bool = True) -> int:
    """The most NumPy array memory (bytes) alive when run flow of a video of
    ``frames`` frames (40x56 px) to ``output`` has computed a pair's flow, drawn a
    picture or written to the output file. ``video=False``: as many frames as
    pictures instead (:func:`_moving_frames`)."""
    import contextlib
    import tracemalloc
    from unittest import mock

    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.video import make_test_video

    folder.mkdir()
    if video:
        inputs = [str(folder / "clip.mp4")]
        make_test_video(inputs[0], frames, size=(40, 56), sample_rate=None)
    else:
        inputs = _moving_frames(folder, frames)
    seen: List[int] = []

    def measured(real):
        def call(*args, **kwargs):
            value = real(*args, **kwargs)
            if traced:
                seen.append(_numpy_bytes())
            return value
        return call

    class MeasuredFile:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            return measured(self._handle.write)(data)

        def __getattr__(self, name):  # tell, seek, flush for zipfile
            return getattr(self._handle, name)

    @contextlib.contextmanager
    def open_output(path):
        with open(path, "wb") as handle:
            yield MeasuredFile(handle)

    arrays = output.rsplit(".", 1)[1] if output.startswith("flows") else None
    options = RunOptions(output=folder / output, arrays=arrays, open_output=open_output,
                         extra={"render": None if arrays else output.split(".")[0]})
    # Every flow, of a video or of frames, is computed by _flow_of_rgb.
    with mock.patch.object(FlowPipeline, "_flow_of_rgb", measured(FlowPipeline._flow_of_rgb)), \
            mock.patch.object(flow_module, "render_flow", measured(flow_module.render_flow)):
        if traced:
            tracemalloc.start(1)
        try:
            flow_module.run_task(FlowPipeline(model, batch_size=2), inputs, options)
        finally:
            tracemalloc.stop()
    return max(seen, default=0)


@pytest.mark.parametrize("output", ["wheel.mp4", "flows.npy", "flows.npz", "hsv.mp4"])
def test_run_flow_of_a_video_holds_as_many_flows_for_any_length(tmp_path, model, output):
    """The wheel's scale and --npy/--npz need every flow of the video, which were held
    in memory, in one array of (N, H, W, 2) (5 GB for 10 s of 1080p at 30 fps): the
    most NumPy memory alive as a pair's flow was computed grew by a flow a pair.
    They are now written to a temporary file as they come and read back one at a
    time, so that a video of 8 pairs holds no more than one of 2 (less than a flow
    more: not a flow a pair). ``--render hsv`` streamed already."""
    flow_bytes = 40 * 56 * 2 * 4  # (H, W, 2) float32
    # Untraced first: what the first run makes and keeps (caches) is not a flow.
    _most_numpy_memory_of_a_video_run(tmp_path / "warm", model, 3, output, traced=False)
    short = _most_numpy_memory_of_a_video_run(tmp_path / "short", model, 3, output)
    long = _most_numpy_memory_of_a_video_run(tmp_path / "long", model, 9, output)
    assert short >= flow_bytes  # the measure sees the flows (one at least is alive)
    assert long < short + flow_bytes, (long / flow_bytes, short / flow_bytes)


@pytest.mark.parametrize("output", ["flows.npy", "flows.npz"])
def test_run_flow_of_many_frames_to_arrays_holds_as_many_flows_for_any_count(
    tmp_path, model, output
):
    """--npy/--npz of several frame pairs kept every flow in one (N, H, W, 2) array
    until the output was written; each now goes to disk as it is computed
    (a DiskSpool, as a video's), so 8 pairs hold less than a flow more than 2."""
    flow_bytes = 40 * 56 * 2 * 4  # (H, W, 2) float32
    measure = functools.partial(_most_numpy_memory_of_a_video_run, model=model,
                                output=output, video=False)
    measure(tmp_path / "warm", frames=3, traced=False)
    short = measure(tmp_path / "short", frames=3)
    long = measure(tmp_path / "long", frames=9)
    assert short >= flow_bytes  # the measure sees the flows
    assert long < short + flow_bytes, (long / flow_bytes, short / flow_bytes)


def _spill_of(folder: Path, flows):
    from perceiver_torch.pipelines.flow import _flow_spill

    spill = _flow_spill(folder)
    for flow in flows:
        spill.append(flow[None])
    return spill


@pytest.mark.parametrize("count", [1, 2, 5])
def test_flow_spill_reads_back_the_flows_and_writes_np_saves_bytes(tmp_path, count):
    """The flows' DiskSpool: the flows read back are those appended, in order; the .npy
    written from it is the bytes np.save writes for their stack, and the .npz loads
    as np.savez's (one key, "flow"), NaN and infinities included."""
    import io

    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.flow import _write_spilled_arrays

    rng = np.random.default_rng(0)
    flows = [rng.standard_normal((3, 4, 2)).astype(np.float32) for _ in range(count)]
    flows[0][1, 2] = (np.nan, np.inf)
    stack = np.stack(flows)
    with _spill_of(tmp_path, flows) as spill:
        for got, expected in zip(spill, flows):  # interleaved with the npy: no matter
            npy = io.BytesIO()
            spill.write_npy(npy)
            assert got.dtype == np.float32
            assert got.tobytes() == expected.tobytes()
        assert spill.rows == len(list(spill)) == count
        expected = io.BytesIO()
        np.save(expected, stack)
        assert npy.getvalue() == expected.getvalue()
        for kind in ("npy", "npz"):
            out = tmp_path / f"flows.{kind}"
            _write_spilled_arrays(RunOptions(output=out, arrays=kind), spill)
        # The .npy's bytes are its format's; the .npz's layout is NumPy's zipfile
        # usage, which may change between releases: its contents are compared.
        assert (tmp_path / "flows.npy").read_bytes() == expected.getvalue()
        with np.load(tmp_path / "flows.npz") as loaded:
            assert list(loaded.keys()) == ["flow"]
            assert loaded["flow"].tobytes() == stack.tobytes()
            assert loaded["flow"].dtype == np.float32 and loaded["flow"].shape == stack.shape


@pytest.mark.parametrize("then", ["read back", "npy", "close"])
def test_flow_spill_without_room_fails_at_the_flow_that_found_none(tmp_path, monkeypatch,
                                                                    then):
    """The spill's file is buffered (8 KiB): a flow smaller than that (a small frame,
    --pad) stayed in the buffer, and a full disk surfaced later, at the seek that
    reads the flows back or writes the .npy, or at close: a bare OSError ("unexpected
    ... please report it"), not the one-line error naming the folder. The disk is
    full, in the system's own file, after two flows."""
    import io

    from perceiver_torch.pipelines.base import PipelineError
    from perceiver_torch.pipelines.flow import _flow_spill

    flow = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)  # 96 bytes
    spills = full_disk_temporary_files(monkeypatch, room=2 * flow.nbytes)
    with pytest.raises(PipelineError, match=f"^keeping the flows on disk in {re.escape(str(tmp_path))} "
                                            "failed after 2 of them: No space left on device"):
        with _flow_spill(tmp_path) as spill:
            for _ in range(3):
                spill.append(flow[None])
            if then == "read back":
                list(spill)
            elif then == "npy":
                spill.write_npy(io.BytesIO())
    assert len(spills) == 1 and spills[0].closed and spills[0].raw.closed


@pytest.mark.parametrize("failure", [None, "error", "interrupt"])
@pytest.mark.parametrize("output", ["wheel.mp4", "flows.npy", "flows.npz"])
def test_run_flow_of_a_video_leaves_no_file_of_its_flows(tmp_path, model, monkeypatch,
                                                         output, failure):
    """The flows are kept in an anonymous temporary file in the output's folder: it
    has no name from the start (on POSIX: nothing is left even if the process is
    killed) and it is closed, which frees it, when the run ends: finished, failed at
    the 3rd pair's flow, or interrupted there."""
    import os
    import tempfile

    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.flow import run_task
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 6, size=(40, 56), sample_rate=None)
    folder = tmp_path / "out"
    folder.mkdir()
    spills, links = [], []
    make = tempfile.TemporaryFile

    def recorded(*args, **kwargs):
        spill = make(*args, **kwargs)
        spills.append((spill, Path(kwargs["dir"])))
        links.append(os.fstat(spill.fileno()).st_nlink)
        return spill

    monkeypatch.setattr(tempfile, "TemporaryFile", recorded)
    compute, calls = FlowPipeline.flow_of, []

    def failing_at_the_third_pair(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and failure == "error":
            raise RuntimeError("the model failed")
        if len(calls) == 3 and failure == "interrupt":
            raise KeyboardInterrupt
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(FlowPipeline, "flow_of", failing_at_the_third_pair)
    arrays = output.rsplit(".", 1)[1] if output.startswith("flows") else None
    options = RunOptions(output=folder / output, arrays=arrays)
    raised = {None: None, "error": RuntimeError, "interrupt": KeyboardInterrupt}[failure]
    if raised is None:
        run_task(FlowPipeline(model), [str(video)], options)
    else:
        with pytest.raises(raised):
            run_task(FlowPipeline(model), [str(video)], options)
    assert [folder for _, folder in spills] == [folder]
    assert spills[0][0].closed
    if os.name == "posix":
        assert links == [0]  # no name in any folder
    assert _listing(folder) == ([] if failure else [output])


def test_run_flow_of_a_video_without_room_for_its_flows(tmp_path, flow_checkpoint,
                                                        monkeypatch):
    """A full disk under the flows kept for the wheel: a one-line error naming the
    folder (exit 3), no output, the temporary file closed."""
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 5, size=(40, 56), sample_rate=None)
    folder = tmp_path / "out"
    folder.mkdir()
    spills = full_disk_temporary_files(monkeypatch, room=2 * 40 * 56 * 2 * 4)  # 2 flows
    result = run_cli("run", "flow", flow_checkpoint, video, "-o", folder / "wheel.mp4")
    assert result.exit_code == 3, result.stderr
    assert (f"keeping the flows on disk in {folder} failed after 2 of them: "
            "No space left on device") in result.stderr
    assert "unexpected" not in result.stderr
    assert len(spills) == 1 and spills[0].closed and spills[0].raw.closed
    assert _listing(folder) == []


@pytest.mark.parametrize("declared", [0, 2, 9, 2**44, 2**62],
                         ids=["none", "fewer", "cut", "memory", "array-size"])
@pytest.mark.parametrize("output", ["wheel.mp4", "flows.npy", "flows.npz"])
def test_run_flow_of_a_video_whose_header_declares_another_frame_count(
    tmp_path, model, monkeypatch, declared, output
):
    """The container's frame count may be wrong: a cut file declares more, some
    declare none, and a damaged header may declare any count (an AVI's length field
    patched to 50 million made run flow fail with "not enough memory" where 5 pairs
    were decoded: room for the flows was reserved for the declared count, which no
    machine has: 2**44 flows of 40x56 px are over a 47-bit address space, 2**62 over
    NumPy's largest array). The flows now go to a file that grows as they come. The
    run is that of the video with its true count (the same files), with the note
    that frames are missing where it declares two or more too many."""
    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.flow import run_task
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / "clip.mp4"
    make_test_video(video, 4, size=(40, 56), sample_rate=None)
    arrays = output.rsplit(".", 1)[1] if output.startswith("flows") else None
    expected_out, got_out = tmp_path / f"expected_{output}", tmp_path / output
    (expected,) = run_task(FlowPipeline(model), [str(video)],
                           RunOptions(output=expected_out, arrays=arrays))
    monkeypatch.setattr(flow_module, "video_frame_count", lambda path: declared)
    (got,) = run_task(FlowPipeline(model), [str(video)],
                      RunOptions(output=got_out, arrays=arrays))
    assert got["pairs"] == expected["pairs"] == 3
    assert got["max_flow"] == expected["max_flow"]
    if declared >= 4 + 2:
        assert f"4 of the {declared} frames the video declares" in got["notes"][0]
    else:
        assert got["notes"] == []
    assert got_out.read_bytes() == expected_out.read_bytes()


def test_run_flow_reads_frames_from_pipes(tmp_path, flow_checkpoint, pipes):
    """Each frame was opened twice (once to count its pictures), so a pipe's second
    reader found it empty: "cannot read /dev/fd/63 as an image". Classify read pipes."""
    a, b = _frames(tmp_path)
    files = run_cli("run", "flow", flow_checkpoint, a, b, "--npy", "-o", tmp_path / "f.npy")
    assert files.exit_code == 0, files.stderr
    piped = [pipes(f"pipe{i}", frame.read_bytes()) for i, frame in enumerate((a, b))]
    result = run_cli("run", "flow", flow_checkpoint, *piped, "--npy", "-o",
                     tmp_path / "p.npy")
    assert result.exit_code == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "p.npy"), np.load(tmp_path / "f.npy"))
    # A video is opened more than once (its rate and count first): refused as a pipe,
    # where it was "no such file" of a path that exists.
    from perceiver_torch.pipelines.video import make_test_video

    make_test_video(tmp_path / "clip.mp4", 3, size=(40, 56), sample_rate=None)
    video = pipes("video.mp4", (tmp_path / "clip.mp4").read_bytes())
    result = run_cli("run", "flow", flow_checkpoint, video, "--npy", "-o",
                     tmp_path / "v.npy")
    assert result.exit_code == 3, result.stderr
    assert "is not a regular file (a pipe" in result.stderr and "save it to a file" \
        in result.stderr
    # Without -o the results go beside the first input: not beside a pipe (they were
    # computed, then "writing /dev/fd/63.flow.flo failed").
    piped = [pipes(f"again{i}", frame.read_bytes()) for i, frame in enumerate((a, b))]
    result = run_cli("run", "flow", flow_checkpoint, *piped)
    assert result.exit_code == 2, result.stderr
    assert "is not a file (a pipe?)" in result.stderr and "give -o OUT" in result.stderr


@pytest.mark.parametrize("suffix, container", [(".ts", "mpegts"), (".3gp", "3gp")])
def test_run_flow_on_a_transport_stream_or_3gp_video(tmp_path, flow_checkpoint, suffix,
                                                     container):
    # Camcorder (.mts/.ts) and phone (.3gp) videos are videos: not "one frame, give
    # the next frame too".
    av = pytest.importorskip("av")
    from fractions import Fraction

    path = tmp_path / f"clip{suffix}"
    frames = [textured_pair(40, 56, shift=(1, 2), seed=1)[i % 2] for i in range(3)]
    with av.open(str(path), "w", format=container) as output:
        stream = output.add_stream("libx264" if container != "3gp" else "mpeg4",
                                   rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 56, 40, "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    result = run_cli("run", "flow", flow_checkpoint, path, "--npz", "-o",
                     tmp_path / "flows.npz")
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "flows.npz")["flow"].shape == (2, 40, 56, 2)


@pytest.mark.parametrize("name", ["clip.mkv", "clip.ts", "clip.mp4"])
def test_run_flow_of_a_video_has_a_progress_total_where_the_container_declares_none(
        tmp_path, model, name):
    """The bar over a video's frame pairs took its total from the frame count the
    container declares: Matroska and MPEG-TS declare none and got no bar. Their
    duration and frame rate give an estimate (:func:`~.media.estimated_frame_count`:
    the video stream's 4 frames at 25 fps, 3 pairs); an MP4 keeps its declared
    count. The bar only: no "declares" note for either."""
    import perceiver_torch.pipelines.flow as flow_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.media import video_frame_count
    from perceiver_torch.pipelines.video import make_test_video

    video = tmp_path / name
    make_test_video(video, 4, size=(40, 56), sample_rate=None)
    assert video_frame_count(video) == (4 if name.endswith(".mp4") else 0)
    totals: List[tuple] = []

    def progress(items, total, label):
        totals.append((total, label))
        return items

    options = RunOptions(output=tmp_path / "flows.npz", arrays="npz", progress=progress)
    [summary] = flow_module.run_task(FlowPipeline(model), [str(video)], options)
    assert totals == [(3, "flow frames")]  # was [] but for the MP4
    assert np.load(tmp_path / "flows.npz")["flow"].shape == (3, 40, 56, 2)
    assert not any("declares" in note for note in summary["notes"]), summary


def test_run_flow_frames_over_pillows_limit_are_a_note_not_a_raw_warning(
    tmp_path, flow_checkpoint, monkeypatch
):
    # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and refuses above
    # twice that; 56x40 = 2240 pixels against 1500 stands for 90 to 179 megapixels.
    import warnings

    frames = _frames(tmp_path, count=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("run", "flow", flow_checkpoint, *frames, "--json")
    assert result.exit_code == 0, result.stderr
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBomb" not in result.stderr and "warnings.warn" not in result.stderr
    notes = [
        f"{frame} is 56x40 pixels (0.00224 megapixels, over Pillow's decompression-bomb "
        "limit of 0.0015): reading it takes about 0.0291 MB of memory"
        for frame in frames
    ]
    # Each frame's note once, with the first pair it is in.
    documents = json.loads(result.stdout)["results"]
    assert [d["notes"] for d in documents] == [notes[:1], notes[1:]]
    assert [line for line in result.stderr.splitlines() if "note:" in line] == [
        f"  note: {n}" for n in notes
    ]
    # Above twice the limit: the one-line refusal of an unreadable frame (exit 3).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    result = run_cli("run", "flow", flow_checkpoint, *frames[:2], "-o", tmp_path / "x.flo")
    assert result.exit_code == 3, result.stderr
    assert "too large to decode safely" in result.stderr and "unexpected" not in result.stderr


def test_pictures_of_unknown_flow_are_black_and_max_flow_is_checked():
    # A NaN or infinity anywhere made the wheel's max_flow NaN and every index into
    # the wheel -2**63 (IndexError), and the HSV picture drew it as zero flow (white).
    flow = np.zeros((3, 4, 2), np.float32)
    flow[0, 0, 0] = np.nan
    flow[0, 1, 1] = np.inf
    flow[2, 3] = (2.0, 0.0)
    for style in ("wheel", "hsv"):
        picture = render_flow(flow, style)
        assert picture[0, 0].tolist() == [0, 0, 0] and picture[0, 1].tolist() == [0, 0, 0]
        assert picture[1, 1].tolist() == [255, 255, 255]
    # The unknown vectors do not count towards the wheel's scale: 2 px is saturated.
    assert flow_to_wheel(flow)[2, 3].tolist() == flow_to_wheel(flow[2:, 3:])[0, 0].tolist()
    assert flow_to_wheel(flow)[2, 3].tolist() == [255, 0, 0]
    # A string or a bool was NumPy's "ufunc 'isfinite' not supported" or taken as 1.
    for bad in (-1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(PipelineError, match="max_flow must be"):
            flow_to_wheel(flow, max_flow=bad)
    assert flow_to_wheel(flow, max_flow=np.float32(2)).tolist() == flow_to_wheel(flow).tolist()
    # A legend of no pixels was NumPy's "negative dimensions are not allowed".
    for bad in (-1, 0, 2.5):
        with pytest.raises(PipelineError, match="size must be an integer of at least 1"):
            wheel_legend(bad)
    assert wheel_legend(1).shape == (1, 1, 3)
    assert render_flow(np.zeros((0, 3, 2)), "hsv").shape == (0, 3, 3)


def test_flow_of_and_min_overlap_refuse_what_they_cannot_take():
    # flow_of failed deep in torch on 2-D frames, read uint16 as 0..255 and raised
    # AttributeError on lists; min_overlap="2" was a TypeError, 2.7 truncated to 2.
    model = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"])
    pipeline = FlowPipeline(model)
    frame = np.zeros((24, 32, 3), np.uint8)
    cases = [(frame[..., 0], "has shape [24, 32]; give (H, W, 3)"),
             (frame.astype(np.uint16), "is uint16; give uint8 or float"),
             (frame.tolist(), "flow_of takes numpy arrays")]
    for bad, words in cases:
        with pytest.raises(InputError, match=re.escape(words)):
            pipeline.flow_of(bad, frame)
    for overlap in ("2", 2.7, None, True):
        with pytest.raises(PipelineError, match="min_overlap must be between 0 and"):
            FlowPipeline(model, min_overlap=overlap)


def test_flow_of_takes_float_frames_as_the_pipeline_call_does(model):
    # flow_of skipped the checks of pipeline(frame1, frame2): a NaN pixel gave NaN flow
    # (and an as_dict() that is not JSON), values outside 0..255 were used unclipped,
    # and an empty frame failed in torch's padding ("Expected 3D or 4D tensor").
    pipeline = FlowPipeline(model, pad=True)
    first, second = (f.astype(np.float32) for f in textured_pair(*TILE, seed=5))
    for bad in (np.nan, np.inf):
        broken = first.copy()
        broken[3, 7, 1] = bad
        for call in (pipeline, pipeline.flow_of):
            with pytest.raises(InputError, match="1 non-finite value.*row 3, column 7"):
                call(broken, second)
    stretched = first * 1.5 - 60.0  # runs from -60 to about 322
    assert stretched.min() < 0 and stretched.max() > 255
    expected = pipeline.flow_of(np.clip(stretched, 0, 255), second)
    for call in (pipeline, pipeline.flow_of):
        result = call(stretched, second)
        assert np.array_equal(result.flow, expected.flow)
        assert len(result.notes) == 1 and "clipped to 0..255" in result.notes[0]
    assert expected.notes == []
    for empty in (np.zeros((24, 0, 3), np.uint8), np.zeros((0, 32, 3), np.float32)):
        with pytest.raises(InputError, match=r"the first frame is empty \(\d+x\d+ px"):
            pipeline.flow_of(empty, empty)


def test_switches_are_true_or_false():
    """pad="false" (a truthy string) was taken as True; so was classify's resize="no"."""
    from perceiver_torch.pipelines import ClassifyPipeline

    flow_model = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"])
    with pytest.raises(PipelineError, match="pad must be True or False, got 'false'"):
        FlowPipeline(flow_model, pad="false")
    assert FlowPipeline(flow_model, pad=np.bool_(True)).pad is True
    conv = pt.build("imagenet_conv", pt.TINY_CONFIGS["imagenet_conv"])
    with pytest.raises(PipelineError, match="resize must be True or False, got 'no'"):
        ClassifyPipeline(conv, resize="no")
    assert ClassifyPipeline(conv, resize=False).size is None


def test_uint8_frames_scale_as_the_colab_in_float64():
    """uint8 frames go through a table instead of a float64 copy of the frames: every
    value must be the colab's im / 255.0 * 2 - 1 computed in float64, rounded to
    float32 (and float frames take that arithmetic itself)."""
    from perceiver_torch.pipelines.flow import frames_to_model_input

    values = np.arange(256, dtype=np.uint8)
    first = np.stack([values] * 3, axis=-1)[None]  # (1, 256, 3)
    second = first[:, ::-1]
    got = frames_to_model_input(first, second)
    expected = (np.stack([first, second]).astype(np.float64) / 255.0 * 2 - 1).astype(np.float32)
    assert got.dtype == torch.float32 and got.shape == (1, 2, 3, 1, 256)
    assert np.array_equal(got[0].permute(0, 2, 3, 1).numpy(), expected)
    floats = frames_to_model_input(first.astype(np.float64), second.astype(np.float64))
    assert torch.equal(floats, got)


def test_non_finite_flow_is_noted(monkeypatch):
    """A float16 model past 65504 (or any NaN on the way) gave NaN flow vectors with no
    word; the result notes them, as classify notes non-finite logits."""
    model = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"])
    pipeline = FlowPipeline(model)
    first, second = textured_pair(24, 32)
    assert not [n for n in pipeline(first, second).notes if "non-finite" in n]
    original = type(model).tiled

    def tiled(self, *args, **kwargs):
        flow = original(self, *args, **kwargs)
        flow[..., 0, 0] = float("inf")
        return flow

    monkeypatch.setattr(type(model), "tiled", tiled)
    (note,) = [n for n in pipeline(first, second).notes if "non-finite" in n]
    assert "holds 2 non-finite value(s)" in note and "flow vectors are unknown" in note
