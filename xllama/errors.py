"""xllama's exception for a user's mistake."""

from transformer.training import UserError


class XLlamaError(UserError):
    """A user mistake in xllama: unknown config, bad checkpoint, prompt too long, bad flag value."""
