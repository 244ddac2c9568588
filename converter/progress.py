"""The progress callback that the long operations take: called with a short message."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    """The default progress callback: says nothing."""
