"""`fxscale export-onnx`: export a zoo model's operator groups to ONNX (see docs/onnx.md)."""
from __future__ import annotations

import argparse

from fxscale.cli.args import hidden, layers, positive
from fxscale.compiler.options import GRANULARITIES


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """Register the export-onnx subcommand on the CLI's subparsers."""
    from fxscale.models.zoo import NAMES

    parser = sub.add_parser("export-onnx", help="export every operator group of a zoo model to "
                                                "ONNX, with a manifest and a combined model")
    parser.add_argument("out", metavar="OUT", help="directory to write (created if missing)")
    parser.add_argument("--model", choices=NAMES, default="llama")
    parser.add_argument("--layers", type=layers, default=2)
    parser.add_argument("--hidden", type=hidden, default=64)
    parser.add_argument("--batch", type=positive, default=2, help="example batch (stays dynamic)")
    parser.add_argument("--length", type=positive, default=16,
                        help="example length (stays dynamic)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="operator")
    parser.add_argument("--opset", type=positive, default=18)
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    """Export, print what was written; exit 1 when some group could not be exported."""
    from fxscale.export.write import export_onnx
    from fxscale.models import zoo

    entry = zoo.build(args.model, batch=args.batch, length=args.length, layers=args.layers,
                      hidden=args.hidden)
    result = export_onnx(entry.model, args.out, *entry.args, granularity=args.granularity,
                         opset=args.opset, **entry.kwargs)
    total = len(result.groups) + len(result.skipped)
    print(f"exported {len(result.groups)} of {total} groups to {result.directory} "
          f"(manifest {result.manifest.name})")
    print(f"combined model: {result.combined or 'none (not every group was exported)'}")
    for group, reason in result.skipped.items():
        print(f"skipped {group}: {reason}")
    return 1 if result.skipped else 0
