"""Helpers that several test modules share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from converter.cli import main


def run_cli(*args: Any) -> Result:
    """Runs ``perceiver-convert ARGS`` in-process (stdout and stderr kept apart).

    An exception escaping the CLI fails the test instead of turning into exit code 1,
    which would be indistinguishable from a parity failure.
    """
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_same_tree(got: dict, expected: dict) -> None:
    """Bit-identical ``{module: {param: array}}`` trees: the same names (the written
    order is sorted), dtypes, shapes and bytes."""
    assert list(got) == sorted(expected)
    for module, params in expected.items():
        assert list(got[module]) == sorted(params), module
        for name, array in params.items():
            back = got[module][name]
            assert back.dtype == array.dtype, (module, name)
            assert back.shape == array.shape, (module, name)
            assert back.tobytes() == array.tobytes(), (module, name)


def assert_kept_the_other_runs_file(result: Result, out: Path, other: bytes) -> None:
    """A CLI write without --force whose output appeared meanwhile (another run):
    exit 2 with the one-line refusal, the other run's bytes kept and no temporary
    file left beside them."""
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"refusing to overwrite {out}" in result.stderr
    assert "appeared while" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == other
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file
