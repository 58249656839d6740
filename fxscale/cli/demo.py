"""`fxscale demo`: compile a zoo model with the fxscale backend, print its operator groups,
check it against eager, then serve a trace slice with both policies."""
from __future__ import annotations

import argparse
import time

from fxscale.cli.args import (
    file_target,
    json_target,
    model_args,
    positive,
    positive_float,
    write_json,
)
from fxscale.compiler.options import GRANULARITIES, LOWERINGS


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale demo` on the command line's subparsers."""
    from fxscale.models.zoo import NAMES

    demo = sub.add_parser("demo", help="compile a small Llama with the fxscale backend, print its "
                                       "operator groups and check the output against eager")
    model_args(demo, NAMES, default_layers=2)
    demo.add_argument("--lowering", choices=LOWERINGS, default="inductor")
    demo.add_argument("--granularity", choices=GRANULARITIES, default="operator")
    demo.add_argument("--json", metavar="PATH", type=file_target,
                      help="also write the GroupGraph as JSON")
    demo.add_argument("--no-serve", dest="serve", action="store_false",
                      help="skip serving the trace slice (compile check only)")
    demo.add_argument("--serve-seconds", type=positive_float, default=30.0,
                      help="length of the served trace slice per policy, in seconds")
    demo.add_argument("--speedup", type=positive_float, default=2.0,
                      help="trace seconds replayed per second")
    demo.add_argument("--serve-hidden", type=positive, default=2048,
                      help="hidden size of the served 2-layer Llama")
    demo.add_argument("--results", metavar="PATH", type=json_target,
                      help="write the serving comparison as JSON ('-': stdout)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    """Compile a zoo model with fxscale, print the group table, compare with eager."""
    import torch
    from rich.console import Console

    from fxscale.compiler.backend import Backend
    from fxscale.models import zoo

    console = Console(width=220)
    entry = zoo.build(args.model, batch=args.batch, length=args.length, layers=args.layers,
                      hidden=args.hidden)
    compiler = Backend({"granularity": args.granularity, "lowering": args.lowering})
    with torch.no_grad():
        expected = _first_tensor(entry.run())
        compiled = torch.compile(entry.model, backend=compiler)
        start = time.perf_counter()
        with console.status(f"compiling {args.model} with fxscale ({args.lowering} lowering)..."):
            actual = _first_tensor(entry.run(compiled))
        elapsed = time.perf_counter() - start
    graph = compiler.group_graphs[-1]
    console.print(graph.table(), markup=False, highlight=False)
    for group in graph.groups:
        console.print(f"  {group.id}: {group.split_reason}", markup=False, highlight=False)
    if args.json:
        graph.to_json(args.json)
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    tolerance = 1e-5 if args.lowering == "eager" else 1e-4
    ok = diff <= tolerance * scale
    console.print(f"compile + first run: {elapsed:.1f} s; output vs eager: max abs diff "
                  f"{diff:.2e} (tolerance {tolerance:g} x max |output| = {tolerance * scale:.2e}) "
                  f"-> {'OK' if ok else 'MISMATCH'}", markup=False, highlight=False)
    if ok and args.serve:
        _serve_demo(args, console)
    return 0 if ok else 1


def _serve_demo(args: argparse.Namespace, console) -> None:
    """Serve an Azure conversation slice with operator- and model-level autoscaling."""
    from rich.console import Console
    from rich.progress import Progress

    from fxscale.studies.demo import (
        DemoConfig,
        replicas_table,
        serve_trace,
        summary_table,
    )

    config = DemoConfig(seconds=args.serve_seconds, speedup=args.speedup,
                        hidden=args.serve_hidden)
    console.print(f"\nserving {config.seconds:g} s of the Azure conversation trace "
                  f"({config.speedup:g}x speed) on a {config.layers}-layer Llama "
                  f"(hidden {config.hidden}), budget {config.budget}, with operator-level and "
                  "then model-level autoscaling", markup=False, highlight=False)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(policy: str, done: int, total: int) -> None:
            if policy not in tasks:
                tasks[policy] = bar.add_task(f"serving ({policy})", total=total)
            bar.update(tasks[policy], completed=done)

        results = serve_trace(config, progress=progress)
    console.print(summary_table(results))
    for policy, run in results["policies"].items():
        console.print(replicas_table(policy, run))
    if args.results:
        write_json(results, args.results)


def _first_tensor(output):
    """The main tensor of a model output (logits, last hidden state, or the tensor itself)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
    return output[0] if isinstance(output, (tuple, list)) else output
