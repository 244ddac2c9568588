"""``perceiver-convert inspect`` for files other than official pickles.

Converted files (safetensors / .pt written by ``convert``: provenance, config, parity,
tensors), HuggingFace transformers folders and weight files (config, files, the
model they hold, tensors, the fidelity report of an ``export --format hf``) and ONNX
graphs (opset, inputs and outputs, operators, parameters, the onnxruntime check and
provenance in ``metadata_props``). A weights file of another project (no converted
metadata, no config.json, no transformers Perceiver names) is listed as such, exit 3.
Nothing is run from any file: safetensors is plain data, ``.pt``/``.bin`` are read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from converter.terminal import echo

OTHER_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".onnx")


def head_bytes(path: Path) -> bytes:
    """A file's first 16 bytes (enough for ``file_kind``), empty where unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16)
    except OSError:
        return b""


def _is_torch_archive(path: Path) -> bool:
    """A torch.save zip archive (its ``data.pkl``), not any zip file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _is_onnx(path: Path) -> bool:
    """An ONNX graph: by its name, or by its first bytes whatever its name."""
    from converter.haiku_reader import looks_like_onnx

    return path.suffix.lower() == ".onnx" or looks_like_onnx(head_bytes(path))


def is_other(path: Path) -> bool:
    """Whether ``inspect`` describes ``path`` here rather than as an official pickle:
    a folder, an ONNX graph whatever its name, or a file of those suffixes unless its
    first bytes are a plain pickle's (an official file renamed .pt is still described
    as one, its globals listed)."""
    if path.is_dir():
        return True
    if path.suffix.lower() not in OTHER_SUFFIXES:
        # A converted file renamed (conv.pickle, conv.bak) is still described as one,
        # by its first bytes, as load, run, export and verify read it.
        from converter.haiku_reader import looks_like_onnx

        head = head_bytes(path)
        if looks_like_onnx(head) or not path.is_file():
            return looks_like_onnx(head)
        if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
            # A plain pickle, as the official files are: decided without importing
            # perceiver_torch (and torch), which inspect of a pickle never needs.
            return False
        from perceiver_torch.registry import file_kind

        kind = file_kind(head)
        return kind == "safetensors" or (kind == "torch" and _is_torch_archive(path))
    from perceiver_torch.registry import file_kind

    # An unreadable file's head is empty, "other": the describer names the problem.
    return file_kind(head_bytes(path)) != "pickle"


def _rows(tensors: Dict[str, Any]) -> List[Dict[str, Any]]:
    from converter.exporter import nonfinite_count

    rows = []
    for name, value in tensors.items():
        shape = list(value.shape)
        dtype = str(value.dtype).replace("torch.", "")
        count = 1
        for size in shape:
            count *= size
        itemsize = value.element_size() if hasattr(value, "element_size") else value.itemsize
        rows.append({"name": name, "shape": shape, "dtype": dtype, "values": count,
                     "bytes": count * itemsize, "nonfinite": nonfinite_count(value)})
    return rows


def _mark_nonfinite(document: Dict[str, Any]) -> Dict[str, Any]:
    """Adds ``ok``/``error``/``exit_code`` to a document whose tensors hold NaN/Inf
    (as ``inspect`` does for official pickles: the weights are corrupt, exit 3)."""
    from converter.errors import nonfinite_message

    bad = [row["name"] for row in document["tensors"] if row["nonfinite"]]
    if bad:
        document["ok"] = False
        document["exit_code"] = 3
        document["error"] = f"{nonfinite_message(bad)}; the weights are corrupt"
    return document


def _totals(rows: List[Dict[str, Any]]) -> Dict[str, int]:
    return {"tensors": len(rows), "values": sum(r["values"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows)}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError, RecursionError):  # shown as the text it is
        return value


def describe(path: Path) -> Dict[str, Any]:
    """One JSON-able document describing ``path`` (raises ConverterError if unreadable)."""
    from converter.hf_import import is_hf_input

    if _is_onnx(path):
        return _describe_onnx(path)
    if is_hf_input(path):
        return _describe_hf(path)
    return _describe_converted(path)


def _converted_format(path: Path) -> str:
    """"safetensors" or "pt", by the file's first bytes as it was read (a .pt file
    renamed *.safetensors said "safetensors")."""
    from perceiver_torch.registry import file_kind

    with open(path, "rb") as handle:
        return "safetensors" if file_kind(handle.read(16)) == "safetensors" else "pt"


def _describe_converted(path: Path) -> Dict[str, Any]:
    from converter.converted_files import read_converted

    state_dict, metadata = read_converted(path)
    rows = _rows(state_dict)
    parsed = {key: _json_or_text(value) for key, value in metadata.items()
              if key != "haiku_dropped"}
    return _mark_nonfinite({
        "path": str(path),
        "kind": "converted",
        "format": _converted_format(path),
        "model": metadata.get("model"),
        "metadata": parsed,
        "haiku_dropped": sorted(_json_or_text(metadata.get("haiku_dropped", "{}")) or {}),
        "totals": _totals(rows),
        "tensors": rows,
    })


def _describe_hf(path: Path) -> Dict[str, Any]:
    from converter.errors import ConverterError
    from converter.hf_import import (
        detect_model,
        looks_like_another_project,
        names_another_model,
        read_hf,
    )

    source = read_hf(path)
    import torch

    rows = _rows({k: torch.from_numpy(v) for k, v in source.tensors.items()})
    for row in rows:  # as the file stores them, not as the float32 copies read
        stored = source.file_dtypes.get(row["name"], row["dtype"])
        if stored != row["dtype"]:
            itemsize = torch.empty((), dtype=getattr(torch, stored)).element_size()
            row.update(dtype=stored, bytes=row["values"] * itemsize)
    try:
        model = detect_model(source)
        problem = None
    except ConverterError as error:
        model, problem = None, str(error)
    if problem is not None and looks_like_another_project(source):
        return _describe_another_projects(path, source, rows)
    if problem is not None and names_another_model(source):
        for named in (path, source.path):  # the report names the path itself
            problem = problem.removeprefix(f"{named}: ")
        return _describe_another_projects(path, source, rows, problem)  # its config's words
    folder = path if path.is_dir() else path.parent
    fidelity = folder / "fidelity.json"
    document = {
        "path": str(path),
        "kind": "huggingface",
        "weights": source.weights.name,
        "weights_format": source.kind,
        "weights_sha256": source.sha256,
        "files": sorted(p.name for p in folder.iterdir()) if path.is_dir() else [path.name],
        "architectures": (source.config or {}).get("architectures"),
        "model": model,
        "problem": problem,
        "config": source.config,
        # The dropped arrays' values (base64) are named, not printed.
        "metadata": {k: (sorted(_json_or_text(v) or {}) if k.endswith("haiku_dropped")
                         else _json_or_text(v)) for k, v in source.metadata.items()},
        "fidelity": json.loads(fidelity.read_text()) if fidelity.is_file() else None,
        "totals": _totals(rows),
        "tensors": rows,
    }
    return _mark_nonfinite(document)


def _describe_another_projects(path: Path, source: Any, rows: List[Dict[str, Any]],
                               error: Optional[str] = None) -> Dict[str, Any]:
    """A safetensors (or torch.save) file of some other project (or a folder of another
    transformers model, ``error`` then saying which): its tensors are listed, and, as
    for any other file that is not a checkpoint of ours or an official one, the
    verdict is exit 3."""
    from converter.hf_import import another_project_message

    what = "safetensors" if source.kind == "safetensors" else "torch.save"
    return {
        "path": str(path),
        "kind": "other",
        "format": what,
        "label": f"another project's {what} file",
        "ok": False,
        "exit_code": 3,
        "error": error or another_project_message(source),
        "sha256": source.sha256,
        "metadata": {k: _json_or_text(v) for k, v in source.metadata.items()},
        "totals": _totals(rows),
        "tensors": rows,
    }


def _describe_onnx(path: Path) -> Dict[str, Any]:
    from converter.errors import CheckpointError
    from converter.onnx_export import require_onnx

    onnx, _ = require_onnx()
    if path.stat().st_size == 0:  # onnx reads no bytes as an empty graph
        raise CheckpointError(
            f"{path}: the file is empty (0 bytes), e.g. an interrupted download or "
            "copy; export or download it again"
        )
    try:
        graph = onnx.load(str(path))
    except Exception as error:  # protobuf raises several types for a bad file
        raise CheckpointError(f"{path}: not a readable ONNX file ({error})") from None

    def value_info(entry: Any) -> Dict[str, Any]:
        tensor = entry.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": entry.name, "shape": dims,
                "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}

    import numpy as np
    from onnx import numpy_helper

    from converter.errors import nonfinite_message

    ops = collections.Counter(node.op_type for node in graph.graph.node)
    params = sum(int(np.prod(init.dims)) for init in graph.graph.initializer)
    # NaN/Inf weights: corrupt, as for every other kind of file inspect reads (exit 3).
    nonfinite = [init.name for init in graph.graph.initializer
                 if np.issubdtype((array := numpy_helper.to_array(init)).dtype, np.floating)
                 and not np.isfinite(array).all()]
    verdict = ({"ok": False, "exit_code": 3,
                "error": f"{nonfinite_message(nonfinite)}; the graph's weights are corrupt"}
               if nonfinite else {})
    return {
        "path": str(path),
        "kind": "onnx",
        "producer": f"{graph.producer_name} {graph.producer_version}".strip(),
        "opset": {op.domain or "ai.onnx": op.version for op in graph.opset_import},
        "inputs": [value_info(i) for i in graph.graph.input],
        "outputs": [value_info(o) for o in graph.graph.output],
        "nodes": len(graph.graph.node),
        "operators": dict(sorted(ops.items())),
        "initializers": len(graph.graph.initializer),
        "parameters": params,
        "metadata": {p.key: _json_or_text(p.value) for p in graph.metadata_props},
        "nonfinite_initializers": nonfinite,
        **verdict,
    }


def print_document(document: Dict[str, Any]) -> None:
    """The human form of :func:`describe`'s document (stdout)."""
    lines = [f"{document['path']}  ({document.get('label') or document['kind']})"]
    skip = {"path", "kind", "label", "tensors", "metadata", "config", "fidelity",
            "operators", "ok", "exit_code", "error"}
    for key, value in document.items():
        if key in skip or value is None:
            continue
        lines.append(f"  {key:<16} {value if not isinstance(value, (dict, list)) else json.dumps(value)}")
    for key in ("metadata", "config"):
        if document.get(key):
            lines.append(f"{key}:")
            for name, value in document[key].items():
                text = value if isinstance(value, str) else json.dumps(value)
                lines.append(f"  {name:<34} {text if len(text) < 200 else text[:197] + '...'}")
    if document.get("fidelity"):
        from converter.hf import format_fidelity

        lines.append(format_fidelity(document["fidelity"]))
    if document.get("operators"):
        lines.append("operators: " + ", ".join(f"{k} x{v}" for k, v in document["operators"].items()))
    if document.get("tensors"):
        width = max(len(r["name"]) for r in document["tensors"])
        lines.append("tensors:")
        for row in document["tensors"]:
            mark = f"  [{row['nonfinite']:,} NaN/Inf]" if row.get("nonfinite") else ""
            lines.append(f"  {row['name']:<{width}}  {str(row['shape']):<18} {row['dtype']:<8} "
                         f"{row['values']:>12,}{mark}")
        totals = document["totals"]
        lines.append(f"total: {totals['tensors']:,} tensors, {totals['values']:,} values, "
                     f"{totals['bytes']:,} bytes")
    echo("\n".join(lines))
