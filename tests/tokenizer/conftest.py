"""Fixtures for the tokenizer tests: OpenAI's encodings built from the shared rank files.

Each encoding is built twice and independently: ours with `BPETokenizer.from_tiktoken(name,
ranks_file=...)`, and the reference by running tiktoken's own constructor for that encoding
(tiktoken_ext.openai_public) with its download replaced by the local file.
"""

from pathlib import Path
from unittest import mock

import pytest

from tokenizer import BPETokenizer


def _reference_and_ours(shared_data: Path, name: str):
    import tiktoken
    import tiktoken.load
    from tiktoken_ext import openai_public

    ranks_file = shared_data / "tiktoken" / f"{name}.tiktoken"
    if not ranks_file.is_file():
        pytest.skip(f"{ranks_file} not found")
    ranks = tiktoken.load.load_tiktoken_bpe(str(ranks_file))
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks):
        spec = getattr(openai_public, name)()
    reference = tiktoken.Encoding(**spec)
    ours = BPETokenizer.from_tiktoken(name, ranks_file=ranks_file)
    return reference, ours


@pytest.fixture(scope="session")
def cl100k(shared_data):
    """(tiktoken reference, ours) for cl100k_base."""
    return _reference_and_ours(shared_data, "cl100k_base")


@pytest.fixture(scope="session")
def o200k(shared_data):
    """(tiktoken reference, ours) for o200k_base."""
    return _reference_and_ours(shared_data, "o200k_base")


@pytest.fixture(scope="session")
def shakespeare(shared_data) -> str:
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")
