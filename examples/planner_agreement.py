"""Planner vs simulator on steady Poisson load: a Markdown table of predicted and replayed p99.

    python examples/planner_agreement.py [--model llama-2-70b] [--device h100] [--minutes 20]
        [--rates 2,5,10] [--layers N] [--trace azure-conv] [--duration S]
        [--slo-ttft-per-token S]

For each policy and rate the planner's plan is held fixed and replayed on Poisson arrivals
whose prompt and output lengths are drawn from a trace (the Azure 2023 conversation trace,
or the first `--duration` seconds of another).
"""
from __future__ import annotations

import argparse

from fxscale.contracts.errors import NoDeploymentError
from fxscale.contracts.plan import SLO
from fxscale.models.presets import preset_service
from fxscale.runtime.planner.search import Workload, default_slo, plan
from fxscale.runtime.simulator.evaluate import metrics
from fxscale.runtime.simulator.replay import simulate
from fxscale.runtime.traces.loaders import load_trace, poisson_resample


def main() -> None:
    """Print the agreement table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-70b")
    parser.add_argument("--device", default="h100")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rates", default="2,5,10")
    parser.add_argument("--layers", type=int, help="only this many layers (a quick check)")
    parser.add_argument("--trace", default="azure-conv", help="the lengths' trace")
    parser.add_argument("--duration", type=float, help="only the trace's first S seconds")
    parser.add_argument("--slo-ttft-per-token", type=float, default=0.0,
                        help="TTFT allowance per prompt token, seconds (long-prompt traces)")
    args = parser.parse_args()
    service = preset_service(args.model, args.device, args.layers)
    slo = SLO(*default_slo(service.weight_bytes / 2), ttft_per_token=args.slo_ttft_per_token)
    trace = load_trace(args.trace)
    if args.duration:
        trace = trace.window(0, args.duration)
    base, context = trace.within_context(service.context_limit)
    print(f"{args.trace} requests within the {context['limit']}-token context: "
          f"{context['rejected']} rejected, {context['shortened_outputs']} outputs stopped at it\n")
    print("| policy | req/s | plan | devices | TTFT p99 planned / replayed | "
          "TBT p99 planned / replayed | attainment |")
    print("|---|---|---|---|---|---|---|")
    for rate in map(float, args.rates.split(",")):
        work = Workload.from_requests(base.requests, rate)
        trace = poisson_resample(base, rate, args.minutes * 60, seed=1)
        for policy in ("model", "phase", "operator"):
            try:
                p = plan(service, work, slo, policy)
            except NoDeploymentError:
                print(f"| {policy} | {rate:g} | no deployment meets the SLO | | | | |")
                continue
            m = metrics(simulate(service, trace, policy, slo, fixed=p, workload=work), slo)
            shape = " + ".join(f"{e.count}x {_shape(e.engine.to_dict())}" for e in p.engines)
            print(f"| {policy} | {rate:g} | {shape} | {p.devices} | {p.ttft_p99:.3f} / "
                  f"{m['ttft_p99']:.3f} s ({m['ttft_p99'] / p.ttft_p99 - 1:+.0%}) | "
                  f"{p.tbt_p99 * 1e3:.1f} / {m['tbt_p99'] * 1e3:.1f} ms "
                  f"({m['tbt_p99'] / p.tbt_p99 - 1:+.0%}) | {m['slo_attainment']:.2%} |")


def _shape(engine: dict) -> str:
    """A short name for an engine shape."""
    if engine["type"] == "lockstep":
        return f"{engine['role']} TP{engine['shards']}"
    ways = engine["attention_shards"]
    attention = engine["attention"] if ways == 1 else \
        f"{engine['attention'] // ways}x{ways}-way"  # sets of devices split by heads
    unpooled = ", unpooled" if engine["attention"] and not engine["pooled_prefill"] else ""
    return (f"attention {attention} + dense {engine['dense_replicas']}xTP"
            f"{engine['dense_shards']}{unpooled}")


if __name__ == "__main__":
    main()
