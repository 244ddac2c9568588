"""The six perceiver_torch task models: sizes, forward contracts, build/load, stages."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import perceiver_torch as pt
from float64_reference import check_within_float32_rounding, float64_model
from official_facts import OFFICIAL_PARAMETERS
from perceiver_torch import configs, fast_paths
from perceiver_torch.optical_flow import tile_starts

GOLDEN = Path(__file__).parent / "data" / "golden"
NAMES = list(pt.MODEL_NAMES)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and float buffer distinct and non-zero (STYLE 13)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm.weight", "batchnorm.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(1.0 + 0.5 * torch.rand(b.shape, generator=gen))
    return model


def tiny(name: str, seed: int = 0) -> pt.PerceiverIO:
    torch.manual_seed(seed)
    return randomize(pt.build(name, pt.TINY_CONFIGS[name]), seed).eval()


def tiny_inputs(name: str, batch: int = 2, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    c = pt.TINY_CONFIGS[name]
    if name == "language_perceiver":
        return (torch.randint(0, c.vocab_size, (batch, c.max_seq_len), generator=gen),)
    if name == "imagenet_learned":
        return (torch.randn(batch, 3, *c.image_size, generator=gen),)
    if name in ("imagenet_fourier", "imagenet_conv"):
        return (torch.randn(batch, 3, 32, 32, generator=gen),)
    if name == "optical_flow":
        return (torch.rand(batch, 2, 3, *c.image_size, generator=gen) * 2 - 1,)
    images = torch.rand(batch, c.num_frames, 3, *c.image_size, generator=gen)
    audio = torch.randn(batch, c.num_frames * c.audio_samples_per_frame, generator=gen)
    return images, audio


# -- sizes --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_official_parameter_counts(name):
    with torch.device("meta"):
        model = pt.build(name)
    # The language model's tied embedding counts once; BatchNorm statistics are
    # buffers, as they are state in the official file.
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[name]


@pytest.mark.parametrize("name", NAMES)
def test_tiny_parameter_counts_match_golden(name):
    expected = json.loads((GOLDEN / name / "config.json").read_text())["parameters"]
    model = pt.build(name, pt.TINY_CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == expected


def test_language_embedding_is_stored_once():
    model = pt.build("language_perceiver", pt.TINY_CONFIGS["language_perceiver"])
    keys = [k for k in model.state_dict() if k.endswith("embedding.weight")]
    assert keys == ["input_preprocessor.embedding.weight"]


def test_official_structure_flags():
    """Query residuals and projections as MODELS.md lists them."""
    expected_decoder_residual = {
        "language_perceiver": False,
        "imagenet_learned": False,  # HF adds it anyway: logits off by 1.6%
        "imagenet_fourier": True,
        "imagenet_conv": True,
        "optical_flow": False,
        "video_autoencoding": False,
    }
    for name, residual in expected_decoder_residual.items():
        with torch.device("meta"):
            model = pt.build(name)
        assert model.decoder.cross_attention.use_query_residual is residual, name
        assert model.encoder.cross_attention.use_query_residual is True, name
        has_projection = model.decoder.output_projection is not None
        assert has_projection is (name != "language_perceiver"), name


def test_build_accepts_dict_and_rejects_unknown():
    model = pt.build(
        "optical_flow", configs.config_to_dict(pt.TINY_CONFIGS["optical_flow"])
    )
    assert model.config == pt.TINY_CONFIGS["optical_flow"]
    with pytest.raises(ValueError, match="unknown model") as built:
        pt.build("imagenet_resnet")
    # config_from_dict raised a bare KeyError('imagenet_resnet'); now build's message.
    with pytest.raises(ValueError) as configured:
        pt.config_from_dict("imagenet_resnet", {})
    assert str(configured.value) == str(built.value)
    assert str(built.value) == (
        "unknown model 'imagenet_resnet'; known models: " + ", ".join(pt.MODEL_NAMES)
    )
    with pytest.raises(ValueError, match="unknown config key"):
        pt.build("optical_flow", {"num_bandz": 3})
    with pytest.raises(TypeError):
        pt.build("optical_flow", pt.TINY_CONFIGS["imagenet_conv"])


def test_tiny_configs_are_read_only():
    """TINY_CONFIGS is shared by every build, fixture and mapping preset: no caller
    can add, replace or remove an entry, nor change a config in it (frozen, and
    every value immutable); a variant is made with dataclasses.replace."""
    import dataclasses

    before = dict(pt.TINY_CONFIGS)
    assert list(before) == list(pt.MODEL_NAMES)
    with pytest.raises(TypeError):
        pt.TINY_CONFIGS["optical_flow"] = pt.TINY_CONFIGS["imagenet_conv"]
    with pytest.raises(TypeError):
        pt.TINY_CONFIGS["new"] = pt.TINY_CONFIGS["imagenet_conv"]
    with pytest.raises(TypeError):
        del pt.TINY_CONFIGS["optical_flow"]
    for name in ("clear", "update", "pop", "setdefault", "popitem"):
        assert not hasattr(pt.TINY_CONFIGS, name), name
    for name, config in pt.TINY_CONFIGS.items():
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.num_latents = 3
        hash(config)  # every field immutable (tuples, not lists), all the way down
    variant = dataclasses.replace(pt.TINY_CONFIGS["optical_flow"], num_latents=4)
    assert variant.num_latents == 4
    assert dict(pt.TINY_CONFIGS) == before and pt.configs.TINY_CONFIGS is pt.TINY_CONFIGS
    assert pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"]).config == before[
        "optical_flow"
    ]


@pytest.mark.parametrize("table", ["MODEL_CLASSES", "CONFIG_CLASSES"])
def test_class_registries_are_read_only(table):
    """build(), load() and config_from_dict() look the classes up in these tables:
    a caller that could replace or remove an entry would change every later build
    (both were plain dicts). Reading them as mappings still works."""
    registry = getattr(pt, table)
    before = dict(registry)
    assert list(before) == list(pt.MODEL_NAMES)
    with pytest.raises(TypeError):
        registry["optical_flow"] = registry["imagenet_conv"]
    with pytest.raises(TypeError):
        registry["new"] = registry["imagenet_conv"]
    with pytest.raises(TypeError):
        del registry["optical_flow"]
    for name in ("clear", "update", "pop", "setdefault", "popitem"):
        assert not hasattr(registry, name), name
    assert dict(registry) == before
    assert pt.registry.MODEL_CLASSES is pt.MODEL_CLASSES
    assert pt.configs.CONFIG_CLASSES is pt.CONFIG_CLASSES
    model = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"])
    assert type(model) is pt.MODEL_CLASSES["optical_flow"]
    assert type(model.config) is pt.CONFIG_CLASSES["optical_flow"]


# -- forward contracts ----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_dtypes(name):
    model, c = tiny(name), pt.TINY_CONFIGS[name]
    with torch.no_grad():
        out = model(*tiny_inputs(name))
    if name == "language_perceiver":
        assert out.shape == (2, c.max_seq_len, c.vocab_size)
    elif name.startswith("imagenet"):
        assert out.shape == (2, c.num_classes)
    elif name == "optical_flow":
        assert out.shape == (2, 2, *c.image_size)
    else:
        n_image = c.num_frames * c.image_size[0] * c.image_size[1]
        n_audio = c.num_frames * c.audio_samples_per_frame
        assert out["image"].shape == (2, n_image, 3)
        assert out["audio"].shape == (2, n_audio)
        assert out["label"].shape == (2, c.num_classes)
        out = torch.cat([v.flatten() for v in out.values()])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_language_short_sequence_equals_padded_run():
    model = tiny("language_perceiver")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 262, (2, 64), generator=gen)
    mask = torch.zeros(2, 64, dtype=torch.int64)
    mask[0, :40], mask[1, :23] = 1, 1
    padded = ids * mask  # pad id 0 after the real tokens
    with torch.no_grad():
        short0 = model(ids[:1, :40])
        short1 = model(ids[1:, :23])
        masked = model(padded[:, :40], mask[:, :40])
        with fast_paths.plain():
            full = model(padded, mask)  # the reference's padded computation
            exact = float64_model(model)(padded, mask)  # ... in float64
    # Equal in exact arithmetic; in float32 as close to float64 as the padded run.
    for label, got, rows in [
        ("first row alone", short0[0], (0, 40)),
        ("second row alone", short1[0], (1, 23)),
        ("batch cut at 40", masked[1, :23], (1, 23)),
    ]:
        row, length = rows
        check_within_float32_rounding(
            label, got, full[row, :length], exact[row, :length]
        )
    # Masked query rows are not the unmasked computation: bias -> MLP -> logits.
    with torch.no_grad():
        unmasked = model(padded)
    assert (unmasked[1, 30] - full[1, 30]).abs().max() > 1e-3
    # Every masked query row is the same computation on the same values (kernels may
    # still block rows differently).
    check_within_float32_rounding("masked rows", full[1, 50], full[1, 30], exact[1, 30])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.int64))


def test_language_skips_trailing_padding_exactly():
    model = tiny("language_perceiver").eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(6, 262, (2, 64), generator=gen)
    mask = torch.zeros(2, 64, dtype=torch.int64)
    mask[0, :37], mask[1, :12] = 1, 1
    mask[0, 5] = 0  # a masked position inside the real tokens stays computed
    exact_model = float64_model(model)
    with torch.no_grad():
        trimmed = model(ids * mask, mask)
        full = model.logits(ids * mask, mask)  # every position computed
        exact = exact_model.logits(ids * mask, mask)
    assert trimmed.shape == full.shape == (2, 64, 262)
    check_within_float32_rounding("trailing padding", trimmed, full, exact)
    # Everything masked: still the official output (one position is computed).
    none = torch.zeros_like(mask)
    with torch.no_grad():
        check_within_float32_rounding(
            "all masked",
            model(ids, none),
            model.logits(ids, none),
            exact_model.logits(ids, none),
        )


@pytest.mark.parametrize("name", ["imagenet_fourier", "imagenet_conv"])
@pytest.mark.parametrize("size", [(24, 40), (33, 17)])
def test_imagenet_other_sizes(name, size):
    model = tiny(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_imagenet_learned_requires_training_size():
    model = tiny("imagenet_learned")
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 24, 32))


def test_flow_other_size():
    model = tiny("optical_flow")
    frames = torch.rand(1, 2, 3, 20, 36) * 2 - 1
    with torch.no_grad():
        flow = model(frames)
    assert flow.shape == (1, 2, 20, 36) and torch.isfinite(flow).all()


def test_tile_starts():
    # The colab lists the origin 0 twice at exactly the tile size (range(0, 368, 348)).
    assert tile_starts(368, 368, 20) == [0, 0]
    assert tile_starts(716, 368, 20) == [0, 348, 348]
    assert tile_starts(436, 368, 20) == [0, 68]
    assert tile_starts(1024, 496, 20) == [0, 476, 528]
    assert tile_starts(1000, 368, 20) == [0, 348, 632]
    with pytest.raises(ValueError):
        tile_starts(300, 368, 20)
    # A negative overlap stepped past the tile's end: [0, 373, 648] left 5 px between
    # tiles uncovered.
    with pytest.raises(ValueError, match="min_overlap -5 must be from 0"):
        tile_starts(1000, 368, -5)


def test_flow_tiled_blends_tiles():
    model = tiny("optical_flow")
    th, tw = model.config.image_size  # (24, 32)
    gen = torch.Generator().manual_seed(3)
    frames = torch.rand(1, 2, 3, 30, 70, generator=gen) * 2 - 1
    ys, xs = [0, 6], [0, 28, 38]  # step tile - overlap, last tile flush

    def independent_blend(net: torch.nn.Module, frames: torch.Tensor) -> np.ndarray:
        """Per pixel, the weighted mean over the tiles covering it, one tile at a time."""
        num = np.zeros((2, 30, 70))
        den = np.zeros((30, 70))
        for y0 in ys:
            for x0 in xs:
                piece = net(frames[..., y0 : y0 + th, x0 : x0 + tw])[0].double().numpy()
                for y in range(th):
                    for x in range(tw):
                        w = min(x + 1, tw - x, y + 1, th - y)
                        num[:, y0 + y, x0 + x] += w * piece[:, y, x]
                        den[y0 + y, x0 + x] += w
        return num / den

    with torch.no_grad():
        tiled = model.tiled(frames, min_overlap=4)
        per_tile = independent_blend(model, frames)
        exact = independent_blend(float64_model(model), frames.double())
        single = model.tiled(frames[..., :th, :tw])
        direct = model(frames[..., :th, :tw])
    # The batched tiles and the float32 blend reorder the same sums: as close to the
    # float64 blend as the one-tile-at-a-time float32 blend is.
    check_within_float32_rounding("tiled", tiled[0], per_tile, exact)
    # One tile: the weights cancel (w * x / w); only that rounding is left.
    torch.testing.assert_close(single, direct, rtol=2 * 2.0**-24, atol=0)


def test_video_reconstruct_equals_chunk_by_chunk_decoding():
    model = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding")
    c = model.config
    with torch.no_grad():
        whole = model.reconstruct(images, audio, num_chunks=4)
        latents = model.encode(images, audio)
        chunks = [model.decode(latents, sub) for sub in model.chunk_subsamples(4)]
        first = model(
            images, audio, {"image": torch.arange(128), "audio": torch.arange(2)}
        )
    image = torch.cat([p["image"] for p in chunks], dim=1)
    image = image.reshape(2, c.num_frames, *c.image_size, 3).permute(0, 1, 4, 2, 3)
    assert whole["image"].shape == (2, c.num_frames, 3, *c.image_size)
    assert torch.equal(whole["image"], image)
    assert torch.equal(whole["audio"], torch.cat([p["audio"] for p in chunks], dim=1))
    assert torch.equal(whole["label"], chunks[0]["label"])
    assert torch.equal(first["image"], chunks[0]["image"])
    assert torch.equal(first["audio"], chunks[0]["audio"])
    assert [len(s["image"]) for s in model.chunk_subsamples(4)] == [128] * 4
    assert [s["audio"].tolist() for s in model.chunk_subsamples(4)][3] == [6, 7]


def test_video_queries_use_the_colabs_subsampled_positions():
    """Image and audio queries sit at -1 + 2*i/N (every point too), with the
    configured max_resolution, not at the linspace grid of the encoder's inputs."""
    model = tiny("video_autoencoding")
    c = model.config
    cases = {
        "image": (
            (c.num_frames, *c.image_size),
            c.image_num_bands,
            (c.num_frames, c.image_size[0] // 4, c.image_size[1] // 4),
        ),
        "audio": (
            (c.num_frames * c.audio_samples_per_frame // 16,),
            c.audio_num_bands,
            (c.num_frames * c.audio_samples_per_frame,),
        ),
    }
    for name, (dims, bands, resolution) in cases.items():
        n = int(np.prod(dims))
        idx = np.array([0, 1, n // 3, n - 1])
        pos = -1.0 + 2.0 * np.stack(np.unravel_index(idx, dims), -1) / np.array(dims)
        freqs = np.stack([np.linspace(1.0, r / 2.0, bands) for r in resolution])
        per_pos = (pos[:, :, None] * freqs[None]).reshape(len(idx), -1)
        expected = np.concatenate(
            [pos, np.sin(np.pi * per_pos), np.cos(np.pi * per_pos)], -1
        )
        queries = model.output_queries.modalities[name]
        for got in (queries.features(torch.from_numpy(idx)), queries.features()[idx]):
            torch.testing.assert_close(
                got.double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-6
            )


def test_video_accepts_audio_with_channel_axis_and_label_has_no_effect():
    model = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding")
    sub = {"image": torch.arange(5), "audio": torch.arange(1)}
    with torch.no_grad():
        a = model(images, audio, sub)
        b = model(images, audio[..., None], sub, label=torch.randn(2, 10))
    for key in a:
        assert torch.equal(a[key], b[key])


# The tiny video model decodes 512 image points (2 x 16 x 16), 8 audio patches and 1
# label query; an index out of [0, n) used to wrap around (512 decoded point 0).
_BAD_SUBSAMPLES = [
    ({"image": torch.tensor([3, 512])}, r"subsample\['image'\] must hold flat indices "
     r"in \[0, 512\) \(512 image points over \(T, H, W\) = \(2, 16, 16\).*got 512"),
    ({"image": torch.tensor([0, -1])}, r"subsample\['image'\].*\[0, 512\).*negative "
     r"indices are not counted from the end\), got -1"),
    ({"audio": torch.tensor([8])}, r"subsample\['audio'\] must hold flat indices in "
     r"\[0, 8\) \(8 audio patches of 16 samples.*got 8"),
    ({"audio": torch.tensor([-9])}, r"subsample\['audio'\].*got -9"),
    ({"label": torch.tensor([1])}, r"subsample\['label'\].*\[0, 1\).*got 1"),
    ({"audio": torch.tensor([], dtype=torch.long)}, r"subsample\['audio'\] is empty; "
     r"give at least one index in \[0, 8\), or None"),
    ({"image": torch.zeros(0, dtype=torch.long)}, r"subsample\['image'\] is empty"),
    ({"images": torch.arange(3)}, r"unknown modality 'images'; the modalities are "
     r"'audio', 'image', 'label'"),
    ({"image": torch.tensor([1.0])}, r"subsample\['image'\] must be an integer tensor"),
    ({"image": torch.tensor([True, False])}, r"torch.bool mask.*nonzero"),
    ({"image": torch.tensor(3)}, r"subsample\['image'\].*must have shape \(n\)"),
    ({"image": [3]}, r"subsample\['image'\] must be a torch.Tensor"),
    ([torch.arange(3)], r"subsample must be a dict"),
]


@pytest.mark.parametrize("subsample,message", _BAD_SUBSAMPLES)
@pytest.mark.parametrize("plain", [False, True], ids=["folded", "plain"])
def test_video_refuses_bad_subsample_indices(subsample, message, plain):
    """Out-of-range decoder indices were wrapped around (index 512 of 512 points
    decoded point 0: a silently wrong answer; the reference clips instead); negative
    ones are not documented as counting from the end; an empty one failed in
    torch.cat. Every entry point refuses them naming the argument, the value and the
    range: forward (before encoding), decode, with and without the folded decoder."""
    model = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding")
    modes = fast_paths.plain() if plain else contextlib.nullcontext()
    with torch.no_grad(), modes:
        with pytest.raises(pt.InputError, match=message):
            model(images, audio, subsample)
        latents = model.encode(images, audio)
        with pytest.raises(pt.InputError, match=message):
            model.decode(latents, subsample)


def test_video_accepts_every_point_and_none_per_modality():
    model = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding")
    assert model.decoder_points() == {"audio": 8, "image": 512, "label": 1}
    edges = {"image": torch.tensor([0, 511], dtype=torch.int32),
             "audio": torch.tensor([7, 0]), "label": torch.tensor([0])}
    with torch.no_grad():
        out = model(images, audio, edges)
        whole = model.reconstruct(images, audio, num_chunks=1)
        only_image = model(images, audio, {"image": torch.tensor([511]), "audio": None})
    assert out["image"].shape == (2, 2, 3) and out["audio"].shape == (2, 32)
    torch.testing.assert_close(out["image"][:, 1], whole["image"][:, -1, :, -1, -1])
    torch.testing.assert_close(out["audio"][:, :16], whole["audio"][:, -16:])
    torch.testing.assert_close(only_image["audio"], whole["audio"])
    with torch.device("meta"):  # no values to check: shapes only
        meta = pt.build("video_autoencoding", pt.TINY_CONFIGS["video_autoencoding"])
        got = meta(*(x.to("meta") for x in (images, audio)),
                   {"image": torch.tensor([600], device="meta")})
    assert got["image"].shape == (2, 1, 3)


def _video_graph(model):
    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images, audio, image_index, audio_index):
            out = self.model(images, audio, {"image": image_index, "audio": audio_index})
            return out["image"], out["audio"]

    return Graph()


@pytest.mark.parametrize("record", ["jit.trace", "export", "compile"])
def test_video_graphs_fail_on_out_of_range_indices(record):
    """Graphs cannot run the eager range check (a value check would be frozen or a
    graph break), so an index outside [0, n) must fail in the gather rather than
    wrap around to another point, as it did (and in the ONNX graph:
    test_onnx_export)."""
    model = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding")
    graph = _video_graph(model)
    good = (images, audio, torch.tensor([0, 5, 511]), torch.tensor([1, 7]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if record == "jit.trace":
            run = torch.jit.trace(graph, good, strict=False, check_trace=False)
        elif record == "export":
            run = torch.export.export(graph, good).module()
        else:
            torch._dynamo.reset()
            run = torch.compile(graph, backend="aot_eager")
        expected = graph(*good)
        for got, want in zip(run(*good), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for image_index, audio_index in (([0, 5, 512], [1, 7]), ([-1, 5, 6], [1, 7]),
                                         ([0, 5, 6], [1, 8]), ([0, 5, 6], [-1, 7])):
            with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
                run(images, audio, torch.tensor(image_index), torch.tensor(audio_index))


# -- stages -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_capture_stages(name):
    model, c = tiny(name), pt.TINY_CONFIGS[name]
    inputs = tiny_inputs(name, batch=1)
    if name == "video_autoencoding":
        inputs = inputs + ({"image": torch.arange(10), "audio": torch.arange(3)},)
    if name == "language_perceiver":
        # Trailing padding, which the eval-time shortcut would skip: the stages must
        # still be those of the whole padded sequence.
        mask = torch.ones_like(inputs[0])
        mask[:, c.max_seq_len // 2 :] = 0
        inputs = inputs + (mask,)
    with torch.no_grad(), pt.capture_stages(model) as stages:
        model(*inputs)
    assert set(stages) == {"preprocessed", "latents", "decoder_output"}
    pre, lat, dec = stages["preprocessed"], stages["latents"], stages["decoder_output"]
    assert pre.dim() == 3 and pre.shape[0] == 1
    assert pre.shape[2] == model.encoder.cross_attention.kv_norm.normalized_shape[0]
    assert lat.shape == (
        1,
        model.encoder.latents.shape[0],
        model.encoder.latents.shape[1],
    )
    if name == "language_perceiver":
        expected_m = (c.max_seq_len, c.d_model)
    elif name.startswith("imagenet"):
        expected_m = (1, c.num_classes)
    elif name == "optical_flow":
        expected_m = (pre.shape[1], 2)
    else:
        expected_m = (10 + 3 + 1, c.decoder_channels)  # image, audio, label queries
    assert dec.shape == (1,) + expected_m
    if name == "optical_flow":
        assert pre.shape[1] == c.image_size[0] * c.image_size[1]
    # Hooks are removed afterwards and the fast paths are on again.
    assert not model.encoder._forward_hooks and not model.decoder._forward_hooks
    assert fast_paths.disabled_paths() == frozenset()


@pytest.mark.parametrize("other_in_dual_level", [False, True])
def test_capture_stages_leaves_other_threads_passes_alone(other_in_dual_level):
    """A thread records stages (a server's debug request) while another runs the same
    model on a batch of another size: the other pass went through the block's hooks,
    whose concatenation of decoder outputs failed it ("Sizes of tensors must match"),
    and its stages mixed with the recording thread's. Also while the other thread
    holds a forward_ad.dual_level open (its level is process-wide, and the thread
    check once gave way wherever linear.compiling() held, which that level makes
    true)."""
    import contextlib
    import threading

    from torch.autograd import forward_ad

    model = tiny("imagenet_fourier")
    mine = tiny_inputs("imagenet_fourier", batch=1)
    other = tiny_inputs("imagenet_fourier", batch=2, seed=1)
    with torch.no_grad(), pt.capture_stages(model) as alone:
        model(*mine)
    with torch.no_grad(), pt.capture_stages(model):  # the other pass's conditions
        expected_other = model(*other)
    opened, other_done = threading.Event(), threading.Event()
    recorded, other_out, errors = {}, [], []

    def recording():
        try:
            with torch.no_grad(), pt.capture_stages(model) as stages:
                opened.set()
                other_done.wait(10)
                model(*mine)
            recorded.update(stages)
        except Exception as error:
            errors.append(error)

    def serving():
        opened.wait(10)
        level = forward_ad.dual_level() if other_in_dual_level else contextlib.nullcontext()
        try:
            with torch.no_grad(), level:
                other_out.append(model(*other))
        except Exception as error:
            errors.append(error)
        other_done.set()

    threads = [threading.Thread(target=recording), threading.Thread(target=serving)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert set(recorded) == set(alone)
    assert all(torch.equal(recorded[key], alone[key]) for key in alone)
    if not other_in_dual_level:  # (there the plain paths compute it: other rounding)
        assert torch.equal(other_out[0], expected_other)


# -- load ------------------------------------------------------------------------


def _save_safetensors(path, name, model, metadata=None):
    from safetensors.torch import save_file

    meta = {"model": name, "config": json.dumps(configs.config_to_dict(model.config))}
    save_file(
        model.state_dict(), str(path), metadata=meta if metadata is None else metadata
    )


@pytest.mark.parametrize("name", NAMES)
def test_build_and_load_give_float32_under_a_float64_default_dtype(tmp_path, name):
    # build() constructs its modules in torch's default dtype; dtype None or
    # "float32" (and load() of a float32 file, which asks for float32) must still
    # give a float32 model where torch.set_default_dtype(torch.float64) is in force.
    path = tmp_path / "model.safetensors"
    _save_safetensors(path, name, tiny(name))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        models = {
            "build()": pt.build(name, pt.TINY_CONFIGS[name]),
            "build(dtype='float32')": pt.build(name, pt.TINY_CONFIGS[name], dtype="float32"),
            "load()": pt.load(path),
            "load(dtype='float32')": pt.load(path, dtype="float32"),
            "build(dtype='bfloat16')": pt.build(
                name, pt.TINY_CONFIGS[name], dtype="bfloat16"
            ),
        }
    finally:
        torch.set_default_dtype(previous)
    for label, model in models.items():
        floating = {
            t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()
        }
        want = torch.bfloat16 if "bfloat16" in label else torch.float32
        assert floating == {want}, f"{label}: {floating}"


@pytest.mark.parametrize("name", NAMES)
def test_load_round_trip(tmp_path, name):
    model = tiny(name, seed=5)
    inputs = tiny_inputs(name, batch=1)
    if name == "video_autoencoding":
        inputs = inputs + ({"image": torch.arange(7), "audio": torch.arange(2)},)
    with torch.no_grad():
        expected = model(*inputs)
    st = tmp_path / "model.safetensors"
    _save_safetensors(st, name, model)
    pt_file = tmp_path / "model.pt"
    torch.save(
        {
            "model": name,
            "config": configs.config_to_dict(model.config),
            "state_dict": model.state_dict(),
        },
        pt_file,
    )
    for path in (st, pt_file):
        loaded = pt.load(path)
        assert type(loaded) is type(model) and not loaded.training
        assert loaded.config == model.config
        with torch.no_grad():
            got = loaded(*inputs)
        if isinstance(expected, dict):
            for key in expected:
                assert torch.equal(got[key], expected[key])
        else:
            assert torch.equal(got, expected)


def test_load_errors(tmp_path):
    name = "imagenet_fourier"
    model = tiny(name)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(model.state_dict(), str(bare))
    with pytest.raises(pt.LoadError, match="metadata lacks model, config"):
        pt.load(bare)

    unknown = tmp_path / "unknown.safetensors"
    _save_safetensors(unknown, name, model, {"model": "resnet", "config": "{}"})
    with pytest.raises(pt.LoadError, match="unknown model 'resnet'"):
        pt.load(unknown)

    state = model.state_dict()
    missing = dict(state)
    del missing["decoder.output_projection.bias"]
    extra = dict(state, **{"encoder.extra": torch.zeros(1)})
    wrong = dict(state, **{"encoder.latents": torch.zeros(3, 3)})
    meta = {"model": name, "config": json.dumps(configs.config_to_dict(model.config))}
    for label, sd, pattern in [
        ("missing", missing, "missing keys .*decoder.output_projection.bias"),
        ("extra", extra, "unexpected keys .*encoder.extra"),
        ("wrong", wrong, "encoder.latents: expected \\(16, 64\\), got \\(3, 3\\)"),
    ]:
        path = tmp_path / f"{label}.safetensors"
        save_file(sd, str(path), metadata=meta)
        with pytest.raises(pt.LoadError, match=pattern):
            pt.load(path)

    bare_pt = tmp_path / "bare.pt"
    torch.save(state, bare_pt)
    with pytest.raises(pt.LoadError, match="'model', 'config' and 'state_dict'"):
        pt.load(bare_pt)

    # A torch.save file whose parts are not what a converted file holds: LoadError,
    # never a TypeError/AttributeError from deep inside load.
    meta_dict = configs.config_to_dict(model.config)
    for label, payload in [
        ("sd_list", {"model": name, "config": meta_dict, "state_dict": [1, 2]}),
        ("sd_none", {"model": name, "config": meta_dict, "state_dict": None}),
        ("sd_ints", {"model": name, "config": meta_dict, "state_dict": {k: 1 for k in state}}),
        ("sd_int_key", {"model": name, "config": meta_dict, "state_dict": {**state, 5: torch.zeros(1)}}),
        ("meta_list", {"model": name, "config": meta_dict, "state_dict": state, "metadata": [1]}),
    ]:
        path = tmp_path / f"{label}.pt"
        torch.save(payload, path)
        with pytest.raises(pt.LoadError, match="'state_dict'|'metadata'"):
            pt.load(path)


    good = tmp_path / "good.safetensors"
    _save_safetensors(good, name, model)
    for bad in ("bogus", ""):
        with pytest.raises(ValueError, match="map_location"):
            pt.load(good, map_location=bad)
    if not torch.cuda.is_available():
        # 0 is torch's cuda:0: never silently the CPU.
        with pytest.raises(ValueError, match="map_location"):
            pt.load(good, map_location=0)
    assert pt.load(good, map_location=torch.device("cpu")).encoder.latents.device.type == "cpu"


    packed = tmp_path / "packed.safetensors"
    _save_safetensors(packed, name, model)
    for bad in ("no", "false", 0, 1):
        with pytest.raises(TypeError, match="pack_weights"):
            pt.load(packed, pack_weights=bad)

    bad_config = tmp_path / "bad_config.safetensors"
    save_file(
        state, str(bad_config), metadata={"model": name, "config": '{"bands": 3}'}
    )
    with pytest.raises(pt.LoadError, match="bad config"):
        pt.load(bad_config)


# -- full size (pytest -m full) ------------------------------------------------


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cuda", marks=NO_CUDA),
        pytest.param("cuda:0", marks=NO_CUDA),
        pytest.param(torch.device("cuda"), marks=NO_CUDA),
        # One past the last GPU: refused with and without CUDA.
        f"cuda:{torch.cuda.device_count()}",
    ],
    ids=str,
)
def test_load_names_a_missing_accelerator_before_reading(tmp_path, device):
    """map_location="cuda" without that GPU is a ValueError naming the devices there
    are, before the file is read (the path does not exist), not torch's
    AssertionError ("Torch not compiled with CUDA enabled") once tensors move."""
    with pytest.raises(ValueError, match="no CUDA device") as info:
        pt.load(tmp_path / "absent.safetensors", map_location=device)
    assert not isinstance(info.value, pt.LoadError)
    message = str(info.value)
    assert "map_location" in message and "available devices: cpu" in message
    assert ", ".join(pt.registry.available_devices()) in message


FULL_INPUTS = {
    "language_perceiver": lambda: (torch.randint(0, 262, (1, 2048)),),
    "imagenet_learned": lambda: (torch.randn(1, 3, 224, 224),),
    "imagenet_fourier": lambda: (torch.randn(1, 3, 224, 224),),
    "imagenet_conv": lambda: (torch.randn(1, 3, 224, 224),),
    "optical_flow": lambda: (torch.rand(1, 2, 3, 368, 496) * 2 - 1,),
    "video_autoencoding": lambda: (
        torch.rand(1, 16, 3, 224, 224),
        torch.randn(1, 30720),
        {"image": torch.arange(6272), "audio": torch.arange(15)},
    ),
}


@pytest.mark.full
@pytest.mark.parametrize("name", NAMES)
def test_full_size_forward(name):
    torch.manual_seed(0)
    model = pt.build(name).eval()
    with torch.no_grad():
        out = model(*FULL_INPUTS[name]())
    if name == "language_perceiver":
        assert out.shape == (1, 2048, 262)
    elif name.startswith("imagenet"):
        assert out.shape == (1, 1000)
    elif name == "optical_flow":
        assert out.shape == (1, 2, 368, 496)
    else:
        assert out["image"].shape == (1, 6272, 3)
        assert out["audio"].shape == (1, 240)
        assert out["label"].shape == (1, 700)
        out = torch.cat([v.flatten() for v in out.values()])
    assert torch.isfinite(out).all()


def _flat_outputs(out):
    if isinstance(out, dict):
        return torch.cat([out[k].flatten().float() for k in sorted(out)])
    return out.flatten().float()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_packed_weights_follow_writes_through_data(name, dtype, layout):
    """Writes through ``p.data`` (EMA updates, re-initialisations) leave ``p``'s
    version counter as it was: the packed copies (and fused projections) made by an
    earlier call must still be remade, or the model silently computes with the old
    weights. A deep copy (which keeps no copies) is the reference. Weights stored
    transposed (``load_state_dict(assign=True)`` of transposed tensors, tied weights)
    are not contiguous: the samples that watch them were a copy, blind to writes
    (0.35-0.65 relative error)."""
    model = tiny(name).to(dtype)
    if layout == "transposed":
        for p in model.parameters():
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()
        assert not all(p.is_contiguous() for p in model.parameters())
    model = pt.pack_weights(model)
    other = tiny(name, seed=1).to(dtype)
    inputs = tiny_inputs(name)
    with torch.no_grad():
        model(*inputs)  # the packed copies now exist
        for p, q in zip(model.parameters(), other.parameters()):
            p.data.copy_(q.data)
        got = _flat_outputs(model(*inputs))
        expected = _flat_outputs(copy.deepcopy(model)(*inputs))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.bool])
def test_language_refuses_token_ids_the_embedding_cannot_take(dtype):
    """Integer dtypes other than int32/int64 (and bool) pass an "integer" check but
    fail deep in the embedding: they are refused at the door, naming the fix."""
    model = tiny("language_perceiver")
    ids = tiny_inputs("language_perceiver")[0] % 100
    with pytest.raises(pt.InputError, match=r"input_ids must be int64.*input_ids\.long\(\)"):
        with torch.no_grad():
            model(ids.to(dtype))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 262, 300])
def test_language_refuses_token_ids_outside_the_vocabulary(bad):
    # F.embedding said "index out of range in self", naming neither the ids nor the range.
    model = tiny("language_perceiver")
    ids = tiny_inputs("language_perceiver")[0] % 100
    ids[0, 3] = bad
    with pytest.raises(pt.InputError, match=rf"token ids in \[0, 262\), got {bad}"):
        with torch.no_grad():
            model(ids)


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_and_export_serve_other_inputs(name):
    """torch.jit.trace under no_grad (the oneDNN kernels cannot be traced) and
    torch.export (no Python branch on tensor values) record the plain computation,
    and the graph serves inputs other than the example: another batch size, and for
    the language model another padding (the padding skip would freeze the example's)."""
    model = tiny(name)
    example = tiny_inputs(name, batch=2)
    other = tiny_inputs(name, batch=3, seed=1)
    if name == "language_perceiver":
        mask = torch.ones_like(example[0])
        mask[:, -10:] = 0  # trailing padding in the example only
        example, other = example + (mask,), other + (torch.ones_like(other[0]),)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python ints
            traced = torch.jit.trace(model, example, strict=False, check_trace=False)
        expected = _flat_outputs(model(*other))
        got = _flat_outputs(traced(*other))
    # The graph runs the plain kernels, eager the fast paths: both within float32
    # rounding of float64 (about 1e-6 relative, test_fast_paths); a frozen padding or
    # factorisation is off by O(1) (the language model's logits: 1.04 relative).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if name in ("language_perceiver", "video_autoencoding"):
        exported = torch.export.export(model, example)
        with torch.no_grad():
            got = _flat_outputs(exported.module()(*example))
            expected = _flat_outputs(model(*example))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)



def test_traced_graphs_keep_no_chunking_of_their_example(monkeypatch):
    """Work split into chunks by the example's size was frozen into a traced graph
    (the ONNX export traces at batch 1): the full-size language model's attention
    chunks, cut for one item, failed at batch 2 in onnxruntime, and the video graph
    decoded only the first 8,192 queries of a longer subsample (its label query, the
    last, lost). Here chunks far smaller than the tiny models' make both happen."""
    from perceiver_torch import attention

    monkeypatch.setattr(attention, "_MAX_LOGITS_ELEMENTS", 2048)  # several chunks
    model = tiny("language_perceiver")
    example, other = tiny_inputs("language_perceiver", batch=1), \
        tiny_inputs("language_perceiver", batch=3, seed=1)
    mask = torch.ones_like(other[0])
    mask[1, 20:] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python ints
        traced = torch.jit.trace(model, example + (torch.ones_like(example[0]),),
                                 strict=False, check_trace=False)
        torch.testing.assert_close(traced(other[0], mask), model(other[0], mask),
                                   rtol=1e-4, atol=1e-5)

    video = tiny("video_autoencoding")
    video.decoder.query_chunk_size = 50

    class Points(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.video = video

        def forward(self, images, audio, image_index, audio_index):
            out = self.video(images, audio, {"image": image_index, "audio": audio_index})
            return out["image"], out["audio"], out["label"]

    images, audio = tiny_inputs("video_autoencoding", batch=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Points(), (images, audio, torch.arange(60),
                                            torch.arange(2)), check_trace=False)
        longer = (images, audio, torch.arange(7, 140), torch.arange(1, 4))
        for got, expected in zip(traced(*longer), Points()(*longer)):
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

def test_build_names_keys_that_are_not_text():
    # Sorting {1, "foo"} raised a TypeError instead of the documented ConfigError.
    with pytest.raises(pt.ConfigError, match="unknown config key.*1, foo"):
        pt.build("imagenet_conv", {1: 1, "foo": 2})


def test_pair_messages_name_only_the_forms_their_path_accepts():
    # build(..., max_resolution="8x8") said 'must be two integers (e.g. 8x8, 8,8 or
    # [8, 8]), got "8x8"': it offered the form it refused. Python values are lists or
    # tuples; the text forms are --config's (configs.parse_value).
    base = configs.config_to_dict(pt.TINY_CONFIGS["imagenet_conv"])
    for value in ("8x8", [8], [8, "8"]):
        with pytest.raises(pt.ConfigError) as info:
            pt.build("imagenet_conv", {**base, "max_resolution": value})
        assert "(e.g. [8, 8])" in str(info.value) and "8x8," not in str(info.value)
    for value in ([8, 8], (8, 8)):
        model = pt.build("imagenet_conv", {**base, "max_resolution": value})
        assert model.config.max_resolution == (8, 8)
    with pytest.raises(pt.ConfigError, match=r"two integers \(e\.g\. 8x8, 8,8 or \[8, 8\]\), got '8x'"):
        configs.parse_value(pt.ImageNetConvConfig, "max_resolution", "8x")
    for text in ("8x8", "8,8", "[8, 8]"):
        assert configs.parse_value(pt.ImageNetConvConfig, "max_resolution", text) == (8, 8)
