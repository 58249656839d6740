"""The `fxscale bench` command: run the benchmark matrix with a progress bar, write results,
and optionally regenerate a README's results section between two markers."""
from __future__ import annotations

import argparse
from pathlib import Path

MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale bench` on the command line's subparsers."""
    bench = sub.add_parser("bench", help="run the benchmark matrix (compile path vs eager and "
                                         "Inductor, group profiles, simulator and runtime policy "
                                         "comparisons) and write JSON, Markdown and plots")
    bench.add_argument("-o", "--output", default="bench-results", metavar="DIR",
                       help="directory for results.json, results.md and the plots "
                            "(default: bench-results)")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes and short traces: a few minutes on a 2-core CPU")
    from fxscale.studies.bench import FAMILIES  # light: the families import their work lazily

    bench.add_argument("--family", action="append", metavar="NAME", choices=tuple(FAMILIES),
                       help=f"run only this family (repeatable; default: all): "
                            f"{', '.join(FAMILIES)}")
    bench.add_argument("--readme", metavar="PATH",
                       help=f"also rewrite the part of PATH between {MARKERS[0]} and "
                            f"{MARKERS[1]} with the result tables")
    bench.set_defaults(run=_bench_command)


def _bench_command(args: argparse.Namespace) -> int:
    """Run the matrix with a rich progress bar on stderr; write the files and the README."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from fxscale.contracts.jsonio import output_folder, write_atomic
    from fxscale.studies import bench
    from fxscale.studies.bench_report import tables

    output_folder(args.output, bench.bench_file, "benchmark results")  # fail before the run

    readme = Path(args.readme) if args.readme else None
    if readme and args.family:
        raise ValueError("--readme rewrites every results table: run the whole matrix "
                         "(without --family)")
    if readme:
        splice(readme.read_text(), "", readme)  # a missing marker fails now, not after the run
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("benchmarks", total=None)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total)

        results = bench.run_bench(args.output, quick=args.quick, progress=progress,
                                  families=tuple(args.family) if args.family else None)
    print(f"wrote {Path(args.output) / 'results.json'}, results.md and "
          f"{len(results['plots'])} plots in {results['wall_s']:.0f} s")
    if readme:
        write_atomic(readme, splice(readme.read_text(), tables(results, level=3), readme))
        print(f"rewrote the results section of {readme}")
    return 0


def splice(text: str, block: str, where: Path | str) -> str:
    """`text` with what lies between the bench markers replaced by `block`."""
    start, end = (text.count(marker) for marker in MARKERS)
    if start != 1 or end != 1 or text.index(MARKERS[0]) > text.index(MARKERS[1]):
        raise ValueError(f"{where}: expected one line {MARKERS[0]} and, after it, one line "
                         f"{MARKERS[1]} (found {start} and {end}); add them where the "
                         "benchmark tables belong (docs/benchmarks.md)")
    head, rest = text.split(MARKERS[0])
    tail = rest.split(MARKERS[1])[1]
    return f"{head}{MARKERS[0]}\n{block}{MARKERS[1]}{tail}"
