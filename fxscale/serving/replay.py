"""Serve a slice of a request trace on a live Server, on the clock.

The slice is scaled to a small model on this machine: arrivals are sped up `speedup` times,
prompt and output lengths are divided and clipped (a real trace's prompts of thousands of
tokens become tens). Each request is submitted at its scaled arrival time with random token
ids, generating exactly the trace's output length (the end-of-sequence token does not stop
it); its TTFT and mean time between tokens are measured from that moment, so waits for
admission count. A sampler records, every `sample_s`, the request rate, the replicas of every
group, the requests running and waiting, the KV blocks held, what each device holds, and the
SLO attainment of the requests finished in that window.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch

from fxscale.contracts.metrics import percentiles
from fxscale.contracts.plan import SLO
from fxscale.contracts.trace import Request
from fxscale.runtime.traces.loaders import load_trace
from fxscale.serving.server import OverloadError, Server

log = logging.getLogger("fxscale.replay")


def scaled_slice(trace: str = "azure-conv", start_s: float = 0.0, duration_s: float = 60.0,
                 speedup: float = 1.0, prompt_divisor: float = 32.0,
                 output_divisor: float = 16.0, max_prompt: int = 64,
                 max_new: int = 16) -> list[Request]:
    """The requests of `trace` in [start_s, start_s + duration_s), scaled (see above)."""
    if speedup <= 0 or prompt_divisor <= 0 or output_divisor <= 0:
        raise ValueError(f"speedup and divisors must be positive, got {speedup}, "
                         f"{prompt_divisor}, {output_divisor}")
    window = load_trace(trace, start_s=start_s, duration_s=duration_s)
    return [Request(r.arrival_s / speedup,
                          max(2, min(max_prompt, round(r.prompt_tokens / prompt_divisor))),
                          max(1, min(max_new, round(r.output_tokens / output_divisor))))
            for r in window.requests]


def replay(server: Server, requests: list[Request], slo: SLO, seed: int = 0,
           sample_s: float = 1.0, progress: Callable[[int, int], None] | None = None) -> dict:
    """Serve the requests on their schedule; per-request timings, a summary, a timeline and
    (`outputs`, not for JSON) each request's generated tokens (None when it failed)."""
    prompts = [torch.tensor([ids]) for ids in
               trace_prompts(requests, getattr(server.config, "vocab_size", 256), seed)]
    start = time.perf_counter()
    futures: list[Any] = [None] * len(requests)
    done = threading.Event()
    timeline: list[dict] = [{"t": 0.0, "rate": 0.0, "finished": 0, "attainment": None,
                             "replicas": _replicas(server), **server.occupancy()}]
    sampler = threading.Thread(target=_sample, daemon=True,
                               args=(server, requests, futures, slo, start, sample_s, done,
                                     timeline))
    sampler.start()
    try:
        for i, (request, ids) in enumerate(zip(requests, prompts)):
            delay = start + request.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                futures[i] = server.generate(ids, max_new_tokens=request.output_tokens,
                                             ignore_eos=True)  # the trace's output length
            except OverloadError as err:
                futures[i] = err
            if progress:
                progress(i + 1, len(requests))
        for future in futures:
            if not isinstance(future, Exception):
                future.exception()  # wait; a failed request is counted below, not raised
    finally:
        done.set()
        sampler.join()
    rows = [_timing(r, f, start) for r, f in zip(requests, futures)]
    outputs = [f.result() if not isinstance(f, Exception) and f.exception() is None else None
               for f in futures]
    return {"summary": summarize(rows, slo, time.perf_counter() - start),
            "requests": rows, "timeline": timeline, "outputs": outputs}


def trace_prompts(requests: list[Request], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompt ids, one prompt per request, of its length (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (r.prompt_tokens,), generator=g).tolist()
            for r in requests]


def _timing(request: Request, future: Any, start: float) -> dict:
    """A request's outcome and timings, measured from its scheduled arrival."""
    row: dict[str, Any] = {"arrival_s": request.arrival_s, "prompt_tokens": request.prompt_tokens,
                           "new_tokens": request.output_tokens}
    if isinstance(future, Exception):
        return {**row, "outcome": "rejected", "error": str(future)}
    if future.exception() is not None:
        return {**row, "outcome": "failed", "error": str(future.exception())}
    record, arrival = future.record, start + request.arrival_s
    row.update(outcome="ok", tokens=record["tokens"], ttft_s=record["first_token_at"] - arrival,
               e2e_s=record["finished_at"] - arrival, finished_s=record["finished_at"] - start,
               submit_delay_s=record["submitted_at"] - arrival)
    if "tbt_s" in record:
        row["tbt_s"] = record["tbt_s"]
    return row


def meets(row: dict, slo: SLO) -> bool:
    """Whether a request finished within the SLO (TTFT, and TBT when it has two tokens)."""
    return row.get("outcome") == "ok" and slo.met(row["ttft_s"], row.get("tbt_s", 0.0),
                                                  row["prompt_tokens"])


def summarize(rows: list[dict], slo: SLO, seconds: float) -> dict:
    """Counts, TTFT/TBT percentiles, SLO attainment and throughput of a replay."""
    ok = [r for r in rows if r["outcome"] == "ok"]
    summary: dict[str, Any] = {
        "requests": len(rows), "completed": len(ok),
        "rejected": sum(r["outcome"] == "rejected" for r in rows),
        "failed": sum(r["outcome"] == "failed" for r in rows),
        "slo_attainment": sum(meets(r, slo) for r in rows) / len(rows) if rows else None,
        "tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
        "requests_per_s": len(ok) / seconds, "seconds": seconds}
    return {**summary, **percentiles(ok, ("ttft_s", "tbt_s"))}


def _sample(server: Server, requests: list[Request], futures: list, slo: SLO,
            start: float, sample_s: float, done: threading.Event, timeline: list) -> None:
    """Every sample_s: request rate, replicas per group, attainment of the window's finishes."""
    seen = 0
    while not done.wait(sample_s):
        try:
            seen = _sample_once(server, requests, futures, slo, start, sample_s, timeline,
                                seen)
        except Exception:  # noqa: BLE001 - one missed sample must not end the timeline
            log.exception("replay: a timeline sample failed; sampling goes on")


def _sample_once(server: Server, requests: list[Request], futures: list, slo: SLO,
                 start: float, sample_s: float, timeline: list, seen: int) -> int:
    """Append one timeline row; the requests finished so far."""
    now = time.perf_counter() - start
    arrived = sum(1 for r in requests if now - sample_s <= r.arrival_s < now)
    finished = [_timing(r, f, start) for r, f in zip(requests, futures)
                if f is not None and not isinstance(f, Exception) and f.done()]
    window = [r for r in finished if r["outcome"] == "ok" and r["finished_s"] > now - sample_s]
    timeline.append({
        "t": now, "rate": arrived / sample_s, "finished": len(finished) - seen,
        "attainment": sum(meets(r, slo) for r in window) / len(window) if window else None,
        "replicas": _replicas(server), **server.occupancy()})
    return len(finished)


def _replicas(server: Server) -> dict[str, int]:
    """Live replicas of every group now."""
    return {name: pool.counters()["replicas"] for name, pool in sorted(server.pools.items())}
