"""Request traces: arrival time, prompt tokens and output tokens per request.

Loads the traces shipped with the package by name (`azure-conv`, `azure-code`,
`mooncake-conversation`, `mooncake-synthetic`, and `servegen-mm-image`, sampled from
ServeGen's distributions; sources and licences in trace_data/README.md)
or a file in a supported format: Azure LLM inference CSV (`TIMESTAMP,ContextTokens,
GeneratedTokens`, 2023 and 2024 timestamp styles) or Mooncake JSONL (`timestamp` in ms,
`input_length`, `output_length`, optional `hash_ids`: the prompt's prefix-block hashes, 512
tokens per block, kept for prefix caching). A malformed file raises TraceError naming file, line and
field. Pure Python: the planner and simulator use it without torch.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from fxscale.contracts.jsonio import read_text
from fxscale.contracts.trace import Request, Trace, TraceError

SHIPPED = {
    "azure-conv": ("azure_conv.csv", "Azure LLM inference trace 2023, conversation "
                   "(Patel et al., Splitwise, ISCA 2024; CC-BY 4.0)"),
    "azure-code": ("azure_code.csv", "Azure LLM inference trace 2023, code "
                   "(Patel et al., Splitwise, ISCA 2024; CC-BY 4.0)"),
    "mooncake-conversation": ("mooncake_conversation.jsonl", "Mooncake FAST'25 conversation "
                              "trace (Kimi; Apache-2.0)"),
    "mooncake-synthetic": ("mooncake_synthetic.jsonl", "Mooncake FAST'25 synthetic trace "
                           "(Apache-2.0)"),
}
# Sampled from published distributions rather than read (runtime/servegen.py).
SERVEGEN = "servegen-mm-image"
MOONCAKE_BLOCK_TOKENS = 512  # tokens per `hash_ids` block (Mooncake's trace README)
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_FRACTION = re.compile(r"\.(\d+)")


# Bounds past which a trace is not a serving workload (and the simulator would be asked to
# count tokens or seconds it cannot): longer than any model's context, longer than a year.
MAX_TOKENS = 10_000_000
MAX_SPAN_S = 366 * 86400.0


def poisson_resample(base: Trace, rate: float, seconds: float, seed: int) -> Trace:
    """Poisson arrivals at `rate` for `seconds`, with (prompt, output) lengths drawn from
    `base`: a steady load with a real trace's length mix."""
    return renewal_resample(base, rate, seconds, seed)


def renewal_resample(base: Trace, rate: float, seconds: float, seed: int,
                     cv: float = 1.0) -> Trace:
    """Arrivals at mean `rate` for `seconds` whose gaps have coefficient of variation `cv`
    (gamma distributed; 1: Poisson, above 1: burstier), with (prompt, output) lengths drawn
    from `base`."""
    import random

    if not (rate > 0 and seconds > 0 and cv > 0):
        raise ValueError(f"resampling needs rate, seconds and cv > 0, got {rate}, {seconds}, "
                         f"{cv}")
    rng = random.Random(seed)
    shape = 1 / cv ** 2

    def gap() -> float:
        return rng.expovariate(rate) if cv == 1.0 else rng.gammavariate(shape, 1 / (rate * shape))

    t, requests = 0.0, []
    while (t := t + gap()) < seconds:
        r = rng.choice(base.requests)
        requests.append(replace(r, arrival_s=t))
    kind = "Poisson" if cv == 1.0 else f"gamma-renewal (gap CV {cv:g})"
    name = f"poisson-{rate:g}" if cv == 1.0 else f"renewal-{rate:g}-cv{cv:g}"
    return Trace(name, f"{kind} resampling of {base.name}", requests, base.prefix_block_tokens)


def load_trace(name_or_path: str | Path, start_s: float = 0.0, duration_s: float | None = None,
               rate_scale: float = 1.0, seed: int = 0) -> Trace:
    """A shipped trace by name, or a trace file, optionally windowed and rate-scaled
    (`seed` draws the sampled ServeGen trace)."""
    text_name = str(name_or_path)
    if text_name == SERVEGEN:
        from fxscale.runtime.traces.servegen import servegen_trace

        trace = servegen_trace(start_s, 3600.0 if duration_s is None else duration_s, seed)
        if not trace.requests:
            raise TraceError(f"{SERVEGEN}: no requests in [{start_s}, {start_s} + duration)")
        return _bounded(trace.scaled(rate_scale) if rate_scale != 1.0 else trace, SERVEGEN)
    if text_name in SHIPPED:
        filename, source = SHIPPED[text_name]
        where = f"{text_name} ({filename})"
        text = resources.files("fxscale.runtime.traces").joinpath("trace_data", filename).read_text()
        name = text_name
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no trace {text_name!r}: not a shipped name "
                                    f"({', '.join([*SHIPPED, SERVEGEN])}) and no such file")
        where, text, name, source = str(path), read_text(path, "a trace file"), path.stem, str(path)
        filename = path.name
    if filename.endswith(".csv"):
        requests = parse_azure_csv(text, where)
    elif filename.endswith((".jsonl", ".json")):
        requests = parse_mooncake_jsonl(text.splitlines(), where)
    else:
        raise TraceError(f"{where}: unknown trace format; expected an Azure LLM .csv or a "
                         "Mooncake .jsonl file")
    if not requests:
        raise TraceError(f"{where}: the trace has no requests")
    trace = Trace(name, source, requests,
                  MOONCAKE_BLOCK_TOKENS if any(r.prefix for r in requests) else 0)
    if start_s or duration_s is not None:
        trace = trace.window(start_s, duration_s)
        if not trace.requests:
            raise TraceError(f"{where}: no requests arrive in the window from {start_s:g} s "
                             f"for {duration_s or 'the rest'} s; the trace spans "
                             f"{requests[-1].arrival_s:g} s")
    return _bounded(trace.scaled(rate_scale) if rate_scale != 1.0 else trace, where)


def _bounded(trace: Trace, where: str) -> Trace:
    """The trace, or a TraceError when it spans more than MAX_SPAN_S."""
    if trace.duration_s() > MAX_SPAN_S:
        raise TraceError(f"{where}: the requests span {trace.duration_s() / 86400:.3g} days "
                         f"(at most {MAX_SPAN_S / 86400:g}); check the timestamps' unit, or "
                         "the rate scale")
    return trace


def _six_digit_fraction(stamp: str) -> str:
    """A timestamp with exactly six fractional digits (what datetime.fromisoformat accepts)."""
    return _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), stamp, count=1)


def _count(value: str | int, where: str, line: int, field: str, minimum: int) -> int:
    """A token count field as an int >= minimum, or a TraceError naming it."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise TraceError(f"{where}:{line}: field {field!r} is not an integer: {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{where}:{line}: field {field!r} is not an integer: {value!r}") from None
    if not minimum <= number <= MAX_TOKENS:
        raise TraceError(f"{where}:{line}: field {field!r} must be from {minimum} to "
                         f"{MAX_TOKENS} tokens, got {value!r}")
    return number


def parse_azure_csv(text: str, where: str) -> list[Request]:
    """Requests of an Azure LLM inference trace (CSV with a header line)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TraceError(f"{where}:1: missing column(s) {missing}; an Azure LLM trace has "
                         f"{list(AZURE_COLUMNS)}")
    rows = []
    for row in reader:
        line = reader.line_num
        stamp = row["TIMESTAMP"] or ""
        try:
            moment = datetime.fromisoformat(_six_digit_fraction(stamp.strip()))
        except ValueError:
            raise TraceError(f"{where}:{line}: field 'TIMESTAMP' is not a timestamp: "
                             f"{stamp!r}") from None
        if moment.tzinfo is None:  # 2023 files are naive, 2024 files carry +00:00: both UTC
            moment = moment.replace(tzinfo=timezone.utc)
        rows.append((moment, _count(row["ContextTokens"], where, line, "ContextTokens", 1),
                     _count(row["GeneratedTokens"], where, line, "GeneratedTokens", 0)))
    return _relative(rows, lambda first, moment: (moment - first).total_seconds())


def parse_mooncake_jsonl(lines: Iterable[str], where: str) -> list[Request]:
    """Requests of a Mooncake trace (one JSON object per line, timestamp in ms)."""
    rows = []
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise TraceError(f"{where}:{line}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise TraceError(f"{where}:{line}: expected a JSON object")
        for field in ("timestamp", "input_length", "output_length"):
            if field not in record:
                raise TraceError(f"{where}:{line}: missing field {field!r}")
        stamp = record["timestamp"]
        if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or \
                not math.isfinite(stamp) or stamp < 0:
            raise TraceError(f"{where}:{line}: field 'timestamp' must be milliseconds >= 0, "
                             f"got {stamp!r}")
        rows.append((stamp / 1e3, _count(record["input_length"], where, line, "input_length", 1),
                     _count(record["output_length"], where, line, "output_length", 0),
                     _hashes(record.get("hash_ids", []), where, line)))
    return _relative(rows, lambda first, moment: moment - first)


def _hashes(value: Any, where: str, line: int) -> tuple[int, ...]:
    """A Mooncake record's prefix-block hashes: a list of integers >= 0."""
    if not isinstance(value, list) or len(value) > MAX_TOKENS or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in value):
        raise TraceError(f"{where}:{line}: field 'hash_ids' must be a list of integers >= 0 "
                         "(one per prefix block)")
    return tuple(value)


def _relative(rows: list, offset) -> list[Request]:
    """Requests sorted by arrival, with arrivals measured from the first one."""
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    first = rows[0][0]
    return [Request(offset(first, moment), *rest) for moment, *rest in rows]
