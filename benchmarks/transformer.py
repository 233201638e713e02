"""Our Transformer against torch.nn.Transformer, side by side in one process.

    python benchmarks/transformer.py                  # the `small` config, CPU
    python benchmarks/transformer.py --device cuda --config base

1. Training throughput (target tokens/s): forward + backward + Adam step of our model and of
   torch.nn.Transformer with identical sizes (same embeddings, positions and output projection
   around it, post-norm, dropout 0.1) on identical token-count batches, timed alternately.
2. The label-smoothed loss alone (§5.4), forward + backward over one batch's logits in float32
   and bfloat16 (--loss-batch sentences × --tgt-len positions × --vocab): ours (q gives padding no
   mass, gradient written out, computed in float32) against
   `torch.nn.functional.cross_entropy(label_smoothing=0.1)`, the call a user would otherwise make.
3. Beam-search decoding (beam 4, α 0.6): sentences/s.
4. Incremental decoding (cached decoder keys/values, encoder keys/values projected once) against
   recomputing the decoder over the whole prefix at every step, greedy: the speed-up.

On a CPU the process keeps freed memory as the trainers do (`training.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# This file's name shadows the package when run as a script: put the repository first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer.model import (  # noqa: E402
    Transformer,
    beam_search,
    greedy_decode,
    label_smoothed_loss,
)
from transformer.train import PRESETS  # noqa: E402
from transformer.training import keep_freed_memory  # noqa: E402


class TorchTransformer(nn.Module):
    """torch.nn.Transformer with our embedding / positions / tied output projection around it."""

    def __init__(self, ours: Transformer):
        super().__init__()
        c = ours.config
        self.embedding = type(ours.source_embedding)(c)
        self.core = nn.Transformer(
            c.d_model,
            c.n_heads,
            c.n_encoder_layers,
            c.n_decoder_layers,
            c.d_ff,
            c.dropout,
            batch_first=True,
        )
        self.output = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.output.weight = self.embedding.tokens.weight
        self.pad_id = c.pad_id

    def forward(self, source, target_in):
        causal = nn.Transformer.generate_square_subsequent_mask(target_in.size(1))
        pad = source == self.pad_id
        hidden = self.core(
            self.embedding(source),
            self.embedding(target_in),
            tgt_mask=causal,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
            tgt_is_causal=True,
        )
        return self.output(hidden)


def make_batches(n, batch, src_len, tgt_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        source = torch.randint(3, vocab, (batch, src_len), generator=g)
        target = torch.randint(3, vocab, (batch, tgt_len + 1), generator=g)
        for row in range(batch):  # realistic padding: varied sentence lengths
            cut = int(torch.randint(src_len // 2, src_len + 1, (1,), generator=g))
            source[row, cut:] = 0
        out.append((source, target[:, :-1], target[:, 1:]))
    return out


def train_throughput(model, batches, device, repeats):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    model.train()
    tokens, elapsed = 0, 0.0
    for r in range(repeats + 1):
        for source, target_in, target_out in batches:
            source, target_in, target_out = (
                source.to(device),
                target_in.to(device),
                target_out.to(device),
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss, n = label_smoothed_loss(model(source, target_in), target_out)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:  # the first pass warms up
                elapsed += time.perf_counter() - start
                tokens += n
    return tokens / elapsed


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def greedy_recomputing_the_prefix(model, source, bos_id: int, extra: int) -> torch.Tensor:
    """Greedy decoding without a cache (the decoder reads the whole prefix every step), to time
    against the cached `greedy_decode`; no EOS, so every sentence runs `src_len + extra` steps."""
    mask = model.source_mask(source)
    memory = model.encode(source, mask)
    tokens = torch.full((source.size(0), 1), bos_id, dtype=torch.long, device=source.device)
    for _ in range(source.size(1) + extra):
        logits = model.decode(tokens, memory, mask)[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=64, help="sentences per training batch")
    parser.add_argument("--src-len", type=int, default=24)
    parser.add_argument("--tgt-len", type=int, default=24)
    parser.add_argument("--train-batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (alternating)")
    parser.add_argument(
        "--loss-batch", type=int, default=150, help="sentences of the loss's batch (Multi30k's)"
    )
    parser.add_argument("--decode-sentences", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=40, help="greedy steps, no EOS")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)
    config = replace(PRESETS[args.config].model, vocab_size=args.vocab)
    ours = Transformer(config).to(device)
    theirs = TorchTransformer(ours).to(device)
    batches = make_batches(args.train_batches, args.batch, args.src_len, args.tgt_len, args.vocab)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    print(
        f"config {args.config}: d_model {config.d_model}, layers {config.n_encoder_layers}+"
        f"{config.n_decoder_layers}, heads {config.n_heads}, d_ff {config.d_ff}, vocab "
        f"{config.vocab_size}; batches of {args.batch}×{args.src_len} source / "
        f"×{args.tgt_len} target tokens"
    )

    # 1. training throughput, alternating to share the machine's noise fairly
    ours_tps, theirs_tps = [], []
    for _ in range(args.repeats):
        ours_tps.append(train_throughput(ours, batches, device, 1))
        theirs_tps.append(train_throughput(theirs, batches, device, 1))
    o, t = max(ours_tps), max(theirs_tps)
    print(
        f"training  ours {o:9.0f} tgt tok/s | torch.nn.Transformer {t:9.0f} tgt tok/s | "
        f"ratio {o / t:.2f}"
    )

    # 2. the loss alone, alternating
    g = torch.Generator().manual_seed(2)
    target = torch.randint(1, args.vocab, (args.loss_batch, args.tgt_len), generator=g)
    target[: args.loss_batch // 4, -4:] = config.pad_id  # some padding, as in a real batch
    target = target.to(device)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(args.loss_batch, args.tgt_len, args.vocab, generator=g)
        logits = (3 * logits).to(device, dtype).requires_grad_()

        def loss_ours(logits=logits):
            logits.grad = None
            label_smoothed_loss(logits, target, 0.1, config.pad_id)[0].backward()

        def loss_torch(logits=logits):
            logits.grad = None
            F.cross_entropy(
                logits.flatten(0, 1), target.flatten(), ignore_index=config.pad_id,
                label_smoothing=0.1, reduction="sum",
            ).backward()  # fmt: skip

        times = {loss_ours: [], loss_torch: []}
        for _ in range(2 + 5 * args.repeats):
            for fn in times:
                times[fn].append(timed(fn)[1])
        o, t = (min(times[fn][2:]) * 1e3 for fn in (loss_ours, loss_torch))
        print(
            f"loss {str(dtype)[6:]:>8}  ours {o:7.1f} ms | F.cross_entropy {t:7.1f} ms | "
            f"ratio {t / o:.2f}"
        )

    # 3./4. decoding with random weights sharpened so that hypotheses do not end at once
    ours.eval()
    g = torch.Generator().manual_seed(1)
    source = torch.randint(3, args.vocab, (args.decode_sentences, args.src_len), generator=g)
    source = source.to(device)
    no_eos = args.vocab + 7  # an id that never appears: every sentence runs to the length limit
    extra = args.decode_steps - args.src_len
    greedy_decode(ours, source[:2], 1, no_eos, extra)  # warm-up
    _, cached = timed(lambda: greedy_decode(ours, source, 1, no_eos, extra))
    _, full = timed(lambda: greedy_recomputing_the_prefix(ours, source, 1, extra))
    print(
        f"greedy, {args.src_len + extra} steps: cached {args.decode_sentences / cached:7.1f} "
        f"sent/s | recomputed prefix {args.decode_sentences / full:7.1f} sent/s | "
        f"speed-up {full / cached:.2f}×"
    )
    _, beam = timed(lambda: beam_search(ours, source, 1, no_eos, 4, 0.6, extra))
    print(f"beam 4, {args.src_len + extra} steps: {args.decode_sentences / beam:7.1f} sent/s")


if __name__ == "__main__":
    main()
