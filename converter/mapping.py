"""Declarative YAML mappings between official Haiku checkpoints and perceiver_torch models.

A mapping file (``mappings/<model>.yaml``) says, as data, how every tensor of an
official checkpoint becomes a tensor of the PyTorch model:

- ``rules``: a rule is a source pattern (Haiku ``module/param``, or ``state:module/param``
  for the BatchNorm state), a target template (a PyTorch state-dict key) and an ordered
  list of ops from the closed registry of :mod:`converter.ops`. ``for: {i: <count>}``
  repeats a rule over layer indices; in a source, ``{_i}`` spells Haiku's numbering
  (``name``, ``name_1``, ``name_2``, ...) and ``{i}`` the plain index. ``use: <block>``
  inserts a named group of rules from ``blocks`` (the shared ones live in
  ``mappings/_blocks.yaml``) with ``with:`` values for its placeholders.
- ``drop``: source tensors deliberately not used, each with a reason (and optionally a
  ``restore_from`` source whose value is used when exporting back without the original).
- ``config``: values that differ from the official configuration, which for the six
  models is the perceiver_torch config dataclass's defaults (the shipped files have
  none); ``derive``: the values a checkpoint's shapes reveal; ``presets``: other known
  sizes on top of ``tiny``, which is ``perceiver_torch.TINY_CONFIGS``.
- ``source``: the official file's facts, by default those of the model registry
  (:mod:`converter.registry`); a file may replace them.
- ``tolerance``: the parity tolerance ``verify`` applies (``relative``; optional
  ``fourier_outputs``, and ``float16``/``bfloat16`` for weights stored in those dtypes,
  default ``converter.verify.ROUNDING_TOLERANCE``).
- ``target`` (free-form facts about the target side, e.g. a HuggingFace class) and
  ``target_derive`` (like ``derive``, read from the *target* tensors' shapes): used by
  the mappings whose targets are another library's keys (``mappings/hf/``), which are
  also read backwards, from that library's files.

Templates expand to an exact table before anything is matched; two rules claiming the
same source or target key are an error, never "first wins". Applying a table checks
totality both ways and every shape before any data is copied.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.resources
import itertools
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np
import yaml

from converter.errors import ConfigError, MappingError, ShapeMismatch
from converter.ops import (
    Op,
    apply_ops,
    invert_ops,
    ops_inverse_shape,
    ops_shape,
    parse_op,
)

SCHEMA_VERSION = 1
Shape = Tuple[int, ...]

# --------------------------------------------------------------------------------------
# YAML loading with line numbers, so every error points at file:line.


class _LineDict(dict):
    """A dict that remembers the line of the mapping and of each key (1-based)."""

    line: int = 0
    key_lines: Dict[Any, int]


# Bounds on a YAML document, checked on its events as the composer reads them, so
# before anything is constructed. Aliases make a document's value a graph: nine
# anchors of nine aliases each ("billion laughs") are a few hundred bytes that expand
# to 9**9 nodes, and every later str()/repr() or walk of such a value hangs and eats
# memory. So a document is refused when its full expansion (each node 1 plus its
# scalar's length, each alias its anchor's expanded size) passes _MAX_YAML_EXPANSION;
# the bundled files expand to at most ~4,000 (and use no aliases). The composer and
# constructor recurse per level of nesting, so 5000 nested lists raised
# RecursionError: _MAX_YAML_DEPTH (the bundled files nest at most 7 levels) refuses
# the nest at its first level too deep.
_MAX_YAML_EXPANSION = 1_000_000
_MAX_YAML_DEPTH = 64


class _TooLarge(yaml.MarkedYAMLError):
    """A document past the bounds above (not malformed YAML: too big to load)."""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records line numbers and refuses duplicate keys, and
    documents that nest or expand (through aliases) too far."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._anchor_sizes: Dict[str, int] = {}  # expanded size of completed anchors
        self._open: List[List[Any]] = []  # [anchor, size so far] per open collection
        self._expanded = 0

    def get_event(self) -> yaml.Event:
        # The composer takes every event through here, once, in document order: the
        # expansion is counted in one step per event (anchor sizes memoised), with no
        # recursion and nothing built.
        event = super().get_event()
        self._count(event)
        return event

    def _count(self, event: yaml.Event) -> None:
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(self._open) >= _MAX_YAML_DEPTH:
                raise _TooLarge(
                    None, None,
                    f"values nest more than {_MAX_YAML_DEPTH} levels deep; a mapping "
                    "file needs a handful",
                    event.start_mark,
                )
            size = 1
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = self._open.pop()
            if anchor is not None:
                self._anchor_sizes[anchor] = size
            if self._open:
                self._open[-1][1] += size  # already in the total, node by node
            return
        elif isinstance(event, yaml.ScalarEvent):
            size = 1 + len(event.value)
            if event.anchor is not None:
                self._anchor_sizes[event.anchor] = size
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in self._anchor_sizes:
                size = self._anchor_sizes[event.anchor]
            elif any(anchor == event.anchor for anchor, _ in self._open):
                raise _TooLarge(
                    None, None,
                    f"alias *{event.anchor} refers to a value that contains it (a "
                    "recursive structure); a mapping file has no use for one",
                    event.start_mark,
                )
            else:
                size = 1  # an undefined alias: the composer reports it
        else:
            return
        self._expanded += size
        if self._expanded > _MAX_YAML_EXPANSION:
            raise _TooLarge(
                None, None,
                f"aliases expand the document to more than {_MAX_YAML_EXPANSION:,} "
                "nodes and characters (an alias bomb?); write the values out",
                event.start_mark,
            )
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            self._open.append([event.anchor, size])
        elif self._open:
            self._open[-1][1] += size

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # SafeLoader's scalar constructors raise plain ValueErrors for values that
        # match a tag's pattern but not its range: a date "2001-13-45", an integer
        # of more than 4300 digits (Python's int/str conversion limit). Made a
        # YAML error at the value's line, so the file:line reaches the message.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as error:
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid value: {error}", node.start_mark
            ) from None


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key at line {line}", key_node.start_mark
            ) from None
        if key in result:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {result.key_lines[key]})",
                key_node.start_mark,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _line_of(node: Any, key: Any = None) -> int:
    if isinstance(node, _LineDict):
        if key is not None and key in node.key_lines:
            return node.key_lines[key]
        return node.line
    return 0


@dataclass(frozen=True)
class _Where:
    """Where a YAML value came from, for error messages: ``file:line: path``."""

    file: str
    line: int
    path: str

    def at(self, node: Any, key: Any, path: str) -> "_Where":
        line = _line_of(node, key) or self.line
        return _Where(self.file, line, path)

    @property
    def location(self) -> str:
        """``file:line``, without the path inside the file."""
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.path}"
            if self.path
            else f"{self.file}:{self.line}"
        )


def _fail(where: _Where, message: str) -> MappingError:
    return MappingError(f"{where}: {message}")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_yaml(text: str, name: str) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)
    except _TooLarge as error:
        raise MappingError(f"{name}:{error.problem_mark.line + 1}: {error.problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(
            error, "context_mark", None
        )
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(error, "problem", None) or str(error)
        raise MappingError(f"{where}: malformed YAML: {problem}") from None


# --------------------------------------------------------------------------------------
# A small, safe arithmetic evaluator for ``derive`` expressions (no eval()).

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}
_FUNCTIONS = {"max": max, "min": min}


# A derive expression is one short line (the bundled ones are under 40 characters);
# Python's parser recurses per nesting level, so "-" * 100000 + "64" would exhaust
# memory or the stack before any check could run. Results (and so every value a later
# expression sees) stay within int64, so chained derivations cannot grow numbers
# without bound.
_MAX_EXPRESSION = 500
_MAX_VALUE = 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _evaluate(expression: str, names: Mapping[str, Any], where: _Where) -> int:
    if not isinstance(expression, str):
        raise _fail(where, f"'expr' must be a string, got {_short(expression)}")
    if len(expression) > _MAX_EXPRESSION:
        raise _fail(
            where,
            f"expression of {len(expression):,} characters; at most "
            f"{_MAX_EXPRESSION} are allowed",
        )
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        raise _fail(where, f"invalid expression {_short(expression)}") from None

    def visit(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and _is_int(node.value):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise _fail(where, f"unknown name {node.id!r} in {expression!r}")
            if not _is_int(names[node.id]):
                raise _fail(
                    where,
                    f"{node.id!r} in {expression!r} is not an integer but "
                    f"{_short(names[node.id])}",
                )
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise _fail(where, f"{expression!r} divides by zero")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -visit(node.operand)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
        ):
            if len(node.args) < 2 or any(
                isinstance(a, ast.Starred) for a in node.args
            ):
                raise _fail(
                    where,
                    f"{node.func.id}() in {expression!r} needs two or more arguments",
                )
            return _FUNCTIONS[node.func.id](*(visit(a) for a in node.args))
        raise _fail(
            where,
            f"unsupported syntax in {expression!r}: only integers, names, + - * //, "
            "max() and min() are allowed",
        )

    try:
        value = visit(tree)
    except MappingError:
        raise
    except Exception as error:  # noqa: BLE001 - the expression is the user's input
        # A backstop: whatever else a user's expression manages to raise (a stack
        # too deep for visit(), an arithmetic error) is a malformed mapping.
        raise _fail(
            where, f"cannot evaluate {_short(expression)}: {type(error).__name__}: {error}"
        ) from None
    if not _is_int(value):
        raise _fail(where, f"{expression!r} does not give an integer")
    if abs(value) > _MAX_VALUE:
        raise _fail(where, f"{_short(expression)} gives {value:.3e}, beyond int64")
    return value


# --------------------------------------------------------------------------------------
# Parsed mapping.

_TOP_KEYS = {
    "schema",
    "name",
    "model",
    "description",
    "include",
    "source",
    "config",
    "derive",
    "presets",
    "tolerance",
    "blocks",
    "rules",
    "drop",
    "target",
    "target_derive",
}
_RULE_KEYS = {"source", "target", "ops", "for"}
_USE_KEYS = {"use", "with", "for"}
_DROP_KEYS = {"source", "reason", "restore_from", "for"}
_PLACEHOLDER = re.compile(r"\{(_?)([A-Za-z][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Rule:
    """One expanded rule: exactly one source key becomes exactly one target key.

    ``origin`` says where the rule came from, as a message; ``at`` says it as
    ``file:line`` strings: the rule's own line first, then each ``use:`` that
    inserted its block, innermost first (``()`` for a rule made in code).
    """

    source: str
    target: str
    ops: Tuple[Op, ...]
    origin: str
    at: Tuple[str, ...] = field(default=(), compare=False)

    def describe_ops(self) -> str:
        return " -> ".join(op.describe() for op in self.ops) or "copy"


@dataclass(frozen=True)
class Drop:
    """A source key deliberately left out of the model, with the reason."""

    source: str
    reason: str
    restore_from: Optional[str]
    origin: str
    at: Tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class MappingTable:
    """The exact table a mapping expands to for one configuration."""

    rules: Tuple[Rule, ...]
    drops: Tuple[Drop, ...]

    @property
    def by_target(self) -> Dict[str, Rule]:
        return {rule.target: rule for rule in self.rules}



@dataclass(frozen=True)
class ResolvedConfig:
    """A configuration resolved for one checkpoint, and where each value came from."""

    values: Dict[str, Any]
    preset: Optional[str]
    derived: Dict[str, Any]
    overrides: Dict[str, Any]

    def describe(self) -> str:
        size = self.preset or "custom (non-derivable values are the official defaults)"
        return f"size preset: {size}"


@dataclass
class MappingSpec:
    """A parsed, validated mapping file (not yet expanded)."""

    name: str
    model: str
    description: str
    source_overrides: Dict[str, Any]
    config: Dict[str, Any]
    derive: Dict[str, Any]
    presets: Dict[str, Dict[str, Any]]
    tolerance: Dict[str, Any]
    rules: List[Any]
    drops: List[Any]
    blocks: Dict[str, Tuple[Any, _Where]]
    file: str
    sha256: str
    target: Dict[str, Any] = field(default_factory=dict)
    target_derive: Dict[str, Any] = field(default_factory=dict)
    _where: _Where = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def source(self) -> Dict[str, Any]:
        """The official file: ``file``, ``url``, ``layout`` (``params`` or
        ``params_and_state``) and ``params`` (its parameter count).

        For the six models these come from the registry (:mod:`converter.registry`: the
        file name, its layout, and the count of its shipped parameter tree); a
        mapping file's ``source:`` values replace them.
        """
        from converter.registry import MODELS, official_tree

        base: Dict[str, Any] = {}
        info = MODELS.get(self.model)
        if info is not None:
            base = {
                "file": info.official_file,
                "url": info.url,
                "layout": "params_and_state" if info.wrapped else "params",
                "params": official_tree(self.model, "full").num_params(),
            }
        return {**base, **self.source_overrides}

    # -- configuration -------------------------------------------------------------

    def derive_config(self, source_shapes: Mapping[str, Shape]) -> Dict[str, Any]:
        """Reads the configuration values the checkpoint's shapes reveal."""
        derived: Dict[str, Any] = {}
        for key, spec in self.derive.items():
            where = self._where.at(self.derive, key, f"derive.{key}")
            names = {**self.config, **derived}
            derived[key] = _derive_value(spec, source_shapes, names, where)
        return derived

    def derive_from_targets(
        self, target_shapes: Mapping[str, Shape]
    ) -> Dict[str, Any]:
        """Reads the configuration values ``target_derive`` finds in the target tensors'
        shapes (for reading a mapping backwards, from a file in the target layout)."""
        derived: Dict[str, Any] = {}
        for key, spec in self.target_derive.items():
            where = self._where.at(self.target_derive, key, f"target_derive.{key}")
            names = {**self.config, **derived}
            derived[key] = _derive_value(spec, target_shapes, names, where)
        return derived

    @property
    def override_keys(self) -> Tuple[str, ...]:
        """The keys ``--config`` may set: the configuration's, and for perceiver_torch's
        models its training-only fields (dropout, attention_dropout), which no tensor
        depends on: the converted file's config records them for fine-tuning."""
        from perceiver_torch import configs  # see _official_values

        extra = configs.TRAINING_ONLY_FIELDS if self.model in configs.CONFIG_CLASSES else ()
        return tuple(self.config) + tuple(k for k in extra if k not in self.config)

    def resolve_config(
        self,
        source_shapes: Mapping[str, Shape],
        overrides: Optional[Mapping[str, Any]] = None,
    ) -> ResolvedConfig:
        """Official config, then the preset the checkpoint's shapes match, then overrides.

        Values derived from shapes always come from the checkpoint; a user override that
        contradicts one is an error (the conversion could not succeed).
        """
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(
                f"config must be a mapping of config keys to values (a dict), got "
                f"{type(overrides).__name__}"
            )
        derived = self.derive_config(source_shapes)
        overrides = {k: _as_tuple(v) for k, v in (overrides or {}).items()}
        unknown = sorted(set(overrides) - set(self.override_keys))
        if unknown:
            raise ConfigError(
                f"--config: unknown config key(s) {', '.join(unknown)} for "
                f"{self.model} (mapping {self.file}); valid keys: "
                f"{', '.join(self.override_keys)}",
                unknown[0],
            )
        # Type and range first (the Python API's values are not parsed by the CLI):
        # "-1 contradicts the checkpoint" would hide that -1 is no size at all.
        overrides = self._checked_values(overrides)
        for key, value in overrides.items():
            if key in derived and derived[key] != value:
                raise ConfigError(
                    f"--config {key}={_plain(value)} contradicts the checkpoint, whose "
                    f"shapes give {key}={_plain(derived[key])}; drop that override",
                    key,
                )
        candidates = [("official", dict(self.config))] + [
            (name, {**self.config, **values}) for name, values in self.presets.items()
        ]
        preset, base = None, dict(self.config)
        for name, values in candidates:
            # None is a dataclass's "derived from other fields" (language v_channels:
            # d_latents), which constrains no checkpoint value.
            if all(values.get(k) in (None, v) for k, v in derived.items()):
                preset, base = name, values
                break
        values = {**base, **derived, **overrides}
        return ResolvedConfig(values, preset, derived, dict(overrides))

    def unlike_preset(self, resolved: ResolvedConfig) -> Dict[str, Tuple[Any, Any]]:
        """The overrides of ``resolved`` that differ from its preset's values (the
        official ones where no preset matched): ``{key: (value, preset's value)}``.
        None in a preset ("derived from other fields") differs from nothing."""
        base = dict(self.config)
        if resolved.preset not in (None, "official"):
            base.update(self.presets[resolved.preset])
        return {
            key: (value, base[key])
            for key, value in resolved.overrides.items()
            if base.get(key) is not None and _as_tuple(value) != _as_tuple(base[key])
        }

    def _checked_values(self, overrides: Mapping[str, Any]) -> Dict[str, Any]:
        from perceiver_torch import configs  # see _official_values

        try:
            return _checked_config_values(self.model, overrides)
        except configs.ConfigError as error:
            raise ConfigError(f"--config: {error}", error.key) from None

    # -- expansion -------------------------------------------------------------------

    def expand(self, config: Mapping[str, Any]) -> MappingTable:
        """Expands every template for ``config`` into an exact, overlap-free table."""
        budget = _Budget(_MAX_EXPANSION)
        rules: List[Rule] = []
        for index, node in enumerate(self.rules):
            where = self._where.at(node, None, f"rules[{index}]")
            rules.extend(self._expand_rule(node, {}, config, where, (), budget))
        drops: List[Drop] = []
        for index, node in enumerate(self.drops):
            where = self._where.at(node, None, f"drop[{index}]")
            drops.extend(self._expand_drop(node, config, where, budget))
        _check_overlaps(rules, drops)
        return MappingTable(tuple(rules), tuple(drops))

    def _expand_rule(
        self,
        node: Any,
        values: Mapping[str, str],
        config: Mapping[str, Any],
        where: _Where,
        used_at: Tuple[str, ...],
        budget: "_Budget",
    ) -> Iterator[Rule]:
        """The rules of one YAML rule node; ``used_at``: the ``file:line`` of each
        ``use:`` that led here, innermost first."""
        if len(used_at) > 16:
            raise _fail(
                where, "blocks nest more than 16 levels deep (a block uses itself?)"
            )
        for loop_values in _loops(node, values, config, where, budget):
            scope = {**values, **loop_values}
            if "use" in node:
                block_name = node["use"]
                if block_name not in self.blocks:
                    raise _fail(
                        where,
                        f"unknown block {block_name!r}; known blocks: "
                        f"{', '.join(sorted(self.blocks)) or 'none'}",
                    )
                with_values = {
                    k: _substitute(str(v), scope, where)
                    for k, v in (node.get("with") or {}).items()
                }
                inner_scope = {**scope, **with_values}
                block_rules, block_where = self.blocks[block_name]
                for index, inner in enumerate(block_rules):
                    inner_where = block_where.at(
                        inner, None, f"blocks.{block_name}[{index}]"
                    )
                    inner_where = _Where(
                        inner_where.file,
                        inner_where.line,
                        f"{inner_where.path} (used at {where})",
                    )
                    yield from self._expand_rule(
                        inner, inner_scope, config, inner_where,
                        (where.location,) + used_at, budget,
                    )
            else:
                source = _substitute(node["source"], scope, where)
                target = _substitute(node["target"], scope, where)
                ops = tuple(parse_op_at(spec, where) for spec in node.get("ops") or [])
                yield Rule(source, target, ops, str(where), (where.location,) + used_at)

    def _expand_drop(
        self, node: Any, config: Mapping[str, Any], where: _Where, budget: "_Budget"
    ) -> Iterator[Drop]:
        for loop_values in _loops(node, {}, config, where, budget):
            source = _substitute(node["source"], loop_values, where)
            restore = node.get("restore_from")
            if restore is not None:
                restore = _substitute(restore, loop_values, where)
            yield Drop(source, node["reason"], restore, str(where), (where.location,))


def parse_op_at(spec: Any, where: _Where) -> Op:
    try:
        return parse_op(spec)
    except MappingError as error:
        raise _fail(where, str(error)) from None


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_value_text(value: Any) -> str:
    """A config value as ``--config`` takes it: ``16x16`` for a size."""
    if isinstance(value, (tuple, list)):
        return "x".join(str(item) for item in value)
    return str(value)


def override_text(overrides: Mapping[str, Any]) -> str:
    """``--config`` values as the command line takes them: ``image_size=16x16``."""
    return ", ".join(
        f"{key}={config_value_text(value)}" for key, value in overrides.items()
    )


def overrides_at_fault(
    resolved_without: Mapping[str, Any], overrides: Mapping[str, Any]
) -> Dict[str, Any]:
    """The overrides that change a value of the configuration resolved without them
    (all of them if none does): those to blame when a tree or checkpoint fits its
    mapping without the overrides and not with them (an HF import passes all of
    config.json's, most of them the values it converts with anyway)."""
    def key(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    changed = {
        name: value
        for name, value in overrides.items()
        if key(resolved_without.get(name)) != key(value)
    }
    return changed or dict(overrides)


def _substitute(template: str, values: Mapping[str, Any], where: _Where) -> str:
    def replace(match: re.Match) -> str:
        underscore, name = match.groups()
        if name not in values:
            raise _fail(
                where, f"placeholder {match.group(0)} has no value in {template!r}"
            )
        value = values[name]
        if underscore:
            # Haiku numbers repeated modules name, name_1, name_2, ...
            if not isinstance(value, int):
                raise _fail(
                    where, f"{match.group(0)} needs a loop index, got {value!r}"
                )
            return "" if value == 0 else f"_{value}"
        return str(value)

    return _PLACEHOLDER.sub(replace, template)


# How far a mapping may expand: rules, loop iterations included. The bundled mappings
# expand to at most 457 rules (language_perceiver, full size). Without a bound a
# ``for: {i: 1000000000}`` exhausts memory and twelve blocks each ``use:``-ing the next
# ten times (10**12 rules) never finish; a loop's iteration count is known before it
# runs, so a loop that would pass the bound is refused before any of it is built.
_MAX_EXPANSION = 100_000


class _Budget:
    """The expansion steps (loop iterations, across every rule and block) left."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, steps: int, where: _Where) -> None:
        if steps > self.left:
            raise _fail(
                where,
                f"the mapping expands to more than {_MAX_EXPANSION:,} rules and loop "
                "iterations (the bundled ones to a few hundred): a 'for:' count or "
                "the 'use:' nesting multiplies to far too many",
            )
        self.left -= steps


def _loops(
    node: Mapping[str, Any],
    values: Mapping[str, Any],
    config: Mapping[str, Any],
    where: _Where,
    budget: _Budget,
) -> Iterator[Dict[str, Any]]:
    """All assignments of a rule's ``for:`` (one empty assignment without it), their
    number spent from ``budget`` before the first is made.

    ``for: {i: <config key or integer>}`` counts 0..n-1; ``for: {m: [a, b]}`` takes the
    listed values in order.
    """
    loops = node.get("for")
    if not loops:
        budget.spend(1, where)
        yield {}
        return
    names, ranges = [], []
    for var, count in loops.items():
        if isinstance(count, list):
            # A literal list of values, e.g. modality names.
            names.append(var)
            ranges.append(count)
            continue
        if isinstance(count, str):
            count = _substitute(count, values, where)
            if count not in config:
                raise _fail(where, f"for: {var}: unknown config key {count!r}")
            count = config[count]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise _fail(
                where,
                f"for: {var}: the count must be a non-negative integer, got {count!r}",
            )
        names.append(var)
        ranges.append(range(count))
    # len() of a range past sys.maxsize overflows; its stop is the same count.
    counts = (len(r) if isinstance(r, list) else r.stop for r in ranges)
    budget.spend(math.prod(counts), where)
    for combination in itertools.product(*ranges):
        yield dict(zip(names, combination))


def _derive_value(
    spec: Any, shapes: Mapping[str, Shape], names: Mapping[str, Any], where: _Where
) -> Any:
    def shape_of(key: str) -> Shape:
        if key not in shapes:
            raise MappingError(
                f"the checkpoint has no tensor {key!r} (needed to derive "
                f"{where.path.split('.', 1)[-1]}); is it the right model? {where}"
            )
        return shapes[key]

    def dim_of(key: str, dim: int) -> int:
        shape = shape_of(key)
        if not -len(shape) <= dim < len(shape):
            raise ShapeMismatch(
                f"{where}: {key} has shape {list(shape)}, no dimension {dim}"
            )
        return int(shape[dim])

    if "shape" in spec:
        return dim_of(spec["shape"], spec["dim"])
    if "count" in spec:
        count = 0
        while _substitute(spec["count"], {"i": count}, where) in shapes:
            count += 1
        if count == 0:
            shape_of(_substitute(spec["count"], {"i": 0}, where))
        return count
    local = dict(names)
    for alias, (key, dim) in (spec.get("shapes") or {}).items():
        local[alias] = dim_of(key, dim)
    return _evaluate(spec["expr"], local, where)


def _check_overlaps(rules: Sequence[Rule], drops: Sequence[Drop]) -> None:
    claims: Dict[str, str] = {}
    for item in list(rules) + list(drops):
        if item.source in claims:
            raise MappingError(
                f"two rules claim the source {item.source!r}: {claims[item.source]} and "
                f"{item.origin}; make the patterns disjoint"
            )
        claims[item.source] = item.origin
    targets: Dict[str, str] = {}
    for rule in rules:
        if rule.target in targets:
            raise MappingError(
                f"two rules produce the target {rule.target!r}: {targets[rule.target]} and "
                f"{rule.origin}; make the templates disjoint"
            )
        targets[rule.target] = rule.origin


# --------------------------------------------------------------------------------------
# Validation of the parsed YAML.


def _check_keys(node: Any, allowed: set, required: set, where: _Where) -> None:
    if not isinstance(node, dict):
        raise _fail(where, f"expected a mapping, got {type(node).__name__}")
    unknown = sorted(set(node) - allowed, key=str)
    if unknown:
        raise _fail(
            where.at(node, unknown[0], where.path),
            f"unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(allowed))}",
        )
    missing = sorted(required - set(node))
    if missing:
        raise _fail(where, f"missing key(s) {', '.join(missing)}")


def _check_str(node: Any, key: str, where: _Where) -> None:
    if not isinstance(node.get(key), str) or not node[key]:
        raise _fail(
            where.at(node, key, f"{where.path}.{key}"),
            f"{key!r} must be a non-empty string",
        )


def _check_rule(node: Any, where: _Where) -> None:
    if isinstance(node, dict) and "use" in node:
        _check_keys(node, _USE_KEYS, {"use"}, where)
        _check_str(node, "use", where)
        if "with" in node and not isinstance(node["with"], dict):
            raise _fail(
                where.at(node, "with", f"{where.path}.with"), "'with' must be a mapping"
            )
    else:
        _check_keys(node, _RULE_KEYS, {"source", "target"}, where)
        _check_str(node, "source", where)
        _check_str(node, "target", where)
        ops = node.get("ops")
        if ops is not None:
            if not isinstance(ops, list):
                raise _fail(
                    where.at(node, "ops", f"{where.path}.ops"), "'ops' must be a list"
                )
            for index, spec in enumerate(ops):
                parse_op_at(spec, where.at(node, "ops", f"{where.path}.ops[{index}]"))
    _check_for(node, where)


def _check_for(node: Any, where: _Where) -> None:
    loops = node.get("for")
    if loops is None:
        return
    if not isinstance(loops, dict) or not loops:
        raise _fail(
            where.at(node, "for", f"{where.path}.for"),
            "'for' must map index names to counts",
        )
    for var, count in loops.items():
        is_list = (
            isinstance(count, list)
            and count
            and all(
                isinstance(v, (str, int)) and not isinstance(v, bool) for v in count
            )
        )
        if (
            not isinstance(var, str)
            or not (is_list or isinstance(count, (str, int)))
            or isinstance(count, bool)
        ):
            raise _fail(
                where.at(loops, var, f"{where.path}.for.{var}"),
                "each 'for' entry maps an index name to a config key, an integer or a "
                "non-empty list of values",
            )


def _check_derive(node: Any, config: Mapping[str, Any], where: _Where) -> None:
    if not isinstance(node, dict):
        raise _fail(where, "'derive' must be a mapping")
    for key, spec in node.items():
        at = where.at(node, key, f"derive.{key}")
        if key not in config:
            raise _fail(at, f"derives {key!r}, which is not a config key")
        if not isinstance(spec, dict):
            raise _fail(at, "expected {shape, dim}, {count} or {expr, shapes}")
        # The values are used as dict keys, str patterns and ints: check the types
        # here, so a list or a number is a clear message, not a TypeError later.
        if "shape" in spec:
            _check_keys(spec, {"shape", "dim"}, {"shape", "dim"}, at)
            if not isinstance(spec["shape"], str) or not spec["shape"]:
                raise _fail(at, f"'shape' must be a tensor key, got {_short(spec['shape'])}")
            if not _is_int(spec["dim"]):
                raise _fail(at, "'dim' must be an integer")
        elif "count" in spec:
            _check_keys(spec, {"count"}, {"count"}, at)
            if not isinstance(spec["count"], str):
                raise _fail(
                    at, f"'count' must be a key pattern string, got {_short(spec['count'])}"
                )
            if "{_i}" not in spec["count"] and "{i}" not in spec["count"]:
                raise _fail(at, "a count pattern needs the placeholder {_i} or {i}")
        elif "expr" in spec:
            _check_keys(spec, {"expr", "shapes"}, {"expr"}, at)
            if not isinstance(spec["expr"], str) or not spec["expr"].strip():
                raise _fail(
                    at, f"'expr' must be an expression string, got {_short(spec['expr'])}"
                )
            if len(spec["expr"]) > _MAX_EXPRESSION:
                raise _fail(
                    at,
                    f"'expr' has {len(spec['expr']):,} characters; at most "
                    f"{_MAX_EXPRESSION} are allowed",
                )
            shapes = spec.get("shapes")
            if shapes is not None and not isinstance(shapes, dict):
                raise _fail(at, "'shapes' must map names to [tensor key, dimension]")
            for alias, ref in (shapes or {}).items():
                if not (
                    isinstance(alias, str)
                    and isinstance(ref, list)
                    and len(ref) == 2
                    and isinstance(ref[0], str)
                    and _is_int(ref[1])
                ):
                    raise _fail(at, f"shapes.{alias} must be [tensor key, dimension]")
        else:
            raise _fail(at, "expected {shape, dim}, {count} or {expr, shapes}")


def parse_mapping(
    text: str, file: str, include_loader: Optional[Any] = None
) -> MappingSpec:
    """Parses and validates one mapping file's text. Errors name ``file:line: key``.

    The steps: the top level (:func:`_parse_root`), the rule blocks of the included
    files and of the file itself (:func:`_parse_blocks`), the rules and drops, the
    configuration on top of the model's official one (:func:`_parse_config`), the
    derivations (of the source and, for mappings to another library, of the target
    shapes), the presets on top of the tiny one (:func:`_parse_presets`) and the
    tolerance (:func:`_parse_tolerance`).
    """
    root, where = _parse_root(text, file)
    hasher = hashlib.sha256(text.encode("utf-8"))
    blocks = _parse_blocks(root, where, include_loader, hasher)
    rules, drops = _parse_rules(root, where)
    official = _official_values(root["model"])
    config = _parse_config(root, where, official)
    derive = root.get("derive") or {}
    _check_derive(derive, config, where.at(root, "derive", "derive"))
    target_derive = root.get("target_derive") or {}
    _check_derive(
        target_derive, config, where.at(root, "target_derive", "target_derive")
    )
    target = root.get("target") or {}
    if not isinstance(target, dict):
        raise _fail(where.at(root, "target", "target"), "'target' must be a mapping")
    presets = _parse_presets(root, where, config, official)
    return MappingSpec(
        name=root["name"],
        model=root["model"],
        description=str(root.get("description", "")),
        source_overrides=dict(root.get("source") or {}),
        config=config,
        derive=derive,
        presets=presets,
        tolerance=_parse_tolerance(root, where),
        rules=rules,
        drops=drops,
        blocks=blocks,
        file=file,
        sha256=hasher.hexdigest(),
        target=dict(target),
        target_derive=target_derive,
        _where=where,
    )


def _parse_root(text: str, file: str) -> Tuple[_LineDict, _Where]:
    """The YAML document, its top-level keys, schema, name and model."""
    root = _load_yaml(text, file)
    where = _Where(file, 1, "")
    if not isinstance(root, dict):
        raise _fail(where, "a mapping file must be a YAML mapping at the top level")
    _check_keys(root, _TOP_KEYS, {"schema", "name", "model", "rules"}, where)
    if root["schema"] != SCHEMA_VERSION:
        raise _fail(
            where.at(root, "schema", "schema"),
            f"unsupported schema {root['schema']!r}; this converter reads schema {SCHEMA_VERSION}",
        )
    for key in ("name", "model"):
        _check_str(root, key, where)
    return root, where


def _parse_blocks(
    root: Mapping[str, Any],
    where: _Where,
    include_loader: Optional[Any],
    hasher: Any,
) -> Dict[str, Tuple[Any, _Where]]:
    """The named rule blocks of the included files, then of the file itself; the
    included texts are added to ``hasher`` (the mapping's hash covers them)."""
    blocks: Dict[str, Tuple[Any, _Where]] = {}

    def add_blocks(node: Any, block_where: _Where) -> None:
        if not isinstance(node, dict):
            raise _fail(block_where, "'blocks' must map block names to lists of rules")
        for block_name, block_rules in node.items():
            at = block_where.at(node, block_name, f"blocks.{block_name}")
            if block_name in blocks:
                raise _fail(at, f"block {block_name!r} is defined twice")
            if not isinstance(block_rules, list) or not block_rules:
                raise _fail(at, "a block is a non-empty list of rules")
            for index, rule in enumerate(block_rules):
                _check_rule(rule, at.at(rule, None, f"blocks.{block_name}[{index}]"))
            blocks[block_name] = (block_rules, at)

    includes = root.get("include")
    includes = [] if includes is None else includes
    include_at = where.at(root, "include", "include")
    # A list of file names: a bare string would be iterated per character, and a
    # number or null reach the file reader as a TypeError.
    if not isinstance(includes, list):
        raise _fail(
            include_at,
            "'include' must be a list of file names (e.g. [_blocks.yaml]), got "
            f"{type(includes).__name__} {_short(includes)}",
        )
    for index, include in enumerate(includes):
        if not isinstance(include, str) or not include:
            raise _fail(
                where.at(root, "include", f"include[{index}]"),
                f"an included file is a non-empty file name, got {_short(include)}",
            )
        if include_loader is None:
            raise _fail(include_at, "includes are not available here")
        included_text, included_file = include_loader(include)
        hasher.update(included_text.encode("utf-8"))
        included = _load_yaml(included_text, included_file)
        inc_where = _Where(included_file, 1, "")
        _check_keys(
            included,
            {"schema", "description", "blocks"},
            {"schema", "blocks"},
            inc_where,
        )
        add_blocks(included["blocks"], inc_where)
    if "blocks" in root:
        add_blocks(root["blocks"], where.at(root, "blocks", "blocks"))
    return blocks


def _parse_rules(root: Mapping[str, Any], where: _Where) -> Tuple[List[Any], List[Any]]:
    """The checked ``rules`` and ``drop`` lists (templates, not yet expanded)."""
    rules = root["rules"]
    if not isinstance(rules, list) or not rules:
        raise _fail(
            where.at(root, "rules", "rules"), "'rules' must be a non-empty list"
        )
    for index, rule in enumerate(rules):
        _check_rule(rule, where.at(rule, None, f"rules[{index}]"))
    drops = root.get("drop") or []
    if not isinstance(drops, list):
        raise _fail(where.at(root, "drop", "drop"), "'drop' must be a list")
    for index, node in enumerate(drops):
        at = where.at(node, None, f"drop[{index}]")
        _check_keys(node, _DROP_KEYS, {"source", "reason"}, at)
        _check_str(node, "source", at)
        _check_str(node, "reason", at)
        if node.get("restore_from") is not None:
            _check_str(node, "restore_from", at)  # a key pattern, like the source
        _check_for(node, at)
    return rules, drops


@dataclass(frozen=True)
class _OfficialValues:
    """What perceiver_torch.configs says about a model: its official configuration
    (the dataclass defaults, training-only fields left out) and its tiny preset."""

    config: Dict[str, Any]
    tiny: Dict[str, Any]


def _official_values(model: str) -> Optional[_OfficialValues]:
    """The dataclass defaults and ``TINY_CONFIGS`` entry of ``model``; None for a
    model perceiver_torch does not know (a mapping for it spells out its config)."""
    # Imported here: perceiver_torch imports torch, which reading a mapping's rules
    # does not need until a model of one of the six is involved.
    from perceiver_torch import configs

    cls = configs.CONFIG_CLASSES.get(model)
    if cls is None:
        return None

    def architecture(config: Any) -> Dict[str, Any]:
        return {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in configs.TRAINING_ONLY_FIELDS
        }

    official = architecture(cls())
    tiny = architecture(configs.TINY_CONFIGS[model])
    return _OfficialValues(
        official, {k: v for k, v in tiny.items() if v != official[k]}
    )


def _parse_config(
    root: Mapping[str, Any], where: _Where, official: Optional[_OfficialValues]
) -> Dict[str, Any]:
    """The official configuration, with the file's ``config:`` values on top.

    For the six models the base is the perceiver_torch dataclass defaults, so the
    shipped files hold no ``config:`` at all; a file may still set a value (it then
    differs from the dataclass) but not invent a key.
    """
    at = where.at(root, "config", "config")
    values = root.get("config")
    if values is None and official is None:
        raise _fail(
            where,
            f"model {root['model']!r} is not one of perceiver_torch's models, so the "
            "file must give its 'config'",
        )
    values = {} if values is None else values
    if not isinstance(values, dict) or (official is None and not values):
        raise _fail(at, "'config' must be a non-empty mapping")
    if official is None:
        return {k: _as_tuple(v) for k, v in values.items()}
    unknown = sorted(set(values) - set(official.config))
    if unknown:
        raise _fail(
            where.at(values, unknown[0], f"config.{unknown[0]}"),
            f"unknown config key(s) {', '.join(unknown)} for {root['model']}; valid "
            f"keys: {', '.join(official.config)}",
        )
    # Each checked as --config values are (type and range: num_blocks: -3 was
    # accepted where a size preset then replaced it).
    from perceiver_torch import configs  # see _official_values

    try:
        checked = _checked_config_values(
            root["model"], {k: _as_tuple(v) for k, v in values.items()}
        )
    except configs.ConfigError as error:
        raise _fail(where.at(values, error.key, f"config.{error.key}"), str(error)) from None
    return {**official.config, **checked}


def _checked_config_values(model: str, values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` with each key of ``model``'s config dataclass checked (type and
    range) and normalised by ``perceiver_torch.configs.check_value``; other keys (and
    every key of a model perceiver_torch does not know) as given. Raises
    ``perceiver_torch.configs.ConfigError`` naming the key."""
    from perceiver_torch import configs  # see _official_values

    cls = configs.CONFIG_CLASSES.get(model)
    if cls is None:
        return dict(values)
    kinds = configs.field_kinds(cls)
    return {
        key: configs.check_value(cls, key, value) if key in kinds else value
        for key, value in values.items()
    }


def _parse_presets(
    root: Mapping[str, Any],
    where: _Where,
    config: Mapping[str, Any],
    official: Optional[_OfficialValues],
) -> Dict[str, Dict[str, Any]]:
    """The known sizes: ``tiny`` from perceiver_torch's ``TINY_CONFIGS`` (but for the
    keys the file's ``config:`` sets), then the file's ``presets:`` (one of the same
    name replaces it)."""
    presets = root.get("presets") or {}
    if not isinstance(presets, dict):
        raise _fail(
            where.at(root, "presets", "presets"),
            "'presets' must map names to config values",
        )
    for preset, values in presets.items():
        at = where.at(presets, preset, f"presets.{preset}")
        if not isinstance(values, dict):
            raise _fail(at, "a preset maps config keys to values")
        unknown = sorted(set(values) - set(config))
        if unknown:
            raise _fail(at, f"unknown config key(s) {', '.join(unknown)}")
    # The file's own config: values are its model's; the built-in tiny preset fills
    # in only the others (it replaced them: num_blocks: 5 became tiny's 3, silently).
    given = root.get("config") or {}
    base = {} if official is None else {
        "tiny": {k: v for k, v in official.tiny.items() if k not in given}
    }
    return {
        **base,
        **{k: {kk: _as_tuple(vv) for kk, vv in v.items()} for k, v in presets.items()},
    }


def _finite(value: Any) -> bool:
    """Whether a YAML number is finite as the float the checks compare with (an
    integer of 400 digits is not: float() of it overflows)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _parse_tolerance(root: Mapping[str, Any], where: _Where) -> Dict[str, Any]:
    """``tolerance``: positive numbers, ``relative`` and per-output ``fourier_outputs``."""
    tolerance = root.get("tolerance") or {}
    at = where.at(root, "tolerance", "tolerance")
    if not isinstance(tolerance, dict):
        raise _fail(at, "'tolerance' must be a mapping")
    _check_keys(
        tolerance, {"relative", "fourier_outputs", "float16", "bfloat16"}, set(), at
    )
    if not isinstance(tolerance.get("fourier_outputs") or {}, dict):
        raise _fail(
            where.at(tolerance, "fourier_outputs", "tolerance.fourier_outputs"),
            "'fourier_outputs' must map output names to tolerances",
        )
    limits = [("relative", tolerance.get("relative", 1e-5))] + [
        (key, tolerance[key]) for key in ("float16", "bfloat16") if key in tolerance
    ] + [
        (f"fourier_outputs.{k}", v)
        for k, v in (tolerance.get("fourier_outputs") or {}).items()
    ]
    for key, value in limits:
        # Finite too: .nan passes no comparison (every check would then pass or fail
        # silently) and .inf accepts any difference.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not _finite(value)
            or value <= 0
        ):
            raise _fail(
                where.at(tolerance, key.split(".")[0], f"tolerance.{key}"),
                f"must be a positive number (finite), got {_short(value)}",
            )
    return dict(tolerance)


# --------------------------------------------------------------------------------------
# Finding mapping files.


def _package_files() -> Any:
    return importlib.resources.files("converter.mappings")


def available_mappings() -> Tuple[str, ...]:
    """Names of the bundled mappings (``mappings/*.yaml`` without the ``_`` helpers)."""
    names = [
        entry.name[: -len(".yaml")]
        for entry in _package_files().iterdir()
        if entry.name.endswith(".yaml") and not entry.name.startswith("_")
    ]
    return tuple(sorted(names))


def _read_text(path: Any, name: str) -> str:
    """The text of mapping file ``path`` (a Path or a package resource), named ``name``
    in errors. Mapping files are UTF-8: decoding is strict, and a file in another
    encoding (Latin-1, UTF-16) is a MappingError naming the file, not a bare
    UnicodeDecodeError that names no file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MappingError(f"{name}: cannot read the mapping file: {error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise MappingError(
            f"{name}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset "
            f"{error.start}); a mapping file must be saved as UTF-8"
        ) from None
    # Universal newlines, as Path.read_text gave (the mapping's sha256 hashes the text).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _include_reader(
    where: str, directory: Optional[Path] = None, family: str = ""
) -> Callable[[str], Tuple[str, str]]:
    """Reads an included file from ``directory`` (a user's mapping folder), else from
    the bundled mappings (of ``family``: "" or "hf"); ``where`` names the including
    file in the error."""

    def read(include: str) -> Tuple[str, str]:
        if directory is not None and (directory / include).is_file():
            target = directory / include
            return _read_text(target, str(target)), str(target)
        folder = _package_files() / family if family else _package_files()
        bundled = folder / include
        if bundled.is_file():
            prefix = f"mappings/{family}/" if family else "mappings/"
            return _read_text(bundled, f"{prefix}{include}"), f"{prefix}{include}"
        raise MappingError(f"{where}: included file {include!r} not found")

    return read


# The second family: perceiver_torch's Haiku sources <-> HuggingFace transformers keys
# (mappings/hf/<model>.yaml, same schema; read forwards to export, backwards to import).
HF_FAMILY = "hf"


def available_hf_mappings() -> Tuple[str, ...]:
    """Models with a bundled HuggingFace mapping (``mappings/hf/*.yaml``)."""
    folder = _package_files() / HF_FAMILY
    if not folder.is_dir():
        return ()
    names = [
        entry.name[: -len(".yaml")]
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml") and not entry.name.startswith("_")
    ]
    return tuple(sorted(names))


def load_hf_mapping(model: str) -> MappingSpec:
    """The bundled HuggingFace mapping of ``model``: Haiku source keys -> transformers'
    state-dict keys (in the tensor conventions of HuggingFace's own converter)."""
    if model not in available_hf_mappings():
        raise MappingError(
            f"no HuggingFace mapping for {model!r}; available: "
            f"{', '.join(available_hf_mappings()) or 'none (package data missing?)'}"
        )
    where = f"mappings/{HF_FAMILY}/{model}.yaml"
    text = (_package_files() / HF_FAMILY / f"{model}.yaml").read_text(encoding="utf-8")
    return parse_mapping(text, where, _include_reader(where, family=HF_FAMILY))


def load_mapping(name_or_path: str | Path) -> MappingSpec:
    """Loads a bundled mapping by model name, or a mapping file by path."""
    path = Path(name_or_path)
    # A file, not any existing path: a folder named like a model must not shadow it.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise MappingError(f"{path}: no such mapping file")
        text = _read_text(path, str(path))
        return parse_mapping(text, str(path), _include_reader(str(path), path.parent))
    name = str(name_or_path)
    if name not in available_mappings():
        raise MappingError(
            f"no mapping named {name!r}; available: {', '.join(available_mappings())}"
        )
    where = f"mappings/{name}.yaml"
    text = (_package_files() / f"{name}.yaml").read_text(encoding="utf-8")
    return parse_mapping(text, where, _include_reader(where))


# --------------------------------------------------------------------------------------
# Applying a table: planning (shapes only), then copying.


@dataclass(frozen=True)
class ShapeProblem:
    """A rule whose tensor does not fit. ``kind``: "result" when the ops ran and their
    result differs from the model's tensor (``got`` is that result: when it equals
    ``expected`` only the dtype differs), "op" when an op could not apply at all
    (``got`` is then the shape the op was given, ``detail`` the op's own message)."""

    source: str
    target: str
    got: Shape
    expected: Shape
    detail: str
    kind: str = "result"
    # The rule's own dtype op, when it has one: "file:line" of the rule. A dtype that
    # comes out wrong through it is the mapping's to fix, or the array's to match.
    cast_at: str = ""
    # The dtype that op takes, when the checkpoint's array is not in it: then the
    # array is the one to fix (the op is right for the official file).
    cast_from: str = ""

    @property
    def dtype_only(self) -> bool:
        """The ops ran and gave the model's shape: only the dtype differs. Not when an
        op failed: ``got`` is then the op's input shape, which may equal the model's
        (squeeze on [64] for a [64] tensor) without the dtype being at fault."""
        return self.kind == "result" and tuple(self.got) == tuple(self.expected)


@dataclass
class MappingReport:
    """Everything a mapping run found, collected before any data is copied."""

    mapping: str
    direction: str
    used: int = 0
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    missing_sources: List[Tuple[str, str]] = field(default_factory=list)
    unexpected_sources: List[str] = field(default_factory=list)
    missing_targets: List[str] = field(default_factory=list)
    unexpected_targets: List[Tuple[str, str]] = field(default_factory=list)
    mismatches: List[ShapeProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing_sources
            or self.unexpected_sources
            or self.missing_targets
            or self.unexpected_targets
            or self.mismatches
        )

    def problems(self) -> List[str]:
        lines: List[str] = []
        for key, origin in self.missing_sources:
            lines.append(f"missing in the checkpoint: {key} (wanted by {origin})")
        for key in self.unexpected_sources:
            lines.append(
                f"unexpected in the checkpoint (no rule uses or drops it): {key}"
            )
        for key in self.missing_targets:
            lines.append(f"model tensor no rule produces: {key}")
        for key, origin in self.unexpected_targets:
            lines.append(
                f"rule produces a tensor the model does not have: {key} ({origin})"
            )
        for problem in self.mismatches:
            # Only the dtype is wrong: say so, with the fix; where an op failed, its
            # own message says what is wrong.
            kind = "dtype mismatch" if problem.dtype_only else "shape mismatch"
            want = problem.detail.rsplit(" ", 1)[-1]  # "... model expects [..] float32"
            fix = ""
            if kind == "dtype mismatch" and problem.cast_from:
                fix = (
                    f"; the rule's dtype op ({problem.cast_at}) takes "
                    f"{problem.cast_from}: store the array as {problem.cast_from} "
                    f"(numpy: array.astype(np.{problem.cast_from})) and save the "
                    "checkpoint again"
                )
            elif kind == "dtype mismatch" and problem.cast_at:
                fix = (
                    f"; the rule's dtype op ({problem.cast_at}) must turn the array's "
                    f"dtype into {want}: correct its 'from'/'to'"
                )
            elif kind == "dtype mismatch":
                fix = (
                    f"; store the array as {want} (numpy: array.astype(np.{want})) and "
                    "save the checkpoint again"
                )
            lines.append(
                f"{kind}: {problem.source} -> {problem.target}: {problem.detail}{fix}"
            )
        return lines

    def raise_for_problems(self, hint: str = "") -> None:
        if self.ok:
            return
        problems = self.problems()
        shown = problems[:40]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        message = (
            f"mapping {self.mapping!r} ({self.direction}) does not fit:\n  "
            + "\n  ".join(shown)
        )
        if hint:
            message += f"\n{hint}"
        error_type = (
            ShapeMismatch
            if self.mismatches and len(problems) == len(self.mismatches)
            else MappingError
        )
        raise error_type(message)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "mapping": self.mapping,
            "direction": self.direction,
            "used": self.used,
            "dropped": [{"source": s, "reason": r} for s, r in self.dropped],
            "problems": self.problems(),
        }


TensorInfo = Tuple[Shape, str]  # shape, dtype name


def plan_forward(
    table: MappingTable,
    sources: Mapping[str, TensorInfo],
    targets: Mapping[str, TensorInfo],
    mapping: str = "",
) -> MappingReport:
    """Checks a Haiku -> PyTorch conversion before copying anything.

    ``sources``: every tensor of the checkpoint; ``targets``: every tensor of the model's
    state dict. Every source must be used exactly once or dropped, every target produced
    exactly once, every shape and dtype must match after the ops.
    """
    report = MappingReport(mapping, "haiku -> torch")
    claimed = set()
    for rule in table.rules:
        claimed.add(rule.source)
        if rule.source not in sources:
            report.missing_sources.append((rule.source, rule.origin))
        if rule.target not in targets:
            report.unexpected_targets.append((rule.target, rule.origin))
        if rule.source not in sources or rule.target not in targets:
            continue
        shape, dtype = sources[rule.source]
        expected_shape, expected_dtype = targets[rule.target]
        try:
            got = rule_shape(rule, shape)
        except MappingError as error:
            report.mismatches.append(
                ShapeProblem(
                    rule.source,
                    rule.target,
                    tuple(shape),
                    tuple(expected_shape),
                    str(error),
                    kind="op",
                )
            )
            continue
        out_dtype = _dtype_after(dtype, rule.ops)
        if tuple(got) != tuple(expected_shape) or out_dtype != expected_dtype:
            report.mismatches.append(
                ShapeProblem(
                    rule.source,
                    rule.target,
                    tuple(got),
                    tuple(expected_shape),
                    f"checkpoint {list(shape)} {dtype} becomes {list(got)} {out_dtype} after "
                    f"[{rule.describe_ops()}], model expects {list(expected_shape)} {expected_dtype}",
                    cast_at=(
                        (rule.at[0] if rule.at else rule.origin)
                        if any(op.name == "dtype" for op in rule.ops)
                        else ""
                    ),
                    cast_from=_array_dtype_to_store(dtype, rule.ops, expected_dtype),
                )
            )
            continue
        report.used += 1
    for drop in table.drops:
        claimed.add(drop.source)
        if drop.source in sources:
            report.dropped.append((drop.source, drop.reason))
        else:
            report.missing_sources.append((drop.source, drop.origin))
    report.unexpected_sources = sorted(set(sources) - claimed)
    produced = {rule.target for rule in table.rules}
    report.missing_targets = sorted(set(targets) - produced)
    return report


def plan_inverse(
    table: MappingTable,
    targets: Mapping[str, TensorInfo],
    mapping: str = "",
) -> MappingReport:
    """Checks a PyTorch -> Haiku export: every model tensor is known to the mapping."""
    report = MappingReport(mapping, "torch -> haiku")
    by_target = table.by_target
    for key, (shape, _dtype) in targets.items():
        rule = by_target.get(key)
        if rule is None:
            report.unexpected_sources.append(key)
            continue
        try:
            rule_shape(rule, shape, inverse=True)
        except MappingError as error:
            report.mismatches.append(
                ShapeProblem(key, rule.source, tuple(shape), (), str(error), kind="op")
            )
            continue
        report.used += 1
    report.missing_targets = sorted(set(by_target) - set(targets))
    return report


def rule_shape(rule: Rule, shape: Sequence[int], *, inverse: bool = False) -> Shape:
    """The shape ``rule``'s ops turn ``shape`` into (or back from, ``inverse``).

    An op that cannot apply raises MappingError (ShapeMismatch for a shape that does
    not fit). The ops' arguments are the user's data: anything else they raise is
    made a MappingError naming the rule's file:line, never an unexpected crash.
    """
    try:
        if inverse:
            return ops_inverse_shape(tuple(shape), rule.ops)
        return ops_shape(tuple(shape), rule.ops)
    except MappingError:
        raise
    except Exception as error:  # noqa: BLE001 - see the docstring
        raise MappingError(
            f"{rule.origin}: [{rule.describe_ops()}] cannot apply to shape "
            f"{list(shape)}: {type(error).__name__}: {error}"
        ) from None


def _apply_rule(
    rule: Rule, array: np.ndarray, *, inverse: bool = False, contiguous: bool = True
) -> np.ndarray:
    """``rule``'s ops (or their inverses) on ``array``; like :func:`rule_shape`, an
    error of an op's arguments is a MappingError naming the rule. A MemoryError is
    not wrapped: copying real data can run out of memory without any mapping fault."""
    try:
        if inverse:
            return invert_ops(array, rule.ops, contiguous=contiguous)
        return apply_ops(array, rule.ops, contiguous=contiguous)
    except MappingError:
        raise
    except (ArithmeticError, LookupError, TypeError, ValueError) as error:
        raise MappingError(
            f"{rule.origin}: [{rule.describe_ops()}] cannot apply to "
            f"{'the model tensor' if inverse else 'the checkpoint array'} of shape "
            f"{list(array.shape)}: {type(error).__name__}: {error}"
        ) from None


def _array_dtype_to_store(dtype: str, ops: Sequence[Op], expected: str) -> str:
    """Where an array of ``dtype`` does not fit the ``from`` of the rule's first
    dtype op, and an array in that ``from`` dtype would come out as the model's
    ``expected`` dtype: that dtype (the array is at fault, the op is right); else ""
    (the op is at fault, or none refuses the array)."""
    for op in ops:
        if op.name == "dtype":
            wanted = str(op.args["from"])
            if dtype != wanted:
                return wanted if _dtype_after(wanted, ops) == expected else ""
            dtype = op.args["to"]
    return ""


def _dtype_after(dtype: str, ops: Sequence[Op]) -> str:
    for op in ops:
        if op.name == "dtype":
            if dtype != op.args["from"]:
                return f"{dtype} (dtype op expects {op.args['from']})"
            dtype = op.args["to"]
    return dtype


def convert_arrays(
    table: MappingTable, sources: Mapping[str, np.ndarray], *, contiguous: bool = True
) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields ``(target key, array)`` in table order; plan first with :func:`plan_forward`.

    ``contiguous=False`` yields strided views where an op transposes (no copy yet).
    """
    for rule in table.rules:
        yield rule.target, _apply_rule(rule, sources[rule.source], contiguous=contiguous)


def invert_arrays(
    table: MappingTable,
    targets: Mapping[str, np.ndarray],
    dropped: Optional[Mapping[str, np.ndarray]] = None,
) -> Dict[str, np.ndarray]:
    """Maps model tensors back to Haiku source keys (the exact inverse of every op).

    Dropped tensors come from ``dropped`` (kept from the original conversion) or, when
    absent there, from the tensor named by the drop's ``restore_from``.
    """
    out: Dict[str, np.ndarray] = {}
    for rule in table.rules:
        out[rule.source] = _apply_rule(rule, targets[rule.target], inverse=True)
    for drop in table.drops:
        if dropped is not None and drop.source in dropped:
            out[drop.source] = dropped[drop.source]
        elif drop.restore_from is not None and drop.restore_from in out:
            out[drop.source] = out[drop.restore_from].copy()
        else:
            raise MappingError(
                f"cannot restore the dropped tensor {drop.source!r} ({drop.reason}): the "
                f"converted file does not carry it and the mapping gives no restore_from "
                f"({drop.origin})"
            )
    return out


# --------------------------------------------------------------------------------------
# Flat keys of a Haiku tree.

STATE_PREFIX = "state:"


def flatten_tree(
    params: Mapping[str, Mapping[str, Any]],
    state: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Dict[str, Any]:
    """``{module: {name: value}}`` (and state) -> ``{"module/name": value, "state:module/name": value}``."""
    flat: Dict[str, Any] = {}
    for prefix, tree in (("", params), (STATE_PREFIX, state or {})):
        for module, entries in tree.items():
            for name, value in entries.items():
                flat[f"{prefix}{module}/{name}"] = value
    return flat


def unflatten_tree(
    flat: Mapping[str, Any],
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """The inverse of :func:`flatten_tree`: returns ``(params, state)``."""
    params: Dict[str, Dict[str, Any]] = {}
    state: Dict[str, Dict[str, Any]] = {}
    for key, value in flat.items():
        tree = params
        if key.startswith(STATE_PREFIX):
            tree, key = state, key[len(STATE_PREFIX) :]
        module, _, name = key.rpartition("/")
        tree.setdefault(module, {})[name] = value
    return params, state
