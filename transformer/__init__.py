"""Attention Is All You Need (Vaswani et al. 2017): the shared attention core, the
encoder-decoder Transformer, and the training infrastructure every package's trainer uses."""

from .attention import (
    KVCache,
    MultiHeadAttention,
    StaticKVCache,
    attention_reference,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product_attention,
)
from .checkpoint import CheckpointError
from .cli import UserError
from .model import (
    PRESETS,
    Transformer,
    TransformerConfig,
    beam_search,
    greedy_decode,
    label_smoothed_loss,
    learning_rate,
    length_penalty,
    sinusoidal_positions,
)
from .run import NonFiniteLoss, TrainingRun

__all__ = [
    "PRESETS",
    "CheckpointError",
    "KVCache",
    "MultiHeadAttention",
    "NonFiniteLoss",
    "StaticKVCache",
    "Transformer",
    "TransformerConfig",
    "TrainingRun",
    "UserError",
    "beam_search",
    "greedy_decode",
    "label_smoothed_loss",
    "learning_rate",
    "length_penalty",
    "sinusoidal_positions",
    "attention_reference",
    "causal_mask",
    "combine_masks",
    "padding_mask",
    "scaled_dot_product_attention",
]
