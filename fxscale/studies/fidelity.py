"""Fidelity of the engine simulator: predicted vs live TTFT and TBT on one trace slice.

The live engine and its simulator (runtime/simulator/engine.py) compose their steps with the
same scheduler; the simulator is told how long each group's execution takes and how much
time the engine spends per step on its own (scheduling, building the step's tensors,
splitting and merging group calls, sampling, handing tokens over).

- `service="injected"`: every group call takes a given function of its tokens and context
  (INJECTED; the call runs, then sleeps the rest, which releases the interpreter lock as a
  kernel would), and the simulator gets the same function. What can differ is the engine's
  own logic and time: this checks the simulator against the engine itself.
- `service="measured"`: the groups run their kernels; the simulator gets each group's
  execution time as a line in its tokens, fitted on a calibration burst.

Either way the engine's own time (seconds per step, and per request in a step) is fitted on
a calibration burst served before the live run, never on the run it predicts. Replicas are
held fixed (no autoscaling) so the two run the same deployment.
"""
from __future__ import annotations

import fnmatch
import functools
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable

from fxscale.contracts.metrics import percentiles, token_timings
from fxscale.contracts.plan import SLO
from fxscale.runtime.simulator.engine import EngineCosts, GroupModel, simulate_engine
from fxscale.serving.replay import replay
from fxscale.studies.calibration import (
    calibrate,
    fit_costs,
    group_kinds,
    measured_groups,
)
from fxscale.studies.demo import DemoConfig

KEYS, LEVELS = ("ttft_s", "tbt_s"), (50, 90)  # what is compared


@dataclass(frozen=True)
class ServiceTimes:
    """Seconds a group's execution takes: fixed + per token + per context token (the KV
    tokens attention reads), by group name pattern, first match. The defaults are what the
    demo's 2 x 2048 Llama measured here per group on one thread (docs/runtime.md)."""

    table: tuple[tuple[str, float, float, float], ...] = (
        ("top#0/embedding", 0.25e-3, 0.003e-3, 0.0),
        ("*#0/gemm", 2.5e-3, 0.08e-3, 0.0),
        ("*#1/attention", 1.6e-3, 0.06e-3, 0.5e-6),
        ("*#2/gemm", 7.0e-3, 0.2e-3, 0.0),
        ("top#1/gemm", 0.45e-3, 0.005e-3, 0.0),
    )

    def seconds(self, group: str, tokens: int, context: int) -> float:
        """One execution of a group (an unknown name costs nothing)."""
        for pattern, fixed, per_token, per_context in self.table:
            if fnmatch.fnmatchcase(group, pattern):
                return fixed + per_token * tokens + per_context * context
        return 0.0

    def model_seconds(self, layers: int, tokens: int, context: int) -> float:
        """One execution of the whole model (the model policy's one group): its Llama groups
        in a row."""
        names = ["top#0/embedding", "top#1/gemm"] + [f"model.layers.{i}#{k}" for i in
                                                      range(layers) for k in
                                                      ("0/gemm", "1/attention", "2/gemm")]
        return sum(self.seconds(n, tokens, context) for n in names)

    def function(self, policy: str, layers: int) -> Callable[[str, int, int], float]:
        """The server's service function (group, tokens, context) -> seconds."""
        if policy == "model":
            return lambda group, tokens, context: self.model_seconds(layers, tokens, context)
        return self.seconds


INJECTED = ServiceTimes()


def group_models(server: Any, injected: ServiceTimes | None, layers: int) -> list[GroupModel]:
    """The simulator's groups for a server: the injected function, or each pool's executions
    fitted as a plane in their tokens and context (measured_groups)."""
    if injected is None:
        return measured_groups(server)
    service = injected.function(server.policy, layers)
    return [GroupModel(name, kind, functools.partial(service, name))
            for name, kind in group_kinds(server).items()]


def measure(config: DemoConfig, policy: str, service: str = "injected",
            replicas: int = 1, micro_batches: int = 1) -> dict[str, Any]:
    """Calibrate, serve the slice live, simulate it; both sides' timings. `replicas`: of
    every group (operator), or model replicas (model); `micro_batches` 2: each step's two
    halves side by side."""
    import fxscale

    injected = INJECTED if service == "injected" else None
    requests = config.requests()
    slo = SLO(config.ttft, config.tbt)
    with fxscale.serve(config.model(), policy=policy, slo=slo, budget=config.budget,
                       service=injected and injected.function(policy, config.layers),
                       replicas=replicas, micro_batches=micro_batches) as server:
        calibrate(server, requests)
        counts = {name: pool.counters()["replicas"] for name, pool in server.pools.items()}
        groups = group_models(server, injected, config.layers)
        slots = 1 if policy == "model" else config.budget
        costs = fit_costs(server, groups, counts, slots, micro_batches == 2)
        server.reset_stats()  # the live run's steps alone from here
        live = replay(server, requests, slo, seed=config.seed)
        run_costs = fit_costs(server, groups, counts, slots, micro_batches == 2)
        engines = len(server.engines)
        attention = server.engines[0].attention_replicas()
        num_blocks, schedule = server.num_blocks, server.schedule

    def predict(engine: EngineCosts) -> dict[str, float]:
        token_times = simulate_engine(groups, requests, schedule, num_blocks, counts,
                                      config.budget, engine, engines=engines,
                                      attention_replicas=attention, overlap=micro_batches == 2)
        timings = [token_timings(r.arrival_s, t) for r, t in zip(requests, token_times) if t]
        return percentiles(timings, KEYS, LEVELS)

    ok = [row for row in live["requests"] if row["outcome"] == "ok"]
    return {"policy": policy, "service": service,
            "costs": asdict(costs), "run_costs": asdict(run_costs),
            "live": percentiles(ok, KEYS, LEVELS), "predicted": predict(costs),
            # the engine's own time fitted on this run: what is left is the simulator's
            # logic, apart from the machine changing speed since the calibration
            "predicted_in_run": predict(run_costs),
            "live_summary": live["summary"],
            # the replay's own lateness handing requests over (the simulator has none)
            "submit_delay": percentiles(ok, ("submit_delay_s",), LEVELS)}


def relative_errors(predicted: dict[str, float], live: dict[str, float]) -> dict[str, float]:
    """|predicted - live| / live per figure."""
    return {k: abs(predicted[k] - live[k]) / live[k] for k in live
            if live[k] and predicted.get(k) is not None}


def fidelity(config: DemoConfig, policy: str, runs: int = 1, service: str = "injected",
             replicas: int = 1, micro_batches: int = 1,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`runs` independent measurements; each run's errors, and the medians over the runs."""
    reports = []
    for i in range(runs):
        run = measure(config, policy, service, replicas, micro_batches)
        run["relative_error"] = relative_errors(run["predicted"], run["live"])
        run["relative_error_in_run"] = relative_errors(run["predicted_in_run"], run["live"])
        reports.append(run)
        if progress:
            progress(i + 1, runs)
    median = medians(reports)
    return {"runs": reports, "measured": median["live"], "predicted": median["predicted"],
            "relative_error": relative_errors(median["predicted"], median["live"]),
            "predicted_in_run": median["predicted_in_run"],
            "relative_error_in_run": relative_errors(median["predicted_in_run"],
                                                     median["live"]),
            "measured_range": {k: (min(r["live"][k] for r in reports),
                                   max(r["live"][k] for r in reports))
                               for k in median["live"]}}


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per figure, the median over runs of the live, predicted and in-run predicted timings."""
    return {side: {k: statistics.median(r[side][k] for r in runs) for k in runs[0]["live"]}
            for side in ("live", "predicted", "predicted_in_run")}
