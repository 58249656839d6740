"""Backend benchmarks: steady-state latency and compile time vs Inductor and eager, the grouping
pass on an 80-layer graph, and the meta-device analysis of a Llama-2-70B config.

Run: python -m pytest tests/benchmarks -m benchmark_suite --benchmark-enable \
        --benchmark-json benchmarks.json      (results recorded in docs/benchmarks.md)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

BACKENDS = {
    "eager": None,
    "inductor": dict(backend="inductor"),
    "fxscale": dict(backend="fxscale", options={"granularity": "operator", "lowering": "inductor"}),
}
SEQUENCE = 128


def compiled(model, name):
    """The model compiled with one of the backends (eager: the model itself)."""
    return model if BACKENDS[name] is None else torch.compile(model, **BACKENDS[name])


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_steady_state_latency(benchmark, llama_model, name, batch):
    torch._dynamo.reset()
    benchmark.group = f"llama-4x512 forward, batch {batch}, seq {SEQUENCE}"
    x = torch.randint(0, 32000, (batch, SEQUENCE))
    run = compiled(llama_model, name)
    with torch.no_grad():
        expected = llama_model(x, use_cache=False).logits
        for _ in range(3):  # compile and warm up
            out = run(x, use_cache=False).logits
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        benchmark.pedantic(lambda: run(x, use_cache=False), rounds=20, iterations=1,
                           warmup_rounds=2)


COMPILE_ONCE = """
import json, sys, time, torch
sys.path.insert(0, "tests/benchmarks")
from bench_models import llama_4x512
from test_bench_backend import BACKENDS
model = llama_4x512()
x = torch.randint(0, 32000, (1, 128))
run = torch.compile(model, **BACKENDS[sys.argv[1]])
start = time.perf_counter()
with torch.no_grad():
    run(x, use_cache=False)
print(json.dumps({"first_call_s": time.perf_counter() - start}))
"""


@pytest.mark.parametrize("name", ["inductor", "fxscale"])
def test_compile_time(benchmark, name, tmp_path):
    """Cold compile: first call (trace + compile + one forward) in a fresh process whose
    Inductor cache directory is empty, batch 1, seq 128."""
    benchmark.group = "llama-4x512 compile time (fresh process, empty Inductor cache)"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    results = []

    def compile_once():
        out = subprocess.run([sys.executable, "-c", COMPILE_ONCE, name], capture_output=True,
                             text=True, check=True, timeout=600, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(compile_once, rounds=1, iterations=1)
    benchmark.extra_info.update(results[-1])


def test_grouping_pass_on_80_layers(benchmark):
    """Cost annotation + grouping + convexity check of an 80-layer Llama graph."""
    import transformers as tf

    from fxscale.compiler.options import Options
    from fxscale.compiler.pipeline import analyse_graph

    config = tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                            num_hidden_layers=80, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config).eval()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randint(0, 1024, (1, 64), device="meta")
    torch._dynamo.maybe_mark_dynamic(x, 0)
    torch._dynamo.maybe_mark_dynamic(x, 1)
    with torch.no_grad():
        torch.compile(model, backend=capture)(x, use_cache=False)
    gm = graphs[0]
    benchmark.group = "grouping pass, 80-layer graph"
    benchmark.extra_info["nodes"] = len(gm.graph.nodes)
    analysis = benchmark.pedantic(lambda: analyse_graph(gm, Options()), rounds=3, iterations=1)
    assert len(analysis.group_graph.groups) == 3 * 80 + 2


META_70B = """
import json, re, time, torch, transformers as tf, fxscale
start = time.perf_counter()
config = tf.LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=4096)
with torch.device("meta"):
    model = tf.LlamaForCausalLM(config).eval()
graph = fxscale.explain(model, torch.randint(0, 32000, (1, 128), device="meta"))
print(json.dumps({"wall_s": time.perf_counter() - start, "groups": len(graph.groups),
                  "params": sum(g.param_bytes for g in graph.groups) // 4,
                  # VmHWM: this process image's peak RSS (ru_maxrss would include the forking parent)
                  "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())
                                     .group(1)) / 1024}))
"""


def test_meta_analysis_llama2_70b(benchmark):
    """Analyse a Llama-2-70B config on the meta device in a fresh process: wall time, peak RSS."""
    benchmark.group = "meta-device analysis, Llama-2-70B config"
    results = []

    def run():
        out = subprocess.run([sys.executable, "-c", META_70B], capture_output=True, text=True,
                             check=True, timeout=600)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    result = results[-1]
    benchmark.extra_info.update(result)
    assert result["groups"] == 3 * 80 + 2
    assert 68e9 < result["params"] < 70e9
