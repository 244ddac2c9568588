"""Random-weight checkpoints in the exact official layout, for tests and demos.

:func:`make_fixture` fills every array of an official tree (:mod:`converter.registry`)
with random values: never zeros or constants (biases, norms, paddings, mask tokens
and the zero-initialised flow head included), so that a wrong mapping cannot pass by
accident, and scaled so that a forward pass stays of order one:

* ``w`` of a Linear ([in, out]): N(0, 1/in);
* ``w`` of a Conv (HWIO): N(0, 1/(kh*kw*cin));
* ``b``, ``bias``, ``offset``: 0.1 N(0, 1);
* ``scale`` (LayerNorm, BatchNorm): 1 + 0.1 N(0, 1);
* ``embeddings`` [V, D]: N(0, 1/D), so that logits = out @ E^T stay of order one;
* ``pos_embs`` (latents, queries, paddings, mask tokens): 0.5 N(0, 1);
* BatchNorm EMA ``average``/``hidden``: of the mean 0.1 N(0, 1); of the variance
  uniform(0.5, 1.5) (strictly positive);
* BatchNorm EMA ``counter``: a uniform int32 in [1, 2**20).

Each array has its own random stream, derived from (model, size, seed, collection,
module, param), so values are deterministic and do not shift when a tree changes
elsewhere. Arrays are generated in float32 directly (the full language model,
201M values, takes seconds).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np

from converter.atomic import check_output_path, check_outputs
from converter.registry import ParamTree, Spec, SpecTree, official_tree
from converter.haiku_writer import SavedCheckpoint, save_haiku_checkpoint

__all__ = ["make_fixture", "make_tree_arrays", "write_fixture"]

Arrays = Dict[str, Dict[str, np.ndarray]]


def _stream(
    tree: ParamTree, seed: int, collection: str, module: str, param: str
) -> np.random.Generator:
    key = f"{tree.name}\0{tree.size}\0{collection}\0{module}\0{param}".encode("utf-8")
    # sha256 rather than hash(): Python's str hash changes from run to run.
    word = int.from_bytes(hashlib.sha256(key).digest()[:16], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, word]))


def _normal(
    rng: np.random.Generator, shape: Tuple[int, ...], std: float, mean: float = 0.0
) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    if mean:
        values += np.float32(mean)
    return values


def _uniform(
    rng: np.random.Generator, shape: Tuple[int, ...], low: float, high: float
) -> np.ndarray:
    values = rng.random(shape, dtype=np.float32)
    values *= np.float32(high - low)
    values += np.float32(low)
    return values


def _init(rng: np.random.Generator, module: str, param: str, spec: Spec) -> np.ndarray:
    """One array following the table of the module docstring."""
    shape, dtype = spec
    where = f"{module}/{param} {list(shape)} {dtype}"
    if param == "counter":
        if np.dtype(dtype).kind not in "iu":
            raise ValueError(f"{where}: a BatchNorm counter must be an integer array")
        return rng.integers(1, 2**20, size=shape, dtype=np.dtype(dtype))
    if np.dtype(dtype) != np.float32:
        raise ValueError(
            f"{where}: no fixture rule for dtype {dtype}; add one to fixtures.py"
        )
    leaf = module.rsplit("/", 1)[-1]
    if param == "w" and len(shape) == 2:
        return _normal(rng, shape, 1.0 / math.sqrt(shape[0]))
    if param == "w" and len(shape) == 4:
        return _normal(rng, shape, 1.0 / math.sqrt(shape[0] * shape[1] * shape[2]))
    if param in ("b", "bias", "offset"):
        return _normal(rng, shape, 0.1)
    if param == "scale":
        return _normal(rng, shape, 0.1, mean=1.0)
    if param == "embeddings" and len(shape) == 2:
        return _normal(rng, shape, 1.0 / math.sqrt(shape[1]))
    if param == "pos_embs":
        return _normal(rng, shape, 0.5)
    if param in ("average", "hidden") and leaf == "var_ema":
        return _uniform(rng, shape, 0.5, 1.5)  # a variance: strictly positive
    if param in ("average", "hidden") and leaf == "mean_ema":
        return _normal(rng, shape, 0.1)
    raise ValueError(
        f"{where}: no fixture rule for this parameter; add one to converter/fixtures.py"
    )


def make_tree_arrays(tree: ParamTree, seed: int = 0) -> Tuple[Arrays, Arrays]:
    """Random ``(params, state)`` arrays for any :class:`~converter.registry.ParamTree`."""
    if type(seed) is not int or seed < 0:
        raise ValueError(f"seed must be a non-negative int, not {seed!r}")

    def fill(specs: SpecTree, collection: str) -> Arrays:
        return {
            module: {
                param: _init(
                    _stream(tree, seed, collection, module, param), module, param, spec
                )
                for param, spec in sorted(params.items())
            }
            for module, params in sorted(specs.items())
        }

    return fill(tree.params, "params"), fill(tree.state, "state")


def make_fixture(
    name: str, size: str = "tiny", seed: int = 0
) -> Tuple[Arrays, Optional[Arrays]]:
    """Random weights for official model ``name`` in its official file layout.

    Returns:
        ``(params, state)``. ``state`` is ``None`` for the models whose files hold
        the params alone (language, flow, video) and a mapping (empty for
        ``imagenet_learned``/``imagenet_fourier``) for the ImageNet models, so the
        pair passes straight to :func:`~converter.haiku_writer.save_haiku_checkpoint`.

    Raises:
        ValueError: unknown model name, size or a negative seed.
    """
    tree = official_tree(name, size)
    params, state = make_tree_arrays(tree, seed)
    return params, (state if tree.wrapped else None)


def write_fixture(
    name: str,
    path: Union[str, os.PathLike],
    *,
    size: str = "tiny",
    seed: int = 0,
    protocol: int = 3,
    container: str = "flatmapping",
    overwrite: bool = True,
) -> SavedCheckpoint:
    """Write :func:`make_fixture`'s weights to ``path`` (atomically; with
    ``overwrite=False`` never over an existing file)."""
    # Fail before generating up to 800 MB of weights: a missing folder, and without
    # overwrite an existing file (save_haiku_checkpoint refuses it again, and one
    # that appears meanwhile, when the file is put in place).
    check_output_path(path)
    check_outputs(path, force=overwrite)
    params, state = make_fixture(name, size=size, seed=seed)
    return save_haiku_checkpoint(
        path, params, state, protocol=protocol, container=container, overwrite=overwrite
    )
