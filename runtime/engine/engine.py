"""The engine loop: requests in, steps out, tokens back.

One thread per engine runs the loop: take new requests and cancellations, ask the scheduler
for a step, run it (the runner), sample greedily, deliver each new token to its request's
future and stream, and finish the requests that reached their length or an end-of-sequence
token. Requests are scheduler state, not threads: the engine has one thread however many
requests it serves. A step that fails is run once more; if it fails again, only the requests
in it get the error.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator

from fxscale.contracts.metrics import token_timings
from fxscale.contracts.step import Step
from fxscale.runtime.scheduling import Scheduler, SchedulerConfig

_DONE = object()  # ends a stream


class EngineClosedError(RuntimeError):
    """The engine no longer takes requests."""


class TokenFuture(Future):
    """A request's generated tokens; cancel() ends the request and frees its KV blocks."""

    def __init__(self, engine: Engine, request: int) -> None:
        super().__init__()
        self.engine, self.request = engine, request
        self.record: dict[str, float] = {}  # timings once finished

    def cancel(self) -> bool:
        """Cancel a request not yet finished (its blocks are freed before the next step)."""
        if not super().cancel():
            return False
        self.engine.cancel(self.request)
        return True


@dataclass
class EngineRequest:
    """The engine's record of one request."""

    id: int
    tokens: list[int]                  # prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    future: TokenFuture
    stream: queue.Queue | None
    submitted: float
    token_times: list[float] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        """The tokens generated so far."""
        return self.tokens[self.prompt_len:]


class Engine:
    """Continuous batching over one scheduler and one runner (see the module docstring)."""

    def __init__(self, runner: Any, config: SchedulerConfig, num_blocks: int,
                 max_len: int, eos: set[int] | frozenset[int] = frozenset(),
                 name: str = "fxscale-engine") -> None:
        self.runner, self.config, self.max_len = runner, config, max_len
        self.eos = frozenset(eos)
        self.scheduler = Scheduler(config, [num_blocks])
        self.lock = threading.Condition()
        self.inbox: list[EngineRequest] = []
        self.cancelled: set[int] = set()
        self.requests: dict[int, EngineRequest] = {}
        self.ids = itertools.count()
        self.closing = False
        self.counters = {"steps": 0, "tokens": 0, "samples": 0, "preemptions": 0,
                         "failed_steps": 0, "completed": 0}
        self.recent: deque[dict[str, int]] = deque(maxlen=1000)  # per step: tokens, requests
        self.finished: deque[dict[str, float]] = deque(maxlen=100_000)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    # ---- requests -----------------------------------------------------------------------------
    def add(self, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False,
            stream: bool = False) -> EngineRequest:
        """Queue a request; its future gives the generated tokens (a stream each token)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the "
                             f"model's {self.max_len} positions")
        slots = max(p.num_blocks for p in self.scheduler.pools.values()) * self.config.block_size
        if len(prompt) + max_new_tokens > slots:
            raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the "
                             f"KV cache of {slots} tokens (kv_cache_tokens)")
        with self.lock:
            if self.closing:
                raise EngineClosedError("the engine is closed")
            request = next(self.ids)
            record = EngineRequest(request, list(prompt), len(prompt), max_new_tokens,
                                   frozenset() if ignore_eos else self.eos,
                                   TokenFuture(self, request),
                                   queue.Queue() if stream else None, time.perf_counter())
            self.inbox.append(record)
            self.lock.notify()
        return record

    def cancel(self, request: int) -> None:
        """End a request before its next step (its future is cancelled by the caller)."""
        with self.lock:
            self.cancelled.add(request)
            self.lock.notify()

    def close(self, timeout_s: float | None = None) -> None:
        """Take no more requests, finish those in flight, stop the loop."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join(timeout_s)

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.inbox or self.cancelled or self.scheduler.has_work()
                           or self.closing):
                    self.lock.wait()
                arrived, self.inbox = self.inbox, []
                cancelled, self.cancelled = self.cancelled, set()
                if self.closing and not (arrived or self.scheduler.has_work()):
                    return
            for record in arrived:
                self.requests[record.id] = record
                self.scheduler.add(record.id, record.prompt_len, record.max_new_tokens)
            for request in cancelled:
                self._end(request, cancelled=True)
            step = self.scheduler.schedule()
            for request in step.preempted:
                self._forget(request)
            if step.chunks:
                self._run(step)
            elif not (arrived or cancelled):  # nothing runnable now: do not spin
                with self.lock:
                    self.lock.wait(0.01)

    def _run(self, step: Step) -> None:
        """Run a step (once more if it fails), sample, deliver, finish."""
        tokens = {c.request: self.requests[c.request].tokens for c in step.chunks}
        for attempt in (1, 2):
            try:
                logits = self.runner.run(step, tokens)
                break
            except Exception as err:  # noqa: BLE001 - a failed step must not stop the engine
                self.counters["failed_steps"] += 1
                if attempt == 2:
                    for chunk in step.chunks:
                        self._fail(chunk.request, err)
                    return
        self.scheduler.complete(step)
        sampled = logits.argmax(dim=-1).tolist() if len(logits) else []
        now = time.perf_counter()
        self._count(step)
        for chunk, token in zip((c for c in step.chunks if c.samples), sampled):
            record = self.requests.get(chunk.request)
            if record is None:
                continue
            record.tokens.append(token)
            record.token_times.append(now)
            if record.stream is not None:
                record.stream.put(token)
            if len(record.generated) >= record.max_new_tokens or token in record.stop_ids:
                self._end(chunk.request)

    def _count(self, step: Step) -> None:
        """Per-step statistics."""
        c = self.counters
        c["steps"] += 1
        c["tokens"] += step.num_tokens
        c["samples"] += step.num_samples
        c["preemptions"] = self.scheduler.preemptions
        self.recent.append({"tokens": step.num_tokens, "requests": len(step.chunks),
                            "decodes": step.num_decodes})

    def _end(self, request: int, cancelled: bool = False) -> None:
        """Finish (or drop a cancelled) request: free its blocks, resolve its future."""
        self.scheduler.finish(request)
        self._forget(request)
        record = self.requests.pop(request, None)
        if record is None:
            return
        if record.stream is not None:
            record.stream.put(_DONE)
        if cancelled or record.future.cancelled():
            return
        timings = token_timings(record.submitted, record.token_times)
        record.future.record.update(timings)
        self.finished.append(timings)
        self.counters["completed"] += 1
        record.future.set_result(record.generated)

    def _fail(self, request: int, err: BaseException) -> None:
        """End a request with an error."""
        self.scheduler.finish(request)
        self._forget(request)
        record = self.requests.pop(request, None)
        if record is None:
            return
        if record.stream is not None:
            record.stream.put(_DONE)
        if not record.future.cancelled():
            record.future.set_exception(err)

    def _forget(self, request: int) -> None:
        """Let the runner drop what it keeps for a request (a sequential runner's cache)."""
        forget = getattr(self.runner, "forget", None)
        if forget is not None:
            forget(request)

    # ---- reading ---------------------------------------------------------------------------------
    def stream(self, record: EngineRequest) -> Iterator[int]:
        """Yield a streaming request's tokens as they come; closing the iterator early
        cancels the request."""
        finished = False
        try:
            while True:
                token = record.stream.get()
                if token is _DONE:
                    finished = True
                    break
                yield token
            if record.future.done() and not record.future.cancelled():
                record.future.result()  # raise the request's error, if it failed
        finally:
            if not finished:
                record.future.cancel()

    def stats(self) -> dict[str, Any]:
        """Steps, tokens and requests per step, KV blocks, preemptions."""
        recent = list(self.recent)
        mean = (lambda key: sum(r[key] for r in recent) / len(recent)) if recent else \
            (lambda key: 0.0)
        return {**self.counters, "kv_blocks": self.scheduler.blocks(),
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "tokens_per_step": mean("tokens"), "requests_per_step": mean("requests"),
                "decodes_per_step": mean("decodes")}
