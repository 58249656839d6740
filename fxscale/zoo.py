"""Small Hugging Face models built from configs (random weights, no downloads).

Used by the demo, the tests and the benchmarks. Each entry builds a model in eval mode and
example inputs; `scale` grows the config (layers, hidden size) for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class ZooModel:
    """A model with example inputs: call it as model(*args, **kwargs)."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]

    def run(self, model: Callable | None = None) -> Any:
        """Call the model (or a compiled version of it) on the example inputs."""
        return (self.model if model is None else model)(*self.args, **self.kwargs)


def _tokens(vocab: int, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids."""
    return torch.randint(0, vocab, (batch, length), generator=generator)


def build(name: str, batch: int = 2, length: int = 16, seed: int = 0, layers: int = 2,
          hidden: int = 64, device: str | torch.device = "cpu") -> ZooModel:
    """Build a small model of the named family with random weights and example inputs."""
    import transformers as tf

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    heads = max(hidden // 16, 1)
    common = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads)
    builders: dict[str, Callable[[], tuple[torch.nn.Module, tuple, dict]]] = {
        "llama": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=256, intermediate_size=2 * hidden, num_key_value_heads=max(heads // 2, 1),
            max_position_embeddings=512, **common)), (_tokens(256, batch, length, g),), {}),
        "mistral": lambda: (tf.MistralForCausalLM(tf.MistralConfig(
            vocab_size=256, intermediate_size=2 * hidden, num_key_value_heads=max(heads // 2, 1),
            max_position_embeddings=512, sliding_window=None, **common)),
            (_tokens(256, batch, length, g),), {}),
        "mixtral": lambda: (tf.MixtralForCausalLM(tf.MixtralConfig(
            vocab_size=256, intermediate_size=2 * hidden, num_key_value_heads=max(heads // 2, 1),
            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
            **common)), (_tokens(256, batch, length, g),), {}),
        "gpt2": lambda: (tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=256, n_positions=512, n_embd=hidden, n_layer=layers, n_head=heads)),
            (_tokens(256, batch, length, g),), {}),
        "opt": lambda: (tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=256, ffn_dim=2 * hidden, max_position_embeddings=512,
            word_embed_proj_dim=hidden, **common)), (_tokens(256, batch, length, g),), {}),
        "bert": lambda: (tf.BertModel(tf.BertConfig(
            vocab_size=256, intermediate_size=2 * hidden, max_position_embeddings=512, **common)),
            (_tokens(256, batch, length, g),), {}),
        "t5": lambda: (tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=256, d_model=hidden, d_kv=16, d_ff=2 * hidden, num_layers=layers,
            num_decoder_layers=layers, num_heads=heads, decoder_start_token_id=0)),
            (_tokens(256, batch, length, g),),
            {"decoder_input_ids": _tokens(256, batch, max(length // 2, 1), g)}),
        "vit": lambda: (tf.ViTModel(tf.ViTConfig(
            image_size=32, patch_size=8, num_channels=3, intermediate_size=2 * hidden, **common)),
            (torch.randn(batch, 3, 32, 32, generator=g),), {}),
        "whisper": lambda: (tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=256, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden, num_mel_bins=16,
            max_source_positions=32, max_target_positions=64, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1, bos_token_id=0, begin_suppress_tokens=None,
            suppress_tokens=None)),
            (torch.randn(batch, 16, 64, generator=g),),
            {"decoder_input_ids": _tokens(256, batch, max(length // 2, 1), g)}),
    }
    if name not in builders:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(builders)}")
    with torch.device(device):
        model, args, kwargs = builders[name]()
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    return ZooModel(name, model.eval(), args, kwargs)


NAMES = ("gpt2", "llama", "mistral", "mixtral", "opt", "bert", "t5", "vit", "whisper")
