"""Classify pipeline: each preprocessing step of DeepMind's ImageNet colab against an
independent computation, the image kinds users have (EXIF-rotated, palette, 16-bit,
greyscale, alpha), the pipeline against a direct model call, and the label lists.

Every image here is made by the test (numpy + Pillow); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import perceiver_torch as pt
from perceiver_torch.labels import class_names, imagenet_labels, kinetics700_labels
from perceiver_torch.pipelines import InputError, PipelineError, WrongModelError
from helpers import act_at_read, alive_counts, batch_sizes_of_calls, track_alive

cv2 = pytest.importorskip("cv2")
Image = pytest.importorskip("PIL.Image")

from perceiver_torch.pipelines.image import (  # noqa: E402
    ClassifyPipeline,
    center_crop_box,
    load_rgb,
    model_image_size,
    normalize,
    preprocess_image,
)

# The colab's constants, as written in its "Image Utility Functions" cell.
COLAB_MEAN = np.array([123.675, 116.28, 103.53])
COLAB_STD = np.array([58.395, 57.12, 57.375])


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def tiny(name: str, **overrides) -> torch.nn.Module:
    config = pt.TINY_CONFIGS[name]
    if overrides:
        config = pt.config_from_dict(name, {**pt.config_to_dict(config), **overrides})
    torch.manual_seed(0)
    return pt.build(name, config).eval()


# --------------------------------------------------------------------------------------
# crop arithmetic


def colab_crop_box(height: int, width: int):
    """The colab's resize_and_center_crop arithmetic, in its own NumPy types."""
    side = ((224 / (224 + 32)) * np.minimum(height, width).astype(np.float32)).astype(np.int32)
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side


@pytest.mark.parametrize(
    "height,width", [(480, 640), (640, 480), (224, 224), (256, 256), (2, 2), (3, 1000),
                     (1001, 999), (37, 53), (4000, 3000)]
)
def test_crop_box_matches_the_colab_and_exact_integers(height, width):
    top, left, side = center_crop_box(height, width)
    # 224 / 256 = 7 / 8 exactly: the side is floor(7 * min / 8) in integers.
    assert side == (7 * min(height, width)) // 8
    assert (top, left) == ((height - side + 1) // 2, (width - side + 1) // 2)
    assert (top, left, side) == tuple(int(v) for v in colab_crop_box(height, width))


def test_crop_box_over_a_range_of_sizes():
    for height in range(2, 120, 7):
        for width in range(2, 120, 5):
            assert center_crop_box(height, width) == tuple(
                int(v) for v in colab_crop_box(height, width)
            )


def test_known_crop():
    # 480 x 640: side int(0.875 * 480) = 420, top (60 + 1) // 2 = 30, left 221 // 2 = 110.
    assert center_crop_box(480, 640) == (30, 110, 420)


# --------------------------------------------------------------------------------------
# resize and normalisation


def test_preprocess_is_crop_then_cv2_cubic_then_normalise():
    image = random_rgb(75, 101, seed=1)
    side = 7 * 75 // 8  # 65
    top, left = (75 - side + 1) // 2, (101 - side + 1) // 2
    crop = image[top : top + side, left : left + side]
    resized = cv2.resize(crop, (224, 224), interpolation=cv2.INTER_CUBIC)
    assert resized.dtype == np.uint8  # the colab resizes the 8-bit image
    expected = ((resized.astype(np.float64) - COLAB_MEAN) / COLAB_STD).astype(np.float32)
    got = preprocess_image(image, (224, 224))
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    # Same operations on the same pixels: bit-identical.
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_resize_is_not_pil_bicubic():
    """OpenCV's cubic (a = -0.75) and PIL's bicubic (a = -0.5, antialiased) differ; the
    pipeline must follow the colab's OpenCV."""
    image = random_rgb(64, 64, seed=2)
    ours = preprocess_image(image, (32, 32))
    crop = image[4:60, 4:60]  # side 56, offsets (64 - 56 + 1) // 2 = 4
    pil = np.asarray(Image.fromarray(crop).resize((32, 32), Image.Resampling.BICUBIC))
    assert not np.array_equal(ours.permute(1, 2, 0).numpy(), normalize(pil))


def test_non_square_model_size_is_height_width():
    got = preprocess_image(random_rgb(50, 50), (20, 30))
    assert got.shape == (3, 20, 30)


def test_native_size_keeps_the_crop():
    image = random_rgb(50, 70)
    got = preprocess_image(image, None)
    assert got.shape == (3, 43, 43)  # 7 * 50 // 8
    top, left, side = center_crop_box(50, 70)
    expected = normalize(image[top : top + side, left : left + side])
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


# --------------------------------------------------------------------------------------
# RGB conversion


def test_exif_rotation_is_applied(tmp_path):
    image = random_rgb(6, 10, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored picture is shown rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    Image.fromarray(image).save(path, exif=exif)
    got = load_rgb(path)
    assert got.shape == (10, 6, 3)
    assert np.array_equal(got, np.rot90(image, k=-1))


def test_exif_rotation_of_a_pil_image(tmp_path):
    image = random_rgb(5, 9, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 8  # 90 degrees counter-clockwise
    path = tmp_path / "rotated.png"
    Image.fromarray(image).save(path, exif=exif)
    with Image.open(path) as opened:
        got = load_rgb(opened)
    assert np.array_equal(got, np.rot90(image, k=1))


def test_palette_image(tmp_path):
    palette_image = Image.fromarray(random_rgb(8, 12, seed=5)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=6
    )
    path = tmp_path / "palette.png"
    palette_image.save(path)
    # Independent: look every index up in the palette table.
    table = np.array(palette_image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    expected = table[np.asarray(palette_image)]
    assert np.array_equal(load_rgb(path), expected)


def test_palette_with_transparency_is_over_white(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    path = tmp_path / "transparent.png"
    image.save(path, transparency=1)
    got = load_rgb(path)
    assert got[0, 0].tolist() == [10, 20, 30]
    assert got[1, 0].tolist() == [0, 255, 0]
    assert got[0, 1].tolist() == got[1, 1].tolist() == [255, 255, 255]


def test_16_bit_greyscale(tmp_path):
    values = np.array([[0, 1, 128, 129], [257, 32896, 65278, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # really read back as 16-bit
    got = load_rgb(path)
    # x / 257 never ends in .5 (2x would be an odd multiple of 257), so round() is exact.
    expected = np.round(values / 257.0).astype(np.uint8)
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=-1))
    assert np.array_equal(load_rgb(values), got)  # the same rule for arrays


def test_32_bit_integer_values_beyond_16_bits_are_clipped_with_a_note(tmp_path):
    """A mode "I" TIFF (32-bit integers) is read on the 16-bit scale, as Pillow opens
    16-bit greyscale files; values beyond it were clipped without a word."""
    values = np.array([[0, 257, 65535, 70000], [-5, 1 << 20, 128, 32896]], dtype=np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(values, mode="I").save(path)
    notes: list = []
    got = load_rgb(path, notes=notes)
    expected = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    assert np.array_equal(got[..., 0], expected)
    assert notes == [
        "the image's 32-bit integer values run from -5 to 1048576 and were clipped to "
        "0..65535, the 16-bit scale read as greyscale; give an 8- or 16-bit image"
    ]
    within = tmp_path / "within.tif"
    Image.fromarray(np.clip(values, 0, 65535), mode="I").save(within)
    notes = []
    load_rgb(within, notes=notes)
    assert notes == []


def test_16_bit_rgb_file(tmp_path):
    values = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 7000 + 11).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), values[..., ::-1])  # OpenCV writes BGR, 16 bits per channel
    got = load_rgb(path)
    # Pillow reduces 16-bit RGB PNGs itself, keeping the high byte (documented).
    assert got.dtype == np.uint8
    assert np.array_equal(got, (values >> 8).astype(np.uint8))


def test_greyscale_and_bilevel(tmp_path):
    grey = np.random.default_rng(6).integers(0, 256, (5, 7), dtype=np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    assert np.array_equal(load_rgb(path), np.stack([grey] * 3, axis=-1))
    assert np.array_equal(load_rgb(grey), np.stack([grey] * 3, axis=-1))
    bilevel = Image.fromarray(grey > 127).convert("1")
    assert np.array_equal(load_rgb(bilevel), np.stack([(grey > 127) * 255] * 3, axis=-1))



@pytest.mark.parametrize("kind", ["RGB", "L", "I;16"])
def test_a_colour_key_is_transparent_over_white(tmp_path, kind):
    """PNG's tRNS chunk in a greyscale or RGB file makes one value transparent, as a
    palette's transparency or an alpha channel; those pixels were read as their
    colour (black here) where the README promises alpha over white."""
    rng = np.random.default_rng(9)
    if kind == "RGB":
        pixels = rng.integers(1, 256, (4, 6, 3), dtype=np.uint8)
        pixels[:, :2] = 0
        key, expected = (0, 0, 0), pixels.copy()
    else:
        dtype = np.uint16 if kind == "I;16" else np.uint8
        pixels = rng.integers(1, 255 if kind == "L" else 65535, (4, 6), dtype=dtype)
        pixels[:, :2] = 0
        key = 0
        scaled = np.round(pixels / 257.0) if kind == "I;16" else pixels
        expected = np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=-1)
    expected[:, :2] = 255  # the keyed pixels: fully transparent, so white
    path = tmp_path / "keyed.png"
    Image.fromarray(pixels).save(path, transparency=key)
    with Image.open(path) as opened:
        assert opened.info.get("transparency") == key  # really written with the key
    assert np.array_equal(load_rgb(path), expected)



def _png(width: int, bit_depth: int, colour_type: int, row: bytes, trns: bytes,
         rows: int = 1) -> bytes:
    """A PNG of ``rows`` copies of ``row``, written from the specification (Pillow
    cannot write every depth)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, rows, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", trns)
            + chunk(b"IDAT", zlib.compress((b"\x00" + row) * rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bits, row, width, key, expected", [
    (1, bytes([0b01000000]), 2, 0, [255, 255]),          # black keyed; white stays
    (2, bytes([0b00011011]), 4, 1, [0, 255, 170, 255]),  # level 1 of 3 (85) keyed
    (4, bytes([0x05, 0xF0]), 4, 5, [0, 255, 255, 0]),    # level 5 of 15 (85) keyed
    (8, bytes([44, 200]), 2, 300, [44, 200]),            # a key no pixel can have
])
def test_a_low_bit_greyscale_colour_key_is_read_at_its_depth(tmp_path, bits, row, width,
                                                             key, expected):
    """Pillow scales 1-, 2- and 4-bit grey up to 0..255 but keeps the key as stored:
    compared with the scaled pixels, it whitened none (or, out of range, the wrong
    ones: key 300 whitened grey 44, its low byte)."""
    import struct

    path = tmp_path / "grey.png"
    path.write_bytes(_png(width, bits, 0, row, struct.pack(">H", key)))
    assert load_rgb(path)[0, :, 0].tolist() == expected


def test_a_16_bit_rgb_colour_key_is_not_applied_to_other_pixels(tmp_path):
    """Pillow reads a 16-bit RGB PNG as 8 bits but keeps its 16-bit key: compared
    with the 8-bit pixels, key (0, 0, 300) whitened the pixel (0, 0, 11308), whose
    high byte is 44, its low byte. The key cannot be applied at 8 bits: a note."""
    import struct

    path = tmp_path / "rgb16.png"
    row = struct.pack(">6H", 0, 0, 300, 0, 0, 11308)
    path.write_bytes(_png(2, 16, 2, row, struct.pack(">3H", 0, 0, 300)))
    notes: list = []
    assert load_rgb(path, notes=notes).tolist() == [[[0, 0, 1], [0, 0, 44]]]
    assert len(notes) == 1 and "colour key (transparency) was not applied" in notes[0]

def _jpeg_with_damaged_exif(path, orientation: int = 6) -> np.ndarray:
    """A JPEG whose EXIF block points its first directory past its own end (Pillow
    warns "Corrupt EXIF data" when it opens it, and reads no tags)."""
    import io
    import struct

    pixels = random_rgb(8, 10, seed=11)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    data = bytearray(buffer.getvalue())
    tiff = data.find(b"Exif\x00\x00") + 6
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    struct.pack_into(order + "I", data, tiff + 4, 0x7FFFFFFF)
    path.write_bytes(bytes(data))
    with Image.open(path) as opened:
        return np.asarray(opened.convert("RGB"))


def test_damaged_exif_is_a_note_not_pillows_warning(tmp_path):
    """Pillow's "Corrupt EXIF data" UserWarning reached stderr through `run`, -q or
    not (the README: no library's warnings); the pipelines now note it. Without a list
    of notes (a Python caller of load_rgb) the warning is Pillow's as before."""
    import warnings

    path = tmp_path / "damaged.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = _jpeg_with_damaged_exif(path)
    notes: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_rgb(path, notes=notes)
    assert np.array_equal(got, decoded)  # its pixels, not rotated: the tag is lost
    assert len(notes) == 1 and "Corrupt EXIF data" in notes[0], notes
    assert "orientation in it may not have been applied" in notes[0]
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        load_rgb(path)
    # Other warnings raised in the block still reach the caller.
    from perceiver_torch.pipelines.image import pillow_warnings_as_notes

    notes = []
    with pytest.warns(RuntimeWarning, match="not Pillow's"):
        with pillow_warnings_as_notes(notes):
            warnings.warn("not Pillow's", RuntimeWarning)
    assert notes == []


def test_a_readable_file_with_nan_pixels_is_named_for_them(tmp_path):
    """The NaN refusal of a float TIFF was wrapped as "cannot read ... as an image
    ...; give a JPEG, PNG, ..." (PipelineError is a ValueError, as Pillow's errors)."""
    values = np.full((5, 6), 100.0, dtype=np.float32)
    values[3, 4] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(InputError) as caught:
        load_rgb(path, notes=[])
    message = str(caught.value)
    assert "1 non-finite value(s)" in message and "row 3, column 4" in message
    assert "cannot read" not in message
    # A float RGB TIFF, which Pillow cannot read: not "give a ... TIFF ... file".
    rgb = tmp_path / "float_rgb.tif"
    assert cv2.imwrite(str(rgb), np.ones((4, 5, 3), np.float32))
    with pytest.raises(InputError, match="not float RGB.*save it as an 8- or 16-bit PNG"):
        load_rgb(rgb)

def test_alpha_is_composited_over_white(tmp_path):
    rgb = random_rgb(4, 5, seed=7)
    alpha = np.random.default_rng(8).integers(0, 256, (4, 5), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    path = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
    got = load_rgb(path)
    a = alpha[..., None] / 255.0
    # No ties: the exact value is (c a + 255 (255 - a)) / 255 with a numerator that is
    # never 127.5 mod 255 (it is an integer).
    expected = np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)
    assert np.array_equal(got, expected)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == rgb[0, 1].tolist()
    grey_alpha = Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA")
    grey = np.round(rgb[..., 0] * a[..., 0] + 255 * (1 - a[..., 0])).astype(np.uint8)
    assert np.array_equal(load_rgb(grey_alpha), np.stack([grey] * 3, axis=-1))


def test_arrays_and_tensors_agree():
    image = random_rgb(30, 40, seed=9)
    from_numpy = preprocess_image(image, (16, 16))
    from_tensor = preprocess_image(torch.from_numpy(image).permute(2, 0, 1), (16, 16))
    from_pil = preprocess_image(Image.fromarray(image), (16, 16))
    assert torch.equal(from_numpy, from_tensor) and torch.equal(from_numpy, from_pil)
    # Float input (0..255 scale) is resized in float32, without the 8-bit rounding: the
    # same as OpenCV on the float crop, clipped to 0..255 as uint8 saturates.
    from_float = preprocess_image(image.astype(np.float32), (16, 16))
    top, left, side = center_crop_box(30, 40)
    crop = image[top : top + side, left : left + side].astype(np.float32)
    resized = cv2.resize(crop, (16, 16), interpolation=cv2.INTER_CUBIC)
    assert resized.min() < 0 or resized.max() > 255  # the cubic's overshoot, clipped
    expected = normalize(np.clip(resized, 0, 255))
    assert np.array_equal(from_float.permute(1, 2, 0).numpy(), expected)


def opencv_cubic_weights(t: float) -> np.ndarray:
    """OpenCV's interpolateCubic (A = -0.75): the 4 tap weights at fraction t."""
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return np.array([w0, w1, w2, 1 - w0 - w1 - w2])


def uint8_and_float_cubic_bound() -> float:
    """The most a pixel resized from uint8 and from the same integers in float may
    differ by, on the 0..255 scale.

    OpenCV's uint8 cubic (resize.cpp) rounds its weights to multiples of 2^-11
    (INTER_RESIZE_COEF_BITS = 11: each off by at most 2^-12), sums in exact integers,
    two passes (rows, then columns), and rounds the result to an integer (0.5) and
    saturates it to 0..255, where the float path clips its result to the same range
    (which brings two values no further apart). The float path sums in float32.
    """
    kernel = max(np.abs(opencv_cubic_weights(t)).sum() for t in np.linspace(0, 1, 1001))
    weight_error = 4 * 2.0**-12  # the 4 weights of one pass, summed
    # First pass over pixels in 0..255; its values reach 255 * (positive weights) =
    # 255 * (1 + kernel) / 2 (the weights sum to 1).
    first_pass = weight_error * 255
    largest = 255 * (1 + kernel) / 2
    second_pass = weight_error * largest + (kernel + weight_error) * first_pass
    # float32: a 4-term sum errs by at most 4u of the sum of |terms| (u = 2^-24), per pass.
    u = 2.0**-24
    float32 = 4 * u * kernel * 255 * kernel + 4 * u * kernel * largest + u * 255
    return 0.5 + second_pass + float32


def test_float_and_uint8_images_are_resized_to_within_the_rounding_of_uint8():
    # Float pixels were clipped to 0..255 before the cubic resize only: its overshoot
    # took them to -27..301 where uint8 saturates, so the same image as uint8 and as
    # float fed the model pixels up to 27 levels apart (other logits).
    from perceiver_torch.pipelines.image import center_crop, resize_cubic

    bound = uint8_and_float_cubic_bound()
    assert 0.5 < bound < 1.2  # 0.5 of rounding, the rest OpenCV's 11-bit weights
    checkerboard = (np.indices((37, 53)).sum(0) % 2 * 255).astype(np.uint8)
    images = [random_rgb(60, 80, seed=0), random_rgb(301, 257, seed=3),
              np.repeat(checkerboard[..., None], 3, axis=-1)]
    for image in images:
        for size in [(32, 32), (224, 224), (20, 30)]:
            as_uint8 = resize_cubic(center_crop(load_rgb(image)), size).astype(np.float64)
            as_float = resize_cubic(center_crop(load_rgb(image.astype(np.float32))), size)
            assert as_float.dtype == np.float32
            assert as_float.min() >= 0 and as_float.max() <= 255
            assert np.abs(as_float - as_uint8).max() <= bound, (image.shape, size)
            # The model's inputs: the same normalisation of these pixels.
            pixels = preprocess_image(image.astype(np.float32), size).permute(1, 2, 0)
            assert np.array_equal(pixels.numpy(), normalize(as_float))
    # Fractions are kept, not rounded (a 52 px crop to 32: weights at fractions of a
    # pixel; the 224 px crop of the 301x257 image to 32 samples every 7th pixel).
    resized = resize_cubic(center_crop(load_rgb(images[0].astype(np.float32))), (32, 32))
    assert not np.array_equal(resized, np.round(resized))


def test_bad_inputs(tmp_path, monkeypatch):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are not pixels")
    with pytest.raises(InputError, match="cannot read"):
        load_rgb(not_an_image)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(random_rgb(20, 20)).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(InputError):
        load_rgb(truncated)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 > 2 x 1000: a "bomb"
    with pytest.raises(InputError, match="too large"):
        load_rgb(big)
    monkeypatch.undo()
    with pytest.raises(InputError, match="no such image"):
        load_rgb(tmp_path / "missing.jpg")
    with pytest.raises(InputError, match="too small"):
        preprocess_image(random_rgb(1, 50))
    with pytest.raises(InputError, match="shape"):
        load_rgb(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(InputError, match="int32"):
        load_rgb(np.zeros((4, 4, 3), dtype=np.int32))
    with pytest.raises(InputError):
        load_rgb(object())


def test_bfloat16_tensors_are_read_like_float16():
    # NumPy has no bfloat16: it was "Got unsupported ScalarType BFloat16". Whole
    # numbers up to 256 are exact in bfloat16, so the pixels are the same.
    tensor = torch.from_numpy(random_rgb(40, 50, seed=3)).permute(2, 0, 1)
    expected = load_rgb(tensor.float())
    for dtype in (torch.bfloat16, torch.float16):
        rgb = load_rgb(tensor.to(dtype))
        assert rgb.dtype == np.float32 and np.array_equal(rgb, expected)
    pipeline = ClassifyPipeline(tiny("imagenet_conv"))
    result = pipeline(tensor.to(torch.bfloat16))
    assert torch.equal(result.logits, pipeline(tensor.float()).logits)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(value):
    # NaN passed the 0..255 clip and gave NaN probabilities; infinities were clipped.
    image = np.full((10, 12, 3), 100.0, np.float32)
    image[3, 4, 1] = value
    message = r"1 non-finite value\(s\) \(NaN or infinity\), the first at row 3, column 4"
    with pytest.raises(InputError, match=message):
        load_rgb(image)
    with pytest.raises(InputError, match=message):
        load_rgb(torch.from_numpy(image).permute(2, 0, 1).to(torch.bfloat16))
    with pytest.raises(InputError, match="non-finite"):
        ClassifyPipeline(tiny("imagenet_conv"))(np.full((10, 10, 3), np.nan, np.float32))


# --------------------------------------------------------------------------------------
# the pipeline


@pytest.mark.parametrize("name", ["imagenet_learned", "imagenet_fourier", "imagenet_conv"])
def test_pipeline_equals_direct_model_call(name):
    model = tiny(name)
    pipeline = ClassifyPipeline(model)
    # The tiny models read 32 x 32 (the conv stem's 8 x 8 grid x 4).
    assert pipeline.size == model_image_size(model) == (32, 32)
    images = [random_rgb(40, 60, seed=10), random_rgb(33, 33, seed=11)]
    results = pipeline(images, top_k=3)
    batch = torch.stack([preprocess_image(image, (32, 32)) for image in images])
    with torch.no_grad():
        logits = model(batch)
    for result, row in zip(results, logits):
        assert torch.equal(result.logits, row)
        probabilities = torch.softmax(row.double(), -1)
        order = probabilities.argsort(descending=True)[:3]
        assert [s.index for s in result.top_k] == order.tolist()
        assert [s.probability for s in result.top_k] == pytest.approx(
            probabilities[order].tolist(), rel=1e-12
        )
        assert [s.label for s in result.top_k] == [f"class {i}" for i in order.tolist()]
    single = pipeline(images[0], top_k=3)
    assert [s.index for s in single.top_k] == [s.index for s in results[0].top_k]
    # A batch array: numpy (B, H, W, 3) or torch (B, 3, H, W).
    pair = np.stack([images[0], random_rgb(40, 60, seed=13)])
    as_list = pipeline([pair[0], pair[1]], top_k=3)  # the same batch composition
    for batch_input in (pair, torch.from_numpy(pair).permute(0, 3, 1, 2)):
        rows = pipeline(batch_input, top_k=3)
        assert len(rows) == 2
        assert all(torch.equal(r.logits, e.logits) for r, e in zip(rows, as_list))


def test_any_iterable_of_images_is_a_batch_and_single_images_stay_single(tmp_path):
    # A generator was taken as one image: "cannot classify a generator" (fill-mask
    # takes any iterable of texts).
    pipeline = ClassifyPipeline(tiny("imagenet_conv"))
    images = [random_rgb(40, 60, seed=20), random_rgb(33, 33, seed=21)]
    expected = [r.logits for r in pipeline(images)]
    for batch in ((image for image in images), tuple(images), iter(images),
                  map(np.asarray, images)):
        results = pipeline(batch)
        assert isinstance(results, list) and len(results) == 2
        assert all(torch.equal(r.logits, e) for r, e in zip(results, expected))
    assert pipeline(image for image in ()) == []
    # One image of each kind is one result, not a batch of its rows.
    path = tmp_path / "one.png"
    Image.fromarray(images[0]).save(path)
    tensor = torch.from_numpy(images[0]).permute(2, 0, 1)
    for one in (images[0], tensor, Image.fromarray(images[0]), str(path), path):
        result = pipeline(one)
        assert not isinstance(result, list) and torch.equal(result.logits, expected[0])
    grey = images[0][..., 0]  # (H, W): one image too, not H rows
    assert torch.equal(pipeline(grey).logits, pipeline([grey])[0].logits)
    with pytest.raises(InputError, match="^cannot read an image from a bytes"):
        pipeline(path.read_bytes())


def test_a_bad_image_among_several_is_named_by_its_number():
    pipeline = ClassifyPipeline(tiny("imagenet_conv"))
    good = random_rgb(30, 30)
    bad = np.zeros((4, 4, 2), np.uint8)
    for batch in ([good, bad, good], (image for image in [good, bad, good])):
        with pytest.raises(InputError, match=r"^image 2: an image array must be"):
            pipeline(batch)
    with pytest.raises(InputError, match=r"^image 3: cannot read an image from a int"):
        pipeline(iter([good, good, 7]))
    # One image (alone or the only one of a list) is not numbered, as one text.
    for one in (bad, [bad]):
        with pytest.raises(InputError, match=r"^an image array must be"):
            pipeline(one)


def test_imagenet_labels_for_1000_classes():
    model = tiny("imagenet_conv", num_classes=1000)
    result = ClassifyPipeline(model)(random_rgb(40, 40), top_k=5)
    labels = imagenet_labels()
    assert [s.label for s in result.top_k] == [labels[s.index] for s in result.top_k]


def test_native_size_option():
    with pytest.raises(WrongModelError, match="imagenet_learned"):
        ClassifyPipeline(tiny("imagenet_learned"), resize=False)
    model = tiny("imagenet_fourier")
    pipeline = ClassifyPipeline(model, resize=False)
    image = random_rgb(40, 60, seed=12)
    result = pipeline([image, random_rgb(20, 30)])[0]
    with torch.no_grad():
        expected = model(preprocess_image(image, None)[None])[0]  # a 35 x 35 crop
    assert torch.equal(result.logits, expected)


def test_native_size_run_keeps_the_batch_size(tmp_path):
    # run classify --native-size rebuilt its pipeline with the default batch size.
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    model = tiny("imagenet_fourier")
    paths = []
    for seed in range(3):
        paths.append(str(tmp_path / f"{seed}.png"))
        Image.fromarray(random_rgb(30, 30, seed=seed)).save(paths[-1])
    with batch_sizes_of_calls(model) as batches:
        pipeline = ClassifyPipeline(model, batch_size=1)
        run_task(pipeline, paths, RunOptions(extra={"native_size": True}))
    assert batches == [1, 1, 1]


# --------------------------------------------------------------------------------------
# run classify: memory bounded by the batch, the outputs unchanged


def _save_images(folder, sizes) -> list:
    paths = []
    for i, (height, width) in enumerate(sizes):
        paths.append(str(folder / f"image{i}.png"))
        Image.fromarray(random_rgb(height, width, seed=i)).save(paths[-1])
    return paths


@pytest.fixture
def live_pixels(monkeypatch) -> dict:
    """Counts the preprocessed images (the (3, H, W) float32 tensors the pipeline
    makes, for run_task too) alive at once: ``{"now", "most", "made"}``, through weak
    references."""
    import perceiver_torch.pipelines.image as image_module

    live = alive_counts()
    real = image_module.preprocess_image

    def counted(*args, **kwargs):
        return track_alive(live, real(*args, **kwargs))

    monkeypatch.setattr(image_module, "preprocess_image", counted)
    return live


# Crop sizes 35 (40x50), 28 (33x32) and 21 (24x30) at the images' own size; with
# batch_size 2 the model calls are the runs of one size cut at 2 images.
NATIVE_SIZES = [(40, 50)] * 3 + [(33, 32)] * 2 + [(40, 50)] + [(24, 30)] * 3
NATIVE_CALLS = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9)]


@pytest.mark.parametrize("native", [False, True])
def test_run_holds_one_batch_of_pixels_and_writes_what_the_model_gives(
    tmp_path, live_pixels, native
):
    """run classify held every image's pixels until the last logits (0.6 MB an image
    at 224x224: thousands of images ran out of memory); it now reads each image to
    check it, then again for its batch. The documents, lines and logits are those of
    the model called on the same batches."""
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    model = tiny("imagenet_fourier")
    paths = _save_images(tmp_path, NATIVE_SIZES)
    # A 16-bit image with values within 0..255 gets a note: printed once, under it.
    Image.fromarray(random_rgb(40, 50, seed=20)[..., 0].astype(np.uint16)).save(paths[2])
    calls = NATIVE_CALLS if native else [(i, min(i + 2, 9)) for i in range(0, 9, 2)]
    lines: list = []
    options = RunOptions(output=tmp_path / "out.npz", arrays="npz", top_k=3,
                         echo=lines.append, extra={"native_size": native})
    with batch_sizes_of_calls(model) as batches:
        documents = run_task(ClassifyPipeline(model, batch_size=2), paths, options)

    assert live_pixels["most"] <= 2  # one batch (it was every image: 9)
    assert batches == [stop - start for start, stop in calls]
    size = None if native else model_image_size(model)
    expected = []
    with torch.no_grad():
        for start, stop in calls:
            batch = torch.stack([preprocess_image(p, size) for p in paths[start:stop]])
            expected.extend(model(batch).float())
    saved = np.load(tmp_path / "out.npz")
    assert saved["logits"].tobytes() == torch.stack(expected).numpy().tobytes()
    assert saved["inputs"].tolist() == paths
    direct = ClassifyPipeline(model, resize=not native, batch_size=2)(paths, top_k=3)
    assert documents == [r.as_dict() for r in direct]
    assert len(direct[2].notes) == 1
    shown = []
    for result in direct:
        shown.append(result.input)
        shown.extend(f"  note: {note}" for note in result.notes)
        shown.extend(f"  {rank}. {s.label} (index {s.index})  {s.probability:.4f}"
                     for rank, s in enumerate(result.top_k, 1))
    assert lines == shown


def test_run_checks_every_image_before_the_model(tmp_path, live_pixels):
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    model = tiny("imagenet_conv")
    paths = _save_images(tmp_path, [(40, 50)] * 5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    with batch_sizes_of_calls(model) as calls:
        with pytest.raises(InputError, match=f"cannot read {broken}"):
            run_task(ClassifyPipeline(model, batch_size=2), paths + [str(broken)], RunOptions())
    assert calls == [] and live_pixels["made"] == 5


def test_run_reads_a_pipe_once(tmp_path, pipes):
    """A pipe (<(cat image.png)) gives its bytes to one reader: its pixels are kept
    from the check, not read again for the batch."""
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    model = tiny("imagenet_conv")
    paths = _save_images(tmp_path, [(40, 50)] * 4)
    piped = str(pipes("piped", Path(paths[2]).read_bytes()))
    documents = run_task(ClassifyPipeline(model, batch_size=2),
                         paths[:2] + [piped] + paths[3:], RunOptions())
    files = run_task(ClassifyPipeline(model, batch_size=2), paths, RunOptions())
    assert documents[2] == {**files[2], "input": piped}


def test_a_descriptor_name_counts_as_read_once_even_for_a_regular_file(tmp_path):
    """``classify MODEL /dev/stdin < photo.png``: the name leads to a regular file,
    but on macOS and the BSDs opening it again shares the descriptor's offset (the
    second read would find the end of the file), so its first read is kept."""

    from perceiver_torch.pipelines.base import readable_twice

    path = Path(_save_images(tmp_path, [(40, 50)])[0])
    assert readable_twice(str(path))
    with open(path, "rb") as handle:
        descriptor = f"/dev/fd/{handle.fileno()}"
        assert os.path.isfile(descriptor)  # a regular file behind it
        assert not readable_twice(descriptor)
        assert not readable_twice(f"/proc/self/fd/{handle.fileno()}")


@pytest.mark.parametrize("change", ["other size", "same size"])
@pytest.mark.parametrize("caller", ["run", "pipeline"])
def test_an_image_changed_before_its_batch_is_refused(tmp_path, monkeypatch, caller, change):
    """A file rewritten between the check and its batch is refused, by its pixels'
    shape (a picture of another size) or by its size and modification time: only the
    shape was compared, and a file rewritten with other pixels of the same size was
    classified with the first read's notes. A BMP of one size is one byte count, so
    only the modification time tells; it is set a second later, as a later write
    sets it (a rewrite within the clock's tick is the one case a file's state cannot
    tell)."""
    import re

    import perceiver_torch.pipelines.image as image_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    paths = [str(tmp_path / f"image{i}.bmp") for i in range(3)]
    for i, path in enumerate(paths):
        Image.fromarray(random_rgb(40, 50, seed=i)).save(path)
    size, mtime = os.path.getsize(paths[2]), os.stat(paths[2]).st_mtime_ns

    def rewritten_after_the_checks():
        if change == "other size":
            Image.fromarray(random_rgb(30, 30)).save(paths[2])
            return
        Image.fromarray(random_rgb(40, 50, seed=7)).save(paths[2])
        os.utime(paths[2], ns=(mtime + 10**9, mtime + 10**9))
        assert os.path.getsize(paths[2]) == size

    # Before the first read for a batch, once every image is checked.
    act_at_read(monkeypatch, image_module, "preprocess_image", len(paths) + 1,
                rewritten_after_the_checks)
    pipeline = ClassifyPipeline(tiny("imagenet_fourier"), batch_size=2, resize=False)
    # run names the file; the pipeline numbers it too, as any image among several.
    prefix = "" if caller == "run" else "image 3: "
    with pytest.raises(InputError, match=f"^{re.escape(prefix + paths[2])} changed during the run"):
        if caller == "run":
            run_task(pipeline, paths, RunOptions())
        else:
            pipeline(paths)


@pytest.mark.parametrize("caller", ["run", "pipeline"])
def test_an_image_removed_before_its_batch_is_named_as_missing(tmp_path, monkeypatch, caller):
    """A file removed between the check and its batch was refused as "changed during
    the run: it was written to or replaced ... run again once nothing writes to it"
    (its state could not be taken, which is not a rewrite); its read says it is
    missing, as the same read of a name that never existed does."""
    import perceiver_torch.pipelines.image as image_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    paths = _save_images(tmp_path, [(40, 50)] * 3)
    with pytest.raises(InputError) as never_existed:
        preprocess_image(str(tmp_path / "never.png"), None, [])
    missing_words = str(never_existed.value).replace(str(tmp_path / "never.png"), paths[2])

    def removed_after_the_checks():
        os.remove(paths[2])

    # Before the first read for a batch, once every image is checked.
    act_at_read(monkeypatch, image_module, "preprocess_image", len(paths) + 1,
                removed_after_the_checks)
    pipeline = ClassifyPipeline(tiny("imagenet_fourier"), batch_size=2, resize=False)
    with pytest.raises(InputError) as raised:
        if caller == "run":
            run_task(pipeline, paths, RunOptions())
        else:
            pipeline(paths)
    assert "changed during the run" not in str(raised.value)
    assert str(raised.value).endswith(missing_words)


def test_an_image_renumbered_between_its_reads_is_not_refused(tmp_path, monkeypatch):
    """The first file state compared the inode too; FAT, sshfs and CIFS renumber files
    that have not changed, and a long run was refused for nothing. Here the file is
    replaced by an identical copy that keeps its modification time (a new inode, as
    such a file system gives): the answers are those of the untouched files."""
    import shutil

    import perceiver_torch.pipelines.image as image_module

    paths = _save_images(tmp_path, [(40, 50)] * 3)
    pipeline = ClassifyPipeline(tiny("imagenet_fourier"), batch_size=2, resize=False)
    expected = pipeline(paths)

    def renumbered_after_the_checks():
        inode = os.stat(paths[2]).st_ino
        shutil.copy2(paths[2], tmp_path / "copy")
        os.replace(tmp_path / "copy", paths[2])
        assert os.stat(paths[2]).st_ino != inode

    # Before the first read for a batch, once every image is checked.
    act_at_read(monkeypatch, image_module, "preprocess_image", len(paths) + 1,
                renumbered_after_the_checks)
    got = pipeline(paths)
    assert [r.logits.tolist() for r in got] == [r.logits.tolist() for r in expected]


# --------------------------------------------------------------------------------------
# the pipeline on many images: memory bounded by the batch too


def test_the_pipeline_holds_one_batch_of_pixels_at_each_model_call(tmp_path, live_pixels):
    """pipeline(images) preprocessed every image before its first model call (0.6 MB
    an image at 224x224: 10,000 paths took 6 GB); it now checks every image, then
    preprocesses each batch's again for its call, images in memory too."""
    model = tiny("imagenet_conv")
    paths = _save_images(tmp_path, [(40, 50)] * 2)
    images = [
        paths[0], Path(paths[1]), random_rgb(40, 50, seed=2),
        torch.from_numpy(random_rgb(33, 32, seed=3)).permute(2, 0, 1),
        Image.fromarray(random_rgb(30, 30, seed=4)), random_rgb(24, 30, seed=5),
        random_rgb(40, 50, seed=6),
    ]
    alive_at_calls = []
    hook = model.register_forward_pre_hook(
        lambda module, args: alive_at_calls.append(live_pixels["now"]))
    try:
        results = ClassifyPipeline(model, batch_size=2)(image for image in images)
    finally:
        hook.remove()
    assert len(results) == len(images)
    assert alive_at_calls == [2, 2, 2, 1]  # each call's own images (it was all 7)
    assert live_pixels["most"] == 2 and live_pixels["made"] == 2 * len(images)


@pytest.mark.parametrize("native", [False, True])
def test_the_pipeline_gives_each_image_preprocessed_alone_batch_by_batch(tmp_path, pipes,
                                                                        native):
    """Read twice, every kind of image gives the logits and notes of its first read:
    the model called on the images preprocessed one by one, in the same batches (at
    the images' own size: runs of one size cut at 2 images, NATIVE_CALLS)."""
    model = tiny("imagenet_fourier")
    arrays = [random_rgb(height, width, seed=i) for i, (height, width) in enumerate(NATIVE_SIZES)]
    paths = _save_images(tmp_path, NATIVE_SIZES)  # the same pixels (seed i)
    piped = str(pipes("piped", Path(paths[4]).read_bytes()))
    # A 16-bit image with values within 0..255 gets a note, on its first read only.
    sixteen_bit = arrays[7][..., 0].astype(np.uint16)
    images = [paths[0], arrays[1], torch.from_numpy(arrays[2]).permute(2, 0, 1),
              Image.fromarray(arrays[3]), piped, arrays[5].astype(np.float32),
              Path(paths[6]), sixteen_bit, arrays[8]]
    alone = [paths[4] if image is piped else image for image in images]
    size = None if native else model_image_size(model)
    notes = [[] for _ in alone]
    pixels = [preprocess_image(image, size, n) for image, n in zip(alone, notes)]
    calls = NATIVE_CALLS if native else [(i, min(i + 2, 9)) for i in range(0, 9, 2)]
    with torch.no_grad():
        expected = [row for start, stop in calls
                    for row in model(torch.stack(pixels[start:stop])).float()]

    with batch_sizes_of_calls(model) as batches:
        results = ClassifyPipeline(model, resize=not native, batch_size=2)(images, top_k=3)
    assert batches == [stop - start for start, stop in calls]
    assert [results[i].input for i in (0, 4, 6)] == [paths[0], piped, paths[6]]
    for result, row, image_notes in zip(results, expected, notes):
        assert torch.equal(result.logits, row)
        order = torch.softmax(row.double(), -1).argsort(descending=True)[:3]
        assert [s.index for s in result.top_k] == order.tolist()
        assert result.notes == tuple(image_notes)
    assert len(results[7].notes) == 1


def test_a_bad_image_among_several_fails_before_any_model_call(tmp_path, live_pixels):
    model = tiny("imagenet_conv")
    good = _save_images(tmp_path, [(40, 50)] * 4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    with batch_sizes_of_calls(model) as calls:
        # The fifth image is in the third batch: it is named before the first.
        with pytest.raises(InputError, match=f"^image 5: cannot read {broken} as an image"):
            ClassifyPipeline(model, batch_size=2)(good + [broken, good[0]])
        with pytest.raises(InputError, match=r"^image 4: an image array must be"):
            ClassifyPipeline(model, batch_size=2)([random_rgb(30, 30)] * 3
                                                  + [np.zeros((4, 4, 2), np.uint8)])
    assert calls == [] and live_pixels["made"] == 4 + 3


@pytest.mark.parametrize("caller", ["run", "pipeline"])
def test_images_of_one_batch_are_read_once(tmp_path, monkeypatch, caller):
    """Reading every image again bounds memory by a batch; where the images are one
    batch or fewer, holding their first reads is that bound already, and
    pipeline(path) decoded its file twice (the second read doubling the call's
    preprocessing time). More images than a batch are still read twice."""
    import perceiver_torch.pipelines.image as image_module
    from perceiver_torch.pipelines.base import RunOptions
    from perceiver_torch.pipelines.image import run_task

    paths = _save_images(tmp_path, [(40, 50)] * 3)
    real, reads = image_module.preprocess_image, []

    def counted(image, *args, **kwargs):
        reads.append(image)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(image_module, "preprocess_image", counted)
    model = tiny("imagenet_conv")

    def classify(images, batch_size):
        pipeline = ClassifyPipeline(model, batch_size=batch_size)
        if caller == "run":
            return run_task(pipeline, images, RunOptions())
        return pipeline(images)

    assert len(classify(paths, batch_size=3)) == 3
    assert reads == paths
    if caller == "pipeline":
        reads.clear()
        ClassifyPipeline(model)(paths[0])
        assert reads == paths[:1]
    reads.clear()
    assert len(classify(paths, batch_size=2)) == 3
    assert reads == paths + paths


def test_a_pil_image_not_decoded_yet_reads_as_its_file(tmp_path):
    """A PIL image from Image.open is decoded by its first read; only before that
    does it say that its colour key is stored at 4 bits (key 5 is grey level 85):
    read again, the key matched no pixel, and grey 85 was not white. (Given twice:
    test_a_pil_image_not_decoded_yet_reads_the_same_twice.)"""
    import struct

    path = tmp_path / "grey.png"
    path.write_bytes(_png(4, 4, 0, bytes([0x05, 0xF0]), struct.pack(">H", 5), rows=4))
    # batch_size=1: more images than a batch, so that the others are read again.
    pipeline = ClassifyPipeline(tiny("imagenet_conv"), batch_size=1)
    with Image.open(path) as opened:
        assert opened.tile  # not decoded yet
        from_image, from_file = pipeline([opened, path])
    assert torch.equal(from_image.logits, from_file.logits)


@pytest.mark.parametrize("bits, row, key", [
    (2, bytes([0b00011011]), 1),  # levels 0..3; level 1 (85) keyed
    (4, bytes([0x05, 0xF0]), 5),  # levels 0, 5, 15, 0; level 5 (85) keyed
], ids=["2-bit", "4-bit"])
def test_a_pil_image_not_decoded_yet_reads_the_same_twice(tmp_path, bits, row, key):
    """The same PIL image from Image.open, given twice (in one list, or in two calls):
    its first read decodes it, which empties the tile that tells the depth its colour
    key is stored at, and the second read took the key at 8 bits, where it matched no
    pixel (grey 85 stayed grey). Every read of it is the read of its file."""
    import struct

    from perceiver_torch.pipelines.image import _reads_the_same_again

    path = tmp_path / "grey.png"
    path.write_bytes(_png(4, bits, 0, row, struct.pack(">H", key), rows=4))
    from_path = load_rgb(path)
    assert (from_path[:, 1] == 255).all()  # the keyed column, white
    model = tiny("imagenet_conv")
    for batch_size in (1, 2):  # one image a batch (read again), both in one (held)
        pipeline = ClassifyPipeline(model, batch_size=batch_size)
        expected = [result.logits for result in pipeline([path, path])]
        with Image.open(path) as opened:
            assert opened.tile  # not decoded yet
            got = [result.logits for result in pipeline([opened, opened])]
            assert not opened.tile  # decoded by the first read
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            assert torch.equal(pipeline(opened).logits, pipeline(path).logits)
            assert np.array_equal(load_rgb(opened), from_path)
    with Image.open(path) as opened:  # so its pixels need not be held between reads
        assert _reads_the_same_again(opened)
        load_rgb(opened)
    # What a read keeps for the image (its raw mode, by id) goes with it.
    import gc

    from perceiver_torch.pipelines.image import _FIRST_RAWMODES

    kept = id(opened)
    assert kept in _FIRST_RAWMODES
    del opened
    gc.collect()
    assert kept not in _FIRST_RAWMODES


def test_wrong_model():
    with pytest.raises(WrongModelError, match="language_perceiver"):
        ClassifyPipeline(tiny("language_perceiver"))


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_is_refused(batch_size):
    # 0 and negative numbers quietly ran one image per batch.
    message = f"batch_size must be .* at least 1, got {batch_size}"
    with pytest.raises(PipelineError, match=message) as info:
        ClassifyPipeline(tiny("imagenet_conv"), batch_size=batch_size)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one_is_refused(top_k):
    # -1 was torch's "selected index k out of range", after the model had run.
    pipeline = ClassifyPipeline(tiny("imagenet_conv"))
    with pytest.raises(PipelineError, match=f"top_k must be .* at least 1, got {top_k}") as info:
        pipeline(random_rgb(40, 40), top_k=top_k)
    assert info.value.exit_code == 2
    # More than the classes: all of them, most probable first (as before).
    classes = pipeline.model.config.num_classes
    assert len(pipeline(random_rgb(40, 40), top_k=classes + 5).top_k) == classes


def test_a_model_without_weights_is_refused():
    # It ran the whole forward pass, then "Cannot copy out of meta tensor".
    with torch.device("meta"):
        meta = pt.build("imagenet_conv", pt.TINY_CONFIGS["imagenet_conv"])
    with pytest.raises(PipelineError, match="meta device.*load it on cpu or cuda") as info:
        ClassifyPipeline(meta)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------
# labels (the colabs' lists; positions checked against the colab cells, see
# perceiver_torch/labels/SOURCES.md)


def test_imagenet_label_list():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca"
    assert labels[1] == "goldfish, Carassius auratus"
    assert labels[207] == "golden retriever"
    assert labels[281] == "tabby, tabby cat"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    # ILSVRC-2012 has two "crane"s, the bird and the machine.
    assert labels[134] == labels[517] == "crane"
    assert len(set(labels)) == 999


def test_kinetics_label_list():
    labels = kinetics700_labels()
    assert len(labels) == 700 and len(set(labels)) == 700
    assert labels[0] == "abseiling"
    assert labels[1] == "acting in play"
    assert labels[699] == "zumba"
    assert list(labels) == sorted(labels)  # the colab's list is alphabetical


def test_class_names_fall_back_to_indices():
    assert class_names(10, "imagenet") == [f"class {i}" for i in range(10)]
    assert class_names(1000, "imagenet")[207] == "golden retriever"
    assert class_names(700, "kinetics700")[0] == "abseiling"
    assert class_names(7, "kinetics700")[6] == "class 6"


def test_an_image_over_pillows_limit_is_a_note_not_a_raw_warning(tmp_path, monkeypatch):
    # Pillow warns (DecompressionBombWarning, two raw lines on stderr) above
    # MAX_IMAGE_PIXELS (89 megapixels) and refuses above twice that; in between the
    # image is classified with one note naming its size and the memory it takes.
    # 56x40 = 2240 pixels against a limit of 1500 stands for 90 to 179 megapixels.
    import json
    import warnings

    from helpers import run_cli

    fixture, checkpoint = tmp_path / "imagenet_conv.pickle", tmp_path / "imagenet_conv.safetensors"
    assert run_cli("fixture", "imagenet_conv", "--size", "tiny", "-o", fixture).exit_code == 0
    assert run_cli("convert", fixture, "-o", checkpoint).exit_code == 0
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(random_rgb(40, 56)).save(big)
    Image.fromarray(random_rgb(30, 30, seed=1)).save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    note = (
        f"{big} is 56x40 pixels (0.00224 megapixels, over Pillow's decompression-bomb "
        "limit of 0.0015): reading it takes about 0.0291 MB of memory"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("run", "classify", checkpoint, big, small, "--json", "--top-k", "2")
        pipeline = ClassifyPipeline(pt.load(checkpoint))
        direct = pipeline([str(big), str(small)], top_k=2)
    assert result.exit_code == 0, result.stderr
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBomb" not in result.stderr and "warnings.warn" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[lines.index(str(big)) + 1] == f"  note: {note}"  # under the image's name
    documents = json.loads(result.stdout)["results"]
    assert [d["notes"] for d in documents] == [[note], []]
    assert [r.notes for r in direct] == [(note,), ()]
    assert documents == [r.as_dict() for r in direct]
    # Above twice the limit: refused, in one line (exit 3).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    result = run_cli("run", "classify", checkpoint, big)
    assert result.exit_code == 3 and "too large to decode safely" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_in_training_mode_is_run_in_eval_mode_and_left_unchanged():
    # A training loop that evaluates with a pipeline puts the model back in train()
    # mode: the pipeline ran it so (BatchNorm's batch statistics: other answers, an
    # image's answer depending on the rest of its batch) and updated its running
    # statistics.
    model = tiny("imagenet_conv")
    image, other = random_rgb(40, 50, seed=1), random_rgb(40, 50, seed=2)
    pipeline = ClassifyPipeline(model)
    expected = pipeline(image).logits
    model.train()
    model.decoder.eval()  # a part the caller froze stays so
    state = {k: v.clone() for k, v in model.state_dict().items()}
    alone = pipeline(image).logits
    in_batch = pipeline([image, other])[0].logits
    assert torch.equal(alone, expected)
    torch.testing.assert_close(in_batch, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and model.input_preprocessor.batchnorm.training
    assert not model.decoder.training


def test_eval_mode_blocks_of_threads_on_one_model_restore_its_modes_at_the_last_exit():
    # Threads' pipelines on one model left in training mode (build() gives it so): the
    # first to leave restored training mode while the others still ran (BatchNorm's
    # batch statistics: wrong answers, running statistics updated), and the last left
    # the model in eval mode for good.
    import threading

    from perceiver_torch.pipelines.base import eval_mode

    model = tiny("imagenet_conv").train()
    a_open, b_open, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with eval_mode(model):
            a_open.set()
            b_open.wait(10)
        a_left.set()

    def thread_b():
        a_open.wait(10)
        with eval_mode(model):
            b_open.set()
            a_left.wait(10)
            seen["training inside B after A left"] = [m.training for m in model.modules()]

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not any(seen["training inside B after A left"])
    assert all(m.training for m in model.modules())


def test_eval_mode_whose_eval_call_raises_leaves_no_block_behind():
    # A module whose train() raises (here once, as a hook's error would) failed the
    # first block; it stayed registered with no one in it, and the next block skipped
    # eval() and ran the model in training mode.
    from perceiver_torch.pipelines.base import eval_mode

    model = tiny("imagenet_conv").train()
    real_train, calls = torch.nn.Module.train, []

    def failing_once(self, mode=True):
        if not calls:
            calls.append(mode)
            raise RuntimeError("a hook failed")
        return real_train(self, mode)

    model.train = failing_once.__get__(model)
    with pytest.raises(RuntimeError, match="a hook failed"):
        with eval_mode(model):
            pass
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_warning_blocks_of_threads_leave_the_warnings_state_as_they_found_it():
    # Thread A reads an image (its Pillow warnings become notes: a catch_warnings
    # block), thread B opens its block meanwhile and leaves after A: B restored A's
    # recording handler, and every later warning of the process went into A's list.
    import threading
    import warnings

    from perceiver_torch.pipelines.image import pillow_warnings_as_notes, quiet_bomb_warning

    handler, filters = warnings._showwarnmsg_impl, list(warnings.filters)
    a_open, b_open, a_left = threading.Event(), threading.Event(), threading.Event()

    def thread_a():
        with pillow_warnings_as_notes([]):
            a_open.set()
            b_open.wait(2)  # B enters now where blocks may overlap; else after A
        a_left.set()

    def thread_b():
        a_open.wait(10)
        with quiet_bomb_warning([]), pillow_warnings_as_notes([]):
            b_open.set()
            a_left.wait(10)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings._showwarnmsg_impl is handler
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown", UserWarning)


def test_float_pixels_on_another_scale_get_a_note():
    # Floats are on the 0..255 scale: a ToTensor image (0..1) was classified as a
    # nearly black picture, and a normalised one clipped, without a word.
    pipeline = ClassifyPipeline(tiny("imagenet_fourier"))
    image = random_rgb(40, 50)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    assert pipeline(tensor).notes == ()
    assert pipeline(np.zeros((8, 8, 3), np.float32)).notes == ()  # black is black
    (note,) = pipeline(tensor / 255).notes
    assert "all within 0..1" in note and "multiply them by 255" in note
    (note,) = pipeline((tensor - 120) / 60).notes
    assert "clipped to 0..255" in note
    assert "within 0..1" in pipeline(Image.fromarray(image[..., 0] / np.float32(255))).notes[0]


def test_an_image_over_twice_pillows_limit_is_refused_with_advice(tmp_path, monkeypatch):
    """Above twice MAX_IMAGE_PIXELS Pillow refuses to decode (DecompressionBombError):
    the error said so but not what to do. 56x40 = 2240 pixels against a limit of
    1000 (refused above 2000) stands for an image over 179 megapixels."""
    from perceiver_torch.pipelines.image import read_image_file

    big = tmp_path / "big.png"
    Image.fromarray(random_rgb(40, 56)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError) as refused:
        read_image_file(big, [], None)
    message = str(refused.value)
    assert message.startswith(f"{big} is too large to decode safely (")
    assert message.endswith("give a copy scaled down below 0.002 megapixels"), message


def test_any_os_pathlike_is_a_path(tmp_path):
    """os.DirEntry (os.scandir), pure pathlib paths and other os.PathLike names are
    file paths, as str and Path are: they were refused as "cannot classify a
    DirEntry" (flow: the same words)."""
    from pathlib import PurePath

    from perceiver_torch.pipelines import FlowPipeline

    pipeline = ClassifyPipeline(tiny("imagenet_conv"))
    path = tmp_path / "one.png"
    Image.fromarray(random_rgb(40, 60)).save(path)
    expected = pipeline(path)
    entry = next(e for e in os.scandir(tmp_path) if e.name == "one.png")
    for one in (entry, PurePath(path)):
        result = pipeline(one)
        assert not isinstance(result, list)
        assert torch.equal(result.logits, expected.logits)
        assert result.input == str(path)
    assert torch.equal(pipeline([entry, path])[0].logits, expected.logits)
    flow = FlowPipeline(tiny("optical_flow"), pad=True)
    assert np.array_equal(flow(entry, entry).flow, flow(path, path).flow)


def test_a_meta_tensor_is_refused_by_name():
    """A meta tensor holds no values: it was torch's "Cannot copy out of meta
    tensor"; and a flow frame of an unknown type is not told it cannot be
    "classified"."""
    from perceiver_torch.pipelines.image import load_rgb

    with pytest.raises(InputError, match="^the image's pixels are a meta tensor"):
        load_rgb(torch.empty(3, 8, 8, device="meta"))
    with pytest.raises(InputError, match="^cannot read an image from a NoneType"):
        load_rgb(None)


def test_sixteen_bit_pixels_within_the_8_bit_range_get_a_note(tmp_path):
    """8-bit values in a 16-bit container (a mode "I" image made from int32 values,
    a uint16 array, a 16-bit PNG) were read on the 0..65535 scale, nearly black,
    without a word; the float path notes the same kind of mistake."""
    from perceiver_torch.pipelines.image import load_rgb

    values = np.random.default_rng(4).integers(0, 256, (12, 10))
    path = tmp_path / "sixteen.png"
    Image.fromarray(values.astype(np.uint16)).save(path)
    for image in (Image.fromarray(values.astype(np.int32)), values.astype(np.uint16),
                  str(path)):
        notes = []
        load_rgb(image, notes)
        assert len(notes) == 1 and "16-bit values are all within 0..255" in notes[0], notes
    notes = []
    load_rgb((values * 257).astype(np.uint16), notes)  # the full 16-bit scale
    assert notes == []


def test_float16_logits_beyond_its_range_are_noted():
    """A float16 model whose logits pass 65504 (weights all in range) gave inf
    logits, NaN probabilities and an arbitrary ranking with no note, where float32
    was confident. The output projection is scaled (weight and bias: the logits scale
    exactly) so that float32's largest logit is 1e5: float16's own is within a few
    percent of it (its rounding upstream, u = 2^-11 per operation), so far past the
    65520 from which float16 rounds to inf. bfloat16 (float32's range) and float32
    stay finite and get no note."""
    model = tiny("imagenet_conv")
    image = random_rgb(40, 40)
    largest = ClassifyPipeline(model)(image).logits.abs().max().item()
    factor = 1e5 / largest
    with torch.no_grad():
        model.decoder.output_projection.weight.mul_(factor)
        model.decoder.output_projection.bias.mul_(factor)
    assert model.decoder.output_projection.weight.abs().max() < 65504  # loads in float16
    expected = ClassifyPipeline(model)(image)
    assert expected.notes == () and torch.isfinite(expected.logits).all()
    for dtype in (torch.bfloat16, torch.float16):
        result = ClassifyPipeline(pt.build("imagenet_conv", pt.TINY_CONFIGS["imagenet_conv"], dtype=dtype).eval())
        result.model.load_state_dict(model.state_dict())
        got = result(image)
        if dtype == torch.bfloat16:
            assert got.notes == () and torch.isfinite(got.logits).all()
        else:
            assert not torch.isfinite(got.logits).all()
            assert len(got.notes) == 1 and "non-finite" in got.notes[0]
            assert "float16 overflowed" in got.notes[0]
