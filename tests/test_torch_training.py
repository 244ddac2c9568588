"""Training works: dropout, train mode and a backward pass on every tiny model."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import perceiver_torch as pt

NAMES = list(pt.MODEL_NAMES)

# Parameters that legitimately get no gradient in the video autoencoder: modalities
# with mask probability 0 never use their mask token, and the label (mask probability
# 1) is always replaced by its mask token, so its padding has no effect.
NO_GRADIENT = {
    "video_autoencoding": {
        "input_preprocessor.mask_tokens.audio",
        "input_preprocessor.mask_tokens.image",
        "input_preprocessor.padding.label",
    }
}


def tiny_model(name: str, dropout: float = 0.1) -> pt.PerceiverIO:
    config = dataclasses.replace(
        pt.TINY_CONFIGS[name], dropout=dropout, attention_dropout=dropout
    )
    torch.manual_seed(0)
    model = pt.build(name, config)
    with torch.no_grad():  # zero-initialised parameters would hide missing gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model


def inputs(name: str) -> tuple:
    gen = torch.Generator().manual_seed(1)
    c = pt.TINY_CONFIGS[name]
    if name == "language_perceiver":
        ids = torch.randint(0, 262, (2, 40), generator=gen)
        mask = torch.ones(2, 40, dtype=torch.int64)
        mask[1, 30:] = 0
        return ids, mask
    if name.startswith("imagenet"):
        return (torch.randn(2, 3, 32, 32, generator=gen),)
    if name == "optical_flow":
        return (torch.rand(2, 2, 3, *c.image_size, generator=gen) * 2 - 1,)
    images = torch.rand(2, c.num_frames, 3, *c.image_size, generator=gen)
    audio = torch.randn(2, c.num_frames * c.audio_samples_per_frame, generator=gen)
    return images, audio, {"image": torch.arange(100, 164), "audio": torch.arange(3)}


def loss_of(output) -> torch.Tensor:
    if isinstance(output, dict):
        return sum((v**2).mean() for v in output.values())
    return (output**2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = tiny_model(name).train()
    loss = loss_of(model(*inputs(name)))
    loss.backward()
    skip = NO_GRADIENT.get(name, set())
    for key, p in model.named_parameters():
        if key in skip:
            assert p.grad is None or not p.grad.any(), key
            continue
        assert p.grad is not None, f"{key} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{key} has non-finite gradients"
        assert p.grad.abs().max() > 0, f"{key} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_dropout_only_in_training(name):
    model = tiny_model(name, dropout=0.3)
    x = inputs(name)
    model.train()
    torch.manual_seed(0)
    a = loss_of(model(*x))
    b = loss_of(model(*x))
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loss_of(model(*x)), loss_of(model(*x)))


def test_training_steps_reduce_loss():
    model = tiny_model("language_perceiver", dropout=0.0).train()
    ids, mask = inputs("language_perceiver")
    targets = ids.clone()
    corrupted = ids.clone()
    corrupted[:, ::4] = pt.BytesTokenizer.MASK
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        logits = model(corrupted, mask)
        loss = torch.nn.functional.cross_entropy(
            logits[mask.bool()], targets[mask.bool()]
        )
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_batchnorm_uses_batch_statistics_in_training():
    model = tiny_model("imagenet_conv", dropout=0.0).train()
    bn = model.input_preprocessor.batchnorm
    before = bn.running_mean.clone()
    model(*inputs("imagenet_conv"))
    assert not torch.equal(before, bn.running_mean)
    assert int(bn.num_batches_tracked) == 1


def test_attention_dropout_disables_folded_modes():
    layer = pt.build("optical_flow", pt.TINY_CONFIGS["optical_flow"]).decoder
    attention = layer.cross_attention.attention
    attention.eval()
    assert attention.choose_mode(100_000, 32) == "absorb_q"
    assert attention.choose_mode(32, 100_000) == "absorb_kv"
    attention.train()
    with torch.no_grad():  # train mode without autograd: still folded, until dropout
        assert attention.choose_mode(100_000, 32) == "absorb_q"
        attention.attention_dropout = 0.1
        assert attention.choose_mode(100_000, 32) == "standard"
    attention.attention_dropout = 0.0
    assert attention.choose_mode(100_000, 32) == "standard"  # training with autograd


@pytest.mark.parametrize("name", ["optical_flow", "video_autoencoding"])
def test_training_after_inference_mode(name):
    """Cached position encodings made under inference_mode still train."""
    model = tiny_model(name, dropout=0.0)
    x = inputs(name)
    with torch.inference_mode():
        model.eval()(*x)
    loss_of(model.train()(*x)).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_training_without_dropout_gives_every_parameter_a_gradient_as_plain(name):
    """Without dropout, training runs the attentions unfolded, as the plain path:
    folding a single head's key projection away (exact for the forward pass) would
    leave its bias without a gradient (None instead of the plain path's zeros up to
    rounding), which optimizers treat differently (AdamW skips the weight decay and
    the moment updates of a parameter whose grad is None)."""
    def gradients(plain: bool) -> dict:
        model = tiny_model(name, dropout=0.0).train()
        with pt.fast_paths.plain() if plain else contextlib.nullcontext():
            loss_of(model(*inputs(name))).backward()
        return {key: p.grad for key, p in model.named_parameters()}

    fast, plain = gradients(False), gradients(True)
    assert [k for k, g in fast.items() if g is None] == [
        k for k, g in plain.items() if g is None
    ]


@pytest.mark.parametrize("name", NAMES)
def test_gradients_in_eval_mode_are_the_plain_paths(name):
    """Gradients taken with the model in eval() (saliency maps, fine-tuning with frozen
    statistics) go through the inference fast paths that do not switch off outside
    training: they must be the plain path's. The video model's folded decoder, formed
    from detached weights, left 84 of its 87 parameters and the input without a
    gradient (None), and backward() raised nothing.

    Bound: the two paths compute the same function in other orders, so they differ by
    float32 rounding carried through a dozen layers, which is relative to the terms a
    gradient sums, not to their sum: a gradient formed by cancellation (the decoder's
    single query, 1e-5 of the model's largest gradient) is off by 2.5e-4 of itself.
    So each tensor's error is taken relative to its own largest element or a
    thousandth of the model's largest gradient, whichever is more; 1e-3 of that is
    far above rounding (8e-5 at most, and 1e-5 against jax.grad) and far below the
    1.0 of a missing or wrong gradient. A folded key projection's bias may get None
    where the plain path gives zeros up to rounding: its true gradient is zero
    (softmax is invariant to a constant added to every logit of a row)."""
    def gradients(plain: bool):
        model = tiny_model(name, dropout=0.0).eval()
        args = [t.clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
                else t for t in inputs(name)]
        with pt.fast_paths.plain() if plain else contextlib.nullcontext():
            loss_of(model(*args)).backward()
        found = {key: p.grad for key, p in model.named_parameters()}
        found.update({f"input {i}": a.grad for i, a in enumerate(args)
                      if torch.is_tensor(a) and a.requires_grad})
        return found

    fast, plain = gradients(False), gradients(True)
    assert set(fast) == set(plain)
    largest = max(float(g.abs().max()) for g in plain.values() if g is not None)
    for key, expected in plain.items():
        got = fast[key]
        if expected is None:
            assert got is None or not got.any(), key
            continue
        if key.endswith("to_k.bias"):  # zero, up to rounding, on both paths
            for g in (got, expected):
                assert g is None or float(g.abs().max()) <= 1e-5 * largest, key
            continue
        assert got is not None, f"{key}: no gradient in eval mode"
        scale = max(float(expected.abs().max()), 1e-3 * largest)
        error = float((got - expected).abs().max()) / scale
        assert error <= 1e-3, (key, error)
