"""Placeholder until the tokenizer package lands."""


class TokenizerError(ValueError):
    """Base class of the tokenizer's errors."""
