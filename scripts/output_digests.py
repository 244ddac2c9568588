"""Digests of what the converter writes for the six tiny fixtures, to show a refactor
changed nothing.

For each model: ``perceiver-convert fixture NAME --size tiny`` -> ``convert`` ->
``export``, all through the CLI in-process, then the sha256 of every converted tensor
(name, dtype, shape and bytes), of the converted file's metadata, and of the exported
pickle. Record before a change, compare after it:

    python scripts/output_digests.py record before.json
    python scripts/output_digests.py compare before.json

``--size full`` does the same at the official sizes (GBs for all six; pick models
with ``--models imagenet_conv video_autoencoding``).

``compare`` requires the tensors, the exported pickles and every metadata field to be
equal, except the fields that name the mapping's text and the converter's version
(``mapping_sha256``, ``converter``): those change legitimately when a mapping file's
text changes. Exit 0 when equal, 1 otherwise (each difference printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

# Run from a checkout: digest its converter, not an installed copy (which would
# make "record" before a change and "compare" after it agree whatever changed).
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "converter" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

from script_args import output_file  # noqa: E402  (beside this script)

# Provenance fields that may change with the text of a mapping or the version.
_MAY_CHANGE = ("mapping_sha256", "converter")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(workdir: Path, size: str = "tiny", names: Any = None) -> Dict[str, Any]:
    """``{model: {"tensors": {name: sha256}, "metadata": {...}, "export": sha256}}``."""
    import torch
    from click.testing import CliRunner
    from safetensors import safe_open

    from converter.cli import main
    from converter.registry import MODEL_NAMES

    def cli(*args: Any) -> None:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        if result.exit_code != 0:
            raise SystemExit(f"perceiver-convert {' '.join(map(str, args))}: {result.output}")

    out: Dict[str, Any] = {}
    for name in names or MODEL_NAMES:
        source = workdir / f"{name}.pickle"
        converted = workdir / f"{name}.safetensors"
        exported = workdir / f"{name}.export.pickle"
        cli("fixture", name, "--size", size, "-o", source)
        cli("convert", source, "-o", converted, "-q")
        cli("export", converted, "-o", exported)
        tensors = {}
        with safe_open(str(converted), framework="pt") as handle:
            metadata = dict(handle.metadata())
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                header = f"{tensor.dtype}{list(tensor.shape)}".encode()
                raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                tensors[key] = _sha256(header + raw)
        out[name] = {
            "tensors": tensors,
            "metadata": metadata,
            "export": _sha256(exported.read_bytes()),
        }
        for path in (source, converted, exported):
            path.unlink()  # full size: one model's files at a time
    return out


def compare(before: Dict[str, Any], after: Dict[str, Any]) -> list:
    """The differences between two digest documents, one line each."""
    problems = []
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            problems.append(f"{name}: only in one document")
            continue
        b, a = before[name], after[name]
        if b["tensors"] != a["tensors"]:
            changed = sorted(
                k for k in set(b["tensors"]) | set(a["tensors"])
                if b["tensors"].get(k) != a["tensors"].get(k)
            )
            problems.append(f"{name}: tensors differ: {', '.join(changed[:10])}")
        if b["export"] != a["export"]:
            problems.append(f"{name}: exported pickle differs")
        for key in sorted(set(b["metadata"]) | set(a["metadata"])):
            if key in _MAY_CHANGE:
                continue
            if b["metadata"].get(key) != a["metadata"].get(key):
                problems.append(
                    f"{name}: metadata {key}: {b['metadata'].get(key)!r} -> "
                    f"{a['metadata'].get(key)!r}"
                )
    return problems


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["record", "compare"])
    parser.add_argument("document", type=Path)  # record: checked below
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--models", nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.action == "compare" and not args.document.is_file():
        parser.error(f"{args.document}: no such file (record it first)")
    if args.action == "record":
        try:
            output_file(str(args.document))
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    from converter.registry import MODEL_NAMES

    unknown = [name for name in args.models or () if name not in MODEL_NAMES]
    if unknown:
        parser.error(f"--models: unknown model(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(MODEL_NAMES)}")
    with tempfile.TemporaryDirectory() as folder:
        current = digests(Path(folder), args.size, args.models)
    if args.action == "record":
        args.document.write_text(json.dumps(current, indent=1, sort_keys=True))
        print(f"recorded {len(current)} models in {args.document}")
        return 0
    problems = compare(json.loads(args.document.read_text()), current)
    for line in problems:
        print(line)
    print("identical" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
