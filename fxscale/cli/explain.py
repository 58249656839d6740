"""`fxscale explain`: analyse a zoo model or a preset and print (or write) its GroupGraph."""
from __future__ import annotations

import argparse
import json
import sys

from fxscale.cli.args import json_target, model_args
from fxscale.compiler.options import GRANULARITIES


def add_explain_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale explain` on the command line's subparsers."""
    from fxscale.models.presets import PRESETS
    from fxscale.models.zoo import NAMES

    explain = sub.add_parser("explain", help="analyse a zoo model (optionally on the meta device, "
                                             "no weights) and print its operator groups")
    model_args(explain, NAMES, default_layers=2)
    explain.add_argument("--granularity", choices=GRANULARITIES, default="operator")
    explain.add_argument("--meta", action="store_true", help="build the model on the meta device")
    explain.add_argument("--json", metavar="PATH", type=json_target,
                         help="write the GroupGraph as JSON ('-': stdout)")
    explain.add_argument("--preset", choices=sorted(PRESETS),
                         help="instead of a zoo model: a published model config, analysed on the "
                              "meta device (all its layers) and cached")
    explain.set_defaults(run=_explain)


def _explain(args: argparse.Namespace) -> int:
    """Analyse a zoo model and print (or write) its GroupGraph."""
    from rich.console import Console

    from fxscale import explain
    from fxscale.models import zoo
    from fxscale.models.presets import preset_graph

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
