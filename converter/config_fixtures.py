"""Official-format checkpoints with random weights for any configuration.

``converter.fixtures`` writes the two shipped sizes (tiny, full); some consumers need
other sizes, e.g. the tiny models transformers' classes can express (they hard-code
Fourier bands and some widths). The parameter tree of a configuration follows from the
model and its mapping: every model tensor's shape, read back through the inverse of
its rule's ops, is the Haiku array's shape; dropped arrays take their
``restore_from`` array's shape and dtype.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Union

from converter.conversion import model_targets
from converter.fixtures import make_tree_arrays
from converter.mapping import load_mapping, unflatten_tree
from converter.ops import ops_inverse_shape
from converter.trees import ParamTree, model_info
from converter.writer import save_haiku_checkpoint
from perceiver_torch.configs import config_from_dict, config_to_dict

# The TINY_CONFIGS sizes with the values transformers' Perceiver classes hard-code:
# the language decoder's 8 x 32 query channels, the learned model's 256 position
# channels, 64 Fourier bands for the images and flow (224/56 maximum resolution),
# 192 audio / 32 image bands and the 1024-wide label query for the video model.
HF_TINY_CONFIGS: Mapping[str, Dict[str, Any]] = {
    "language_perceiver": dict(
        max_seq_len=64, d_model=32, num_latents=8, d_latents=48,
        num_self_attends=2, qk_channels=256,
    ),
    "imagenet_learned": dict(
        image_size=[32, 32], pos_channels=256, num_latents=16, d_latents=64,
        num_self_attends_per_block=2, num_blocks=3, num_classes=10,
    ),
    "imagenet_fourier": dict(
        num_latents=16, d_latents=64, num_self_attends_per_block=2, num_blocks=3,
        num_classes=10,
    ),
    "imagenet_conv": dict(
        num_latents=16, d_latents=64, num_self_attends_per_block=2, num_blocks=3,
        num_classes=10,
    ),
    "optical_flow": dict(
        image_size=[24, 32], num_latents=32, d_latents=32, num_self_attends=2,
    ),
    "video_autoencoding": dict(
        num_frames=2, image_size=[16, 16], audio_samples_per_frame=64, num_latents=8,
        d_latents=32, num_self_attends=2, num_classes=10, decoder_channels=24,
        num_chunks=4,
    ),
}


def config_tree(name: str, config: Mapping[str, Any]) -> ParamTree:
    """The official parameter tree of model ``name`` at ``config`` (a dict of
    perceiver_torch config values; the rest are the official defaults)."""
    config_object = config_from_dict(name, config)
    values = config_to_dict(config_object)
    spec = load_mapping(name)
    table = spec.expand({**spec.config, **{k: _tuple(v) for k, v in values.items()}})
    targets = model_targets(name, config_object)
    flat: Dict[str, Any] = {}
    for rule in table.rules:
        shape, dtype = targets[rule.target]
        for op in reversed(rule.ops):
            if op.name == "dtype":
                dtype = op.args["from"]
        flat[rule.source] = (ops_inverse_shape(shape, rule.ops), dtype)
    for drop in table.drops:
        flat[drop.source] = flat[drop.restore_from]
    params, state = unflatten_tree(flat)
    info = model_info(name)
    return ParamTree(name=name, size="custom", params=params, state=state,
                     wrapped=info.wrapped)


def write_config_fixture(
    name: str,
    path: Union[str, os.PathLike],
    config: Mapping[str, Any],
    *,
    seed: int = 0,
):
    """Writes random weights for ``config`` in the official file layout."""
    tree = config_tree(name, config)
    params, state = make_tree_arrays(tree, seed)
    return save_haiku_checkpoint(path, params, state if tree.wrapped else None)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
