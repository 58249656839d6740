"""The one percentile definition the simulator, the pools and the server report with."""
from __future__ import annotations

import math


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank q-quantile (None when there are no values: JSON null, not NaN)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
