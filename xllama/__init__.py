"""xllama: a Llama 2 decoder (Touvron et al. 2023) that trains, generates with a KV cache, and
loads and exports real Llama checkpoints (Meta `consolidated.*.pth` and Hugging Face)."""

from .model import (
    CONFIGS,
    Cache,
    Llama,
    LlamaConfig,
    RMSNorm,
    RollingKVCache,
    XLlamaError,
    apply_rope,
    count_params_meta,
    get_config,
    loss_fn,
    rope_tables,
)
from .sampling import generate, left_pad, sample_next, token_logprobs

__all__ = [
    "CONFIGS",
    "Cache",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "RollingKVCache",
    "XLlamaError",
    "apply_rope",
    "count_params_meta",
    "generate",
    "get_config",
    "left_pad",
    "loss_fn",
    "rope_tables",
    "sample_next",
    "token_logprobs",
]
