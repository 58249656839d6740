"""`fxscale serve` under load, against the same engine called in process.

One model directory (a Llama from a config with random weights, saved with save_pretrained,
and the built-in tokenizer), one request schedule per rate: the Azure conversation trace's
prompt and output lengths (scaled as `fxscale demo` scales them), its arrival pattern
stretched to the rate. Each rate is served two ways, in interleaved rounds:
- `http`: `fxscale serve DIR` in its own process, driven by an asyncio load generator that
  speaks the OpenAI API (streaming /v1/completions with token-id prompts, `ignore_eos`,
  `stream_options.include_usage`), the way vLLM's and SGLang's serving benchmarks drive them;
- `in_process`: `fxscale.serve` on the same weights and options in this process, the same
  prompts submitted with `server.generate` (serving/replay.py).
TTFT is measured from a request's scheduled arrival to its first token (the first streamed
chunk, or the engine's record), TBT as the mean gap between its first and last token; the
HTTP overhead is the difference (latencies) and the ratio (tokens/s) of the two paths in the
same round. The model never emits its special tokens (their output rows are zero), so every
generated token is one streamed chunk.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fxscale.contracts.plan import SLO
from fxscale.contracts.trace import Request

PATHS = ("http", "in_process")
READY_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class HttpBench:
    """The model, the trace scaling, the server options and the SLO of one comparison."""

    hidden: int = 512
    layers: int = 2
    trace: str = "azure-conv"
    seconds: float = 15.0          # of arrivals per run, at any rate
    prompt_divisor: float = 8.0
    output_divisor: float = 8.0
    max_prompt: int = 256
    max_new: int = 32
    kv_cache_tokens: int = 16384
    max_num_batched_tokens: int = 512
    budget: int = 2
    slo_ttft: float = 1.0
    slo_tbt: float = 0.2
    seed: int = 0

    def schedule(self, rate: float) -> list[Request]:
        """The trace's first requests, arriving at `rate` per second on average for
        `seconds` (the trace's own gaps, stretched or squeezed)."""
        from fxscale.serving.replay import scaled_slice

        count = max(2, round(rate * self.seconds))
        trace = scaled_slice(self.trace, duration_s=3600.0, prompt_divisor=self.prompt_divisor,
                             output_divisor=self.output_divisor, max_prompt=self.max_prompt,
                             max_new=self.max_new)[:count]
        if len(trace) < count:
            raise ValueError(f"{self.trace} has {len(trace)} requests in its first hour; "
                             f"{rate:g}/s for {self.seconds:g} s needs {count}")
        first, span = trace[0].arrival_s, trace[-1].arrival_s - trace[0].arrival_s
        stretch = (count - 1) / rate / span if span > 0 else 0.0
        return [Request((r.arrival_s - first) * stretch, r.prompt_tokens, r.output_tokens)
                for r in trace]

    def write_model(self, path: Path) -> Path:
        """Save the Llama and the built-in tokenizer to `path`, a model directory."""
        import torch

        from fxscale.serving.tokenizer import SPECIALS, builtin_tokenizer
        from fxscale.studies.engine_bench import bench_llama

        tokenizer = builtin_tokenizer()
        model = bench_llama(self.hidden, self.layers, len(tokenizer),
                            self.max_prompt + self.max_new + 16, self.seed,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        with torch.no_grad():  # special tokens decode to no text: never emit one
            model.lm_head.weight[:len(SPECIALS)] = 0.0
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    def server_options(self) -> dict[str, Any]:
        """The engine's options, the same on both paths."""
        return {"budget": self.budget, "kv_cache_tokens": self.kv_cache_tokens,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_pending": 4096}


def start_serve(model: Path | str, *args: str,
                timeout_s: float = READY_TIMEOUT_S) -> tuple[subprocess.Popen, str]:
    """`fxscale serve MODEL` on a free port of 127.0.0.1 in its own process; the process and
    its base URL once /ready answers (a clear error with its log if it never does). Its
    stderr goes to a temporary file (`server_log`), so a chatty server never blocks."""
    import httpx

    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "fxscale", "serve", str(model), "--port", "0",
                             "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log  # read by server_log, closed by stop_serve
    line = proc.stdout.readline()
    failure = None if "http://" in line else f"fxscale serve did not start: {line}"
    base = "" if failure else line.split(" on ")[1].split("/v1")[0]
    deadline = time.monotonic() + timeout_s
    while failure is None:
        if proc.poll() is not None:
            failure = f"fxscale serve exited with {proc.returncode}: "
        elif time.monotonic() > deadline:
            failure = f"fxscale serve was not ready in {timeout_s:g} s: "
        else:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    message = failure + server_log(proc)
    proc.kill()
    stop_serve(proc)
    raise RuntimeError(message)


def server_log(proc: subprocess.Popen) -> str:
    """What a server started by start_serve has written to stderr so far."""
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def stop_serve(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM, then a kill if it has not exited within `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, getattr(proc, "log", None)):
        if stream:
            stream.close()


async def _stream_one(client: Any, model: str, request: Request, ids: list[int],
                      start: float) -> dict[str, Any]:
    """One streamed completion at its arrival time (after `start`); its outcome and
    timings, as serving/replay.py measures them in process."""
    arrival = start + request.arrival_s
    await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
    row: dict[str, Any] = {"arrival_s": request.arrival_s,
                           "prompt_tokens": request.prompt_tokens,
                           "new_tokens": request.output_tokens}
    body = {"model": model, "prompt": ids, "max_tokens": request.output_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome = "rejected" if response.status_code in (429, 503) else "failed"
                return {**row, "outcome": outcome, "error": f"{response.status_code}: {text}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now, event = time.perf_counter(), json.loads(line[6:])
                if "error" in event:
                    return {**row, "outcome": "failed", "error": event["error"]["message"]}
                if any(choice.get("text") for choice in event["choices"]):
                    first = first if first is not None else now
                    last = now
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as err:  # noqa: BLE001 - a lost request is counted, not fatal
        return {**row, "outcome": "failed", "error": f"{type(err).__name__}: {err}"}
    if first is None:
        return {**row, "outcome": "failed", "error": "no token was streamed"}
    row.update(outcome="ok", tokens=tokens, ttft_s=first - arrival, e2e_s=last - arrival,
               finished_s=last - start)
    if tokens > 1:
        row["tbt_s"] = (last - first) / (tokens - 1)
    return row


async def _drive(base: str, key: str, model: str, requests: list[Request],
                 prompts: list[list[int]]) -> tuple[list[dict], float]:
    """Every request on its schedule over HTTP, concurrently; the rows and the wall time."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(600.0),
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        start = time.perf_counter()
        rows = await asyncio.gather(*(_stream_one(client, model, r, ids, start)
                                      for r, ids in zip(requests, prompts)))
        return list(rows), time.perf_counter() - start


def http_load(base: str, key: str, model: str, requests: list[Request],
              prompts: list[list[int]], slo: SLO) -> dict[str, Any]:
    """Serve the schedule through the OpenAI API: the same summary as an in-process replay."""
    from fxscale.serving.replay import summarize

    rows, seconds = asyncio.run(_drive(base, key, model, requests, prompts))
    return {"summary": summarize(rows, slo, seconds), "requests": rows}


def compare_paths(bench: HttpBench, rates: tuple[float, ...], rounds: int = 3,
                  policies: tuple[str, ...] = ("operator", "model"),
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per (policy, rate): each path's summary figures (medians over rounds) and the
    HTTP overhead (_row); `progress` is called before each (policy, rate)."""
    import fxscale
    from fxscale.models.loading import load_model
    from fxscale.serving.replay import replay, trace_prompts

    slo, key, out = SLO(bench.slo_ttft, bench.slo_tbt), secrets.token_urlsafe(16), []
    cli = [f"--{name.replace('_', '-')}={value}" for name, value in
           bench.server_options().items()] + ["--api-key", key]
    with tempfile.TemporaryDirectory(prefix="fxscale-http-bench-") as folder:
        model_dir = bench.write_model(Path(folder))
        served = load_model(str(model_dir))
        vocab = served.model.config.vocab_size
        for policy in policies:
            with contextlib.ExitStack() as stack:  # whatever started stops, whatever fails
                proc, base = start_serve(model_dir, "--policy", policy, *cli)
                stack.callback(stop_serve, proc)
                server = stack.enter_context(fxscale.serve(served.model, policy=policy,
                                                           **bench.server_options()))

                def run(path: str, requests: list[Request], prompts: list[list[int]]) -> dict:
                    if path == "http":
                        return http_load(base, key, served.name, requests, prompts, slo)
                    return replay(server, requests, slo, seed=bench.seed)  # the same prompts

                warm = bench.schedule(rates[0])[:8]  # shapes, threads, connections: untimed
                for path in PATHS:
                    run(path, warm, trace_prompts(warm, vocab, bench.seed))
                for rate in rates:
                    if progress:
                        progress(f"{policy}-level, {rate:g} requests/s: http and in process, "
                                 f"{rounds} interleaved rounds")
                    requests = bench.schedule(rate)
                    prompts = trace_prompts(requests, vocab, bench.seed)
                    runs: dict[str, list[dict]] = {path: [] for path in PATHS}
                    for i in range(rounds):
                        for path in PATHS if i % 2 == 0 else PATHS[::-1]:  # drift hits both
                            runs[path].append(run(path, requests, prompts)["summary"])
                    out.append(_row(policy, rate, runs))
    return out


FIGURES = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "tokens_per_s",
           "slo_attainment")


def _row(policy: str, rate: float, runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Both paths side by side: each figure's median over rounds, and http's overhead
    against in_process in the same round (median, min, max)."""
    row: dict[str, Any] = {"policy": policy, "rate_rps": rate,
                           "requests": runs["http"][0]["requests"]}
    for path, summaries in runs.items():
        row[f"{path}_completed"] = min(s["completed"] for s in summaries)
        for figure in FIGURES:
            values = [s[figure] for s in summaries if s[figure] is not None]
            row[f"{path}_{figure}"] = statistics.median(values) if values else None
    pairs = list(zip(runs["http"], runs["in_process"]))
    for name, unit, figure, combine in (
            ("ttft_p50_overhead", "_s", "ttft_p50_s", float.__sub__),
            ("tbt_p50_overhead", "_s", "tbt_p50_s", float.__sub__),
            ("tokens_per_s_ratio", "", "tokens_per_s", float.__truediv__)):
        values = [combine(float(h[figure]), float(p[figure])) for h, p in pairs
                  if h[figure] is not None and p[figure]]
        for stat, pick in (("", statistics.median), ("_min", min), ("_max", max)):
            row[f"{name}{stat}{unit}"] = pick(values) if values else None
    return row
