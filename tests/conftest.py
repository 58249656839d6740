"""Shared fixtures: a fresh Dynamo state per test, seeded RNG. Triton kernels run in
Triton's interpreter on CPU tensors: the variable must be set before triton is imported."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 - after the interpreter switch
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the machine's cores: one intra-op thread each, so that no op waits at
    # a barrier for a thread the other worker's threads pushed off its core
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs, no recompile-limit carry-over."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
