"""The README's table of HuggingFace fidelity reports at full size (random weights).

For each model: an official-format checkpoint with random weights at the official
size (``converter.fixtures``), converted, exported with ``export --format hf`` (which
writes fidelity.json), then one line per output. Each model runs in turn in this
process; the folders are removed afterwards. Needs the [hf] extra; minutes and a few
GB of memory (the optical-flow tile is the largest).

    python scripts/hf_fidelity.py --json fidelity-full.json [--models NAME ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout: use its converter and perceiver_torch, not an installed copy.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "converter" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

from converter.conversion import convert  # noqa: E402
from converter.fixtures import write_fixture  # noqa: E402
from converter.hf import export_hf  # noqa: E402
from converter.registry import MODEL_NAMES  # noqa: E402
from script_args import non_negative_int, output_file  # noqa: E402  (beside this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODEL_NAMES), default=list(MODEL_NAMES))
    parser.add_argument("--json", type=output_file, default=None)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        folder = Path(tempfile.mkdtemp(prefix=f"fidelity-{name}-"))
        try:
            started = time.perf_counter()
            write_fixture(name, folder / "official.pickle", size="full", seed=args.seed)
            convert(folder / "official.pickle", folder / "converted.safetensors")
            (folder / "official.pickle").unlink()
            result = export_hf(folder / "converted.safetensors", folder / "hf", seed=args.seed)
            for row in result.fidelity["outputs"]:
                rows.append({"model": name, "architecture": result.architecture, **row,
                             "notes": result.fidelity["notes"]})
                print(f"{name:<20} {row['output']:<22} max|diff| {row['max_abs_diff']:.2e}  "
                      f"max rel {row['max_rel_diff']:.2e}  argmax "
                      f"{row['argmax_agreement'] if row['argmax_agreement'] is not None else '-'}"
                      f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            gc.collect()
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
