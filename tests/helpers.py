"""Helpers that several test modules share."""

from __future__ import annotations

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
