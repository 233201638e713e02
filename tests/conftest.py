"""Fixtures shared by every package's tests."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    """`../shared/data` beside the repository, or `$SHARED_DATA` when set."""
    return Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets (Multi30k, Tiny Shakespeare, MNIST, tiktoken ranks).

    Tests that read real data take this fixture; they skip with a clear reason when the folder is
    absent instead of failing or downloading.
    """
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set SHARED_DATA to point at it)")
    return path
