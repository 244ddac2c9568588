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


def test_an_extra_that_is_installed_but_fails_to_load_is_not_called_missing(tmp_path) -> None:
    """Under a memory limit (ulimit -v) a library's shared object cannot be mapped and
    its import fails with an ImportError that is not ModuleNotFoundError: the exports
    and verify said "install it", for a package that is installed. Stand-ins for
    transformers, onnx and jax that fail so are put first on the path."""
    for name in ("transformers", "onnx", "perceiver_jax"):
        (tmp_path / f"{name}.py").write_text(
            f"raise ImportError('lib{name}.so: failed to map segment from shared "
            f"object', name={name!r})\n"
        )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from converter.errors import UsageError
        from converter.hf import require_transformers
        from converter.onnx_export import require_onnx
        from converter.verify import require_jax

        for require, extra in ((require_transformers, "hf"), (require_onnx, "onnx"),
                               (require_jax, "jax")):
            try:
                require()
            except UsageError as error:
                message = str(error)
                assert "is installed but could not be loaded" in message, message
                assert "failed to map segment" in message, message
                assert f"--force-reinstall 'perceiver-convert[{{extra}}]'" in message
                assert error.exit_code == 2
            else:
                raise AssertionError(f"{{require.__name__}} passed")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
