"""perceiver_torch.micro_batches: large CPU batches run in slices, same function.

Every model is run on a batch of 5 in slices of 2 (a small token budget), against the
whole batch (``plain(MICRO_BATCHES)``) and float64: the sliced output must be as
close to float64 as the whole batch's is (tests/float64_reference.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

import perceiver_torch as pt
from float64_reference import (
    check_outputs_within_float32_rounding,
    float64_inputs,
    float64_model,
)
from perceiver_torch import fast_paths, micro_batches
from perceiver_torch.fast_paths import FastPath
from test_torch_models import tiny, tiny_inputs

NAMES = list(pt.MODEL_NAMES)


@pytest.fixture
def slices_of(monkeypatch):
    """Sets the token budget so that ``model`` runs ``items`` items per slice, and
    counts the encoder's calls (one per slice). Not with a hook: hooked modules see
    whole batches (linear.intercepted); the spy keeps the forward's module name."""

    def set_budget(model, first_input, items):
        tokens = model.tokens_per_item(first_input)
        monkeypatch.setattr(micro_batches, "MICRO_BATCH_TOKENS", items * tokens)
        monkeypatch.setattr(model, "max_items_per_slice", None)  # the budget alone
        assert model.micro_batch_size(first_input) == items
        calls = []
        encoder_class = type(model.encoder)
        original = encoder_class.forward

        @functools.wraps(original)
        def counted(self, *args, **kwargs):
            if self is model.encoder:
                calls.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(encoder_class, "forward", counted)
        return calls

    return set_budget


def batch_of_five(name):
    inputs = tiny_inputs(name, batch=5, seed=3)
    if name == "language_perceiver":
        # Each slice its own padding: rows end at 64, 30, 50, 12 and 64 tokens.
        mask = torch.ones_like(inputs[0])
        for row, end in enumerate((64, 30, 50, 12, 64)):
            mask[row, end:] = 0
        mask[2, 5] = 0
        return (inputs[0] * mask, mask)
    if name == "video_autoencoding":
        return inputs + ({"image": torch.tensor([0, 17, 300, 511]), "audio": torch.tensor([1, 5])},)
    return inputs


@pytest.mark.parametrize("name", NAMES)
def test_slices_equal_the_whole_batch_within_float32_rounding(name, slices_of):
    model = tiny(name)
    inputs = batch_of_five(name)
    calls = slices_of(model, inputs[0], 2)
    with torch.no_grad():
        sliced = model(*inputs)
        assert len(calls) == 3  # 2 + 2 + 1 items
        with fast_paths.plain(FastPath.MICRO_BATCHES):
            whole = model(*inputs)
        assert len(calls) == 4
        with fast_paths.plain():
            exact = float64_model(model)(*float64_inputs(inputs))
    check_outputs_within_float32_rounding(name, sliced, whole, exact)


def test_video_reconstruct_in_slices(slices_of):
    model = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding", batch=3, seed=1)
    label = torch.randn(3, model.config.num_classes)
    calls = slices_of(model, images, 2)
    with torch.no_grad():
        sliced = model.reconstruct(images, audio, num_chunks=3, label=label)
        assert len(calls) == 2
        with fast_paths.plain(FastPath.MICRO_BATCHES):
            whole = model.reconstruct(images, audio, num_chunks=3, label=label)
    assert sliced.keys() == whole.keys()
    for key in whole:
        assert sliced[key].shape == whole[key].shape
        torch.testing.assert_close(sliced[key], whole[key], rtol=1e-5, atol=1e-6)


def test_slices_only_at_cpu_inference(slices_of):
    """Autograd, training mode and plain() run the batch whole."""
    model = tiny("imagenet_conv")
    (images,) = tiny_inputs("imagenet_conv", batch=4)
    calls = slices_of(model, images, 1)
    model(images).sum().backward()  # autograd on
    assert len(calls) == 1
    with torch.no_grad():
        model.train()
        model(images)
        model.eval()
        assert len(calls) == 2
        model(images)
        assert len(calls) == 6


def test_disagreeing_batch_sizes_get_the_models_own_error(slices_of):
    model = tiny("language_perceiver")
    (ids,) = tiny_inputs("language_perceiver", batch=4)
    slices_of(model, ids, 1)
    with torch.no_grad(), pytest.raises(pt.InputError, match="attention_mask must have"):
        model(ids, torch.ones(3, ids.shape[1], dtype=torch.long))


def test_default_budget_slices_the_official_sizes():
    """Four 2,048-token sequences, one of the rest per slice (the conv model's cap:
    its 3,136 tokens an image would allow two)."""
    expected = {
        "language_perceiver": (torch.zeros(1, 2048, dtype=torch.long), 4),
        "imagenet_learned": (torch.zeros(1, 3, 224, 224), 1),
        "imagenet_fourier": (torch.zeros(1, 3, 224, 224), 1),
        "imagenet_conv": (torch.zeros(1, 3, 224, 224), 1),
        "optical_flow": (torch.zeros(1, 2, 3, 368, 496), 1),
        "video_autoencoding": (torch.zeros(1, 16, 3, 224, 224), 1),
    }
    for name, (first, items) in expected.items():
        with torch.device("meta"):
            model = pt.build(name)
        assert model.micro_batch_size(first) == items, name
        if name == "imagenet_conv":  # its cap says one, not the token budget
            assert micro_batches.items_per_slice(model.tokens_per_item(first)) == 2


def test_concat_batches_keeps_the_structure():
    a = {"x": torch.ones(2, 3), "y": (torch.zeros(2), torch.ones(2, 1))}
    b = {"x": torch.zeros(1, 3), "y": (torch.ones(1), torch.zeros(1, 1))}
    out = micro_batches.concat_batches([a, b])
    assert out["x"].shape == (3, 3) and torch.equal(out["x"][2], torch.zeros(3))
    assert isinstance(out["y"], tuple) and out["y"][0].tolist() == [0, 0, 1]
    with pytest.raises(TypeError, match="cannot concatenate"):
        micro_batches.concat_batches([1, 2])


@pytest.mark.parametrize("name", NAMES)
def test_input_errors_name_the_whole_batch_not_a_slice(name, slices_of):
    """A bad input in a batch that runs in slices is refused with the caller's shapes
    (the door check sees the whole batch, not the first slice)."""
    model = tiny(name)
    inputs = list(tiny_inputs(name, batch=5, seed=3))
    slices_of(model, inputs[0], 2)
    if name == "language_perceiver":
        inputs.append(torch.ones(5, inputs[0].shape[1] - 1, dtype=torch.long))
        wrong = "[5, " + str(inputs[0].shape[1] - 1) + "]"
    else:  # one channel too many in the first input (images, frames)
        first = inputs[0]
        shape = list(first.shape)
        shape[-3] += 1
        inputs[0] = torch.zeros(shape, dtype=first.dtype)
        wrong = str(shape)
    with torch.no_grad(), pytest.raises(pt.InputError) as raised:
        model(*inputs)
    assert f"got {wrong}" in str(raised.value)
