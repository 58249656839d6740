"""Selective batching: row-wise calls of several requests run as one and split back exactly."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch.testing import assert_close

from fxscale.runtime.pools.batching import run_batched, signature
from fxscale.runtime.pools.budget import Budget
from fxscale.runtime.pools.replica_pool import Call, GroupError, ReplicaPool


def heads_projection(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> tuple:
    """A row-wise group as captured for one request: its views name batch 1 and 4 heads."""
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps.item())
    q = torch.nn.functional.linear(h, weight).view(1, x.shape[1], 4, -1).transpose(1, 2)
    return q, h.sum()


def fresh(seed: int, length: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, length, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_batched_calls_match_float64_reference_per_request():
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    eps = torch.tensor(1e-6)
    calls = [[fresh(s), weight, eps] for s in range(1, 6)]
    results = run_batched(heads_projection, calls)
    for args, (q, total) in zip(calls, results):
        ref_q, ref_total = heads_projection(args[0].double(), weight.double(), eps.double())
        assert q.shape == (1, 4, 3, 4)
        assert_close(q, ref_q.float(), rtol=1e-5, atol=1e-5)
        assert_close(total, ref_total.float(), rtol=1e-5, atol=1e-4)


def test_signature_separates_graphs_shapes_and_values():
    x, w, eps = fresh(1), torch.randn(16, 16), torch.tensor(1e-6)
    key = signature(heads_projection, (x, w, eps), (1,))
    assert key == signature(heads_projection, (fresh(2), torch.randn(16, 16), eps), (1,))
    assert key != signature(lambda *a: a, (x, w, eps), (1,))          # another graph
    assert key != signature(heads_projection, (fresh(2, 4), w, eps), (1,))  # another length
    assert key != signature(heads_projection, (x, w, torch.tensor(1e-5)), (1,))
    assert signature(heads_projection, (x, w, (torch.ones(1),)), (1,)) is None  # alone
    values = [signature(heads_projection, (x, w, v), (1,)) for v in (1, 1.0, True, 0.0, -0.0)]
    assert len(set(values)) == 5  # equal in Python, different to a graph


def gathered_pool(run, args_list, max_batch=8) -> tuple[ReplicaPool, list]:
    """Queue every call while the only budget slot is held, so one replica sees them all."""
    budget = Budget(1)
    pool = ReplicaPool("g", stateful=False, budget=budget, max_batch=max_batch)
    holder = threading.Event()
    with budget.slot(holder):
        futures = [pool.submit(Call(run, tuple(args), (1,), i, signature(run, tuple(args), (1,))))
                   for i, args in enumerate(args_list)]
    return pool, [f.result(timeout=30) for f in futures]


def test_pool_batches_queued_calls_and_splits_them_back():
    weight = torch.randn(16, 16)
    eps = torch.tensor(1e-6)
    args = [[fresh(10 + i), weight, eps] for i in range(6)]
    pool, results = gathered_pool(heads_projection, args)
    stats = pool.stats()
    assert stats["batch_sizes"]["6"] == 1  # (and 6 one-by-one checks of the first)
    assert stats["batches"] == 7 and stats["execution_s"] > 0
    assert stats["execution_s"] == pytest.approx(7 * stats["execution_mean_s"])
    for a, (q, total) in zip(args, results):  # the pool's own weight copy equals `weight`
        expected = heads_projection(*a)
        assert_close(q, expected[0], rtol=1e-5, atol=1e-6)
        assert_close(total, expected[1], rtol=1e-5, atol=1e-5)


def test_a_graph_vmap_cannot_batch_runs_one_by_one(caplog):
    def data_dependent(x, w, eps):  # Python control flow on a value: vmap refuses it
        return x * 2 if float(x.sum()) > 0 else x @ w

    weight = torch.randn(16, 16)
    args = [[fresh(20 + i), weight, torch.tensor(0.0)] for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="fxscale.runtime"):
        pool, results = gathered_pool(data_dependent, args)
    assert len(pool.refused) == 1 and "one by one" in caplog.text
    for a, result in zip(args, results):
        assert_close(result, data_dependent(*a))


def test_a_batch_that_disagrees_with_one_by_one_is_never_returned(caplog):
    def poisoned(x, w, eps):  # gives a different number when it sees a batched tensor
        batched = torch._C._functorch.is_batchedtensor(x)
        return x @ w + (1.0 if batched else 0.0)

    weight = torch.randn(16, 16)
    args = [[fresh(30 + i), weight, torch.tensor(0.0)] for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="fxscale.runtime"):
        pool, results = gathered_pool(poisoned, args)
    assert "differ" in caplog.text and len(pool.refused) == 1
    for a, result in zip(args, results):
        assert_close(result, a[0] @ weight)


def test_budget_hands_a_freed_slot_to_the_longest_batchable_queue():
    class Waiter:
        def __init__(self, score):
            self.score = score

        def priority(self, now):
            return self.score

    budget = Budget(1)
    order = []
    holder = Waiter(0)
    with budget.slot(holder):
        threads = []
        for score in (1, 5, 3):
            waiter = Waiter(score)

            def take(w=waiter):
                with budget.slot(w):
                    order.append(w.score)

            threads.append(threading.Thread(target=take))
            threads[-1].start()
        while len(budget.waiting) < 3:
            threading.Event().wait(0.001)
    for t in threads:
        t.join(timeout=10)
    assert order == [5, 3, 1]


def test_outputs_that_slices_would_share_are_each_requests_own():
    def constant_and_row(x, w, eps):  # the first output does not depend on the batched input
        return w.sum(0), x * 2

    weight = torch.randn(16, 16)
    args = [[fresh(40 + i), weight, torch.tensor(0.0)] for i in range(3)]
    results = run_batched(constant_and_row, args)
    results[0][0].add_(100.0)  # one request updates its output in place
    assert_close(results[1][0], weight.sum(0))
    same = run_batched(constant_and_row, [args[0], list(args[0])])  # the very same objects
    same[0][1].add_(1.0)
    assert_close(same[1][1], args[0][0] * 2)


def test_one_bad_call_fails_alone_and_its_batch_mates_succeed():
    def rejects_negative_first(x, w, eps):
        if bool((x[..., 0] < -5).any()):  # data-dependent: vmap cannot batch it either
            raise ValueError("bad row")
        return x @ w

    weight = torch.randn(16, 16)
    good = [[fresh(50 + i), weight, torch.tensor(0.0)] for i in range(3)]
    bad = [fresh(60).index_fill(-1, torch.tensor([0]), -10.0), weight, torch.tensor(0.0)]
    budget = Budget(1)
    pool = ReplicaPool("g", stateful=False, budget=budget, max_batch=8)
    with budget.slot(threading.Event()):
        futures = [pool.submit(Call(rejects_negative_first, tuple(a), (1,), i,
                                    signature(rejects_negative_first, tuple(a), (1,))))
                   for i, a in enumerate([*good, bad])]
    for a, future in zip(good, futures):
        assert_close(future.result(timeout=30), a[0] @ weight)
    with pytest.raises(GroupError, match="bad row"):
        futures[-1].result(timeout=30)
    assert not pool.refused  # the signature is fine: one call was bad
