"""xllama: a Llama 2 decoder (Touvron et al. 2023) that trains, generates with a KV cache, and
loads and exports real Llama checkpoints (Meta `consolidated.*.pth` and Hugging Face); with the
Mistral family's options (sliding window and rolling cache, Mixtral's sparse mixture of experts,
Mistral/Mixtral checkpoints) and ALiBi positions.

Generation is `xllama.sampling.generate(model, prompts, ...)`; `xllama.generate` is the command
(`python -m xllama.generate`), so the function is not re-exported under the same name."""

# First, before torch loads: a command interrupted while starting prints one line
# (transformer/training/errors.py).
import transformer.training  # noqa: F401

# isort: split
from .cache import Cache, RollingKVCache
from .errors import XLlamaError
from .model import (
    LLAMA2,
    Llama,
    LlamaConfig,
    MoEFeedForward,
    RMSNorm,
    apply_rope,
    count_params_meta,
    get_config,
    llama3_frequencies,
    loss_fn,
    rope_tables,
    router_losses,
)
from .sampling import left_pad, sample_next, token_logprobs

__all__ = [
    "LLAMA2",
    "Cache",
    "Llama",
    "LlamaConfig",
    "MoEFeedForward",
    "RMSNorm",
    "RollingKVCache",
    "XLlamaError",
    "apply_rope",
    "count_params_meta",
    "get_config",
    "left_pad",
    "llama3_frequencies",
    "loss_fn",
    "rope_tables",
    "router_losses",
    "sample_next",
    "token_logprobs",
]
