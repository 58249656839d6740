"""Fidelity of the runtime model: predicted vs measured TTFT and TBT on one trace slice.

For a policy: profile every group of the served model on this machine (eager lowering, one
intra-op thread, as the server runs them) and fit each group's latency; measure the
machine's capacity for jobs at once (its cores share memory bandwidth); serve the slice live
(fixed replicas, or the autoscaler's with `measure(autoscale=True)`); then replay the same
requests through the discrete-event model of the runtime (runtime/local_sim.py) with the
fitted profiles, the same budget and the replica counts the live run had over time.
Requests served alone calibrate what the profiles miss: each group's executions on the
server take longer than back to back in the profiler (the seconds beyond the profile are
added to every execution), and the per-call work outside the executions ("hops": the
request thread's Python between group calls, the replica's own Python, thread switches) is
what those requests measured beyond what the model gives them without it; the share of it
that holds the interpreter lock is the Python CPU those requests cost (request thread plus
replica threads outside the group callables) over the hop seconds. Groups are profiled with
batches run as the server runs them (a vmap over single-request calls).
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, replace
from functools import partial
from typing import Any, Callable

import torch

from fxscale.contracts.metrics import percentiles, token_timings
from fxscale.contracts.plan import SLO
from fxscale.contracts.profile import Profile
from fxscale.contracts.trace import Request
from fxscale.runtime.devices.fit import fit_profile
from fxscale.runtime.simulator.local import LocalSimulation, SimGroup, profile_latency
from fxscale.serving.replay import replay
from fxscale.studies.demo import DemoConfig

DECODE_BATCHES = (1, 2, 4, 8, 16)
PREFILL_BATCHES = (1, 2)
HOP_SAMPLES = 5         # requests served alone, before and after the live run each
ALONE_PROMPT = 16
KEYS, LEVELS = ("ttft_s", "tbt_s"), (50, 90)  # what is compared
MACHINE_CHANGE = 0.10   # a run whose two-job capacity moved more saw the machine change


def measured_profile(model: torch.nn.Module, config: DemoConfig, granularity: str) -> Profile:
    """Prefill (at the slice's prompt lengths) and decode profiles of every group, fitted,
    with one intra-op thread and batches run as the server runs them (a vmap over
    single-request calls)."""
    from fxscale.profiling.measure import Grid, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # every prompt length the slice has: prefill cost is not smooth in it on a CPU
        lengths = tuple(sorted({r.prompt_tokens for r in config.requests()} | {ALONE_PROMPT}))
        contexts = (16, config.max_prompt, config.max_prompt + config.max_new)
        kwargs = dict(granularity=granularity, lowering="eager", repeats=3, warmup=1,
                      rotations=1, progress=False, batching="vmap")
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
    return [{"name": g.name, "batches": known[g.name].batchable,
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
    """Profile the groups, measure the machine's capacity and serve requests alone (before
    and after the live run), serve the slice live: everything the prediction needs and what
    it is compared with (JSON-ready). Without the autoscaler, operator groups keep one
    replica each and the model keeps one per slot."""
    import fxscale

    torch._dynamo.reset()  # a fresh cache: earlier compiles of this model class count
    model = config.model()
    profile = measured_profile(model, config, "operator" if policy == "operator" else "model")
    capacity_before = machine_capacity(config.hidden)
    torch._dynamo.reset()  # the server compiles afresh: the profiler's graphs would stay
    # in the model's cache and every serving call would check their guards too
    slo = SLO(config.ttft, config.tbt)
    with fxscale.serve(model, policy=policy, slo=slo, budget=config.budget,
                       autoscale=autoscale, autoscale_interval_s=config.interval_s) as server:
        facts = group_facts(profile, server.group_graphs)
        if policy == "model" and not autoscale:
            server.scale("model", config.budget)
        alone_before = _serve_alone(server, config)
        time.sleep(config.interval_s)  # the calibration requests leave the autoscaler's view
        live = replay(server, config.requests(), slo, seed=config.seed)
        pools = server.stats()["groups"]
        alone_after = _serve_alone(server, config)
    # a cloud machine's speed can change while it runs (where its cores are placed, its
    # neighbours): machine parameters are the means of those measured before and after
    capacity_after = machine_capacity(config.hidden)
    return {"policy": policy, "config": asdict(config), "profile": profile.to_dict(),
            "groups": facts, "capacity": _mean(capacity_before, capacity_after),
            "capacity_before_after": [capacity_before, capacity_after],
            "alone": _mean(alone_before, alone_after),
            "alone_before_after": [alone_before, alone_after], "live": live, "pools": pools}


def _mean(before: Any, after: Any) -> Any:
    """The mean of two measurements of the same quantities (numbers, or lists or dicts of
    them)."""
    if isinstance(before, dict):
        return {key: _mean(before[key], after[key]) for key in before}
    if isinstance(before, list):
        return [_mean(a, b) for a, b in zip(before, after)]
    return (before + after) / 2


def predict(measured: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """Per-request TTFT/TBT of the slice, predicted by the runtime model from `measure`, and
    the calibration it used."""
    config = DemoConfig(**measured["config"])
    groups = _sim_groups(Profile.from_dict(measured["profile"]), measured["groups"])
    calibration = calibrate(groups, measured, config)
    requests = [Request(r.arrival_s, r.prompt_tokens, r.output_tokens)
                for r in config.requests()]
    token_times = LocalSimulation(with_extra(groups, calibration["execution_extra_s"]),
                                  requests, config.budget,
                                  replicas_timeline(measured["live"]["timeline"]),
                                  hop_s=calibration["hop_s"], capacity=calibration["capacity"],
                                  hop_locked=calibration["hop_locked"]).run()
    return _timings(requests, token_times), calibration


def fidelity(config: DemoConfig, policy: str, runs: int = 5,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Predicted vs measured TTFT/TBT p50 and p90 for one policy on the config's slice, over
    `runs` independent runs (each measured and predicted on its own); `progress(finished,
    runs)` after each."""
    if runs < 1:
        raise ValueError(f"runs={runs}: fidelity needs at least one run")
    reports = []
    for _ in range(runs):
        reports.append(compare(measure(config, policy)))
        if progress:
            progress(len(reports), runs)
    return compare_runs(reports)


def compare_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians over runs of the predicted and of the measured percentiles, with their
    relative errors, the range the live runs spanned and each run's report. Near saturation
    a live run is not repeatable on a shared machine (its speed changes within minutes), so
    one run measures the machine's moment as much as the model."""
    keys = reports[0]["measured"]
    predicted = {k: statistics.median(r["predicted"][k] for r in reports) for k in keys}
    live = {k: statistics.median(r["measured"][k] for r in reports) for k in keys}
    return {"policy": reports[0]["policy"], "predicted": predicted, "measured": live,
            "relative_error": _relative_errors(predicted, live),
            "measured_range": {k: [min(r["measured"][k] for r in reports),
                                   max(r["measured"][k] for r in reports)] for k in keys},
            "machine": machine_stability(reports), "runs": reports}


def machine_stability(reports: list[dict[str, Any]], change: float = MACHINE_CHANGE
                      ) -> dict[str, Any] | None:
    """How the machine's throughput with two jobs at once moved over the runs: its range over
    every capacity measurement, and the runs whose measurements before and after differ by
    more than `change` (the machine changed while they ran: the model saw neither state
    alone). None for runs measured without capacities."""
    pairs = [r.get("capacity_before_after") for r in reports]
    if not all(pairs):
        return None
    two_jobs = [[before[1], after[1]] for before, after in pairs]
    return {"capacity_2_jobs": [min(map(min, two_jobs)), max(map(max, two_jobs))],
            "changed_runs": sum(abs(a - b) > change * min(a, b) for a, b in two_jobs)}


def compare(measured: dict[str, Any]) -> dict[str, Any]:
    """The prediction's percentiles against the live run's, with relative errors."""
    ok = [r["outcome"] == "ok" for r in measured["live"]["requests"]]
    rows, calibration = predict(measured)
    predicted = percentiles([p for p, kept in zip(rows, ok) if kept], KEYS, LEVELS)
    live = percentiles([r for r, kept in zip(measured["live"]["requests"], ok) if kept], KEYS,
                       LEVELS)
    return {"policy": measured["policy"], "alone": measured["alone"],
            "calibration": calibration,
            "capacity_before_after": measured.get("capacity_before_after"),
            "alone_before_after": measured.get("alone_before_after"),
            "predicted": predicted, "measured": live,
            "relative_error": _relative_errors(predicted, live),
            "live_summary": measured["live"]["summary"]}


def _relative_errors(predicted: dict[str, float], live: dict[str, float]) -> dict[str, float]:
    """|predicted - measured| / measured, for every measured figure that is not zero."""
    return {k: abs(predicted[k] - live[k]) / live[k] for k in live if live[k]}


def _sim_groups(profile: Profile, facts: list[dict]) -> list[SimGroup]:
    """Simulation groups from the fitted profile and the groups' batching facts."""
    by_name = {g.name: g for g in profile.groups}
    return [SimGroup(f["name"], f["batches"], f["stateful"], f["context_keyed"],
                     profile_latency(by_name[f["name"]])) for f in facts]


def _timings(requests: list[Request], token_times: list[list[float]]) -> list[dict]:
    """TTFT (and TBT, past one token) of each simulated request."""
    return [token_timings(r.arrival_s, times) for r, times in zip(requests, token_times)]


def _serve_alone(server: Any, config: DemoConfig) -> dict[str, Any]:
    """Medians over requests served alone: TTFT, TBT, the request thread's CPU, the replica
    threads' Python CPU per request (both hold the interpreter lock), and each group's
    execution seconds per request."""
    g = torch.Generator().manual_seed(config.seed)
    vocab = getattr(server.config, "vocab_size", 256)
    records = []
    for _ in range(HOP_SAMPLES):
        python_before, executions_before = _replica_python_s(server), _execution_s(server)
        future = server.generate(torch.randint(0, vocab, (1, ALONE_PROMPT), generator=g),
                                 max_new_tokens=config.max_new, ignore_eos=True)
        future.result()
        executions = _execution_s(server)
        records.append(dict(future.record,
                            replica_python_s=_replica_python_s(server) - python_before,
                            execution_s={name: seconds - executions_before[name]
                                         for name, seconds in executions.items()}))
    medians = {key: statistics.median(r[key] for r in records)
               for key in ("ttft_s", "tbt_s", "thread_cpu_s", "replica_python_s")}
    medians["execution_s"] = {name: statistics.median(r["execution_s"][name] for r in records)
                              for name in records[0]["execution_s"]}
    return medians


def _execution_s(server: Any) -> dict[str, float]:
    """Each group's execution seconds so far."""
    return {name: g["execution_s"] for name, g in server.stats()["groups"].items()}


def _replica_python_s(server: Any) -> float:
    """The replica threads' Python CPU so far, over all groups."""
    groups = server.stats()["groups"].values()
    if any(g["python_cpu_s"] is None for g in groups):
        raise RuntimeError("fidelity needs per-thread CPU clocks (time.pthread_getcpuclockid),"
                           " which this platform lacks; run it on Linux")
    return sum(g["python_cpu_s"] for g in groups)


def concurrent_rates(jobs: dict[Any, Callable[[], Any]], seconds: float
                     ) -> dict[Any, float]:
    """Calls per second of each job, all called in a loop at once, each on its own thread,
    for `seconds`."""
    counts = dict.fromkeys(jobs, 0)
    stop = time.perf_counter() + seconds

    def work(name: Any) -> None:
        while time.perf_counter() < stop:
            jobs[name]()
            counts[name] += 1

    workers = [threading.Thread(target=work, args=(name,)) for name in jobs]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    return {name: count / elapsed for name, count in counts.items()}


def machine_capacity(hidden: int, jobs: int = 3, seconds: float = 0.3, rounds: int = 5
                     ) -> list[float]:
    """Throughput of 1..jobs weight-bound jobs at once (one thread each) relative to one:
    what the cores give together when they share memory bandwidth, as decode does. Job
    counts take turns over `rounds`, and each keeps its median, so a passing disturbance
    moves no ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    weights = [torch.randn(hidden, 4 * hidden) for _ in range(jobs)]
    x = torch.randn(1, hidden)

    def rate(n: int) -> float:
        jobs = {k: partial(torch.matmul, x, weights[k]) for k in range(n)}
        return sum(concurrent_rates(jobs, seconds).values())

    try:
        rate(1)  # warm up
        samples = [[rate(n) for n in range(1, jobs + 1)] for _ in range(rounds)]
    finally:
        torch.set_num_threads(threads)
    rates = [statistics.median(column) for column in zip(*samples)]
    return [r / rates[0] for r in rates]


def execution_extra(groups: list[SimGroup], alone: dict[str, Any], config: DemoConfig
                    ) -> dict[str, float]:
    """Seconds each execution of a group took on the server beyond its profile, from the
    requests served alone: the server runs a group between the others (its data out of the
    caches), the profiler runs it back to back. They hold a slot, as the execution does."""
    if "execution_s" not in alone:
        raise ValueError("this measurement's requests served alone have no execution seconds "
                         "(it predates them): take it again with fxscale.fidelity.measure")
    extra = {}
    for group in groups:
        profiled = group.latency("prefill", 1, ALONE_PROMPT) + sum(
            group.latency("decode", 1, ALONE_PROMPT + step) for step in range(1, config.max_new))
        extra[group.name] = max(0.0, (alone["execution_s"][group.name] - profiled)
                                / config.max_new)
    return extra


def with_extra(groups: list[SimGroup], extra_s: dict[str, float]) -> list[SimGroup]:
    """The groups with each execution taking its extra seconds too."""
    def plus(latency: Callable[[str, int, int], float], seconds: float) -> Callable:
        return lambda phase, batch, length: latency(phase, batch, length) + seconds
    return [replace(g, latency=plus(g.latency, extra_s[g.name])) for g in groups]


def hop_costs(groups: list[SimGroup], alone: dict[str, Any], config: DemoConfig,
              capacity: tuple[float, ...]) -> dict[str, float]:
    """Seconds per group call in each phase outside the group profiles (the hops): what a
    request served alone measured beyond what the model gives it without them (executions
    and batch gathering)."""
    lone = [Request(0.0, ALONE_PROMPT, config.max_new)]
    modelled = _timings(lone, LocalSimulation(groups, lone, config.budget, lambda t: {},
                                              capacity=capacity).run())[0]
    return {phase: max(0.0, (alone[key] - modelled[key]) / len(groups))
            for phase, key in (("prefill", "ttft_s"), ("decode", "tbt_s"))}


def calibrate(groups: list[SimGroup], measured: dict[str, Any], config: DemoConfig
              ) -> dict[str, Any]:
    """The model's machine parameters: the measured capacity; each group's execution seconds
    beyond its profile, then the hop costs, of requests served alone; and the share of those
    hops that holds the interpreter lock: the CPU the request thread and the replica threads'
    own Python spent on a lone request, over the hops it took."""
    capacity = tuple(measured["capacity"])
    alone = measured["alone"]
    extra = execution_extra(groups, alone, config)
    hops = hop_costs(with_extra(groups, extra), alone, config, capacity)
    hop_seconds = len(groups) * (hops["prefill"] + (config.max_new - 1) * hops["decode"])
    python = alone["thread_cpu_s"] + alone["replica_python_s"]
    share = min(1.0, python / hop_seconds) if hop_seconds else 1.0
    return {"execution_extra_s": extra, "hop_s": hops, "capacity": capacity,
            "hop_locked": share}
