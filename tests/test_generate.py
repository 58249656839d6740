"""generate() with the compiled forward: same tokens as eager, no extra graphs or recompiles."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fxscale import zoo
from fxscale.backend import fxscale_backend

PROMPT_LENGTHS = (3, 7, 12)


def greedy(model, forward, prompt):
    """Greedy generation with `forward` standing in for model.forward."""
    original = model.forward
    model.forward = forward
    try:
        return model.generate(prompt, max_new_tokens=6, do_sample=False,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))
    finally:
        model.forward = original


def run_generation(name, backend):
    """Generated tokens for prompts of several lengths, and how many graphs were compiled."""
    entry = zoo.build(name)
    model = entry.model
    counter = CompileCounterWithBackend(backend)
    compiled_forward = torch.compile(model.forward, backend=counter)
    g = torch.Generator().manual_seed(3)
    tokens = []
    with torch.no_grad():
        for length in PROMPT_LENGTHS:
            prompt = torch.randint(2, 256, (2, length), generator=g)
            tokens.append((greedy(model, model.forward, prompt),
                           greedy(model, compiled_forward, prompt)))
    return tokens, counter.frame_count


def fxscale_eager(gm, example_inputs):
    return fxscale_backend(gm, example_inputs, {"lowering": "eager"})


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_matches_eager_without_extra_graphs(name):
    tokens, fx_graphs = run_generation(name, fxscale_eager)
    for expected, actual in tokens:
        assert torch.equal(actual, expected)
    torch._dynamo.reset()
    _, eager_graphs = run_generation(name, "eager")
    assert 0 < fx_graphs <= eager_graphs, (fx_graphs, eager_graphs)


@pytest.mark.inductor
def test_generate_with_inductor_lowering_matches_eager():
    def fxscale_inductor(gm, example_inputs):
        return fxscale_backend(gm, example_inputs, {"lowering": "inductor"})

    tokens, _ = run_generation("llama", fxscale_inductor)
    for expected, actual in tokens:
        assert torch.equal(actual, expected)


def test_changing_batch_and_length_recompiles_like_eager():
    entry = zoo.build("llama")
    shapes = [(2, 16), (3, 9), (4, 20), (2, 33), (5, 7)]

    def count(backend):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(entry.model, backend=counter)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for b, n in shapes:
                x = torch.randint(0, 256, (b, n), generator=g)
                torch.testing.assert_close(compiled(x).logits, entry.model(x).logits,
                                           rtol=1e-5, atol=1e-5)
        return counter.frame_count

    fx_graphs, eager_graphs = count(fxscale_eager), count("eager")
    assert 0 < fx_graphs <= eager_graphs, (fx_graphs, eager_graphs)
