"""The commands: what they print and write, and one line plus exit status 2 on bad input."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tokenizer import BPETokenizer, read_tokens
from tokenizer import encode as encode_command
from tokenizer import train as train_command
from tokenizer.data import embedded_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    path.write_text(embedded_corpus()[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_dir(corpus):
    out = corpus.parent / "bpe"
    status = train_command.main(
        [
            "--input",
            str(corpus),
            "--vocab-size",
            "500",
            "--out",
            str(out),
            "--pattern",
            "gpt2",
            "--special",
            "<|endoftext|>",
            "--no-progress",
        ]
    )
    assert status == 0
    return out


def test_train_prints_statistics_and_writes_files(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train_command.main(
            ["--input", str(corpus), "--vocab-size", "400", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "vocab size: 400" in printed
    assert "training time:" in printed
    assert "bytes/token" in printed
    assert {p.name for p in out.iterdir()} >= {"tokenizer.bpe", "tokenizer.vocab", "config.json"}
    tokenizer = BPETokenizer.load(out)
    assert tokenizer.vocab_size == 400


def test_train_module_runs_on_the_embedded_corpus(tmp_path):
    """`python -m tokenizer.train` with no input, as the README's first command runs it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenizer.train",
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "t"),
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "embedded corpus" in result.stdout and "vocab size: 300" in result.stdout


def test_encode_writes_a_token_file(trained_dir, corpus, tmp_path, capsys):
    out = tmp_path / "tokens.bin"
    assert (
        encode_command.main(
            [
                "--tokenizer",
                str(trained_dir),
                "--input",
                str(corpus),
                str(corpus),
                "--out",
                str(out),
                "--separator",
                "<|endoftext|>",
            ]
        )
        == 0
    )
    assert "tokens" in capsys.readouterr().out
    tokenizer = BPETokenizer.load(trained_dir)
    expected = tokenizer.encode(corpus.read_text(encoding="utf-8")) + [499]
    tokens = read_tokens(out)
    assert tokens.dtype.name == "uint16"
    assert tokens.tolist() == expected * 2


def run_cli(module, args, capsys):
    status = module.main(args)
    captured = capsys.readouterr()
    return status, captured.err


BAD_TRAIN_INPUTS = [
    (["--input", "{missing}"], "input file not found"),
    (["--input", "{empty}"], "is empty"),
    (["--input", "{latin1}"], "not UTF-8"),
    (["--input", "{corpus}", "--vocab-size", "200"], "vocab size 200 is too small"),
    (["--input", "{corpus}", "--vocab-size", "256", "--special", "<s>"], "at least 257"),
    (["--input", "{corpus}", "--pattern", "gpt5"], "unknown split pattern name 'gpt5'"),
    (["--input", "{corpus}", "--pattern", "(?<"], "not a valid regex"),
    (["--input", "{corpus}", "--vocab-size", "many"], "invalid int value"),
    (["--input", "{corpus}", "--backend", "unigram"], "invalid choice"),
    (["--input", "{corpus}", "--backend", "sentencepiece", "--vocab-size", "100"], "sentencepiece"),
    (["--input", "{corpus}", "--held-out", "1.5"], "held-out fraction"),
]


@pytest.mark.parametrize("args, message", BAD_TRAIN_INPUTS)
def test_train_bad_input_is_one_line_and_status_2(args, message, corpus, tmp_path, capsys):
    files = {
        "missing": tmp_path / "missing.txt",
        "empty": tmp_path / "empty.txt",
        "latin1": tmp_path / "latin1.txt",
        "corpus": corpus,
    }
    files["empty"].write_text("")
    files["latin1"].write_bytes("café".encode("latin-1"))
    args = [a.format(**files) for a in args] + ["--out", str(tmp_path / "o"), "--no-progress"]
    try:
        status, err = run_cli(train_command, args, capsys)
    except SystemExit as exit:  # argparse errors
        status, err = exit.code, capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_encode_bad_input(trained_dir, corpus, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o.bin")]
    damaged = tmp_path / "damaged.bpe"
    damaged.write_text("bpe-tokenizer v1\npattern 42\n")
    special = tmp_path / "special.txt"
    special.write_text("text with <|endoftext|> inside")
    cases = [
        (["--tokenizer", str(tmp_path), "--input", str(corpus)], "no tokenizer in"),
        (["--tokenizer", str(damaged), "--input", str(corpus)], "line 2"),
        (["--tokenizer", str(trained_dir), "--input", str(tmp_path / "nope.txt")], "not found"),
        (["--tokenizer", str(trained_dir), "--input", str(special)], "special.txt"),
        (
            ["--tokenizer", str(trained_dir), "--input", str(corpus), "--separator", "<eos>"],
            "not a special token",
        ),
        (
            [
                "--tokenizer",
                "cl100k_base",
                "--ranks",
                str(tmp_path / "x.tiktoken"),
                "--input",
                str(corpus),
            ],
            "rank file not found",
        ),
        (
            ["--tokenizer", str(trained_dir), "--input", str(corpus), "--out", str(tmp_path)],
            "is a directory",
        ),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = args + out
        status, err = run_cli(encode_command, args, capsys)
        assert status == 2, args
        assert err.count("\n") == 1 and message in err, err
    # Allowed as a control token, or as plain text, when asked.
    for mode in ["allow", "text"]:
        status, _ = run_cli(
            encode_command,
            ["--tokenizer", str(trained_dir), "--input", str(special), "--specials-in-text", mode]
            + out,
            capsys,
        )
        assert status == 0
        assert (499 in read_tokens(tmp_path / "o.bin").tolist()) == (mode == "allow")


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "run", interrupted)
    assert train_command.main(["--no-progress"]) == 130
    monkeypatch.setattr(encode_command, "run", interrupted)
    assert encode_command.main(["--tokenizer", "x", "--input", "y", "--out", "z"]) == 130


def test_help_explains_every_flag(capsys):
    for module, flags in [
        (
            train_command,
            [
                "--input",
                "--vocab-size",
                "--out",
                "--pattern",
                "--special",
                "--backend",
                "--seed",
                "--held-out",
            ],
        ),
        (encode_command, ["--tokenizer", "--input", "--out", "--separator"]),
    ]:
        with pytest.raises(SystemExit) as exit:
            module.main(["--help"])
        assert exit.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text
