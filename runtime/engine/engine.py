"""The engine loop: requests in, steps out, tokens back.

One thread per engine runs the loop: take new requests, cancellations and control actions,
ask the scheduler for a step, run it (the runner), choose each request's token (greedy, or
sampled with its own seeded random stream: runtime/engine/sampling.py), deliver it
to its request's future and stream, and finish the requests that reached their length or an
end-of-sequence token. Requests are scheduler state, not threads: the engine has one thread
however many requests it serves. A step that fails is run once more; if it fails again, only
the requests in it get the error (a GroupError that names the step's tokens it held fails
only the requests of those tokens; the others run in the next step).

A request asks for generated tokens (`generate`) or for the logits of its prompt
(`forward`: every row of its prompt, no token generated).
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from fxscale.contracts.metrics import REQUEST_BUCKETS_S, Histogram, token_timings
from fxscale.contracts.sampling import Sampling
from fxscale.contracts.step import Step
from fxscale.runtime.engine.sampling import generator_for, next_token
from fxscale.runtime.scheduling import Scheduler, SchedulerConfig
from fxscale.runtime.scheduling.parts import micro_batches

STREAM_END = object()  # the last item of a request's stream
FINISHED_WINDOW = 2048  # finished requests whose timings stats() reports


def requests_in(step: Step, held: tuple[int, int]) -> list[int]:
    """The requests whose tokens in the step overlap [held)."""
    out, start = [], 0
    for chunk in step.chunks:
        if start < held[1] and start + chunk.tokens > held[0]:
            out.append(chunk.request)
        start += chunk.tokens
    return out


class EngineClosedError(RuntimeError):
    """The engine no longer takes requests."""


class TokenFuture(Future):
    """A request's result; cancel() ends the request and frees its KV blocks."""

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
    stream: Any                        # a queue.Queue, or the caller's sink (put()), or None
    submitted: float
    logits: bool = False               # wants its prompt's logits, not tokens
    sampling: Sampling = Sampling()    # how its tokens are chosen (greedy by default)
    token_times: list[float] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # logits rows so far
    logprobs: list[dict] = field(default_factory=list)  # per token, when sampling asks
    generator: Any = None              # its own random stream (created at its first token)
    recoveries: int = 0                # times its KV blocks were lost and recomputed
    finish_reason: str | None = None   # stop (end-of-sequence or the caller), length, abort

    @property
    def generated(self) -> list[int]:
        """The tokens generated so far."""
        return self.tokens[self.prompt_len:]


class Engine:
    """Continuous batching over one scheduler and one runner (see the module docstring)."""

    def __init__(self, runner: Any, config: SchedulerConfig, num_blocks: int,
                 max_len: int, eos: set[int] | frozenset[int] = frozenset(),
                 name: str = "fxscale-engine", first_replica: int = 0,
                 micro_batches: int = 1) -> None:
        if micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {micro_batches!r}")
        self.runner, self.config, self.max_len = runner, config, max_len
        self.micro_batches = micro_batches
        self.helper = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-micro-batch") \
            if micro_batches > 1 else None
        self.num_blocks = num_blocks
        self.eos = frozenset(eos)
        self.scheduler = Scheduler(config, [num_blocks], first_replica)
        self.lock = threading.Condition()
        self.inbox: list[EngineRequest] = []
        self.cancelled: dict[int, bool] = {}  # request -> finish it (else cancel it)
        self.actions: list[tuple[Callable[[], Any], Future]] = []
        self.requests: dict[int, EngineRequest] = {}
        self.ids = itertools.count()
        self.closing = False
        self.draining: set[int] = set()  # attention replicas to remove once empty
        # bounded windows (a long-running server's memory stays flat): per step, the last
        # steps with their run and total seconds (what the simulator is calibrated on), and
        # the last finished requests' timings (what stats() reports percentiles of)
        self.recent: deque[dict[str, float]] = deque(maxlen=1000)
        self.steps_log: deque[tuple[Step, float, float]] = deque(maxlen=1024)
        self.finished: deque[dict[str, float]] = deque(maxlen=FINISHED_WINDOW)
        self.reset_counters()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def reset_counters(self) -> None:
        """Start the statistics afresh (after a warm-up): counters and histograms only grow
        from here, the windows of steps and finished requests start empty."""
        self.counters = {"steps": 0, "tokens": 0, "samples": 0, "preemptions": 0,
                         "failed_steps": 0, "completed": 0, "prompt_tokens": 0,
                         "generation_tokens": 0, "recomputed_replicas": 0}
        self.finish_reasons = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.histograms = {key: Histogram(REQUEST_BUCKETS_S)
                           for key in ("ttft_s", "itl_s", "e2e_s")}
        self.preempted_before = self.scheduler.preemptions
        for window in (self.recent, self.steps_log, self.finished):
            window.clear()

    # ---- requests -----------------------------------------------------------------------------
    def add(self, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False,
            stream: Any = False, logits: bool = False,
            sampling: Sampling = Sampling()) -> EngineRequest:
        """Queue a request; its future gives the generated tokens, or with `logits` the
        logits of its prompt [1, length, vocab]. `stream`: True puts each token on a
        queue.Queue (`stream(record)` iterates it), or pass any object with put() (an
        asyncio front end's bridge); STREAM_END comes last. `sampling` chooses its tokens
        (greedy by default); with `sampling.logprobs` the record's `logprobs` holds each
        token's, appended before the token is put on the stream."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the "
                             f"model's {self.max_len} positions")
        slots = self.num_blocks * self.config.block_size
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
                                   queue.Queue() if stream is True else stream or None,
                                   time.perf_counter(),
                                   logits, sampling)
            self.inbox.append(record)
            self.lock.notify()
        return record

    def cancel(self, request: int, finish: bool = False) -> None:
        """End a request before its next step: cancelled (its future is cancelled by the
        caller), or with `finish` finished as it stands (a front end found a stop string):
        its future gets the tokens so far."""
        with self.lock:
            self.cancelled[request] = finish or self.cancelled.get(request, False)
            self.lock.notify()

    def control(self, action: Callable[[], Any]) -> Future:
        """Run an action in the loop thread between steps (replica changes); its future."""
        future: Future = Future()
        with self.lock:
            self.actions.append((action, future))
            self.lock.notify()
        return future

    def load(self) -> int:
        """Requests queued or running (for routing to the least loaded engine)."""
        with self.lock:
            return len(self.inbox) + len(self.requests)

    def close(self, timeout_s: float | None = None) -> None:
        """Take no more requests, finish those in flight, stop the loop."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join(timeout_s)
        if self.helper is not None:
            self.helper.shutdown()

    # ---- attention replicas (the scheduler's block pools) -----------------------------------
    def set_attention_replicas(self, count: int, replace: set[int] = frozenset()) -> None:
        """Have `count` attention replicas: new ones start empty; extra ones (the newest) and
        those keyed in `replace` admit nothing more and are removed once their requests
        finish. Loop thread only."""
        live = sorted(k for k, p in self.scheduler.pools.items() if not p.draining)
        kept = [k for k in live if k not in replace][:count]
        for key in (k for k in live if k not in kept):
            self.scheduler.drain(key)
            self.draining.add(key)
            drain = getattr(self.runner, "drain_attention", None)
            if drain is not None:
                drain(key)
        for _ in range(count - len(kept)):
            key = self.scheduler.add_replica(self.num_blocks)
            add = getattr(self.runner, "add_attention", None)
            if add is not None:
                add(key)

    def attention_replicas(self) -> int:
        """Attention replicas that admit requests."""
        return sum(1 for p in self.scheduler.pools.values() if not p.draining)

    def _retire_drained(self) -> None:
        """Remove drained attention replicas that hold no request any more."""
        for key in list(self.draining):
            if not self.scheduler.pools[key].tables:
                self.scheduler.remove_replica(key)
                self.draining.discard(key)
                remove = getattr(self.runner, "remove_attention", None)
                if remove is not None:
                    remove(key)

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.inbox or self.cancelled or self.actions or self.closing
                           or self.scheduler.has_work()):
                    self.lock.wait()
                arrived, self.inbox = self.inbox, []
                cancelled, self.cancelled = self.cancelled, {}
                actions, self.actions = self.actions, []
                if self.closing and not (arrived or actions or self.scheduler.has_work()):
                    return
            for action, future in actions:
                try:
                    future.set_result(action())
                except Exception as err:  # noqa: BLE001 - handed to whoever asked
                    future.set_exception(err)
            for record in arrived:
                self.requests[record.id] = record
                self.counters["prompt_tokens"] += record.prompt_len
                self.scheduler.add(record.id, record.prompt_len, record.max_new_tokens)
            for request, finish in cancelled.items():
                self._end(request, cancelled=not finish, reason="stop")
            self._retire_drained()
            started = time.perf_counter()
            step = self.scheduler.schedule()
            for request in step.preempted:
                self._forget(request)
                record = self.requests.get(request)
                if record is not None:
                    record.rows.clear()  # a forward request recomputes its rows
            if step.chunks:
                self._run(step, started)
            elif not (arrived or cancelled or actions):  # nothing runnable now: do not spin
                with self.lock:
                    self.lock.wait(0.01)

    def _run(self, step: Step, started: float) -> None:
        """Run a step (its two micro-batches side by side when asked), sample, deliver,
        finish; record how long the runner took and how long the whole step took (the rest
        is the engine's own time)."""
        halves = micro_batches(step) if self.micro_batches > 1 else [step]
        run_start = time.perf_counter()
        if len(halves) == 1:
            outcomes = [self._attempt(step)]
        else:  # one half in the helper thread: their attention and dense groups overlap
            other = self.helper.submit(self._attempt, halves[1])
            outcomes = [self._attempt(halves[0]), other.result()]
        run_s = time.perf_counter() - run_start
        now = time.perf_counter()
        # a replica lost under one half may have been replaced before the other half's calls
        # reached it (they then read its empty blocks): no half of the step counts, and a
        # request on a live replica runs its chunk again (rewriting the same KV slots)
        lost = {replica: err for *_, err, _ in outcomes
                for replica in getattr(err, "lost_replicas", ())}
        for half, (logits, whole, failed, err, failures) in zip(halves, outcomes):
            self.counters["failed_steps"] += failures
            for request in failed:
                self._fail(request, err)
            if logits is not None and not lost:
                self.scheduler.complete(half)
                self._deliver(half, logits, whole, now)
        for replica, err in sorted(lost.items()):
            self._recompute(replica, err)
        self._count(step, run_s, time.perf_counter() - started)

    def _attempt(self, step: Step) -> tuple[Any, frozenset[int], list[int], Any, int]:
        """Run a step, once more if it fails: (logits, its prompt-logits requests, the
        requests to fail, the error, failed runs). Changes no engine state (it may run in
        the helper thread)."""
        tokens = {c.request: self.requests[c.request].tokens for c in step.chunks}
        whole = frozenset(c.request for c in step.chunks if self.requests[c.request].logits)
        try:
            return self.runner.run(step, tokens, whole), whole, [], None, 0
        except Exception as err:  # noqa: BLE001 - a failed step must not stop the engine
            if getattr(err, "lost_replicas", None):
                return None, whole, [], err, 1  # not run again on empty blocks: recomputed
            held = getattr(err, "tokens", None)
            if held is not None:  # a group named the tokens it failed on: only theirs
                return None, whole, requests_in(step, held), err, 1
        try:
            return self.runner.run(step, tokens, whole), whole, [], None, 1
        except Exception as err:  # noqa: BLE001 - twice: its requests fail, the engine runs on
            held = getattr(err, "tokens", None)
            failed = requests_in(step, held) if held is not None else \
                [c.request for c in step.chunks]
            return None, whole, failed, err, 2

    def _recompute(self, replica: int, err: BaseException) -> None:
        """An attention replica died with its KV blocks: its requests are preempted, to be
        recomputed from their tokens; a request this happens to a second time fails."""
        for request in self.scheduler.recompute(replica):
            record = self.requests.get(request)
            if record is None:
                continue
            record.recoveries += 1
            if record.recoveries > 1:
                self._fail(request, RuntimeError(
                    f"request {request} lost its KV blocks twice ({err}); it was recomputed "
                    "once and is not retried again"))
                continue
            self._forget(request)
            record.rows.clear()  # a forward request recomputes its rows
        self.counters["recomputed_replicas"] += 1

    def _deliver(self, step: Step, logits: torch.Tensor, whole: frozenset[int],
                 now: float) -> None:
        """Hand each chunk its rows: a new token, or (the requests in `whole`) its prompt's
        logits."""
        row = 0
        for chunk in step.chunks:
            record = self.requests.get(chunk.request)
            width = chunk.tokens if chunk.request in whole else int(chunk.samples)
            rows, row = logits[row:row + width], row + width
            if record is None or not width:
                continue
            if record.logits:
                record.rows.append(rows)
                if chunk.samples:
                    record.future.record["e2e_s"] = now - record.submitted
                    self._end(chunk.request, result=torch.cat(record.rows)[None])
                continue
            if record.generator is None and not record.sampling.greedy:
                record.generator = generator_for(record.sampling, rows.device)
            token, report = next_token(rows[0], record.sampling, record.generator,
                                       record.generated)
            if report is not None:
                record.logprobs.append(report)
            record.tokens.append(token)
            record.token_times.append(now)
            self.counters["generation_tokens"] += 1
            if record.stream is not None:
                record.stream.put(token)
            if token in record.stop_ids:
                self._end(chunk.request, reason="stop")
            elif len(record.generated) >= record.max_new_tokens:
                self._end(chunk.request, reason="length")

    def _count(self, step: Step, run_s: float, step_s: float) -> None:
        """Per-step statistics."""
        c = self.counters
        c["steps"] += 1
        c["tokens"] += step.num_tokens
        c["samples"] += step.num_samples
        c["preemptions"] = self.scheduler.preemptions - self.preempted_before
        self.recent.append({"tokens": step.num_tokens, "requests": len(step.chunks),
                            "decodes": step.num_decodes, "run_s": run_s,
                            "engine_s": step_s - run_s})
        self.steps_log.append((step, run_s, step_s))

    def _release(self, request: int) -> EngineRequest | None:
        """Free a request's blocks and forget it; its record (None: gone)."""
        self.scheduler.finish(request)
        self._forget(request)
        return self.requests.pop(request, None)

    def _end(self, request: int, cancelled: bool = False, result: Any = None,
             reason: str = "length") -> None:
        """Finish (or drop a cancelled) request: free its blocks, count it, resolve its
        future, then end its stream (a reader at the end finds the outcome)."""
        record = self._release(request)
        if record is None:
            return
        try:
            if cancelled or record.future.cancelled():
                self.finish_reasons["abort"] += 1
                Future.cancel(record.future)  # resolved (not TokenFuture.cancel: it is gone)
                return
            self._finish(record, reason)
            record.future.set_result(record.generated if result is None else result)
        finally:
            if record.stream is not None:
                record.stream.put(STREAM_END)

    def _finish(self, record: EngineRequest, reason: str) -> None:
        """Count a finished request: its timings, histograms and finish reason."""
        record.finish_reason = reason
        timings = record.future.record
        if record.token_times:
            timings.update(token_timings(record.submitted, record.token_times),
                           submitted_at=record.submitted, first_token_at=record.token_times[0],
                           finished_at=record.token_times[-1], tokens=len(record.generated),
                           e2e_s=record.token_times[-1] - record.submitted)
            self.histograms["ttft_s"].observe(timings["ttft_s"])
            for before, after in zip(record.token_times, record.token_times[1:]):
                self.histograms["itl_s"].observe(after - before)
        timings.setdefault("e2e_s", time.perf_counter() - record.submitted)
        timings.update(finish_reason=reason, prompt_tokens=record.prompt_len)
        self.histograms["e2e_s"].observe(timings["e2e_s"])
        self.finished.append(dict(timings))
        self.counters["completed"] += 1
        self.finish_reasons[reason] += 1

    def _fail(self, request: int, err: BaseException) -> None:
        """End a request with an error (its stream after its future)."""
        record = self._release(request)
        if record is None:
            return
        if not record.future.cancelled():
            self.finish_reasons["error"] += 1
            record.future.set_exception(err)
        if record.stream is not None:
            record.stream.put(STREAM_END)

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
                if token is STREAM_END:
                    finished = True
                    break
                yield token
            if not record.future.cancelled():
                record.future.result()  # raise the request's error, if it failed
        finally:
            if not finished:
                record.future.cancel()

    def stats(self) -> dict[str, Any]:
        """Steps, tokens and requests per step, KV blocks, preemptions; prompt and generated
        tokens, requests by finish reason and latency histograms since the start."""
        recent = list(self.recent)

        def mean(key: str) -> float:
            return sum(r[key] for r in recent) / len(recent) if recent else 0.0

        return {**self.counters, "finish_reasons": dict(self.finish_reasons),
                "histograms": {k: h.report() for k, h in self.histograms.items()},
                "kv_blocks": self.scheduler.blocks(),
                "attention_replicas": self.attention_replicas(),
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "tokens_per_step": mean("tokens"), "requests_per_step": mean("requests"),
                "decodes_per_step": mean("decodes"), "step_run_s": mean("run_s"),
                "step_engine_s": mean("engine_s")}
