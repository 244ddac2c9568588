"""Full-size tier: --verify of float16/bfloat16 weights at the official sizes.

The default reduced-precision tolerance (16 x the dtype's unit roundoff, see
converter/verify.py) must hold for the deepest official models, whose rounding
error was measured at 1.4-1.8 u; this keeps that figure checked.
"""

from __future__ import annotations

import json

import pytest

from converter.fixtures import write_fixture
from converter.verify import ROUNDING_TOLERANCE
from helpers import run_cli

pytestmark = [pytest.mark.full, pytest.mark.jax]


@pytest.mark.parametrize("name", ["imagenet_fourier", "language_perceiver"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_full_size_reduced_precision_parity(tmp_path, name, dtype):
    pytest.importorskip("jax")
    pytest.importorskip("haiku")
    source = tmp_path / f"{name}.pickle"
    write_fixture(name, source, size="full", seed=11, protocol=3, container="flatmapping")
    result = run_cli("verify", source, "--dtype", dtype, "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtype"] == dtype and report["passed"]
    assert report["tolerance"] == ROUNDING_TOLERANCE[dtype]
    assert report["max_relative"] <= report["tolerance"]
