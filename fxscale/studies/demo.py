"""The serving half of `fxscale demo`: one trace slice served by model-level and then by
operator-level autoscaling, on the same engine, the same devices and the same requests, each
run beside the simulator's prediction of it.

A deployment gets a few devices, each with its memory and one compute slot. A model-level
replica holds a whole copy of the weights and its KV cache; an operator-level attention
replica holds KV blocks only. Both autoscale by the same rules (runtime/autoscaling): replicas
for the time between tokens, attention (model) replicas for the KV the requests want, as far
as the devices' memory allows. Before each run, the server serves a calibration burst; its
groups' execution times and the engine's own time, fitted on that burst, and the bytes each
replica holds are what the simulator (runtime/simulator/deployment.py: the same scheduler,
placement and autoscaler in simulated time) predicts the run from.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from fxscale.contracts.devices import Devices, format_bytes
from fxscale.contracts.metrics import token_timings
from fxscale.contracts.plan import LIVE_POLICIES, SLO
from fxscale.contracts.trace import Request
from fxscale.runtime.simulator.deployment import DeployedGroup, Deployment, simulate_deployment
from fxscale.serving.replay import replay, scaled_slice, summarize, trace_prompts
from fxscale.studies.calibration import calibrate, fit_costs, measured_groups

POLICIES = ("model", "operator")  # the baseline first
TIE_ATTAINMENT = 0.05             # attainment differences below this are a tie
TIE_THROUGHPUT = 0.10             # ... and relative tokens/s differences below this
SWEEP_PAGE = "docs/demo-sweep.md"


@dataclass(frozen=True)
class DemoConfig:
    """What the serving demo serves, on what, and how (the defaults: chosen from the
    predicted sweep in docs/demo-sweep.md)."""

    trace: str = "azure-conv"
    start_s: float = 120.0         # where the slice starts in the trace
    seconds: float = 40.0          # replay length (after the speed-up)
    speedup: float = 2.0           # trace seconds per replay second
    hidden: int = 512
    layers: int = 2
    devices: Devices = field(default_factory=lambda: Devices(1, 40 << 20, 1))
    kv_cache_tokens: int = 2432    # per attention (model) replica
    ttft: float = 2.0
    tbt: float = 0.25
    interval_s: float = 2.0        # autoscaler interval
    prompt_divisor: float = 4.0
    max_prompt: int = 384
    output_divisor: float = 8.0
    max_new: int = 64
    sample_s: float = 0.25         # how often occupancy is sampled, live and predicted
    check: int = 4                 # requests per policy compared with HF greedy
    seed: int = 0

    @property
    def budget(self) -> int:
        """Executions at once over the devices."""
        return self.devices.total_slots

    @classmethod
    def engine_slice(cls, **overrides: Any) -> DemoConfig:
        """The engine benchmarks' and fidelity runs' slice: short Azure conversations (prompts
        /64 up to 32 tokens, outputs /16 up to 16) on a 2 x 2048 Llama, one device of
        unbounded memory with 2 slots."""
        base = cls(start_s=0.0, seconds=30.0, speedup=2.0, hidden=2048,
                   devices=Devices(1, None, 2),
                   kv_cache_tokens=16384, tbt=0.2, prompt_divisor=64.0, max_prompt=32,
                   output_divisor=16.0, max_new=16, sample_s=1.0)
        return replace(base, **overrides)

    def model(self) -> Any:
        """The served Llama (random weights, eval mode)."""
        from fxscale.models import zoo

        return zoo.build("llama", layers=self.layers, hidden=self.hidden).model.eval()

    def requests(self) -> list[Request]:
        """The scaled trace slice."""
        return scaled_slice(self.trace, start_s=self.start_s,
                            duration_s=self.seconds * self.speedup, speedup=self.speedup,
                            prompt_divisor=self.prompt_divisor,
                            output_divisor=self.output_divisor, max_prompt=self.max_prompt,
                            max_new=self.max_new)

    def slo(self) -> SLO:
        return SLO(self.ttft, self.tbt)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "devices": self.devices.to_dict()}


def calibrated(server: Any, config: DemoConfig, requests: list[Request]) -> Deployment:
    """Serve a calibration burst shaped like the requests, then the simulator's view of the
    server: its groups' executions and the engine's own time fitted on the burst, the bytes
    each replica holds, the same devices, scaled by the same rules."""
    calibrate(server, requests)
    groups = measured_groups(server)
    counts = {name: pool.counters()["replicas"] for name, pool in server.pools.items()}
    costs = fit_costs(server, groups, counts, 1 if server.policy == "model" else config.budget)
    return deployment_of(server, config, groups, costs)


def deployment_of(server: Any, config: DemoConfig, groups: list, costs: Any) -> Deployment:
    """The simulator's view of a live server: its groups in the order it placed them, with
    the bytes each replica holds, on the same devices, scaled by the same rules."""
    by_name = {g.name: g for g in groups}
    deployed = []
    for name, pool in server.pools.items():  # the order the server first placed them
        demand = pool.demand(0)
        deployed.append(DeployedGroup(by_name[name], pool.stateful, demand.weight_bytes,
                                      demand.kv_bytes))
    return Deployment(server.policy, tuple(deployed), server.schedule, server.num_blocks,
                      config.devices, config.slo(), costs, autoscale=True,
                      interval_s=config.interval_s)


def predicted_run(deployment: Deployment, requests: list[Request], slo: SLO,
                  sample_s: float) -> dict[str, Any]:
    """The simulator's run of the slice, shaped as a live replay's."""
    out = simulate_deployment(deployment, requests, sample_s)
    rejected = set(out["rejected"])
    rows = []
    for i, (request, times) in enumerate(zip(requests, out["token_times"])):
        row = {"arrival_s": request.arrival_s, "prompt_tokens": request.prompt_tokens,
               "new_tokens": request.output_tokens}
        if i in rejected or not times:
            rows.append({**row, "outcome": "rejected"})
            continue
        rows.append({**row, "outcome": "ok", "tokens": len(times), "finished_s": times[-1],
                     **token_timings(request.arrival_s, times)})
    seconds = max((r["finished_s"] for r in rows if r["outcome"] == "ok"), default=1.0)
    return {"summary": summarize(rows, slo, seconds), "timeline": out["samples"],
            "autoscaler": out["autoscaler"]}


def figures(run: dict[str, Any], stateful: list[str]) -> dict[str, float | None]:
    """The figures the demo compares, from a live or a predicted run alike."""
    s, timeline = run["summary"], run["timeline"]
    return {"slo_attainment": s["slo_attainment"], "tokens_per_s": s["tokens_per_s"],
            "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
            "tbt_p50_s": s["tbt_p50_s"], "tbt_p99_s": s["tbt_p99_s"],
            "peak_running": max(r["running"] for r in timeline),
            "peak_kv_blocks": max(r["kv_blocks_used"] for r in timeline),
            "peak_kv_replicas": max(max(r["replicas"].get(g, 0) for g in stateful)
                                    for r in timeline),
            "scale_decisions": len(run["autoscaler"]["decisions"])}


def serve_policy(config: DemoConfig, policy: str, model: Any, requests: list[Request],
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Serve the slice with one policy's autoscaling, after a calibration burst; the live
    run, its prediction, what the devices held, and a sample of outputs checked."""
    import fxscale

    slo = config.slo()
    tick = (lambda stage, done, total: progress(stage, done, total)) if progress else \
        (lambda *_: None)
    start = time.perf_counter()
    with fxscale.serve(model, policy=policy, slo=slo, devices=config.devices,
                       kv_cache_tokens=config.kv_cache_tokens) as server:
        ready = time.perf_counter() - start
        tick(f"{policy}: calibrating", 0, 1)
        deployment = calibrated(server, config, requests)
        server.reset_stats()
        server.start_autoscaler(config.interval_s)
        live = replay(server, requests, slo, seed=config.seed, sample_s=config.sample_s,
                      progress=lambda i, n: tick(f"{policy}: serving", i, n))
        stats = server.stats()
        graph = server.group_graphs[-1] if server.group_graphs else None
    outputs = live.pop("outputs")
    live.update(autoscaler=stats["autoscaler"], devices=stats["devices"], ready_s=ready)
    predicted = predicted_run(deployment, requests, slo, config.sample_s)
    stateful = [g.model.name for g in deployment.groups if g.stateful]
    return {"live": live, "predicted": predicted,
            "figures": {"live": figures(live, stateful),
                        "predicted": figures(predicted, stateful)},
            "kv_blocks_per_replica": deployment.num_blocks,
            "groups": [{"name": g.model.name, "kind": g.model.kind, "stateful": g.stateful,
                        "weight_bytes": g.weight_bytes, "kv_bytes": g.kv_bytes}
                       for g in deployment.groups],
            "costs": asdict(deployment.costs), "outputs": outputs, "group_graph": graph}


def check_outputs(model: Any, requests: list[Request], outputs: list, config: DemoConfig
                  ) -> dict[str, Any]:
    """The first `config.check` served requests' tokens against Hugging Face greedy decoding
    of the same prompts."""
    import torch

    prompts = trace_prompts(requests, model.config.vocab_size, config.seed)
    checked = [i for i, out in enumerate(outputs) if out is not None][:config.check]
    equal = 0
    with torch.no_grad():
        for i in checked:
            ids = torch.tensor([prompts[i]])
            reference = model.generate(  # eos_token_id=None: on past EOS, as served
                ids, max_new_tokens=requests[i].output_tokens, do_sample=False,
                eos_token_id=None)[0, ids.shape[1]:].tolist()
            equal += reference == outputs[i]
    return {"checked": len(checked), "equal": equal}


def serve_trace(config: DemoConfig, policies: tuple[str, ...] = POLICIES,
                progress: Callable[[str, int, int], None] | None = None,
                graphs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serve the slice once per policy; per policy the live run, its prediction and the
    figures of both, the outputs checked, and the verdict. `graphs`, when given, receives
    each policy's GroupGraph (for the HTML page)."""
    model, requests = config.model(), config.requests()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # ties once
    results: dict[str, Any] = {"config": config.to_dict(), "requests": len(requests),
                               "weight_bytes": weights, "policies": {}}
    for policy in policies:
        if policy not in LIVE_POLICIES:
            raise ValueError(f"policy must be one of {LIVE_POLICIES}, got {policy!r}")
        run = serve_policy(config, policy, model, requests, progress)
        run["correct"] = check_outputs(model, requests, run.pop("outputs"), config)
        graph = run.pop("group_graph")
        if graphs is not None:
            graphs[policy] = graph
        results["policies"][policy] = run
    if set(POLICIES) <= set(results["policies"]):
        results["verdict"] = verdict(results)
    return results


def verdict(results: dict[str, Any]) -> str:
    """One plain sentence: which policy did better live, by how much, and why."""
    model, operator = (results["policies"][p] for p in POLICIES)
    a, b = model["figures"]["live"], operator["figures"]["live"]
    weights = format_bytes(results["weight_bytes"])
    block_bytes = _kv_block_bytes(results)
    memory = (f"model-level held at most {_count(a['peak_kv_replicas'], 'model replica')}, "
              f"each a whole copy of the {weights} of weights beside its KV cache, while "
              f"operator-level placed the weights once and held up to "
              f"{_count(b['peak_kv_replicas'], 'attention replica')} of KV blocks only "
              f"(peak {a['peak_kv_blocks']} vs "
              f"{b['peak_kv_blocks']} KV blocks in use"
              + (f", {format_bytes(block_bytes)} each" if block_bytes else "") + ")")
    compute = (f"model-level ran {_count(a['peak_kv_replicas'], 'whole-model engine')}, each "
               "stepping on its own, while operator-level's one engine steps through its "
               "groups one after another")
    gain = (b["slo_attainment"] or 0.0) - (a["slo_attainment"] or 0.0)  # None: no requests
    speed = b["tokens_per_s"] / a["tokens_per_s"] - 1 if a["tokens_per_s"] else 0.0
    scores = (f"SLO attainment {format_figure('slo_attainment', b['slo_attainment'])} vs "
              f"{format_figure('slo_attainment', a['slo_attainment'])} (operator vs model), "
              f"tokens/s {speed:+.0%}")
    if abs(gain) < TIE_ATTAINMENT and abs(speed) < TIE_THROUGHPUT:
        extra = ", and the extra KV room did not change the outcome" \
            if b["peak_kv_blocks"] > a["peak_kv_blocks"] else ""
        return (f"A tie on this run ({scores}): {memory}{extra}; {SWEEP_PAGE} shows where "
                "the policies differ.")
    if gain >= TIE_ATTAINMENT or (abs(gain) < TIE_ATTAINMENT and speed > 0):
        return f"Operator-level did better than model-level ({scores}): {memory}."
    return f"Model-level did better than operator-level ({scores}): {compute}."


def _count(n: int, noun: str) -> str:
    """'1 model replica', '2 model replicas'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _kv_block_bytes(results: dict[str, Any]) -> int:
    """Bytes of one KV block (every layer) of the served model."""
    run = results["policies"]["model"]
    kv = sum(g["kv_bytes"] for g in run["groups"] if g["stateful"])
    return kv // run["kv_blocks_per_replica"]


def summary_table(results: dict[str, Any]) -> Any:
    """A rich table: each figure, live and predicted, per policy (from the JSON's figures)."""
    from rich.table import Table

    config = results["config"]
    devices = Devices(**config["devices"])
    table = Table(title=f"{results['requests']} requests of {config['trace']} "
                        f"({config['speedup']:g}x speed), {devices.describe()}, SLO TTFT "
                        f"{config['ttft']:g} s / TBT {config['tbt']:g} s")
    table.add_column("figure")
    for policy in results["policies"]:
        table.add_column(f"{policy} live", justify="right")
        table.add_column(f"{policy} predicted", justify="right", style="dim")
    for key, label in FIGURES:
        cells = []
        for run in results["policies"].values():
            cells += [format_figure(key, run["figures"]["live"][key]),
                      format_figure(key, run["figures"]["predicted"][key])]
        table.add_row(label, *cells)
    table.add_row("outputs equal to HF greedy",
                  *[c for run in results["policies"].values() for c in
                    (f"{run['correct']['equal']}/{run['correct']['checked']}", "")])
    return table


FIGURES = (("slo_attainment", "SLO attainment"), ("tokens_per_s", "tokens/s"),
           ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
           ("tbt_p50_s", "TBT p50 (s)"), ("tbt_p99_s", "TBT p99 (s)"),
           ("peak_running", "peak requests running"), ("peak_kv_blocks", "peak KV blocks held"),
           ("peak_kv_replicas", "peak attention/model replicas"),
           ("scale_decisions", "scaling decisions"))


def format_figure(key: str, value: float | None) -> str:
    """A figure as the table prints it."""
    if value is None:
        return "-"
    if key == "slo_attainment":
        return f"{value:.1%}"
    if key == "tokens_per_s":
        return f"{value:.1f}"
    if key.endswith("_s"):
        return f"{value:.3f}"
    return f"{value:.0f}"


def replicas_table(policy: str, run: dict[str, Any], columns: int = 8) -> Any:
    """A rich table of replicas per group (and KV blocks, devices' memory) over time."""
    from rich.table import Table

    timeline = run["live"]["timeline"]
    step = max(1, len(timeline) // columns)
    picked = timeline[::step]
    table = Table(title=f"{policy}: replicas per group over time (live)")
    table.add_column("group")
    for row in picked:
        table.add_column(f"{row['t']:.0f}s", justify="right")
    groups = sorted({g for row in timeline for g in row["replicas"]})
    for group in groups:
        table.add_row(group, *(str(row["replicas"].get(group, "")) for row in picked))
    table.add_row("[dim]requests running[/dim]", *(str(row["running"]) for row in picked))
    table.add_row("[dim]KV blocks held[/dim]", *(str(row["kv_blocks_used"]) for row in picked))
    for d in range(len(picked[0]["device_weight_bytes"])):
        table.add_row(f"[dim]device {d} weights + KV[/dim]",
                      *(f"{format_bytes(row['device_weight_bytes'][d])} + "
                        f"{format_bytes(row['device_kv_bytes'][d])}" for row in picked))
    return table


def decision_lines(policy: str, run: dict[str, Any]) -> list[str]:
    """Every live scaling decision with its reason, one line each."""
    return [f"{policy} t={d['t']:.1f}s {d['scope']}: {d['old']} -> {d['new']} "
            f"({d['action']}): {d['reason']}" for d in run["live"]["autoscaler"]["decisions"]]


def html_run(results: dict[str, Any]) -> dict[str, Any]:
    """The live runs as the HTML report's run input: per policy a timeline of replicas,
    requests running, KV blocks and each device's memory (MiB), and the decisions."""
    policies = {}
    for policy, run in results["policies"].items():
        rows = []
        for row in run["live"]["timeline"]:
            out = {k: row[k] for k in ("t", "rate", "attainment", "replicas", "running",
                                       "kv_blocks_used") if k in row}
            for d, (weights, kv) in enumerate(zip(row["device_weight_bytes"],
                                                  row["device_kv_bytes"])):
                out[f"device {d} weights MiB"] = weights / (1 << 20)
                out[f"device {d} KV MiB"] = kv / (1 << 20)
            rows.append(out)
        policies[policy] = {"policy": f"{policy} (live)", "timeline": rows,
                            "decisions": run["live"]["autoscaler"]["decisions"],
                            "figures": run["figures"]["live"]}
    return {"policies": policies}
