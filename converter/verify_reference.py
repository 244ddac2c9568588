"""``verify CONVERTED --reference ORIGINAL``: check a file someone else converted.

Two steps: (1) tensor equality through the mapping: ORIGINAL (the official pickle)
is converted in memory and every tensor of CONVERTED must equal its counterpart
(bit for bit at float32; after the same rounding for a float16/bfloat16 file, and for
a float32 file whose values went through one: a HuggingFace export of such a file,
or its import, records the dtype in ``hf_source.stored_dtypes``);
(2) forward parity: CONVERTED's own model (``perceiver_torch.load``) against the JAX
reference run on ORIGINAL, as ``verify`` does for a conversion. CONVERTED may also be
a HuggingFace checkpoint; it is then mapped back through ``mappings/hf/`` first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from converter.errors import MappingError
from converter.mapping import config_value_text
from converter.progress import Progress, quiet


@dataclass
class TensorCheck:
    """The outcome of step (1)."""

    compared: int = 0
    equal: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    different: List[Dict[str, Any]] = field(default_factory=list)
    # The dtype the original's tensors were rounded to before the comparison, and
    # what recorded it (None: compared as they are).
    rounded_to: Optional[str] = None
    rounded_because: Optional[str] = None
    # Settings the shapes do not fix (heads, flow_scale, image_size where no shape
    # holds it) that CONVERTED records unlike the official model (or the size preset
    # ORIGINAL's shapes match): {key: (CONVERTED's value, the official one)}. The JAX
    # reference runs ORIGINAL with CONVERTED's values, so parity alone cannot show
    # them; they are said, not failed (a fine-tuned variant may differ on purpose).
    unofficial_settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not (self.missing or self.unexpected or self.different)

    def as_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed, "compared": self.compared, "equal": self.equal,
                "missing": self.missing, "unexpected": self.unexpected,
                "different": self.different[:20], "rounded_to": self.rounded_to,
                "unofficial_settings": {
                    key: {"converted": ours, "official": theirs}
                    for key, (ours, theirs) in self.unofficial_settings.items()
                }}

    def format(self) -> str:
        lines = [f"tensors through the mapping: {self.equal} of {self.compared} equal"]
        if self.rounded_to is not None:
            lines[0] += (f" to the original rounded to {self.rounded_to} "
                         f"({self.rounded_because})")
        lines += [f"  missing in the converted file: {k}" for k in self.missing[:10]]
        lines += [f"  not in the official model: {k}" for k in self.unexpected[:10]]
        lines += [_format_difference(d) for d in self.different[:10]]
        if self.unofficial_settings:
            lines.append(
                "  settings no shape holds, not the official model's (the JAX reference "
                "ran with them too, so parity cannot show them): " + ", ".join(
                    f"{key}={config_value_text(ours)} (official: {config_value_text(theirs)})"
                    for key, (ours, theirs) in sorted(self.unofficial_settings.items())
                )
            )
        if self.shapes_differ:
            lines.append("  the shapes differ: CONVERTED and ORIGINAL are this model at other "
                         "sizes; give the official file CONVERTED was made from")
        return "\n".join(lines)

    @property
    def shapes_differ(self) -> bool:
        return any("shape" in d for d in self.different)


def _format_difference(difference: Dict[str, Any]) -> str:
    if "shape" in difference:
        return (f"  differs: {difference['key']} has shape {tuple(difference['shape'])}, "
                f"the official file's {tuple(difference['expected_shape'])}")
    return f"  differs: {difference['key']} (max |diff| {difference['max_abs_diff']:.3e})"


def compare_tensors(
    expected: Dict[str, torch.Tensor],
    got: Dict[str, torch.Tensor],
    rounded_to: Optional[str] = None,
) -> TensorCheck:
    """``rounded_to``: the float16/bfloat16 the values of float32 tensors in ``got``
    went through (each must then equal the original rounded to it, bit for bit)."""
    check = TensorCheck()
    check.missing = sorted(set(expected) - set(got))
    check.unexpected = sorted(set(got) - set(expected))
    for key in sorted(set(expected) & set(got)):
        check.compared += 1
        want, have = expected[key], got[key]
        if have.is_floating_point() and have.dtype != want.dtype:
            want = want.to(have.dtype)  # the same rounding the converter applies
            check.rounded_to = str(have.dtype).replace("torch.", "")
        elif rounded_to is not None and have.is_floating_point():
            # float32 holding rounded values: round the original the same way.
            want = want.to(getattr(torch, rounded_to)).to(have.dtype)
            check.rounded_to = rounded_to
        if want.shape != have.shape:
            check.different.append({"key": key, "max_abs_diff": None,
                                    "expected_shape": list(want.shape),
                                    "shape": list(have.shape)})
        elif want.dtype == have.dtype and torch.equal(want, have):
            check.equal += 1
        else:
            diff = float((want.double() - have.double()).abs().max())
            check.different.append({"key": key, "max_abs_diff": diff})
    return check


class _WithModel:
    """A PreparedConversion whose model is the one from CONVERTED (for verify_prepared)."""

    def __init__(self, prepared: Any, model: torch.nn.Module) -> None:
        self._prepared, self._model = prepared, model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._prepared, name)

    def build_model(self, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
        # verify_prepared asks for the weights rounded to ``dtype``; the converted
        # file's model already holds the weights as they were stored.
        return self._model


def verify_against_reference(
    converted: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    seed: int = 0,
    batch: int = 1,
    progress: Progress = quiet,
):
    """Returns ``(TensorCheck, ParityReport)``; see the module docstring."""
    import perceiver_torch
    from converter.conversion import prepare
    from converter.hf_import import is_hf_input, prepare_hf
    from converter.converted_files import read_converted
    from converter.verify import require_jax, verify_prepared

    require_jax()
    if is_hf_input(converted):
        theirs, _, provenance = prepare_hf(converted, progress=progress)
        model_name, got = theirs.model, theirs.state_dict()
        config = dict(theirs.config.overrides)
        stored = provenance.get("stored_dtypes") or []
    else:
        got, metadata = read_converted(Path(converted))
        model_name = metadata["model"]
        import json

        from converter.exporter import hf_source_list

        config = json.loads(metadata["config"])
        stored = hf_source_list(metadata, "stored_dtypes")
    rounded_to = _recorded_rounding(stored)
    progress(f"converting {reference} in memory")
    try:
        official = prepare(reference, model_name, config=_overridable(model_name, config))
    except MappingError as error:
        raise MappingError(
            f"{reference} is not the original of {converted} ({model_name}): {error}"
        ) from None
    check = compare_tensors(official.state_dict(), got, rounded_to)
    check.unofficial_settings = official.mapping.unlike_preset(official.config)
    if check.rounded_to is not None:
        check.rounded_because = (
            "the file's dtype" if rounded_to is None
            else "as hf_source.stored_dtypes records"
        )
    if check.missing or check.unexpected or check.shapes_differ:
        return check, None  # no model to run
    # Float16/bfloat16 values (stored so, or recorded as gone through) are checked as
    # verify checks them: in a float32 model, against the tolerance for that dtype.
    dtype = rounded_to or "float32"
    if is_hf_input(converted):
        model = theirs.build_model()
    else:
        dtype = rounded_to or metadata.get("dtype", "float32")
        model = perceiver_torch.build(model_name, official.config_object())
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in got.items()},
            strict=True,
        )
        model.eval()
    progress("forward parity of the converted model against the JAX reference")
    report = verify_prepared(_WithModel(official, model), seed=seed, batch=batch,
                             dtype=dtype, progress=progress)
    return check, report


def _recorded_rounding(stored: List[str]) -> Optional[str]:
    """The one float16/bfloat16 that ``hf_source.stored_dtypes`` records (float64
    rounds nothing of a float32 original). None if none; several (an import of an
    export of a file stored in the other) give no single rounding to compare with,
    and the comparison is then made as it is, so it fails rather than guesses."""
    reduced = sorted(set(stored) & {"float16", "bfloat16"})
    return reduced[0] if len(reduced) == 1 else None


def _overridable(model: str, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The converted file's config values the original's shapes cannot reveal."""
    from converter.mapping import load_mapping

    spec = load_mapping(model)
    derived = set(spec.derive)
    out = {k: v for k, v in config.items() if k in spec.config and k not in derived}
    return out or None
