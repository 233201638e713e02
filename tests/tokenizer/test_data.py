"""Input files and the token file format the language-model packages read."""

import json

import numpy as np
import pytest

from tokenizer import InputFileError, TokenFileError, read_text_file, read_tokens, write_tokens
from tokenizer.data import embedded_corpus, split_held_out


def test_embedded_corpus():
    text = embedded_corpus()
    assert 400_000 < len(text.encode("utf-8")) < 600_000


@pytest.mark.parametrize(
    "vocab_size, dtype", [(256, "uint16"), (65536, "uint16"), (65537, "uint32")]
)
def test_write_and_read_tokens(tmp_path, vocab_size, dtype):
    ids = [0, 1, vocab_size - 1, 7]
    path = write_tokens(tmp_path / "a.bin", ids, vocab_size, meta={"note": "x"})
    assert path.stat().st_size == len(ids) * np.dtype(dtype).itemsize
    meta = json.loads((tmp_path / "a.bin.json").read_text())
    assert meta["dtype"] == dtype and meta["count"] == 4 and meta["note"] == "x"
    tokens = read_tokens(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype(dtype)
    assert tokens.tolist() == ids
    # The bytes are little-endian whatever the machine: id 1 is 01 00 (00 00).
    size = np.dtype(dtype).itemsize
    assert path.read_bytes()[size : 2 * size] == (1).to_bytes(size, "little")


def test_empty_token_file(tmp_path):
    path = write_tokens(tmp_path / "e.bin", [], 100)
    assert read_tokens(path).tolist() == []


def test_token_file_errors(tmp_path):
    with pytest.raises(TokenFileError, match="outside the vocabulary"):
        write_tokens(tmp_path / "x.bin", [1, 300], 256)
    path = write_tokens(tmp_path / "t.bin", list(range(10)), 1000)
    with open(path, "ab") as f:
        f.write(b"\x00")  # one stray byte
    with pytest.raises(TokenFileError, match="has 21 bytes"):
        read_tokens(path)
    meta_path = tmp_path / "t.bin.json"
    meta = json.loads(meta_path.read_text())
    meta["dtype"] = "float32"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TokenFileError, match="unknown dtype"):
        read_tokens(path)
    meta_path.write_text("{not json")
    with pytest.raises(TokenFileError, match="not valid JSON"):
        read_tokens(path)
    with pytest.raises(TokenFileError, match="sidecar not found"):
        read_tokens(tmp_path / "missing.bin")


def test_read_text_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(InputFileError, match="not UTF-8.*0xe9 at offset 3"):
        read_text_file(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputFileError, match="empty"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(InputFileError, match="directory"):
        read_text_file(tmp_path)


def test_split_held_out_cuts_at_a_line():
    documents = ["first line\nsecond line\n", "third\nfourth line that is long\n"]
    train, held_out = split_held_out(documents, 0.25)
    assert "".join(train) + held_out == "".join(documents)
    assert held_out.startswith("fourth")
