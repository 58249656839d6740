"""What a live server's run is predicted from: its groups' executions fitted as lines in
their tokens, and the engine's own time per step, both measured on a calibration burst
served before the run it predicts (never on that run)."""
from __future__ import annotations

from typing import Any

from fxscale.runtime.scheduling.parts import micro_batches
from fxscale.runtime.simulator.engine import EngineCosts, GroupModel, fit_plane, step_time

CALIBRATION_REQUESTS = 24  # the burst
ALONE = 4                  # served one at a time before it


def calibrate(server: Any, requests: list) -> None:
    """Serve calibration requests shaped like the slice's: a few alone (steps of one request),
    then a burst (steps of many), so the engine's own time is seen across step sizes."""
    shapes = [(r.prompt_tokens, r.output_tokens) for r in requests[:CALIBRATION_REQUESTS]]
    for i, (prompt, new) in enumerate(shapes[:ALONE]):
        server.generate(_prompt(prompt, i), max_new_tokens=new, ignore_eos=True).result()
    burst = [server.generate(_prompt(prompt, i), max_new_tokens=new, ignore_eos=True)
             for i, (prompt, new) in enumerate(shapes)]
    for future in burst:
        future.result()


def group_kinds(server: Any) -> dict[str, str]:
    """Each group of a server and how the engine splits its calls (rows, attention, whole)."""
    return {call.pool.name: call.kind for call in server.runner.calls}


def measured_groups(server: Any) -> list[GroupModel]:
    """Each group of a server with its pool's executions fitted as a plane in their tokens and
    the context tokens they read (attention's time grows with its context; the model
    policy's whole model is attention too), by relative error: a decode step's small
    executions count as much as a prompt's large ones."""
    models = []
    for name, kind in group_kinds(server).items():
        samples = server.pools[name].context_execution_samples()
        fixed, per_token, per_context = fit_plane(samples, relative=True)
        models.append(GroupModel(name, kind, lambda t, c, a=fixed, b=per_token,
                                 k=per_context: a + b * t + k * c))
    return models


def fit_costs(server: Any, groups: list[GroupModel], replicas: dict[str, int], slots: int,
              overlap: bool = False) -> EngineCosts:
    """The engine's own time per step, per request and per token in it: each step its
    engines logged since their last reset (the last 1024 each keeps), its time beyond what
    its groups take, fitted by least squares (>= 0); with `overlap`, per micro-batch (each
    pays its own, one after the other)."""
    points = []
    # copied first (in one C call): the engines go on logging steps while this fits
    steps = [s for engine in server.engines for s in list(engine.steps_log)]
    for step, _, took in steps:
        halves = micro_batches(step) if overlap else [step]
        extra = took - step_time(groups, step, replicas, slots, EngineCosts(), overlap)
        points.append((sum(len(h.chunks) for h in halves) / len(halves),
                       step.num_tokens / len(halves), extra / len(halves)))
    return EngineCosts.fit(points)


def _prompt(length: int, seed: int) -> Any:
    """Token ids of a calibration prompt."""
    import torch

    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))
