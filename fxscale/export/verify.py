"""Check an exported ONNX group against the eager run of the same group."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch


def onnx_feeds(entries: list[dict], args: list[Any]) -> dict[str, np.ndarray]:
    """The ONNX inputs of a group from its eager arguments (sizes as int64 scalars)."""
    return {e["name"]: (a.detach().contiguous().numpy() if isinstance(a, torch.Tensor)
                        else np.asarray(int(a), dtype=np.int64))
            for e, a in zip(entries, args) if e["kind"] == "input"}


def eager_mismatch(path: str, entries: list[dict], args: list[Any], outputs: list[Any],
                   tolerance: float) -> str | None:
    """How a saved ONNX group's outputs differ from its eager outputs on the same inputs
    (float error relative to max(1, max |eager|)), or None when they agree."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    results = session.run(None, onnx_feeds(entries, args))
    for k, (actual, expected) in enumerate(zip(results, outputs)):
        want = (expected.detach().numpy() if isinstance(expected, torch.Tensor)
                else np.asarray(expected))
        if actual.shape != want.shape:
            return f"output {k} has shape {list(actual.shape)}, eager {list(want.shape)}"
        if not np.issubdtype(want.dtype, np.floating):
            if not np.array_equal(actual, want):  # e.g. ties ordered differently by a sort
                return f"{want.dtype} output {k} has other values than eager"
        elif want.size:
            error = float(np.abs(actual - want).max() / max(1.0, float(np.abs(want).max())))
            if error > tolerance:
                return f"output {k} differs from eager by {error:.1e} (> {tolerance:g})"
    return None
