"""Continuous batching with chunked prefill, in the spirit of vLLM v1's scheduler.

Every step takes, within a token budget (`max_num_batched_tokens`) and a cap on running
requests (`max_num_seqs`):
1. the running requests that decode (one token each), oldest first;
2. the running requests whose prompt is partly computed, their next chunk;
3. waiting requests in arrival order (preempted ones first), each admitted on the attention
   replica with the most free blocks that can hold its first chunk; the first that cannot be
   admitted stops admission (first come, first served).
A running request whose next tokens need a block its replica does not have preempts the
newest running request on that replica (its blocks freed, its tokens recomputed when it is
admitted again), itself if it is the newest. Nothing is lost: a preempted request keeps its
generated tokens and recomputes their KV.

The scheduler counts tokens and blocks only; token ids, sampling and end-of-sequence are the
engine's. Call order per step: `schedule()` -> run the Step -> `complete(step)` -> `finish()`
for requests that ended; `cancel()` and replica changes between steps.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from fxscale.contracts.step import Chunk, Step
from fxscale.runtime.scheduling.blocks import BlockPool


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step."""

    max_num_batched_tokens: int = 512  # tokens per step (decodes and prompt chunks)
    max_num_seqs: int = 64             # requests running at once
    block_size: int = 16               # token slots per KV block

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class SequenceState:
    """What the scheduler knows of one request."""

    id: int
    prompt_tokens: int
    max_new_tokens: int
    arrival: int               # admission order (lower: older)
    num_computed: int = 0      # tokens whose KV is in the cache
    num_output: int = 0        # tokens generated
    replica: int | None = None
    preemptions: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt and generated tokens: what its KV will hold once computed."""
        return self.prompt_tokens + self.num_output

    @property
    def pending(self) -> int:
        """Known tokens whose KV is not computed yet."""
        return self.total_tokens - self.num_computed


class Scheduler:
    """Composes steps over a set of attention replicas' block pools (see the module doc)."""

    def __init__(self, config: SchedulerConfig, blocks_per_replica: list[int],
                 first_replica: int = 0) -> None:
        self.config = config
        self.pools: dict[int, BlockPool] = {}
        self.replica_ids = itertools.count(first_replica)
        for blocks in blocks_per_replica:
            self.add_replica(blocks)
        self.waiting: list[SequenceState] = []   # preempted first, then by arrival
        self.running: list[SequenceState] = []   # by arrival
        self.requests: dict[int, SequenceState] = {}
        self.arrivals = itertools.count()
        self.preemptions = 0

    # ---- requests --------------------------------------------------------------------------
    def add(self, request: int, prompt_tokens: int, max_new_tokens: int) -> SequenceState:
        """Queue a request (its prompt must fit one replica's cache with its output)."""
        if request in self.requests:
            raise ValueError(f"request {request} is already scheduled")
        if prompt_tokens < 1 or max_new_tokens < 1:
            raise ValueError(f"a request needs a prompt and tokens to generate, got "
                             f"{prompt_tokens} and {max_new_tokens}")
        most = max((p.num_blocks for p in self.pools.values()), default=0)
        block = self.config.block_size
        if -(-(prompt_tokens + max_new_tokens) // block) > most:
            raise ValueError(f"a request of {prompt_tokens} prompt + {max_new_tokens} new "
                             f"tokens needs more than the {most * block} token slots of an "
                             "attention replica's KV cache; shorten it or give the cache "
                             "more tokens")
        state = SequenceState(request, prompt_tokens, max_new_tokens, next(self.arrivals))
        self.requests[request] = state
        self.waiting.append(state)
        return state

    def cancel(self, request: int) -> bool:
        """Forget a request and free its blocks now (False: it was not scheduled)."""
        state = self.requests.pop(request, None)
        if state is None:
            return False
        for queue in (self.waiting, self.running):
            if state in queue:
                queue.remove(state)
        if state.replica is not None:
            self.pools[state.replica].release(request)
        return True

    finish = cancel  # a request that ended leaves the same way

    # ---- replicas -----------------------------------------------------------------------------
    def add_replica(self, num_blocks: int) -> int:
        """A new attention replica with empty blocks; its id."""
        replica = next(self.replica_ids)
        self.pools[replica] = BlockPool(num_blocks, self.config.block_size)
        return replica

    def drain(self, replica: int) -> None:
        """Admit nothing more to a replica; its requests run to the end."""
        self.pools[replica].draining = True

    def remove_replica(self, replica: int) -> None:
        """Remove a drained replica that holds no request."""
        pool = self.pools[replica]
        if pool.tables:
            raise ValueError(f"attention replica {replica} still holds "
                             f"{len(pool.tables)} requests; drain it first")
        del self.pools[replica]

    # ---- steps ---------------------------------------------------------------------------------
    def schedule(self) -> Step:
        """The next step (empty when nothing can run)."""
        budget = self.config.max_num_batched_tokens
        chosen: dict[int, int] = {}  # request -> tokens this step
        preempted: list[int] = []
        decodes = [s for s in self.running if s.pending == 1]
        chunks = [s for s in self.running if s.pending > 1]
        for state in decodes + chunks:
            if budget == 0:
                break
            if state.id in preempted:
                continue
            tokens = min(state.pending, budget)
            if self._grow(state, state.num_computed + tokens, chosen, preempted):
                chosen[state.id] = tokens
                budget -= tokens
        while budget and self.waiting and len(self.running) < self.config.max_num_seqs:
            state = self.waiting[0]
            tokens = min(state.pending, budget)
            replica = self._admitting(state.id, state.num_computed + tokens)
            if replica is None:
                break  # first come, first served: nothing overtakes the head of the queue
            self.waiting.pop(0)
            state.replica = replica
            self.pools[replica].grow(state.id, state.num_computed + tokens)
            self.running.append(state)
            self.running.sort(key=lambda s: s.arrival)
            chosen[state.id] = tokens
            budget -= tokens
        return Step(self._chunks(chosen), tuple(preempted))

    def _grow(self, state: SequenceState, tokens: int, chosen: dict[int, int],
              preempted: list[int]) -> bool:
        """Give a running request the blocks for `tokens`, preempting the newest requests of
        its replica not yet in this step as needed; False if it was preempted itself."""
        pool = self.pools[state.replica]
        while pool.missing(state.id, tokens) > pool.num_free:
            victims = [s for s in self.running if s.replica == state.replica
                       and s.id not in chosen and s.id not in preempted]
            victim = max(victims, key=lambda s: s.arrival)  # state itself is among them
            self._preempt(victim)
            preempted.append(victim.id)
            if victim is state:
                return False
        pool.grow(state.id, tokens)
        return True

    def _preempt(self, state: SequenceState) -> None:
        """Free a running request's blocks and queue it to recompute, before new arrivals."""
        self.pools[state.replica].release(state.id)
        self.running.remove(state)
        state.num_computed, state.replica = 0, None
        state.preemptions += 1
        self.preemptions += 1
        preempted = [s for s in self.waiting if s.preemptions]
        preempted.append(state)
        preempted.sort(key=lambda s: s.arrival)
        self.waiting = preempted + [s for s in self.waiting if not s.preemptions]

    def recompute(self, replica: int) -> list[int]:
        """The requests of a replica that lost its KV blocks, freed and queued to recompute
        (preempted); their ids."""
        lost = [s for s in self.running if s.replica == replica]
        for state in lost:
            self._preempt(state)
        return [s.id for s in lost]

    def _admitting(self, request: int, tokens: int) -> int | None:
        """The open replica with the most free blocks that holds `tokens` (None: none)."""
        open_pools = [(pool.num_free, -replica) for replica, pool in self.pools.items()
                      if not pool.draining and pool.missing(request, tokens) <= pool.num_free]
        return -max(open_pools)[1] if open_pools else None

    def _chunks(self, chosen: dict[int, int]) -> tuple[Chunk, ...]:
        """The step's chunks, grouped by replica, oldest request first within each."""
        states = sorted((self.requests[r] for r in chosen), key=lambda s: (s.replica, s.arrival))
        return tuple(Chunk(s.id, s.replica, s.num_computed, chosen[s.id],
                           tuple(self.pools[s.replica].tables[s.id]),
                           s.num_computed + chosen[s.id] == s.total_tokens) for s in states)

    def complete(self, step: Step) -> None:
        """Record that a step ran: its tokens are computed, its sampling chunks gained one
        generated token each (the engine then finishes the requests that ended)."""
        for chunk in step.chunks:
            state = self.requests.get(chunk.request)
            if state is None:  # cancelled while the step ran
                continue
            state.num_computed = chunk.end
            if chunk.samples:
                state.num_output += 1

    # ---- state ----------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def blocks(self) -> dict[str, int]:
        """KV blocks used and free over the replicas."""
        pools = list(self.pools.values())  # one snapshot (another thread may add a replica)
        total = sum(p.num_blocks for p in pools)
        free = sum(p.num_free for p in pools)
        return {"used": total - free, "free": free, "total": total}

    def blocks_wanted(self) -> int:
        """KV blocks the requests held (waiting or running) need at their full length."""
        block = self.config.block_size
        return sum(-(-(s.prompt_tokens + s.max_new_tokens) // block)
                   for s in list(self.requests.values()))

    def requests_on(self, replica: int) -> list[int]:
        """The requests whose blocks live on a replica."""
        return [s.id for s in self.running if s.replica == replica]
