"""ONNX graphs of the six models, checked with onnxruntime at export.

``export_onnx(converted, "model.onnx")`` traces the perceiver_torch model (opset 17,
dynamic batch) with its CPU fast paths off, so that the graph is the plain
computation (``perceiver_torch.fast_paths.plain()``): no oneDNN linear kernel, no
attention projections folded across the dot product, no skipping of padding, no
folded video decoder. It then runs the graph with onnxruntime and the perceiver_torch
model (as users run it, fast paths on) on the same deterministic inputs, requires
max |diff| / max |perceiver_torch| <= 1e-4 for every output, and stores that result
and the provenance in the graph's ``metadata_props``; nothing is written otherwise.

Inputs and outputs (PyTorch layouts, float32, batch dimension dynamic). The graph
computes in float32 whatever dtype the file stores (``convert --dtype``): its float16
or bfloat16 weights are held as float32, the same values (onnxruntime's CPU kernels
lack bfloat16), and the check runs perceiver_torch in float32 too.

- language_perceiver: ``input_ids`` int64 [B, T], ``attention_mask`` int64 [B, T]
  (T = max_seq_len) -> ``logits`` [B, T, V]
- imagenet_*: ``images`` [B, 3, H, W] -> ``logits`` [B, classes]
- optical_flow: ``frames`` [B, 2, 3, H, W] in [-1, 1] -> ``flow`` [B, 2, H, W] pixels
- video_autoencoding: one graph with the subsample indices as inputs: ``images``
  [B, T, 3, H, W], ``audio`` [B, S], ``image_index`` int64 [n] (flat indices over
  T*H*W), ``audio_index`` int64 [m] (audio patches) -> ``image_out`` [B, n, 3],
  ``audio_out`` [B, 16 m], ``label_logits`` [B, classes]; n and m are dynamic (the
  graph decodes its queries in one chunk, where perceiver_torch takes 8,192 at a
  time; the colab's chunks hold 6,272 image points). An index outside
  [0, T*H*W) or [0, audio patches) (negative ones too) fails in onnxruntime's Gather; the
  graph cannot raise perceiver_torch's InputError.

Needs the ``[onnx]`` extra (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch

from converter._version import __version__
from converter.errors import (
    OutputError,
    ParityError,
    check_positive_int,
    extra_import_error,
)
from converter.progress import Progress, quiet
from perceiver_torch import fast_paths

OPSET = 17
TOLERANCE = 1e-4
# "dtype": the converted file's storage dtype (the graph's float32 weights of a
# bfloat16 file hold bfloat16 values, not those of source_sha256's file).
_PROVENANCE_KEYS = ("model", "config", "source_file", "source_sha256", "mapping",
                    "mapping_sha256", "converter", "dtype", "hf_source")


def require_onnx() -> Tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        # A missing optional extra: exit 2, as for run's media libraries.
        raise extra_import_error(
            error,
            f"ONNX export needs onnx and onnxruntime ({error}); install them with "
            "`pip install 'perceiver-convert[onnx]'`",
            "onnx",
        ) from None
    return onnx, onnxruntime


class _VideoGraph(torch.nn.Module):
    """The video model with the subsample indices as tensors (one graph per call)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, audio, image_index, audio_index):
        out = self.model(images, audio, subsample={"image": image_index, "audio": audio_index})
        return out["image"], out["audio"], out["label"]


@dataclass
class _Spec:
    module: torch.nn.Module
    inputs: Dict[str, torch.Tensor]
    outputs: List[str]
    dynamic: Dict[str, Dict[int, str]]
    form: str


def _spec(model: torch.nn.Module, name: str, seed: int, batch: int) -> _Spec:
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    if name == "language_perceiver":
        length = c.max_seq_len
        ids = torch.randint(6, c.vocab_size, (batch, length), generator=gen)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for row in range(batch):  # real tokens then padding, as the tokenizer pads
            real = max(1, (length * (3 - row % 2)) // 4 - row)
            mask[row, :real] = 1
            ids[row, real:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        return _Spec(model, inputs, ["logits"],
                     {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                      "logits": {0: "batch"}}, "one graph")
    if name.startswith("imagenet_"):
        height, width = c.training_image_size
        images = torch.randn(batch, 3, height, width, generator=gen)
        return _Spec(model, {"images": images}, ["logits"],
                     {"images": {0: "batch"}, "logits": {0: "batch"}}, "one graph")
    if name == "optical_flow":
        height, width = c.image_size
        frames = torch.rand(batch, 2, 3, height, width, generator=gen) * 2 - 1
        return _Spec(model, {"frames": frames}, ["flow"],
                     {"frames": {0: "batch"}, "flow": {0: "batch"}}, "one graph")
    if name == "video_autoencoding":
        t, (h, w) = c.num_frames, c.image_size
        images = torch.rand(batch, t, 3, h, w, generator=gen)
        audio = 0.3 * torch.randn(batch, t * c.audio_samples_per_frame, generator=gen)
        chunk = model.chunk_subsamples()[c.num_chunks // 2]
        inputs = {"images": images, "audio": audio, "image_index": chunk["image"],
                  "audio_index": chunk["audio"]}
        return _Spec(
            _VideoGraph(model), inputs, ["image_out", "audio_out", "label_logits"],
            {"images": {0: "batch"}, "audio": {0: "batch"}, "image_index": {0: "points"},
             "audio_index": {0: "patches"}, "image_out": {0: "batch", 1: "points"},
             "audio_out": {0: "batch", 1: "samples"}, "label_logits": {0: "batch"}},
            "one graph taking the subsample indices (image_index, audio_index) as inputs",
        )
    raise ValueError(f"unknown model {name!r}")


def _torch_outputs(spec: _Spec) -> Dict[str, np.ndarray]:
    with torch.no_grad():
        out = spec.module(*spec.inputs.values())
    out = out if isinstance(out, tuple) else (out,)
    return {name: value.numpy() for name, value in zip(spec.outputs, out)}


def _compare(reference: np.ndarray, actual: np.ndarray) -> Dict[str, Any]:
    reference = reference.astype(np.float64)
    actual = actual.astype(np.float64)
    if reference.shape != actual.shape:
        return {"shape": list(actual.shape), "max_abs_diff": float("inf"),
                "max_rel_diff": float("inf")}
    diff = float(np.max(np.abs(reference - actual))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return {
        "shape": list(reference.shape),
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")),
    }


def check_graph(path: Path, spec: _Spec, reference: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Runs ``path`` with onnxruntime (CPU) on ``spec.inputs`` against ``reference``."""
    _, onnxruntime = require_onnx()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in spec.inputs.items()}
    got = session.run(spec.outputs, feeds)
    rows = {name: _compare(reference[name], value) for name, value in zip(spec.outputs, got)}
    worst = max(row["max_rel_diff"] for row in rows.values())
    return {
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "reference": "perceiver_torch (fast paths on, as users run it)",
        "batch": int(next(iter(spec.inputs.values())).shape[0]),
        "outputs": rows,
        "max_rel_diff": worst,
        "tolerance": TOLERANCE,
        "passed": bool(worst <= TOLERANCE),
    }


@dataclass
class OnnxExportResult:
    model: str
    output: Path
    form: str
    opset: int
    check: Dict[str, Any]
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "output": str(self.output), "format": "onnx",
                "form": self.form, "opset": self.opset, "check": self.check,
                "notes": self.notes}


def export_onnx(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    batch: int = 2,
    progress: Progress = quiet,
    overwrite: bool = True,
) -> OnnxExportResult:
    """Writes and checks the ONNX graph of a file made by :func:`converter.convert`.

    The check runs at ``batch`` (2 by default; the graph was traced at 1, so the
    dynamic batch dimension is exercised). Raises ``ParityError`` (nothing written)
    when onnxruntime is farther than 1e-4 relative from perceiver_torch.
    ``out`` may not be ``path``; ``overwrite=False`` refuses an existing ``out`` up
    front and never replaces a file at ``out``, also one another process wrote
    meanwhile (``OutputError``; :func:`converter.atomic.publish`). The file is
    fsynced before it is put in place (:func:`converter.atomic.durable_publish`).
    """
    from converter.atomic import (
        check_output_path,
        check_outputs,
        durable_publish,
        refuse_non_utf8_name,
        temporary_name,
    )
    from converter.converted_files import read_converted
    from converter.exporter import check_stored_tensors, load_float32, stored_low_precision

    onnx, _ = require_onnx()
    check_positive_int(batch, "batch")
    out = check_output_path(out)
    refuse_non_utf8_name(out, "torch.onnx.export")
    if out.suffix.lower() != ".onnx":
        raise OutputError(f"{out}: name the ONNX file *.onnx")
    # Up front, as convert and export: a converted file named *.onnx was replaced by
    # its own graph, and an existing out was refused only after the trace and check.
    check_outputs(out, (path,), force=overwrite)
    state_dict, metadata = read_converted(Path(path))
    name = metadata["model"]
    check_stored_tensors(Path(path), name, json.loads(metadata["config"]), state_dict)
    model = load_float32(path)
    notes = []
    low_precision = stored_low_precision(state_dict)
    if low_precision:
        notes.append(
            f"the weights are stored as {low_precision}; the graph holds them as float32 "
            "(the same values) and computes in float32, checked against perceiver_torch "
            "in float32"
        )
    del state_dict
    trace = _spec(model, name, seed, 1)
    check = _spec(model, name, seed + 1, batch)
    reference = _torch_outputs(check)  # fast paths on: the model as users run it
    temp = temporary_name(out)
    try:
        progress(f"tracing {name} (opset {OPSET}, dynamic batch, fast paths off)")
        with fast_paths.plain(), torch.no_grad(), _quiet_warnings():
            torch.onnx.export(
                trace.module,
                tuple(trace.inputs.values()),
                str(temp),
                input_names=list(trace.inputs),
                output_names=trace.outputs,
                dynamic_axes=trace.dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        progress(f"checking the graph with onnxruntime (batch {batch})")
        result = check_graph(temp, check, reference)
        if not result["passed"]:
            raise ParityError(
                f"{name}: onnxruntime is {result['max_rel_diff']:.2e} (relative) from "
                f"perceiver_torch, above {TOLERANCE:g}; nothing was written"
            )
        graph = onnx.load(str(temp))
        props = {f"perceiver_convert.{k}": metadata[k] for k in _PROVENANCE_KEYS if k in metadata}
        props["perceiver_convert.exporter"] = f"perceiver-convert {__version__}"
        props["perceiver_convert.form"] = trace.form
        props["perceiver_convert.onnx_check"] = json.dumps(result, sort_keys=True)
        for key, value in props.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        graph.producer_name = "perceiver-convert"
        graph.producer_version = __version__
        onnx.save(graph, str(temp))
        durable_publish(temp, out, overwrite=overwrite)
    except OSError as error:  # disk full: one line, exit 3 (the finally removes temp)
        from converter.atomic import write_failed

        raise write_failed(out, error) from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return OnnxExportResult(name, out, trace.form, OPSET, result, notes)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # The tracer warns about every Python int taken from a shape; the graph is
        # checked numerically at another batch size instead.
        warnings.simplefilter("ignore")
        yield


def format_onnx_check(check: Dict[str, Any]) -> str:
    lines = [f"{check['runtime']} against {check['reference']}, batch {check['batch']}"]
    for name, row in check["outputs"].items():
        lines.append(
            f"  {name:<8} {str(row['shape']):<20} max|diff| {row['max_abs_diff']:.2e}  "
            f"max rel {row['max_rel_diff']:.2e}"
        )
    verdict = "ok" if check["passed"] else "FAIL"
    lines.append(f"  worst {check['max_rel_diff']:.2e} (tolerance {check['tolerance']:g}): {verdict}")
    return "\n".join(lines)
