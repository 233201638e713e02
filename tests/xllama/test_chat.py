"""Chat formats and stop tokens: the prompts are the ones Meta documents, written out here by hand
and tokenized by the `tokenizers` and `sentencepiece` libraries; the answers are Hugging Face's
greedy `generate` on those prompts."""

import ctypes
import io
import json
import re
import shutil

import pytest
import torch

from tests.conftest import BOS, EOS
from transformer.training import CheckpointError
from xllama.chat import (
    TurnCache,
    answer_ids,
    chat_format,
    dialog_prompt,
    llama2_prompt,
    llama3_prompt,
    stop_ids,
)
from xllama.convert import load_checkpoint
from xllama.generate import fit_context
from xllama.generate import main as generate_main
from xllama.model import XLlamaError
from xllama.sampling import generate
from xllama.tokenization import CharTokenizer, SentencePiece

transformers = pytest.importorskip("transformers")

EOT = BOS + 9  # <|eot_id|>, 128009 in Llama 3
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi there\n"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Who are you?"},
]


def header(role):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def llama3_text(dialog):
    """The Llama 3 Instruct prompt as Meta's model card writes it."""
    turns = "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in dialog)
    return "<|begin_of_text|>" + turns + header("assistant")


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_llama3_prompt_is_the_model_cards(llama3, kind):
    _, tokenizer, _ = load_checkpoint(llama3[kind])
    assert chat_format(tokenizer) == "llama3"
    expected = llama3["hf_tokenizer"].encode(llama3_text(DIALOG), add_special_tokens=False).ids
    assert llama3_prompt(tokenizer, DIALOG) == expected
    text = llama3_text(DIALOG) + "Fine.<|eot_id|>"  # the answer and the end of its turn
    whole = llama3["hf_tokenizer"].encode(text, add_special_tokens=False).ids
    assert expected + answer_ids(tokenizer, " Fine.\n", "llama3") == whole
    # A special token written in a message is text, not the end of the turn.
    sneaky = [{"role": "user", "content": "a <|eot_id|> b"}]
    assert llama3_prompt(tokenizer, sneaky).count(EOT) == 1


def test_llama_cpp_writes_the_llama3_dialog_as_we_do(llama3):
    """llama.cpp's own Llama 3 format (C++, `llama_chat_apply_template`), where it is installed."""
    llama_cpp = pytest.importorskip("llama_cpp")
    messages = [llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
                for m in DIALOG]  # fmt: skip
    array = (llama_cpp.llama_chat_message * len(messages))(*messages)
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"llama3", array, len(messages), True, buffer, 4096)
    text = buffer.raw[:n].decode()  # llama.cpp leaves <|begin_of_text|> to the tokenizer
    _, tokenizer, _ = load_checkpoint(llama3["hf"])
    ids = llama3["hf_tokenizer"].encode(text, add_special_tokens=False).ids
    assert llama3_prompt(tokenizer, DIALOG) == [BOS, *ids]


def test_llama2_prompt_is_metas(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hi there, who are you? Be brief. Hello! [INST] <<SYS>> [/INST]\n" * 50)
    spm.SentencePieceTrainer.train(  # as Llama 2's: no normalisation, spaces kept, byte fallback
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=320, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, model_type="bpe",
        minloglevel=2,
    )  # fmt: skip
    tokenizer = SentencePiece(tmp_path / "sp.model")
    assert chat_format(tokenizer) == "llama2"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    # Meta's llama/generation.py, one exchange:
    # <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! "
    expected = [1, *sp.encode(first), 2, 1, *sp.encode("[INST] Who are you? [/INST]")]
    assert llama2_prompt(tokenizer, DIALOG) == expected
    assert llama2_prompt(tokenizer, DIALOG[3:]) == [1, *sp.encode("[INST] Who are you? [/INST]")]
    # An answer as fine-tuning encodes it after the prompt: Meta's one-sequence exchange, split.
    whole = llama2_prompt(tokenizer, DIALOG[3:]) + answer_ids(tokenizer, " Hi! ", "llama2")
    assert whole == [1, *sp.encode("[INST] Who are you? [/INST] Hi! "), 2]
    for roles in (["user", "user"], ["assistant"], ["system"], ["user", "assistant"], []):
        with pytest.raises(XLlamaError, match="in turn, ending with the user's"):
            llama2_prompt(tokenizer, [{"role": r, "content": "x"} for r in roles])
    with pytest.raises(XLlamaError, match=re.escape("needs <|start_header_id|>, <|end_header")):
        chat_format(tokenizer, "llama3")
    with pytest.raises(XLlamaError, match="neither Llama 2's .* nor Llama 3's"):
        chat_format(CharTokenizer.from_text("abc"))
    with pytest.raises(XLlamaError, match="llama2 chat format needs a tokenizer with BOS and EOS"):
        chat_format(CharTokenizer.from_text("abc"), "llama2")


def test_stop_ids_take_the_end_of_turn_and_generation_config(llama3, tmp_path):
    _, tokenizer, _ = load_checkpoint(llama3["hf"])
    assert stop_ids(tokenizer) == {EOS, EOT, BOS + 8}  # end of text, of a turn, of a tool call
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 7]}))
    assert stop_ids(tokenizer, tmp_path) == {EOS, EOT, BOS + 8, 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(XLlamaError, match="eos_token_id must be a token id or a list"):
        stop_ids(tokenizer, tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not JSON text"):
        stop_ids(tokenizer, tmp_path)


def hf_answer(llama3, dialog, n, stops):
    """Hugging Face's greedy answer to the model card's prompt, stopping at `stops`."""
    tokens = llama3["hf_tokenizer"].encode(llama3_text(dialog), add_special_tokens=False).ids
    model = transformers.LlamaForCausalLM.from_pretrained(llama3["hf"]).eval()
    out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=stops)  # fmt: skip
    new = out[0, len(tokens) :].tolist()
    return llama3["hf_tokenizer"].decode(new, skip_special_tokens=True), new


def test_chat_answers_a_conversation_as_hugging_face_does(llama3, tmp_path, capsys, monkeypatch):
    # The answer to the first message stops at its third token once generation_config.json says
    # that token ends a text (the tiny random model never says <|eot_id|> by itself).
    checkpoint = tmp_path / "hf"
    shutil.copytree(llama3["hf"], checkpoint)
    _, free = hf_answer(llama3, DIALOG[:2], 8, None)
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": free[2]}))
    args = ["--checkpoint", str(checkpoint), "--chat", "--system", "Be brief.",
            "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu",
            "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n\nWho are you?\n"))
    assert generate_main(args) == 0
    stops = [EOS, EOT, BOS + 8, free[2]]
    first, tokens = hf_answer(llama3, DIALOG[:2], 8, stops)
    assert tokens == free[: free.index(free[2]) + 1]
    dialog = [*DIALOG[:2], {"role": "assistant", "content": first}, DIALOG[3]]
    second, _ = hf_answer(llama3, dialog, 8, stops)
    assert capsys.readouterr().out == f"{first}\n{second}\n"
    transcript = (tmp_path / "sample.txt").read_text()
    assert transcript == (f"system: Be brief.\n\nuser: Hi there\n\nassistant: {first.strip()}\n\n"
                          f"user: Who are you?\n\nassistant: {second.strip()}\n")  # fmt: skip


def test_a_chat_keeps_its_cache_for_what_the_next_prompt_shares(llama3):
    model, tokenizer, _ = load_checkpoint(llama3["hf"])
    turns = TurnCache(model.eval())
    first = dialog_prompt(tokenizer, DIALOG[:2], "llama3")
    answer = generate(model, [first], 5, temperature=0, cache=turns.cache_for(first))[0]
    turns.remember(first + answer)
    dialog = [*DIALOG[:2], {"role": "assistant", "content": tokenizer.decode(answer)}, DIALOG[3]]
    second = dialog_prompt(tokenizer, dialog, "llama3")
    cache = turns.cache_for(second)
    shared = 0
    while shared < min(len(turns.held), len(second) - 1) and turns.held[shared] == second[shared]:
        shared += 1
    assert cache.length == shared >= len(first)  # at least the first turn's prompt is kept
    assert generate(model, [second], 5, temperature=0, cache=cache) == generate(
        model, [second], 5, temperature=0
    )


def test_a_long_conversation_drops_its_oldest_exchanges(llama3):
    _, tokenizer, _ = load_checkpoint(llama3["hf"])
    exchange = [{"role": "user", "content": "to be " * 8}, {"role": "assistant", "content": "no"}]
    dialog = [DIALOG[0], *exchange * 6, DIALOG[3]]
    kept = [DIALOG[0], *exchange, DIALOG[3]]
    context = len(dialog_prompt(tokenizer, kept, "llama3")) + 1
    assert fit_context(list(dialog), tokenizer, "llama3", context) == dialog_prompt(
        tokenizer, kept, "llama3"
    )
    with pytest.raises(XLlamaError, match="the context is 5"):
        fit_context(list(dialog), tokenizer, "llama3", 5)
