"""Speculative decoding against the target alone: greedy token for token, and sampled tokens whose
empirical distribution matches the target's exact one (a chi-square test that a wrong acceptance
rule fails)."""

import copy

import pytest
import torch

from xllama import Llama, LlamaConfig, XLlamaError
from xllama import speculative as spec
from xllama.sampling import generate, next_token_probs
from xllama.speculative import speculative_generate


def model(seed, dim=32, layers=2, vocab=64, scale=1.0, **kw):
    torch.manual_seed(seed)
    m = Llama(
        LlamaConfig(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                    multiple_of=16, max_seq_len=64, **kw)
    ).eval()  # fmt: skip
    with torch.no_grad():
        m.output.weight.mul_(scale)  # sharper or flatter next-token distributions
    return m


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculation_is_the_targets_greedy_continuation(k):
    target, draft = model(0), model(1, dim=16, layers=1)
    prompt = [3, 14, 15, 9, 2]
    expected = generate(target, [prompt], 30, temperature=0)[0]
    tokens, stats = speculative_generate(target, draft, prompt, 30, k=k, temperature=0)
    assert tokens == expected
    assert stats.rounds >= 30 // (k + 1) and stats.drafted >= stats.accepted
    # A draft that is the target (a copy) is always right: k + 1 tokens a round.
    tokens, stats = speculative_generate(target, copy.deepcopy(target), prompt, 30, k=k,
                                         temperature=0)  # fmt: skip
    assert tokens == expected and stats.acceptance_rate == 1.0
    assert stats.rounds == -(-30 // (k + 1))


def test_eos_stops_and_bad_pairs_are_refused():
    target, draft = model(0), model(1, dim=16, layers=1)
    free, _ = speculative_generate(target, draft, [1, 2], 20, k=3, temperature=0)
    eos = free[5]
    stopped, _ = speculative_generate(target, draft, [1, 2], 20, k=3, temperature=0, stop_ids={eos})
    assert stopped == free[: free.index(eos) + 1]
    with pytest.raises(XLlamaError, match="vocabulary"):
        speculative_generate(target, model(2, vocab=65), [1], 4)
    with pytest.raises(XLlamaError, match="sliding-window"):
        speculative_generate(model(0, sliding_window=8), draft, [1], 4)
    with pytest.raises(XLlamaError, match="exceeds the context"):
        speculative_generate(target, draft, [1] * 60, 10)


# --------------------------------------------------------------------------------------------------
# The output distribution is the target's (Leviathan et al., Appendix A.1)
# --------------------------------------------------------------------------------------------------

VOCAB, PROMPT, DRAWS = 5, [1, 3, 2], 1500


def exact_two_token_distribution(target, temperature):
    """P(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1), by enumeration."""
    with torch.no_grad():
        first = next_token_probs(target(torch.tensor([PROMPT]))[:, -1], temperature)[0]
        rows = torch.tensor([PROMPT + [t] for t in range(VOCAB)])
        second = next_token_probs(target(rows)[:, -1], temperature)
    return first[:, None] * second  # (VOCAB, VOCAB)


def chi_square_p_value(target, draft, temperature=1.0):
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = exact_two_token_distribution(target, temperature).flatten() * DRAWS
    counts = torch.zeros(VOCAB * VOCAB)
    gen = torch.Generator().manual_seed(0)
    for _ in range(DRAWS):
        tokens, _ = speculative_generate(target, draft, PROMPT, 2, k=2, temperature=temperature,
                                         generator=gen)  # fmt: skip
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    # Cells expected to hold fewer than 5 draws are pooled into one (the test's usual condition).
    small = expected < 5
    observed = counts[~small].tolist() + ([counts[small].sum().item()] if small.any() else [])
    pooled = expected[~small].tolist() + ([expected[small].sum().item()] if small.any() else [])
    pooled = [e * DRAWS / sum(pooled) for e in pooled]  # float rounding: same total as observed
    return scipy_stats.chisquare(observed, pooled).pvalue


@pytest.fixture(scope="module")
def pair():
    # Two different random models over 5 tokens, the draft's distributions far sharper than the
    # target's: many proposals are rejected, so the residual rule matters.
    target = model(10, dim=16, layers=1, vocab=VOCAB, scale=8.0)
    return target, model(11, dim=16, layers=1, vocab=VOCAB, scale=30.0)


def test_sampled_tokens_follow_the_targets_distribution(pair):
    target, draft = pair
    assert chi_square_p_value(target, draft) > 1e-3


WRONG_RULES = {
    # keep every proposal: the draft's distribution
    "accept everything": lambda p, q, x, g: (
        len(x),
        int(torch.multinomial(p[len(x)], 1, generator=g)),
    ),
    # at a rejection, draw from p instead of the residual max(0, p - q)
    "redraw from p": lambda p, q, x, g: _redraw_from_p(p, q, x, g),
}


def _redraw_from_p(p, q, drafted, generator):
    for i, x in enumerate(drafted.tolist()):
        if torch.rand((), generator=generator) >= p[i, x] / q[i, x]:
            return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


@pytest.mark.parametrize("rule", WRONG_RULES)
def test_the_chi_square_test_rejects_a_wrong_acceptance_rule(pair, rule, monkeypatch):
    monkeypatch.setattr(spec, "verify", WRONG_RULES[rule])
    target, draft = pair
    assert chi_square_p_value(target, draft) < 1e-4


def test_verify_keeps_everything_when_the_draft_is_the_target():
    p = torch.softmax(torch.randn(4, 7), -1)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        drafted = torch.multinomial(p[:3], 1, generator=gen).flatten()
        n, _ = spec.verify(p, p[:3], drafted, gen)
        assert n == 3


def test_generate_command_speculates_with_a_draft_checkpoint(tmp_path, capsys):
    from transformer.training import run_command
    from xllama.generate import main as generate_main
    from xllama.train import main as train_main

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 60)
    common = ["--config", "tiny", "--device", "cpu", "--text", str(text), "--steps", "20"]
    common += ["--max-seq-len", "48", "--sample-tokens", "0", "--eval-every", "0"]
    assert train_main(common + ["--tokenizer", "char", "--out", str(tmp_path / "target")]) == 0
    draft_args = common + ["--tokenizer", "char", "--dim", "16", "--n-layers", "1"]
    assert train_main(draft_args + ["--out", str(tmp_path / "draft")]) == 0
    args = ["--checkpoint", str(tmp_path / "target"), "--prompt", "To be", "--temperature", "0"]
    args += ["--max-new-tokens", "20", "--no-stream"]
    capsys.readouterr()
    assert generate_main(args) == 0
    plain = capsys.readouterr().out
    assert generate_main(args + ["--draft", str(tmp_path / "draft"), "--speculate", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain  # greedy: the target's own continuation
    assert "drafted tokens accepted" in captured.err
    # A draft over other tokens (a BPE vocabulary) is one line, exit 2.
    assert train_main(common + ["--vocab-size", "300", "--out", str(tmp_path / "bpe")]) == 0
    capsys.readouterr()
    code = run_command(generate_main, args + ["--draft", str(tmp_path / "bpe")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another tokenizer" in err[0]
