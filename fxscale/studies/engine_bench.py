"""Generated tokens per second of the engine against what users would run instead.

One model (a 2-layer Llama from a config: head_dim 64, 4 KV heads, vocab 4096, random
weights) and one set of prompts (16-256 tokens, 32 new tokens each, greedy, no stop token)
served by:
- `operator`, `model`: fxscale.serve with each policy, one replica of everything;
- `hf_batch`: Hugging Face's own continuous batching, `model.generate_batch`, its KV cache
  sized for the requests as fxscale's is (left to itself it sizes the cache from the
  machine's free memory, which here costs about 5 s of allocation per call);
- `hf_static`: one left-padded static batch through `model.generate` (no scheduling, but
  padding work).
Every round runs each generator once, in turn (interleaved, so a shared machine's drift
hits all alike); each generator's figure is its median over rounds, with the spread. The
wall time includes prefill.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

GENERATORS = ("operator", "model", "hf_batch", "hf_static")


@dataclass(frozen=True)
class EngineBench:
    """The model, the prompts and the budget of one comparison."""

    hidden: int = 1024
    layers: int = 2
    requests: int = 64
    shortest: int = 16
    longest: int = 256
    new_tokens: int = 32
    budget: int = 2
    seed: int = 0
    dtype: str = "float32"         # or "bfloat16", "float16": every generator serves in it
    device: str = "cpu"            # where the model's weights live (the engine follows them)

    def model(self) -> torch.nn.Module:
        """The Llama (random weights, eval mode, in the benchmark's dtype)."""
        model = bench_llama(self.hidden, self.layers, 4096, self.longest + self.new_tokens + 16,
                            self.seed)
        return model.eval().to(self.device, getattr(torch, self.dtype))

    def prompts(self) -> list[list[int]]:
        """The prompts' token ids."""
        rng = random.Random(self.seed)
        return [[rng.randrange(3, 4096) for _ in range(rng.randint(self.shortest,
                                                                   self.longest))]
                for _ in range(self.requests)]


def bench_llama(hidden: int, layers: int, vocab_size: int, max_positions: int, seed: int,
                **config: Any) -> torch.nn.Module:
    """A Llama from a config with random weights (seeded): head dim 64, up to 4 KV heads, an
    MLP twice as wide as `hidden`; `config` adds LlamaConfig fields (special token ids)."""
    import transformers as tf

    heads = max(1, hidden // 64)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=min(4, heads), max_position_embeddings=max_positions, **config))


def _engine(bench: EngineBench, model: torch.nn.Module, policy: str) -> Callable[[], list]:
    """A generator on fxscale's engine (the server is started once, outside the timing)."""
    import fxscale

    server = fxscale.serve(model, policy=policy, budget=bench.budget,
                           max_pending=bench.requests, max_batch=bench.requests,
                           kv_cache_tokens=bench.requests * (bench.longest + bench.new_tokens))
    prompts = [torch.tensor([p]) for p in bench.prompts()]  # ids go in on the CPU

    def run() -> list:
        futures = [server.generate(p, max_new_tokens=bench.new_tokens, ignore_eos=True)
                   for p in prompts]
        return [f.result() for f in futures]

    run.close = server.close
    return run


def _hf_batch(bench: EngineBench, model: torch.nn.Module) -> Callable[[], list]:
    """Hugging Face's continuous batching, with KV pages for every request at its longest
    (as many tokens as `_engine` gives fxscale's cache, rounded up to whole pages)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=bench.new_tokens, do_sample=False,
                              eos_token_id=[], pad_token_id=0)
    batching = ContinuousBatchingConfig()
    batching.num_blocks = bench.requests * -(-(bench.longest + bench.new_tokens)
                                             // batching.page_size)
    prompts = bench.prompts()

    def run() -> list:
        with torch.no_grad():
            out = model.generate_batch(inputs=prompts, generation_config=config,
                                       continuous_batching_config=batching,
                                       progress_bar=False)
        return [out[k].generated_tokens for k in sorted(out)]

    return run


def _hf_static(bench: EngineBench, model: torch.nn.Module) -> Callable[[], list]:
    """One left-padded batch through model.generate."""
    prompts = bench.prompts()
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run() -> list:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=bench.new_tokens,
                                 do_sample=False, eos_token_id=[], pad_token_id=0)
        return out[:, width:].tolist()

    return run


def compare_generators(bench: EngineBench, rounds: int = 5,
                       generators: tuple[str, ...] = GENERATORS,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Tokens per second of each generator (median, min, max over interleaved rounds) and the
    engine's ratios to the others."""
    model = bench.model()
    makers = {"operator": lambda: _engine(bench, model, "operator"),
              "model": lambda: _engine(bench, model, "model"),
              "hf_batch": lambda: _hf_batch(bench, model),
              "hf_static": lambda: _hf_static(bench, model)}
    runs = {name: makers[name]() for name in generators}
    tokens = bench.requests * bench.new_tokens
    rates: dict[str, list[float]] = {name: [] for name in generators}
    try:
        for run in runs.values():  # one untimed round each: compiles, caches
            run()
        for i in range(rounds):
            for name, run in runs.items():
                if progress:
                    progress(f"round {i + 1}/{rounds}: {name}")
                start = time.perf_counter()
                run()
                rates[name].append(tokens / (time.perf_counter() - start))
    finally:
        for run in runs.values():
            getattr(run, "close", lambda: None)()
    result: dict[str, Any] = {"config": asdict(bench), "rounds": rounds, "tokens": tokens,
                              "tokens_per_s": {n: {"median": statistics.median(r),
                                                   "min": min(r), "max": max(r)}
                                               for n, r in rates.items()}}
    ratios = {}
    for engine in ("operator", "model"):
        for other in ("hf_batch", "hf_static"):
            if engine in rates and other in rates:
                pairs = [a / b for a, b in zip(rates[engine], rates[other])]
                ratios[f"{engine}/{other}"] = {"median": statistics.median(pairs),
                                               "min": min(pairs), "max": max(pairs)}
    result["ratios"] = ratios
    return result


def poisson_latency(bench: EngineBench, policy: str, capacity_rps: float,
                    fractions: tuple[float, ...] = (0.5, 0.9), seconds: float = 60.0,
                    seed: int = 0) -> dict[str, Any]:
    """TTFT and TBT p50/p99 of the engine under Poisson arrivals at fractions of a measured
    capacity (requests per second; e.g. a closed-loop run's tokens/s over new tokens per
    request), prompts and lengths as `bench`."""
    import fxscale
    from fxscale.contracts.metrics import percentiles

    model = bench.model()
    prompts = bench.prompts()
    out: dict[str, Any] = {"capacity_rps": capacity_rps, "policy": policy, "seconds": seconds}
    with fxscale.serve(model, policy=policy, budget=bench.budget, max_pending=4096,
                       max_batch=bench.requests,
                       kv_cache_tokens=4 * bench.requests * (bench.longest + bench.new_tokens)
                       ) as server:
        for fraction in fractions:
            rng = random.Random(seed)
            rate, start, futures, t = fraction * capacity_rps, time.perf_counter(), [], 0.0
            while t < seconds:
                t += rng.expovariate(rate)
                delay = start + t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                ids = torch.tensor([prompts[len(futures) % len(prompts)]])
                futures.append((start + t, server.generate(ids, max_new_tokens=bench.new_tokens,
                                                           ignore_eos=True)))
            rows = []
            for arrival, future in futures:
                future.result()
                rows.append({"ttft_s": future.record["first_token_at"] - arrival,
                             "tbt_s": future.record["tbt_s"]})
            out[f"{fraction:g}"] = {"rate_rps": rate, "requests": len(rows),
                                    **percentiles(rows, ("ttft_s", "tbt_s"), (50, 99))}
    return out


def rss_soak(bench: EngineBench, policy: str, rate_rps: float, minutes: float = 10.0,
             sample_s: float = 10.0) -> dict[str, Any]:
    """Resident memory of this process, sampled while the engine serves Poisson arrivals for
    `minutes`: it must stay flat (Linux: /proc/self/statm)."""
    import os

    import fxscale

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    model, prompts = bench.model(), bench.prompts()
    samples, rng, served = [], random.Random(0), 0
    with fxscale.serve(model, policy=policy, budget=bench.budget, max_pending=4096,
                       max_batch=bench.requests) as server:
        start = next_sample = time.perf_counter()
        pending = []
        while time.perf_counter() - start < minutes * 60:
            time.sleep(rng.expovariate(rate_rps))
            ids = torch.tensor([prompts[served % len(prompts)][:64]])
            pending.append(server.generate(ids, max_new_tokens=8, ignore_eos=True))
            served += 1
            pending = [f for f in pending if not f.done()]
            if time.perf_counter() >= next_sample:
                samples.append((time.perf_counter() - start, rss()))
                next_sample += sample_s
        for future in pending:
            future.result()
    first = samples[len(samples) // 10][1]  # after the first tenth: warm
    return {"requests": served, "samples": samples, "rss_after_warmup": first,
            "rss_end": samples[-1][1], "rss_max": max(r for _, r in samples),
            "growth": (samples[-1][1] - first) / first}
