"""transformers, onnx and onnxruntime stay optional: converting and perceiver_torch
work without them, and the exports that need them say how to install them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_converting_works_without_transformers_and_onnx(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("transformers", "onnx", "onnxruntime", "onnxscript"):
            sys.modules[name] = None  # any import of them fails
        from click.testing import CliRunner
        import perceiver_torch, converter
        from converter.cli import main

        run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])
        folder = {str(tmp_path)!r}
        assert run("fixture", "imagenet_conv", "-o", folder + "/f.pickle").exit_code == 0
        assert run("convert", folder + "/f.pickle", "-o", folder + "/c.safetensors").exit_code == 0
        assert run("inspect", folder + "/c.safetensors").exit_code == 0
        perceiver_torch.load(folder + "/c.safetensors")
        hf = run("export", folder + "/c.safetensors", "-o", folder + "/hf", "--format", "hf")
        assert hf.exit_code == 2, hf.output
        assert "pip install 'perceiver-convert[hf]'" in hf.output
        ox = run("export", folder + "/c.safetensors", "-o", folder + "/m.onnx")
        assert ox.exit_code == 2, ox.output
        assert "pip install 'perceiver-convert[onnx]'" in ox.output
        assert "transformers" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
