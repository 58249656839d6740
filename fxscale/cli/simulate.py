"""`fxscale simulate`: replay a request trace on a model preset under autoscaling policies
and report GPU-hours, energy and SLO attainment (a table, and JSON)."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from fxscale.cli.args import (
    bounded,
    fraction,
    json_target,
    non_negative_float,
    positive,
    positive_float,
    write_json,
)
from fxscale.contracts.plan import POLICIES
from fxscale.contracts.trace import CONTEXT_MODES
from fxscale.runtime.simulator.forecast import FORECASTS


def add_simulate_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale simulate` on the command line's subparsers."""
    from fxscale.models.presets import PRESETS

    sim = sub.add_parser("simulate", help="replay a request trace on a model preset under "
                                          "autoscaling policies and report GPU-hours, energy "
                                          "and SLO attainment")
    sim.add_argument("--model", choices=sorted(PRESETS), default="llama-2-70b")
    sim.add_argument("--layers", type=positive,
                     help="analyse only this many layers (quick runs; default: all)")
    sim.add_argument("--device", default="h100", help="h100, h200, a100, l4 (default h100)")
    sim.add_argument("--trace", default="azure-conv",
                     help="a shipped trace (azure-conv, azure-code, mooncake-conversation, "
                          "mooncake-synthetic, servegen-mm-image) or a trace file path")
    sim.add_argument("--start", type=non_negative_float, default=0.0, help="window start (s)")
    sim.add_argument("--duration", type=positive_float, help="window length (s)")
    sim.add_argument("--rate-scale", type=positive_float, default=1.0,
                     help="replay the trace this many times faster")
    sim.add_argument("--policy", choices=(*POLICIES, "all"), default="operator")
    sim.add_argument("--slo-ttft", type=positive_float,
                     help="TTFT target in seconds (default by model size, see docs)")
    sim.add_argument("--slo-tbt", type=positive_float,
                     help="mean time between tokens target in seconds (default by model size)")
    sim.add_argument("--slo-ttft-per-token", type=non_negative_float, default=0.0, metavar="S",
                     help="TTFT allowance per prompt token in seconds, on top of --slo-ttft "
                          "(long-context SLOs: a request's target is TTFT + S x its prompt "
                          "tokens; default 0)")
    sim.add_argument("--over-context", choices=CONTEXT_MODES, default="reject",
                     help="requests whose prompt does not fit the model's context: reject "
                          "them (default) or truncate the prompt; counted in the output")
    sim.add_argument("--prefix-caching", action="store_true",
                     help="reuse the KV of cached prompt prefixes, by the trace's prefix hashes "
                          "(Mooncake traces carry them), route prompts to where their "
                          "prefix is cached, and plan for the share of prompt tokens the "
                          "caches have served, for every policy alike")
    sim.add_argument("--expert-skew", type=non_negative_float, default=0.0, metavar="S",
                     help="routing over a mixture of experts' experts: 0 uniform (default), "
                          "S up to 10 skewed (the expert of rank r gets a share proportional "
                          "to r^-S); a step reads the weights of the experts its tokens "
                          "reach, for every policy alike")
    sim.add_argument("--attainment", type=fraction, default=0.99,
                     help="fraction of requests that must meet both targets (default 0.99)")
    sim.add_argument("--interval", type=positive_float, default=30.0,
                     help="autoscaler decision interval in seconds (every policy)")
    sim.add_argument("--policy-interval", type=policy_interval, action="append", default=[],
                     metavar="POLICY=S", help="a policy's own decision interval, e.g. "
                     "operator=1 (repeatable; the others keep --interval)")
    sim.add_argument("--rate-window", type=positive_float, default=30.0, metavar="S",
                     help="seconds the autoscaler counts arrivals over to measure the rate "
                          "(default 30, rounded up to whole intervals; every policy alike)")
    sim.add_argument("--hold", type=non_negative_float, default=90.0, metavar="S",
                     help="seconds in a row the plans must ask for less before a deployment "
                          "shrinks or changes to a cheaper layout (default 90, rounded up to "
                          "whole intervals; every policy alike)")
    sim.add_argument("--forecast", choices=FORECASTS, default="reactive",
                     help="the rate the autoscaler plans for: reactive (the observed rate or "
                          "its moving mean, whichever is higher) or holt (Holt's trend "
                          "forecast a start-up ahead); every policy alike")
    sim.add_argument("--startup", type=non_negative_float, default=10.0, metavar="S",
                     help="seconds a new device takes to start before it loads weights "
                          "(default 10, an assumption)")
    sim.add_argument("--load-gbps", type=positive_float, default=5.0, metavar="GB/S",
                     help="GB/s a new device loads its weights at (default 5, an assumption)")
    sim.add_argument("--warm-pool", type=bounded(0, 100_000), default=0, metavar="N",
                     help="devices kept started and billed while idle; a new device taken "
                          "from them skips the start-up (default 0)")
    sim.add_argument("--headroom", type=positive_float,
                     help="plan for this multiple of the observed rate (default: searched)")
    sim.add_argument("--fixed-gpus", type=positive, metavar="N",
                     help="also find the highest rate each policy serves on N devices")
    sim.add_argument("--seed", type=int, default=0, help="seed of sampled traces (ServeGen)")
    instead = sim.add_mutually_exclusive_group()  # what to run instead of one comparison
    instead.add_argument("--sweep", choices=("quick", "full"),
                     help="instead of one replay, map operator / model device-hours and "
                          "energy over 2-D slices through a stated base point (--model, "
                          "--layers, --device and --seed set it): heatmaps, JSON and "
                          "Markdown in --sweep-dir; quick is one slice (about a minute), full "
                          "four (about ten)")
    sim.add_argument("--sweep-dir", type=Path, default=Path("sweep"), metavar="DIR",
                     help="where --sweep writes (default ./sweep)")
    instead.add_argument("--attribute", action="store_true",
                     help="instead of comparing policies, split the operator-vs-model gap "
                          "into its sources (Shapley values over the operator mechanisms, "
                          "nine runs with the setting search): a table here, a waterfall "
                          "(PNG, SVG), JSON and Markdown in --attribute-dir")
    sim.add_argument("--attribute-dir", type=Path, default=Path("attribution"), metavar="DIR",
                     help="where --attribute writes (default ./attribution)")
    sim.add_argument("--json", metavar="PATH", type=json_target,
                     help="write the results as JSON ('-': stdout)")
    sim.set_defaults(run=_simulate)


def policy_interval(text: str) -> tuple[str, float]:
    """POLICY=SECONDS, e.g. operator=1."""
    policy, _, seconds = text.partition("=")
    if policy not in POLICIES or not seconds:
        raise argparse.ArgumentTypeError(f"expected POLICY=SECONDS with POLICY one of "
                                         f"{', '.join(POLICIES)}, got {text!r}")
    return policy, positive_float(seconds)


def _sweep(args: argparse.Namespace) -> int:
    """Run the quick or full map and write it; print where it went."""
    import time

    from rich.progress import Progress

    from fxscale.runtime.simulator.sweep import SweepPoint, sweep_plan
    from fxscale.studies.simulate_sweep import sweep, write_sweep

    plan = sweep_plan(args.sweep, SweepPoint(model=args.model, layers=args.layers,
                                             device=args.device, seed=args.seed))
    start = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task(f"{args.sweep} sweep", total=plan.points)

        def step(what: str) -> None:
            bar.update(task, description=what)
            bar.advance(task)

        data = sweep(plan, step)
    data["wall_s"] = time.perf_counter() - start
    base = plan.base
    command = " ".join([f"fxscale simulate --sweep {args.sweep}", f"--model {base.model}",
                        *([f"--layers {base.layers}"] if base.layers else []),
                        f"--device {base.device}", f"--seed {base.seed}",
                        f"--sweep-dir {args.sweep_dir}"])
    for path in write_sweep(data, args.sweep_dir, command):
        print(path)
    return 0


def _setup(args: argparse.Namespace):
    """(console, trace, service model, SLO, scaling config) of a simulate command."""
    from rich.console import Console

    from fxscale.contracts.plan import SLO
    from fxscale.models.presets import preset_service
    from fxscale.runtime.planner.search import default_slo
    from fxscale.runtime.simulator.replay import ScalingConfig
    from fxscale.runtime.traces.loaders import load_trace

    console = Console(stderr=True)
    trace = load_trace(args.trace, args.start, args.duration, args.rate_scale, args.seed)
    with console.status(f"analysing {args.model} (first use: about a minute, then cached)"):
        service = preset_service(args.model, args.device, args.layers, args.expert_skew)
    ttft, tbt = default_slo(service.weight_bytes / 2)
    slo = SLO(args.slo_ttft or ttft, args.slo_tbt or tbt, args.attainment,
              args.slo_ttft_per_token)
    scaling = ScalingConfig(interval_s=args.interval, hold_s=args.hold,
                            window_s=args.rate_window, headroom=args.headroom or 1.0,
                            startup_s=args.startup, load_bandwidth=args.load_gbps * 1e9,
                            forecast=args.forecast, warm_pool=args.warm_pool)
    return console, trace, service, slo, scaling


def _config(args: argparse.Namespace, trace, slo, context: dict) -> dict:
    """The setting of a simulate command, as its JSON and tables state it."""
    return {"model": args.model, "layers": args.layers, "device": args.device,
            "trace": trace.name,
            "trace_source": trace.source, "requests": len(trace.requests),
            "duration_s": trace.duration_s(), "slo_ttft": slo.ttft, "slo_tbt": slo.tbt,
            "attainment_target": slo.attainment, "interval_s": args.interval,
            "hold_s": args.hold, "rate_window_s": args.rate_window,
            "slo_ttft_per_token": slo.ttft_per_token, "context": context,
            "prefix_caching": args.prefix_caching, "expert_skew": args.expert_skew,
            "forecast": args.forecast,
            "startup_s": args.startup, "load_gbps": args.load_gbps,
            "warm_pool": args.warm_pool, "policy_intervals": dict(args.policy_interval),
            "prefix_block_tokens": trace.prefix_block_tokens}


def _attribute(args: argparse.Namespace) -> int:
    """Split the operator-vs-model gap into its sources; print the table, write the files."""
    import sys
    import time

    from fxscale.runtime.simulator.attribution import attribute
    from fxscale.studies.simulate_attribution import attribution_table, write_attribution

    console, trace, service, slo, scaling = _setup(args)
    start = time.perf_counter()
    with console.status("attributing") as status:
        data = attribute(service, trace, slo, scaling, dict(args.policy_interval),
                         tune=args.headroom is None, over_context=args.over_context,
                         prefix_caching=args.prefix_caching, progress=status.update)
    data["wall_s"] = time.perf_counter() - start
    data["config"] = _config(args, trace, slo, data.pop("context"))
    command = "fxscale " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["simulate"] else \
        "fxscale simulate --attribute"
    print(attribution_table(data))
    for path in write_attribution(data, args.attribute_dir, command):
        print(path)
    if args.json:
        write_json(data, args.json)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    """Replay a trace under one or all policies; print a table, write JSON."""
    if args.sweep:
        if args.expert_skew:
            raise ValueError("--expert-skew is not an axis of --sweep (its models route "
                             "uniformly); run the skewed comparison without --sweep")
        return _sweep(args)
    if args.attribute:
        return _attribute(args)
    from fxscale.runtime.simulator.evaluate import compare

    console, trace, service, slo, scaling = _setup(args)
    policies = tuple(POLICIES) if args.policy == "all" else (args.policy,)
    with console.status("simulating") as status:
        outcome = compare(service, trace, policies, slo, scaling, tune=args.headroom is None,
                          fixed_gpus=args.fixed_gpus, progress=status.update,
                          over_context=args.over_context, prefix_caching=args.prefix_caching,
                          intervals=dict(args.policy_interval))
    config = _config(args, trace, slo, outcome["context"])
    runs = {row["policy"]: _run_json(row) for row in outcome["rows"]}
    print(simulate_table(runs, config))
    if args.json:
        data = ({**runs[args.policy], "config": config} if args.policy != "all" else
                {"policies": runs, **outcome["bound"], "wall_s": outcome["wall_s"],
                 "config": config})
        write_json(data, args.json)
    return 0


def _run_json(row: dict) -> dict:
    """The JSON of one policy's run: the metrics, its setting, timeline and decisions (a
    policy no deployment lets meet the SLO: why, and the bounds)."""
    if "infeasible" in row:
        return {k: row[k] for k in row if k != "result"}
    result = row["result"]
    keys = ("gpu_hours", "energy_kwh", "slo_attainment", "ttft_p50", "ttft_p99", "tbt_p50",
            "tbt_p99", "throughput_tok_s", "lower_bound_gpu_hours", "lower_bound_energy_kwh",
            "step_bound_gpu_hours", "step_bound_energy_kwh",
            "wall_s", "requests", "policy", "headroom", "floor", "meets_target", "context",
            "prefix_reuse", "interval_s")
    data = {k: row[k] for k in keys}
    data["max_rate_at_slo"] = row.get("max_rate_at_slo")
    data["fixed_gpus"] = row.get("fixed_gpus")
    data["fixed_plan"] = row.get("plan")
    data["timeline"] = result.timeline
    data["decisions"] = [d.to_dict() for d in result.decisions]
    return data


def simulate_table(runs: dict, config: dict) -> str:
    """A side-by-side table of policy runs, with each one's distance from the fluid bound."""
    from rich.console import Console
    from rich.table import Table

    per_token = (f" + {config['slo_ttft_per_token'] * 1e3:g} ms per prompt token"
                 if config.get("slo_ttft_per_token") else "")
    table = Table(title=f"{config['model']} on {config['device']}, trace {config['trace']} "
                        f"({config['requests']} requests, {config['duration_s'] / 60:.0f} min); "
                        f"SLO TTFT {config['slo_ttft']} s{per_token}, TBT {config['slo_tbt']} s "
                        f"at {config['attainment_target']:.0%}", title_justify="left")
    for col in ("policy", "GPU-h", "x bound", "energy kWh", "SLO met", "TTFT p50/p99 s",
                "TBT p50/p99 ms", "tok/s", "setting", "max req/s @ N"):
        table.add_column(col, justify="left" if col in ("policy", "setting") else "right")
    for name, r in runs.items():
        if "infeasible" in r:
            table.add_row(name, "—", "—", "—", "no deployment meets the SLO (below)")
            continue
        table.add_row(name, f"{r['gpu_hours']:.2f}",
                      f"{r['gpu_hours'] / r['step_bound_gpu_hours']:.2f}",
                      f"{r['energy_kwh']:.2f}",
                      f"{r['slo_attainment']:.2%}" + ("" if r["meets_target"] else " (!)"),
                      f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}",
                      f"{r['tbt_p50'] * 1e3:.0f} / {r['tbt_p99'] * 1e3:.0f}",
                      f"{r['throughput_tok_s']:.0f}",
                      f"headroom {r['headroom']:g}, floor {r['floor']:g}",
                      "" if r["max_rate_at_slo"] is None else
                      f"{r['max_rate_at_slo']:.2f} @ {r['fixed_gpus']}")
    first = next(iter(runs.values()))
    table.caption = (f"x bound: over the step bound, {first['step_bound_gpu_hours']:.2f} "
                     f"GPU-h, {first['step_bound_energy_kwh']:.2f} kWh (the fluid bound: "
                     f"{first['lower_bound_gpu_hours']:.2f} GPU-h, "
                     f"{first['lower_bound_energy_kwh']:.2f} kWh); (!) = attainment target "
                     "not reached at any searched setting")
    for name, r in runs.items():
        if "infeasible" in r:
            table.caption += f"; {name}: {r['infeasible']}"
    context = config.get("context") or {}
    over = context.get("rejected", 0) + context.get("truncated_prompts", 0)
    if over or context.get("shortened_outputs"):
        done = "rejected" if context["mode"] == "reject" else "truncated"
        table.caption += (f"; {over} prompts that do not fit the model's {context['limit']}-"
                          f"token context {done}, {context['shortened_outputs']} outputs stopped "
                          "at it (every policy alike)")
    if config.get("prefix_caching"):
        reuse = ", ".join(f"{name} {r['prefix_reuse']:.1%}" for name, r in runs.items()
                          if r.get("prefix_reuse") is not None)
        table.caption += (f"; prefix caching: prompt tokens reused {reuse}" if reuse else
                          "; prefix caching on, but the trace has no prefix hashes")
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()
