"""The expanded table of a mapping: where every PyTorch key comes from.

A mapping file (``mappings/<model>.yaml``) is written with templates and nested
``use:`` blocks; :func:`describe_mapping` expands it for one size of its model (the
official or the tiny parameter tree shipped in ``converter/data/trees``) and lists,
rule by rule, the Haiku source key and shape, the ops, the PyTorch target key and
shape, and the ``file:line`` of the rule (then of each ``use:`` that inserted it), plus
the dropped source keys with their reasons. ``perceiver-convert mapping NAME`` prints
it (:func:`format_table`) or its JSON document (:meth:`MappingDescription.as_dict`).

No checkpoint is read: the shapes are those of the shipped tree, and the model's
tensors come from a model built on the meta device (no memory for weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from converter.errors import MappingError
from converter.mapping import (
    MappingSpec,
    ResolvedConfig,
    flatten_tree,
    load_mapping,
    override_text,
    overrides_at_fault,
    plan_forward,
    rule_shape,
)

Shape = Tuple[int, ...]

__all__ = [
    "DroppedRow",
    "MappingDescription",
    "OverrideError",
    "RuleRow",
    "describe_mapping",
    "format_table",
]


class OverrideError(MappingError):
    """A ``--config`` override the mapping cannot take (unknown key, or a value the
    tree's shapes contradict): a usage error, not a bad mapping."""


@dataclass(frozen=True)
class RuleRow:
    """One expanded rule: ``source`` [source_shape] --ops--> ``target`` [target_shape].

    ``at``: the rule's ``file:line``, then the ``file:line`` of each ``use:`` that
    inserted its block, innermost first.
    """

    source: str
    source_shape: Shape
    ops: str
    target: str
    target_shape: Shape
    at: Tuple[str, ...]


@dataclass(frozen=True)
class DroppedRow:
    """A source key the model does not use, why, and what export restores it from."""

    source: str
    source_shape: Shape
    reason: str
    restore_from: Optional[str]
    at: Tuple[str, ...]


@dataclass
class MappingDescription:
    """The expanded table of one mapping for one size (see the module docstring)."""

    mapping: str
    file: str
    sha256: str
    model: str
    size: str
    config: ResolvedConfig
    rules: List[RuleRow] = field(default_factory=list)
    dropped: List[DroppedRow] = field(default_factory=list)
    # Anything the table does not account for (a mapping that does not fit its tree).
    problems: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        """The JSON document of ``perceiver-convert mapping --json``."""
        return {
            "mapping": self.mapping,
            "file": self.file,
            "mapping_sha256": self.sha256,
            "model": self.model,
            "size": self.size,
            "size_preset": self.config.preset or "custom",
            "config": {k: _plain(v) for k, v in self.config.values.items()},
            "derived": sorted(self.config.derived),
            "overrides": {k: _plain(v) for k, v in self.config.overrides.items()},
            "rules": [
                {
                    "source": r.source,
                    "source_shape": list(r.source_shape),
                    "ops": r.ops,
                    "target": r.target,
                    "target_shape": list(r.target_shape),
                    "at": list(r.at),
                }
                for r in self.rules
            ],
            "dropped": [
                {
                    "source": d.source,
                    "source_shape": list(d.source_shape),
                    "reason": d.reason,
                    "restore_from": d.restore_from,
                    "at": list(d.at),
                }
                for d in self.dropped
            ],
            "problems": list(self.problems),
        }


def describe_mapping(
    name_or_path: str | Path,
    size: str = "tiny",
    overrides: Optional[Mapping[str, Any]] = None,
) -> MappingDescription:
    """Expands mapping ``name_or_path`` (a bundled name or a YAML file) for the
    ``size`` ("tiny" or "full") parameter tree of its model.

    Raises:
        MappingError: the file is missing or malformed, or its model is not one of the
            six (there is no tree to expand it for).
        OverrideError: an override names an unknown key or contradicts the tree.
    """
    from converter.registry import MODEL_NAMES, official_tree

    spec = load_mapping(name_or_path)
    if spec.model not in MODEL_NAMES:
        raise MappingError(
            f"{spec.file}: maps model {spec.model!r}, which has no shipped parameter "
            f"tree; the table is available for {', '.join(MODEL_NAMES)}"
        )
    tree = official_tree(spec.model, size)
    sources = {
        key: (tuple(shape), dtype)
        for key, (shape, dtype) in flatten_tree(tree.params, tree.state).items()
    }
    resolved = _resolve(spec, {k: v[0] for k, v in sources.items()}, overrides)
    targets = _model_targets(spec, resolved)
    table = spec.expand(resolved.values)
    report = plan_forward(table, sources, targets, spec.name)
    if report.problems() and overrides:
        _refuse_overrides_that_break(spec, sources, overrides, report.problems()[0])

    description = MappingDescription(
        spec.name, spec.file, spec.sha256, spec.model, size, resolved,
        problems=report.problems(),
    )
    for rule in table.rules:
        shape = sources.get(rule.source, ((), ""))[0]
        target_shape = targets.get(rule.target, ((), ""))[0]
        if rule.source in sources and rule.target not in targets:
            try:
                # rule_shape: any error of the ops' arguments is a MappingError.
                target_shape = tuple(rule_shape(rule, shape))
            except MappingError:
                target_shape = ()
        description.rules.append(
            RuleRow(
                rule.source, shape, rule.describe_ops(), rule.target, target_shape,
                rule.at,
            )
        )
    for drop in table.drops:
        description.dropped.append(
            DroppedRow(
                drop.source,
                sources.get(drop.source, ((), ""))[0],
                drop.reason,
                drop.restore_from,
                drop.at,
            )
        )
    return description


def _resolve(
    spec: MappingSpec,
    shapes: Mapping[str, Shape],
    overrides: Optional[Mapping[str, Any]],
) -> ResolvedConfig:
    """The mapping's configuration for the tree; bad overrides are usage errors."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(spec.override_keys))
    if unknown:
        raise OverrideError(
            f"unknown config key(s) {', '.join(unknown)} for {spec.model}; valid keys: "
            f"{', '.join(spec.override_keys)}"
        )
    derived = spec.derive_config(shapes)
    for key, value in overrides.items():
        value = tuple(value) if isinstance(value, list) else value
        if key in derived and derived[key] != value:
            raise OverrideError(
                f"--config {key}={_plain(value)} contradicts the {spec.model} tree, whose "
                f"shapes give {key}={_plain(derived[key])}; drop that override"
            )
    return spec.resolve_config(shapes, overrides)


def _refuse_overrides_that_break(
    spec: MappingSpec,
    sources: Mapping[str, Tuple[Shape, str]],
    overrides: Mapping[str, Any],
    problem: str,
) -> None:
    """An OverrideError (exit 2) when the tree fits the mapping without the overrides
    but not with them: a value no single shape gives (imagenet_learned's image_size:
    the tree holds only H*W) contradicts the tree, as ``convert`` says of a checkpoint;
    a mapping that does not fit its tree either way keeps its problems (exit 3)."""
    try:
        plain = _resolve(spec, {k: v[0] for k, v in sources.items()}, None)
        fits = not plan_forward(
            spec.expand(plain.values), sources, _model_targets(spec, plain), spec.name
        ).problems()
    except (MappingError, OverrideError):
        fits = False
    if fits:
        blamed = overrides_at_fault(plain.values, overrides)
        raise OverrideError(
            f"--config {override_text(blamed)} contradicts the {spec.model} tree, which "
            f"the mapping expands without it ({problem}); drop or correct that override"
        )


def _model_targets(
    spec: MappingSpec, resolved: ResolvedConfig
) -> Dict[str, Tuple[Shape, str]]:
    """The state-dict keys, shapes and dtypes of the model the configuration builds."""
    from converter.conversion import model_targets
    from perceiver_torch.configs import config_from_dict

    try:
        config = config_from_dict(spec.model, resolved.values)
        return model_targets(spec.model, config)
    except (TypeError, ValueError) as error:
        # A --config value perceiver_torch cannot build (a wrong type or size).
        raise OverrideError(f"invalid configuration for {spec.model}: {error}") from None


def format_table(description: MappingDescription) -> str:
    """The human table: a header, one line per rule, the dropped keys, any problems."""
    d = description
    lines = [
        f"mapping {d.mapping} ({d.file}, sha256 {d.sha256[:12]}) for {d.model}, "
        f"{d.size} tree, size preset: {d.config.preset or 'custom'}",
        "config: "
        + ", ".join(
            f"{k}={_plain(v)}{'*' if k in d.config.derived else ''}"
            for k, v in d.config.values.items()
        ),
        "  (* read from the tree's shapes)",
        "",
    ]
    header = ("source (Haiku)", "shape", "ops", "target (PyTorch)", "shape", "from")
    cells = [
        (
            r.source,
            _shape(r.source_shape),
            r.ops,
            r.target,
            _shape(r.target_shape),
            _chain(r.at),
        )
        for r in d.rules
    ]
    widths = [
        max(len(row[i]) for row in [header] + cells) for i in range(len(header) - 1)
    ]
    for row in [header] + cells:
        lines.append(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1]))
            + "  "
            + row[-1]
        )
    lines.append(f"{len(d.rules)} rules")
    if d.dropped:
        lines.append("")
        lines.append(f"dropped ({len(d.dropped)}):")
        for drop in d.dropped:
            restore = f"; export restores it from {drop.restore_from}" if drop.restore_from else ""
            lines.append(
                f"  {drop.source} {_shape(drop.source_shape)}: {drop.reason}{restore} "
                f"({_chain(drop.at)})"
            )
    if d.problems:
        lines.append("")
        lines.append(f"problems ({len(d.problems)}):")
        lines.extend(f"  {problem}" for problem in d.problems)
    return "\n".join(lines)


def _chain(at: Tuple[str, ...]) -> str:
    """``file:line`` of the rule, then ``< file:line`` of the outermost ``use:``."""
    if not at:
        return "-"
    return at[0] if len(at) == 1 else f"{at[0]} < {at[-1]}"


def _shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
