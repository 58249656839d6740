"""Helpers shared by the tests: compare a model output with eager; bad JSON files; a replica
that fails on demand."""
from __future__ import annotations

import json
import time

import pytest
import torch


def main_tensor(output):
    """The main tensor of a model output (logits, last hidden state, or the tensor itself)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def assert_close(actual, expected, rtol):
    """Relative error of the main output tensor, against max |expected|."""
    a, e = main_tensor(actual), main_tensor(expected)
    assert a.shape == e.shape
    assert torch.isfinite(a).all()
    err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:g}"


def assert_bad_file_names_the_field(load, data, mutate, message, tmp_path):
    """Break a JSON contract's dict with `mutate`, write it, and check that `load(path)`
    raises a ValueError matching `message` that names the file."""
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def failing(replica, times: float):
    """Make a replica's next `times` executions raise (math.inf: all of them); returns the
    count left, a list the caller may reset."""
    if not hasattr(replica, "faults"):
        run, replica.faults = replica.run_here, [0]

        def run_here(*args):
            if replica.faults[0] > 0:
                replica.faults[0] -= 1
                replica.fault_at = time.monotonic()
                raise RuntimeError("injected fault")
            return run(*args)

        replica.run_here = run_here
    replica.faults[0] = max(replica.faults[0], times)
    return replica.faults
