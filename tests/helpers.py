"""Helpers shared by the tests: compare a model output with eager; bad JSON files; a replica
that fails on demand."""
from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch


@contextlib.contextmanager
def own_cache(tmp_path_factory):
    """Inside, fxscale caches (analysed presets) in a folder of its own: the user's cache is
    neither read nor written (a module fixture yields inside it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXSCALE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


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


LLAMA_GROUPS = {"*attention": True, "*gemm": False, "*embedding": False}  # pattern: stateful


def split_plan(attention: tuple[int, ...], dense: tuple[int, ...], devices: int,
               replicas: int = 1, groups: dict[str, bool] = LLAMA_GROUPS):
    """An operator Plan putting the attention groups (of a zoo Llama) on the devices
    `attention` and the dense ones on `dense` (`replicas` each), for `devices` devices."""
    from fxscale.contracts.plan import GroupPlacement, Plan

    rows = tuple(GroupPlacement(kind, kind, "operator", 1 if stateful else replicas,
                                devices=attention if stateful else dense)
                 for kind, stateful in groups.items())
    return Plan("operator", "test", "cpu", 1.0, (), devices, 0.0, 0.0, 0.0, 0.0, 0.0, 64, rows)


def groups_on(server) -> list[set[str]]:
    """Per device, the groups whose replicas it holds."""
    return [{name.rsplit("#", 1)[0] for name in row["replicas"]}
            for row in server.stats()["devices"]["devices"]]
