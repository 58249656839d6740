"""The serving engine (runtime/engine) against Hugging Face greedy generate: many concurrent
requests of mixed lengths (prompts chunked across steps), across decoder architectures,
with preemption, cancellation and failing steps."""
from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch

from fxscale.contracts.devices import Devices
from fxscale.contracts.group_graph import GroupGraph
from fxscale.contracts.placement import Placement
from fxscale.models import zoo
from fxscale.runtime.engine import Engine
from fxscale.runtime.engine.attention import find_attention
from fxscale.runtime.engine.pooled import PooledRunner
from fxscale.runtime.engine.runner import SequentialRunner, private_copy
from fxscale.runtime.executors.local import StateLostError
from fxscale.runtime.scheduling import SchedulerConfig


def engine_for(model, num_blocks=512, budget=512, max_len=512, norms=None, micro_batches=1):
    """An engine over a private copy of the model: its steps compiled into operator groups
    on pools when its attention routes to the paged cache, else one request at a time."""
    copy = private_copy(model)
    layers, why = find_attention(copy)
    if why is not None:
        runner = SequentialRunner(copy)
    else:
        runner = PooledRunner(copy, layers, num_blocks, 16,
                              {"granularity": "operator", "lowering": "eager"},
                              Placement(Devices(slots=2)), backend="torch", norms=norms)
        runner.warm_up()
    return Engine(runner, SchedulerConfig(max_num_batched_tokens=budget), num_blocks, max_len,
                  micro_batches=micro_batches)


def prompts(seed: int, count: int, longest: int, vocab: int = 256) -> list[list[int]]:
    """Fresh random prompts, lengths from 1 to `longest`."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, longest))]
            for _ in range(count)]


def reference(model, prompt: list[int], new: int) -> list[int]:
    """Hugging Face greedy generate with no stop token: the tokens the engine must give
    (the engine's requests ignore end-of-sequence)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             eos_token_id=[], pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", layers=2, hidden=64).model.eval()


def test_sixty_four_concurrent_requests_equal_hugging_face_greedy(llama):
    """Prompts of 1-400 tokens arrive together: long ones are chunked across steps beside
    the decodes of others; every request's tokens equal HF greedy."""
    engine = engine_for(llama, budget=128)
    batch = prompts(1, 64, 400)
    records = [engine.add(p, 8, ignore_eos=True) for p in batch]
    outputs = [r.future.result(timeout=300) for r in records]
    stats = engine.stats()
    engine.close()
    graph = engine.runner.group_graphs[-1]
    attention = [g for g in graph.groups if g.stateful]
    assert attention and all(g.kernels == ["attention_step"] and g.param_bytes == 0
                             for g in attention)  # the KV cache is state, not weights
    assert "fxscale.kernels: attention_step" in graph.table(width=250)
    reloaded = GroupGraph.from_json(graph.to_json())
    assert reloaded.groups[graph.groups.index(attention[0])].kernels == ["attention_step"]
    assert stats["steps"] < sum(len(p) for p in batch)  # tokens were batched across requests
    assert stats["tokens_per_step"] > 16 and stats["kv_blocks"]["used"] == 0
    assert outputs == [reference(llama, p, 8) for p in batch]


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gpt2"])
def test_llama_style_norms_on_the_kernel_equal_hugging_face_greedy(name):
    """Norms whose forward is Llama's RMSNorm run on fxscale.kernels.rms_norm (as on a GPU;
    here its torch backend); other norms (GPT-2's LayerNorm) stay as they are."""
    model = zoo.decoder(name).eval()
    engine = engine_for(model, budget=64, max_len=256, norms=True)
    kernel_norms = [n for graph in engine.runner.group_graphs for g in graph.groups
                    for n in g.nodes if n.startswith("rms_norm")]  # the op's nodes
    assert bool(kernel_norms) == (name != "gpt2")
    batch = prompts(2, 12, 100)
    records = [engine.add(p, 6, ignore_eos=True) for p in batch]
    outputs = [r.future.result(timeout=300) for r in records]
    engine.close()
    assert outputs == [reference(model, p, 6) for p in batch]


@pytest.mark.parametrize("name", ["bloom", "falcon"])
def test_models_whose_attention_does_not_route_run_one_request_at_a_time(name):
    model = zoo.decoder(name).eval()
    layers, why = find_attention(private_copy(model))
    assert not layers and why
    engine = engine_for(model, budget=32, max_len=256)
    assert isinstance(engine.runner, SequentialRunner)
    batch = prompts(3, 6, 60)
    records = [engine.add(p, 5, ignore_eos=True) for p in batch]
    outputs = [r.future.result(timeout=300) for r in records]
    engine.close()
    assert outputs == [reference(model, p, 5) for p in batch]


def test_two_micro_batches_side_by_side_give_the_same_tokens(llama):
    """Each step's two halves run at once on two threads (sharing replicas and KV caches:
    different requests' slots): the tokens are HF greedy's."""
    engine = engine_for(llama, num_blocks=256, budget=64, micro_batches=2)
    batch = prompts(8, 16, 80)
    outputs = [r.future.result(timeout=300) for r in [engine.add(p, 6, ignore_eos=True)
                                                      for p in batch]]
    engine.close()
    assert engine.stats()["kv_blocks"]["used"] == 0
    assert outputs == [reference(llama, p, 6) for p in batch]


@pytest.mark.parametrize("replicas", [1, 2])
def test_replicas_lost_under_one_micro_batch_void_the_other_half_of_its_step(llama, replicas):
    """Two micro-batches share the attention replicas; under one half of a step they die
    (one process hosting them all) and come back with empty KV blocks (a Ray actor replaced
    while the other half's calls were on their way to it), so the other half reads empty
    blocks: no half of that step counts, every request of every lost replica is recomputed
    once, and the tokens are HF greedy's."""
    engine = engine_for(llama, num_blocks=256, budget=64, micro_batches=2)
    engine.control(lambda: engine.set_attention_replicas(replicas)).result(timeout=60)
    run, attempt = engine._run, engine._attempt
    steps, now, wiped = itertools.count(), {}, threading.Event()

    def counted_run(step, started):
        now.update(step=next(steps), first=step.chunks[0].request, halves=len(step.chunks) > 1)
        return run(step, started)

    def losing_attempt(half):
        if "lost" in now or now["step"] < 6 or not now["halves"]:
            return attempt(half)
        if half.chunks[0].request != now["first"]:  # the other half: after the loss
            assert wiped.wait(30)
            return attempt(half)
        for pool in engine.runner.stateful_pools():
            for replica in pool.replicas.values():
                for cache in replica.state.values():
                    cache.zero_()  # as a replacement actor's blocks are
        now["lost"] = set(engine.scheduler.pools)
        wiped.set()
        return None, frozenset(), [], StateLostError("attention", now["lost"],
                                                     RuntimeError("died")), 1

    engine._run, engine._attempt = counted_run, losing_attempt
    batch = prompts(9, 12, 40)
    outputs = [r.future.result(timeout=300) for r in [engine.add(p, 12, ignore_eos=True)
                                                      for p in batch]]
    engine.close()
    stats = engine.stats()
    assert now["lost"] == set(range(replicas)) and stats["recomputed_replicas"] == replicas
    assert stats["kv_blocks"]["used"] == 0
    assert outputs == [reference(llama, p, 12) for p in batch]


def test_a_small_cache_preempts_and_loses_nothing(llama):
    engine = engine_for(llama, num_blocks=14, budget=64)
    batch = prompts(4, 16, 60)
    records = [engine.add(p, 12, ignore_eos=True) for p in batch]
    outputs = [r.future.result(timeout=300) for r in records]
    stats = engine.stats()
    engine.close()
    assert stats["preemptions"] > 0
    assert outputs == [reference(llama, p, 12) for p in batch]


def test_cancelled_requests_free_their_blocks_and_the_others_are_unaffected(llama):
    engine = engine_for(llama, budget=32)
    batch = prompts(5, 10, 40)
    records = [engine.add(p, 30, ignore_eos=True, stream=i % 2 == 0)
               for i, p in enumerate(batch)]
    streams = [engine.stream(r) for r in records[0::2]]
    for s in streams[:3]:
        next(s)          # a token has been streamed ...
        s.close()        # ... and the client goes away
    assert records[1].future.cancel()
    kept = [r for i, r in enumerate(records) if i not in (0, 2, 4, 1)]
    outputs = [r.future.result(timeout=300) for r in kept]
    assert all(records[i].future.cancelled() for i in (0, 1, 2, 4))
    engine.close()
    assert engine.stats()["kv_blocks"]["used"] == 0 and not engine.requests
    assert outputs == [reference(llama, batch[i], 30)
                       for i in range(len(batch)) if i not in (0, 2, 4, 1)]


def test_a_failing_step_is_run_again_then_fails_only_its_requests(llama):
    engine = engine_for(llama, budget=512)
    run = engine.runner.run
    failures = {"left": 1}
    poisoned: set[int] = set()

    def flaky(step, tokens, whole=frozenset()):
        if failures["left"]:           # one transient fault: retried, nobody notices
            failures["left"] -= 1
            raise RuntimeError("transient")
        if any(c.request in poisoned for c in step.chunks):
            raise RuntimeError("broken request")
        return run(step, tokens, whole)

    engine.runner.run = flaky
    first = engine.add([5, 6, 7], 4, ignore_eos=True)
    assert first.future.result(timeout=60) == reference(llama, [5, 6, 7], 4)
    gate = threading.Event()
    engine.runner.run = lambda step, tokens, whole: (gate.wait(), flaky(step, tokens, whole))[1]
    bad = engine.add([9, 9], 4, ignore_eos=True)
    poisoned.add(bad.id)
    gate.set()
    with pytest.raises(RuntimeError, match="broken request"):
        bad.future.result(timeout=60)
    engine.runner.run = run
    good = engine.add([5, 6, 7], 4, ignore_eos=True)
    assert good.future.result(timeout=60) == reference(llama, [5, 6, 7], 4)
    engine.close()
    assert engine.stats()["failed_steps"] == 3


def test_requests_too_long_are_refused_when_added(llama):
    engine = engine_for(llama, num_blocks=4, max_len=512)
    with pytest.raises(ValueError, match="exceed the KV cache of 64 tokens"):
        engine.add(list(range(3, 63)), 8)
    with pytest.raises(ValueError, match="exceed the model's 512 positions"):
        engine.add([3] * 500, 20)
    engine.close()


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2", "opt", "mixtral", "qwen2",
                                  "phi3", "gemma2", "starcoder2"])
def test_sixty_four_requests_with_scale_events_equal_hugging_face_greedy(name):
    """fxscale.serve on the engine: 64 concurrent requests, prompts from 1 token to nearly
    the model's context (chunked over steps of 128 tokens), while random groups are scaled
    between 1 and 2 replicas (attention replicas included): every request's tokens equal HF
    greedy. Learned positions (GPT-2, OPT), MoE (Mixtral), sliding windows and
    soft-capping (Gemma 2), partial rotary and fused projections (Phi-3)."""
    import fxscale

    model = zoo.decoder(name).eval()
    longest = model.config.max_position_embeddings - 8
    batch = prompts(6, 64, longest)
    rng = random.Random(6)
    with fxscale.serve(model, budget=2, max_num_batched_tokens=128) as server:
        futures = [server.generate(torch.tensor([p]), max_new_tokens=4, ignore_eos=True)
                   for p in batch]
        names = sorted(server.pools)
        while not all(f.done() for f in futures):
            server.scale(rng.choice(names), rng.randint(1, 2))
        outputs = [f.result() for f in futures]
        assert server.stats()["engine"]["kv_blocks"]["used"] == 0
    assert outputs == [reference(model, p, 4) for p in batch]


def test_the_gpu_benchmark_script_runs_end_to_end_on_the_cpu(tmp_path):
    """examples/engine_gpu.py --smoke: the script a GPU session runs once, at tiny sizes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "engine_gpu.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "engine.json").read_text())["results"][0]
    assert set(result["tokens_per_s"]) == {"operator", "model", "hf_batch", "hf_static"}
    assert all(v["median"] > 0 for v in result["tokens_per_s"].values())
    assert "| 128 | 4 | float32 |" in (tmp_path / "engine.md").read_text()
