"""The model registry and the parameter trees of the six official checkpoints.

The trees are data shipped inside the package (``converter/data/trees/*.tsv``, read
with :mod:`importlib.resources` so that a wheel install finds them too): one row per
array, ``module  param  shape  dtype``. ``size="full"`` gives the released
checkpoints, ``size="tiny"`` the tiny golden checkpoints of ``tests/data/golden``.

A tree maps ``{module_path: {param_name: (shape, dtype)}}``, the same two-level
layout :class:`converter.haiku_reader.HaikuCheckpoint` uses for arrays, so the two compare
directly (see :func:`describe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Dict, Iterator, Mapping, Tuple

import numpy as np

__all__ = [
    "DOWNLOAD_BASE_URL",
    "MODEL_NAMES",
    "MODELS",
    "SIZES",
    "ModelInfo",
    "ParamTree",
    "Spec",
    "SpecTree",
    "describe",
    "model_info",
    "official_tree",
]

#: ``(shape, dtype name)`` of one array, e.g. ``((262, 768), "float32")``.
Spec = Tuple[Tuple[int, ...], str]
#: ``{module_path: {param_name: Spec}}``.
SpecTree = Dict[str, Dict[str, Spec]]

DOWNLOAD_BASE_URL = "https://storage.googleapis.com/perceiver_io/"
SIZES = ("full", "tiny")


@dataclass(frozen=True)
class ModelInfo:
    """What the project knows about one official checkpoint file.

    ``wrapped`` is the file layout: ``True`` when ``pickle.load`` of the official file
    returns ``{'params': ..., 'state': ...}`` (the three ImageNet models), ``False``
    when it returns the parameter mapping itself.
    """

    name: str
    official_file: str
    wrapped: bool
    has_state: bool
    description: str

    @property
    def url(self) -> str:
        """Download address of the official file (not reachable from every machine)."""
        return DOWNLOAD_BASE_URL + self.official_file


MODELS: Dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "language_perceiver",
            "language_perceiver_io_bytes.pickle",
            wrapped=False,
            has_state=False,
            description="masked language modelling on UTF-8 bytes",
        ),
        ModelInfo(
            "imagenet_learned",
            "imagenet_learned_position_encoding.pystate",
            wrapped=True,
            has_state=False,
            description="ImageNet classification, learned position encoding",
        ),
        ModelInfo(
            "imagenet_fourier",
            "imagenet_fourier_position_encoding.pystate",
            wrapped=True,
            has_state=False,
            description="ImageNet classification, Fourier position encoding",
        ),
        ModelInfo(
            "imagenet_conv",
            "imagenet_conv_preprocessing.pystate",
            wrapped=True,
            has_state=True,
            description="ImageNet classification, conv + BatchNorm preprocessing",
        ),
        ModelInfo(
            "optical_flow",
            "optical_flow_checkpoint.pystate",
            wrapped=False,
            has_state=False,
            description="optical flow between two frames",
        ),
        ModelInfo(
            "video_autoencoding",
            "video_autoencoding_checkpoint.pystate",
            wrapped=False,
            has_state=False,
            description="Kinetics video + audio + label autoencoding",
        ),
    )
}

MODEL_NAMES: Tuple[str, ...] = tuple(MODELS)


def model_info(name: str) -> ModelInfo:
    """Return the registry entry of model ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`MODEL_NAMES` (the message lists them).
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}"
        ) from None


@dataclass(frozen=True)
class ParamTree:
    """The arrays of one official checkpoint: names, shapes and dtypes, no values.

    ``params`` and ``state`` are ``{module_path: {param_name: (shape, dtype)}}``.
    ``state`` is ``{}`` for every model but ``imagenet_conv`` (BatchNorm EMA);
    ``wrapped`` says whether the file stores ``{'params', 'state'}`` (then even an
    empty state is written) or the params alone.
    """

    name: str
    size: str
    params: SpecTree
    state: SpecTree
    wrapped: bool

    def iter_specs(
        self, include_state: bool = True
    ) -> Iterator[Tuple[str, str, str, Spec]]:
        """Yield ``(collection, module, param, (shape, dtype))`` in sorted order.

        ``collection`` is ``"params"`` or ``"state"``.
        """
        collections = [("params", self.params)]
        if include_state:
            collections.append(("state", self.state))
        for collection, tree in collections:
            for module in sorted(tree):
                for param in sorted(tree[module]):
                    yield collection, module, param, tree[module][param]

    def num_params(self, include_state: bool = False) -> int:
        """Number of scalar values (parameters) in the tree."""
        return sum(
            math.prod(shape) for _, _, _, (shape, _) in self.iter_specs(include_state)
        )

    def nbytes(self, include_state: bool = False) -> int:
        """Bytes the arrays take in memory (and, give or take framing, on disk)."""
        return sum(
            math.prod(shape) * np.dtype(dtype).itemsize
            for _, _, _, (shape, dtype) in self.iter_specs(include_state)
        )


def _parse_shape(text: str, where: str) -> Tuple[int, ...]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"{where}: shape {text!r} is not of the form [d0, d1, ...]")
    inner = text[1:-1].strip()
    if not inner:
        return ()
    try:
        dims = tuple(int(part) for part in inner.split(","))
    except ValueError:
        raise ValueError(
            f"{where}: shape {text!r} has a non-integer dimension"
        ) from None
    if any(d < 0 for d in dims):
        raise ValueError(f"{where}: shape {text!r} has a negative dimension")
    return dims


def _read_tsv(relative: str) -> SpecTree:
    """Parse one shipped ``.tsv`` tree file (``relative`` to ``converter/data``)."""
    resource = resources.files("converter.data").joinpath(relative)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        # A broken install (package data not shipped) must say so, not KeyError later.
        raise FileNotFoundError(
            f"tree file converter/data/{relative} is missing from the installed "
            "package; reinstall perceiver-convert (package_data must include "
            "trees/*.tsv and trees/tiny/*.tsv)"
        ) from None
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != ["module", "param", "shape", "dtype"]:
        raise ValueError(
            f"converter/data/{relative}: first line must be the header "
            "'module\\tparam\\tshape\\tdtype'"
        )
    tree: SpecTree = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"converter/data/{relative}:{number}"
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(
                f"{where}: expected 4 tab-separated fields, got {len(fields)}"
            )
        module, param, shape_text, dtype = fields
        shape = _parse_shape(shape_text, where)
        np.dtype(dtype)  # fail here, naming the row, rather than in a consumer
        if param in tree.setdefault(module, {}):
            raise ValueError(f"{where}: {module}/{param} is listed twice")
        tree[module][param] = (shape, dtype)
    return tree


def official_tree(name: str, size: str = "full") -> ParamTree:
    """Return the parameter tree of official model ``name``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        size: ``"full"`` (the released checkpoint) or ``"tiny"`` (the golden test
            checkpoints).

    Raises:
        ValueError: unknown model name or size (the message lists the valid ones).
    """
    info = model_info(name)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    prefix = "trees/" if size == "full" else "trees/tiny/"
    params = _read_tsv(f"{prefix}{name}.tsv")
    state = _read_tsv(f"{prefix}{name}.state.tsv") if info.has_state else {}
    return ParamTree(
        name=name, size=size, params=params, state=state, wrapped=info.wrapped
    )


def describe(arrays: Mapping[str, Mapping[str, np.ndarray]]) -> SpecTree:
    """Return the ``{module: {param: (shape, dtype)}}`` tree of a tree of arrays.

    Use it to compare a loaded checkpoint with :func:`official_tree`.
    """
    return {
        module: {
            param: (
                tuple(int(d) for d in np.shape(value)),
                np.asarray(value).dtype.name,
            )
            for param, value in params.items()
        }
        for module, params in arrays.items()
    }
