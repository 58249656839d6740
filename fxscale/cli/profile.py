"""`fxscale profile`: measure every operator group over a grid, fit a latency model and
compare it with the analytic CPU model; or write the characterization report."""
from __future__ import annotations

import argparse

from fxscale.cli.args import file_target, int_list, model_args, positive, positive_float
from fxscale.compiler.options import GRANULARITIES, LOWERINGS


def add_profile_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale profile` on the command line's subparsers."""
    from fxscale.models.zoo import NAMES

    prof = sub.add_parser("profile", help="measure every operator group over a (phase, batch, "
                                          "length) grid, fit a latency model, compare with the "
                                          "analytic CPU model")
    model_args(prof, [n for n in NAMES if n in ("llama", "mistral", "gpt2", "opt")],
                default_layers=2, example_shape=False)
    prof.add_argument("--batches", type=int_list, default=(1, 2, 4))
    prof.add_argument("--lengths", type=int_list, default=(16, 64, 256))
    prof.add_argument("--phases", type=phases, default=("prefill", "decode"))
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


def phases(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated phases."""
    phases = tuple(text.split(","))
    if not phases or set(phases) - {"prefill", "decode"}:
        raise argparse.ArgumentTypeError(f"phases are 'prefill' and/or 'decode', got {text!r}")
    return phases


def _profile(args: argparse.Namespace) -> int:
    """Measure, fit, compare with the analytic CPU model; print and write the results."""
    import torch

    from fxscale.models import zoo
    from fxscale.profiling.analytic import analytic_profile, compare
    from fxscale.profiling.cpu_calibration import device_model
    from fxscale.profiling.measure import Grid, profile
    from fxscale.runtime.devices.fit import fit_profile

    if args.report:
        return _report(args)
    grid = Grid(batches=args.batches, lengths=args.lengths, phases=args.phases)
    entry = zoo.build(args.model, layers=args.layers, hidden=args.hidden)
    torch._dynamo.reset()
    measured = fit_profile(profile(entry.model, grid, granularity=args.granularity,
                                   lowering=args.lowering, repeats=args.repeats))
    predicted = analytic_profile(entry.model, grid, device_model("cpu"), args.granularity)
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

        from fxscale.contracts.jsonio import write_atomic

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

    from fxscale.studies.characterize import characterize

    console = Console(stderr=True)
    with console.status("characterizing...") as status:
        path = characterize(args.report, args.report_models, repeats=args.repeats,
                            progress=lambda message: status.update(message))
    print(f"wrote {path} and its plots")
    return 0
