"""Converting official Haiku checkpoints to perceiver_torch checkpoints (the Python API).

>>> result = convert("language_perceiver_io_bytes.pickle", "language.safetensors")
>>> model = perceiver_torch.load("language.safetensors")

Steps: read the pickle through the allow-list reader; pick the mapping (``model=`` or
detection from the parameter names); resolve the configuration from the checkpoint's
shapes; expand the mapping and check it against the model's state dict (built on the
meta device, no memory); then convert and write tensor by tensor.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

import perceiver_torch
from converter._version import __version__
from converter.errors import (
    ConfigError,
    ConverterError,
    MappingError,
    UsageError,
)
from converter.mapping import (
    MappingReport,
    MappingSpec,
    MappingTable,
    ResolvedConfig,
    available_mappings,
    convert_arrays,
    flatten_tree,
    load_mapping,
    override_text,
    overrides_at_fault,
    plan_forward,
)
from converter.converted_files import (
    TORCH_DTYPES,
    cast_for_output,
    output_dtype,
    output_format,
    write_pt,
    write_safetensors_streaming,
)
from converter.atomic import check_output_path, check_outputs
from converter.progress import Progress, quiet
from converter.haiku_reader import HaikuCheckpoint, load_haiku_checkpoint
from perceiver_torch.configs import ConfigError as TorchConfigError
from perceiver_torch.pipelines.base import with_article
from perceiver_torch.configs import config_from_dict, config_to_dict
from perceiver_torch.registry import Underflow, out_of_range_message, scan_for_dtype

if TYPE_CHECKING:  # verify is imported only when verifying; here only its type
    from converter.verify import ParityReport



@dataclass
class PreparedConversion:
    """A checkpoint matched to a mapping and checked; nothing converted yet."""

    checkpoint: HaikuCheckpoint
    mapping: MappingSpec
    config: ResolvedConfig
    table: MappingTable
    report: MappingReport
    targets: Dict[str, Tuple[Tuple[int, ...], str]]
    sources: Dict[str, np.ndarray]
    # The dtypes check_dtype_range found every weight within, with what rounding to
    # them makes subnormal or 0 (convert checks up front, then verify_prepared need
    # not convert every array again).
    checked_dtypes: Dict[str, Optional[Underflow]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def model(self) -> str:
        return self.mapping.model

    def config_object(self) -> Any:
        return config_from_dict(self.model, self.config.values)

    def converted_arrays(self):
        """Yields ``(state-dict key, numpy array)`` in mapping order."""
        return convert_arrays(self.table, self.sources)

    def check_dtype_range(self, dtype: str) -> Optional[Underflow]:
        """:class:`UsageError` (exit 2) naming the weights beyond ``dtype``'s range (a
        finite float32 weight over float16's 65504 rounds to inf), before the long
        work: such a file every export refused as corrupt, and verify's inf
        differences did not say why. In the same pass over the arrays, the nonzero
        weights rounding to float16 makes subnormal or 0 (its smallest normal number
        is 2**-14): returned, not refused (None where there are none). Nothing to
        check for float32, nor again for a dtype already checked."""
        if dtype == "float32":
            return None
        if dtype not in self.checked_dtypes:
            scan = scan_for_dtype(
                convert_arrays(self.table, self.sources, contiguous=False),
                TORCH_DTYPES[dtype],
            )
            if scan.out_of_range:
                raise UsageError(
                    f"{self.checkpoint.path}: "
                    f"{out_of_range_message(scan.out_of_range, TORCH_DTYPES[dtype])}"
                )
            self.checked_dtypes[dtype] = scan.underflow
        return self.checked_dtypes[dtype]

    def state_dict(
        self, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, torch.Tensor]:
        return {
            key: cast_for_output(array, dtype) for key, array in self.converted_arrays()
        }

    def build_model(self, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
        """The perceiver_torch model with the converted weights (strict), in eval mode.

        dtype: round the floating weights to this dtype first (as they are written);
        the model itself stays float32, so it computes with exactly those values.
        """
        return _model_with_weights(
            self.model, self.config_object(), self.state_dict(dtype)
        )

    def dropped_arrays(self) -> Dict[str, np.ndarray]:
        return {drop.source: self.sources[drop.source] for drop in self.table.drops}


def _model_with_weights(
    name: str, config: Any, state_dict: Mapping[str, torch.Tensor], dtype: Any = None
) -> torch.nn.Module:
    """Model ``name`` built with ``config`` in ``dtype`` (None: float32), the weights
    loaded strictly, in eval mode."""
    model = perceiver_torch.build(name, config, dtype=dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@dataclass
class ConversionResult:
    """What :func:`convert` did: the model, its configuration, the mapping report and the file."""

    model: str
    config: Dict[str, Any]
    size_preset: Optional[str]
    source: Path
    source_sha256: str
    mapping: str
    mapping_sha256: str
    report: MappingReport
    output: Optional[Path]
    format: Optional[str]
    dtype: str
    metadata: Dict[str, str]
    parity_report: Optional["ParityReport"] = field(default=None, repr=False)
    seconds: float = 0.0
    state_dict: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)
    # The nonzero weights float16 made subnormal or 0 (None: none, or another dtype).
    underflow: Optional[Underflow] = None

    def underflow_note(self) -> Optional[str]:
        """What :attr:`underflow` says, with the command that measures its effect on
        the outputs (None where nothing was lost)."""
        if self.underflow is None:
            return None
        if self.parity_report is not None:
            advice = "the parity check (--verify) measured the effect on the outputs"
        elif "hf_source" in self.metadata:  # verify --dtype takes official files only
            advice = "converting with --verify measures the effect on the outputs"
        else:
            advice = (
                f"`perceiver-convert verify {self.source} --dtype {self.dtype}` "
                "measures the effect on the outputs"
            )
        return self.underflow.message(advice)

    @property
    def parity(self) -> Optional[Dict[str, Any]]:
        """The parity result (as stored in the metadata), when verified."""
        return None if self.parity_report is None else self.parity_report.as_dict()

    def build_model(self) -> torch.nn.Module:
        """Rebuilds the model in the dtype converted to, as ``perceiver_torch.load``
        of the file does; needs ``state_dict`` (``convert(..., out=None)``) or
        ``output``."""
        if self.state_dict is not None:
            config = config_from_dict(self.model, self.config)
            return _model_with_weights(
                self.model, config, self.state_dict, dtype=self.dtype
            )
        if self.output is not None:
            return perceiver_torch.load(self.output)
        raise ValueError("no weights: convert with out=None or to a file first")

    def as_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config,
            "size_preset": self.size_preset,
            "source": str(self.source),
            "source_sha256": self.source_sha256,
            "mapping": self.mapping,
            "mapping_sha256": self.mapping_sha256,
            "output": str(self.output) if self.output else None,
            "format": self.format,
            "dtype": self.dtype,
            "tensors": self.report.used,
            "dropped": [{"source": s, "reason": r} for s, r in self.report.dropped],
            "parity": self.parity,
            # Only float16 (its exponent range, unlike bfloat16's, is narrower than
            # float32's) makes weights subnormal or 0; null where none were.
            "float16_underflow": (
                None if self.underflow is None else self.underflow.as_dict()
            ),
            "seconds": round(self.seconds, 3),
        }


def tensor_specs(
    tensors: Mapping[str, torch.Tensor],
) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{name: (shape, dtype name)}`` of a state dict, as the mapping plans take them."""
    return {
        key: (tuple(value.shape), str(value.dtype).replace("torch.", ""))
        for key, value in tensors.items()
    }


def model_targets(name: str, config: Any) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Shapes and dtypes of the model's state dict, from a model built on the meta device."""
    with torch.device("meta"):
        model = perceiver_torch.build(name, config)
    return tensor_specs(model.state_dict())


def _try_mapping(
    checkpoint: HaikuCheckpoint,
    spec: MappingSpec,
    sources: Mapping[str, np.ndarray],
    overrides: Optional[Mapping[str, Any]],
) -> PreparedConversion:
    shapes = {key: tuple(array.shape) for key, array in sources.items()}
    config = spec.resolve_config(shapes, overrides)
    try:
        config_object = config_from_dict(spec.model, config.values)
        targets = model_targets(spec.model, config_object)
    except TorchConfigError as error:
        if overrides and (error.key is None or error.key in overrides):
            raise ConfigError(f"--config: {error}", error.key) from None
        raise MappingError(f"{spec.file}: invalid configuration: {error}") from None
    except (TypeError, ValueError) as error:
        raise MappingError(f"{spec.file}: invalid configuration: {error}") from None
    table = spec.expand(config.values)
    infos = {key: (tuple(a.shape), str(a.dtype)) for key, a in sources.items()}
    report = plan_forward(table, infos, targets, spec.name)
    return PreparedConversion(
        checkpoint, spec, config, table, report, targets, dict(sources)
    )


def _coverage(prepared: PreparedConversion) -> float:
    """The share of the checkpoint's tensors the mapping's rules fit or drop (rules
    that differ only in dtype still say which model this is)."""
    report = prepared.report
    fitting = report.used + _dtype_only(report) + len(report.dropped)
    return fitting / max(len(prepared.sources), 1)


def _plain_coverage(
    checkpoint: HaikuCheckpoint, spec: MappingSpec, sources: Mapping[str, np.ndarray]
) -> float:
    """:func:`_coverage` without the user's overrides (1.0: the checkpoint is this
    model as it stands); 0.0 where the mapping cannot even be tried."""
    try:
        return _coverage(_try_mapping(checkpoint, spec, sources, None))
    except ConverterError:
        return 0.0


def _name_shares(
    spec: MappingSpec, sources: Mapping[str, np.ndarray]
) -> Tuple[float, float]:
    """For a mapping that could not be tried (a tensor a derivation reads is
    missing): the share of the checkpoint's tensor names the mapping knows at its
    official configuration, and the share of those names the checkpoint has (which
    tells apart two mappings that both know every name, imagenet_conv's being a
    superset of imagenet_fourier's)."""
    try:
        table = spec.expand(spec.config)
    except ConverterError:
        return 0.0, 0.0
    known = {rule.source for rule in table.rules} | {drop.source for drop in table.drops}
    both = len(known & set(sources))
    return both / max(len(sources), 1), both / max(len(known), 1)


def _refuse_overrides_that_break(
    prepared: PreparedConversion, sources: Mapping[str, np.ndarray], overrides
) -> None:
    """Raises a ConfigError (exit 2) when the checkpoint fits its mapping without the
    user's ``--config`` overrides but not with them: an override no shape reveals
    (imagenet_learned's image_size: only the product H*W is in the checkpoint)
    contradicts the tensors, and the fix is the override, not the file."""
    if prepared.report.ok or not overrides:
        return
    try:
        plain = _try_mapping(prepared.checkpoint, prepared.mapping, sources, None)
    except ConverterError:
        return
    if not plain.report.ok:
        return
    blamed = overrides_at_fault(plain.config.values, overrides)
    problem = prepared.report.problems()[0]
    raise ConfigError(
        f"--config {override_text(blamed)} contradicts the checkpoint, which converts "
        f"as {prepared.model} without it ({problem}); drop or correct that override",
        next(iter(blamed)) if len(blamed) == 1 else None,
    )


def _image_size_hint(prepared: PreparedConversion) -> str:
    """How to fix a learned position encoding whose length the resolved image_size
    does not give: its length is H*W, which no shape can split into H and W."""
    config = prepared.config
    if (
        "image_size" not in config.values
        or "image_size" in config.derived
        or "image_size" in config.overrides
    ):
        return ""
    for problem in prepared.report.mismatches:
        got, expected = tuple(problem.got), tuple(problem.expected or ())
        if (
            problem.kind == "result"
            and problem.target.endswith("position_encoding.embeddings")
            and len(got) == 2
            and len(expected) == 2
            and got[1] == expected[1]
            and got[0] != expected[0]
        ):
            positions = got[0]
            height = next(
                h for h in range(math.isqrt(positions), 0, -1) if positions % h == 0
            )
            return (
                f"{problem.source} holds {positions:,} positions, but the image size "
                f"(height x width = {positions:,}) cannot be read from the shapes: pass "
                f"--config image_size=HxW, e.g. --config "
                f"image_size={height}x{positions // height}"
            )
    return ""


def _dtype_only(report: MappingReport) -> int:
    """How many rules fit by name and shape and differ only in dtype."""
    return sum(1 for problem in report.mismatches if problem.dtype_only)


def _only_dtypes_differ(report: MappingReport) -> bool:
    return bool(report.mismatches) and len(report.problems()) == _dtype_only(report)


_DTYPE_HINT = (
    "Only the dtypes differ: the names and shapes are this model's. Store each array "
    "in the dtype named above (the official checkpoints hold float32 weights) and save "
    "the checkpoint again; convert --dtype then writes float16 or bfloat16 if that is "
    "what you want."
)


def prepare(
    checkpoint: HaikuCheckpoint | str | os.PathLike,
    model: Optional[str] = None,
    *,
    config: Optional[Mapping[str, Any]] = None,
    mapping: Optional[str | os.PathLike] = None,
    mismatch_hint: Optional[str] = None,
) -> PreparedConversion:
    """Reads (if needed) and matches a checkpoint to its mapping; raises if it does not fit.

    ``model`` forces a mapping by model name; ``mapping`` uses a mapping file instead of
    the bundled ones; without either, the mapping whose rules account for every tensor
    of the checkpoint is chosen. ``mismatch_hint`` replaces the last line of the error
    for tensors that do not fit the forced ``model`` (a HuggingFace import knows its
    model from config.json, so "omit --model" is no advice there).
    """
    if not isinstance(checkpoint, HaikuCheckpoint):
        checkpoint = load_haiku_checkpoint(checkpoint)
    sources = flatten_tree(checkpoint.params, checkpoint.state)
    if mapping is not None or model is not None:
        spec = load_mapping(mapping if mapping is not None else model)
        if model is not None and spec.model != model:
            raise MappingError(f"{spec.file} maps model {spec.model!r}, not {model!r}")
        try:
            prepared = _try_mapping(checkpoint, spec, sources, config)
        except MappingError as error:
            raise MappingError(
                f"{checkpoint.path}: does not fit the {spec.name} mapping: {error}"
            ) from None
        _refuse_overrides_that_break(prepared, sources, config)
        prepared.report.raise_for_problems(
            _DTYPE_HINT
            if _only_dtypes_differ(prepared.report)
            else _image_size_hint(prepared)
            or mismatch_hint
            or f"Is {checkpoint.path.name} really {with_article(spec.model)} checkpoint"
            + (
                f", and does the mapping file {spec.file} fit it? Without --mapping the "
                "bundled mappings are tried."
                if mapping is not None
                else "? Omit --model (model= in Python) to detect the model from the "
                "parameter names."
            )
        )
        return prepared

    # (share of the tensors that fit, tie-breakers, name, what went wrong): the
    # closest model's problem is the one to report. A mapping that raises is scored
    # without the overrides (a bad --config value of the closest model is the user's
    # error, not "matches none of the official models") or, where even that fails (a
    # tensor a derivation reads is missing), by the tensor names it knows, ranked
    # after a mapping that could be tried at the same share.
    candidates: List[Tuple[float, Tuple[int, float], str, Any]] = []
    for name in available_mappings():
        spec = load_mapping(name)
        try:
            prepared = _try_mapping(checkpoint, spec, sources, config)
        except ConfigError as error:
            plain = _plain_coverage(checkpoint, spec, sources)
            if plain == 1.0:
                raise  # the checkpoint is this model: the overrides are at fault
            candidates.append((plain, (0, 1.0), name, error))
            continue
        except MappingError as error:
            known, present = _name_shares(spec, sources)
            candidates.append((known, (1, -present), name, error))
            continue
        if prepared.report.ok:
            return prepared
        _refuse_overrides_that_break(prepared, sources, config)
        candidates.append((_coverage(prepared), (0, 1.0), name, prepared))
    candidates.sort(key=lambda item: (-item[0], item[1]))
    best_score, _, best_name, best = candidates[0]
    if best_score == 0.0:
        raise MappingError(
            f"{checkpoint.path}: the parameter names match none of the official models "
            f"({', '.join(available_mappings())}); pass --model NAME (model= in Python) "
            "to see what is missing"
        )
    if isinstance(best, ConfigError):
        raise best
    if isinstance(best, PreparedConversion):
        hint = (
            _DTYPE_HINT if _only_dtypes_differ(best.report) else _image_size_hint(best)
        )
        detail = "\n".join(best.report.problems()[:20] + ([hint] if hint else []))
        share = f"{best_score:.0%} of the tensors fit"
    else:
        detail = str(best)
        share = f"{best_score:.0%} of the tensor names are its"
    raise MappingError(
        f"{checkpoint.path}: closest model is {best_name} ({share}), but the checkpoint "
        f"does not match it:\n{detail}"
    )


# The entries build_metadata writes itself: load() reads "model", "config" and "dtype"
# (an extra "dtype": "bfloat16" loaded a float32 file in bfloat16), and the others are
# the file's provenance, which an extra entry would silently replace.
RESERVED_METADATA = (
    "format",
    "model",
    "config",
    "size_preset",
    "source_file",
    "source_sha256",
    "mapping",
    "mapping_sha256",
    "converter",
    "dtype",
    "haiku_dropped",
    "parity",
)


def check_extra_metadata(extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """``extra`` as a dict of str to str, or :class:`UsageError` naming what is
    wrong: not a mapping, a key or value that is not a str (safetensors metadata holds
    strings only: an int failed deep in the writer with "'int' object has no
    attribute 'encode'"), or a key the converter writes itself."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise UsageError(
            f"extra_metadata must be a mapping of str to str, got {type(extra).__name__}"
        )
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError(
                f"extra_metadata entries must be str to str (safetensors metadata holds "
                f"strings), got {key!r}: {value!r}; json.dumps() other values"
            )
        if key in RESERVED_METADATA:
            raise UsageError(
                f"extra_metadata may not set {key!r}: the converter writes it (the "
                f"file's model, config, dtype and provenance); reserved keys: "
                f"{', '.join(RESERVED_METADATA)}"
            )
    return dict(extra)


def build_metadata(
    prepared: PreparedConversion,
    dtype: str,
    parity: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
    """Provenance stored in the converted file (safetensors metadata: strings only);
    ``extra``: more entries (e.g. ``hf_source`` for a HuggingFace import)."""
    checkpoint = prepared.checkpoint
    metadata = {
        "format": "pt",
        "model": prepared.model,
        "config": json.dumps(config_to_dict(prepared.config_object()), sort_keys=True),
        "size_preset": prepared.config.preset or "custom",
        "source_file": checkpoint.path.name,
        "source_sha256": checkpoint.sha256,
        "mapping": prepared.mapping.name,
        "mapping_sha256": prepared.mapping.sha256,
        "converter": f"perceiver-convert {__version__}",
        "dtype": dtype,
    }
    dropped = prepared.dropped_arrays()
    if dropped:
        # Kept so that `export` gives back the original file exactly (tiny tensors).
        metadata["haiku_dropped"] = json.dumps(
            {
                key: {
                    "dtype": str(array.dtype),
                    "shape": list(array.shape),
                    "data": base64.b64encode(
                        np.ascontiguousarray(array).tobytes()
                    ).decode(),
                }
                for key, array in dropped.items()
            },
            sort_keys=True,
        )
    if parity is not None:
        metadata["parity"] = json.dumps(parity, sort_keys=True)
    metadata.update(check_extra_metadata(extra))
    return metadata


def decode_dropped(metadata: Mapping[str, str]) -> Dict[str, np.ndarray]:
    """The dropped Haiku tensors stored by :func:`build_metadata`."""
    raw = metadata.get("haiku_dropped")
    if not raw:
        return {}
    out = {}
    for key, entry in json.loads(raw).items():
        data = base64.b64decode(entry["data"])
        out[key] = (
            np.frombuffer(data, dtype=entry["dtype"]).reshape(entry["shape"]).copy()
        )
    return out


def write_converted(
    prepared: PreparedConversion,
    out: Path,
    dtype: str = "float32",
    parity: Optional[Mapping[str, Any]] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
    *,
    overwrite: bool = True,
) -> Dict[str, str]:
    """Writes the converted weights atomically; returns the metadata written.
    ``overwrite=False`` never replaces a file, also one that appears meanwhile
    (:func:`~converter.atomic.atomic_write`)."""
    out = Path(out)
    fmt = output_format(out)
    torch_dtype = TORCH_DTYPES[dtype]
    metadata = build_metadata(prepared, dtype, parity, extra_metadata)
    if fmt == "pt":
        write_pt(out, prepared.state_dict(torch_dtype), metadata, overwrite=overwrite)
        return metadata
    layout = []
    for rule in prepared.table.rules:
        shape, array_dtype = prepared.targets[rule.target]
        layout.append((rule.target, shape, output_dtype(array_dtype, torch_dtype)))
    # Strided views: the writer transposes and casts them into reusable buffers.
    stream = convert_arrays(prepared.table, prepared.sources, contiguous=False)
    write_safetensors_streaming(out, layout, stream, metadata, overwrite=overwrite)
    return metadata


def convert(
    path: str | os.PathLike | HaikuCheckpoint,
    out: Optional[str | os.PathLike] = None,
    model: Optional[str] = None,
    dtype: Optional[str] = None,
    *,
    config: Optional[Mapping[str, Any]] = None,
    mapping: Optional[str | os.PathLike] = None,
    verify: bool = False,
    overwrite: bool = True,
    progress: Progress = quiet,
    extra_metadata: Optional[Mapping[str, str]] = None,
) -> ConversionResult:
    """Converts an official checkpoint to a perceiver_torch checkpoint.

    Args:
        path: the official ``.pickle``/``.pystate`` file (read safely, no jax needed),
            or a :class:`HaikuCheckpoint` already in memory (e.g. mapped back from a
            HuggingFace file by :mod:`converter.hf_import`). The provenance written
            (``source_file``, ``source_sha256``) is the file it was read from: arrays
            edited in memory are not detected, so save an edited checkpoint
            (:func:`~converter.save_haiku_checkpoint`) and convert that file.
        out: ``*.safetensors`` (recommended) or ``*.pt``; None keeps the converted state
            dict in memory (``result.state_dict``, ``result.build_model()``).
        model: force a model name; None detects it from the parameter names.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for floating tensors.
            float16 refuses weights beyond 65504 (``UsageError``) and counts the
            nonzero ones it makes subnormal or 0 (``result.underflow``; not refused).
        config: overrides of configuration values the checkpoint's shapes cannot reveal.
        mapping: a mapping YAML file to use instead of the bundled one.
        verify: run the JAX reference on the same inputs first (needs the ``[jax]``
            extra) and store the result; outside tolerance raises ``ParityError`` and
            nothing is written. With ``dtype`` float16/bfloat16 the weights checked are
            the rounded ones that are written (tolerance: ``converter.verify``).
        overwrite: False refuses an existing ``out`` (``OutputError``), up front and
            again when the file is put in place (one another process wrote meanwhile
            is kept); ``out`` is never allowed to be ``path`` or ``mapping``.
        progress: called with a one-line message per step (the CLI's stderr lines);
            silent by default.
        extra_metadata: more str -> str entries for the file's metadata; the keys
            the converter writes itself (:data:`RESERVED_METADATA`) are refused
            (``UsageError``).
    """
    started = time.perf_counter()
    check_extra_metadata(extra_metadata)  # before reading the checkpoint
    dtype = dtype or "float32"
    if dtype not in TORCH_DTYPES:
        raise UsageError(
            f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}"
        )
    if out is not None:
        output_format(Path(out))  # fail on a bad suffix before reading 800 MB
        check_output_path(out)  # and on a missing folder (it failed after verifying)
        source = path.path if isinstance(path, HaikuCheckpoint) else path
        check_outputs(out, (source, mapping), force=overwrite)
    if isinstance(path, HaikuCheckpoint):
        checkpoint = path
    else:
        progress(f"reading {path}")
        checkpoint = load_haiku_checkpoint(path)
    # A transformers checkpoint (convert_hf) is no pickle: it names no globals.
    kind = f"protocol {checkpoint.protocol}" if checkpoint.globals else "no pickle"
    progress(
        f"read {checkpoint.size_bytes / 1e6:.1f} MB, {kind}, "
        f"sha256 {checkpoint.sha256[:16]}..."
    )
    prepared = prepare(checkpoint, model, config=config, mapping=mapping)
    progress(
        f"model {prepared.model} ({prepared.config.describe()}), mapping "
        f"{prepared.mapping.file}: {prepared.report.used} tensors, "
        f"{len(prepared.report.dropped)} dropped"
    )
    underflow = prepared.check_dtype_range(dtype)  # before minutes of verifying
    parity, parity_report = None, None
    if verify:
        from converter.verify import verify_prepared

        progress("verifying against the JAX reference")
        parity_report = verify_prepared(prepared, dtype=dtype, progress=progress)
        parity = parity_report.as_dict()
        parity_report.raise_if_failed()
    state_dict = None
    fmt = None
    if out is not None:
        out = Path(out)
        fmt = output_format(out)
        progress(f"writing {out}")
        metadata = write_converted(
            prepared, out, dtype, parity, extra_metadata, overwrite=overwrite
        )
    else:
        metadata = build_metadata(prepared, dtype, parity, extra_metadata)
        state_dict = prepared.state_dict(TORCH_DTYPES[dtype])
    return ConversionResult(
        model=prepared.model,
        config=config_to_dict(prepared.config_object()),
        size_preset=prepared.config.preset,
        source=checkpoint.path,
        source_sha256=checkpoint.sha256,
        mapping=prepared.mapping.name,
        mapping_sha256=prepared.mapping.sha256,
        report=prepared.report,
        output=out,
        format=fmt,
        dtype=dtype,
        metadata=metadata,
        parity_report=parity_report,
        seconds=time.perf_counter() - started,
        state_dict=state_dict,
        underflow=underflow,
    )
