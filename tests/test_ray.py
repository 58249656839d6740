"""The Ray executor (runtime/executors/ray_executor.py) on a Ray cluster of two nodes started
on this machine (loopback only, each node with a resource of its own), against Hugging Face
greedy: 32 concurrent requests while groups scale up and down and actors are killed; a soak
of 500 requests with kills and scale events, none lost or duplicated. The tests stop only
the Ray processes they started."""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

if os.environ.get("CI"):
    import ray  # CI installs the ray extra: without it this module fails, never skips
else:
    ray = pytest.importorskip("ray")

from helpers import split_plan  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import fxscale  # noqa: E402
from fxscale.models import zoo  # noqa: E402
from fxscale.runtime.executors.compiled_graph import all_ran, step_shape  # noqa: E402
from fxscale.runtime.executors.ray_executor import (  # noqa: E402
    Failed,
    Handle,
    Inherited,
    Ledger,
    Run,
    Submitted,
    loopback_only,
    pack,
    receive_handles,
    send_handles,
    sendable,
)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on 127.0.0.1 (one CPU each), this process connected to them."""
    node = {"num_cpus": 1, "object_store_memory": 256 << 20, "node_ip_address": "127.0.0.1"}
    with loopback_only():
        cluster = Cluster(initialize_head=True, connect=True,
                          head_node_args={**node, "resources": {"node_a": 1},
                                          "include_dashboard": False})
        cluster.add_node(**node, resources={"node_b": 1})
        cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", layers=2, hidden=64).model.eval()


def prompts(seed: int, count: int, longest: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(1, longest))]
            for _ in range(count)]


def greedy(model, prompt: list[int], new: int) -> list[int]:
    """Hugging Face greedy generate, no stop token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             eos_token_id=[], pad_token_id=0)
    return out[0, len(prompt):].tolist()


def nodes_of(stats: dict, attention: bool) -> set[str]:
    """The Ray nodes the attention (or the dense) groups' replicas run on."""
    return {where["node"] for group in stats["groups"].values()
            if group["stateful"] == attention for where in group["locations"].values()}


def test_a_call_is_sent_only_the_results_and_tokens_it_reads():
    """Handles to two parts' results joined along tokens: a slice within one part is sent
    that part's result only, a slice across both is sent both and joined in the actor; an
    output of a many-output call is picked by index; a part that ran in the receiving actor
    is read from its kept results; a failed result fails its reader with the producer's
    failure (Inherited), and an error that cannot be pickled is sent as text."""
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    both = Handle.joined((Handle("ref-a", rows=3), Handle("ref-b", rows=5)), 0)
    inputs = (pack(a), pack(b))
    refs: list = []
    sent = send_handles([both.narrow(0, 1, 3), 7], refs)
    assert refs == ["ref-a", "ref-b"]
    got = receive_handles(sent, inputs, "cpu")
    assert torch.equal(got[0], torch.cat([a, b])[1:4]) and got[1] == 7
    refs = []
    sent = send_handles(both.narrow(0, 4, 2), refs)
    assert refs == ["ref-b"]
    assert torch.equal(receive_handles(sent, (pack(b),), "cpu"), b[1:3])
    refs = []
    sent = send_handles(Handle("ref-pair")[1], refs)
    assert torch.equal(receive_handles(sent, (pack((a, b)),), "cpu"), b)
    # sent to the actor it ran in: no ref (no wait for Ray), read from what the actor kept
    here = Handle.joined((Handle("ref-a", rows=3, home="A", call=7),
                          Handle("ref-b", rows=5, home="B", call=8)), 0)
    refs = []
    sent = send_handles(here.narrow(0, 1, 3), refs, home="A")
    assert refs == ["ref-b"]
    got = receive_handles(sent, (pack(b),), "cpu", kept={7: a})
    assert torch.equal(got, torch.cat([a, b])[1:4])
    failed = Failed(ValueError("the producer's own error"), origin=7)
    with pytest.raises(Inherited) as raised:  # its reader fails with the producer's failure
        receive_handles(send_handles(here.parts[0], [], home="A"), (), "cpu", kept={7: failed})
    assert raised.value.failed is failed
    with pytest.raises(Inherited) as raised:  # the same, from another actor's result
        receive_handles(send_handles(Handle("ref-x"), []), (failed,), "cpu")
    assert raised.value.failed is failed
    unpicklable = sendable(ValueError(lambda: None))  # still told, as text
    assert isinstance(unpicklable, RuntimeError) and "ValueError" in str(unpicklable)
    assert sendable(failed.error) is failed.error
    with pytest.raises(RuntimeError, match="not kept in this actor"):
        receive_handles(send_handles(here.parts[0], [], home="A"), (), "cpu", kept={})


def test_two_ray_servers_share_a_private_instance_until_the_last_one_closes(llama):
    """Two servers in one process, no Ray running (before the cluster fixture starts one):
    they share the private instance the first starts (a server asking for a cluster then is
    a clear error); closing the first leaves the second serving; closing the second stops
    it."""
    assert not ray.is_initialized()
    prompt = prompts(3, 1, 12)[0]
    options = {"backend": "ray", "actors": "device", "devices": fxscale.Devices(count=1)}
    first = fxscale.serve(llama, **options)
    try:
        with pytest.raises(ValueError, match="a process has one Ray connection"):
            fxscale.serve(llama, **options, address="127.0.0.1:1")  # nothing started
        with fxscale.serve(llama, **options) as second:
            first.close()
            assert ray.is_initialized()
            got = second.generate(torch.tensor([prompt]), max_new_tokens=6,
                                  ignore_eos=True).result(timeout=60)
    finally:
        first.close()
    assert got == greedy(llama, prompt, 6)
    assert not ray.is_initialized()


def test_steps_through_a_compiled_graph_on_one_node_equal_greedy_and_survive_a_kill(llama):
    """compiled_graph=True on the private single-node instance (before the cluster fixture
    starts one), attention on one device (actor) and the dense groups on the other, two
    micro-batches (one in the graph, the other as plain calls beside it): once a step shape
    recurs, a graph compiles beside the steps and later steps run through it, equal to
    greedy; an idle graph is torn down; an actor killed while the graph is live breaks it,
    the step runs again on the plain path (the requests of both attention replicas it hosted
    recomputed, the second one scaled up beside the first) and a graph is compiled again
    over the replacement."""
    assert not ray.is_initialized()
    batch = prompts(6, 8, 40)
    new = 96  # steps enough for a graph to compile beside them on a loaded machine
    expected = [greedy(llama, p, new) for p in batch]

    def graph() -> dict:
        return server.stats()["engine"]["compiled_graph"]

    def run(requests: list[list[int]], kill: bool = False) -> list[list[int]]:
        through = graph()["steps"]
        futures = [server.generate(torch.tensor([p]), max_new_tokens=new, ignore_eos=True)
                   for p in requests]
        wait_for(lambda: graph()["steps"] > through)  # steps run through a graph
        if kill:
            ray.kill(server.executor.hosts[0][0])  # device 0: the attention groups
        return [f.result(timeout=120) for f in futures]

    with fxscale.serve(llama, backend="ray", actors="device", devices=fxscale.Devices(count=2),
                       plan=split_plan((0,), (1,), 2), compiled_graph=True,
                       micro_batches=2) as server:
        # the private loopback instance (a Ray call before connecting once started another)
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert run(batch[:4]) == expected[:4]
        assert graph()["compiled"] == 1
        wait_for(lambda: not graph()["live"])  # idle: its actor loops would poll
        server.scale("model.layers.*#1/attention", 2)  # on device 0: the same actor
        assert run(batch[4:], kill=True) == expected[4:]  # both attention replicas lost
        assert run(batch[:4]) == expected[:4]  # through a graph over the replacement
        stats = server.stats()
    after = stats["engine"]["compiled_graph"]
    assert after["compiled"] >= 3 and after["broken"] >= 1 and after["torn_down"] >= 2
    assert after["failed_compiles"] == 0
    assert len(nodes_of(stats, True) | nodes_of(stats, False)) == 1
    assert stats["engine"]["recomputed_replicas"] >= 2  # each replica the actor hosted
    assert stats["requests"]["finish_reasons"]["error"] == 0
    assert not ray.is_initialized()


def wait_for(condition, timeout_s: float = 30.0) -> None:
    """Poll until condition() holds (an error after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_operator_groups_as_actors_equal_greedy_while_scaling_and_losing_actors(cluster,
                                                                                 llama):
    """A plan puts the attention groups on one device (node) and the dense groups on the
    other. 32 requests at once: a dense group and the attention groups scale up while they
    run, a dense actor and an attention actor are killed mid-run (the dense call runs again
    on its replacement, the attention replica's requests are recomputed), then both scale
    down; every request equals greedy, and every replica stays on its plan's node."""
    batch = prompts(1, 32, 60)
    with fxscale.serve(llama, backend="ray", devices=fxscale.Devices(count=2),
                       plan=split_plan((0,), (1,), 2)) as server:
        stats = server.stats()
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        attention, dense = nodes_of(stats, True), nodes_of(stats, False)
        assert len(attention) == len(dense) == 1 and attention | dense == node_ids
        for group in stats["groups"].values():  # each replica's process is its own
            assert len({w["process"] for w in group["locations"].values()}) == \
                group["replicas"]
        futures = [server.generate(torch.tensor([p]), max_new_tokens=24, ignore_eos=True)
                   for p in batch[:16]]
        server.scale("model.layers.0#0/gemm", 2)
        server.scale("model.layers.*#1/attention", 2)
        futures += [server.generate(torch.tensor([p]), max_new_tokens=24, ignore_eos=True)
                    for p in batch[16:]]
        pools = server.pools
        ray.kill(pools["model.layers.1#2/gemm"].replicas[0].actor)
        ray.kill(pools["model.layers.0#1/attention"].replicas[0].actor)
        server.scale("model.layers.0#0/gemm", 1)
        server.scale("model.layers.*#1/attention", 1)
        outputs = [f.result(timeout=120) for f in futures]
        server.scale("model.layers.0#0/gemm", 2)
        stats = server.stats()
    assert (nodes_of(stats, True), nodes_of(stats, False)) == (attention, dense)
    assert stats["groups"]["model.layers.0#0/gemm"]["replicas"] == 2
    assert outputs == [greedy(llama, p, 24) for p in batch]
    assert stats["engine"]["recomputed_replicas"] >= 1  # the lost replica's requests
    assert stats["groups"]["model.layers.1#2/gemm"]["retries"] >= 1
    assert stats["requests"]["finish_reasons"]["error"] == 0


def test_a_step_shape_is_its_actors_and_reads_and_only_its_own_results():
    """Two steps with the same actors and reads have one shape (another read, another
    shape); a run or an output reading a result from outside the step has none; a run's
    inputs are picked from the runs it reads (a call's result at 2 i of its run's output);
    a call that failed (its seconds not a number) means the step did not all run."""
    def step(reads_second: int):
        first = Run("actor-a", "A", submitted=[Submitted(*[None] * 6) for _ in range(2)])
        second = Run("actor-b", "B", submitted=[Submitted(*[None] * 6)])
        second.refs = [first.submitted[reads_second].result]
        third = Run("actor-a", "A", submitted=[Submitted(*[None] * 6)],
                    refs=[second.submitted[0].result, first.submitted[0].result])
        return [first, second, third]

    runs = step(1)
    shape, where = step_shape(runs, [runs[2].submitted[0].result])
    assert shape == step_shape(step(1), [])[0] != step_shape(step(0), [])[0]
    assert shape.homes == ("A", "B", "A") and shape.reads == ((), ((0, 1),), ((1, 0), (0, 0)))
    assert shape.feeds[2] == ([1, 0], [(0, 0), (1, 0)]) and shape.feeds[1] == ([0], [(0, 2)])
    assert where[id(runs[1].submitted[0].result)] == (1, 0)
    foreign = Submitted(*[None] * 6).result
    assert step_shape(runs, [foreign]) is None
    runs[1].refs.append(foreign)
    assert step_shape(runs, []) is None
    assert all_ran([("x", 0.1, "y", 0.2)]) and not all_ran([("x", 0.1), (Failed(None, 1),) * 2])


def test_a_compiled_graph_is_not_built_across_nodes_and_steps_stay_greedy(cluster, llama):
    """compiled_graph=True with attention on one node and the dense groups on the other,
    two micro-batches: no graph is compiled across nodes (Ray 2.60's raylet crashed tearing
    such a graph down), every step takes the plain path, and outputs equal greedy through
    a killed attention actor (its requests recomputed)."""
    batch = prompts(6, 4, 40)
    expected = [greedy(llama, p, 24) for p in batch]
    with fxscale.serve(llama, backend="ray", actors="device", devices=fxscale.Devices(count=2),
                       plan=split_plan((0,), (1,), 2), compiled_graph=True,
                       micro_batches=2) as server:
        futures = [server.generate(torch.tensor([p]), max_new_tokens=24, ignore_eos=True)
                   for p in batch]
        ray.kill(server.executor.hosts[0][0])  # device 0: the attention groups
        assert [f.result(timeout=120) for f in futures] == expected
        stats = server.stats()
    graph = stats["engine"]["compiled_graph"]
    assert graph["compiled"] == 0 and graph["steps"] == 0 and graph["plain_steps"] > 0
    assert nodes_of(stats, True) != nodes_of(stats, False)
    assert stats["engine"]["recomputed_replicas"] >= 1
    assert stats["requests"]["finish_reasons"]["error"] == 0


def test_devices_per_node_are_packed_and_a_plan_keeps_attention_on_its_node(cluster, llama):
    """Four devices, two per node: devices 0-1 share one node and 2-3 the other; a plan
    puts the attention groups on devices 0-1 and the dense ones on 2-3, so on two nodes."""
    prompt = prompts(5, 1, 20)[0]
    with fxscale.serve(llama, backend="ray", actors="device",
                       devices=fxscale.Devices(count=4, per_node=2),
                       plan=split_plan((0, 1), (2, 3), 4)) as server:
        got = server.generate(torch.tensor([prompt]), max_new_tokens=6,
                              ignore_eos=True).result(timeout=60)
        server.scale("model.layers.*#1/attention", 2)  # the second lands on device 1
        stats = server.stats()
    node = {where["device"]: where["node"] for group in stats["groups"].values()
            for where in group["locations"].values()}
    assert sorted(node) == [0, 1, 2, 3]
    assert node[0] == node[1] != node[2] == node[3]
    assert nodes_of(stats, True) == {node[0]} and nodes_of(stats, False) == {node[2]}
    assert got == greedy(llama, prompt, 6)


def test_soak_with_kills_and_scaling_loses_and_duplicates_nothing(cluster, llama):
    """500 streamed requests to model replicas (one actor per device hosting them) while
    replicas are added, removed and killed: every request gets exactly its greedy tokens,
    once."""
    unique = prompts(2, 25, 30)
    expected = [greedy(llama, p, 6) for p in unique]
    with fxscale.serve(llama, policy="model", backend="ray", actors="device",
                       devices=fxscale.Devices(count=2), replicas=2) as server:
        pool = server.pools["model"]
        events = {100: lambda: server.scale("*", 3), 200: lambda: ray.kill(pool.replicas[0].actor),
                  300: lambda: server.scale("*", 2),
                  400: lambda: ray.kill(pool.replicas[max(pool.replicas)].actor)}
        streams = []
        for i in range(500):  # submitting waits for room: events land while requests run
            events.get(i, lambda: None)()
            streams.append((i % 25, server.generate(torch.tensor([unique[i % 25]]),
                                                    max_new_tokens=6, ignore_eos=True,
                                                    stream=True)))
        received = [(i, list(stream)) for i, stream in streams]
        stats = server.stats()
    assert [tokens for _, tokens in received] == [expected[i] for i, _ in received]
    assert stats["requests"]["completed"] == 500
    assert stats["engine"]["recomputed_replicas"] >= 1
    assert stats["requests"]["finish_reasons"]["error"] == 0


def test_consecutive_calls_in_one_actor_are_one_task(cluster, llama, monkeypatch):
    """One actor per device, attention on one device and the dense groups on the other: a
    step's calls go as runs, one Ray task per run of consecutive calls to one actor (two runs
    in a row never go to the same actor), fewer tasks than calls; with `fuse_runs=False`
    every call is its own task. Both equal greedy under concurrent requests."""
    runs: list[tuple[int, int, str]] = []  # (lane, step, actor) of each task sent
    calls: list[int] = []
    send = Ledger.send

    def counted(ledger: Ledger) -> None:
        if ledger.run is not None:
            runs.append((ledger.lane, ledger.step, ledger.run.home))
            calls.append(len(ledger.run.calls))
        send(ledger)

    monkeypatch.setattr(Ledger, "send", counted)
    batch = prompts(4, 6, 30)
    expected = [greedy(llama, p, 8) for p in batch]
    tasks: dict[bool, tuple[int, int]] = {}
    with fxscale.serve(llama, backend="ray", actors="device", devices=fxscale.Devices(count=2),
                       plan=split_plan((0,), (1,), 2)) as server:
        for fuse in (True, False):
            server.executor.fuse_runs = fuse
            runs.clear()
            calls.clear()
            futures = [server.generate(torch.tensor([p]), max_new_tokens=8, ignore_eos=True)
                       for p in batch]
            assert [f.result(timeout=120) for f in futures] == expected
            tasks[fuse] = (len(runs), sum(calls))
            if fuse:
                assert all(a[:2] != b[:2] or a[2] != b[2] for a, b in zip(runs, runs[1:]))
            else:
                assert set(calls) == {1}
    (fused, fused_calls), (single, single_calls) = tasks[True], tasks[False]
    assert fused < fused_calls and single == single_calls


BROKEN = "model.layers.0#2/gemm"  # a group whose output later groups read


def test_a_group_that_raises_in_its_actor_fails_its_requests_and_the_engine_runs_on(cluster,
                                                                                   llama):
    """A group function raising in its actor (one process hosting every group): the step
    runs once more, then its request fails with an error naming the group, and the groups
    that read its output do not count a failure of their own; with the function mended,
    the next request is greedy's."""
    prompt = prompts(3, 1, 20)[0]
    with fxscale.serve(llama, backend="ray", actors="device",
                       devices=fxscale.Devices(count=1)) as server:
        call = next(c for c in server.runner.calls if c.pool.name == BROKEN)
        inner, call.inner = call.inner, torch.nn.Linear(1, 1)  # raises on the group's inputs
        with pytest.raises(Exception, match=f"group '{BROKEN}' failed"):
            server.generate(torch.tensor([prompt]), max_new_tokens=4).result(timeout=60)
        call.inner = inner
        mended = server.generate(torch.tensor([prompt]), max_new_tokens=4,
                                 ignore_eos=True).result(timeout=60)
        stats = server.stats()
    assert mended == greedy(llama, prompt, 4)
    assert stats["groups"][BROKEN]["retries"] == 2  # the step and its second run
    assert sum(g["retries"] for g in stats["groups"].values()) == 2  # none downstream
    assert stats["requests"]["finish_reasons"]["error"] == 1


def test_ray_options_without_the_ray_backend_are_clear_errors(llama):
    """Nothing starts: the error names what to change."""
    with pytest.raises(ValueError, match="need backend='ray'"):
        fxscale.serve(llama, address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="need backend='ray'"):
        fxscale.serve(llama, actors="device")
    with pytest.raises(ValueError, match="need backend='ray'"):
        fxscale.serve(llama, pass_handles=False)
    with pytest.raises(ValueError, match="need backend='ray'"):
        fxscale.serve(llama, compiled_graph=True)
    with pytest.raises(ValueError, match="needs policy='operator' and pass_handles=True"):
        fxscale.serve(llama, policy="model", backend="ray", compiled_graph=True)
    with pytest.raises(ValueError, match=r"backend must be one of \('local', 'ray'\)"):
        fxscale.serve(llama, backend="cluster")
