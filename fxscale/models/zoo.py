"""Small Hugging Face models built from configs (random weights, no downloads).

Used by the demo, the tests and the benchmarks. Each entry builds a model in eval mode and
example inputs; `scale` grows the config (layers, hidden size) for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fxscale.contracts.errors import InputError


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

    _check_size(layers, hidden, device)
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


MAX_CPU_BYTES = 8 << 30  # random weights of a zoo model built on a real device


def _check_size(layers: int, hidden: int, device: str | torch.device) -> None:
    """Refuse sizes no zoo model has (16-wide heads) and models too big to build here."""
    for name, value in (("layers", layers), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"zoo model {name} must be a positive integer, got {value!r}")
    if hidden % 16:
        raise InputError(f"zoo model hidden size must be a multiple of 16 (its heads are 16 "
                         f"wide), got {hidden}")
    weights = layers * 12 * hidden * hidden * 4  # attention 4h^2 + MLP with 2h: about 12h^2
    if str(device) != "meta" and weights > MAX_CPU_BYTES:
        raise InputError(f"a zoo model of {layers} layers x hidden {hidden} holds about "
                         f"{weights / 2**30:.0f} GiB of weights, more than {MAX_CPU_BYTES >> 30} "
                         "GiB; build it on the meta device (--meta) or make it smaller")


NAMES = ("gpt2", "llama", "mistral", "mixtral", "opt", "bert", "t5", "vit", "whisper")


_SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=256)
# More of transformers' decoders, small with random weights, for checks that should hold on
# any decoder (generate() parity): rotary and ALiBi attention, grouped-query attention,
# soft-capping, parallel attention/MLP blocks, fused QKV projections, mixtures of experts.
LIBRARY_DECODERS: dict[str, Callable[[Any], torch.nn.Module]] = {
    "qwen2": lambda tf: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **_SMALL)),
    "qwen3": lambda tf: tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=16,
                                                           **_SMALL)),
    "qwen2_moe": lambda tf: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, **_SMALL)),
    "phi3": lambda tf: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0,
                                                        **_SMALL)),
    "phi": lambda tf: tf.PhiForCausalLM(tf.PhiConfig(**_SMALL)),
    "gemma": lambda tf: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=16,
                                                           **_SMALL)),
    "gemma2": lambda tf: tf.Gemma2ForCausalLM(tf.Gemma2Config(num_key_value_heads=2,
                                                              head_dim=16, **_SMALL)),
    "gemma3": lambda tf: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2,
                                                                  head_dim=16, **_SMALL)),
    "olmo": lambda tf: tf.OlmoForCausalLM(tf.OlmoConfig(num_key_value_heads=2, **_SMALL)),
    "olmo2": lambda tf: tf.Olmo2ForCausalLM(tf.Olmo2Config(num_key_value_heads=2, **_SMALL)),
    "granite": lambda tf: tf.GraniteForCausalLM(tf.GraniteConfig(num_key_value_heads=2,
                                                                 **_SMALL)),
    "stablelm": lambda tf: tf.StableLmForCausalLM(tf.StableLmConfig(num_key_value_heads=2,
                                                                    **_SMALL)),
    "cohere": lambda tf: tf.CohereForCausalLM(tf.CohereConfig(num_key_value_heads=2,
                                                              **_SMALL)),
    "starcoder2": lambda tf: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(
        num_key_value_heads=2, **_SMALL)),
    "smollm3": lambda tf: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(
        num_key_value_heads=2, pad_token_id=0, **_SMALL)),
    "gpt_neox": lambda tf: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_SMALL)),
    "falcon": lambda tf: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2)),
    "bloom": lambda tf: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=256, hidden_size=64,
                                                           n_layer=2, n_head=4)),
    "gptj": lambda tf: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=256, n_embd=64, n_layer=2,
                                                        n_head=4, rotary_dim=8,
                                                        n_positions=256)),
    "gpt_bigcode": lambda tf: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "codegen": lambda tf: tf.CodeGenForCausalLM(tf.CodeGenConfig(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
        n_ctx=256)),
    "mpt": lambda tf: tf.MptForCausalLM(tf.MptConfig(vocab_size=256, d_model=64, n_layers=2,
                                                     n_heads=4, max_seq_len=256)),
    "xglm": lambda tf: tf.XGLMForCausalLM(tf.XGLMConfig(
        vocab_size=256, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
        max_position_embeddings=256)),
}
ZOO_DECODERS = ("llama", "gpt2", "mistral", "mixtral", "opt")


def decoder(name: str, seed: int = 0) -> torch.nn.Module:
    """A small causal decoder with random weights, in eval mode: a zoo model or one of
    LIBRARY_DECODERS."""
    if name in ZOO_DECODERS:
        return build(name, seed=seed).model
    if name not in LIBRARY_DECODERS:
        raise InputError(f"unknown decoder {name!r}; choose one of "
                         f"{sorted([*ZOO_DECODERS, *LIBRARY_DECODERS])}")
    import transformers

    torch.manual_seed(seed)
    return LIBRARY_DECODERS[name](transformers).eval()
