"""Generated tokens per second of the engine against what users would run instead.

One model (a 2-layer Llama from a config: head_dim 64, 4 KV heads, vocab 4096, random
weights) and one set of prompts (16-256 tokens, 32 new tokens each, greedy, no stop token)
served by:
- `operator`, `model`: fxscale.serve with each policy, one replica of everything;
- `hf_batch`: Hugging Face's own continuous batching, `model.generate_batch`;
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

    def model(self) -> torch.nn.Module:
        """The Llama (random weights, eval mode, in the benchmark's dtype)."""
        import transformers as tf

        torch.manual_seed(self.seed)
        config = tf.LlamaConfig(vocab_size=4096, hidden_size=self.hidden,
                                intermediate_size=2 * self.hidden,
                                num_hidden_layers=self.layers,
                                num_attention_heads=self.hidden // 64, num_key_value_heads=4,
                                max_position_embeddings=self.longest + self.new_tokens + 16)
        return tf.LlamaForCausalLM(config).eval().to(getattr(torch, self.dtype))

    def prompts(self) -> list[list[int]]:
        """The prompts' token ids."""
        rng = random.Random(self.seed)
        return [[rng.randrange(3, 4096) for _ in range(rng.randint(self.shortest,
                                                                   self.longest))]
                for _ in range(self.requests)]


def _engine(bench: EngineBench, model: torch.nn.Module, policy: str) -> Callable[[], list]:
    """A generator on fxscale's engine (the server is started once, outside the timing)."""
    import fxscale

    server = fxscale.serve(model, policy=policy, budget=bench.budget,
                           max_pending=bench.requests, max_batch=bench.requests,
                           kv_cache_tokens=bench.requests * (bench.longest + bench.new_tokens))
    prompts = [torch.tensor([p]) for p in bench.prompts()]

    def run() -> list:
        futures = [server.generate(p, max_new_tokens=bench.new_tokens, ignore_eos=True)
                   for p in prompts]
        return [f.result() for f in futures]

    run.close = server.close
    return run


def _hf_batch(bench: EngineBench, model: torch.nn.Module) -> Callable[[], list]:
    """Hugging Face's continuous batching."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=bench.new_tokens, do_sample=False,
                              eos_token_id=[], pad_token_id=0)
    prompts = bench.prompts()

    def run() -> list:
        with torch.no_grad():
            out = model.generate_batch(inputs=prompts, generation_config=config,
                                       progress_bar=False)
        return [out[k].generated_tokens for k in sorted(out)]

    return run


def _hf_static(bench: EngineBench, model: torch.nn.Module) -> Callable[[], list]:
    """One left-padded batch through model.generate."""
    prompts = bench.prompts()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

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
