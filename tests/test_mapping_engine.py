"""The YAML mapping engine: schema errors with file:line, templates, overlaps, totality,
configuration derivation, and the six bundled mappings against the official trees."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from converter.conversion import model_targets
from converter.errors import ConfigError, MappingError, ShapeMismatch
from converter.mapping import (
    available_mappings,
    flatten_tree,
    invert_arrays,
    convert_arrays,
    MappingTable,
    load_mapping,
    parse_mapping,
    plan_forward,
    unflatten_tree,
)
from converter.registry import DOWNLOAD_BASE_URL, MODEL_NAMES, MODELS, official_tree
from perceiver_torch.configs import (
    CONFIG_CLASSES,
    TINY_CONFIGS,
    TRAINING_ONLY_FIELDS,
    config_from_dict,
)
from official_facts import OFFICIAL_PARAMETERS

MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"


def read_tree(name: str, size: str):
    """{flat source key: (shape, dtype)} of an official tree (params and state)."""
    tree = official_tree(name, size)
    return flatten_tree(tree.params, tree.state)


def parse(text: str, name: str = "test.yaml"):
    return parse_mapping(textwrap.dedent(text), name)


MINIMAL = """\
schema: 1
name: toy
model: toy
config: {layers: 3}
rules:
  - source: "enc/layer{_i}/w"
    target: "enc.layers.{i}.weight"
    ops: [linear]
    for: {i: layers}
"""


def test_layer_templates_follow_haiku_numbering():
    table = parse(MINIMAL).expand({"layers": 3})
    assert [r.source for r in table.rules] == [
        "enc/layer/w",
        "enc/layer_1/w",
        "enc/layer_2/w",
    ]
    assert [r.target for r in table.rules] == [
        f"enc.layers.{i}.weight" for i in range(3)
    ]
    assert all(r.ops[0].name == "linear" for r in table.rules)


def test_for_over_a_list_of_values():
    spec = parse("""\
        schema: 1
        name: toy
        model: toy
        config: {x: 1}
        rules:
          - {source: "pre/{m}_pad/p", target: "pad.{m}", for: {m: [audio, image]}}
        """)
    assert [r.target for r in spec.expand({"x": 1}).rules] == ["pad.audio", "pad.image"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig:\n\ta: 1\nrules: []\n",
            "test.yaml:5: malformed YAML",
        ),
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig: {a: 1}\nrule: []\n",
            "test.yaml:5: unknown key",
        ),
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig: {a: 1}\n",
            "missing key\\(s\\) rules",
        ),
        (
            "schema: 2\nname: toy\nmodel: toy\nconfig: {a: 1}\nrules: [{source: a, target: b}]\n",
            "test.yaml:1: schema: unsupported schema 2",
        ),
        (
            "schema: 1\nname: toy\nname: x\nmodel: toy\nconfig: {a: 1}\nrules: []\n",
            "duplicate key 'name'",
        ),
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig: {a: 1}\nrules:\n  - {source: a/w, target: b, ops: [flip]}\n",
            "test.yaml:6: rules\\[0\\].ops\\[0\\]: unknown op 'flip'",
        ),
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig: {a: 1}\nrules:\n  - {source: a/w}\n",
            "test.yaml:6: rules\\[0\\]: missing key\\(s\\) target",
        ),
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig: {a: 1}\nrules:\n  - {source: a/w, target: b, extra: 1}\n",
            "unknown key\\(s\\) extra",
        ),
        (
            "schema: 1\nname: toy\nmodel: toy\nconfig: {a: 1}\nderive: {b: {shape: x, dim: 0}}\nrules: [{source: a, target: b}]\n",
            "derives 'b', which is not a config key",
        ),
        ("- just\n- a list\n", "top level"),
        (
            "schema: 1\nname: t\nmodel: t\nconfig: {a: 1}\ntolerance: {relative: 0}\nrules: [{source: a, target: b}]\n",
            "tolerance.relative: must be a positive number",
        ),
        (
            "schema: 1\nname: t\nmodel: t\nconfig: {a: 1}\ntolerance: {outputs: {x: 1}}\nrules: [{source: a, target: b}]\n",
            "unknown key\\(s\\) outputs",
        ),
    ],
)
def test_schema_errors_point_at_file_line_and_key(text, message):
    with pytest.raises(MappingError, match=message):
        parse(text)


def test_expansion_errors_name_the_rule():
    spec = parse("""\
        schema: 1
        name: toy
        model: toy
        config: {a: 1}
        rules:
          - {source: "x/{j}", target: "y"}
        """)
    with pytest.raises(
        MappingError, match=r"test.yaml:6: rules\[0\]: placeholder \{j\}"
    ):
        spec.expand({"a": 1})
    unknown_block = parse(
        MINIMAL.replace('  - source: "enc', '  - use: nothing\n  - source: "enc')
    )
    with pytest.raises(MappingError, match="unknown block 'nothing'"):
        unknown_block.expand({"layers": 1})


def test_overlapping_rules_are_an_error_not_first_wins():
    spec = parse("""\
        schema: 1
        name: toy
        model: toy
        config: {n: 2}
        rules:
          - {source: "a/layer{_i}/w", target: "a.{i}.weight", for: {i: n}}
          - {source: "a/layer_1/w", target: "other.weight"}
        """)
    with pytest.raises(MappingError, match="two rules claim the source 'a/layer_1/w'"):
        spec.expand({"n": 2})
    spec = parse("""\
        schema: 1
        name: toy
        model: toy
        config: {n: 2}
        rules:
          - {source: "a/w", target: "t"}
          - {source: "b/w", target: "t"}
        """)
    with pytest.raises(MappingError, match="two rules produce the target 't'"):
        spec.expand({"n": 2})


def test_totality_problems_are_reported_together():
    spec = parse("""\
        schema: 1
        name: toy
        model: toy
        config: {n: 1}
        rules:
          - {source: "a/w", target: "a.weight", ops: [linear]}
          - {source: "b/w", target: "b.weight"}
          - {source: "c/w", target: "c.weight"}
        drop:
          - {source: "d/counter", reason: unused at inference}
        """)
    table = spec.expand({"n": 1})
    sources = {
        "a/w": ((2, 3), "float32"),
        "c/w": ((4,), "float32"),
        "d/counter": ((), "int32"),
        "e/w": ((1,), "float32"),
    }
    targets = {
        "a.weight": ((2, 3), "float32"),
        "c.weight": ((4,), "float32"),
        "z": ((1,), "float32"),
    }
    report = plan_forward(table, sources, targets, "toy")
    assert not report.ok
    # Each problem names the rule behind it by file, line and index.
    assert report.missing_sources == [("b/w", "test.yaml:7: rules[1]")]
    assert report.unexpected_sources == ["e/w"]
    assert report.missing_targets == ["z"]
    assert report.unexpected_targets == [("b.weight", "test.yaml:7: rules[1]")]
    assert [m.target for m in report.mismatches] == ["a.weight"]
    assert report.dropped == [("d/counter", "unused at inference")]
    with pytest.raises(MappingError) as caught:
        report.raise_for_problems()
    text = str(caught.value)
    for needle in (
        "missing in the checkpoint: b/w",
        "unexpected in the checkpoint",
        "e/w",
        "model tensor no rule produces: z",
        "shape mismatch: a/w -> a.weight",
        "[2, 3] float32 becomes [3, 2]",
    ):
        assert needle in text


def test_only_shape_problems_raise_shape_mismatch():
    spec = parse(
        "schema: 1\nname: t\nmodel: t\nconfig: {n: 1}\nrules: [{source: a/w, target: a, ops: [linear]}]\n"
    )
    report = plan_forward(
        spec.expand({"n": 1}), {"a/w": ((2, 3), "float32")}, {"a": ((2, 3), "float32")}
    )
    with pytest.raises(ShapeMismatch):
        report.raise_for_problems()


def test_flatten_and_unflatten_are_inverse():
    params = {"m/~/x": {"w": 1, "b": 2}, "n": {"e": 3}}
    state = {"bn/~/mean_ema": {"average": 4}}
    flat = flatten_tree(params, state)
    assert flat == {
        "m/~/x/w": 1,
        "m/~/x/b": 2,
        "n/e": 3,
        "state:bn/~/mean_ema/average": 4,
    }
    assert unflatten_tree(flat) == (params, state)


# --------------------------------------------------------------------------------------
# The bundled mappings.


def test_bundled_mappings_are_the_six_models():
    assert available_mappings() == tuple(sorted(MODEL_NAMES))


def architecture(config) -> dict:
    """A config dataclass's values without the training-only fields."""
    return {
        k: v for k, v in dataclasses.asdict(config).items() if k not in TRAINING_ONLY_FIELDS
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_mappings_restate_no_official_fact(name):
    # The configuration, the tiny sizes and the official file's facts each live in one
    # place (perceiver_torch.configs, converter.registry); a shipped mapping repeats none.
    root = yaml.safe_load((MAPPINGS / f"{name}.yaml").read_text())
    assert not {"config", "presets", "source"} & set(root)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_configuration_and_presets_derive_from_the_dataclasses(name):
    spec = load_mapping(name)
    assert spec.model == name
    assert spec.config == architecture(CONFIG_CLASSES[name]())
    tiny = {**spec.config, **spec.presets["tiny"]}
    assert tiny == architecture(TINY_CONFIGS[name])
    # The preset holds only what differs from the official sizes.
    assert all(spec.config[k] != v for k, v in spec.presets["tiny"].items())
    assert config_from_dict(name, tiny) == TINY_CONFIGS[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_source_facts_derive_from_the_registry(name):
    source = load_mapping(name).source
    info = MODELS[name]
    assert source == {
        "file": info.official_file,
        "url": DOWNLOAD_BASE_URL + info.official_file,
        "layout": "params_and_state" if info.wrapped else "params",
        "params": official_tree(name).num_params(),
    }
    assert source["params"] == OFFICIAL_PARAMETERS[name]


def test_a_mapping_file_sets_only_what_differs(tmp_path):
    text = (MAPPINGS / "optical_flow.yaml").read_text()
    path = tmp_path / "flow.yaml"
    path.write_text(
        text
        + "config: {num_self_attention_heads: 4}\n"
        + "presets:\n  tiny: {num_latents: 32}\n  small: {d_latents: 128}\n"
        + "source: {file: my_flow.pickle}\n"
    )
    spec = load_mapping(path)
    official = architecture(CONFIG_CLASSES["optical_flow"]())
    assert spec.config == {**official, "num_self_attention_heads": 4}
    # A preset of the file's own replaces the derived one of the same name.
    assert spec.presets == {"tiny": {"num_latents": 32}, "small": {"d_latents": 128}}
    assert spec.source["file"] == "my_flow.pickle"
    assert spec.source["layout"] == "params"  # the rest still from the registry
    path.write_text(text + "config: {num_heads: 4}\n")
    with pytest.raises(MappingError, match=r"flow\.yaml:\d+: config\.num_heads: unknown"):
        load_mapping(path)


def test_a_files_config_outranks_the_built_in_tiny_preset(tmp_path):
    """A mapping's config: value was replaced by the tiny preset's whenever the
    checkpoint's shapes matched that preset (num_blocks: 5 converted as tiny's 3, and
    an invalid -3 was accepted the same way): the file's values hold, and are checked
    as --config values are."""
    text = (MAPPINGS / "imagenet_fourier.yaml").read_text()
    path = tmp_path / "fourier.yaml"
    path.write_text(text + "config: {num_blocks: 5}\n")
    spec = load_mapping(path)
    assert "num_blocks" not in spec.presets["tiny"]
    assert TINY_CONFIGS["imagenet_fourier"].num_blocks != 5  # else this proves nothing
    tree = read_tree("imagenet_fourier", "tiny")
    resolved = spec.resolve_config({k: v[0] for k, v in tree.items()})
    assert resolved.preset == "tiny" and resolved.values["num_blocks"] == 5
    tiny = architecture(TINY_CONFIGS["imagenet_fourier"])
    assert {k: v for k, v in resolved.values.items() if k != "num_blocks"} == {
        k: v for k, v in tiny.items() if k != "num_blocks"}
    path.write_text(text + "config: {num_blocks: -3}\n")
    with pytest.raises(MappingError, match=r"fourier\.yaml:\d+: config\.num_blocks: .*-3"):
        load_mapping(path)


def test_a_model_perceiver_torch_does_not_know_needs_its_config():
    with pytest.raises(MappingError, match="must give its 'config'"):
        parse(MINIMAL.replace("config: {layers: 3}\n", ""))


@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_mapping_covers_the_official_tree_and_the_model_exactly(name, size):
    tree = read_tree(name, size)
    spec = load_mapping(name)
    resolved = spec.resolve_config({k: v[0] for k, v in tree.items()})
    assert resolved.preset == ("official" if size == "full" else "tiny")
    table = spec.expand(resolved.values)
    targets = model_targets(name, config_from_dict(name, resolved.values))
    report = plan_forward(table, tree, targets, name)
    assert report.ok, report.problems()
    assert report.used == len(targets)
    assert report.used + len(report.dropped) == len(tree)


def test_overrides_that_contradict_the_checkpoint_are_refused():
    tree = read_tree("optical_flow", "tiny")
    shapes = {k: v[0] for k, v in tree.items()}
    spec = load_mapping("optical_flow")
    # The user's overrides are at fault: ConfigError (exit 2), not a MappingError.
    with pytest.raises(ConfigError, match="contradicts the checkpoint"):
        spec.resolve_config(shapes, {"num_self_attends": 5})
    with pytest.raises(ConfigError, match="unknown config key") as info:
        spec.resolve_config(shapes, {"num_layers": 5})
    assert "num_layers" in str(info.value) and "dropout" in str(info.value)
    # Training-only keys pass through to the model's config (no tensor uses them).
    assert spec.resolve_config(shapes, {"dropout": 0.5}).values["dropout"] == 0.5
    resolved = spec.resolve_config(shapes, {"image_size": [48, 64]})
    assert resolved.values["image_size"] == (48, 64)
    assert resolved.preset == "tiny"


def test_derivation_reports_a_foreign_checkpoint_clearly():
    spec = load_mapping("language_perceiver")
    with pytest.raises(MappingError, match="has no tensor 'embed/embeddings'"):
        spec.resolve_config({"foo/w": (2, 2)})


def test_round_trip_through_the_table_is_bit_identical():
    tree = read_tree("imagenet_conv", "tiny")
    rng = np.random.default_rng(0)
    sources = {
        key: (
            rng.integers(1, 100, size=shape).astype(dtype)
            if dtype == "int32"
            else rng.standard_normal(shape).astype(dtype)
        )
        for key, (shape, dtype) in tree.items()
    }
    spec = load_mapping("imagenet_conv")
    table = spec.expand(spec.resolve_config({k: v[0] for k, v in tree.items()}).values)
    converted = dict(convert_arrays(table, sources))
    dropped = {d.source: sources[d.source] for d in table.drops}
    back = invert_arrays(table, converted, dropped)
    assert set(back) == set(sources)
    for key, array in sources.items():
        assert (
            back[key].dtype == array.dtype and back[key].tobytes() == array.tobytes()
        ), key
    # Without the dropped tensors, restore_from fills them from the named source.
    restored = invert_arrays(table, converted)
    hidden = (
        "state:image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/hidden"
    )
    average = (
        "state:image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/average"
    )
    np.testing.assert_array_equal(restored[hidden], sources[average])


def test_includes_come_from_the_mapping_folder_then_the_bundled_ones(tmp_path):
    bundled = load_mapping("imagenet_conv")
    # A copy of a bundled mapping elsewhere still finds the bundled _blocks.yaml...
    copy = tmp_path / "imagenet_conv.yaml"
    copy.write_text((MAPPINGS / "imagenet_conv.yaml").read_text())
    def rules(spec):
        return [(r.source, r.target, r.ops) for r in spec.expand(spec.config).rules]

    assert rules(load_mapping(copy)) == rules(bundled)
    # ...unless its own folder has one, which wins.
    (tmp_path / "_blocks.yaml").write_text("this: [is not, a block file")
    with pytest.raises(MappingError, match=r"_blocks\.yaml"):
        load_mapping(copy)
    # A missing include names the including file.
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        (MAPPINGS / "imagenet_conv.yaml")
        .read_text()
        .replace("include: [_blocks.yaml]", "include: [_nowhere.yaml]")
    )
    with pytest.raises(
        MappingError, match=rf"{missing}: included file '_nowhere.yaml' not found"
    ):
        load_mapping(missing)


def test_hf_mappings_cover_the_six_models_and_read_their_counts_backwards():
    """mappings/hf/: one per model, each naming its transformers class; target_derive
    reads the layer count from transformers' names (the mapping read backwards)."""
    from converter.mapping import available_hf_mappings, load_hf_mapping

    assert available_hf_mappings() == tuple(sorted(MODEL_NAMES))
    for name in MODEL_NAMES:
        spec = load_hf_mapping(name)
        assert spec.model == name and spec.target["architecture"].startswith("Perceiver")
        (key,) = spec.target_derive
        table = spec.expand({**spec.config, key: 3})
        shapes = {rule.target: (1,) for rule in table.rules}
        assert spec.derive_from_targets(shapes) == {key: 3}
        assert len({rule.target for rule in table.rules}) == len(table.rules)
    with pytest.raises(MappingError, match="no HuggingFace mapping"):
        load_hf_mapping("nonexistent")


def test_a_folder_named_like_a_model_does_not_shadow_its_mapping(tmp_path, monkeypatch):
    from converter.mapping import load_mapping

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet_conv").mkdir()
    assert load_mapping("imagenet_conv").file == "mappings/imagenet_conv.yaml"


# --------------------------------------------------------------------------------------
# Malformed mapping files are MappingErrors: quickly, in bounded memory, never an
# unexpected TypeError/RecursionError/MemoryError or a hang.

OPTICAL_FLOW = (MAPPINGS / "optical_flow.yaml").read_text()


def variant(tmp_path: Path, old: str, new: str, name: str = "variant.yaml") -> Path:
    """A copy of mappings/optical_flow.yaml with one edit (the include still resolves:
    a user's folder falls back to the bundled _blocks.yaml)."""
    assert old in OPTICAL_FLOW, old
    path = tmp_path / name
    path.write_text(OPTICAL_FLOW.replace(old, new, 1))
    return path


def alias_bomb(depth: int) -> str:
    """Nested anchors of nine aliases each: ``9 ** (depth + 1)`` leaves."""
    text = "[&a0 [l,l,l,l,l,l,l,l,l], "
    for level in range(1, depth + 1):
        text += f"&a{level} [" + ",".join([f"*a{level - 1}"] * 9) + "], "
    return text + f"*a{depth}]"


@pytest.mark.parametrize(
    "old, new",
    [
        ("description: >-", "description: BOMB\nx_description: >-"),
        ("schema: 1", "schema: BOMB"),
        ("relative: 1.0e-5", "relative: BOMB"),
        ("dst: input_preprocessor.projection}", "dst: input_preprocessor.projection, junk: BOMB}"),
        ("rules:\n", "rules:\n  - {source: a/b, target: c.d, ops: [{squeeze: {dims: BOMB}}]}\n"),
    ],
)
def test_alias_bombs_are_refused_while_loading(tmp_path, old, new):
    # 9**7 leaves: loading is instant (aliases share one list), but the str()/repr()
    # that checks and messages make of the value took seconds and hundreds of MB (at
    # 9**9: a hang and gigabytes). Each is refused at its line, before any of that.
    path = variant(tmp_path, old, new.replace("BOMB", alias_bomb(6)))
    with pytest.raises(MappingError, match=r"variant\.yaml:\d+: aliases expand the document"):
        load_mapping(path)


def test_small_aliases_still_load(tmp_path):
    path = variant(
        tmp_path,
        "  - use: decoder\n    with: {src: flow_decoder/~/basic_decoder, dst: decoder}",
        "  - use: decoder\n    with: &w {src: flow_decoder/~/basic_decoder, dst: decoder}",
    )
    assert load_mapping(path).rules[-1]["with"]["dst"] == "decoder"


@pytest.mark.parametrize(
    "old, new, message",
    [
        # The composer and the constructor recurse per level: a RecursionError.
        ("rules:\n", "rules:\n  - {source: " + "[" * 5000 + "]" * 5000 + ", target: x}\n",
         r"variant\.yaml:31: values nest more than 64 levels deep"),
        ("schema: 1", "schema: &r [*r]", r"variant\.yaml:2: alias \*r refers to a value that contains it"),
        # SafeLoader's scalar constructors raise bare ValueErrors.
        ("schema: 1", "schema: 2001-13-45", r"variant\.yaml:2: malformed YAML: invalid value: month"),
        ("schema: 1", "schema: " + "9" * 5000, r"variant\.yaml:2: malformed YAML: invalid value: .*digits"),
    ],
)
def test_yaml_that_cannot_be_built_is_a_mapping_error(tmp_path, old, new, message):
    with pytest.raises(MappingError, match=message):
        load_mapping(variant(tmp_path, old, new))


def test_rule_expansion_is_bounded(tmp_path):
    def expand(path: Path) -> None:
        spec = load_mapping(path)
        shapes = {k: v[0] for k, v in read_tree("optical_flow", "tiny").items()}
        spec.expand(spec.resolve_config(shapes).values)

    message = r"variant\.yaml:\d+: .*expands to more than 100,000 rules"
    # Just past the bound (the bundled mappings expand to at most 457 rules). Without
    # the bound these materialise every rule first; at 10**18 they exhausted memory.
    for loops in ("{i: 200000}", "{i: 1000000000, j: 1000000000}", "{i: " + "9" * 30 + "}"):
        path = variant(tmp_path, "rules:\n", f'rules:\n  - {{source: "a/b{{i}}", target: "c.d{{i}}", for: {loops}}}\n')
        with pytest.raises(MappingError, match=message):
            expand(path)
    # Blocks each using the next ten times: 10**6 rules here (10**12 at twelve levels).
    blocks = "blocks:\n" + "".join(
        f"  n{k}:\n" + "".join(f"    - use: n{k + 1}\n      with: {{p{k}: '{j}'}}\n" for j in range(10))
        for k in range(6)
    ) + "  n6:\n    - {source: 'x/y', target: 'z.w'}\n"
    with pytest.raises(MappingError, match=message):
        expand(variant(tmp_path, "rules:\n", blocks + "rules:\n  - use: n0\n"))
    # A loop that expands to nothing still counts its iterations (no silent hang).
    empty = "blocks:\n  none:\n    - {source: 'x/y{j}', target: 'z.w{j}', for: {j: 0}}\n"
    with pytest.raises(MappingError, match=message):
        expand(variant(tmp_path, "rules:\n", empty + "rules:\n  - {use: none, for: {i: 200000}}\n"))


DERIVE = "  patch_channels: {shape: image_preprocessor/patches_linear/w, dim: 1}"


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("include: [_blocks.yaml]", "include: [5]", r":9: include\[0\]: an included file is a non-empty file name, got 5"),
        ("include: [_blocks.yaml]", "include: [null]", r":9: include\[0\]: .*got None"),
        ("include: [_blocks.yaml]", "include: 5", r":9: include: 'include' must be a list"),
        ("include: [_blocks.yaml]", "include: _blocks.yaml", r":9: include: 'include' must be a list of file names .*str"),
        (DERIVE, DERIVE + '\n  image_size: {expr: "1 // 0"}', r":20: derive\.image_size: '1 // 0' divides by zero"),
        (DERIVE, DERIVE + '\n  image_size: {expr: "max()"}', r":20: derive\.image_size: max\(\) .*needs two or more"),
        (DERIVE, DERIVE + '\n  image_size: {expr: "max(4)"}', r":20: derive\.image_size: max\(\) .*needs two or more"),
        (DERIVE, DERIVE + "\n  image_size: {expr: 64}", r":20: derive\.image_size: 'expr' must be an expression string"),
        (DERIVE, DERIVE + '\n  image_size: {expr: "' + "-" * 100000 + '64"}', r":20: derive\.image_size: 'expr' has 100,002 characters"),
        (DERIVE, DERIVE + "\n  image_size: {count: 5}", r":20: derive\.image_size: 'count' must be a key pattern string"),
        (DERIVE, "  patch_channels: {shape: [a], dim: 1}", r":19: derive\.patch_channels: 'shape' must be a tensor key"),
        (DERIVE, "  patch_channels: {shape: a, dim: true}", r":19: derive\.patch_channels: 'dim' must be an integer"),
        (DERIVE, DERIVE + "\n  image_size: {expr: x, shapes: [1]}", r":20: derive\.image_size: 'shapes' must map"),
        ("tolerance:", "drop:\n  - {source: a/b, reason: x, restore_from: 5}\ntolerance:", r":28: drop\[0\]\.restore_from: 'restore_from' must be a non-empty string"),
        ("rules:\n", "rules:\n  - {source: a/b, target: c.d, ops: [{reshape: {from: [-1, 64], to: [1180591620717411303424, -1]}}]}\n",
         r":31: rules\[0\]\.ops\[0\]: op 'reshape': 'to' must be a list of positive sizes"),
        ("relative: 1.0e-5", "relative: .nan", r":28: tolerance\.relative: must be a positive number \(finite\), got nan"),
        ("relative: 1.0e-5", "relative: .inf", r":28: tolerance\.relative: must be a positive number \(finite\), got inf"),
        ("relative: 1.0e-5", "relative: " + "9" * 400, r":28: tolerance\.relative: must be a positive number \(finite\)"),
        ("relative: 1.0e-5", "relative: 1.0e-5\n  fourier_outputs: [1]", r":29: tolerance\.fourier_outputs: 'fourier_outputs' must map"),
    ],
)
def test_malformed_values_are_mapping_errors_naming_file_and_line(tmp_path, old, new, message):
    path = variant(tmp_path, old, new)
    with pytest.raises(MappingError, match=re.escape(str(path)) + message):
        spec = load_mapping(path)
        # Derivations run on a checkpoint's shapes: evaluate them as a conversion does.
        shapes = {k: v[0] for k, v in read_tree("optical_flow", "tiny").items()}
        spec.expand(spec.resolve_config(shapes).values)


@pytest.mark.parametrize(
    "expression, message",
    [
        ("1 // 0", "divides by zero"),
        ("max()", "needs two or more"),
        ("true + 1", "unknown name"),
        ("big * big * big", "beyond int64"),
        ("-" * 400 + "64", None),  # deep, but short enough: evaluates
        ("1 +", "invalid expression"),
        # The backstop: anything else evaluation raises (here a name's own arithmetic).
        ("odd * 2", "cannot evaluate 'odd \\* 2': OverflowError: boom"),
        ("size + 1", "'size' in 'size \\+ 1' is not an integer"),
    ],
)
def test_derive_expressions_fail_as_mapping_errors(expression, message):
    from converter.mapping import _evaluate, _Where

    class Odd(int):
        def __mul__(self, other):
            raise OverflowError("boom")

    names = {"big": 2**40, "size": (8, 8), "odd": Odd(3)}
    where = _Where("t.yaml", 3, "derive.x")
    if message is None:
        assert _evaluate(expression, names, where) == 64
        return
    with pytest.raises(MappingError, match="t.yaml:3: derive.x: .*" + message):
        _evaluate(expression, names, where)


def test_a_mapping_file_that_is_not_utf8_is_named(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(OPTICAL_FLOW.replace("# Optical flow", "# Optical flöw").encode("latin-1"))
    with pytest.raises(MappingError, match=re.escape(f"{latin1}:1: not UTF-8 text") + ".*must be saved as UTF-8"):
        load_mapping(latin1)
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(OPTICAL_FLOW.encode("utf-16"))
    with pytest.raises(MappingError, match=re.escape(f"{utf16}:1: not UTF-8 text")):
        load_mapping(utf16)
    # An included file too.
    (tmp_path / "_blocks.yaml").write_bytes(
        (MAPPINGS / "_blocks.yaml").read_text().replace("# ", "# é ", 1).encode("latin-1")
    )
    with pytest.raises(MappingError, match=re.escape(str(tmp_path / "_blocks.yaml")) + ":\\d+: not UTF-8"):
        load_mapping(variant(tmp_path, "schema: 1", "schema: 1"))
    # CRLF files read as before (universal newlines: the same text and sha256).
    (tmp_path / "crlf").mkdir()
    crlf = tmp_path / "crlf" / "optical_flow.yaml"
    crlf.write_bytes(OPTICAL_FLOW.replace("\n", "\r\n").encode())
    assert load_mapping(crlf).sha256 == load_mapping("optical_flow").sha256


def test_an_op_that_cannot_apply_is_a_shape_problem_not_a_dtype_one():
    spec = parse(
        "schema: 1\nname: t\nmodel: t\nconfig: {n: 1}\n"
        "rules: [{source: a/b, target: a.bias, ops: [{squeeze: {dims: [0]}}]}]\n"
    )
    # The op's input shape equals the model's: before, that read as "only the dtype
    # differs" and the fix suggested np.[64] as a dtype.
    report = plan_forward(
        spec.expand({"n": 1}), {"a/b": ((64,), "float32")}, {"a.bias": ((64,), "float32")}
    )
    assert report.problems() == [
        "shape mismatch: a/b -> a.bias: squeeze(dims=[0]) needs size-1 dimensions, "
        "got shape [64]"
    ]
    with pytest.raises(ShapeMismatch):
        report.raise_for_problems()
    # A real dtype mismatch still says so, with the fix.
    copy = parse("schema: 1\nname: t\nmodel: t\nconfig: {n: 1}\nrules: [{source: a/b, target: a.bias}]\n")
    report = plan_forward(
        copy.expand({"n": 1}), {"a/b": ((64,), "float64")}, {"a.bias": ((64,), "float32")}
    )
    assert report.problems()[0].startswith("dtype mismatch: a/b -> a.bias")
    assert "np.float32" in report.problems()[0]


@pytest.mark.parametrize("stored", ["int32", "int64"])
def test_a_dtype_the_rules_own_op_gets_wrong_names_the_op_not_the_file(stored):
    # The op casts to int32 where the model keeps int64 (or expects int32 where the
    # file holds int64): re-saving the checkpoint as the model's dtype was the advice.
    spec = parse(
        "schema: 1\nname: t\nmodel: t\nconfig: {n: 1}\nrules:\n"
        "  - {source: a/n, target: a.n, ops: [{dtype: {from: int32, to: int32}}]}\n"
    )
    report = plan_forward(spec.expand({"n": 1}), {"a/n": ((), stored)}, {"a.n": ((), "int64")})
    (problem,) = report.problems()
    assert problem.startswith("dtype mismatch: a/n -> a.n")
    assert "test.yaml:6" in problem and "dtype op" in problem and "'from'/'to'" in problem
    assert "save the checkpoint again" not in problem


def test_an_op_argument_no_check_foresaw_is_a_mapping_error_naming_the_rule():
    from converter.mapping import Rule, rule_shape
    from converter.ops import Op

    # Built in code, past parse_op's checks: what any unforeseen error of an op's
    # arguments becomes. np.prod overflowed here with an OverflowError.
    rule = Rule("a/b", "c.d", (Op("reshape", {"from": (-1,), "to": ("x", -1)}),), "t.yaml:4: rules[0]")
    with pytest.raises(MappingError, match=r"t\.yaml:4: rules\[0\]: \[reshape.*cannot apply to shape \[64\]: TypeError"):
        rule_shape(rule, (64,))
    report = plan_forward(
        MappingTable((rule,), ()), {"a/b": ((64,), "float32")}, {"c.d": ((64,), "float32")}
    )
    assert "t.yaml:4: rules[0]" in report.problems()[0]
    with pytest.raises(MappingError, match=r"t\.yaml:4: rules\[0\]: .*checkpoint array of shape \[64\]"):
        list(convert_arrays(MappingTable((rule,), ()), {"a/b": np.zeros(64, "float32")}))


def test_the_python_api_raises_mapping_errors_for_malformed_files(tmp_path, golden_path):
    import converter

    checkpoint = golden_path("optical_flow")
    for old, new in [
        ("include: [_blocks.yaml]", "include: [5]"),
        ("schema: 1", "schema: " + alias_bomb(8)),
        (DERIVE, DERIVE + '\n  image_size: {expr: "1 // 0"}'),
    ]:
        with pytest.raises(MappingError, match="variant.yaml:"):
            converter.convert(checkpoint, tmp_path / "out.safetensors", mapping=variant(tmp_path, old, new))
