"""The one percentile, token-timing and histogram definition the simulator, the pools and the
server report with."""
from __future__ import annotations

import bisect
import math
from typing import Any

# Prometheus-style bounds (seconds): group calls take sub-milliseconds to a second, request
# latencies (time to first token, between tokens, end to end) milliseconds to minutes.
CALL_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                  0.5, 1.0)
REQUEST_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


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


class Histogram:
    """Counts of observations per bucket since it was made (what a Prometheus histogram
    exposes: it only grows, so a scraper's rates are right however often it scrapes)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def report(self) -> dict[str, Any]:
        """JSON: cumulative counts per upper bound ("+Inf" last), the sum and the count."""
        counts, running, buckets = list(self.counts), 0, {}
        for bound, count in zip((*(f"{b:g}" for b in self.bounds), "+Inf"), counts):
            running += count
            buckets[bound] = running
        return {"buckets": buckets, "sum": self.total, "count": running}


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One histogram report of several with the same bounds (the engines of a server)."""
    first = reports[0]
    return {"buckets": {b: sum(r["buckets"][b] for r in reports) for b in first["buckets"]},
            "sum": sum(r["sum"] for r in reports), "count": sum(r["count"] for r in reports)}
