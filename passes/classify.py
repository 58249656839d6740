"""Operator classification: which class of operator a node is (gemm, attention, norm, ...)."""
from __future__ import annotations

GEMM = "gemm"
ATTENTION = "attention"
CONV = "conv"
EMBEDDING = "embedding"
NORM = "norm"
SOFTMAX = "softmax"
REDUCTION = "reduction"
POINTWISE = "pointwise"
ROUTING = "moe-routing"
MOE_EXPERT = "moe-expert"
DATA_MOVEMENT = "data-movement"
KV_CACHE = "kv-cache"
SCALAR = "scalar"

# Kernels a compiler builds from chains of pointwise ops, told apart because their measured
# speeds differ up to 2x (runtime/devices/calibrate.py): the rotation of queries and keys by
# position (its chain reads cos/sin), a nonlinearity with the products it gates, and a block's
# skip-connection add. Costs carry them as the node's `kernel`; the op class stays pointwise.
ROTARY = "rotary"
ACTIVATION = "activation"
RESIDUAL = "residual"
ROTARY_OPS = frozenset({"cos", "sin"})
ACTIVATION_OPS = frozenset({"silu", "gelu", "relu", "relu6", "sigmoid", "tanh", "softplus",
                            "mish", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu",
                            "celu", "glu", "erf"})

# Resource classes the grouping pass keeps apart (DESIGN.md: compute-bound, memory-bound,
# stateful attention with per-request KV state).
COMPUTE = "compute"
MEMORY = "memory"
STATEFUL = "stateful"

MATMUL_OPS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum",
                        "mv", "addmv", "dot"})
# Expert GEMMs of mixture-of-experts layers: tokens sorted by expert, one GEMM per expert.
GROUPED_MM_OPS = frozenset({"grouped_mm", "_grouped_mm", "grouped_mm_fallback"})
ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                           "_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention", "flex_attention"})
# Attention over a paged KV cache (fxscale.kernels, the engine's op): the step's tokens of
# many sequences against each sequence's KV blocks.
PAGED_ATTENTION_OPS = frozenset({"attention_step", "paged_attention"})
CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                      "conv_transpose3d", "convolution", "conv1d_module", "conv2d_module"})
EMBEDDING_OPS = frozenset({"embedding", "embedding_bag"})
NORM_OPS = frozenset({"layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm",
                      "local_response_norm", "normalize", "native_layer_norm", "layernorm",
                      "groupnorm", "rmsnorm"})
SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax"})
REDUCTION_OPS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm",
                           "prod", "logsumexp", "cumsum", "cumprod", "argmax", "argmin", "all",
                           "any", "count_nonzero", "var_mean", "std_mean"})
ROUTING_OPS = frozenset({"topk", "sort", "argsort", "one_hot", "nonzero", "bincount", "histc",
                         "scatter_add", "index_add", "unique"})
DATA_MOVEMENT_OPS = frozenset({
    "view", "reshape", "transpose", "permute", "contiguous", "cat", "concat", "concatenate",
    "stack", "split", "chunk", "getitem", "expand", "repeat", "unsqueeze", "squeeze", "flatten",
    "unflatten", "to", "type", "float", "half", "bfloat16", "double", "int", "long", "bool",
    "clone", "copy", "index_select", "gather", "scatter", "narrow", "slice", "select", "pad",
    "roll", "flip", "tile", "repeat_interleave", "t", "view_as", "reshape_as", "expand_as",
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones", "full", "empty",
    "arange", "tensor", "zeros_like", "ones_like", "full_like", "empty_like", "detach",
    "movedim", "swapaxes", "unbind", "as_strided", "index", "index_put", "masked_select",
    "type_as", "dropout", "identity", "contiguous", "tril", "triu", "diagonal", "unfold",
    "dropout1d", "dropout2d", "alpha_dropout",
})
# Ops whose layout change can fold the token axes into others: the rows they produce no
# longer map one-to-one onto input tokens, unless the shape analysis proves otherwise.
TOKEN_MIXING_OPS = frozenset({"cumsum", "cumprod", "sort", "argsort", "topk", "roll", "flip",
                              "unique", "nonzero", "tril", "triu", "diagonal", "unfold"})


def classify_op(name: str, module_type: str) -> str:
    """The operator class of an op name; `module_type` refines ops traced inside norm modules."""
    if name in ATTENTION_OPS or name in PAGED_ATTENTION_OPS:
        return ATTENTION
    if name in MATMUL_OPS:
        return GEMM
    if name in GROUPED_MM_OPS:
        return MOE_EXPERT
    if name in CONV_OPS:
        return CONV
    if name in EMBEDDING_OPS:
        return EMBEDDING
    if name in NORM_OPS or "norm" in module_type.lower():
        # Hand-written norms (LlamaRMSNorm, T5LayerNorm) are pow/mean/rsqrt/mul inside a *Norm module.
        return NORM
    if name in SOFTMAX_OPS:
        return SOFTMAX
    if name in ROUTING_OPS:
        return ROUTING
    if name in REDUCTION_OPS:
        return REDUCTION
    if name in DATA_MOVEMENT_OPS:
        return DATA_MOVEMENT
    return POINTWISE


def resource_of(op_class: str) -> str:
    """The resource class an operator class belongs to."""
    if op_class in (ATTENTION, KV_CACHE):
        return STATEFUL
    if op_class in (GEMM, CONV, MOE_EXPERT):
        return COMPUTE
    return MEMORY
