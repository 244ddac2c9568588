#!/usr/bin/env python
"""The README's flow pictures, drawn by the flow pipeline's own renderers.

- ``flow_wheel_legend.png``: the Middlebury colour wheel (direction = hue, magnitude =
  saturation) as ``run flow`` draws it.
- ``synthetic_rotation_wheel.png`` / ``_hsv.png``: a known synthetic flow (a rotation
  about the picture's centre, u = -(y - cy) / 8, v = (x - cx) / 8 px) in both renderings.

    python scripts/flow_pictures.py docs/images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "perceiver_torch" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

from perceiver_torch.pipelines.flow_io import flow_to_hsv, flow_to_wheel, wheel_legend  # noqa: E402
from script_args import output_folder  # noqa: E402  (beside this script)


def rotation(height: int = 120, width: int = 200) -> np.ndarray:
    """(H, W, 2) flow of a rotation about the centre, in pixels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    return np.stack([-(y - cy) / 8, (x - cx) / 8], axis=-1).astype(np.float32)


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=output_folder)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    flow = rotation()
    pictures = {
        "flow_wheel_legend.png": wheel_legend(),
        "synthetic_rotation_wheel.png": flow_to_wheel(flow),
        "synthetic_rotation_hsv.png": flow_to_hsv(flow),
    }
    for name, picture in pictures.items():
        Image.fromarray(picture).save(args.folder / name)
        print(args.folder / name)


if __name__ == "__main__":
    main()
