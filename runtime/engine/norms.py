"""RMSNorm as fxscale's kernel: on the engine's copy of a model, the norm modules whose
forward is Llama's RMSNorm (Mistral, Mixtral, Qwen 2/3 and Phi-3 copy it; checked by
source) run `fxscale.kernels.rms_norm` instead: one fused op, normalised in fp32, the same
numbers. The engine routes them where the kernels run as Triton (CUDA); elsewhere the
modules' own ops stay (Inductor fuses them)."""
from __future__ import annotations

import functools
import inspect
import types

import torch

from fxscale.kernels import rms_norm


@functools.cache
def _llama_source() -> str:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return inspect.getsource(LlamaRMSNorm.forward)


@functools.cache
def _is_llama_rms_norm(cls: type) -> bool:
    """Whether a norm class's forward is Llama's RMSNorm, line for line."""
    try:
        return inspect.getsource(cls.forward) == _llama_source()
    except (OSError, TypeError):  # no source to compare: not routed
        return False


def _kernel_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward through the fused kernel."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon,
                    backend=self.fxscale_backend)[0]


def route_norms(model: torch.nn.Module, backend: str = "auto") -> int:
    """Run the model's Llama-style RMSNorm modules on fxscale.kernels.rms_norm; how many."""
    routed = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and _is_llama_rms_norm(type(module)):
            module.fxscale_backend = backend
            module.forward = types.MethodType(_kernel_forward, module)
            routed += 1
    return routed
