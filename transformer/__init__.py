"""Attention Is All You Need (Vaswani et al. 2017): the shared attention core, the
encoder-decoder Transformer, and the training infrastructure every package's trainer uses."""

from .attention import (
    KVCache,
    MultiHeadAttention,
    attention_reference,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product_attention,
)
from .checkpoint import CheckpointError
from .cli import UserError
from .run import NonFiniteLoss, TrainingRun

__all__ = [
    "CheckpointError",
    "KVCache",
    "MultiHeadAttention",
    "NonFiniteLoss",
    "TrainingRun",
    "UserError",
    "attention_reference",
    "causal_mask",
    "combine_masks",
    "padding_mask",
    "scaled_dot_product_attention",
]
