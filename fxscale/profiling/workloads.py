"""Inputs for a (phase, batch, length) grid point: prefill prompts, and decode steps that
carry a KV cache of the stated length (synthetic K/V: attention cost does not depend on the
values). Used by measured profiles (real tensors) and analytic ones (meta tensors)."""
from __future__ import annotations

from typing import Any

import torch


class CausalLMInputs:
    """input_ids for prefill; one new token plus a KV cache of `length` tokens for decode."""

    def __init__(self, config: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, device, dtype

    def _ids(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, self.config.vocab_size, (batch, length), generator=generator)
        return ids.to(self.device)

    def for_phase(self, phase: str, batch: int, length: int, generator: torch.Generator
                  ) -> dict[str, Any]:
        """Model inputs for one grid point of a phase."""
        return (self.decode if phase == "decode" else self.prefill)(batch, length, generator)

    def max_length(self) -> int | None:
        """The longest sequence the model's position table allows, if it has one."""
        cfg = self.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def prefill(self, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
        """A batch of prompts, no cache kept."""
        return {"input_ids": self._ids(batch, length, generator), "use_cache": False}

    def decode(self, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
        """One token per request against a KV cache holding `length` tokens."""
        from transformers import DynamicCache

        return {"input_ids": self._ids(batch, 1, generator), "use_cache": True,
                "past_key_values": self._filled_cache(DynamicCache(config=self.config), batch,
                                                      length, generator)}

    def _kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        cfg = self.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return batch, heads, length, head_dim

    def _filled_cache(self, cache: Any, batch: int, length: int, generator: torch.Generator,
                      layers: int | None = None) -> Any:
        """A cache whose every layer holds `length` tokens of random K/V."""
        shape = self._kv_shape(batch, length)
        for layer in range(layers or self.config.num_hidden_layers):
            cache.update(self._random(shape, generator), self._random(shape, generator), layer)
        return cache

    def _random(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        if self.device.type == "meta":
            return torch.empty(shape, dtype=self.dtype, device="meta")
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)


class WhisperInputs(CausalLMInputs):
    """Prefill: audio features through the encoder and a decoder prompt of `length` tokens.
    Decode: one decoder token against a self-attention cache of `length` tokens and the
    cross-attention cache of the encoder states."""

    def _kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        cfg = self.config
        return batch, cfg.decoder_attention_heads, length, cfg.d_model // cfg.decoder_attention_heads

    def max_length(self) -> int | None:
        """Decoder positions available."""
        return self.config.max_target_positions

    def _frames(self) -> int:
        return 2 * self.config.max_source_positions  # the conv stem halves the frames

    def prefill(self, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
        features = self._random((batch, self.config.num_mel_bins, self._frames()), generator)
        return {"input_features": features, "decoder_input_ids": self._ids(batch, length, generator),
                "use_cache": False}

    def decode(self, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
        from transformers import DynamicCache, EncoderDecoderCache

        cfg = self.config
        layers = cfg.decoder_layers
        cache = EncoderDecoderCache(
            self._filled_cache(DynamicCache(), batch, length, generator, layers),
            self._filled_cache(DynamicCache(), batch, cfg.max_source_positions, generator, layers))
        cache.is_updated = {layer: True for layer in range(layers)}
        states = self._random((batch, cfg.max_source_positions, cfg.d_model), generator)
        return {"encoder_outputs": (states,), "decoder_input_ids": self._ids(batch, 1, generator),
                "past_key_values": cache, "use_cache": True}


def inputs_for(model: torch.nn.Module) -> CausalLMInputs:
    """The input maker that fits a model (Whisper-style encoder-decoder, else causal LM)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise ValueError(f"{type(model).__name__}: profiling needs a Hugging Face model with a "
                         "config (causal LM, or Whisper-style encoder-decoder)")
    param = next(model.parameters())
    maker = WhisperInputs if hasattr(config, "num_mel_bins") else CausalLMInputs
    return maker(config, param.device, param.dtype)
