"""Options are validated: unknown keys and bad values are clear errors."""
from __future__ import annotations

import pytest
import torch

import fxscale
from fxscale import Options


def test_defaults():
    assert Options() == Options.from_user(None) == Options.from_user({})
    assert Options().granularity == "operator" and Options().lowering == "inductor"


@pytest.mark.parametrize("options,message", [
    ({"granularty": "layer"}, r"unknown fxscale option\(s\) \['granularty'\]"),
    ({"granularity": "block"}, r"'granularity' must be one of \['operator', 'layer', 'model', 'node'\], got 'block'"),
    ({"lowering": "tvm"}, r"'lowering' must be one of \['inductor', 'eager'\]"),
    ({"dedupe": "yes"}, r"'dedupe' must be True or False"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        Options.from_user(options)


def test_bad_options_surface_through_torch_compile_as_a_value_error():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="fxscale", options={"colour": "red"})
    with pytest.raises(ValueError, match=r"unknown fxscale option\(s\) \['colour'\]"):
        compiled(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"'lowering' must be one of"):
        fxscale.Backend({"lowering": "tvm"})  # the handle checks before anything compiles


def test_backend_is_registered():
    assert "fxscale" in torch._dynamo.list_backends()
    assert fxscale.fxscale_backend is torch._dynamo.lookup_backend("fxscale")
