"""``perceiver-convert mapping``: the expanded table of every shipped mapping.

For every mapping and both sizes the table must account for every tensor of the
shipped parameter tree (each once: a rule or a drop) and every tensor of the model
(each once), with the shapes of the tree and the model, and every ``file:line`` must
point at the YAML rule (and the ``use:`` lines) the row was expanded from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from converter.conversion import model_targets
from converter.mapping import _load_yaml, available_mappings, flatten_tree
from converter.mapping_table import describe_mapping, format_table
from converter.registry import MODEL_NAMES, official_tree
from helpers import run_cli
from perceiver_torch.configs import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "full")


def yaml_nodes(path: Path) -> Dict[int, Any]:
    """The rule, use and drop nodes of a YAML file by the line they start on."""
    nodes: Dict[int, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "source" in node or "use" in node:
                nodes[node.line] = node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(_load_yaml(path.read_text(), str(path)))
    return nodes


def node_at(location: str, cache: Dict[str, Dict[int, Any]]) -> Any:
    file, _, line = location.rpartition(":")
    if file not in cache:
        cache[file] = yaml_nodes(ROOT / file)
    return cache[file].get(int(line))


def pattern(template: str) -> "re.Pattern[str]":
    """A template's placeholders as wildcards: ``{_i}`` is "" or _N, others anything."""
    parts = re.split(r"(\{_?[A-Za-z][A-Za-z0-9_]*\})", template)
    regex = "".join(
        ("(?:_[0-9]+)?" if part == "{_i}" else ".+?")
        if part.startswith("{")
        else re.escape(part)
        for part in parts
    )
    return re.compile(regex)


def tree_sources(name: str, size: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    tree = official_tree(name, size)
    return flatten_tree(tree.params, tree.state)


def test_the_command_covers_every_shipped_mapping():
    assert available_mappings() == tuple(sorted(MODEL_NAMES))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_table_covers_the_tree_and_the_model_exactly(name, size):
    described = describe_mapping(name, size)
    assert described.problems == []
    assert described.config.preset == ("tiny" if size == "tiny" else "official")
    sources = tree_sources(name, size)
    claimed = [r.source for r in described.rules] + [d.source for d in described.dropped]
    assert sorted(claimed) == sorted(sources)  # every tree tensor, each once
    targets = model_targets(name, config_from_dict(name, described.config.values))
    produced = [r.target for r in described.rules]
    assert sorted(produced) == sorted(targets)  # every model tensor, each once
    for row in described.rules:
        assert row.source_shape == sources[row.source][0], row.source
        assert row.target_shape == targets[row.target][0], row.target
    for drop in described.dropped:
        assert drop.source_shape == sources[drop.source][0]
        assert drop.reason


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_file_line_points_at_the_rule_it_expanded(name):
    described = describe_mapping(name, "tiny")
    cache: Dict[str, Dict[int, Any]] = {}
    for row in described.rules:
        rule = node_at(row.at[0], cache)
        assert rule is not None and "source" in rule, row.at[0]
        assert pattern(rule["source"]).fullmatch(row.source), (row.at[0], row.source)
        assert pattern(rule["target"]).fullmatch(row.target), (row.at[0], row.target)
        # Then each use: that inserted the rule's block, innermost first, ending in
        # the mapping file itself.
        for location in row.at[1:]:
            use = node_at(location, cache)
            assert use is not None and "use" in use, location
        assert row.at[-1].startswith(f"mappings/{name}.yaml:")
    for drop in described.dropped:
        node = node_at(drop.at[0], cache)
        assert node is not None and "reason" in node, drop.at[0]
        assert pattern(node["source"]).fullmatch(drop.source)
        assert node["reason"] == drop.reason


@pytest.mark.parametrize("size", SIZES)
def test_json_and_table_through_the_cli(size):
    result = run_cli("mapping", "video_autoencoding", "--size", size, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    described = describe_mapping("video_autoencoding", size)
    assert document["rules"] == described.as_dict()["rules"]
    assert document["size_preset"] == ("tiny" if size == "tiny" else "official")
    assert len(document["rules"]) == len(tree_sources("video_autoencoding", size))
    table = run_cli("mapping", "video_autoencoding", "--size", size)
    assert table.exit_code == 0
    assert table.stdout == format_table(described) + "\n"
    for row in document["rules"]:
        assert row["target"] in table.stdout


def test_dropped_keys_carry_their_reasons():
    document = json.loads(run_cli("mapping", "imagenet_conv", "--json").stdout)
    dropped = {d["source"]: d for d in document["dropped"]}
    hidden = "state:image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema/hidden"
    assert set(dropped) == {
        hidden,
        hidden.replace("mean_ema", "var_ema"),
        "state:image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/var_ema/counter",
    }
    assert "EMA accumulator" in dropped[hidden]["reason"]
    assert dropped[hidden]["restore_from"].endswith("mean_ema/average")


def test_a_user_mapping_file_is_accepted(tmp_path):
    copy = tmp_path / "my_flow.yaml"
    copy.write_text((ROOT / "mappings" / "optical_flow.yaml").read_text())
    result = run_cli("mapping", copy, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    bundled = describe_mapping("optical_flow").as_dict()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "at"} for r in rows]  # noqa: E731
    assert strip(document["rules"]) == strip(bundled["rules"])
    # The rules of the copy point into the copy; the blocks still into _blocks.yaml.
    assert all(r["at"][-1].startswith(f"{copy}:") for r in document["rules"])


def test_config_overrides_show_in_the_table():
    result = run_cli("mapping", "optical_flow", "--config", "num_self_attention_heads=4",
                     "--config", "image_size=[48,64]", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["config"]["num_self_attention_heads"] == 4
    assert document["config"]["image_size"] == [48, 64]
    assert document["overrides"] == {"num_self_attention_heads": 4, "image_size": [48, 64]}


@pytest.mark.parametrize(
    "args, message",
    [
        (("no_such_model",), "no mapping named 'no_such_model'"),
        (("missing.yaml",), "no such mapping file"),
        (("optical_flow", "--config", "num_heads=4"), "unknown config key"),
        (("optical_flow", "--config", "num_self_attends=5"), "contradicts"),
        # No single shape gives it (the position table holds H*W rows), but the tree
        # contradicts it all the same: a bad --config (2), as convert says, not a
        # mapping that does not fit its tree (3).
        (("imagenet_learned", "--config", "image_size=16x16"), "contradicts the "
         "imagenet_learned tree"),
        (("imagenet_learned", "--size", "full", "--config", "image_size=16x16", "--json"),
         "contradicts the imagenet_learned tree"),
        (("optical_flow", "--size", "huge"), "huge"),
        # An export mapping to transformers' keys: not a table of perceiver_torch keys.
        ((str(ROOT / "mappings" / "hf" / "imagenet_conv.yaml"),), "transformers'"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run_cli("mapping", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_an_override_only_the_product_of_shapes_allows_is_accepted():
    result = run_cli("mapping", "imagenet_learned", "--config", "image_size=16x64", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["problems"] == []


def test_broken_mapping_files_exit_3(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema: 1\nname: x\nmodel: optical_flow\nrules:\n  - {source: a, target: [b}\n")
    result = run_cli("mapping", broken)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {broken}:5: malformed YAML")
    # Well-formed, but missing the decoder: the table lists what it does not cover.
    partial = tmp_path / "partial.yaml"
    partial.write_text(
        (ROOT / "mappings" / "optical_flow.yaml")
        .read_text()
        .replace("  - use: decoder\n", "  - use: linear\n")
    )
    result = run_cli("mapping", partial)
    assert result.exit_code == 3
    assert "problems" in result.stdout
    assert "model tensor no rule produces: decoder.cross_attention" in result.stdout
    # A mapping of a model with no shipped tree cannot be expanded for one.
    toy = tmp_path / "toy.yaml"
    toy.write_text("schema: 1\nname: toy\nmodel: toy\nconfig: {n: 1}\n"
                   "rules:\n  - {source: a/w, target: a.weight}\n")
    result = run_cli("mapping", toy)
    assert result.exit_code == 3
    assert "has no shipped parameter tree" in result.stderr


def _bomb() -> str:
    text = "[&a0 [l,l,l,l,l,l,l,l,l], "
    for level in range(1, 9):
        text += f"&a{level} [" + ",".join([f"*a{level - 1}"] * 9) + "], "
    return text + "*a8]"


@pytest.mark.parametrize(
    "old, new, line, message",
    [
        # A billion laughs (9**9 leaves): hung and ate memory.
        ("schema: 1", "schema: " + _bomb(), 2, "aliases expand the document"),
        ("relative: 1.0e-5", "relative: " + _bomb(), 28, "aliases expand the document"),
        # 10**18 rules: MemoryError.
        ("rules:\n", 'rules:\n  - {source: "a/b{i}{j}", target: "c.d{i}{j}", for: {i: 1000000000, j: 1000000000}}\n',
         31, "expands to more than 100,000 rules"),
        ("include: [_blocks.yaml]", "include: _blocks.yaml", 9, "'include' must be a list"),
        ("  patch_channels: {shape: image_preprocessor/patches_linear/w, dim: 1}",
         '  patch_channels: {shape: image_preprocessor/patches_linear/w, dim: 1}\n  image_size: {expr: "1 // 0"}',
         20, "divides by zero"),
        ("rules:\n", "rules:\n  - {source: " + "[" * 5000 + "]" * 5000 + ", target: x}\n", 31, "nest more than 64"),
        ("relative: 1.0e-5", "relative: .nan", 28, "must be a positive number (finite)"),
    ],
)
def test_malformed_mapping_files_are_one_line_errors_exit_3(tmp_path, old, new, line, message):
    text = (ROOT / "mappings" / "optical_flow.yaml").read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new, 1))
    result = run_cli("mapping", path)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {path}:{line}: ")
    assert message in result.stderr
    assert "unexpected" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_mapping_file_that_is_not_utf8_exits_3(tmp_path):
    path = tmp_path / "latin1.yaml"
    text = (ROOT / "mappings" / "optical_flow.yaml").read_text()
    path.write_bytes(text.replace("# Optical flow", "# Optical flöw").encode("latin-1"))
    result = run_cli("mapping", path)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {path}:1: not UTF-8 text")
    assert "unexpected" not in result.stderr
