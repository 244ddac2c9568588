"""Shared test helpers: where the golden data lives and the list of official models."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import pytest

from converter.registry import MODEL_NAMES

# The oneDNN fast paths run only on CPUs where they are the faster kernel
# (linear.onednn_linear_preferred, linear.onednn_attention_preferred); the suite takes
# them on every CPU whose torch has the kernel, so that they are tested everywhere
# (subprocesses inherit this). The paths a CPU leaves them for are the plain path's
# kernels, which fast_paths.plain() tests.
os.environ.setdefault("PERCEIVER_TORCH_ONEDNN", "1")

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"


def golden_checkpoint_path(name: str) -> Path:
    """The tiny official-format checkpoint of model ``name`` (in the repository)."""
    path = GOLDEN_DIR / name / "checkpoint.pickle"
    assert path.is_file(), f"golden file {path} is missing from the checkout"
    return path


@pytest.fixture(params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    """Each of the six official model names in turn."""
    return request.param


@pytest.fixture
def golden_path() -> Callable[[str], Path]:
    """``golden_path(name)``: path of model ``name``'s golden checkpoint."""
    return golden_checkpoint_path


@pytest.fixture
def pipes(tmp_path):
    """``pipe(name, data)``: a named pipe that gives ``data`` to its first reader and
    nothing (end of file at once) to any later one, as ``<(cat frame.png)`` does."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    made, stop = [], threading.Event()

    def serve(path: Path, data: bytes) -> None:
        first = True
        while not stop.is_set():
            with open(path, "wb") as handle:  # blocks until a reader opens it
                if first and not stop.is_set():
                    handle.write(data)
            first = False

    def pipe(name: str, data: bytes) -> Path:
        path = tmp_path / name
        os.mkfifo(path)
        threading.Thread(target=serve, args=(path, data), daemon=True).start()
        made.append(path)
        return path

    yield pipe
    stop.set()
    for path in made:  # release a writer still waiting for a reader
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
