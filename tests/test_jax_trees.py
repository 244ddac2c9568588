"""perceiver_jax builds exactly the official parameter (and state) trees.

``jax.eval_shape`` of ``init`` (no computation) is compared, module path by module
path and parameter by parameter (shape and dtype), with the trees listed from the
official checkpoints (``converter/data/trees``): full size with the default configs,
tiny size with ``perceiver_torch.configs.TINY_CONFIGS``. The TSV files are parsed here
directly so that this test does not depend on ``converter.registry``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("haiku")

import perceiver_jax  # noqa: E402
from official_facts import OFFICIAL_PARAMETERS  # noqa: E402
from perceiver_torch.configs import CONFIG_CLASSES, TINY_CONFIGS  # noqa: E402

pytestmark = pytest.mark.jax

TREES = Path(__file__).resolve().parents[1] / "converter" / "data" / "trees"

Row = Tuple[Tuple[int, ...], str]

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"


def read_tree(path: Path) -> Dict[Tuple[str, str], Row]:
    """Parses a tree TSV: ``module<TAB>param<TAB>[shape]<TAB>dtype`` after a header."""
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["module", "param", "shape", "dtype"], path
    rows: Dict[Tuple[str, str], Row] = {}
    for line in lines[1:]:
        if not line:
            continue
        module, param, shape, dtype = line.split("\t")
        key = (module, param)
        assert key not in rows, f"{path}: duplicate row {key}"
        rows[key] = (tuple(json.loads(shape)), dtype)
    assert rows, f"{path} lists no parameters"
    return rows


def flatten(tree: Mapping[str, Mapping[str, Any]]) -> Dict[Tuple[str, str], Row]:
    return {
        (module, param): (tuple(value.shape), str(value.dtype))
        for module, params in tree.items()
        for param, value in params.items()
    }


def assert_same_tree(got: Dict, want: Dict, what: str) -> None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    problems = (
        [f"missing {k} {want[k]}" for k in missing]
        + [f"unexpected {k} {got[k]}" for k in extra]
        + [f"{k}: got {got[k]}, official {want[k]}" for k in wrong]
    )
    assert not problems, f"{what}:\n  " + "\n  ".join(problems[:40])


def abstract_init(name: str, config: Any):
    model = perceiver_jax.get_model(name, config)
    specs = perceiver_jax.input_specs(name, config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), **specs)


def check_model(name: str, config: Any, folder: Path) -> Tuple[Any, Any]:
    params, state = abstract_init(name, config)
    assert_same_tree(
        flatten(params), read_tree(folder / f"{name}.tsv"), f"{name} params"
    )
    state_file = folder / f"{name}.state.tsv"
    want_state = read_tree(state_file) if state_file.exists() else {}
    assert_same_tree(flatten(state), want_state, f"{name} state")
    return params, state


@pytest.mark.parametrize("name", perceiver_jax.MODEL_NAMES)
def test_full_size_tree_is_official(name: str) -> None:
    params, _ = check_model(name, CONFIG_CLASSES[name](), TREES)
    # The published counts: a second, independent check that the trees compared
    # are the right, complete ones.
    assert perceiver_jax.num_params(params) == OFFICIAL_PARAMETERS[name]


@pytest.mark.parametrize("name", perceiver_jax.MODEL_NAMES)
def test_tiny_tree_is_golden(name: str) -> None:
    params, _ = check_model(name, TINY_CONFIGS[name], TREES / "tiny")
    golden = json.loads((GOLDEN_DIR / name / "config.json").read_text())
    assert perceiver_jax.num_params(params) == golden["parameters"]


def test_only_imagenet_conv_has_state() -> None:
    # The state file exists for imagenet_conv alone; the other five must come out
    # with an empty state (checked above), and this one with BatchNorm EMAs.
    assert sorted(p.name for p in TREES.glob("*.state.tsv")) == [
        "imagenet_conv.state.tsv"
    ]
    _, state = abstract_init("imagenet_conv", TINY_CONFIGS["imagenet_conv"])
    assert {m.rsplit("/", 1)[-1] for m in state} == {"mean_ema", "var_ema"}


def test_tree_comparison_detects_a_difference() -> None:
    # The comparison itself must be able to fail: changing one width of the tiny
    # language model has to give a tree that differs from the golden one.
    config = dataclasses.replace(TINY_CONFIGS["language_perceiver"], qk_channels=24)
    params, _ = abstract_init("language_perceiver", config)
    want = read_tree(TREES / "tiny" / "language_perceiver.tsv")
    with pytest.raises(AssertionError, match="qk|linear"):
        assert_same_tree(flatten(params), want, "changed qk_channels")
