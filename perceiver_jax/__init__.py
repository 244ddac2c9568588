"""Haiku re-statement of DeepMind's Perceiver IO: the parity reference.

Same Haiku modules, creation order and scopes as the official code, so ``init``
produces exactly the official parameter trees, and the same operations, so ``apply``
on an official checkpoint computes what the official code computes.

    model = perceiver_jax.get_model("imagenet_conv", config)
    logits, state = model.apply(params, state, rng, images=images)

Needs jax and dm-haiku (the ``[jax]`` extra); never imports torch or ``converter``.
"""

from __future__ import annotations

from typing import Tuple

from perceiver_jax.models import (
    BUILDERS,
    INPUT_NAMES,
    MODEL_NAMES,
    TRAINING_ONLY_FIELDS,
    _check_name,
    config_fields,
    get_model,
    imagenet_conv,
    imagenet_fourier,
    imagenet_learned,
    input_specs,
    language_perceiver,
    num_params,
    optical_flow,
    resolve_config,
    video_autoencoding,
    video_subsampling,
)


def input_names(name: str) -> Tuple[str, ...]:
    """The keyword inputs ``apply`` requires for model ``name``."""
    _check_name(name)
    return INPUT_NAMES[name]


__all__ = [
    "BUILDERS",
    "INPUT_NAMES",
    "MODEL_NAMES",
    "TRAINING_ONLY_FIELDS",
    "config_fields",
    "get_model",
    "imagenet_conv",
    "imagenet_fourier",
    "imagenet_learned",
    "input_names",
    "input_specs",
    "language_perceiver",
    "num_params",
    "optical_flow",
    "resolve_config",
    "video_autoencoding",
    "video_subsampling",
]
