"""Every perceiver_torch model checks its inputs at the door (issue 9), and random
configurations and input shapes give either a clean error or a correct output."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

import perceiver_torch
from perceiver_torch import InputError, TINY_CONFIGS, configs
from helpers import run_cli

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def tiny(name: str, config: Any = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return perceiver_torch.build(name, config or TINY_CONFIGS[name]).eval()


@pytest.fixture(scope="module")
def models() -> Dict[str, torch.nn.Module]:
    return {name: tiny(name) for name in TINY_CONFIGS}


def valid_inputs(name: str, config: Any, batch: int = 1) -> Dict[str, torch.Tensor]:
    """Inputs of the documented layout and sizes for model ``name`` with ``config``."""
    if name == "language_perceiver":
        length = min(config.max_seq_len, 6)
        return {"input_ids": torch.randint(0, config.vocab_size, (batch, length))}
    if name == "imagenet_learned":
        return {"images": torch.randn(batch, 3, *config.image_size)}
    if name in ("imagenet_fourier", "imagenet_conv"):
        return {"images": torch.randn(batch, 3, 12, 16)}
    if name == "optical_flow":
        return {"frames": torch.rand(batch, 2, 3, *config.image_size) * 2 - 1}
    t, (h, w) = config.num_frames, config.image_size
    return {
        "images": torch.rand(batch, t, 3, h, w),
        "audio": torch.randn(batch, t * config.audio_samples_per_frame),
    }


def check_outputs(name: str, config: Any, inputs: Dict[str, torch.Tensor], out: Any) -> None:
    """The documented output shapes, all values finite."""
    if name == "language_perceiver":
        ids = inputs["input_ids"]
        assert out.shape == (*ids.shape, config.vocab_size)
    elif name.startswith("imagenet_"):
        assert out.shape == (inputs["images"].shape[0], config.num_classes)
    elif name == "optical_flow":
        frames = inputs["frames"]
        assert out.shape == (frames.shape[0], 2, *frames.shape[-2:])
    else:
        b, t, _, h, w = inputs["images"].shape
        assert out["image"].shape == (b, t * h * w, 3)
        assert out["audio"].shape == (b, t * config.audio_samples_per_frame)
        assert out["label"].shape == (b, config.num_classes)
        out = torch.cat([v.flatten() for v in out.values()])
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------
# The cases of the issue.


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda i: {**i, "images": i["images"][:, :1]}, ["images", "(B, T, 3, H, W) = (B, 2, 3, 16, 16)", "[1, 1, 3, 16, 16]"]),
        (lambda i: {**i, "images": torch.cat([i["images"]] * 2, 1)[:, :3]}, ["[1, 3, 3, 16, 16]"]),
        (lambda i: {**i, "images": i["images"][..., :8, :8]}, ["(B, 2, 3, 16, 16)", "[1, 2, 3, 8, 8]"]),
        (lambda i: {**i, "audio": i["audio"][:, :64]}, ["audio", "128 samples", "[1, 64]"]),
        (lambda i: {**i, "images": i["images"].permute(0, 1, 3, 4, 2)}, ["channels-last", "permute(0, 1, 4, 2, 3)"]),
        (lambda i: {**i, "audio": torch.randn(2, 128)}, ["different batch sizes", "images 1", "audio 2"]),
    ],
)
def test_video_model_checks_frames_size_and_audio(models, change, words):
    model = models["video_autoencoding"]
    inputs = change(valid_inputs("video_autoencoding", model.config))
    for call in (model, model.reconstruct, model.encode):
        with pytest.raises(InputError) as info:
            call(**inputs)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_reconstruct_defaults_to_the_configured_chunks(models):
    model = models["video_autoencoding"]
    config = model.config
    inputs = valid_inputs("video_autoencoding", config, batch=2)
    with torch.no_grad():
        out = model.reconstruct(**inputs)
        again = model.reconstruct(**inputs, num_chunks=config.num_chunks)
    assert out["image"].shape == (2, config.num_frames, 3, *config.image_size)
    assert out["audio"].shape == inputs["audio"].shape
    torch.testing.assert_close(out["image"], again["image"], rtol=0, atol=0)
    with pytest.raises(InputError, match="num_chunks must be an integer from 1 to 8"):
        model.reconstruct(**inputs, num_chunks=128)


def test_video_decode_checks_latents(models):
    # decode read latents unchecked: rank 2 was an IndexError, int64 a linalg error, a
    # wrong width a LayerNorm error, a wrong latent count decoded silently, float64
    # failed in train mode only ("mixed dtype").
    model = models["video_autoencoding"]
    config = model.config  # 8 latents of 32 channels
    inputs = valid_inputs("video_autoencoding", config)
    with torch.no_grad():
        latents = model.encode(**inputs)
    assert latents.shape == (1, 8, 32)
    cases = [
        (latents[0], r"latents \(8 latents of 32 channels, as encode\(\) returns\) must have shape \(B, N, D\) = \(B, 8, 32\), got \[8, 32\]"),
        (latents[:, :5], r"got \[1, 5, 32\]"),
        (latents[..., :16], r"got \[1, 8, 16\]"),
        (latents[:0], "batch size 0"),
        (latents.long(), r"floating-point tensor, got torch.int64"),
        (latents.numpy(), "must be a torch.Tensor"),
    ]
    for bad, words in cases:
        with pytest.raises(InputError, match=words):
            model.decode(bad)
    compiled_check = torch.compile(
        lambda x: (model.check_latents(x), x.sum())[1], backend="eager", fullgraph=True
    )
    torch.testing.assert_close(compiled_check(latents), latents.sum())
    # float64 latents are cast to the model's dtype, as forward's inputs are: the
    # same output as float32 ones, in eval and in train mode (the plain decoder).
    subsample = {"image": torch.arange(5), "audio": torch.arange(2)}
    try:
        for train in (False, True):
            model.train(train)
            with torch.no_grad():
                expected = model.decode(latents, subsample)
                got = model.decode(latents.double(), subsample)
            for key in expected:
                assert got[key].dtype == torch.float32
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    finally:
        model.eval()


def test_language_model_checks_ids_and_mask(models):
    model = models["language_perceiver"]
    ids = torch.randint(0, 262, (1, 10))
    with pytest.raises(InputError, match=r"attention_mask must have input_ids' shape \[1, 10\].*got \[1, 5\]"):
        model(ids, attention_mask=torch.ones(1, 5))
    with pytest.raises(InputError, match=r"unsqueeze\(0\)"):
        model(ids[0])
    with pytest.raises(InputError, match="more than max_seq_len 64"):
        model(torch.randint(0, 262, (1, 65)))
    with pytest.raises(InputError, match=r"integer tensor.*\.long\(\)"):
        model(ids.float())


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_batch_size_zero_is_one_clear_error_for_every_model(models, name):
    model = models[name]
    inputs = {k: v[:0] for k, v in valid_inputs(name, model.config).items()}
    with pytest.raises(InputError, match="batch size 0; pass at least one example"):
        model(**inputs)


@pytest.mark.parametrize("name", ["imagenet_learned", "imagenet_fourier", "imagenet_conv"])
def test_image_models_check_rank_channels_and_layout(models, name):
    model = models[name]
    images = valid_inputs(name, model.config)["images"]
    with pytest.raises(InputError, match=r"channels-last: pass x.permute\(0, 3, 1, 2\)"):
        model(images.permute(0, 2, 3, 1))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\).*got \[1, 1, "):
        model(images[:, :1])
    with pytest.raises(InputError, match=r"got \[3, "):
        model(images[0])
    with pytest.raises(InputError, match=r"floating-point.*\.float\(\)"):
        model((images * 100).to(torch.uint8))


def test_flow_model_refuses_one_frame(models):
    model = models["optical_flow"]
    frames = valid_inputs("optical_flow", model.config)["frames"]
    with pytest.raises(InputError, match=r"\(B, 2, 3, H, W\).*got \[1, 1, 3, 24, 32\]"):
        model(frames[:, :1])
    with pytest.raises(InputError, match=r"got \[1, 3, 24, 32\]"):
        model(frames[:, 0])
    with pytest.raises(InputError, match=r"permute\(0, 1, 4, 2, 3\)"):
        model(frames.permute(0, 1, 3, 4, 2))


def test_flow_tiling_refuses_overlaps_and_batch_sizes_it_cannot_use(models):
    # min_overlap=-5 left 5 px between tiles that no tile covered: NaN flow there (the
    # blend's 0 / 0), silently; batch_size=2.5 was range()'s bare TypeError.
    model = models["optical_flow"]
    frames = torch.rand(1, 2, 3, 30, 70) * 2 - 1  # 24x32 tiles: two rows, three columns
    for overlap in (-5, -1, 24, 2.5, True):
        with pytest.raises(InputError, match=rf"min_overlap must be between 0 and 23 for 24x32 tiles.*got {overlap!r}"):
            model.tiled(frames, min_overlap=overlap)
    for batch_size in (2.5, 0, -1, True, "2"):
        with pytest.raises(InputError, match=rf"batch_size must be an integer of at least 1, got {re.escape(repr(batch_size))}"):
            model.tiled(frames, min_overlap=4, batch_size=batch_size)
    with torch.no_grad():
        assert torch.isfinite(model.tiled(frames, min_overlap=0, batch_size=2)).all()


def test_door_checks_trace_and_compile(models):
    """Shape checks only: torch.compile captures every model's door check as part of
    one graph (fullgraph=True fails on any graph break), a compiled model computes
    what the eager one does, and still refuses a wrong shape."""
    for name, model in models.items():
        inputs = valid_inputs(name, model.config)

        def checked(**kwargs: torch.Tensor) -> torch.Tensor:
            model.check_inputs(**kwargs)
            return sum(v.float().sum() for v in kwargs.values())

        compiled_check = torch.compile(checked, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled_check(**inputs), checked(**inputs))
    model = models["imagenet_fourier"]
    images = valid_inputs("imagenet_fourier", model.config)["images"]
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager")
        # The same computation: only float32 rounding of a re-traced graph may differ.
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-6, atol=1e-6)
        # A refusal is not graph-captured (building its message breaks the graph), so
        # the compiled model falls back to running it: the same error.
        with pytest.raises(InputError, match="channels-last"):
            compiled(images.permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------
# Property tests: random configurations and random input shapes (seeded loops).

_INT_POOL = [-1, 0, 1, 2, 3, 4, 8, 16]
_PAIR_POOL = [(0, 8), (8, 8), (4, 8), (16, 16), (3, 5), (8,), (1, 1)]
_ODD_POOL = ["yes", None, 1.5, True, [2, 2]]


def _random_value(rng: np.random.Generator, kind: str) -> Any:
    if rng.random() < 0.15:
        return _ODD_POOL[rng.integers(len(_ODD_POOL))]
    if kind in ("int", "optional_int"):
        return int(_INT_POOL[rng.integers(len(_INT_POOL))])
    if kind == "pair":
        return list(_PAIR_POOL[rng.integers(len(_PAIR_POOL))])
    if kind == "bool":
        return bool(rng.integers(2))
    return float(rng.choice([-1.0, 0.0, 0.1, 0.5, 1.0, 100.0]))


# Keys whose random values would only make the model slow, not exercise a check.
_SIZE_CAPS = {"max_seq_len": 64, "vocab_size": 300, "num_frames": 4}


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_random_configs_give_a_clean_error_or_a_working_model(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    base = configs.config_to_dict(TINY_CONFIGS[name])
    kinds = configs.field_kinds(configs.CONFIG_CLASSES[name])
    built = refused = 0
    for _ in range(16):
        values = dict(base)
        for key in rng.choice(sorted(kinds), size=int(rng.integers(1, 3)), replace=False):
            values[str(key)] = _random_value(rng, kinds[str(key)])
        for key, cap in _SIZE_CAPS.items():
            if isinstance(values.get(key), int) and values[key] > cap:
                values[key] = cap
        try:
            model = perceiver_torch.build(name, values)
        except perceiver_torch.ConfigError as error:
            # A clean error names a key that was given and says what is allowed.
            assert error.key in values, (values, error)
            assert error.key in str(error)
            refused += 1
            continue
        built += 1
        inputs = valid_inputs(name, model.config)
        with torch.no_grad():
            check_outputs(name, model.config, inputs, model.eval()(**inputs))
    assert built and refused  # the loop exercised both outcomes


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_random_input_shapes_give_a_clean_error_or_a_correct_output(models, name):
    model = models[name]
    rng = np.random.default_rng(7 + len(name))
    good = valid_inputs(name, model.config, batch=2)
    accepted = refused = 0
    for _ in range(30):
        inputs = {}
        for key, tensor in good.items():
            shape = list(tensor.shape)
            roll = rng.random()
            if roll < 0.3:  # change one axis
                axis = int(rng.integers(len(shape)))
                shape[axis] = int(rng.choice([0, 1, 2, 3, 5, 8]))
            elif roll < 0.45:  # drop or add an axis
                if rng.random() < 0.5 and len(shape) > 1:
                    shape.pop(int(rng.integers(len(shape))))
                else:
                    shape.insert(int(rng.integers(len(shape) + 1)), int(rng.choice([1, 3])))
            elif roll < 0.55:  # channels last
                shape = shape[:1] + shape[2:] + shape[1:2]
            if tensor.is_floating_point():
                inputs[key] = torch.rand(shape)
            else:
                inputs[key] = torch.randint(0, model.config.vocab_size, shape)
        try:
            with torch.no_grad():
                out = model(**inputs)
        except InputError as error:
            assert str(error).startswith(type(model).__name__ + ": ")
            assert re.search(r"must|refuses|different batch sizes|size 0", str(error))
            refused += 1
            continue
        accepted += 1
        check_outputs(name, model.config, inputs, out)
    assert accepted and refused


def test_random_cli_configs_give_a_clean_error_or_a_loadable_file(tmp_path):
    """convert --config KEY=VALUE with random keys and values: exit 0 and a file
    that loads and runs, or exit 2/3 with one clean line and no file."""
    rng = np.random.default_rng(9)
    names = ["imagenet_fourier", "optical_flow", "video_autoencoding", "language_perceiver"]
    all_keys = sorted({k for c in configs.CONFIG_CLASSES.values() for k in configs.field_kinds(c)})
    raw_pool = ["-1", "0", "1", "2", "3", "8", "16x16", "8,8", "[4, 4]", "x", "true",
                '"yes"', "null", "1.5", "0.5", "8x", ""]
    outcomes = {0: 0, 2: 0, 3: 0}
    for i in range(32):
        name = names[i % len(names)]
        # Half the keys from the model's own config (some of them then convert).
        own = sorted(configs.field_kinds(configs.CONFIG_CLASSES[name]))
        key = str(rng.choice(own if i % 2 else all_keys + ["nosuch_key"]))
        raw = str(rng.choice(raw_pool))
        out = tmp_path / f"out{i}.safetensors"
        args = ["convert", GOLDEN / name / "checkpoint.pickle", "-o", out, "-q",
                "--config", f"{key}={raw}"]
        if rng.random() < 0.5:
            args += ["--model", name]
        result = run_cli(*args)
        assert result.exit_code in outcomes, (args, result.output)
        outcomes[result.exit_code] += 1
        assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
        if result.exit_code != 0:
            assert not out.exists()
            assert result.stderr.startswith("error: ") and key in result.stderr, result.stderr
            continue
        model = perceiver_torch.load(out)
        inputs = valid_inputs(name, model.config)
        with torch.no_grad():
            check_outputs(name, model.config, inputs, model(**inputs))
    assert outcomes[0] and outcomes[2], outcomes
