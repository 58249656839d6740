"""Policy comparison on a trace: each policy at its best setting, the fluid bound, metrics.

"Best setting" is searched the same way for every policy: the planner already picks tensor-
parallel degrees, chunk sizes and pool sizes; here the autoscaler's headroom (plan for
headroom x the observed rate) and floor (never plan below a fraction of the trace's peak
interval rate, up to 3x for traces burstier than their interval peak; an operator would size
it from yesterday's traffic) are searched, and the
cheapest setting whose SLO attainment reaches the target wins. `static` plans once, for the
peak interval rate times the headroom.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from typing import Callable

from fxscale.contracts.errors import NoDeploymentError
from fxscale.contracts.metrics import quantile
from fxscale.contracts.plan import SLO, Plan
from fxscale.contracts.trace import Trace
from fxscale.runtime.planner.engines import ALL_MECHANISMS, Mechanisms
from fxscale.runtime.planner.search import SHARDS, Workload, plan
from fxscale.runtime.planner.service import Batch, ServiceModel
from fxscale.runtime.simulator.prefix import PrefixCache, reused_tokens
from fxscale.runtime.simulator.replay import Result, ScalingConfig, Simulation

HEADROOMS = (1.0, 1.25, 1.5, 2.0, 3.0)
# Floors and the static plan are multiples of the trace's peak rate over windows this long,
# whatever a policy's decision interval: policies with different intervals get equal floors.
PEAK_WINDOW_S = 30.0
FLOORS = (0.0, 0.5, 1.0, 2.0, 3.0)


def peak_rate(trace: Trace, interval_s: float) -> float:
    """The highest arrival rate over `interval_s` windows of the trace."""
    counts: dict[int, int] = {}
    for r in trace.requests:
        key = int(r.arrival_s // interval_s)
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values()) / interval_s


def weighted_quantile(samples: list[tuple[float, int]], q: float) -> float:
    """Quantile of values given as (value, weight) pairs."""
    ordered = sorted(samples)
    total = sum(w for _, w in ordered)
    if not total:
        return math.nan
    running = 0
    for value, weight in ordered:
        running += weight
        if running >= q * total:
            return value
    return ordered[-1][0]


def metrics(result: Result, slo: SLO) -> dict:
    """The per-run numbers of a replay (latencies in seconds, energy in kWh)."""
    prompts = result.prompts or [0] * len(result.ttft)
    met = sum(slo.met(ttft, tpot, prompt)
              for ttft, tpot, prompt in zip(result.ttft, result.tpot, prompts))
    return {"gpu_hours": result.device_seconds / 3600, "energy_kwh": result.energy_j / 3.6e6,
            "slo_attainment": met / len(result.ttft),
            "ttft_p50": quantile(result.ttft, 0.5), "ttft_p99": quantile(result.ttft, 0.99),
            "tbt_p50": weighted_quantile(result.gaps, 0.5),
            "tbt_p99": weighted_quantile(result.gaps, 0.99),
            "throughput_tok_s": result.output_tokens / result.duration_s
            if result.duration_s > 0 else 0.0,
            "requests": len(result.ttft),
            "prefix_reuse": result.prefix["reuse"] if result.prefix else None}


def lower_bound(service: ServiceModel, trace: Trace, interval_s: float,
                tbt: float | None = None) -> dict:
    """Two bounds on device-hours and energy: the fluid bound and, given the TBT target, the
    step bound above it.

    Fluid: perfectly divisible devices, no queueing, no overheads. In each interval the
    devices needed are the larger of the weights' memory and the work of the requests arriving
    in it at the efficient compute and bandwidth rates (weights read once, amortised away).
    With prefix hashes, every prefix block is prefilled once, by an unbounded cache.

    Step: besides, every decode step reads the weights (of a mixture of experts, those its
    tokens reach), and a step carries at most the largest batch whose weightless (dense) work
    fits the TBT on the widest tensor-parallel shape any policy forms; and each request holds
    its KV for at least its decode steps at the shortest step (the widest shape reading the
    weights one token reaches). Energy: the work at max power, the rest of the held devices
    idle."""
    device = service.device
    bandwidth = device.memory_bandwidth * device.memory_efficiency
    widest = max(SHARDS)
    shortest_step_s = service.weight_bytes_read(1) / bandwidth / widest
    dense = [k for k in service.kinds if not k.stateful]
    per_request_s = max(1e-15, service.peak_work_time(Batch(decode_n=1, decode_s1=1.0),
                                                      dense))
    largest_batch = max(1.0, math.floor(widest * tbt / per_request_s)) if tbt else math.inf
    # device-seconds of one step's reads at that batch (the fewest per token)
    weight_read_s = service.weight_bytes_read(largest_batch) / bandwidth
    fluid: dict[int, float] = {}
    step: dict[int, float] = {}
    kv_byte_s: dict[int, float] = {}
    cached = PrefixCache(sys.maxsize)
    for r in trace.requests:
        out = max(0, r.output_tokens - 1)
        reused = reused_tokens(cached.reuse(r.prefix), trace.prefix_block_tokens,
                               r.prompt_tokens) if r.prefix else 0
        cached.store(r.prefix)
        batch = Batch(1, r.prompt_tokens - reused, r.prompt_tokens ** 2 - reused ** 2, out,
                      out * (r.prompt_tokens + 1 + out / 2))
        key = int(r.arrival_s // interval_s)
        fluid[key] = fluid.get(key, 0.0) + service.peak_work_time(batch)
        step[key] = step.get(key, 0.0) + out / largest_batch * weight_read_s
        kv_byte_s[key] = kv_byte_s.get(key, 0.0) + service.kv_bytes_per_token * out * (
            r.prompt_tokens + 1 + out / 2) * shortest_step_s
    span = int(trace.requests[-1].arrival_s // interval_s) + 1
    memory_s = service.weight_bytes / device.memory_bytes * interval_s
    totals = {"lower_bound": [0.0, 0.0], "step_bound": [0.0, 0.0]}  # device-s, busy s
    for key in range(span):
        work = fluid.get(key, 0.0)
        for name, held, busy in (
                ("lower_bound", memory_s, work),
                ("step_bound", memory_s + kv_byte_s.get(key, 0.0) / device.memory_bytes,
                 work + step.get(key, 0.0))):
            totals[name][0] += max(held, busy)
            totals[name][1] += busy
    out_keys = {}
    for name, (device_s, busy_s) in totals.items():
        energy = busy_s * device.max_power_w + (device_s - busy_s) * device.idle_power_w
        out_keys[f"{name}_gpu_hours"] = device_s / 3600
        out_keys[f"{name}_energy_kwh"] = energy / 3.6e6
    if not tbt:
        return {k: v for k, v in out_keys.items() if k.startswith("lower_bound")}
    return out_keys


def run_setting(service: ServiceModel, trace: Trace, policy: str, slo: SLO,
                scaling: ScalingConfig, floor: float, workload: Workload,
                mechanisms: Mechanisms = ALL_MECHANISMS) -> tuple[Result, dict]:
    """One replay of a policy at one headroom and floor."""
    peak = peak_rate(trace, PEAK_WINDOW_S)
    fixed = plan(service, workload.at(peak * scaling.headroom), slo, "static") \
        if policy == "static" else None
    sim = Simulation(service, trace, policy, slo, workload, scaling, fixed,
                     floor_rate=floor * peak, mechanisms=mechanisms)
    result = sim.run()
    return result, metrics(result, slo)


def best_setting(service: ServiceModel, trace: Trace, policy: str, slo: SLO,
                 scaling: ScalingConfig, tune: bool = True,
                 progress: Callable[[str], None] | None = None,
                 mechanisms: Mechanisms = ALL_MECHANISMS) -> dict:
    """The cheapest (headroom, floor) meeting the attainment target, with its metrics (an
    operator policy using only the given mechanisms).

    Without `tune`, the given scaling config and no floor. When no setting meets the target,
    the one with the highest attainment is returned with meets_target false."""
    workload = Workload.from_requests(trace.requests, trace.rate())
    settings = [(h, f) for f in (FLOORS if policy != "static" else (0.0,))
                for h in HEADROOMS] if tune else [(scaling.headroom, 0.0)]
    best = fallback = refusal = None
    done_floors: set[float] = set()
    for headroom, floor in settings:
        if floor in done_floors:
            continue  # a lower headroom already met the target at this floor
        if progress:
            progress(f"{policy}: headroom {headroom:g}, floor {floor:g} x peak")
        try:
            result, row = run_setting(service, trace, policy, slo,
                                      replace(scaling, headroom=headroom), floor, workload,
                                      mechanisms)
        except NoDeploymentError as err:
            refusal = err  # no deployment of this policy meets the SLO at that rate
            continue
        row.update(policy=policy, headroom=headroom, floor=floor, result=result)
        if row["slo_attainment"] >= slo.attainment:
            done_floors.add(floor)
            if best is None or row["gpu_hours"] < best["gpu_hours"]:
                best = row
            if headroom == settings[0][0]:
                break  # met at the lowest headroom: higher floors only cost more
        if fallback is None or row["slo_attainment"] > fallback["slo_attainment"]:
            fallback = row
    chosen = best or fallback
    if chosen is None:
        raise NoDeploymentError(str(refusal) if refusal else
                                f"no {policy} setting was replayed")
    chosen["meets_target"] = best is not None
    return chosen


def max_rate_at_slo(service: ServiceModel, trace: Trace, policy: str, slo: SLO, devices: int,
                    progress: Callable[[str], None] | None = None) -> dict:
    """The highest arrival rate a policy serves within `devices` devices at the attainment
    target: the planner's widest plan within the budget, held fixed, replayed on the trace
    time-compressed or stretched (geometric bisection on the rate scale)."""
    workload = Workload.from_requests(trace.requests, trace.rate())
    base = trace.rate()
    try:
        fixed = widest_plan(service, workload, slo, policy, devices)
    except NoDeploymentError:
        return {"max_rate_at_slo": 0.0, "fixed_gpus": devices, "plan": None}

    def attained(scale: float) -> bool:
        sim = Simulation(service, trace.scaled(scale), policy, slo, workload.at(base * scale),
                         ScalingConfig(), fixed)
        row = metrics(sim.run(), slo)
        if progress:
            progress(f"{policy}: {devices} devices at {base * scale:.2f} req/s -> "
                     f"{row['slo_attainment']:.2%}")
        return row["slo_attainment"] >= slo.attainment

    low = high = None
    scale = fixed.rate / base
    while (low is None or high is None) and 1 / 256 <= scale <= 256:
        if attained(scale):
            low, scale = scale, scale * 2
        else:
            high, scale = scale, scale / 2
        if low is not None and high is not None and high < low:
            break
    if low is None:
        return {"max_rate_at_slo": 0.0, "fixed_gpus": devices, "plan": fixed.to_dict()}
    if high is not None:
        for _ in range(5):
            mid = math.sqrt(low * high)
            low, high = (mid, high) if attained(mid) else (low, mid)
    return {"max_rate_at_slo": low * base, "fixed_gpus": devices, "plan": fixed.to_dict()}


def widest_plan(service: ServiceModel, workload: Workload, slo: SLO, policy: str,
                devices: int) -> Plan:
    """The plan for the highest rate the planner fits within `devices` devices."""
    policy = "model" if policy == "static" else policy
    low, high = 0.0, 1.0
    while high < 1e4:
        try:
            plan(service, workload.at(high), slo, policy, max_devices=devices)
        except NoDeploymentError:
            break
        low, high = high, high * 2
    for _ in range(12):
        mid = (low + high) / 2
        try:
            plan(service, workload.at(mid), slo, policy, max_devices=devices)
            low = mid
        except NoDeploymentError:
            high = mid
    if low == 0.0:
        low = 1e-3
    return plan(service, workload.at(low), slo, policy, max_devices=devices)


def serving_trace(service: ServiceModel, trace: Trace, over_context: str,
                  prefix_caching: bool) -> tuple[Trace, dict]:
    """The trace every policy replays: requests beyond the model's context rejected or
    truncated (counted), prefix hashes dropped unless prefix caching is on."""
    trace, context = trace.within_context(service.context_limit, over_context)
    return (trace if prefix_caching else trace.without_prefixes()), context


def compare(service: ServiceModel, trace: Trace, policies, slo: SLO, scaling: ScalingConfig,
            tune: bool = True, fixed_gpus: int | None = None,
            progress: Callable[[str], None] | None = None,
            over_context: str = "reject", prefix_caching: bool = False,
            intervals: dict[str, float] | None = None) -> dict:
    """Run policies on a trace; return rows (metrics per policy) and the bound. Requests
    beyond the model's context are rejected or truncated alike for every policy (counted in
    each row's `context`); with `prefix_caching` every policy reuses cached prefixes by the
    same rule (each row's `prefix_reuse`); `intervals` gives policies their own decision
    interval (each row's `interval_s`). Of several policies, one that no deployment lets
    meet the SLO is a row with only its reason (`infeasible`); the others still run."""
    start = time.perf_counter()
    trace, context = serving_trace(service, trace, over_context, prefix_caching)
    bound = lower_bound(service, trace, scaling.interval_s, slo.tbt)
    rows = []
    for policy in policies:
        t0 = time.perf_counter()
        own = replace(scaling, interval_s=(intervals or {}).get(policy, scaling.interval_s))
        try:
            row = best_setting(service, trace, policy, slo, own, tune, progress)
        except NoDeploymentError as err:
            if len(policies) == 1:
                raise
            row = {"policy": policy, "infeasible": str(err)}
        row["interval_s"] = own.interval_s
        if fixed_gpus is not None and "infeasible" not in row:
            row.update(max_rate_at_slo(service, trace, policy, slo, fixed_gpus, progress))
        row.update(bound, context=context)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    return {"rows": rows, "bound": bound, "context": context,
            "wall_s": time.perf_counter() - start}
