"""Attention Is All You Need (Vaswani et al. 2017): the shared attention core (with FlashAttention's
tiling written out, and ALiBi's biases) and the encoder-decoder Transformer; BERT lives in
`transformer.bert`. The training platform every package's trainer uses (checkpoints, run
directories, distributed set-up, config-to-CLI, errors) is its own subpackage, `transformer.training`."""

# First, before torch loads: a command interrupted while starting prints one line (training/errors.py).
from . import training  # noqa: F401

# isort: split
from .attention import (
    KERNELS,
    KVCache,
    MultiHeadAttention,
    StaticKVCache,
    alibi_bias,
    alibi_slopes,
    attention_reference,
    causal_mask,
    combine_masks,
    flash_attention,
    padding_mask,
    scaled_dot_product_attention,
)
from .model import (
    Transformer,
    TransformerConfig,
    beam_search,
    greedy_decode,
    label_smoothed_loss,
    learning_rate,
    length_penalty,
    sinusoidal_positions,
)

__all__ = [
    "KERNELS",
    "KVCache",
    "MultiHeadAttention",
    "StaticKVCache",
    "Transformer",
    "TransformerConfig",
    "beam_search",
    "greedy_decode",
    "label_smoothed_loss",
    "learning_rate",
    "length_penalty",
    "sinusoidal_positions",
    "alibi_bias",
    "alibi_slopes",
    "attention_reference",
    "causal_mask",
    "combine_masks",
    "flash_attention",
    "padding_mask",
    "scaled_dot_product_attention",
]
