"""The step-composition rules, fed by hand (no model): token budget, decodes first, chunked
prefill, admission by free blocks, preemption of the newest request, FCFS, cancellation,
replicas and draining; and a random workload in which nothing is lost or computed twice."""
from __future__ import annotations

import random

import pytest

from fxscale.runtime.scheduling import BlockPool, OutOfBlocks, Scheduler, SchedulerConfig


def run(scheduler: Scheduler, step, ended=()):
    """Complete a step and finish the requests that ended (their max_new_tokens, or listed)."""
    scheduler.complete(step)
    for chunk in step.chunks:
        state = scheduler.requests[chunk.request]
        if chunk.samples and (state.num_output >= state.max_new_tokens
                              or chunk.request in ended):
            scheduler.finish(chunk.request)


def test_block_pool_hands_out_and_takes_back_blocks():
    pool = BlockPool(4, 16)
    assert pool.grow(1, 17) == [0, 1] and pool.grow(2, 16) == [2]
    assert pool.slot(1, 17) == 1 * 16 + 1
    with pytest.raises(OutOfBlocks):
        pool.grow(2, 64)
    assert pool.tables[2] == [2]  # unchanged by the refusal
    assert pool.release(1) == 2 and pool.num_free == 3 and pool.grow(3, 1) == [0]


def test_prompts_are_chunked_within_the_token_budget_and_decodes_go_first():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8, block_size=4), [64])
    s.add(0, 3, 5)
    first = s.schedule()
    assert [(c.request, c.start, c.tokens, c.samples) for c in first.chunks] == [(0, 0, 3, True)]
    run(s, first)
    s.add(1, 20, 2)
    step = s.schedule()  # request 0 decodes first, then 7 tokens of request 1's prompt
    assert [(c.request, c.start, c.tokens, c.samples) for c in step.chunks] == \
        [(0, 3, 1, True), (1, 0, 7, False)]
    run(s, step)
    step = s.schedule()
    assert [(c.request, c.start, c.tokens) for c in step.chunks] == [(0, 4, 1), (1, 7, 7)]
    run(s, step)
    step = s.schedule()
    assert [(c.request, c.start, c.tokens, c.samples) for c in step.chunks] == \
        [(0, 5, 1, True), (1, 14, 6, True)]
    assert step.num_tokens == 7 and step.num_samples == 2 and step.num_decodes == 1


def test_admission_stops_at_the_first_request_without_room():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, block_size=4), [6])
    s.add(0, 16, 2)   # 4 blocks
    s.add(1, 12, 2)   # 3 blocks: does not fit beside request 0
    s.add(2, 4, 2)    # 1 block: would fit, but may not overtake request 1
    step = s.schedule()
    assert [c.request for c in step.chunks] == [0]
    assert [w.id for w in s.waiting] == [1, 2]


def test_running_out_of_blocks_preempts_the_newest_and_loses_nothing():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, block_size=4), [4])
    s.add(0, 4, 8)
    s.add(1, 4, 8)
    run(s, s.schedule())              # both prefilled: 2 blocks used
    for _ in range(10):               # decoding crosses into new blocks
        step = s.schedule()
        run(s, step)
        if step.preempted:
            break
    assert step.preempted == (1,) and s.preemptions == 1
    assert [w.id for w in s.waiting] == [1] and s.requests[1].num_computed == 0
    assert s.requests[1].num_output >= 1  # what it generated is kept, recomputed later
    while s.has_work():
        run(s, s.schedule())
    assert s.blocks()["used"] == 0


def test_cancellation_frees_blocks_at_once():
    s = Scheduler(SchedulerConfig(block_size=4), [8])
    s.add(0, 10, 4)
    run(s, s.schedule())
    assert s.blocks()["used"] == 3
    assert s.cancel(0) and not s.cancel(0)
    assert s.blocks()["used"] == 0 and not s.has_work()


def test_requests_spread_over_replicas_and_a_draining_replica_admits_nothing():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256, block_size=4), [8, 8])
    for r in range(4):
        s.add(r, 8, 2)
    step = s.schedule()
    replicas = [c.replica for c in step.chunks]
    assert sorted(replicas) == [0, 0, 1, 1] and replicas == sorted(replicas)  # grouped
    s.drain(1)
    with pytest.raises(ValueError, match="still holds 2 requests"):
        s.remove_replica(1)
    s.add(9, 4, 1)
    run(s, step)
    step = s.schedule()
    assert next(c for c in step.chunks if c.request == 9).replica == 0
    while s.has_work():
        run(s, s.schedule())
    s.remove_replica(1)
    assert list(s.pools) == [0]


def test_a_request_larger_than_a_replica_is_refused_when_added():
    s = Scheduler(SchedulerConfig(block_size=16), [4])
    with pytest.raises(ValueError, match="needs more than the 64 token slots"):
        s.add(0, 60, 5)


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_computes_every_token_once_and_finishes_everything(seed):
    """Random arrivals, lengths, cancellations and a tight cache: every request that is not
    cancelled generates exactly its tokens; each step's chunks extend what is cached; the
    budget and the running cap hold; no block is held twice or leaked."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_batched_tokens=rng.choice([16, 64]),
                             max_num_seqs=rng.choice([4, 64]), block_size=rng.choice([4, 16]))
    s = Scheduler(config, [rng.randint(12, 40) for _ in range(rng.randint(1, 3))])
    wanted, cancelled, done = {}, set(), {}
    for step_no in range(2000):
        if len(wanted) < 60 and rng.random() < 0.3:
            r = len(wanted)
            wanted[r] = rng.randint(1, 10)
            s.add(r, rng.randint(1, 40), wanted[r])
        if wanted and rng.random() < 0.02:
            r = rng.choice(list(wanted))
            if s.cancel(r):
                cancelled.add(r)
        step = s.schedule()
        assert step.num_tokens <= config.max_num_batched_tokens
        assert len(s.running) <= config.max_num_seqs
        for pool in s.pools.values():  # every block is free or held by one request
            held = [b for table in pool.tables.values() for b in table]
            assert sorted(held + pool.free) == list(range(pool.num_blocks))
        for chunk in step.chunks:
            state = s.requests[chunk.request]
            assert chunk.start == state.num_computed and chunk.end <= state.total_tokens
            assert len(chunk.blocks) * config.block_size >= chunk.end
        s.complete(step)
        for chunk in step.chunks:
            state = s.requests[chunk.request]
            if chunk.samples and state.num_output == state.max_new_tokens:
                done[chunk.request] = state.num_output
                s.finish(chunk.request)
        if len(wanted) == 60 and not s.has_work():
            break
    assert not s.has_work() and s.blocks()["used"] == 0
    assert done == {r: n for r, n in wanted.items() if r not in cancelled}
