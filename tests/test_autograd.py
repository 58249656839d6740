"""With autograd enabled the compiled model gives the same gradients as eager."""
from __future__ import annotations

import pytest
import torch

from fxscale.models import zoo


def grads(model, run):
    """Loss and parameter gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    loss = run().logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_gradients_match_eager(lowering):
    entry = zoo.build("llama", layers=1)
    model = entry.model.train()
    expected_loss, expected = grads(model, lambda: entry.run())
    compiled = torch.compile(model, backend="fxscale", options={"lowering": lowering})
    loss, actual = grads(model, lambda: entry.run(compiled))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-6)
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
