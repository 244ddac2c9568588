"""Class names of the official models, as package data (one name per line, in the
order of the models' output units).

* ``imagenet.txt``: the 1000 ImageNet classes in the order of DeepMind's Perceiver
  ImageNet colab (the usual ILSVRC-2012 synset order: 0 tench ... 999 toilet tissue).
* ``kinetics700.txt``: the 700 Kinetics-700 classes in the order of the video
  autoencoding colab (alphabetical: 0 abseiling ...).

Where the lists come from (the colabs, with the commit) is recorded in the
repository's ``perceiver_torch/labels/SOURCES.md``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import List, Tuple

__all__ = ["class_names", "imagenet_labels", "kinetics700_labels"]


@lru_cache(maxsize=None)
def _read(name: str) -> Tuple[str, ...]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return tuple(line for line in text.split("\n") if line)


def imagenet_labels() -> Tuple[str, ...]:
    """The 1000 ImageNet class names, index = the classifier's output unit."""
    return _read("imagenet.txt")


def kinetics700_labels() -> Tuple[str, ...]:
    """The 700 Kinetics-700 class names, index = the autoencoder's label unit."""
    return _read("kinetics700.txt")


def class_names(num_classes: int, kind: str) -> List[str]:
    """Names for ``num_classes`` output units: the official list when the count is
    the official one (1000 for ``kind="imagenet"``, 700 for ``kind="kinetics700"``),
    otherwise ``"class N"`` (tiny test models have 10 classes, whose units mean nothing).
    """
    official = {"imagenet": imagenet_labels, "kinetics700": kinetics700_labels}[kind]()
    if num_classes == len(official):
        return list(official)
    return [f"class {i}" for i in range(num_classes)]
