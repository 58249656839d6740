"""Profile + characterize on a GPU in one call (the same code path as on CPU).

    python examples/profile_gpu.py OUT_DIR

Runs, on the first CUDA device when one is present (else on the CPU):
1. the characterization report (Llama, Mixtral, Whisper) into OUT_DIR/characterization;
2. a measured operator-group profile of a 2-layer Llama (hidden 1024) over prefill and decode,
   with fitted latency models, into OUT_DIR/profile-llama.json, and the fit error table plus
   the error of the H100 analytic model against it into OUT_DIR/profile-llama.md.
Copy the results into docs/ with the device name.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fxscale import backend, zoo
from fxscale.analytic import analytic_profile, compare
from fxscale.characterize import characterize
from fxscale.profiling import Grid, profile
from fxscale.runtime.devices import load_device
from fxscale.runtime.fit import fit_profile


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(characterize(out / "characterization", progress=print))
    entry = zoo.build("llama", layers=2, hidden=1024, device=device)
    grid = Grid(batches=(1, 4, 16, 64), lengths=(128, 512, 2048))
    measured = profile(entry.model, grid)
    fit_profile(measured, {g.name for graph in backend.compiled_group_graphs
                           for g in graph.groups if g.stateful})
    measured.to_json(out / "profile-llama.json")
    model_name = "h100" if device == "cuda" else "cpu"
    rows = compare(measured, analytic_profile(entry.model, grid, load_device(model_name)))
    lines = ["| group | phase | fit MAPE | points | analytic MAPE |", "|---|---|---|---|---|"]
    errors = {(r["group"], r["phase"]): r for r in rows}
    for group in measured.groups:
        for phase, fit in group.fit["phases"].items():
            row = errors.get((group.name, phase))
            analytic = f"{row['mape']:.1%}" if row else "–"
            points = row["points"] if row else 0
            lines.append(f"| {group.name} | {phase} | {fit['heldout_mape'] or 0:.1%} | "
                         f"{points} | {analytic} |")
    (out / "profile-llama.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-profile")
