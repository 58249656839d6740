"""Shared fixtures: a fresh Dynamo state per test, seeded RNG. Triton kernels run in
Triton's interpreter on CPU tensors: the variable must be set before triton is imported."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 - after the interpreter switch
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs, no recompile-limit carry-over."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
