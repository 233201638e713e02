"""xllama against Hugging Face `LlamaForCausalLM` (SDPA attention), same weights, float32, one process.

    python benchmarks/xllama.py [--threads 2] [--repeats 5] [--configs bench-4.9m bench-31.6m] [--compile]

Reports, per config:
- decoding tokens/s, batch 1 and batch 8, 256 new tokens after a 16-token prompt (greedy), ours
  (`xllama.generate`) against `transformers` `generate`; medians of interleaved repeats; with
  `--compile`, also ours with the one-token step under `torch.compile` (`generate(compile=True)`,
  compiled before timing);
- for batch-1 decoding, the weight bytes read per second as a fraction of the memory bandwidth
  measured here (a large tensor copy): the physical limit of batch-1 decoding;
- one training step (batch 8 x 256 tokens, forward + backward + AdamW) in ms, ours against HF;
- on the first config, cached against uncached decoding (recomputing the whole prefix every
  step) for growing lengths: the ratio grows with length;
- the sparse mixture-of-experts layer (`xllama.model.MoEFeedForward`, Mixtral's 8 experts, top 2)
  against Hugging Face's `MixtralSparseMoeBlock` holding the same weights: forward, and forward +
  backward, in ms, for a training batch (8 x 256 tokens) and a decoding batch (8 tokens).
  `--moe-only` runs just this table;
- `--quantized`: batch-1 decoding with weight-only int8 and int4 (groups of 32, 64, 128) weights
  in every linear layer (`xllama.quantize`, PyTorch's CPU weight-only kernels) against our float32,
  interleaved repeats in this one process: tokens/s, weight bytes read per token and the fraction of
  the copy bandwidth; and with `--quality RUN --text FILE`, the validation perplexity of a trained
  run (Tiny Shakespeare) in each format. `--quantized-only` runs just these tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer.quantize import weight_bytes  # noqa: E402
from xllama import LlamaConfig, loss_fn  # noqa: E402
from xllama.convert import (  # noqa: E402
    config_to_hf,
    load_checkpoint,  # noqa: E402
    load_hf,
)
from xllama.data import read_texts, split_train_val  # noqa: E402
from xllama.model import Llama, MoEFeedForward  # noqa: E402
from xllama.quantize import quantize_for_decoding  # noqa: E402
from xllama.sampling import generate  # noqa: E402

# The benchmark's two sizes (4.9M and 31.6M parameters; tests/xllama/test_model.py counts them
# against Hugging Face's LlamaForCausalLM).
CONFIGS = {
    "bench-4.9m": LlamaConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=4096,
        multiple_of=16,
        max_seq_len=512,
    ),
    "bench-31.6m": LlamaConfig(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=8192,
        multiple_of=32,
        max_seq_len=512,
    ),
}


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by copying a large float32 tensor (read + write), best of N."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def build_pair(name: str):
    """The same random weights in HF's LlamaForCausalLM and in ours."""
    import transformers

    cfg = CONFIGS[name]
    hf_cfg = transformers.LlamaConfig(**{
        k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")
    })  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = load_hf(Path(tmp)).eval()
    return ours, theirs


def time_it(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bench(ours, theirs, batch: int, repeats: int, compile=False, prompt_len=16, new=256):
    """tokens/s of ours, HF's and (with `compile`, else None) ours compiled; same greedy rows."""
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, vocab, (batch, prompt_len), generator=g)
    ours_fn = lambda: generate(ours, prompts.tolist(), new, temperature=0)
    compiled_fn = lambda: generate(ours, prompts.tolist(), new, temperature=0, compile=True)
    hf_fn = lambda: theirs.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad():
        # Same greedy continuation (a check that both decode the same model).
        a = ours_fn()
        b = hf_fn()[:, prompt_len:].tolist()
        same = sum(x == y for x, y in zip(a, b))
        if compile:
            same_compiled = sum(x == y for x, y in zip(compiled_fn(), a))  # compiles here
        t_ours, t_hf, t_compiled = [], [], []
        for _ in range(repeats):  # interleaved so background load hits all alike
            t_ours.append(time_it(ours_fn))
            t_hf.append(time_it(hf_fn))
            if compile:
                t_compiled.append(time_it(compiled_fn))
    tokens = batch * new
    speed = lambda times: tokens / statistics.median(times) if times else None
    if compile:
        same = min(same, same_compiled)
    return speed(t_ours), speed(t_hf), speed(t_compiled), same


def train_bench(ours, theirs, repeats: int, batch=8, seq=256):
    vocab = ours.config.vocab_size
    x = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    ours.train()
    theirs.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        loss = loss_fn(ours(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        logits = theirs(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    step_ours()
    step_hf()
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(time_it(step_ours))
        t_hf.append(time_it(step_hf))
    ours.eval()
    theirs.eval()
    return 1000 * statistics.median(t_ours), 1000 * statistics.median(t_hf)


@torch.no_grad()
def uncached_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence goes through the model every step."""
    seq = torch.tensor([prompt])
    for _ in range(new):
        nxt = model(seq, last_only=True)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[0, len(prompt) :].tolist()


def cache_bench(ours, lengths=(32, 64, 128, 256)):
    prompt = list(range(1, 17))
    rows = []
    for n in lengths:
        cached = lambda n=n: generate(ours, [prompt], n, temperature=0)
        t_cached = min(time_it(cached) for _ in range(3))
        t_plain = time_it(lambda n=n: uncached_greedy(ours, prompt, n))
        assert generate(ours, [prompt], n, temperature=0)[0] == uncached_greedy(ours, prompt, n)
        rows.append((n, n / t_cached, n / t_plain, t_plain / t_cached))
    return rows


def moe_pair(dim=512, hidden=1024, experts=8, top_k=2, implementation="grouped_mm"):
    """Our MoE layer and HF's `MixtralSparseMoeBlock` with the same weights (HF stores each
    expert's gate and up projections stacked in one tensor). `implementation` is HF's experts
    kernel: `grouped_mm` (what `MixtralForCausalLM` picks by default) or `eager` (a loop over the
    experts that received tokens)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoEFeedForward(dim, hidden, experts, top_k)
    hf_config = transformers.MixtralConfig(
        hidden_size=dim, intermediate_size=hidden, num_local_experts=experts,
        num_experts_per_tok=top_k,
    )  # fmt: skip
    hf_config._experts_implementation = implementation
    theirs = MixtralSparseMoeBlock(hf_config)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.experts.gate_up_proj.copy_(
            torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in ours.experts])
        )
        theirs.experts.down_proj.copy_(torch.stack([e.w2.weight for e in ours.experts]))
    return ours, theirs


def moe_bench(repeats: int, tokens: int, backward: bool, implementation: str):
    """Median ms of our MoE layer and HF's on (tokens, dim) inputs, interleaved repeats."""
    ours, theirs = moe_pair(implementation=implementation)
    ours.train(backward), theirs.train(backward)  # forward alone: inference, as in decoding
    x = torch.randn(1, tokens, ours.gate.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)

    def step(layer):
        if not backward:
            with torch.no_grad():
                layer(x)
            return
        inp = x.clone().requires_grad_(True)
        layer(inp).square().mean().backward()

    times = {"ours": [], "hf": []}
    for layer in (ours, theirs):
        step(layer)  # warm-up
    for _ in range(repeats):
        for name, layer in (("ours", ours), ("hf", theirs)):
            times[name].append(time_it(lambda layer=layer: step(layer)))
    return tuple(statistics.median(times[k]) * 1e3 for k in ("ours", "hf"))


def print_moe_table(repeats: int) -> None:
    print("Sparse MoE layer (dim 512, expert hidden 1024, 8 experts, top 2), ours against HF's")
    print("MixtralSparseMoeBlock with the same weights, median ms:")
    print()
    print("| HF experts kernel | tokens | pass | ours ms | HF ms | HF/ours |")
    print("|---|---|---|---|---|---|")
    for implementation in ("grouped_mm", "eager"):
        for tokens in (2048, 8):
            for backward in (False, True):
                o, h = moe_bench(repeats, tokens, backward, implementation)
                kind = "forward + backward" if backward else "forward"
                print(
                    f"| {implementation} | {tokens} | {kind} | {o:.2f} | {h:.2f} | {h / o:.2f}x |"
                )


# name: (kind, int4 group size); None = float32
FORMATS = {
    "float32": (None, 0),
    "int8": ("int8", 0),
    "int4 g32": ("int4", 32),
    "int4 g64": ("int4", 64),
    "int4 g128": ("int4", 128),
}


def quantized_copy(model: Llama, fmt: str) -> Llama:
    kind, group = FORMATS[fmt]
    copy = Llama(model.config)
    copy.load_state_dict(model.state_dict())
    if kind is not None:
        quantize_for_decoding(copy, kind, group or 64)
    return copy.eval()


def bytes_per_token(model: Llama) -> int:
    """Weight bytes batch-1 decoding reads per token: everything but the embedding table, of
    which one row."""
    emb = model.tok_embeddings.weight
    return weight_bytes(model) - emb.numel() * emb.element_size() + emb.size(1) * emb.element_size()


def print_quantized_tables(args, bw: float) -> None:
    print(
        "Batch-1 decoding with quantised weights (256 new tokens after 16, greedy), eager and with"
    )
    print(
        "the one-token step compiled (`generate(compile=True)`, compiled before timing), medians of"
    )
    print("interleaved repeats in one process:")
    print()
    print("| config | weights | MB read/token | eager tok/s | vs float32 | compiled tok/s | "
          "vs float32 | GB/s | of copy bandwidth |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        base, _ = build_pair(name)
        models = {fmt: quantized_copy(base, fmt) for fmt in FORMATS}
        prompt = torch.randint(1, base.config.vocab_size, (1, 16)).tolist()
        runs = {(fmt, c): [] for fmt in FORMATS for c in (False, True)}
        for model in models.values():
            for c in (False, True):
                generate(model, prompt, 8, temperature=0, compile=c)  # warm-up (and compile)
        for _ in range(args.repeats):
            for (fmt, c), times in runs.items():
                run = lambda m=models[fmt], c=c, p=prompt: generate(
                    m, p, 256, temperature=0, compile=c
                )  # noqa: E731
                times.append(time_it(run))
        speed = {key: 256 / statistics.median(t) for key, t in runs.items()}
        for fmt, model in models.items():
            read = bytes_per_token(model)
            eager, compiled = speed[(fmt, False)], speed[(fmt, True)]
            print(f"| {name} | {fmt} | {read / 1e6:.1f} | {eager:.0f} | "
                  f"{eager / speed[('float32', False)]:.2f}x | {compiled:.0f} | "
                  f"{compiled / speed[('float32', True)]:.2f}x | {read * compiled / 1e9:.2f} | "
                  f"{read * compiled / bw:.1%} |")  # fmt: skip
    if args.quality is None:
        return
    model, tokenizer, _ = load_checkpoint(args.quality)
    text = read_texts([args.text])
    val = split_train_val(tokenizer.encode(text), 0.1)[1]
    length = model.config.max_seq_len
    windows = val[: len(val) // (length + 1) * (length + 1)].view(-1, length + 1)
    print()
    print(f"Validation perplexity of {args.quality} ({len(windows)} windows of {length} tokens):")
    print()
    print("| weights | loss | perplexity | vs float32 |")
    print("|---|---|---|---|")
    base_ppl = None
    for fmt in FORMATS:
        quantized = quantized_copy(model, fmt)
        with torch.no_grad():
            loss = sum(
                float(loss_fn(quantized(w[:, :-1]), w[:, 1:])) * len(w) for w in windows.split(64)
            ) / len(windows)
        ppl = float(torch.tensor(loss).exp())
        base_ppl = base_ppl or ppl
        print(f"| {fmt} | {loss:.4f} | {ppl:.4f} | {ppl / base_ppl - 1:+.2%} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--skip-cache", action="store_true", help="no cached/uncached table")
    parser.add_argument("--skip-train", action="store_true", help="no training-step table")
    parser.add_argument(
        "--compile", action="store_true", help="also time ours with the decoding step compiled"
    )
    parser.add_argument("--skip-moe", action="store_true", help="no mixture-of-experts table")
    parser.add_argument("--moe-only", action="store_true", help="only the mixture-of-experts table")
    parser.add_argument("--quantized", action="store_true", help="also the int8/int4 tables")
    parser.add_argument(
        "--quantized-only", action="store_true", help="only the int8/int4 decoding tables"
    )
    parser.add_argument("--quality", type=Path, help="a trained run for the perplexity table")
    parser.add_argument("--text", type=Path, help="the text --quality's run trained on")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    if args.quantized_only:
        bw = memory_bandwidth()
        print(
            f"torch {torch.__version__}, {args.threads} threads; copy bandwidth {bw / 1e9:.1f} GB/s"
        )
        print()
        print_quantized_tables(args, bw)
        return 0
    if args.moe_only:
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{args.threads} threads, float32")  # fmt: skip
        print()
        print_moe_table(max(5, args.repeats))
        return 0

    bw = memory_bandwidth()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads, float32; measured copy bandwidth {bw / 1e9:.1f} GB/s"
    )
    print()
    compiled_head = " ours compiled tok/s | compiled/HF |" if args.compile else ""
    print(
        f"| config | params | batch | ours tok/s | HF tok/s | ours/HF |{compiled_head} same greedy rows |"
    )
    print("|---|---|---|---|---|---|" + "---|" * (3 if args.compile else 1))
    results = {}
    for name in args.configs:
        ours, theirs = build_pair(name)
        n = ours.num_params()
        for batch in (1, 8):
            o, h, c, same = decode_bench(ours, theirs, batch, args.repeats, args.compile)
            results[(name, batch)] = (o, h)
            compiled = f" {c:.0f} | {c / h:.2f}x |" if args.compile else ""
            print(f"| {name} | {n / 1e6:.1f}M | {batch} | {o:.0f} | {h:.0f} | {o / h:.2f}x |"
                  f"{compiled} {same}/{batch} |")  # fmt: skip
        results[name] = (ours, theirs)
    print()
    print("Batch-1 decoding against the memory-bandwidth limit (weights read once per token; the")
    print("embedding table contributes one row):")
    print()
    print("| config | weight MB read/token | ours GB/s | fraction of copy bandwidth | HF GB/s |")
    print("|---|---|---|---|---|")
    for name in args.configs:
        ours, _ = results[name]
        emb = ours.tok_embeddings.weight
        per_token = (ours.num_params() - emb.numel() + emb.size(1)) * 4
        o, h = results[(name, 1)]
        print(f"| {name} | {per_token / 1e6:.1f} | {per_token * o / 1e9:.2f} | "
              f"{per_token * o / bw:.1%} | {per_token * h / 1e9:.2f} |")  # fmt: skip
    if not args.skip_train:
        print()
        print("| config | train step ms (8 x 256, AdamW) ours | HF | HF/ours |")
        print("|---|---|---|---|")
        for name in args.configs:
            ours, theirs = results[name]
            o, h = train_bench(ours, theirs, max(3, args.repeats))
            print(f"| {name} | {o:.0f} | {h:.0f} | {h / o:.2f}x |")
    if not args.skip_cache:
        ours, _ = results[args.configs[0]]
        print()
        print(f"Cached vs uncached greedy decoding ({args.configs[0]}, batch 1, 16-token prompt):")
        print()
        print("| new tokens | cached tok/s | uncached tok/s | speed-up |")
        print("|---|---|---|---|")
        for n, c, u, r in cache_bench(ours):
            print(f"| {n} | {c:.0f} | {u:.0f} | {r:.1f}x |")
    if not args.skip_moe:
        print()
        print_moe_table(max(5, args.repeats))
    if args.quantized:
        print()
        print_quantized_tables(args, bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
