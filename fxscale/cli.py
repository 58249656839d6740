"""The `fxscale` command line: demo, explain, profile, simulate, report, export-onnx, bench,
fidelity."""
from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import threading
import time
from typing import Sequence

from .cli_args import (fraction, hidden, int_list, json_target, layers, non_negative_float,
                       positive, positive_float, write_json, file_target)
from .cli_bench import add_bench_command
from .cli_export import add_export_command
from .cli_fidelity import add_fidelity_command
from .cli_report import add_report_command
from .options import GRANULARITIES, LOWERINGS
from .runtime.planner import POLICIES


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fxscale` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # SIGTERM unwinds like Ctrl-C, so a command that is writing files cleans up what it
    # started and leaves the previous results in place
    previous = signal.signal(signal.SIGTERM, _terminate) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        print(f"fxscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxscale {args.command}: interrupted; nothing was left half-written",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM handler: raise KeyboardInterrupt in the main thread."""
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per command."""
    from . import __version__
    from .presets import PRESETS
    from .zoo import NAMES

    parser = argparse.ArgumentParser(prog="fxscale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fxscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="compile a small Llama with the fxscale backend, print its "
                                       "operator groups and check the output against eager")
    _model_args(demo, NAMES, default_layers=2)
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

    explain = sub.add_parser("explain", help="analyse a zoo model (optionally on the meta device, "
                                             "no weights) and print its operator groups")
    _model_args(explain, NAMES, default_layers=2)
    explain.add_argument("--granularity", choices=GRANULARITIES, default="operator")
    explain.add_argument("--meta", action="store_true", help="build the model on the meta device")
    explain.add_argument("--json", metavar="PATH", type=json_target,
                         help="write the GroupGraph as JSON ('-': stdout)")
    explain.add_argument("--preset", choices=sorted(PRESETS),
                         help="instead of a zoo model: a published model config, analysed on the "
                              "meta device (all its layers) and cached")
    explain.set_defaults(run=_explain)
    prof = sub.add_parser("profile", help="measure every operator group over a (phase, batch, "
                                          "length) grid, fit a latency model, compare with the "
                                          "analytic CPU model")
    _model_args(prof, [n for n in NAMES if n in ("llama", "mistral", "gpt2", "opt")],
                default_layers=2, example_shape=False)
    prof.add_argument("--batches", type=int_list, default=(1, 2, 4))
    prof.add_argument("--lengths", type=int_list, default=(16, 64, 256))
    prof.add_argument("--phases", type=_phases, default=("prefill", "decode"))
    prof.add_argument("--lowering", choices=LOWERINGS, default="inductor")
    prof.add_argument("--granularity", choices=GRANULARITIES, default="operator")
    prof.add_argument("--repeats", type=positive, default=7)
    prof.add_argument("--min-ms", type=positive_float, default=1.0,
                      help="error tables cover points of at least this measured latency")
    prof.add_argument("--json", metavar="PATH", type=file_target,
                      help="write the measured Profile (with fits) as JSON")
    prof.add_argument("--markdown", metavar="PATH", type=file_target,
                      help="write the error tables as Markdown")
    prof.add_argument("--report", metavar="DIR",
                      help="instead: write the characterization report (Llama, Mixtral, Whisper; "
                           "Markdown + PNG/SVG plots) into DIR")
    prof.add_argument("--report-models", type=lambda t: tuple(t.split(",")),
                      default=("llama", "mixtral", "whisper"))
    prof.set_defaults(run=_profile)

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
    sim.add_argument("--attainment", type=fraction, default=0.99,
                     help="fraction of requests that must meet both targets (default 0.99)")
    sim.add_argument("--interval", type=positive_float, default=30.0,
                     help="autoscaler decision interval in seconds")
    sim.add_argument("--headroom", type=positive_float,
                     help="plan for this multiple of the observed rate (default: searched)")
    sim.add_argument("--fixed-gpus", type=positive, metavar="N",
                     help="also find the highest rate each policy serves on N devices")
    sim.add_argument("--seed", type=int, default=0, help="seed of sampled traces (ServeGen)")
    sim.add_argument("--json", metavar="PATH", type=json_target,
                     help="write the results as JSON ('-': stdout)")
    sim.set_defaults(run=_simulate)
    add_report_command(sub)
    add_export_command(sub)
    add_bench_command(sub)
    add_fidelity_command(sub)
    return parser


def _simulate(args: argparse.Namespace) -> int:
    """Replay a trace under one or all policies; print a table, write JSON."""
    from rich.console import Console

    from .presets import preset_service
    from .runtime.evaluate import ALL_POLICIES, compare
    from .runtime.planner import SLO, default_slo
    from .runtime.simulator import ScalingConfig
    from .runtime.traces import load_trace

    console = Console(stderr=True)
    trace = load_trace(args.trace, args.start, args.duration, args.rate_scale, args.seed)
    with console.status(f"analysing {args.model} (first use: about a minute, then cached)"):
        service = preset_service(args.model, args.device, args.layers)
    ttft, tbt = default_slo(service.weight_bytes / 2)
    slo = SLO(args.slo_ttft or ttft, args.slo_tbt or tbt, args.attainment)
    scaling = ScalingConfig(interval_s=args.interval, headroom=args.headroom or 1.0)
    policies = ALL_POLICIES if args.policy == "all" else (args.policy,)
    with console.status("simulating") as status:
        outcome = compare(service, trace, policies, slo, scaling, tune=args.headroom is None,
                          fixed_gpus=args.fixed_gpus, progress=status.update)
    config = {"model": args.model, "layers": args.layers, "device": args.device,
              "trace": trace.name,
              "trace_source": trace.source, "requests": len(trace.requests),
              "duration_s": trace.duration_s(), "slo_ttft": slo.ttft, "slo_tbt": slo.tbt,
              "attainment_target": slo.attainment, "interval_s": args.interval}
    runs = {row["policy"]: _run_json(row) for row in outcome["rows"]}
    print(simulate_table(runs, config))
    if args.json:
        data = ({**runs[args.policy], "config": config} if args.policy != "all" else
                {"policies": runs, **outcome["bound"], "wall_s": outcome["wall_s"],
                 "config": config})
        write_json(data, args.json)
    return 0



def _run_json(row: dict) -> dict:
    """The JSON of one policy's run: the metrics, its setting, timeline and decisions."""
    result = row["result"]
    keys = ("gpu_hours", "energy_kwh", "slo_attainment", "ttft_p50", "ttft_p99", "tbt_p50",
            "tbt_p99", "throughput_tok_s", "lower_bound_gpu_hours", "lower_bound_energy_kwh",
            "wall_s", "requests", "policy", "headroom", "floor", "meets_target")
    data = {k: row[k] for k in keys}
    data["max_rate_at_slo"] = row.get("max_rate_at_slo")
    data["fixed_gpus"] = row.get("fixed_gpus")
    data["fixed_plan"] = row.get("plan")
    data["timeline"] = result.timeline
    data["decisions"] = result.decisions
    return data


def simulate_table(runs: dict, config: dict) -> str:
    """A side-by-side table of policy runs, with each one's distance from the fluid bound."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config['model']} on {config['device']}, trace {config['trace']} "
                        f"({config['requests']} requests, {config['duration_s'] / 60:.0f} min); "
                        f"SLO TTFT {config['slo_ttft']} s, TBT {config['slo_tbt']} s at "
                        f"{config['attainment_target']:.0%}", title_justify="left")
    for col in ("policy", "GPU-h", "x bound", "energy kWh", "SLO met", "TTFT p50/p99 s",
                "TBT p50/p99 ms", "tok/s", "setting", "max req/s @ N"):
        table.add_column(col, justify="left" if col in ("policy", "setting") else "right")
    for name, r in runs.items():
        table.add_row(name, f"{r['gpu_hours']:.2f}", f"{r['gpu_hours'] / r['lower_bound_gpu_hours']:.2f}",
                      f"{r['energy_kwh']:.2f}",
                      f"{r['slo_attainment']:.2%}" + ("" if r["meets_target"] else " (!)"),
                      f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}",
                      f"{r['tbt_p50'] * 1e3:.0f} / {r['tbt_p99'] * 1e3:.0f}",
                      f"{r['throughput_tok_s']:.0f}",
                      f"headroom {r['headroom']:g}, floor {r['floor']:g}",
                      "" if r["max_rate_at_slo"] is None else
                      f"{r['max_rate_at_slo']:.2f} @ {r['fixed_gpus']}")
    first = next(iter(runs.values()))
    table.caption = (f"fluid lower bound: {first['lower_bound_gpu_hours']:.2f} GPU-h, "
                     f"{first['lower_bound_energy_kwh']:.2f} kWh; (!) = attainment target "
                     "not reached at any searched setting")
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()



def _phases(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated phases."""
    phases = tuple(text.split(","))
    if not phases or set(phases) - {"prefill", "decode"}:
        raise argparse.ArgumentTypeError(f"phases are 'prefill' and/or 'decode', got {text!r}")
    return phases




def _model_args(parser: argparse.ArgumentParser, names: Sequence[str], default_layers: int,
                example_shape: bool = True) -> None:
    """Options that pick and size a zoo model (and the example input's shape)."""
    parser.add_argument("--model", choices=names, default="llama")
    parser.add_argument("--layers", type=layers, default=default_layers)
    parser.add_argument("--hidden", type=hidden, default=64,
                        help="hidden size, a multiple of 16 (default 64)")
    if example_shape:
        parser.add_argument("--batch", type=positive, default=2)
        parser.add_argument("--length", type=positive, default=16)



def _demo(args: argparse.Namespace) -> int:
    """Compile a zoo model with fxscale, print the group table, compare with eager."""
    import torch
    from rich.console import Console

    from . import zoo
    from .backend import Backend

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

    from .serving_demo import DemoConfig, replicas_table, serve_trace, summary_table

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


def _explain(args: argparse.Namespace) -> int:
    """Analyse a zoo model and print (or write) its GroupGraph."""
    from rich.console import Console

    from . import explain, zoo
    from .presets import preset_graph

    status = Console(stderr=True).status(f"capturing and grouping "
                                         f"{args.preset or args.model}...")
    with status:
        if args.preset:
            graph = preset_graph(args.preset)
        else:
            entry = zoo.build(args.model, batch=args.batch, length=args.length,
                              layers=args.layers, hidden=args.hidden,
                              device="meta" if args.meta else "cpu")
            graph = explain(entry.model, *entry.args, granularity=args.granularity,
                            **entry.kwargs)
    if args.json == "-":
        json.dump(graph.to_dict(), sys.stdout, indent=1)
        return 0
    print(graph.table())
    if args.json:
        graph.to_json(args.json)
    return 0


def _profile(args: argparse.Namespace) -> int:
    """Measure, fit, compare with the analytic CPU model; print and write the results."""
    import torch

    from . import zoo
    from .analytic import analytic_profile, compare
    from .profiling import Grid, profile
    from .runtime.devices import load_device
    from .runtime.fit import fit_profile

    if args.report:
        return _report(args)
    grid = Grid(batches=args.batches, lengths=args.lengths, phases=args.phases)
    entry = zoo.build(args.model, layers=args.layers, hidden=args.hidden)
    torch._dynamo.reset()
    measured = fit_profile(profile(entry.model, grid, granularity=args.granularity,
                                   lowering=args.lowering, repeats=args.repeats))
    predicted = analytic_profile(entry.model, grid, load_device("cpu"), args.granularity)
    title = (f"Model `{args.model}` ({args.layers} layers, hidden {args.hidden}), "
             f"{measured.device}, {measured.threads} threads, lowering {args.lowering}; grid "
             f"batches {list(grid.batches)} x lengths {list(grid.lengths)} x {list(grid.phases)}.")
    text = profile_tables(measured, compare(measured, predicted, args.min_ms / 1e3), title,
                          args.min_ms, "Analytic CPU model (calibrated roofline)")
    print(text)
    if args.json:
        measured.to_json(args.json)
    if args.markdown:
        from pathlib import Path

        from .jsonio import write_atomic

        write_atomic(Path(args.markdown), text + "\n")
    return 0


def profile_tables(measured, rows: list[dict], title: str, min_ms: float, analytic: str) -> str:
    """Markdown tables: fit error per group and phase; an analytic model vs measurement."""
    import statistics

    fit_model = next((g.fit["model"] for g in measured.groups if g.fit), "")
    lines = [title, "", f"Fitted model (`{fit_model}`), leave-one-out median absolute "
             "percentage error:", "",
             "| group | phase | median latency (ms) | held-out MAPE |", "|---|---|---|---|"]
    fit_errors = []
    for group in measured.groups:
        for phase, fit in (group.fit or {}).get("phases", {}).items():
            mape = fit["heldout_mape"]
            lines.append(f"| {group.name} | {phase} | {fit['median_latency_s'] * 1e3:.3f} | "
                         f"{'–' if mape is None else f'{mape:.1%}'} |")
            if mape is not None and fit["median_latency_s"] >= min_ms / 1e3:
                fit_errors.append(mape)
    if fit_errors:
        lines += ["", f"Median over group-phases with median latency >= {min_ms:g} ms: "
                  f"**{statistics.median(fit_errors):.1%}** ({len(fit_errors)} group-phases)."]
    lines += ["", f"{analytic} vs measurement, points >= {min_ms:g} ms:", "",
              "| group | phase | points | MAPE |", "|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['phase']} | {r['points']} | {r['mape']:.1%} |" for r in rows]
    if rows:
        lines += ["", f"Median over rows: **{statistics.median(r['mape'] for r in rows):.1%}**."]
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    """Write the characterization report, with progress on stderr."""
    from rich.console import Console

    from .characterize import characterize

    console = Console(stderr=True)
    with console.status("characterizing...") as status:
        path = characterize(args.report, args.report_models, repeats=args.repeats,
                            progress=lambda message: status.update(message))
    print(f"wrote {path} and its plots")
    return 0
