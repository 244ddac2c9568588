"""Converted perceiver_torch checkpoints back to the official Haiku file layout.

Every mapping op has an exact inverse, and tensors the forward conversion dropped
(BatchNorm EMA accumulators) travel in the converted file's metadata, so exporting a
float32 conversion gives back the original arrays bit for bit.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from converter.conversion import decode_dropped, tensor_specs
from converter.atomic import check_output_path, check_outputs
from converter.errors import CheckpointError, MappingError, nonfinite_message
from converter.mapping import (
    available_mappings,
    invert_arrays,
    load_mapping,
    override_text,
    plan_inverse,
    unflatten_tree,
)
from converter.converted_files import read_converted
from converter.haiku_writer import check_pickle_suffix, save_haiku_checkpoint


class PrecisionWarning(UserWarning):
    """Exported float16/bfloat16 weights cannot equal the original float32 ones
    (the CLI prints it once, as a note, instead)."""


@dataclass
class ExportResult:
    model: str
    output: Path
    tensors: int
    exact: bool
    notes: list

    def as_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "output": str(self.output),
            "tensors": self.tensors,
            "exact": self.exact,
            "notes": self.notes,
        }


def stored_low_precision(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The float16/bfloat16 dtypes of a converted file's tensors (e.g. "bfloat16"),
    or None where it stores float32."""
    found = sorted(
        {
            str(t.dtype).replace("torch.", "")
            for t in state_dict.values()
            if t.dtype in (torch.float16, torch.bfloat16)
        }
    )
    return ", ".join(found) or None


def load_float32(path: str | os.PathLike) -> torch.nn.Module:
    """The perceiver_torch model of converted file ``path`` computing in float32, in
    eval mode: what the exports' checks compare against. Every export writes float32
    (the stored float16/bfloat16 values, exactly), so comparing it with the model in
    the file's own dtype would measure that dtype's rounding instead of the export."""
    import perceiver_torch

    return perceiver_torch.load(path, dtype=torch.float32).eval()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.detach().contiguous().numpy()  # an nn.Parameter requires grad


@dataclass
class HaikuArrays:
    """A converted file mapped back to the official Haiku names (nothing written yet).

    ``flat``: ``{"module/param": array}`` and ``{"state:module/param": array}``;
    ``config``: the converted file's perceiver_torch config (a plain dict);
    ``spec``: the mapping the arrays were inverted through.
    """

    model: str
    config: Dict[str, Any]
    flat: Dict[str, np.ndarray]
    metadata: Dict[str, str]
    layout: str
    exact: bool
    notes: list
    spec: Any


def converted_to_haiku(
    path: str | os.PathLike, *, mapping: Optional[str | os.PathLike] = None
) -> HaikuArrays:
    """Reads a file made by :func:`converter.convert` and inverts its mapping exactly."""
    state_dict, metadata = read_converted(Path(path))
    model = metadata["model"]
    config = json.loads(metadata["config"])
    check_stored_tensors(Path(path), model, config, state_dict)
    recorded = metadata.get("mapping", model)
    if mapping is None and recorded not in available_mappings():
        raise MappingError(
            f"{path} was converted with the mapping {recorded!r}, which is not one of "
            "the bundled mappings (a file of yours): export it through that file, "
            "--mapping FILE (mapping= in Python)"
        )
    spec = load_mapping(mapping if mapping is not None else recorded)
    if spec.model != model:
        raise MappingError(
            f"{spec.file} maps {spec.model!r}, but {path} holds {model!r}"
        )
    notes = []
    exact = True
    if metadata.get("mapping_sha256") and metadata["mapping_sha256"] != spec.sha256:
        # The inverse is of this mapping, which may place tensors differently from the
        # one the file was made with (two same-shaped tensors swapped pass every
        # shape check): the export cannot be called exact.
        exact = False
        notes.append(
            f"the file was converted with another version of {spec.file} "
            f"(sha256 {metadata['mapping_sha256'][:12]}...), so the export, made "
            "through this one, is not known to equal the original; if the file was "
            "converted with a mapping of your own, export with --mapping FILE"
        )
    low_precision = stored_low_precision(state_dict)
    if low_precision:
        exact = False
        message = (
            f"the weights are stored as {low_precision}; they are exported as "
            "float32 but cannot equal the original float32 values"
        )
        notes.append(message)
        # At the line of the user's call: its callers are export and export_hf.
        warnings.warn(message, PrecisionWarning, stacklevel=3)
    table = spec.expand({**spec.config, **{k: _as_tuple(v) for k, v in config.items()}})
    report = plan_inverse(table, tensor_specs(state_dict), spec.name)
    report.raise_for_problems(f"Was {path} converted from a {model} checkpoint?")
    dropped = decode_dropped(metadata)
    stored = hf_source_list(metadata, "stored_dtypes")
    if stored:
        exact = False
        reduced = [name for name in stored if name != "float64"]
        if reduced:
            notes.append(
                f"the transformers checkpoint it was imported from held {', '.join(reduced)} "
                "weights (or was exported from a file that did); they are exported as "
                "float32 but cannot equal the original float32 values"
            )
        if "float64" in stored:
            notes.append(
                "the transformers checkpoint it was imported from held float64 weights, "
                "rounded to float32 by the import: the export is not those values"
            )
    restored = hf_source_list(metadata, "restored_drops")
    if restored:
        exact = False
        notes.append(
            f"{len(restored)} array(s) the transformers checkpoint it was imported from "
            "does not hold were rebuilt from their restore_from sources, not the "
            f"original values ({', '.join(restored[:3])}{', ...' if len(restored) > 3 else ''})"
        )
    if table.drops and not dropped:
        exact = False
        notes.append(
            "dropped tensors restored from their restore_from sources (not stored)"
        )
    arrays = {key: _to_numpy(tensor) for key, tensor in state_dict.items()}
    flat = invert_arrays(table, arrays, dropped)
    layout = spec.source.get("layout", "params")
    return HaikuArrays(model, config, flat, metadata, layout, exact, notes, spec)


def not_held_note(lost: Dict[str, tuple]) -> str:
    """The note of an official-format export whose model the file cannot describe
    (:func:`settings_not_held`), with the ``--config`` that converts it back."""
    held = override_text({key: value for key, (value, _) in lost.items()})
    back = override_text({key: again for key, (_, again) in lost.items()})
    flags = " ".join(f"--config {override_text({key: value})}"
                     for key, (value, _) in lost.items())
    return (
        f"the official format cannot hold {held} (no array's shape reveals it): the "
        f"export converts back as {back} unless converted with {flags}"
    )


def settings_not_held(
    spec: Any, flat: Dict[str, np.ndarray], config: Dict[str, Any]
) -> Dict[str, tuple]:
    """``{key: (the file's value, what converting ``flat`` back resolves)}`` for the
    configuration values an official-format file cannot hold: a model converted with
    ``--config num_self_attention_heads=2`` (or imported from a transformers model of
    another size) exports arrays that convert back with the official value."""
    again = spec.resolve_config({k: tuple(np.shape(v)) for k, v in flat.items()}).values
    return {
        key: (value, again[key])
        for key, value in config.items()
        if key in again and _as_tuple(again[key]) != _as_tuple(value)
    }


def export(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protocol: int = 3,
    container: str = "flatmapping",
    mapping: Optional[str | os.PathLike] = None,
    overwrite: bool = True,
) -> ExportResult:
    """Writes the official-layout pickle for a file made by :func:`converter.convert`.

    ``out`` may not be ``path`` (nor the mapping file) and may not carry another
    format's suffix (``.safetensors``, ``.pt``, ...); ``overwrite=False`` also refuses
    an existing ``out``, up front and when the file is put in place (one another
    process wrote meanwhile is kept); ``out``'s folder must exist. These raise
    :class:`~converter.errors.OutputError`.
    """
    check_pickle_suffix(Path(out))
    check_output_path(out)  # a missing folder, before the whole conversion back
    check_outputs(out, (path, mapping), force=overwrite)
    haiku = converted_to_haiku(path, mapping=mapping)
    params, state = unflatten_tree(haiku.flat)
    save_haiku_checkpoint(
        out,
        params,
        state if haiku.layout == "params_and_state" else None,
        protocol=protocol,
        container=container,
        overwrite=overwrite,
    )
    # Only here: a transformers config.json (export_hf) holds every setting.
    lost = settings_not_held(haiku.spec, haiku.flat, haiku.config)
    notes = haiku.notes + ([not_held_note(lost)] if lost else [])
    return ExportResult(haiku.model, Path(out), len(haiku.flat), haiku.exact, notes)


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values a floating tensor holds (0 for other dtypes)."""
    if not tensor.is_floating_point():
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def nonfinite_tensors(state_dict: Dict[str, torch.Tensor]) -> list:
    """The names of floating tensors holding NaN or Inf (a corrupt file: the converter
    refuses such official arrays, so a converted file has them only if changed)."""
    return [key for key, tensor in state_dict.items() if nonfinite_count(tensor)]


def check_stored_tensors(
    path: Path, model: str, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor]
) -> None:
    """Every export's check of a converted file's tensors: NaN or Inf values, shapes
    that do not fit the file's own config, or wrong dtypes (float64, int8, ...) are
    reported as such, with the fix (``CheckpointError``): the inverse mapping reads
    names, not values or shapes, and would write a checkpoint nothing can load."""
    import perceiver_torch
    from perceiver_torch.registry import format_state_problems, state_dict_problems

    try:
        with torch.device("meta"):
            built = perceiver_torch.build(model, config)
    except ValueError:
        return  # the config itself is reported by the mapping checks below
    nonfinite = nonfinite_tensors(state_dict)
    if nonfinite:
        raise CheckpointError(
            f"{path}: {nonfinite_message(nonfinite)}; the file is corrupt: convert the "
            "official checkpoint again"
        )
    problems = state_dict_problems(built.state_dict(), state_dict)
    stored = {"missing": [], "unexpected": [], "shape": problems["shape"],
              "dtype": problems["dtype"]}
    message = format_state_problems(
        f"{path}: tensors that do not fit its {model} config:", stored
    )
    if message is not None:
        if problems["shape"]:
            message += (
                "\n  the file was changed after conversion or its metadata belongs to "
                "another file; convert the official checkpoint again"
            )
        raise CheckpointError(message)


def hf_source_list(metadata: Dict[str, str], key: str) -> list:
    """A list a HuggingFace import recorded in ``hf_source``: ``restored_drops`` (the
    dropped arrays it rebuilt), ``stored_dtypes`` (float16/bfloat16/float64 weights)."""
    try:
        source = json.loads(metadata.get("hf_source") or "{}")
    except ValueError:
        return []
    found = source.get(key) if isinstance(source, dict) else None
    return [str(name) for name in found] if isinstance(found, list) else []


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
