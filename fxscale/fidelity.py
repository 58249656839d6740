"""Fidelity of the runtime model: predicted vs measured TTFT and TBT on one trace slice.

For a policy: profile every group of the served model on this machine (eager lowering, one
intra-op thread, as the server runs them) and fit each group's latency; serve the trace
slice live (fixed replicas, or the autoscaler's with `measure(autoscale=True)`); then replay
the same requests through the discrete-event model of the runtime (runtime/local_sim.py)
with the fitted profiles, the same budget and the replica counts the live run had over
time. The per-call cost of the request thread (Python between group calls) is calibrated
from requests served alone: what they measured beyond what the model gives them without it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Any

import torch

from .runtime.fit import fit_profile
from .runtime.local_sim import LocalSimulation, SimGroup, SimRequest, fitted_latency
from .runtime.planner import SLO
from .runtime.profile import Profile
from .runtime.quantile import percentiles
from .serving_demo import DemoConfig
from .trace_replay import replay

DECODE_BATCHES = (1, 2, 4, 8, 16)
PREFILL_BATCHES = (1, 2)
HOP_SAMPLES = 3
ALONE_PROMPT = 16
KEYS, LEVELS = ("ttft_s", "tbt_s"), (50, 90)  # what is compared


def measured_profile(model: torch.nn.Module, config: DemoConfig, granularity: str) -> Profile:
    """Prefill and decode profiles of every group, fitted, with one intra-op thread."""
    from .profiling import Grid, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lengths = (8, 16, config.max_prompt)
        contexts = (16, config.max_prompt, config.max_prompt + config.max_new)
        kwargs = dict(granularity=granularity, lowering="eager", repeats=3, warmup=1,
                      rotations=1, progress=False)
        prefill = profile(model, Grid(PREFILL_BATCHES, lengths, ("prefill",)), **kwargs)
        decode = profile(model, Grid(DECODE_BATCHES, contexts, ("decode",)), **kwargs)
    finally:
        torch.set_num_threads(threads)
    by_name = {g.name: g for g in decode.groups}
    for group in prefill.groups:
        group.points += by_name[group.name].points
    return fit_profile(prefill)


def group_facts(profile: Profile, graphs: list) -> list[dict]:
    """The profile's groups in pass order, with how each batches (from its GroupGraph)."""
    known = {g.name: g for graph in graphs for g in graph.groups}
    return [{"name": g.name, "batches": known[g.name].row_wise and not known[g.name].stateful,
             "stateful": known[g.name].stateful,
             "context_keyed": "embedding" in known[g.name].classes} for g in profile.groups]


def replicas_timeline(timeline: list[dict]):
    """Replica counts at any time, stepping as the live run's samples recorded them."""
    def at(t: float) -> dict[str, int]:
        current: dict[str, int] = {}
        for row in timeline:
            if row["t"] > t:
                break
            current = row["replicas"]
        return current
    return at


def measure(config: DemoConfig, policy: str, autoscale: bool = False) -> dict[str, Any]:
    """Profile the groups, calibrate the request thread's cost, serve the slice live:
    everything the prediction needs and what it is compared with (JSON-ready). Without the
    autoscaler, operator groups keep one replica each and the model keeps one per slot."""
    import fxscale
    from fxscale import backend

    torch._dynamo.reset()  # a fresh cache: earlier compiles of this model class count
    model = config.model()
    profile = measured_profile(model, config, "operator" if policy == "operator" else "model")
    torch._dynamo.reset()  # the server compiles afresh: the profiler's graphs would stay
    # in the model's cache and every serving call would check their guards too
    slo = SLO(config.ttft, config.tbt)
    first_graph = len(backend.compiled_group_graphs)
    with fxscale.serve(model, policy=policy, slo=slo, budget=config.budget,
                       autoscale=autoscale, autoscale_interval_s=config.interval_s) as server:
        facts = group_facts(profile, backend.compiled_group_graphs[first_graph:])
        alone = _serve_alone(server, config)
        if policy == "model" and not autoscale:
            server.scale("model", config.budget)
        time.sleep(config.interval_s)  # the calibration request leaves the autoscaler's view
        live = replay(server, config.requests(), slo, seed=config.seed)
    return {"policy": policy, "config": asdict(config), "profile": profile.to_dict(),
            "groups": facts, "alone": alone, "live": live}


def predict(measured: dict[str, Any]) -> list[dict]:
    """Per-request TTFT/TBT of the slice, predicted by the runtime model from `measure`."""
    config = DemoConfig(**measured["config"])
    groups = _sim_groups(Profile.from_dict(measured["profile"]), measured["groups"])
    requests = [SimRequest(r.arrival_s, r.prompt_tokens, r.new_tokens)
                for r in config.requests()]
    token_times = LocalSimulation(groups, requests, config.budget,
                                  replicas_timeline(measured["live"]["timeline"]),
                                  hop_s=hop_costs(groups, measured["alone"], config)).run()
    return [{"ttft_s": times[0] - r.arrival_s,
             **({"tbt_s": (times[-1] - times[0]) / (len(times) - 1)} if len(times) > 1 else {})}
            for r, times in zip(requests, token_times)]


def fidelity(config: DemoConfig, policy: str) -> dict[str, Any]:
    """Predicted vs measured TTFT/TBT p50 and p90 for one policy on the config's slice."""
    return compare(measure(config, policy))


def compare(measured: dict[str, Any]) -> dict[str, Any]:
    """The prediction's percentiles against the live run's, with relative errors."""
    ok = [r["outcome"] == "ok" for r in measured["live"]["requests"]]
    predicted = percentiles([p for p, kept in zip(predict(measured), ok) if kept], KEYS, LEVELS)
    live = percentiles([r for r, kept in zip(measured["live"]["requests"], ok) if kept], KEYS,
                       LEVELS)
    return {"policy": measured["policy"], "alone": measured["alone"],
            "predicted": predicted, "measured": live,
            "relative_error": {k: abs(predicted[k] - live[k]) / live[k] for k in live if live[k]},
            "live_summary": measured["live"]["summary"]}


def _sim_groups(profile: Profile, facts: list[dict]) -> list[SimGroup]:
    """Simulation groups from the fitted profile and the groups' batching facts."""
    by_name = {g.name: g for g in profile.groups}
    return [SimGroup(f["name"], f["batches"], f["stateful"], f["context_keyed"],
                     fitted_latency(by_name[f["name"]])) for f in facts]


def _serve_alone(server: Any, config: DemoConfig) -> dict[str, float]:
    """TTFT and TBT of one request served alone (the median of a few)."""
    g = torch.Generator().manual_seed(config.seed)
    vocab = getattr(server.config, "vocab_size", 256)
    ttft, tbt = [], []
    for _ in range(HOP_SAMPLES):
        future = server.generate(torch.randint(0, vocab, (1, ALONE_PROMPT), generator=g),
                                 max_new_tokens=config.max_new, ignore_eos=True)
        future.result()
        ttft.append(future.record["ttft_s"])
        tbt.append(future.record["tbt_s"])
    return {"ttft_s": statistics.median(ttft), "tbt_s": statistics.median(tbt)}


def hop_costs(groups: list[SimGroup], alone: dict[str, float], config: DemoConfig
              ) -> dict[str, float]:
    """Request-thread seconds per group call in each phase: what a request served alone
    measured beyond what the model gives it without them (executions and batch gathering)."""
    times = LocalSimulation(groups, [SimRequest(0.0, ALONE_PROMPT, config.max_new)],
                            config.budget, lambda t: {}).run()[0]
    modelled_tbt = (times[-1] - times[0]) / (len(times) - 1)
    return {"prefill": max(0.0, (alone["ttft_s"] - times[0]) / len(groups)),
            "decode": max(0.0, (alone["tbt_s"] - modelled_tbt) / len(groups))}

