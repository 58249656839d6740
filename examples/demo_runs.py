"""`fxscale demo` run N times: each run's full output, and a Markdown table of every figure's
live median with its spread over the runs, and the live-vs-predicted error per figure.

    python examples/demo_runs.py [--runs 3] [--out docs/demo-runs]

Writes OUT/run-K.txt (what `fxscale demo` printed) and OUT/summary.md (from each run's
`--json`, kept in a temporary folder: every request's timings make it large).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fxscale.contracts.jsonio import write_atomic
from fxscale.studies.demo import FIGURES, format_figure


def main() -> None:
    """Run the demo, then write the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/demo-runs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(1, args.runs + 1):
            target = Path(folder) / f"run-{k}.json"
            done = subprocess.run([sys.executable, "-m", "fxscale", "demo", "--json",
                                   str(target)], capture_output=True, text=True, check=True)
            write_atomic(args.out / f"run-{k}.txt", done.stdout)
            runs.append(json.loads(target.read_text()))
            print(f"run {k}: {runs[-1]['verdict']}", flush=True)
    write_atomic(args.out / "summary.md", summary(runs))


def summary(runs: list[dict]) -> str:
    """Per policy and figure: live median [min, max], predicted median, and the median
    relative error of the prediction against each run's live figure."""
    lines = [f"{len(runs)} runs of `fxscale demo`; live: median [min, max] over the runs; "
             "predicted: median; error: median over the runs of |predicted - live| / live.",
             "", "| policy | figure | live | predicted | error |", "|---|---|---|---|---|"]
    for policy in runs[0]["policies"]:
        for key, label in FIGURES:
            live = [r["policies"][policy]["figures"]["live"][key] for r in runs]
            predicted = [r["policies"][policy]["figures"]["predicted"][key] for r in runs]
            errors = [abs(p - v) / abs(v) for p, v in zip(predicted, live)
                      if p is not None and v]
            median = statistics.median
            lines.append(
                f"| {policy} | {label} | {format_figure(key, median(live))} "
                f"[{format_figure(key, min(live))}, {format_figure(key, max(live))}] | "
                f"{format_figure(key, median(predicted))} | "
                f"{f'{median(errors):.0%}' if errors else '-'} |")
    lines += ["", "Verdicts:", ""] + [f"{k}. {r['verdict']}" for k, r in enumerate(runs, 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
