"""`fxscale fidelity`: the engine simulator's predictions against live runs of the demo's
trace slice (docs/runtime.md, "Fidelity of the engine simulator")."""
from __future__ import annotations

import argparse
from typing import Any

from fxscale.cli.args import json_target, positive, positive_float, write_json
from fxscale.contracts.plan import LIVE_POLICIES

GOAL = 0.10  # the relative error the simulator aims to stay within (injected service times)
FIGURES = {"ttft_p50_s": "TTFT p50", "ttft_p90_s": "TTFT p90", "tbt_p50_s": "TBT p50",
           "tbt_p90_s": "TBT p90"}


def add_fidelity_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale fidelity` on the command line's subparsers."""
    parser = sub.add_parser("fidelity", help="serve the demo's trace slice live and compare "
                                             "each run with the engine simulator's "
                                             "prediction of its TTFT and TBT (p50, p90)")
    parser.add_argument("--policy", choices=(*LIVE_POLICIES, "both"), default="both")
    parser.add_argument("--service", choices=("injected", "measured"), default="injected",
                        help="injected: every group call takes a set time, the simulator is "
                             "told the same (checks the engine's own logic); measured: the "
                             "kernels run, the simulator gets their fitted times")
    parser.add_argument("--runs", type=positive, default=3,
                        help="independent runs per policy (default 3)")
    parser.add_argument("--replicas", type=positive, default=1,
                        help="replicas of every group (operator) or model replicas (model)")
    parser.add_argument("--micro-batches", type=int, choices=(1, 2), default=1,
                        help="2: each step's two halves side by side (default 1)")
    parser.add_argument("--speedup", type=positive_float, default=4.0,
                        help="trace seconds replayed per second (default 4)")
    parser.add_argument("--seconds", type=positive_float, default=30.0,
                        help="length of the served slice in seconds (default 30)")
    parser.add_argument("--hidden", type=positive, default=None,
                        help="hidden size of the served Llama (default: 128 injected, "
                             "2048 measured)")
    parser.add_argument("--json", metavar="PATH", type=json_target,
                        help="write every run and the medians as JSON ('-': stdout)")
    parser.set_defaults(run=_fidelity_command)


def _fidelity_command(args: argparse.Namespace) -> int:
    """Measure and predict each policy's runs with a progress bar; print tables, write JSON."""
    from rich.console import Console
    from rich.progress import Progress

    from fxscale.studies.demo import DemoConfig
    from fxscale.studies.fidelity import fidelity

    # injected times dwarf a small model's own compute, so the engine's logic is measured
    hidden = args.hidden or (128 if args.service == "injected" else 2048)
    config = DemoConfig.engine_slice(seconds=args.seconds, speedup=args.speedup, hidden=hidden)
    policies = LIVE_POLICIES if args.policy == "both" else (args.policy,)
    reports: dict[str, Any] = {}
    document = {"config": config.to_dict(), "service": args.service, "replicas": args.replicas,
                "micro_batches": args.micro_batches, "policies": reports}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        for policy in policies:
            task = bar.add_task(f"{policy}: calibrate, serve, simulate", total=args.runs)
            reports[policy] = fidelity(
                config, policy, runs=args.runs, service=args.service, replicas=args.replicas,
                micro_batches=args.micro_batches,
                progress=lambda done, total, task=task: bar.update(task, completed=done))
            if args.json and args.json != "-":  # a later failure loses no finished policy
                write_json(document, args.json)
    console = Console(stderr=args.json == "-")  # keep stdout for the JSON
    for policy, report in reports.items():
        console.print(fidelity_table(policy, report, args.service))
    if args.json == "-":
        write_json(document, args.json)
    return 0


def fidelity_table(policy: str, report: dict[str, Any], service: str) -> Any:
    """A rich table of one policy's medians over runs, the live runs' range and the worst
    single run, with how many runs met the goal on every figure."""
    from rich.table import Table

    runs = report["runs"]
    met = sum(all(e <= GOAL for e in run["relative_error"].values()) for run in runs)
    count = f"{len(runs)} live run{'s' if len(runs) > 1 else ''}"
    caption = f"{met} of {count} within {GOAL:.0%} on every figure ({service} service times)"
    table = Table(title=f"{policy}: engine simulator vs {count} (medians)", caption=caption)
    for column in ("figure", "predicted s", "measured s", "error", "live runs s",
                   "worst run error", "in-run fit error"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, label in FIGURES.items():
        low, high = report["measured_range"][key]
        error, in_run = report["relative_error"][key], report["relative_error_in_run"][key]
        table.add_row(label, f"{report['predicted'][key]:.4f}", f"{report['measured'][key]:.4f}",
                      f"[{'green' if error <= GOAL else 'red'}]{error:.0%}",
                      f"{low:.4f}-{high:.4f}",
                      f"{max(run['relative_error'][key] for run in runs):.0%}",
                      f"[{'green' if in_run <= GOAL else 'red'}]{in_run:.0%}")
    return table
