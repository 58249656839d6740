"""`fxscale demo`: compile a zoo model with the fxscale backend, print its operator groups,
check it against eager, then serve a trace slice with model-level and operator-level
autoscaling on the same devices, each beside the simulator's prediction of it."""
from __future__ import annotations

import argparse
import sys
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


def _devices(text: str):
    """argparse type: devices as COUNTxMEMORY[xSLOTS]."""
    from fxscale.contracts.devices import Devices
    from fxscale.contracts.errors import InputError

    try:
        return Devices.parse(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale demo` on the command line's subparsers."""
    from fxscale.models.zoo import NAMES
    from fxscale.runtime.traces.loaders import SHIPPED
    from fxscale.studies.demo import DemoConfig

    default = DemoConfig()
    demo = sub.add_parser("demo", help="compile a small Llama with the fxscale backend, check "
                                       "it against eager, then serve a trace slice with "
                                       "model- and operator-level autoscaling on the same "
                                       "devices, live and predicted side by side")
    model_args(demo, NAMES, default_layers=2)
    demo.add_argument("--lowering", choices=LOWERINGS, default="inductor")
    demo.add_argument("--granularity", choices=GRANULARITIES, default="operator")
    demo.add_argument("--groups-json", metavar="PATH", type=file_target,
                      help="also write the compiled model's GroupGraph as JSON")
    demo.add_argument("--no-serve", dest="serve", action="store_false",
                      help="skip serving the trace slice (compile check only)")
    demo.add_argument("--trace", choices=sorted(SHIPPED), default=default.trace)
    demo.add_argument("--serve-seconds", type=positive_float, default=default.seconds,
                      help="length of the served slice per policy, in seconds "
                           f"(default {default.seconds:g})")
    demo.add_argument("--speedup", type=positive_float, default=default.speedup,
                      help=f"trace seconds replayed per second (default {default.speedup:g})")
    demo.add_argument("--serve-hidden", type=positive, default=default.hidden,
                      help=f"hidden size of the served {default.layers}-layer Llama "
                           f"(default {default.hidden})")
    demo.add_argument("--devices", type=_devices, default=default.devices,
                      help="the deployment's devices, COUNTxMEMORY[xSLOTS] (default "
                           f"{default.devices.count}x{default.devices.memory >> 20}MiB)")
    demo.add_argument("--kv-cache-tokens", type=positive, default=default.kv_cache_tokens,
                      help="KV cache tokens per attention (model) replica "
                           f"(default {default.kv_cache_tokens})")
    demo.add_argument("--json", metavar="PATH", type=json_target,
                      help="write every number of the serving run as JSON ('-': stdout)")
    demo.add_argument("--html", metavar="PATH", type=file_target,
                      help="write the serving run as the HTML report (groups, replicas, "
                           "memory and attainment over time)")
    demo.add_argument("--sweep", metavar="PATH.md", type=file_target,
                      help="instead of serving, predict both policies over the declared "
                           "sweep of devices and slices (the model, slice length and SLO "
                           "are the demo's); write it as Markdown (and the numbers as JSON "
                           "beside it)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    """Compile a zoo model with fxscale, print the group table, compare with eager; then
    serve (or sweep)."""
    import torch
    from rich.console import Console

    from fxscale.compiler.backend import Backend
    from fxscale.models import zoo

    console = Console(width=220, stderr=args.json == "-")  # stdout: the JSON alone
    if args.sweep:
        return _sweep(args, console)
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
    if args.groups_json:
        graph.to_json(args.groups_json)
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    tolerance = 1e-5 if args.lowering == "eager" else 1e-4
    ok = diff <= tolerance * scale
    console.print(f"compile + first run: {elapsed:.1f} s; output vs eager: max abs diff "
                  f"{diff:.2e} (tolerance {tolerance:g} x max |output| = {tolerance * scale:.2e}) "
                  f"-> {'OK' if ok else 'MISMATCH'}", markup=False, highlight=False)
    if not ok:
        return 1
    if args.serve:
        return _serve_demo(args, console)
    return 0


def _config(args: argparse.Namespace):
    """The serving demo's configuration from the command line."""
    from fxscale.studies.demo import DemoConfig

    return DemoConfig(trace=args.trace, seconds=args.serve_seconds, speedup=args.speedup,
                      hidden=args.serve_hidden, devices=args.devices,
                      kv_cache_tokens=args.kv_cache_tokens)


def _serve_demo(args: argparse.Namespace, console) -> int:
    """Serve the slice with model- and then operator-level autoscaling; print the figures,
    live beside predicted, the replicas and decisions, and the verdict."""
    from rich.console import Console
    from rich.progress import Progress

    from fxscale.studies.demo import (
        decision_lines,
        html_run,
        replicas_table,
        serve_trace,
        summary_table,
    )

    config = _config(args)
    console.print(f"\nserving {config.seconds:g} s of the {config.trace} trace "
                  f"({config.speedup:g}x speed) on a {config.layers}-layer Llama (hidden "
                  f"{config.hidden}) with model-level and then operator-level autoscaling, both "
                  f"on {config.devices.describe()}; each run is predicted by the simulator "
                  "from a calibration burst served before it", markup=False, highlight=False)
    graphs: dict = {}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        results = serve_trace(config, progress=progress, graphs=graphs)
    console.print(summary_table(results))
    for policy, run in results["policies"].items():
        console.print(replicas_table(policy, run))
    console.print("scaling decisions (live):", markup=False, highlight=False)
    for policy, run in results["policies"].items():
        for line in decision_lines(policy, run) or [f"{policy}: none"]:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    console.print(results["verdict"], markup=False, highlight=False, soft_wrap=True)
    if args.json:
        write_json(results, args.json)
    if args.html:
        import fxscale

        fxscale.report(graphs["operator"], args.html, run=html_run(results))
        console.print(f"wrote {args.html}", markup=False, highlight=False)
    correct = all(r["correct"]["equal"] == r["correct"]["checked"]
                  for r in results["policies"].values())
    return 0 if correct else 1


def _sweep(args: argparse.Namespace, console) -> int:
    """Predict both policies over the declared sweep; write the page and its JSON."""
    from pathlib import Path

    from fxscale.contracts.jsonio import write_atomic
    from fxscale.studies.demo_sweep import sweep, sweep_markdown

    with console.status("sweeping...") as status:
        result = sweep(_config(args), progress=lambda message: status.update(message))
    page = Path(args.sweep)
    if page.suffix != ".md":
        print(f"fxscale demo: --sweep {args.sweep}: give a Markdown page (.md); its numbers "
              "go beside it as .json", file=sys.stderr)
        return 2
    command = f"fxscale demo --sweep {args.sweep}"
    write_atomic(page, sweep_markdown(result, command))
    write_json(result, str(page.with_suffix(".json")))
    console.print(f"wrote {page} and {page.with_suffix('.json')}", markup=False,
                  highlight=False)
    return 0


def _first_tensor(output):
    """The main tensor of a model output (logits, last hidden state, or the tensor itself)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
    return output[0] if isinstance(output, (tuple, list)) else output
