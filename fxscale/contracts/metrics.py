"""The one percentile and token-timing definition the simulator, the pools and the server
report with."""
from __future__ import annotations

import math


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank q-quantile (None when there are no values: JSON null, not NaN)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def percentiles(rows: list[dict], keys: tuple[str, ...],
                levels: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """`<name>_p<level>_s` of each `<name>_s` key over the rows that have it (None if none)."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        for level in levels:
            out[f"{key[:-2]}_p{level}_s"] = quantile(values, level / 100)
    return out


def token_timings(arrival: float, token_times: list[float]) -> dict[str, float]:
    """A request's TTFT and, past one token, its TBT: the mean gap between its tokens."""
    timings = {"ttft_s": token_times[0] - arrival}
    if len(token_times) > 1:
        timings["tbt_s"] = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
    return timings
