"""Profile + characterize on a GPU in one call (the same code path as on CPU).

    python examples/profile_gpu.py OUT_DIR

1. A measured operator-group profile of a 2-layer Llama (hidden 1024) over prefill and decode
   on the first CUDA device (the CPU when there is none), with fitted latency models, into
   OUT_DIR/profile-llama.json, and into OUT_DIR/profile-llama.md the fit error table and the
   error of the H100 (on CUDA) or calibrated CPU analytic model against the measurement.
2. The characterization report (Llama, Mixtral, Whisper) into OUT_DIR/characterization. Its
   "measured" columns come from small models timed on the CPU; its device-model columns are
   the H100 model. Compare them with step 1 when the GPU is an H100.
Copy the results into docs/ with the device name.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import fxscale
from fxscale.cli.profile import profile_tables
from fxscale.contracts.jsonio import write_atomic
from fxscale.models import zoo
from fxscale.profiling.analytic import analytic_profile, compare
from fxscale.profiling.cpu_calibration import device_model
from fxscale.runtime.devices.fit import fit_profile
from fxscale.studies.characterize import characterize


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    entry = zoo.build("llama", layers=2, hidden=1024, device=device)
    grid = fxscale.Grid(batches=(1, 4, 16, 64), lengths=(128, 256, 448))
    measured = fit_profile(fxscale.profile(entry.model, grid))
    measured.to_json(out / "profile-llama.json")
    model = device_model("h100" if device == "cuda" else "cpu")
    rows = compare(measured, analytic_profile(entry.model, grid, model))
    title = f"Llama, 2 layers, hidden 1024, on {measured.device}"
    write_atomic(out / "profile-llama.md", profile_tables(
        measured, rows, title, 1.0, f"Analytic {model.description} model") + "\n")
    print(characterize(out / "characterization", progress=print))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-profile")
