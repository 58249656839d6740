"""Sample a request trace from ServeGen's per-client distributions (Alibaba Model Studio,
Qwen-VL image workload; Xiang et al., arXiv:2505.09999; Apache-2.0).

ServeGen publishes distributions, not a request log. For each client and 600 s window,
`chunk-i-trace.csv` gives the rate, the coefficient of variation and a fitted inter-arrival
distribution (`Gamma` or `Weibull` with shape and scale, or `Exponential`); `chunk-i-dataset.json`
gives, per 6-hour period, PMFs of text, image, audio and video tokens and of output tokens.
We draw inter-arrival gaps from the fitted distribution's shape, rescaled so the window's mean
rate equals its `rate_rps`, and request sizes from the PMFs of the period the window falls in
(prompt tokens = text + image + audio + video tokens). Pure Python.
"""
from __future__ import annotations

import ast
import csv
import io
import itertools
import json
import math
import random
from importlib import resources

from fxscale.contracts.trace import Request, Trace, TraceError

FOLDER = "servegen_mm_image"
WINDOW_S = 600
DAY_S = 86400
SOURCE = ("ServeGen multimodal image workload, sampled (Xiang et al., ServeGen, "
          "arXiv:2505.09999; Apache-2.0)")
PROMPT_PARTS = ("text_tokens", "image_tokens", "audio_tokens", "video_tokens")


def _files():
    return resources.files("fxscale.runtime.traces").joinpath("trace_data", FOLDER)


def clients() -> list[int]:
    """The client ids with both a trace and a dataset file."""
    names = {p.name for p in _files().iterdir()}
    return sorted(int(n.split("-")[1]) for n in names if n.endswith("-trace.csv")
                  and n.replace("-trace.csv", "-dataset.json") in names)


def _pmf(text: str, where: str) -> tuple[list[int], list[float]]:
    """A PMF stored as the text of a dict {value: probability}: (values, cumulative weights);
    empty lists for an empty PMF."""
    try:
        table = ast.literal_eval(text) if text else {}
        if not isinstance(table, dict):
            raise ValueError
        items = sorted((int(v), float(p)) for v, p in table.items())
    except (ValueError, SyntaxError, TypeError):
        raise TraceError(f"{where}: not a PMF: {text[:60]!r}") from None
    if any(p < 0 or not math.isfinite(p) for _, p in items) or (items and
                                                                  sum(p for _, p in items) <= 0):
        raise TraceError(f"{where}: PMF weights must be >= 0 and sum above 0: {text[:60]!r}")
    return [v for v, _ in items], list(itertools.accumulate(p for _, p in items))


def _gap_sampler(dist: str, shape: float, scale: float, rate: float, rng: random.Random,
                 where: str):
    """A function drawing inter-arrival gaps with the fitted shape and the window's mean rate."""
    if not all(math.isfinite(x) and x > 0 for x in (shape, scale, rate)):
        raise TraceError(f"{where}: rate, shape and scale must be finite and positive, got "
                         f"{rate}, {shape}, {scale}")
    if dist == "Gamma":
        mean = shape * scale
        draw = lambda: rng.gammavariate(shape, scale)  # noqa: E731
    elif dist == "Weibull":
        mean = scale * math.gamma(1 + 1 / shape)
        draw = lambda: rng.weibullvariate(scale, shape)  # noqa: E731
    elif dist == "Exponential":
        mean = 1.0
        draw = lambda: rng.expovariate(1.0)  # noqa: E731
    else:
        raise TraceError(f"{where}: unknown inter-arrival distribution {dist!r}")
    stretch = (1.0 / rate) / mean
    return lambda: draw() * stretch


def servegen_trace(start_s: float = 0.0, duration_s: float = 3600.0, seed: int = 0,
                   client_ids: list[int] | None = None) -> Trace:
    """Requests of the chosen clients (all by default) arriving in [start, start + duration)."""
    if not 0 <= start_s < DAY_S or duration_s <= 0:
        raise TraceError(f"{FOLDER}: start must be in [0, {DAY_S}) s (the data covers one "
                         f"day) and duration > 0, got start={start_s}, duration={duration_s}")
    requests: list[Request] = []
    for client in client_ids if client_ids is not None else clients():
        # one generator per client: a client's requests do not depend on which others are drawn
        rng = random.Random(f"{seed}:{client}")
        requests.extend(_client_requests(client, start_s, start_s + duration_s, rng))
    requests.sort(key=lambda r: r.arrival_s)
    return Trace(f"servegen-mm-image[{start_s:g}s+{duration_s:g}s]", SOURCE, requests)


def _client_requests(client: int, start: float, end: float, rng: random.Random) -> list[Request]:
    """One client's sampled requests in [start, end), arrivals measured from start."""
    trace_name = f"chunk-{client}-trace.csv"
    dataset_name = f"chunk-{client}-dataset.json"
    try:
        dataset = json.loads(_files().joinpath(dataset_name).read_text())
        periods = sorted(int(k) for k in dataset)
    except (json.JSONDecodeError, ValueError, AttributeError):
        raise TraceError(f"{FOLDER}/{dataset_name}: expected a JSON object keyed by period "
                         "start seconds") from None
    if not periods:
        raise TraceError(f"{FOLDER}/{dataset_name}: no periods")
    sizes_of: dict[int, dict] = {}
    out = []
    reader = csv.reader(io.StringIO(_files().joinpath(trace_name).read_text()))
    for line, row in enumerate(reader, start=1):
        where = f"{FOLDER}/{trace_name}:{line}"
        if len(row) != 6:
            raise TraceError(f"{where}: expected 6 fields (window_start_s, rate_rps, cv, "
                             f"distribution, arg1, arg2), got {len(row)}")
        dist = row[3]
        if not dist:
            continue  # the client is idle in this window
        try:
            window, rate, shape, scale = (float(row[i]) for i in (0, 1, 4, 5))
        except ValueError:
            raise TraceError(f"{where}: window_start_s, rate_rps, arg1 and arg2 must be "
                             f"numbers, got {row}") from None
        if window + WINDOW_S <= start or window >= end:
            continue
        gap = _gap_sampler(dist, shape, scale, rate, rng, where)
        period = max([p for p in periods if p <= window] or periods[:1])
        if period not in sizes_of:
            sizes_of[period] = _sizes(dataset[str(period)], f"{FOLDER}/{dataset_name}")
        sizes = sizes_of[period]
        clock = window + gap()
        while clock < window + WINDOW_S:
            if start <= clock < end:
                prompt = sum(rng.choices(values, cum_weights=cum)[0]
                             for values, cum in (sizes[p] for p in PROMPT_PARTS) if values)
                values, cum = sizes["output_tokens"]
                output = rng.choices(values, cum_weights=cum)[0]
                out.append(Request(clock - start, max(prompt, 1), output))
            clock += gap()
    return out


def _sizes(period: dict, where: str) -> dict[str, tuple[list[int], list[float]]]:
    """The size PMFs of one period; output tokens and at least one prompt part must exist."""
    sizes = {name: _pmf(period.get(name, ""), f"{where} ({name})")
             for name in (*PROMPT_PARTS, "output_tokens")}
    if not sizes["output_tokens"][0] or not any(sizes[p][0] for p in PROMPT_PARTS):
        raise TraceError(f"{where}: a period needs an output_tokens PMF and a prompt PMF")
    return sizes
