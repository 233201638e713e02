"""Benchmark: BPE training time and encoding throughput, ours against the peers, in one process.

    python benchmarks/tokenizer.py                 # both corpora; naive trainer estimated (~3 min)
    python benchmarks/tokenizer.py --naive full    # also run the naive trainer to the end (minutes)

Training: the same corpus and vocabulary size (4,096) with the GPT-4 split pattern, by
  ours            BPETokenizer.train (pure Python, incremental counts + heap)
  HF tokenizers   BpeTrainer, Split(GPT-4 regex) + ByteLevel pre-tokenizer (Rust, its default threads)
  sentencepiece   BPE model, byte fallback (C++, on the corpus' lines)
  naive           Sennrich et al.'s loop as minbpe's RegexTokenizer runs it: recount every pair
                  of every chunk after each merge (pure Python)
Encoding: cl100k_base ranks, one thread, cold caches (each run starts with an empty chunk cache),
MB/s of UTF-8 input, by ours, tiktoken, HF tokenizers (a BPE model built from the same ranks),
puretiktoken, and a minbpe-style encoder (no cache; merges the lowest-ranked pair of each chunk
until none is left). Every encoder's ids are checked against tiktoken's.
Llama 3's form: the same ranks as a Hugging Face `tokenizer.json` made by `transformers`'
TikTokenConverter (Llama 3's split pattern), read by `BPETokenizer.from_tokenizer_json` and by HF
tokenizers; ids checked against HF's.

Corpora: the embedded corpus (pydoc_data.topics, ~465 KB) and Tiny Shakespeare (--shakespeare,
default ../shared/data/tinyshakespeare/input.txt beside the repository; skipped when absent).
Timings are the best of --repeats runs; on a shared machine the spread is large, so ratios
between tools measured side by side here mean more than absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tokenizer import BPETokenizer, bytes_to_unicode, embedded_corpus  # noqa: E402
from tokenizer.learn import naive_merge_steps, naive_merges  # noqa: E402
from tokenizer.pretokenize import PATTERNS, make_splitter  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


# ---------------------------------------------------------------------------------------------
# Training


def train_ours(text: str, vocab_size: int):
    return BPETokenizer.train(text, vocab_size, pattern="gpt4", progress=False)


def hf_pattern(pattern: str) -> str:
    """The split pattern for HF's Oniguruma engine, which reads `{1,3}+` not as a possessive
    quantifier but as `({1,3})+`, splitting digit runs differently; without the `+` it is the
    same pattern."""
    return pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def train_hf(text: str, vocab_size: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(hf_pattern(PATTERNS["gpt4"])), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def train_sentencepiece(text: str, vocab_size: int, workdir: Path):
    import sentencepiece

    lines = [line for line in text.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(workdir / "bench"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )


def naive_train(text: str, vocab_size: int, max_merges: int | None = None) -> list:
    """minbpe's RegexTokenizer.train, restated: every chunk kept (not deduplicated), every pair
    recounted after each merge, every chunk rewritten. Ties: highest count, then smallest pair."""
    num_merges = vocab_size - 256 if max_merges is None else min(max_merges, vocab_size - 256)
    return naive_merges(text, num_merges, PATTERNS["gpt4"])


def naive_estimate(text: str, vocab_size: int, ours: BPETokenizer, steps: int = 40):
    """Seconds the naive loop would take, from timing a few of its steps at two points.

    A naive step costs a + b * T: a part per chunk (there are always as many chunks) and a part
    per token (T, the tokens left, falls as merges proceed). Timing `steps` steps from the start
    and from halfway gives a and b; T after k merges is the corpus encoded with our tokenizer
    cut to its first k merges (rank-based encoding of the training chunks reproduces the
    training state, and the naive loop makes the same merges), measured at a few k and
    integrated. Returns (estimated seconds, the naive loop's first merges).
    """
    pieces = make_splitter(PATTERNS["gpt4"])(text)
    num_merges = len(ours.merges)

    def state_after(k: int) -> list[list[int]]:
        ranks = {token: rank for token, rank in ours._ranks.items() if rank < 256 + k}
        cut = BPETokenizer._from_ranks(ranks, ours.pattern)
        return [list(cut._cache[piece]) for piece in pieces]

    def timed_steps(k: int) -> tuple[float, float, list]:
        state = state_after(k)
        tokens_before = sum(map(len, state))
        seconds, merges = best_time(lambda: naive_merge_steps(state, 256 + k, steps), 1)
        return seconds / steps, (tokens_before + sum(map(len, state))) / 2, merges

    start_cost, start_tokens, merges = timed_steps(0)
    middle_cost, middle_tokens, _ = timed_steps(num_merges // 2)
    per_token = (start_cost - middle_cost) / (start_tokens - middle_tokens)
    per_step = start_cost - per_token * start_tokens
    checkpoints = sorted({0, 100, 250, 500, 1000, 2000, 3000, num_merges})
    checkpoints = [k for k in checkpoints if k <= num_merges]
    tokens = [sum(map(len, state_after(k))) for k in checkpoints]
    seconds = sum(
        (k1 - k0) * (per_step + per_token * (t0 + t1) / 2)
        for k0, k1, t0, t1 in zip(checkpoints, checkpoints[1:], tokens, tokens[1:])
    )
    return seconds, merges


# ---------------------------------------------------------------------------------------------
# Encoders on cl100k_base ranks


def hf_from_ranks(ours: BPETokenizer):
    """A HF tokenizers BPE model with the same vocabulary and merges as `ours`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    to_char = bytes_to_unicode()

    def name(token_id: int) -> str:
        return "".join(to_char[b] for b in ours.token_bytes(token_id))

    vocab = {name(rank): rank for rank in ours._ranks.values()}
    merges = [(name(a), name(b)) for (a, b), _ in sorted(ours.merges.items(), key=lambda m: m[1])]
    # ignore_merges: a chunk that is a whole token is that token, as in tiktoken.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(hf_pattern(ours.pattern)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def minbpe_style_encode(text: str, ranks: dict[bytes, int], split) -> list[int]:
    """minbpe's encode_ordinary, restated for byte ranks: no cache; per chunk, repeatedly find
    the lowest-ranked adjacent pair over all pairs and merge it."""
    ids: list[int] = []
    for chunk in split(text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) >= 2:
            pairs = [parts[i] + parts[i + 1] for i in range(len(parts) - 1)]
            best = min(range(len(pairs)), key=lambda i: ranks.get(pairs[i], float("inf")))
            if pairs[best] not in ranks:
                break
            parts[best : best + 2] = [pairs[best]]
        ids.extend(ranks[part] for part in parts)
    return ids


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path, default=SHARED / "tinyshakespeare/input.txt")
    parser.add_argument("--ranks", type=Path, default=SHARED / "tiktoken/cl100k_base.tiktoken")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument(
        "--naive",
        choices=["estimate", "full", "skip"],
        default="estimate",
        help="estimate: time the first 100 merges and scale by the tokens each later merge "
        "holds (see naive_estimate); full: run all merges (many minutes); skip",
    )
    args = parser.parse_args(argv)

    corpora = {"embedded (pydoc_data.topics)": embedded_corpus()}
    if args.shakespeare.is_file():
        corpora["Tiny Shakespeare"] = args.shakespeare.read_text(encoding="utf-8")
    else:
        print(f"skipping Tiny Shakespeare: {args.shakespeare} not found")

    import sentencepiece
    import tiktoken
    import tokenizers

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}, "
        f"tokenizers {tokenizers.__version__}, sentencepiece {sentencepiece.__version__}"
    )

    # Training with the fast tools, round-robin so that load on the machine hits all alike ----
    import tempfile

    import puretiktoken

    trainers_ = {
        "ours": train_ours,
        "HF tokenizers": train_hf,
        "sentencepiece": None,  # needs a work directory, set below
    }
    train_best: dict[tuple[str, str], float] = {}
    trained: dict[str, BPETokenizer] = {}
    with tempfile.TemporaryDirectory() as workdir:
        trainers_["sentencepiece"] = lambda t, v: train_sentencepiece(t, v, Path(workdir))
        for _ in range(args.repeats):
            for corpus_name, text in corpora.items():
                for tool, train in trainers_.items():
                    seconds, result = best_time(lambda f=train, t=text: f(t, args.vocab_size), 1)
                    key = (corpus_name, tool)
                    train_best[key] = min(train_best.get(key, float("inf")), seconds)
                    if tool == "ours":
                        trained[corpus_name] = result
        print("training measured", file=sys.stderr)

    # Encoding, round-robin too -------------------------------------------------------------
    encoding: dict[str, tuple[list[float], bool]] = {}
    if args.ranks.is_file():
        ours = BPETokenizer.from_tiktoken("cl100k_base", ranks_file=args.ranks)
        reference = ours.to_tiktoken("cl100k")
        hf = hf_from_ranks(ours)
        pure = puretiktoken.get_encoding("cl100k_base")
        split = make_splitter(ours.pattern)

        def ours_cold(text):
            ours.clear_cache()
            return ours.encode_ordinary(text)

        def pure_cold(text):
            pure._cache.clear()  # its piece -> ids cache, emptied for a cold start like ours
            return pure.encode_ordinary(text)

        encoders = {
            "ours (pure Python)": ours_cold,
            "tiktoken (Rust, 1 thread)": reference.encode_ordinary,
            "HF tokenizers (Rust)": lambda text: hf.encode(text, add_special_tokens=False).ids,
            "puretiktoken (pure Python)": pure_cold,
            "minbpe-style (pure Python)": lambda text: minbpe_style_encode(
                text, ours._ranks, split
            ),
        }
        expected = {name: reference.encode_ordinary(text) for name, text in corpora.items()}
        once = {"minbpe-style (pure Python)"}  # one run is plenty at its speed
        encoding = encoding_rates(encoders, corpora, expected, args.repeats, once)
        print("encoding measured", file=sys.stderr)
        llama3 = llama3_encoding(args.ranks, corpora, args.repeats)
    else:
        print(f"skipping encoding: {args.ranks} not found")

    # The naive trainer last: it takes minutes and nothing else waits on it -------------------
    naive: dict[str, tuple[float, str]] = {}
    for corpus_name, text in corpora.items():
        ours_tok = trained[corpus_name]
        if args.naive == "skip":
            naive[corpus_name] = (float("nan"), "")
        elif args.naive == "full":
            seconds, merges = best_time(lambda t=text: naive_train(t, args.vocab_size), 1)
            same = list(merges) == list(ours_tok.merges)
            naive[corpus_name] = (seconds, "" if same else " (MERGES DIFFER FROM OURS)")
        else:
            seconds, merges = naive_estimate(text, args.vocab_size, ours_tok)
            same = list(merges) == list(ours_tok.merges)[: len(merges)]
            naive[corpus_name] = (seconds, " est." + ("" if same else " (MERGES DIFFER)"))
        print(f"naive measured on {corpus_name}", file=sys.stderr)

    # Report ----------------------------------------------------------------------------------
    print(
        f"\n## Training: vocabulary {args.vocab_size}, GPT-4 split pattern, best of "
        f"{args.repeats}\n"
    )
    print("| corpus | ours | HF tokenizers | sentencepiece | naive | naive / ours | ours / HF |")
    print("|---|---|---|---|---|---|---|")
    for corpus_name, text in corpora.items():
        size = len(text.encode("utf-8"))
        ours_s = train_best[(corpus_name, "ours")]
        hf_s = train_best[(corpus_name, "HF tokenizers")]
        sp_s = train_best[(corpus_name, "sentencepiece")]
        naive_s, note = naive[corpus_name]
        print(
            f"| {corpus_name}, {size / 1e3:.0f} KB | {ours_s:.2f} s | {hf_s:.2f} s | {sp_s:.2f} s "
            f"| {naive_s:.0f} s{note} | {naive_s / ours_s:.0f}x | {ours_s / hf_s:.2f}x |"
        )
    if encoding:
        print(
            f"\n## Encoding: cl100k_base ranks, one thread, cold cache, MB/s, best of "
            f"{args.repeats}\n"
        )
        print_encoding_table(encoding, list(corpora), "ids = tiktoken's")
        print(f"\n## Encoding Llama 3's form (tokenizer.json), MB/s, best of {args.repeats}\n")
        print_encoding_table(llama3, list(corpora), "ids = HF's")
    return 0


def llama3_encoding(ranks_file: Path, corpora: dict[str, str], repeats: int) -> dict:
    """MB/s (per corpus) and ids-equal-HF's of ours and HF tokenizers on the ranks as Llama 3's
    tokenizer.json, cold caches, round-robin."""
    import tempfile

    from transformers.convert_slow_tokenizer import TikTokenConverter

    hf = TikTokenConverter(str(ranks_file)).converted()
    with tempfile.TemporaryDirectory() as workdir:
        hf.save(str(Path(workdir) / "tokenizer.json"))
        ours = BPETokenizer.from_tokenizer_json(Path(workdir) / "tokenizer.json")

    def ours_cold(text):
        ours.clear_cache()
        return ours.encode_ordinary(text)

    encoders = {"ours (pure Python)": ours_cold,
                "HF tokenizers (Rust)": lambda t: hf.encode(t, add_special_tokens=False).ids}  # fmt: skip
    expected = {name: encoders["HF tokenizers (Rust)"](text) for name, text in corpora.items()}
    return encoding_rates(encoders, corpora, expected, repeats)


def encoding_rates(encoders: dict, corpora: dict[str, str], expected: dict, repeats: int,
                   once=frozenset()) -> dict[str, tuple[list[float], bool]]:  # fmt: skip
    """{encoder: (best MB/s per corpus, whether every run's ids equal `expected`)}: one run at a
    time, encoders interleaved round by round so load on the machine hits all alike (those in
    `once` run in the first round only)."""
    rates = {(e, c): 0.0 for e in encoders for c in corpora}
    same = dict.fromkeys(encoders, True)
    for repeat in range(repeats):
        for encoder_name, encode in encoders.items():
            if encoder_name in once and repeat > 0:
                continue
            for corpus_name, text in corpora.items():
                seconds, ids = best_time(lambda f=encode, t=text: f(t), 1)
                rate = len(text.encode("utf-8")) / seconds / 1e6
                rates[encoder_name, corpus_name] = max(rates[encoder_name, corpus_name], rate)
                same[encoder_name] &= list(ids) == expected[corpus_name]
    return {e: ([rates[e, c] for c in corpora], same[e]) for e in encoders}


def print_encoding_table(results: dict, names: list[str], ids_header: str) -> None:
    """A Markdown table of `encoding_rates` results, with ours / each encoder per corpus."""
    print("| encoder | " + " | ".join(names) + f" | ours / it | {ids_header} |")
    print("|---" * (len(names) + 3) + "|")
    ours_rates = results["ours (pure Python)"][0]
    for encoder_name, (rates, same) in results.items():
        ratio = ", ".join(f"{o / r:.2f}" for o, r in zip(ours_rates, rates))
        print(f"| {encoder_name} | " + " | ".join(f"{r:.1f}" for r in rates)
              + f" | {ratio} | {'yes' if same else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
