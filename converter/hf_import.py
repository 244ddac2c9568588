"""HuggingFace transformers checkpoints back to the official model.

``perceiver-convert convert HF_DIR | model.safetensors | pytorch_model.bin`` reads a
transformers Perceiver checkpoint (a hub download, or an ``export --format hf``),
maps its tensors through ``mappings/hf/<model>.yaml`` *backwards* (every op has an
exact inverse: the conv kernel's axis reversal is undone, BatchNorm gets its
[1, 1, 1, C] shape back) to the official Haiku names, and converts those as an
official file. The result computes the official model (tanh GELU, SAME padding, the
real conv kernel orientation, ...), not HuggingFace's architecture: the architecture
lives in perceiver_torch, the weights are the same numbers.

Reading never runs code from the file: safetensors is plain data, and
``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, which refuses
every pickle global outside PyTorch's tensor allow-list (then nothing else happens).

The model comes from ``config.json``'s ``architectures`` when there is one, else from
the tensor names. Sizes come from the tensors' shapes (``target_derive`` in the
mapping for the layer counts) and, for what shapes cannot tell (image and clip
sizes), from ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

from converter.errors import CheckpointError, ConfigError, MappingError, UnsafeCheckpointError
from converter.mapping import (
    MappingSpec,
    available_hf_mappings,
    invert_arrays,
    load_hf_mapping,
    plan_inverse,
    unflatten_tree,
)
from converter.progress import Progress, quiet
from perceiver_torch.registry import safetensors_name

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class HFSource:
    """A transformers checkpoint read into memory (float tensors as float32 numpy)."""

    path: Path
    weights: Path
    kind: str  # "safetensors" or "pytorch_model.bin"
    tensors: Dict[str, np.ndarray] = field(repr=False)
    config: Optional[Dict[str, Any]]
    sha256: str
    size_bytes: int
    notes: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)
    # Floating dtypes the file stores that reading as float32 does not keep exactly:
    # float16/bfloat16 (their values, not the original float32 ones) and float64
    # where rounding it changed a value.
    stored_dtypes: List[str] = field(default_factory=list)
    # Each tensor's dtype as the file stores it (``tensors`` holds float32 copies).
    file_dtypes: Dict[str, str] = field(default_factory=dict)


def is_hf_input(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or claims to be) a transformers checkpoint rather than an
    official pickle or a perceiver-convert output: a folder, a ``*.bin`` file, or a
    safetensors file without this project's "model"/"config" metadata."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.suffix == ".bin":
        return True
    if path.suffix == ".safetensors" and path.is_file():
        metadata = safetensors_metadata(path)
        return metadata is not None and not is_converted_metadata(metadata)
    return False


def safetensors_metadata(path: Path) -> Optional[Dict[str, str]]:
    """The metadata of safetensors file ``path`` ({} where it has none), or None when
    it does not read as safetensors (the caller's reader then says what it is)."""
    try:
        from safetensors import safe_open

        with safetensors_name(path) as name, safe_open(name, framework="np") as handle:
            return handle.metadata() or {}
    except Exception:
        return None


def is_converted_metadata(metadata: Dict[str, str]) -> bool:
    """Whether safetensors metadata is a perceiver-convert output's (model, config)."""
    return {"model", "config"} <= set(metadata)


def _sha256(path: Path) -> Tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).replace("torch.", "")


def _to_numpy(tensor: Any, stored: Set[str]) -> np.ndarray:
    """A tensor as numpy, floats as float32; adds to ``stored`` the dtypes whose values
    are not float32 ones (see :attr:`HFSource.stored_dtypes`)."""
    import torch

    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        stored_as = tensor
        tensor = tensor.float()
        # float16/bfloat16 values always; float64 ones where float32 rounded them.
        narrow = stored_as.dtype in (torch.float16, torch.bfloat16)
        if narrow or not torch.equal(tensor.to(stored_as.dtype), stored_as):
            stored.add(_dtype_name(stored_as))
    return tensor.detach().contiguous().numpy()  # an nn.Parameter requires grad


def _read_bin(path: Path, stored: Set[str], dtypes: Dict[str, str]) -> Dict[str, np.ndarray]:
    import pickle

    import torch

    from perceiver_torch.registry import torch_load_weights

    try:
        payload = torch_load_weights(path)
    except pickle.UnpicklingError as error:
        from perceiver_torch.registry import refused_global, weights_only_refusal

        raise UnsafeCheckpointError(
            f"{path}: refused by torch.load(weights_only=True): the file "
            f"{weights_only_refusal(error)}; nothing from the file was run. A "
            "transformers checkpoint holds only tensors: use its "
            "model.safetensors file, or a pytorch_model.bin from a source you trust",
            refused_global(error),
        ) from None
    except Exception as error:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch state dict ({type(error).__name__}: "
            f"{str(error)[:200]})"
        ) from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got "
            f"{type(payload).__name__}"
        )
    other = next((k for k, v in payload.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        # A training checkpoint ({"state_dict": {...}, "optimizer": ...}) most often.
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), but its "
            f"{str(other)!r} holds a {type(payload[other]).__name__}, not a tensor; if "
            "the state dict is nested in it, save that alone (torch.save(checkpoint"
            f"[{str(other)!r}], 'pytorch_model.bin'))"
        )
    dtypes.update({str(k): _dtype_name(v) for k, v in payload.items()})
    return {str(k): _to_numpy(v, stored) for k, v in payload.items()}


def _read_safetensors(
    path: Path, stored: Set[str], dtypes: Dict[str, str]
) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    try:
        from safetensors import safe_open

        with safetensors_name(path) as name, safe_open(name, framework="pt") as handle:
            tensors = {}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                dtypes[key] = _dtype_name(tensor)
                tensors[key] = _to_numpy(tensor, stored)
            return tensors, dict(handle.metadata() or {})
    except Exception as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(error).__name__}: "
            f"{str(error)[:200]})"
        ) from None


def _refuse_onnx(weights: Path) -> None:
    """An ONNX model named like a weights file (model.bin) is named as ONNX, not as
    a file torch.load refuses."""
    from converter.haiku_reader import looks_like_onnx, onnx_refusal

    try:
        with open(weights, "rb") as handle:
            head = handle.read(3)
    except OSError:
        return  # the reader below names the problem
    if looks_like_onnx(head):
        raise CheckpointError(onnx_refusal(str(weights)))


def read_hf(path: str | os.PathLike) -> HFSource:
    """Reads a transformers folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) or one weights file (its folder's ``config.json`` is used
    when there is one)."""
    path = Path(path)
    config_file: Optional[Path]
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{path}: no config.json; a transformers checkpoint folder holds "
                "config.json and model.safetensors (or pytorch_model.bin)"
            )
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            sharded = any(path.glob("*.index.json"))
            raise CheckpointError(
                f"{path}: no model.safetensors or pytorch_model.bin next to config.json"
                + ("; sharded weights (*.index.json and shards) are not read: save the "
                   "model unsharded (save_pretrained(..., max_shard_size='100GB'))"
                   if sharded else "")
            )
        weights = found[0]
    else:
        weights = path
        config_file = path.parent / "config.json"
        if not config_file.is_file():
            config_file = None
    config = None
    if config_file is not None:
        try:
            text = config_file.read_text(encoding="utf-8")
            if not text.strip():  # as every reader names an empty file
                raise CheckpointError(
                    f"{config_file}: the file is empty, e.g. an interrupted download; "
                    "download it again"
                )
            config = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{config_file}: not a readable JSON file ({error})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: expected a JSON object")
    sha256, size = _sha256(weights)
    if size == 0:  # named as such, not as an unreadable format
        raise CheckpointError(
            f"{weights}: the file is empty (0 bytes), e.g. an interrupted download; "
            "download it again"
        )
    _refuse_onnx(weights)
    metadata: Dict[str, str] = {}
    stored: Set[str] = set()
    dtypes: Dict[str, str] = {}
    if weights.suffix == ".safetensors":
        kind = "safetensors"
        tensors, metadata = _read_safetensors(weights, stored, dtypes)
    else:
        kind, tensors = "pytorch_model.bin", _read_bin(weights, stored, dtypes)
    return HFSource(path, weights, kind, tensors, config, sha256, size, metadata=metadata,
                    stored_dtypes=sorted(stored), file_dtypes=dtypes)


def _refuse_shard(path: Path) -> None:
    """One file of sharded weights (named in a ``*.index.json`` beside it) holds only
    some tensors: say so, rather than list the others as missing."""
    for index in sorted(path.parent.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(weight_map, dict) and path.name in weight_map.values():
            raise CheckpointError(
                f"{path}: one shard of sharded weights ({index.name} names it); sharded "
                "weights are not read: save the model unsharded "
                "(save_pretrained(..., max_shard_size='100GB')) and convert its folder"
            )


# --------------------------------------------------------------------------------------
# Detecting the model and mapping back.


def _architectures() -> Dict[str, str]:
    return {
        str(load_hf_mapping(name).target["architecture"]): name
        for name in available_hf_mappings()
    }


def detect_model(source: HFSource) -> str:
    """The model name from ``config.json``'s architectures, else from the tensor names."""
    known = _architectures()
    if source.config is not None and source.config.get("architectures"):
        names = source.config["architectures"]
        if not isinstance(names, list):
            names = [names]  # one name given as a string, not a list
        for arch in names:
            if isinstance(arch, str) and arch in known:
                return known[arch]
        raise CheckpointError(
            f"{source.path}: config.json names architecture(s) "
            f"{', '.join(json.dumps(name) for name in names)}; "
            f"this converter reads {', '.join(sorted(known))}"
        )
    if looks_like_another_project(source):
        raise CheckpointError(f"{source.path}: {another_project_message(source)}")
    if names_another_model(source):  # here: by its model_type (no architectures)
        model_type = source.config["model_type"]
        raise CheckpointError(
            f"{source.path}: config.json is of model_type {json.dumps(model_type)}, not "
            f"\"perceiver\"; this converter reads {', '.join(sorted(known))}"
        )
    best = _closest_model_by_tensor_names(source)
    if best[0] == 1.0:
        return best[1]
    raise CheckpointError(
        f"{source.path}: the tensor names match none of transformers' six Perceiver "
        "classes exactly"
        + (f" (closest: {best[1]}, {best[0]:.0%} of the names)" if best[1] else "")
        + "; add the folder's config.json, or check that the file is complete"
    )


def _closest_model_by_tensor_names(source: HFSource) -> Tuple[float, Optional[str]]:
    """(the share of names in common, of all the names, with the model whose
    transformers tensor names are closest to ``source``'s, that model): a share of 1.0
    is exactly its names; (0.0, None) where no mapping applies."""
    keys = set(source.tensors)
    scores = []
    for name in available_hf_mappings():
        spec = load_hf_mapping(name)
        try:
            table = _table(spec, source)
        except MappingError:
            continue
        wanted = {rule.target for rule in table.rules}
        if wanted == keys:
            return 1.0, name
        scores.append((len(wanted & keys) / max(len(wanted | keys), 1), name))
    return max(scores, default=(0.0, None))


def looks_like_another_project(source: HFSource) -> bool:
    """Whether a weights file shows no sign of being a HuggingFace Perceiver
    checkpoint: no config.json beside it, no tensor under transformers' ``perceiver.``
    prefix, no ``export --format hf`` metadata."""
    return (
        source.config is None
        and not any(name.startswith("perceiver.") for name in source.tensors)
        and not any(key.startswith("perceiver_convert.") for key in source.metadata)
    )


def names_another_model(source: HFSource) -> bool:
    """Whether a HuggingFace folder's config.json is another model's (a BERT folder:
    ``model_type`` other than ``perceiver``, or architectures none of which is a
    Perceiver class) and no tensor has transformers' ``perceiver.`` prefix."""
    config = source.config or {}
    names = config.get("architectures") or []
    names = names if isinstance(names, list) else [names]
    other = config.get("model_type") not in (None, "perceiver") or (
        names and not any(str(name).startswith("Perceiver") for name in names)
    )
    return bool(other) and not any(name.startswith("perceiver.") for name in source.tensors)


def another_project_message(source: HFSource) -> str:
    """What such a file is, and what the commands take instead."""
    what = "safetensors" if source.kind == "safetensors" else "torch.save"
    return (
        f"another project's {what} file, not a Perceiver checkpoint: it has "
        "neither perceiver-convert's 'model'/'config' metadata nor transformers' "
        "Perceiver tensor names (or a config.json beside it); convert and verify "
        "take official pickles, converted files and HuggingFace Perceiver "
        "checkpoints"
    )


def _table(spec: MappingSpec, source: HFSource):
    shapes = {key: tuple(array.shape) for key, array in source.tensors.items()}
    counts = spec.derive_from_targets(shapes)
    return spec.expand({**spec.config, **counts})


def hf_to_haiku(
    source: HFSource, model: str
) -> Tuple[Dict[str, np.ndarray], MappingSpec, List[str]]:
    """transformers tensors -> official Haiku arrays (``{"module/param": array}``),
    through the inverse of every rule of ``mappings/hf/<model>.yaml``, its spec, and
    the names of the arrays it could only rebuild. The arrays no transformers tensor
    holds (BatchNorm EMA accumulators) come from an export's metadata, else from their
    ``restore_from`` arrays: not the original values (a hub file's)."""
    spec = load_hf_mapping(model)
    try:
        table = _table(spec, source)
    except MappingError as error:
        raise MappingError(
            f"{source.path}: not a complete {spec.target.get('architecture')} checkpoint: "
            f"{error}"
        ) from None
    specs = {key: (tuple(a.shape), str(a.dtype)) for key, a in source.tensors.items()}
    report = plan_inverse(table, specs, spec.name)
    if not report.ok and source.config is not None and source.config.get("architectures"):
        # config.json named the model; the tensors may be another's (a hand-edited
        # config): say that in one line rather than list some forty tensors.
        share, fitting = _closest_model_by_tensor_names(source)
        if share == 1.0 and fitting != model:
            raise CheckpointError(
                f"{source.path}: config.json's architectures name "
                f"{spec.target.get('architecture')}, but the tensors are those of "
                f"{load_hf_mapping(fitting).target.get('architecture')} ({fitting}); "
                "correct config.json's \"architectures\" (or remove it to detect the "
                "model from the tensor names)"
            )
    report.raise_for_problems(
        f"{source.path} is not a complete {spec.target.get('architecture')} checkpoint "
        "(missing or unexpected tensors above)"
    )
    carried = _carried_drops(source, model)
    flat = invert_arrays(table, source.tensors, carried)
    restored = sorted(drop.source for drop in table.drops if drop.source not in carried)
    return flat, spec, restored


def _carried_drops(source: HFSource, model: str) -> Dict[str, np.ndarray]:
    """The dropped official arrays an ``export --format hf`` stored in its metadata."""
    from converter.conversion import decode_dropped

    if source.metadata.get("perceiver_convert.model") != model:
        return {}
    raw = source.metadata.get("perceiver_convert.haiku_dropped")
    try:
        carried = decode_dropped({"haiku_dropped": raw}) if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    # An export of a file that was itself imported from a checkpoint without them
    # (the hub's) carries the arrays that import rebuilt: not the original values,
    # so they count as rebuilt again (and `export` keeps saying the pickle is not
    # exact), whatever the number of round trips.
    rebuilt = _carried_hf_source(source, model).get("restored_drops")
    if isinstance(rebuilt, list):
        carried = {k: v for k, v in carried.items() if k not in rebuilt}
    return carried


# What an export --format hf records of the converted file it wrote from.
_EXPORTED_KEYS = ("source_file", "source_sha256", "mapping", "mapping_sha256", "dtype", "converter")


def _exported_from(source: HFSource, model: str) -> Dict[str, str]:
    """The provenance an ``export --format hf`` recorded of its converted file (its
    official source's name and sha256, mapping, dtype), or {}."""
    if source.metadata.get("perceiver_convert.model") != model:
        return {}
    return {
        key: source.metadata[f"perceiver_convert.{key}"]
        for key in _EXPORTED_KEYS
        if f"perceiver_convert.{key}" in source.metadata
    }


def _carried_hf_source(source: HFSource, model: str) -> Dict[str, Any]:
    """The ``hf_source`` provenance an ``export --format hf`` carried from its
    converted file (that file's own HuggingFace import), or {}."""
    if source.metadata.get("perceiver_convert.model") != model:
        return {}
    try:
        carried = json.loads(source.metadata.get("perceiver_convert.hf_source") or "{}")
    except ValueError:
        return {}
    return carried if isinstance(carried, dict) else {}


def prepare_hf(
    path: str | os.PathLike,
    *,
    model: Optional[str] = None,
    config: Optional[Mapping[str, Any]] = None,
    progress: Progress = quiet,
):
    """Reads a transformers checkpoint and matches it, as official arrays, to its
    perceiver_torch mapping. Returns ``(PreparedConversion, provenance dict)``."""
    from converter.conversion import prepare
    from converter.hf import config_overrides_from_hf, hf_source_key
    from converter.haiku_reader import HaikuCheckpoint
    from converter.registry import model_info

    progress(f"reading {path} as a transformers checkpoint")
    source = read_hf(path)
    _refuse_shard(source.weights)
    detected = detect_model(source)
    if model is not None and model != detected:
        raise MappingError(f"{path} holds {detected}, not {model}")
    _refuse_nonfinite(source)
    flat, spec, restored = hf_to_haiku(source, detected)
    progress(f"{spec.target.get('architecture')} -> {detected}: {len(flat)} official arrays")
    params, state = unflatten_tree(flat)
    info = model_info(detected)
    checkpoint = HaikuCheckpoint(
        path=source.weights,
        params=params,
        state=state,
        sha256=source.sha256,
        size_bytes=source.size_bytes,
        protocol=0,
        containers=(),
        wrapped=info.wrapped,
        globals=(),
    )
    # Values the shapes cannot reveal: from our own export's metadata (it carries the
    # perceiver_torch config: the video model's num_chunks is nowhere else), then
    # transformers' config.json, then the caller's overrides.
    overrides = _embedded_config(source, detected)
    # Without a config.json (a lone weights file) nothing says transformers' defaults
    # apply: the embedded config, else the official values.
    from_file = (
        config_overrides_from_hf(detected, source.config) if source.config is not None else {}
    )
    overrides.update(from_file)
    overrides.update(config or {})
    if detected == "video_autoencoding" and "num_chunks" not in overrides:
        _check_official_chunks(source, overrides)
    try:
        prepared = prepare(checkpoint, detected, config=overrides or None,
                           mismatch_hint=_mismatch_hint(source, spec, detected))
    except ConfigError as error:
        if error.key in from_file and error.key not in (config or {}):
            # The bad value is config.json's, not a --config the user typed: named as
            # the file spells it (optical_flow's image_size is its train_size).
            message = str(error).removeprefix("--config: ")
            file_key = hf_source_key(detected, error.key)
            value = source.config.get(file_key, from_file[error.key])
            read_as = f" (read as {error.key})" if file_key != error.key else ""
            raise CheckpointError(
                f"{source.path}: config.json's {file_key}={json.dumps(value)}{read_as}: "
                f"{message}"
            ) from None
        raise
    provenance = {
        "format": "huggingface",
        "kind": source.kind,
        "path": str(source.path),
        "weights": source.weights.name,
        "weights_sha256": source.sha256,
        "architecture": spec.target.get("architecture"),
        "hf_mapping": spec.name,
        "hf_mapping_sha256": spec.sha256,
        "transformers_version": (source.config or {}).get("transformers_version"),
    }
    if restored:
        # Not in the transformers file; `export` then says the pickle is not exact.
        provenance["restored_drops"] = restored
    exported = _exported_from(source, detected)
    if exported:
        # A perceiver-convert export: the converted file it came from, and that file's
        # own source (the official pickle's name and sha256), which the round trip
        # lost (the import's source_* are the HuggingFace weights').
        provenance["exported_from"] = exported
    stored = _stored_dtypes(source, detected)
    if stored:
        # The float32 file holds these dtypes' values; `export` says so, as it does for
        # a convert --dtype file.
        provenance["stored_dtypes"] = stored
    return prepared, checkpoint, provenance


def _refuse_nonfinite(source: HFSource) -> None:
    """NaN or Inf weights are refused, as the official reader refuses them (every
    export would refuse the converted file as corrupt)."""
    from converter.errors import nonfinite_message

    bad = [key for key, array in source.tensors.items()
           if array.dtype.kind == "f" and not np.isfinite(array).all()]
    if bad:
        raise CheckpointError(
            f"{source.weights}: {nonfinite_message(sorted(bad))}; the weights are "
            "corrupt: download or save the checkpoint again"
        )


def _stored_dtypes(source: HFSource, model: str) -> List[str]:
    """The floating dtypes other than float32 the weights went through before this
    import: the file's own (:attr:`HFSource.stored_dtypes`), the converted file an
    ``export --format hf`` was made from (its ``dtype``) and that file's own import."""
    stored = set(source.stored_dtypes)
    if source.metadata.get("perceiver_convert.model") == model:
        dtype = source.metadata.get("perceiver_convert.dtype")
        if dtype in ("float16", "bfloat16"):
            stored.add(dtype)
        earlier = _carried_hf_source(source, model).get("stored_dtypes")
        if isinstance(earlier, list):
            stored.update(str(name) for name in earlier)
    return sorted(stored)


def _check_official_chunks(source: HFSource, overrides: Mapping[str, Any]) -> None:
    """A clip smaller than the official one may have fewer audio patches or image
    points than the official num_chunks (128: how many calls decode a clip, a value
    transformers' config does not hold); say so, and what to pass, as a usage error
    rather than as a checkpoint that does not fit its mapping."""
    from perceiver_torch.configs import VideoAutoencodingConfig

    official = VideoAutoencodingConfig()
    try:
        frames = int(overrides.get("num_frames", official.num_frames))
        height, width = (int(v) for v in overrides.get("image_size", official.image_size))
        samples = frames * int(
            overrides.get("audio_samples_per_frame", official.audio_samples_per_frame)
        )
        patches = samples // int(overrides.get("samples_per_patch", official.samples_per_patch))
    except (TypeError, ValueError, ZeroDivisionError):
        return  # a bad size: the config checks below name it
    most = min(frames * height * width, patches)
    if 1 <= most < official.num_chunks:
        raise ConfigError(
            f"{source.path}: this clip ({frames} frames of {height}x{width}, {patches} "
            f"audio patches) is too short for the official num_chunks="
            f"{official.num_chunks} (how many calls decode a clip; transformers' "
            f"config.json does not hold it): pass --config num_chunks=N with "
            f"1 <= N <= {most}",
            "num_chunks",
        )


# config.json values that shape tensors differently from the official architecture
# (which has these; PerceiverConfig's defaults too).
_OFFICIAL_SHAPING = {"cross_attention_widening_factor": 1,
                     "self_attention_widening_factor": 1,
                     "cross_attention_shape_for_attention": "kv"}


def _mismatch_hint(source: HFSource, spec: MappingSpec, model: str) -> str:
    """What to say when a transformers checkpoint's tensors do not fit the official
    architecture of the model its config.json (or its names) gave."""
    hf = source.config or {}
    differ = [f"{key}={json.dumps(hf[key])}" for key, value in _OFFICIAL_SHAPING.items()
              if key in hf and hf[key] != value]
    if model == "language_perceiver" and "qk_channels" in hf and hf["qk_channels"] != 256:
        differ.append(f"qk_channels={json.dumps(hf['qk_channels'])}")
    why = (f" (config.json gives {', '.join(differ)}; the official model: "
           "widening factors 1, attention shape 'kv'"
           + (", qk_channels 256" if model == "language_perceiver" else "") + ")"
           if differ else "")
    return (
        f"{source.weights.name} is a {spec.target.get('architecture')} whose tensors "
        f"have shapes the official {model} architecture (and perceiver_torch) cannot "
        f"take{why}; this checkpoint cannot be imported"
    )


def _embedded_config(source: HFSource, model: str) -> Dict[str, Any]:
    """The non-derivable perceiver_torch config values an ``export --format hf`` stored
    in model.safetensors' metadata (``{}`` for other files)."""
    from converter.mapping import load_mapping

    raw = source.metadata.get("perceiver_convert.config")
    if not raw or source.metadata.get("perceiver_convert.model") != model:
        return {}
    try:
        values = json.loads(raw)
    except ValueError:
        return {}
    spec = load_mapping(model)
    if not isinstance(values, dict):
        return {}
    return {k: v for k, v in values.items() if k in spec.config and k not in spec.derive}


def convert_hf(
    path: str | os.PathLike,
    out: Optional[str | os.PathLike],
    *,
    model: Optional[str] = None,
    dtype: Optional[str] = None,
    config: Optional[Mapping[str, Any]] = None,
    verify: bool = False,
    progress: Progress = quiet,
    mapping: None = None,
    overwrite: bool = True,
):
    """:func:`converter.convert` for a transformers checkpoint; the metadata's
    ``hf_source`` records where it came from. (``mapping`` must be None: the HF
    mappings are the bundled ones.)"""
    from converter.conversion import convert

    if mapping is not None:
        raise ValueError("a mapping file applies to official checkpoints only")

    prepared, checkpoint, provenance = prepare_hf(
        path, model=model, config=config, progress=progress
    )
    return convert(
        checkpoint,
        out,
        model=prepared.model,
        dtype=dtype,
        config=prepared.config.overrides or None,
        verify=verify,
        progress=progress,
        extra_metadata={"hf_source": json.dumps(provenance, sort_keys=True)},
        overwrite=overwrite,
    )
