"""The `fxscale report` command: the HTML report (or DOT / SVG) of a model's operator groups."""
from __future__ import annotations

import argparse
from pathlib import Path

from fxscale.cli.args import file_target, positive
from fxscale.reporting.report import FORMATS


def add_report_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale report` on the command line's subparsers."""
    rep = sub.add_parser("report", help="write one self-contained HTML page of a model's operator "
                                        "groups (with a plan, profile and run if given), or the "
                                        "grouped graph as Graphviz DOT / SVG")
    rep.add_argument("source", metavar="MODEL_OR_PRESET_OR_JSON",
                     help="a GroupGraph JSON file (fxscale explain --json), a preset (analysed "
                          "on the meta device, cached) or a zoo model (built on the meta device)")
    rep.add_argument("-o", "--output", required=True, metavar="PATH", type=file_target,
                     help="file to write")
    rep.add_argument("--plan", metavar="JSON", help="a Plan (runtime.planner) as JSON")
    # dest differs from "run": main() dispatches through args.run
    rep.add_argument("--run", dest="run_json", metavar="JSON",
                     help="a simulation or serving run with a 'timeline' (docs/report.md)")
    rep.add_argument("--profile", metavar="JSON", help="a Profile written by fxscale profile")
    rep.add_argument("--format", choices=FORMATS, default="html")
    rep.add_argument("--layers", type=positive, help="layers of a preset (default: all) or zoo model "
                                                "(default: 2)")
    rep.add_argument("--batch", type=positive, help="batch the costs are shown at (default: the "
                                               "capture's example)")
    rep.add_argument("--length", type=positive, help="length the costs are shown at")
    rep.set_defaults(run=_report_command)


def _report_command(args: argparse.Namespace) -> int:
    """Resolve the source into a GroupGraph and write the report."""
    from rich.console import Console

    from fxscale.reporting.report import report

    with Console(stderr=True).status(f"analysing {args.source}..."):
        graph = _graph(args.source, args.layers)
    out = report(graph, args.output, plan=args.plan, run=args.run_json, profile=args.profile,
                 format=args.format, batch=args.batch, length=args.length)
    print(f"wrote {out} ({len(graph.groups)} groups)")
    return 0


def _graph(source: str, layers: int | None):
    """The GroupGraph of a JSON file, a preset or a zoo model on the meta device."""
    from fxscale.contracts.group_graph import GroupGraph
    from fxscale.models.presets import PRESETS, preset_graph
    from fxscale.models.zoo import NAMES

    if Path(source).exists():
        return GroupGraph.from_json(Path(source))
    if source in PRESETS:
        return preset_graph(source, layers)
    if source in NAMES:
        from fxscale import explain
        from fxscale.models import zoo

        entry = zoo.build(source, layers=layers or 2, device="meta")
        return explain(entry.model, *entry.args, **entry.kwargs)
    raise ValueError(f"{source!r} is not a file, a preset ({', '.join(sorted(PRESETS))}) or a "
                     f"zoo model ({', '.join(NAMES)})")
