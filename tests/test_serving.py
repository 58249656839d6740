"""fxscale.serve: per-group replica pools under concurrency, live scaling, faults, bad input."""
from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import failing, groups_on, split_plan

import fxscale
from fxscale.contracts.group_graph import kind_name
from fxscale.models import zoo
from fxscale.runtime.executors.local import GroupError
from fxscale.serving import server as server_module


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", layers=2, hidden=64).model.eval()


@pytest.fixture(scope="module")
def server(llama):
    with fxscale.serve(llama, policy="operator", budget=2, slo=fxscale.SLO(5.0, 1.0)) as s:
        yield s


def prompt(seed: int, length: int | None = None) -> torch.Tensor:
    """Fresh random token ids (vocabulary 256 in the zoo Llama)."""
    g = torch.Generator().manual_seed(seed)
    n = length or random.Random(seed).randint(2, 12)
    return torch.randint(3, 256, (1, n), generator=g)


def eager_tokens(model, ids, new):
    """Hugging Face greedy generate: the reference."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:].tolist()


def test_sixteen_clients_with_random_scale_events_match_eager(server, llama):
    # the references run first: Hugging Face's `kernels` hub layer keeps a context variable
    # that is not safe in one thread while another compiles (torch's is_compiling() flag is
    # process-wide), and the server compiles while these requests flow
    with torch.no_grad():
        expected = [eager_tokens(llama, prompt(1000 + i), 6) if i % 2 else
                    llama(prompt(1000 + i), use_cache=False).logits for i in range(64)]

    def client(i):
        ids = prompt(1000 + i)
        if i % 2:
            return server.generate(ids, max_new_tokens=6).result(), expected[i]
        return server.submit(ids).result(), expected[i]

    rng = random.Random(0)
    with ThreadPoolExecutor(16) as clients:
        futures = [clients.submit(client, i) for i in range(64)]
        while not all(f.done() for f in futures):  # scale while requests flow
            server.scale(rng.choice(sorted(server.pools)), rng.randint(1, 3))
            time.sleep(0.01)
        for i, future in enumerate(futures):
            got, expected = future.result()
            if i % 2:
                assert got == expected, f"request {i}: generate differs from eager"
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    stats = server.stats()
    assert stats["engine"]["requests_per_step"] > 1, "steps never batched concurrent requests"
    assert stats["requests"]["completed"] >= 64  # attainment is timing: see the test below
    for name, group in stats["groups"].items():
        assert group["completed"] > 0 and group["replicas"] >= 1, name


def test_slo_attainment_is_the_share_of_generated_requests_within_the_slo(server):
    """SLOs every request meets, that every first token misses, and that this request's
    token gaps miss (TTFT and TBT both count)."""
    server.generate(prompt(21, 4), max_new_tokens=3, ignore_eos=True).result()
    slo = server.slo
    try:
        server.slo = fxscale.SLO(ttft=1e9, tbt=1e9)
        assert server.stats()["requests"]["slo_attainment"] == 1.0
        server.slo = fxscale.SLO(ttft=1e-12, tbt=1e9)  # a first token takes longer than that
        assert server.stats()["requests"]["slo_attainment"] == 0.0
        server.slo = fxscale.SLO(ttft=1e9, tbt=1e-12)  # so do its two later tokens' gaps
        assert server.stats()["requests"]["slo_attainment"] < 1.0
    finally:
        server.slo = slo


def test_every_group_has_a_pool_and_new_replicas_copy_only_their_weights(server, llama):
    assert {"model.layers.0#1/attention", "model.layers.1#2/gemm", "top#1/gemm"} <= \
        set(server.pools)
    server.scale("model.layers.1#2/gemm", 3)
    server.generate(prompt(5), max_new_tokens=2).result()
    stats = server.stats()["groups"]
    mlp = stats["model.layers.1#2/gemm"]

    def own(layer):
        return sum(p.numel() * 4 for p in (*layer.self_attn.o_proj.parameters(),
                                            *layer.post_attention_layernorm.parameters(),
                                            *layer.mlp.parameters()))

    assert mlp["replicas"] == 3 and mlp["weight_bytes_per_replica"] == own(llama.model.layers[1])
    # a replica that copied its weights on first use (created before any call) counts them too
    assert stats["model.layers.0#2/gemm"]["weight_bytes_per_replica"] == \
        own(llama.model.layers[0])
    assert stats["model.layers.1#1/attention"]["weight_bytes_per_replica"] == 0
    server.scale("*", 1)


def test_streaming_yields_tokens_as_generate_returns_them(server, llama):
    ids = prompt(7, 5)
    assert list(server.generate(ids, max_new_tokens=5, stream=True)) == eager_tokens(llama, ids, 5)


def test_a_failing_replica_is_retried_once_then_reported(server, llama):
    pool = server.pools["model.layers.0#2/gemm"]
    pool.scale(2)
    ids = prompt(11, 6)   # 7 tokens with the step's padding: a slice on each replica
    first = failing(pool.replicas[min(pool.replicas)], 1)  # its slice is retried elsewhere
    with torch.no_grad():
        torch.testing.assert_close(server.submit(ids).result(), llama(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    assert first == [0]  # it did fail once
    broken = [failing(r, math.inf) for r in pool.replicas.values()]
    with pytest.raises(GroupError, match=r"group 'model\.layers\.0#2/gemm' failed"):
        server.submit(ids).result()
    for left in broken:
        left[0] = 0
    assert pool.stats()["retries"] >= 2
    assert server.generate(ids, max_new_tokens=3).result() == eager_tokens(llama, ids, 3)
    pool.scale(1)


def test_a_removed_replica_loses_nothing(server, llama):
    pool = server.pools["model.layers.1#0/gemm"]
    pool.scale(3)
    with ThreadPoolExecutor(8) as clients:
        futures = [clients.submit(lambda i=i: server.generate(prompt(200 + i), 4).result())
                   for i in range(16)]
        for replicas in (1, 3, 2, 1):  # replicas leave and join while requests flow
            server.scale("model.layers.1#0/gemm", replicas)
            server.scale("model.layers.*#1/attention", replicas)
        results = [f.result() for f in futures]
    assert results == [eager_tokens(llama, prompt(200 + i), 4) for i in range(16)]
    assert pool.stats()["replicas"] == 1


def test_bad_requests_fail_at_submit_and_affect_nothing(server, llama):
    with pytest.raises(ValueError, match="torch.long"):
        server.submit(torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"shape \[length\] or \[1, length\]"):
        server.submit(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        server.submit(torch.tensor([[1, 999]]))
    limit = llama.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context of {limit}"):
        server.generate(prompt(3, 4), max_new_tokens=limit)
    with pytest.raises(ValueError, match="no group matches"):
        server.scale("no/such/group", 2)
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        server.scale("top#1/gemm", 0)
    assert server.generate(prompt(9, 4), 3).result() == eager_tokens(llama, prompt(9, 4), 3)


def test_back_pressure_raises_a_clear_overload_error(llama):
    with fxscale.serve(llama, budget=1, max_pending=1, submit_timeout_s=0.05) as server:
        gate = threading.Event()
        original = server.runner.run

        def slow(*args):
            gate.wait(5)
            return original(*args)

        server.runner.run = slow
        first = server.submit(prompt(1))
        with pytest.raises(fxscale.OverloadError, match="1 requests in flight"):
            server.submit(prompt(2))
        gate.set()
        server.runner.run = original
        assert first.result().shape[-1] == 256
    with pytest.raises(RuntimeError, match="server is closed"):
        server.submit(prompt(3))


def test_model_policy_serves_the_whole_model_as_one_group(llama):
    with fxscale.serve(llama, policy="model", budget=2) as server:
        assert len(server.pools) == 1  # one group: the whole model
        ids = prompt(21)
        assert server.generate(ids, max_new_tokens=5).result() == eager_tokens(llama, ids, 5)
    with pytest.raises(ValueError, match="policy must be one of"):
        fxscale.serve(llama, policy="phase")


def test_a_plan_from_the_planner_deploys_on_a_server(server, tmp_path, monkeypatch):
    """The planner's operator plan for a Llama, through its JSON, sets the replicas of the
    server's groups of the same kinds (and nothing else); a plan of another policy is refused."""
    from fxscale.contracts.plan import Plan
    from fxscale.models.presets import preset_service
    from fxscale.runtime.planner import SLO, Workload, plan
    from fxscale.runtime.traces import load_trace

    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    service = preset_service("llama-2-70b", "h100", layers=2)
    work = Workload.from_requests(load_trace("azure-conv").requests, 200.0)
    planned = plan(service, work, SLO(2.0, 0.1), "operator")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(planned.to_dict()))
    loaded = Plan.from_dict(json.loads(path.read_text()), str(path))
    before = {name: pool.target for name, pool in server.pools.items()}
    try:
        with pytest.warns(UserWarning, match="its devices are not"):  # planned for 2
            applied = server.apply(loaded)
        wanted = {g.kind: g.replicas for g in planned.groups}
        assert applied and set(applied) <= set(server.pools)
        for name, replicas in applied.items():
            assert replicas == wanted[kind_name(name)], name
            assert server.pools[name].target == replicas
        assert max(applied.values()) > 1  # at 200 req/s the dense pools have two replicas
        ids = prompt(31)
        assert server.generate(ids, max_new_tokens=4).result() == eager_tokens(
            server.model, ids, 4)
        with pytest.raises(ValueError, match="the plan is for policy 'model'"):
            server.apply(plan(service, work, SLO(2.0, 0.1), "model"))
    finally:
        for name, replicas in before.items():
            server.scale(name, replicas)


def test_a_plan_pins_its_groups_to_the_devices_it_names(llama):
    """A plan putting attention on one device and the dense groups on the other: a running
    server's replicas move there (an attention replica drains its request first), replicas
    added later land there too, outputs stay equal to eager; a plan for more devices than
    the server has sets replica counts only, with a warning."""
    ids = [prompt(40 + i) for i in range(3)]
    want = [eager_tokens(llama, i, 24) for i in ids]  # before the server compiles (above)
    with fxscale.serve(llama, policy="operator", devices=fxscale.Devices(count=2)) as server:
        attention = {n for n, p in server.pools.items() if p.stateful}
        dense = set(server.pools) - attention
        server.apply(split_plan((1,), (0,), 2))
        assert groups_on(server) == [dense, attention]
        running = server.generate(ids[0], max_new_tokens=24)
        server.apply(split_plan((0,), (1,), 2))
        later = [server.generate(i, max_new_tokens=24) for i in ids[1:]]
        assert [f.result(timeout=60) for f in [running] + later] == want
        deadline = time.monotonic() + 30
        while groups_on(server) != [attention, dense] and time.monotonic() < deadline:
            time.sleep(0.05)  # the drained attention replica goes at the engine's next step
        assert groups_on(server) == [attention, dense]
        assert server.stats()["devices"]["pins"] == {"*attention": [0], "*gemm": [1],
                                                     "*embedding": [1]}
        server.scale("model.layers.0#2/gemm", 2)
        assert groups_on(server) == [attention, dense]
        with pytest.warns(UserWarning, match="on 3 devices and this server has 2"):
            server.apply(split_plan((0,), (2,), 3, replicas=1))
        assert server.pools["model.layers.0#2/gemm"].target == 1
        assert groups_on(server) == [attention, dense]


def model_plan(engines: int, devices: tuple[int, ...], total: int):
    """A model Plan of `engines` whole-model engines occupying `devices` (of `total`)."""
    from fxscale.contracts.plan import EngineCount, GroupPlacement, LockstepShape, Plan

    rows = (GroupPlacement("*", "*", "model", engines, devices=devices),)
    return Plan("model", "test", "cpu", 1.0, (EngineCount(LockstepShape("model", 1), engines),),
                total, 0.0, 0.0, 0.0, 0.0, 0.0, 64, rows)


def test_a_model_plan_pins_the_model_replicas_to_its_devices(llama):
    """A model plan whose engines occupy devices 1-2 of 3: the replica on device 0 finishes
    its request and goes, the plan's two replicas land on 1 and 2, a later one there too;
    served with the plan from the start, none is ever on device 0; outputs stay equal to
    eager."""
    ids = [prompt(60 + i) for i in range(3)]
    want = [eager_tokens(llama, i, 16) for i in ids]
    with fxscale.serve(llama, policy="model", devices=fxscale.Devices(count=3)) as server:
        assert groups_on(server) == [{"model"}, set(), set()]
        running = server.generate(ids[0], max_new_tokens=16)
        assert server.apply(model_plan(2, (1, 2), 3)) == {"model": 2}
        later = [server.generate(i, max_new_tokens=16) for i in ids[1:]]
        assert [f.result(timeout=60) for f in [running] + later] == want
        deadline = time.monotonic() + 30
        while groups_on(server)[0] and time.monotonic() < deadline:
            time.sleep(0.05)  # the moved replica goes once its request is done
        assert groups_on(server) == [set(), {"model"}, {"model"}]
        assert server.stats()["devices"]["pins"] == {"*": [1, 2]}
        server.scale("*", 3)
        assert groups_on(server)[0] == set() and len(server.engines) == 3
    with fxscale.serve(llama, policy="model", devices=fxscale.Devices(count=3),
                       plan=model_plan(2, (1, 2), 3)) as server:  # pinned from the start
        assert groups_on(server) == [set(), {"model"}, {"model"}]
        assert server.generate(ids[0], max_new_tokens=16).result(timeout=60) == want[0]


def test_bf16_serving_stays_within_a_stated_tolerance_of_fp32(llama):
    """dtype="bfloat16" serves a bf16 copy of the weights (the user's model stays fp32): the
    logits stay within 3% of fp32 eager (of the largest logit), and a bad dtype is named."""
    ids = prompt(41, 12)
    with torch.no_grad():
        expected = llama(ids).logits
    with fxscale.serve(llama, budget=1, dtype="bfloat16") as server:
        got = server.submit(ids).result()
        assert got.dtype == torch.bfloat16
        assert len(server.generate(ids, max_new_tokens=3).result()) >= 1
    assert next(llama.parameters()).dtype == torch.float32
    error = float((got.float() - expected).abs().max() / expected.abs().max())
    assert error <= 0.03, error
    with pytest.raises(ValueError, match="dtype must be one of"):
        fxscale.serve(llama, budget=1, dtype="int8")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition (an error if it is not there)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels} in the exposition")


def test_prometheus_endpoint_is_opt_in_and_on_loopback(llama):
    import urllib.request

    with fxscale.serve(llama, budget=1, metrics_port=0) as server:
        assert server.metrics.server_address[0] == "127.0.0.1"
        port = server.metrics.server_address[1]
        server.generate(prompt(31), max_new_tokens=3).result()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = text.decode()
        model = {"model_name": "LlamaForCausalLM"}
        assert metric(text, "fxscale:group_replicas", group="model.layers.0#1/attention",
                      **model) == 1
        # one request of three tokens, ended by its length: warm-up not counted
        assert metric(text, "fxscale:request_success_total", finished_reason="length",
                      **model) == 1
        assert metric(text, "fxscale:generation_tokens_total", **model) == 3
        assert metric(text, "fxscale:time_to_first_token_seconds_count", **model) == 1
        assert metric(text, "fxscale:inter_token_latency_seconds_count", **model) == 2
        assert metric(text, "fxscale:kv_cache_usage_perc", **model) == 0
        calls = server.stats()["groups"]["top#1/gemm"]["completed"]
        assert calls == 3  # this request's prefill and two decode steps
        assert server.stats()["requests"]["completed"] == 1
        assert metric(text, "fxscale:group_call_latency_seconds_bucket", group="top#1/gemm",
                      le="+Inf", **model) == calls
        assert "fxscale:group_batch_mean" in text
    with fxscale.serve(llama, budget=1) as server:
        assert server.metrics is None


def test_soak_two_thousand_requests_with_faults_and_scaling(llama):
    """A time-scaled slice of the Azure conversation trace (lengths scaled to the small
    model) on a KV cache small enough that requests are preempted: injected failures, scale
    events and cancellations (every 50th request, some still queued, some mid-stream) while
    it flows. Nothing lost, nothing duplicated, every other output equal to eager, every
    block freed."""
    from fxscale.runtime.traces.loaders import load_trace

    trace = load_trace("azure-conv", duration_s=450).requests[:2000]
    assert len(trace) == 2000
    rng = random.Random(42)
    requests = [(i, prompt(5000 + i, max(2, min(48, r.prompt_tokens // 32))),
                 max(1, min(4, r.output_tokens // 64))) for i, r in enumerate(trace)]
    results: dict[int, object] = {}
    done = threading.Event()

    faulty: list[str] = []  # the pools faults are injected in (the others are scaled)

    def chaos(server):
        scaled = [n for n in sorted(server.pools) if n not in faulty]
        while not done.is_set():
            if rng.random() < 0.5:
                server.scale(rng.choice(scaled), rng.randint(1, 3))
            else:  # one fault at a time per pool, none while one is being retried: its
                # slice is retried on the other replica
                replicas = list(server.pools[rng.choice(faulty)].replicas.values())
                last = max(getattr(r, "fault_at", 0.0) for r in replicas)
                if not any(getattr(r, "faults", [0])[0] for r in replicas) and \
                        time.monotonic() - last > 0.05:
                    failing(rng.choice(replicas), 1)
            time.sleep(0.005)

    cancelled = set(range(0, 2000, 50))
    with fxscale.serve(llama, budget=2, max_pending=64, kv_cache_tokens=512) as server:
        faulty += ["model.layers.0#0/gemm", "model.layers.1#2/gemm"]  # two replicas each
        for name in faulty:
            server.scale(name, 2)
        monkey = threading.Thread(target=chaos, args=(server,), daemon=True)
        monkey.start()
        futures = {}
        start = time.perf_counter()
        try:
            for i, ids, new in requests:
                futures[i] = server.generate(ids, max_new_tokens=new, timeout_s=60)
                if i - 3 in cancelled:  # three requests later: queued or running by now
                    futures[i - 3].cancel()
            for i, future in futures.items():
                if i not in cancelled or not future.cancelled():  # finished before its cancel
                    results[i] = future.result(timeout=120)
        finally:
            done.set()
            monkey.join()
        elapsed = time.perf_counter() - start
        retries = sum(p.stats()["retries"] for p in server.pools.values())
        engine = server.stats()["engine"]
    assert retries > 0  # failures were injected and recovered from
    assert engine["preemptions"] > 0 and engine["kv_blocks"]["used"] == 0
    assert sum(futures[i].cancelled() for i in cancelled) > len(cancelled) // 2
    assert sorted(results) == sorted(i for i in range(2000)   # none lost, none duplicated
                                     if i not in cancelled or not futures[i].cancelled())
    wrong = [i for i, ids, new in requests if i in results
             and results[i] != eager_tokens(llama, ids, new)]
    assert not wrong, f"{len(wrong)} outputs differ from eager, e.g. request {wrong[:3]}"
    assert elapsed < 600  # bounded: the test stops by itself


# ---- lifecycle: servers own their compiled code and process settings ------------------------
def test_six_models_served_in_one_process_are_each_fully_pooled_and_released():
    """Dynamo's recompile limit is per code object: servers of one model class must not share
    it. Each server pools every group, scales, matches eager; an unrelated compile keeps
    working beside and after them; a closed server's weight copies are freed."""
    import gc
    import weakref

    unrelated = torch.compile(lambda x: x.sin() * 2, backend="eager")
    copies = []
    for k in range(6):
        model = zoo.build("llama", layers=2, hidden=64, seed=k).model.eval()
        ids = prompt(50 + k)
        expected = eager_tokens(model, ids, 4)
        with fxscale.serve(model, budget=1) as server:
            assert server.generate(ids, max_new_tokens=4).result() == expected
            names = {g.name for graph in server.group_graphs for g in graph.groups}
            groups = server.stats()["groups"]
            assert set(groups) == names and len(names) == 8, f"server {k}: {sorted(groups)}"
            assert all(g["completed"] > 0 for g in groups.values()), f"server {k}"
            assert server.scale("model.layers.*#1/attention", 2) == [
                "model.layers.0#1/attention", "model.layers.1#1/attention"]
            x = torch.randn(k + 2, dtype=torch.float64 if k % 2 else torch.float32)
            torch.testing.assert_close(unrelated(x), x.sin() * 2)  # a recompile, while serving
            copies += [weakref.ref(t) for pool in server.pools.values()
                       for replica in pool.replicas.values() for t in replica.state.values()]
        y = torch.randn(3, k + 1)
        torch.testing.assert_close(unrelated(y), y.sin() * 2)
    del model, server
    gc.collect()
    assert copies and not [ref for ref in copies if ref() is not None]


def test_a_failed_start_changes_no_process_setting_and_servers_share_them(llama):
    import socket
    import sys

    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            fxscale.serve(llama, budget=1, metrics_port=busy.getsockname()[1])
    assert (torch.get_num_threads(), sys.getswitchinterval()) == (threads, interval)
    f = torch.compile(lambda x: x + 1, backend="eager")
    for dtype in (torch.float32, torch.float64):  # recompiles: no stance was left behind
        f(torch.ones(2, dtype=dtype))
    first = fxscale.serve(llama, budget=1)
    second = fxscale.serve(llama, budget=1)
    assert torch.get_num_threads() == 1
    first.close()
    assert torch.get_num_threads() == 1  # the second server still runs
    assert second.generate(prompt(3), max_new_tokens=2).result()
    second.close()
    assert (torch.get_num_threads(), sys.getswitchinterval()) == (threads, interval)


def test_replicas_are_capped_with_a_clear_error(server, monkeypatch):
    threads = threading.active_count()
    with pytest.raises(ValueError, match="at most 64 per group"):
        server.scale("model.layers.0#1/attention", 10 ** 9)
    monkeypatch.setattr(server_module, "MAX_REPLICAS", 10)
    with pytest.raises(ValueError, match=r"8 groups resized would make 16 replicas in all, "
                                         r"more than 10"):
        server.scale("*", 2)
    assert threading.active_count() == threads


def test_close_ends_the_wait_of_clients_not_yet_admitted(llama):
    """Two requests admitted, four waiting: close() answers the four at once with
    ServerClosedError, finishes the two, and leaves no slot counted."""
    server = fxscale.serve(llama, budget=1, max_pending=2, submit_timeout_s=120)
    outcomes: list = []

    def client(i):
        try:
            outcomes.append(len(server.generate(prompt(i), max_new_tokens=4,
                                                ignore_eos=True).result()))
        except Exception as err:  # noqa: BLE001 - the outcome is what the test checks
            outcomes.append(err)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    with server.placement.slots[0]:  # budget 1 (one device, one slot): no group call runs while the test holds it
        for thread in clients:
            thread.start()
        while server.in_flight < 2:
            time.sleep(0.01)
        closer = threading.Thread(target=server.close)
        closer.start()  # it waits for the two admitted requests, which wait for the slot
        deadline = time.monotonic() + 60
        while len(outcomes) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(outcomes) == 4 and all(isinstance(o, fxscale.ServerClosedError)
                                          for o in outcomes), outcomes
    closer.join(timeout=60)
    for thread in clients:
        thread.join(timeout=60)
    assert outcomes[4:] == [4, 4]
    assert server.in_flight == 0
    with pytest.raises(fxscale.ServerClosedError):
        server.submit(prompt(1))
    server.slo = fxscale.SLO(5.0, 1.0)
    with pytest.raises(fxscale.ServerClosedError, match="autoscaler cannot start"):
        server.start_autoscaler()  # a closed server starts no thread that nothing stops
    assert server.autoscaler is None


def test_a_draining_attention_replica_no_longer_counts_as_serving(llama):
    """The autoscaler reads the replicas that admit requests: an attention replica removed
    by a scale-down keeps its requests until they finish, but is not counted (otherwise a
    rise in load right after would not scale back up)."""
    with fxscale.serve(llama, policy="operator", budget=2) as server:
        attention = sorted(n for n, p in server.pools.items() if p.stateful)
        server.scale(attention[0], 2)
        streams = [server.generate(prompt(i), max_new_tokens=400, stream=True,
                                   ignore_eos=True) for i in (1, 2)]
        firsts = [next(stream) for stream in streams]  # both running, one per replica
        server.scale(attention[0], 1)
        pools = [server.pools[name] for name in attention]
        assert all(len(pool.replicas) == 2 for pool in pools)  # replica 1 drains
        assert all(pool.counters()["replicas"] == 1 for pool in pools)
        outputs = [[first, *stream] for first, stream in zip(firsts, streams)]
        assert [len(tokens) for tokens in outputs] == [400, 400]
        server.generate(prompt(3), max_new_tokens=2).result()  # a step retires the drained
        assert all(len(pool.replicas) == 1 == pool.counters()["replicas"] for pool in pools)


def test_finished_requests_leave_no_kv_blocks_behind(server):
    for i in range(10):
        server.generate(prompt(200 + i), max_new_tokens=3).result()
    engine = server.stats()["engine"]
    assert engine["kv_blocks"]["used"] == 0 and engine["running"] == 0


def test_non_integer_token_counts_and_exposed_metrics_are_flagged(server, llama):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 2.5"):
        server.generate(prompt(1), max_new_tokens=2.5)
    with pytest.warns(UserWarning, match="publishes the server's metrics beyond this machine"):
        with pytest.raises(OSError):  # a documentation address: nothing can bind it
            fxscale.serve(llama, budget=1, metrics_port=0, metrics_host="192.0.2.1")


def test_closing_while_a_removed_model_replica_finishes_frees_every_replica_once(llama):
    """A model replica scaled away finishes its requests in a thread of its own, then frees
    its replica; a close() right after waits for it instead of freeing that replica too."""
    for _ in range(3):
        server = fxscale.serve(llama, policy="model", replicas=2)
        futures = [server.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8,
                                   ignore_eos=True) for _ in range(4)]
        server.scale("*", 1)
        server.close()
        assert all(len(f.result(timeout=30)) == 8 for f in futures)
        assert server.pools["model"].replicas == {}
        assert all(not t.is_alive() for t in server.retiring)
