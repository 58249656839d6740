"""Benchmark models: the 4-layer Llama (hidden 512) of the backend issue."""
from __future__ import annotations

import torch


def llama_4x512():
    """A 4-layer Llama with hidden size 512 (random weights), in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=1024)
    return tf.LlamaForCausalLM(config).eval()


def llama_2x2048():
    """A 2-layer Llama with hidden size 2048 and a 32k vocabulary (random weights, 0.9 GB in
    fp32): decode reads far more weight bytes than it computes on, as a large model's does."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                            max_position_embeddings=1024)
    return tf.LlamaForCausalLM(config).eval()
