"""perceiver_jax configuration handling and stage outputs.

* Every builder's keyword-only parameters are the fields (names, order) of the
  matching ``perceiver_torch.configs`` dataclass, minus the dropout fields, and have
  no defaults: the official values live once, in the dataclasses.
* ``get_model``/``resolve_config`` accept dataclasses, complete mappings and plain
  objects, reject None and incomplete ones, and reject unknown keys with the list of
  valid ones.
* ``stages=True`` returns the three stages with the official shapes (checked
  abstractly with ``jax.eval_shape``: no computation).
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("haiku")
np = pytest.importorskip("numpy")

import perceiver_jax  # noqa: E402
from perceiver_torch import configs as torch_configs  # noqa: E402

pytestmark = pytest.mark.jax

NAMES = perceiver_jax.MODEL_NAMES
DROPOUT_FIELDS = ("dropout", "attention_dropout")


def dataclass_defaults(name: str) -> Dict[str, Any]:
    cls = torch_configs.CONFIG_CLASSES[name]
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.name not in DROPOUT_FIELDS
    }


def official(name: str) -> Any:
    return torch_configs.CONFIG_CLASSES[name]()


def test_model_names_match_perceiver_torch() -> None:
    assert tuple(torch_configs.CONFIG_CLASSES) == NAMES
    assert tuple(perceiver_jax.BUILDERS) == NAMES
    assert set(perceiver_jax.INPUT_NAMES) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_builder_parameters_are_the_dataclass_fields(name: str) -> None:
    params = inspect.signature(perceiver_jax.BUILDERS[name]).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    # No second copy of the official values: they come from the caller.
    assert all(p.default is inspect.Parameter.empty for p in params.values())
    want = dataclass_defaults(name)
    assert list(params) == list(want)  # same names, same order
    assert perceiver_jax.config_fields(name) == tuple(want)
    assert tuple(torch_configs.TRAINING_ONLY_FIELDS) == perceiver_jax.TRAINING_ONLY_FIELDS
    # The dropout fields exist on the torch side only.
    assert set(
        f.name for f in dataclasses.fields(torch_configs.CONFIG_CLASSES[name])
    ) == (set(want) | set(DROPOUT_FIELDS))


@pytest.mark.parametrize("name", NAMES)
def test_resolve_config_forms_agree(name: str) -> None:
    tiny = torch_configs.TINY_CONFIGS[name]
    as_dict = torch_configs.config_to_dict(tiny)  # lists for tuples, dropout included
    from_dataclass = perceiver_jax.resolve_config(name, tiny)
    from_mapping = perceiver_jax.resolve_config(name, as_dict)
    from_object = perceiver_jax.resolve_config(name, types.SimpleNamespace(**as_dict))
    assert from_dataclass == from_mapping == from_object
    assert "dropout" not in from_dataclass
    assert from_dataclass == {
        k: v for k, v in dataclasses.asdict(tiny).items() if k not in DROPOUT_FIELDS
    }
    assert perceiver_jax.resolve_config(name, official(name)) == dataclass_defaults(name)


def test_a_configuration_must_be_given_whole() -> None:
    with pytest.raises(ValueError, match="no default configuration.*imagenet_fourier"):
        perceiver_jax.get_model("imagenet_fourier", None)
    with pytest.raises(ValueError, match="lacks the field.*num_latents"):
        perceiver_jax.resolve_config(
            "imagenet_fourier",
            {"num_classes": 10, "max_resolution": [32, 32], "dropout": 0.1},
        )
    values = {**dataclass_defaults("imagenet_fourier"), "max_resolution": [32, 32]}
    resolved = perceiver_jax.resolve_config("imagenet_fourier", values)
    assert resolved["max_resolution"] == (32, 32)  # lists become tuples


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match="unknown config key.*num_lattents") as info:
        perceiver_jax.get_model("optical_flow", {"num_lattents": 3})
    message = str(info.value)
    for field in ("num_latents", "image_size", "flow_scale", "dropout"):
        assert field in message


def test_wrong_model_config_is_rejected() -> None:
    # A dataclass of another model carries foreign fields.
    with pytest.raises(ValueError, match="conv_channels"):
        perceiver_jax.resolve_config(
            "imagenet_fourier", torch_configs.ImageNetConvConfig()
        )
    # A plain object must carry every field.
    with pytest.raises(ValueError, match="lacks"):
        perceiver_jax.resolve_config("imagenet_fourier", types.SimpleNamespace())
    with pytest.raises(ValueError, match="unknown model"):
        perceiver_jax.get_model("imagenet", None)


def test_language_v_channels_default_is_d_latents() -> None:
    tiny = torch_configs.TINY_CONFIGS["language_perceiver"]
    trees = []
    for v in (None, tiny.d_latents):
        config = dataclasses.replace(tiny, v_channels=v)
        model = perceiver_jax.get_model("language_perceiver", config)
        specs = perceiver_jax.input_specs("language_perceiver", config)
        params, _ = jax.eval_shape(model.init, jax.random.PRNGKey(0), **specs)
        enc_v = params["perceiver_encoder/~/cross_attention/attention/linear_2"]["w"]
        dec_v = params["basic_decoder/cross_attention/attention/linear_2"]["w"]
        assert enc_v.shape == (tiny.d_model, tiny.d_latents)
        assert dec_v.shape == (tiny.d_latents, tiny.d_model)  # always d_model
        trees.append(jax.tree_util.tree_map(lambda x: x.shape, params))
    assert trees[0] == trees[1]
    # The official self-attention adds its value-width output to the latents.
    with pytest.raises(ValueError, match="v_channels"):
        perceiver_jax.get_model(
            "language_perceiver", dataclasses.replace(tiny, v_channels=16)
        )


# Stage shapes (B = 1): (preprocessed, latents, decoder_output, outputs).
# Full size: the official dimensions (shared/official/MODELS.md).
FULL_STAGES: Dict[str, Tuple[Any, ...]] = {
    "language_perceiver": (
        (1, 2048, 768),
        (1, 256, 1280),
        (1, 2048, 768),
        (1, 2048, 262),
    ),
    "imagenet_learned": ((1, 50176, 512), (1, 512, 1024), (1, 1, 1000), (1, 1000)),
    "imagenet_fourier": ((1, 50176, 261), (1, 512, 1024), (1, 1, 1000), (1, 1000)),
    "imagenet_conv": ((1, 3136, 322), (1, 512, 1024), (1, 1, 1000), (1, 1000)),
    "optical_flow": (
        (1, 182528, 322),
        (1, 2048, 512),
        (1, 182528, 2),
        (1, 368, 496, 2),
    ),
    # One of 128 chunks: 6272 pixels + 15 audio patches + 1 label query.
    "video_autoencoding": (
        (1, 52097, 704),
        (1, 784, 512),
        (1, 6288, 512),
        {"audio": (1, 240), "image": (1, 6272, 3), "label": (1, 700)},
    ),
}
# Tiny: worked out from the golden hyperparameters (tests/data/golden/*/config.json),
# e.g. imagenet_fourier 32x32 pixels with 3 + 2 + 2*2*8 = 37 channels; imagenet_conv
# and optical_flow 64 + 2 + 2*2*8 = 98 channels on an 8x8 and a 24x32 grid; video
# 2*(16/4)**2 = 32 image patches + 2*64/16 = 8 audio patches + 1 label = 41 tokens.
TINY_STAGES: Dict[str, Tuple[Any, ...]] = {
    "language_perceiver": ((1, 64, 32), (1, 8, 48), (1, 64, 32), (1, 64, 262)),
    "imagenet_learned": ((1, 1024, 32), (1, 16, 64), (1, 1, 10), (1, 10)),
    "imagenet_fourier": ((1, 1024, 37), (1, 16, 64), (1, 1, 10), (1, 10)),
    "imagenet_conv": ((1, 64, 98), (1, 16, 64), (1, 1, 10), (1, 10)),
    "optical_flow": ((1, 768, 98), (1, 32, 32), (1, 768, 2), (1, 24, 32, 2)),
    "video_autoencoding": (
        (1, 41, 79),
        (1, 8, 32),
        (1, 131, 24),
        {"audio": (1, 32), "image": (1, 128, 3), "label": (1, 10)},
    ),
}


def abstract_apply(name: str, config: Any):
    model = perceiver_jax.get_model(name, config, stages=True)
    specs = perceiver_jax.input_specs(name, config)
    rng = jax.random.PRNGKey(0)
    params, state = jax.eval_shape(model.init, rng, **specs)
    (outputs, stages), _ = jax.eval_shape(model.apply, params, state, rng, **specs)
    return outputs, stages


def shapes(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: shapes(v) for k, v in tree.items()}
    return tuple(tree.shape)


@pytest.mark.parametrize("name,size", [(n, s) for n in NAMES for s in ("tiny", "full")])
def test_stage_shapes(name: str, size: str) -> None:
    config = torch_configs.TINY_CONFIGS[name] if size == "tiny" else official(name)
    expected = (TINY_STAGES if size == "tiny" else FULL_STAGES)[name]
    outputs, stages = abstract_apply(name, config)
    assert set(stages) == {"preprocessed", "latents", "decoder_output"}
    got = (
        shapes(stages["preprocessed"]),
        shapes(stages["latents"]),
        shapes(stages["decoder_output"]),
        shapes(outputs),
    )
    assert got == expected


def test_fourier_widths() -> None:
    # Official widths: 2-D, 64 bands -> 258; audio 1-D, 192 bands -> 385;
    # video queries 3-D, 32 bands -> 195.
    width = perceiver_jax.position_encoding.fourier_num_channels
    assert (width(2, 64), width(1, 192), width(3, 32)) == (258, 385, 195)
    assert width(2, 8, concat_pos=False, sine_only=True) == 16


def test_stages_false_returns_outputs_only() -> None:
    name = "imagenet_fourier"
    config = torch_configs.TINY_CONFIGS[name]
    model = perceiver_jax.get_model(name, config)
    specs = perceiver_jax.input_specs(name, config)
    params, state = jax.eval_shape(model.init, jax.random.PRNGKey(0), **specs)
    out, _ = jax.eval_shape(model.apply, params, state, None, **specs)
    assert out.shape == (1, 10)


def test_input_names_and_specs() -> None:
    for name in NAMES:
        specs = perceiver_jax.input_specs(name, official(name))
        assert tuple(specs) == perceiver_jax.input_names(name)
    with pytest.raises(ValueError):
        perceiver_jax.input_names("nope")


def test_video_subsampling_is_the_colab_chunking() -> None:
    config = torch_configs.TINY_CONFIGS["video_autoencoding"]
    chunks = [perceiver_jax.video_subsampling(config, i) for i in range(4)]
    image = np.concatenate([c["image"] for c in chunks])
    audio = np.concatenate([c["audio"] for c in chunks])
    np.testing.assert_array_equal(image, np.arange(2 * 16 * 16))
    np.testing.assert_array_equal(audio, np.arange(2 * 64 // 16))
    chunk = perceiver_jax.video_subsampling(official("video_autoencoding"), 5)
    np.testing.assert_array_equal(chunk["image"], np.arange(5 * 6272, 6 * 6272))
    np.testing.assert_array_equal(chunk["audio"], np.arange(75, 90))
    with pytest.raises(ValueError):
        perceiver_jax.video_subsampling(config, 4)


def test_inputs_of_the_wrong_shape_are_rejected() -> None:
    name = "optical_flow"
    config = torch_configs.TINY_CONFIGS[name]
    model = perceiver_jax.get_model(name, config)
    bad = jax.ShapeDtypeStruct((1, 2, 24, 30, 3), np.float32)
    with pytest.raises(ValueError, match="images must have shape"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images=bad)
    video = "video_autoencoding"
    vconfig = torch_configs.TINY_CONFIGS[video]
    vmodel = perceiver_jax.get_model(video, vconfig)
    specs = perceiver_jax.input_specs(video, vconfig)
    specs["subsampling"] = {"image": specs["subsampling"]["image"]}
    with pytest.raises(ValueError, match="subsampling"):
        jax.eval_shape(vmodel.init, jax.random.PRNGKey(0), **specs)


def test_perceiver_jax_imports_neither_torch_nor_converter() -> None:
    root = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); import perceiver_jax; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'converter', 'perceiver_torch')); print(bad); "
        "assert perceiver_jax.__file__ and not bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
