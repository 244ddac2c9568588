#!/usr/bin/env python
"""How far each model's fast paths and its plain path are from float64, at full size.

For each official model (random weights, the official configuration), one input is
run three ways: with the fast paths of ``perceiver_torch.fast_paths`` on (float32),
with them off (float32: the computation that reads line for line against the
reference) and with them off in float64 (the same weights, exactly). The table shows
max |x - float64| / max |float64| for both float32 runs: a fast path is as faithful as
the plain path when its figure is of the same order (the tests require at most 4x the
plain path's, see tests/float64_reference.py).

Inputs: language, 2048 tokens of which the last 548 are padding (so the padding skip
runs); ImageNet, one 224x224 image; flow, one 368x496 tile; video, one of the colab's
128 decoder chunks decoded from the same float32 latents (the decoder is what its fast
path changes). Float64 flow takes a few minutes on 2 cores.

    python scripts/fast_path_errors.py                     # all six
    python scripts/fast_path_errors.py --models optical_flow --json errors.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "perceiver_torch" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

import perceiver_torch as pt  # noqa: E402
from perceiver_torch import fast_paths  # noqa: E402
from script_args import output_file, positive_int  # noqa: E402  (beside this script)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random, non-zero values where the official init leaves zeros (e.g. the flow
    head), so that no output is trivially exact."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().max() > 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def case(name: str) -> Tuple[Callable[[torch.nn.Module, torch.dtype], Any], str]:
    """(run(model, dtype) -> outputs, description of the input)."""
    gen = torch.Generator().manual_seed(1)
    if name == "language_perceiver":
        ids = torch.randint(6, 262, (1, 2048), generator=gen)
        mask = torch.ones_like(ids)
        mask[:, 1500:] = 0
        return (lambda m, dtype: m(ids * mask, mask)), "2048 tokens, 548 padding"
    if name.startswith("imagenet"):
        images = torch.randn(1, 3, 224, 224, generator=gen)
        return (lambda m, dtype: m(images.to(dtype))), "one 224x224 image"
    if name == "optical_flow":
        frames = torch.rand(1, 2, 3, 368, 496, generator=gen) * 2 - 1
        return (lambda m, dtype: m(frames.to(dtype))), "one 368x496 tile"
    images = torch.rand(1, 16, 3, 224, 224, generator=gen)
    audio = torch.randn(1, 30720, generator=gen)
    subsample = {"image": torch.arange(6272), "audio": torch.arange(15)}
    latents = {}

    def decode(m: torch.nn.Module, dtype: torch.dtype) -> Any:
        if "z" not in latents:  # float32 latents, computed once
            latents["z"] = m.encode(images, audio)
        return m.decode(latents["z"].to(dtype), subsample)

    return decode, "decoder, one of 128 chunks (float32 latents)"


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.double() - exact).abs().max() / exact.abs().max())


def measure(name: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = randomize(pt.build(name)).eval()
    run, description = case(name)
    started = time.perf_counter()
    with torch.no_grad():
        fast = run(model, torch.float32)
        with fast_paths.plain():
            plain = run(model, torch.float32)
            exact = run(copy.deepcopy(model).double(), torch.float64)
    as_dict = lambda out: out if isinstance(out, dict) else {"output": out}  # noqa: E731
    fast, plain, exact = as_dict(fast), as_dict(plain), as_dict(exact)
    return {
        "model": name,
        "input": description,
        "outputs": {
            key: {
                "fast": relative_error(fast[key], exact[key]),
                "plain": relative_error(plain[key], exact[key]),
            }
            for key in exact
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(pt.MODEL_NAMES),
                        choices=list(pt.MODEL_NAMES))
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", type=output_file, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} threads")
    print("| model | input | output | fast paths vs float64 | plain vs float64 |")
    print("|---|---|---|---|---|")
    rows = []
    for name in args.models:
        row = measure(name)
        rows.append(row)
        for key, errors in row["outputs"].items():
            print(f"| {name} | {row['input']} | {key} | {errors['fast']:.2g} "
                  f"| {errors['plain']:.2g} |", flush=True)
    if args.json is not None:
        document = {"cpu": cpu_name(), "torch": torch.__version__, "rows": rows}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
