"""The example GPT builds, runs and backpropagates at a tiny size."""

import torch

from examples.gpt import GPT, build

TINY = dict(batch=2, seq=16, n_layers=2, d_model=32, n_heads=2, vocab=64)


def test_build_gives_a_scalar_loss_that_backpropagates():
    torch.manual_seed(0)
    model, example_inputs = build(**TINY)
    assert isinstance(model, GPT)
    idx, targets = example_inputs
    assert idx.dtype == targets.dtype == torch.int64
    assert idx.shape == targets.shape == (2, 16)

    loss = model(*example_inputs)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_logits_have_shape_batch_seq_vocab():
    model, (idx, _) = build(**TINY)
    assert model(idx).shape == (2, 16, 64)


def test_example_inputs_are_reproducible():
    _, first = build(**TINY)
    _, second = build(**TINY)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
