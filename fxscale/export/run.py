"""Run an exported model group by group with onnxruntime, in manifest order, feeding each
group's outputs to the groups that read them: the reference reader of manifest.json.
Needs onnxruntime and numpy only (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from fxscale.contracts.jsonio import read_json


def run_groups(directory: str | Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs, by name, computed by the exported groups on `inputs` (by name)."""
    directory = Path(directory)
    manifest, where = read_json(directory / "manifest.json")
    missing = [i["name"] for i in manifest["inputs"] if i["name"] not in inputs]
    if missing:
        raise ValueError(f"run_groups: missing model input(s) {missing}; {where} lists "
                         f"{[i['name'] for i in manifest['inputs']]}")
    if manifest["skipped"]:
        raise ValueError(f"run_groups: {where} has groups that were not exported "
                         f"({[s['id'] for s in manifest['skipped']]}); run those with torch")
    produced: dict[tuple[str, int], np.ndarray] = {}

    def value(source: dict) -> np.ndarray:
        """The array a source names."""
        if "group" in source:
            return produced[(source["group"], source["output"])]
        if "input" in source:
            return np.asarray(inputs[source["input"]])
        size = source["size"]
        return np.asarray(np.shape(inputs[size["input"]])[size["dim"]], dtype=np.int64)

    for group in manifest["groups"]:
        session = ort.InferenceSession(str(directory / group["file"]),
                                       providers=["CPUExecutionProvider"])
        feeds = {e["name"]: value(e["from"]) for e in group["inputs"] if e["kind"] == "input"}
        for k, result in enumerate(session.run(None, feeds)):
            produced[(group["id"], k)] = result
    return {out["name"]: value(out["from"]) for out in manifest["outputs"]}
