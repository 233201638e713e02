"""JSONL formats (with file:line errors), batching, and the gold labeler of the embedded task."""

import json

import pytest

from instructgpt.data import (
    ByteTokenizer,
    DataError,
    GoldLabeler,
    collate,
    encode_pair,
    read_demonstrations,
    read_rankings,
    task_demonstrations,
    task_prompts,
    write_jsonl,
)


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
    return path


def test_formats_read_and_comparisons_are_k2_rankings(tmp_path):
    sft = read_demonstrations(_write(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}]))
    assert sft[0].prompt == "a" and sft[0].response == "b"
    data = read_rankings(
        _write(
            tmp_path / "r.jsonl",
            [
                {"prompt": "p", "chosen": "good", "rejected": "bad"},
                {"prompt": "q", "responses": ["x", "y", "z"]},
            ],
        )
    )
    assert data[0].responses == ["good", "bad"] and data[1].responses == ["x", "y", "z"]
    # A chat model's data, as TRL writes it: a dialog prompt, the assistant's message as response.
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    answer = [{"role": "assistant", "content": "Hello."}]
    sft = read_demonstrations(
        _write(tmp_path / "c.jsonl", [{"prompt": dialog, "response": answer}])
    )
    assert (
        sft[0].prompt == (("system", "Be brief."), ("user", "Hi")) and sft[0].response == "Hello."
    )
    data = read_rankings(_write(tmp_path / "d.jsonl", [{"prompt": dialog, "chosen": answer,
                                                         "rejected": "Go away."}]))  # fmt: skip
    assert data[0].responses == ["Hello.", "Go away."]
    write_jsonl(tmp_path / "again.jsonl", data)  # as the pipeline writes rankings
    assert read_rankings(tmp_path / "again.jsonl") == data
    # TRL's SFT form: the conversation, the last (assistant) message being the response.
    messages = {"messages": [*dialog, *answer]}
    assert read_demonstrations(_write(tmp_path / "m.jsonl", [messages])) == sft
    with pytest.raises(DataError, match="m2.jsonl:1: 'messages' must end with the assistant's"):
        read_demonstrations(_write(tmp_path / "m2.jsonl", [{"messages": dialog}]))


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "p", "chosen": "c"}, "2: missing field 'rejected'"),
        ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "2: field 'prompt' is empty"),
        ({"prompt": "p", "responses": ["only"]}, "2: a ranking needs at least 2 responses"),
        ("{not json", "2: not valid JSON"),
        ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "2: a dialog prompt is"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "c", "rejected": "r"},
            "2: a dialog is an optional system message, then user and assistant",
        ),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
            "2: field 'chosen' must be a string or one assistant message",
        ),  # fmt: skip
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, line])
    with pytest.raises(DataError) as err:
        read_rankings(path)
    assert str(err.value).startswith(f"{path}:") and message in str(err.value)


def test_sft_line_missing_response(tmp_path):
    path = _write(tmp_path / "s.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"s.jsonl:1: missing field 'response'"):
        read_demonstrations(path)


def test_collate_marks_response_tokens_on_either_side():
    tok = ByteTokenizer()
    a, b = encode_pair(tok, "ab", "cde", 64), encode_pair(tok, "x", "y", 64)
    assert a == ([97, 98, 99, 100, 101, 256], 2)
    right, left = collate([a, b], 0, "right"), collate([a, b], 0, "left")
    assert right.response_mask[1].tolist() == [0, 1, 1, 0, 0, 0]
    assert left.response_mask[1].tolist() == [0, 0, 0, 0, 1, 1]
    assert left.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert left.tokens[1, 3:].tolist() == [120, 121, 256]


def test_embedded_task_splits_are_disjoint_and_labeler_prefers_upbeat_fluent_text():
    train, heldout = set(task_prompts("train")), set(task_prompts("heldout"))
    assert len(train) > 500 and len(heldout) > 50 and not train & heldout
    assert all(len(d.response.split()) <= 14 for d in task_demonstrations("train"))
    gold = GoldLabeler()
    prompt = "The default value is"
    assert gold.score(prompt, " a new and useful object.") > gold.score(
        prompt, " not an object and raises an error."
    )
    # repetition and words outside the corpus cost more than the lexicon gives
    assert gold.score(prompt, " new new new new new") < gold.score(prompt, " a new object.")
    assert gold.score(prompt, " zzqx blorp new useful") < gold.score(prompt, " a new object.")
    assert gold.score(prompt, " new") == -2.0  # too short to be a continuation
    ranked = gold.rank(prompt, [" not valid.", " a new object.", " a new useful object."])
    assert ranked == [" a new useful object.", " a new object.", " not valid."]


def test_text_with_unicode_line_separators_round_trips(tmp_path):
    """Generated text can hold U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False)
    writes raw; a JSON Lines record ends at "\\n" only (a pipeline once failed on line 337)."""
    from instructgpt.data import write_jsonl

    odd = "line\u2028separator, next\x85line, para\u2029graph, \r carriage"
    records = [
        {"prompt": "p", "responses": [odd, "plain"]},
        {"prompt": "q", "responses": ["a", odd]},
    ]
    write_jsonl(tmp_path / "r.jsonl", records)
    data = read_rankings(tmp_path / "r.jsonl")
    assert [r.responses for r in data] == [[odd, "plain"], ["a", odd]]
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"prompt": "a", "response": "b"}\r\n{"prompt": "c", "response": "d"}\r\n')
    assert [d.response for d in read_demonstrations(crlf)] == ["b", "d"]
