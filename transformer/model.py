"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017).

Read top to bottom beside the paper:

- `TransformerConfig` and the presets: `base` and `big` are Table 3's models; `small` and `tiny`
  are CPU-sized versions of the same architecture.
- §3.5 `sinusoidal_positions`; §3.4 `Embedding` (shared by source, target and the output
  projection when the vocabulary is joint, scaled by √d_model); §3.3 `FeedForward` (Eq. 2).
- §3.1 `EncoderLayer` and `DecoderLayer`: each sub-layer is wrapped as LayerNorm(x + Sublayer(x))
  (post-norm, the paper's choice). `pre_norm=True` computes x + Sublayer(LayerNorm(x)) instead
  (Wang et al. 2019; Xiong et al. 2020), which trains more stably in deep stacks without warmup
  and then needs a final LayerNorm at the top of each stack.
- `Transformer`: `encode`, `decode` (teacher forcing or one incremental step with cached keys and
  values), `forward` (logits).
- §5.3 `learning_rate` (Eq. 3); §5.4 `label_smoothed_loss`.
- §6.1 decoding: `greedy_decode` and `beam_search` (beam 4, length penalty α = 0.6 from Wu et al.
  2016, maximum output length = input length + 50).

The attention itself (Eq. 1, §3.2.2) is `transformer.attention.MultiHeadAttention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention, StaticKVCache, padding_mask
from .dropout import Dropout, dropout
from .training.config import ConfigError, check_config, param

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class TransformerConfig:
    """The model's shape; the defaults are the paper's base model (Table 3)."""

    vocab_size: int = param(
        37000,
        "joint source/target vocabulary size (paper: ~37,000 BPE tokens); training sets it from the data",
    )
    d_model: int = param(512, "width of every layer's input and output, d_model")
    n_encoder_layers: int = param(6, "N, the number of encoder layers")
    n_decoder_layers: int = param(6, "N, the number of decoder layers")
    n_heads: int = param(8, "h, the number of attention heads (d_k = d_v = d_model / h)")
    d_ff: int = param(2048, "inner width of the position-wise feed-forward network, d_ff")
    dropout: float = param(
        0.1, "P_drop: dropout on each sub-layer output and on the embedding + position sums (§5.4)"
    )
    attention_dropout: float = param(
        0.0, "dropout on the attention weights (not in the paper; tensor2tensor later used 0.1)"
    )
    word_dropout: float = param(
        0.0,
        "dropout of whole tokens: zero a token's embedding, source and target side (Sennrich et "
        "al. 2016; not in the paper)",
        added=True,
    )
    pre_norm: bool = param(
        False,
        "LayerNorm before each sub-layer instead of after the residual sum (not the paper's choice)",
    )
    tie_embeddings: bool = param(
        True, "share source, target and output-projection weights (§3.4; needs a joint vocabulary)"
    )
    activation: str = param(
        "relu",
        "the feed-forward non-linearity: relu (Eq. 2) or gelu (BERT, GPT; exact erf form)",
        added=True,
    )
    max_len: int = param(1024, "longest sequence the sinusoidal position table covers")
    norm_eps: float = param(1e-5, "LayerNorm epsilon")
    pad_id: int = param(
        0,
        "the padding token's id: never attended to, never predicted (label smoothing gives it no mass)",
    )

    def __post_init__(self):
        check_config(
            self,
            positive=("vocab_size", "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads",
                      "d_ff", "max_len", "norm_eps"),
            non_negative=("pad_id",),
            below_one=("dropout", "attention_dropout", "word_dropout"),
        )  # fmt: skip
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"TransformerConfig.activation {self.activation!r} is not one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads})"
            )
        if self.pad_id >= self.vocab_size:
            raise ConfigError(f"TransformerConfig.pad_id {self.pad_id} is not in the vocabulary")


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(same)."""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    frequency = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.float()


class Embedding(nn.Module):
    """§3.4: learned embeddings multiplied by √d_model, plus the fixed positional encoding (§3.5).

    With `word_dropout` > 0 a training step also zeroes whole token embeddings (one draw per token,
    the kept ones scaled by 1 / (1 − p)) before the positions are added: the "dropout of full
    words" Sennrich et al. (2016) used for small corpora, after Gal & Ghahramani (2016)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.scale = math.sqrt(config.d_model)
        self.tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        nn.init.normal_(self.tokens.weight, std=config.d_model**-0.5)
        with torch.no_grad():
            self.tokens.weight[config.pad_id].zero_()
        self.register_buffer(
            "positions", sinusoidal_positions(config.max_len, config.d_model), persistent=False
        )
        self.dropout = Dropout(config.dropout)
        self.word_dropout = config.word_dropout

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        """Token ids (batch, T) at positions start..start+T-1 -> (batch, T, d_model)."""
        end = start + ids.size(1)
        if end > self.positions.size(0):
            raise ValueError(
                f"sequence of {end} positions exceeds max_len {self.positions.size(0)}"
            )
        tokens = self.tokens(ids) * self.scale
        if self.training and self.word_dropout:
            tokens = tokens * dropout(tokens.new_ones(*ids.shape, 1), self.word_dropout)
        return self.dropout(tokens + self.positions[start:end])


class FeedForward(nn.Module):
    """§3.3, Eq. (2): FFN(x) = max(0, x W1 + b1) W2 + b2, applied at each position (BERT and GPT
    put GELU where the max(0, ·) is: `activation="gelu"`)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu"):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.activation(self.w1(x)))


class Residual(nn.Module):
    """§3.1 + §5.4: the residual connection around a sub-layer, LayerNorm(x + Dropout(Sublayer(x)))
    (post-norm, the paper), or x + Dropout(Sublayer(LayerNorm(x))) with `pre_norm`.

    A layer calls `inner(x)` for what its sub-layer reads and `outer(x, y)` with the sub-layer's
    output y: `x = residual.outer(x, sublayer(residual.inner(x)))`."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)
        self.pre_norm = config.pre_norm

    def inner(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.pre_norm else x

    def outer(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.dropout(y)
        return x if self.pre_norm else self.norm(x)


class EncoderLayer(nn.Module):
    """§3.1: multi-head self-attention, then the feed-forward network, each in a residual."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attention = MultiHeadAttention(
            config.d_model, config.n_heads, dropout=config.attention_dropout
        )
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.activation)
        self.residual1 = Residual(config)
        self.residual2 = Residual(config)

    def forward(self, x: Tensor, source_mask: Tensor | None) -> Tensor:
        r1, r2 = self.residual1, self.residual2
        x = r1.outer(x, self.self_attention(r1.inner(x), mask=source_mask))
        return r2.outer(x, self.feed_forward(r2.inner(x)))


class DecoderLayer(nn.Module):
    """§3.1: masked self-attention, attention over the encoder output, then the FFN."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attention = MultiHeadAttention(
            config.d_model, config.n_heads, dropout=config.attention_dropout
        )
        self.cross_attention = MultiHeadAttention(
            config.d_model, config.n_heads, dropout=config.attention_dropout
        )
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.activation)
        self.residual1 = Residual(config)
        self.residual2 = Residual(config)
        self.residual3 = Residual(config)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        source_mask: Tensor | None,
        self_cache: KVCache | None = None,
        cross_cache: StaticKVCache | None = None,
    ) -> Tensor:
        # Masking keeps position i from attending to later positions (§3.2.3). With a cache the new
        # positions come after the cached ones; the causal mask is aligned to the end of the keys.
        causal = self_cache is None or x.size(1) > 1
        r1, r2, r3 = self.residual1, self.residual2, self.residual3
        x = r1.outer(x, self.self_attention(r1.inner(x), is_causal=causal, cache=self_cache))
        x = r2.outer(
            x, self.cross_attention(r2.inner(x), memory, mask=source_mask, cache=cross_cache)
        )
        return r3.outer(x, self.feed_forward(r3.inner(x)))


class DecoderState:
    """What incremental decoding keeps between steps: one self-attention `KVCache` per decoder
    layer (grows by one position per step) and one `StaticKVCache` per layer for the encoder
    output's keys and values, projected once."""

    def __init__(self, model: Transformer, batch: int, max_len: int, device, dtype):
        config = model.config
        head_dim = config.d_model // config.n_heads
        self.self_caches = [
            KVCache(batch, config.n_heads, max_len, head_dim, device=device, dtype=dtype)
            for _ in range(config.n_decoder_layers)
        ]
        self.cross_caches = [StaticKVCache() for _ in range(config.n_decoder_layers)]

    @property
    def position(self) -> int:
        return self.self_caches[0].position

    def reorder(self, index: Tensor) -> None:
        """Follow the surviving beam hypotheses. The encoder-side caches need no reordering: the
        hypotheses of one sentence share its source."""
        for cache in self.self_caches:
            cache.reorder(index)


class Transformer(nn.Module):
    """The encoder-decoder model (Figure 1) with a linear + softmax output over the vocabulary."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.source_embedding = Embedding(config)
        self.target_embedding = (
            self.source_embedding if config.tie_embeddings else Embedding(config)
        )
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(config) for _ in range(config.n_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(config) for _ in range(config.n_decoder_layers)
        )
        # Pre-norm stacks end un-normalised; the paper's post-norm output is already normalised.
        norm = lambda: nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.encoder_norm = norm() if config.pre_norm else nn.Identity()
        self.decoder_norm = norm() if config.pre_norm else nn.Identity()
        self.output_projection = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:  # §3.4: the same matrix embeds tokens and scores them
            self.output_projection.weight = self.source_embedding.tokens.weight
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embedding" not in name and "output_projection" not in name:
                nn.init.xavier_uniform_(p)

    def source_mask(self, source: Tensor) -> Tensor:
        """(batch, 1, 1, S): True where a source position is a real token, not padding."""
        return padding_mask(source == self.config.pad_id)

    def encode(self, source: Tensor, source_mask: Tensor | None = None) -> Tensor:
        """Source ids (batch, S) -> the encoder output ("memory"), (batch, S, d_model)."""
        if source_mask is None:
            source_mask = self.source_mask(source)
        x = self.source_embedding(source)
        for layer in self.encoder_layers:
            x = layer(x, source_mask)
        return self.encoder_norm(x)

    def decode(
        self,
        target: Tensor,
        memory: Tensor,
        source_mask: Tensor | None,
        state: DecoderState | None = None,
    ) -> Tensor:
        """Target ids -> logits (batch, T, vocab). Teacher forcing when `state` is None; otherwise
        `target` holds only the new positions, and the state's caches supply the earlier ones."""
        start = 0 if state is None else state.position
        x = self.target_embedding(target, start)
        for i, layer in enumerate(self.decoder_layers):
            self_cache = None if state is None else state.self_caches[i]
            cross_cache = None if state is None else state.cross_caches[i]
            x = layer(x, memory, source_mask, self_cache, cross_cache)
        return self.output_projection(self.decoder_norm(x))

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """Teacher-forced logits for the next token at every target position."""
        source_mask = self.source_mask(source)
        return self.decode(target_in, self.encode(source, source_mask), source_mask)

    def new_state(self, batch: int, max_len: int, like: Tensor) -> DecoderState:
        return DecoderState(self, batch, max_len, like.device, like.dtype)


# -- training (§5) --------------------------------------------------------------------------------


def learning_rate(step: int, d_model: int, warmup_steps: int = 4000, scale: float = 1.0) -> float:
    """§5.3, Eq. (3): lrate = d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5).

    `step` counts from 1; `scale` multiplies the whole schedule (1 in the paper).
    """
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def label_smoothed_loss(
    logits: Tensor, target: Tensor, smoothing: float = 0.1, pad_id: int = 0
) -> tuple[Tensor, int]:
    """§5.4 label smoothing (Szegedy et al. 2016): cross-entropy against a target distribution q
    with 1 − ε on the reference token and ε / (V − 2) on each of the other tokens except padding.
    Padding is never predicted, so q gives it no mass (as the Annotated Transformer does; torch's
    `label_smoothing` would spread ε / V over padding too).

    Returns the loss summed over non-padding target tokens and their number, so callers can
    average over all tokens of a step that spans several micro-batches and processes.
    """
    real = target.reshape(-1) != pad_id
    loss = _LabelSmoothedCrossEntropy.apply(logits, target, real, smoothing, pad_id)
    return loss, int(real.sum())


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """The loss above with its gradient written out, since it is computed over every token of the
    vocabulary at every position. Each position's loss and, as q sums to one, its gradient are

        −Σ_v q_v log softmax(z)_v,    ∂/∂z = softmax(z) − q,

    so the backward pass is one softmax and three sparse corrections, where autograd through
    log_softmax, gather and sum would write several vocabulary-sized tensors (writing the
    gradient out made a training step of the `small` preset 4% faster on a 2-core CPU). Both
    softmaxes read the logits in their own precision and compute in float32 in one kernel
    (`dtype=`), without a float32 copy of the logits first (bfloat16 logits of a Multi30k batch:
    17 ms forward and backward instead of 28 on a 2-core CPU; `benchmarks/transformer.py` times it
    against `F.cross_entropy`)."""

    @staticmethod
    def forward(
        ctx, logits: Tensor, target: Tensor, real: Tensor, smoothing: float, pad_id: int
    ) -> Tensor:
        vocab = logits.size(-1)
        log_p = torch.log_softmax(logits.reshape(-1, vocab), dim=-1, dtype=torch.float32)
        target = target.reshape(-1, 1)
        other = smoothing / (vocab - 2)  # q on every token but the reference and padding
        q_dot_log_p = (
            (1 - smoothing - other) * log_p.gather(1, target).squeeze(1)
            + other * log_p.sum(1)
            - other * log_p[:, pad_id]
        )
        weight = real.float()
        ctx.save_for_backward(logits, target, weight)
        ctx.smoothing, ctx.other, ctx.pad_id = smoothing, other, pad_id
        return -(q_dot_log_p * weight).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, target, weight = ctx.saved_tensors
        z = logits.reshape(-1, logits.size(-1))
        g = torch.softmax(z, dim=-1, dtype=torch.float32).sub_(ctx.other)  # softmax(z) − ε/(V−2)
        g.scatter_add_(1, target, g.new_full(target.shape, ctx.other - (1 - ctx.smoothing)))
        g[:, ctx.pad_id] += ctx.other  # q_pad = 0
        g.mul_((weight * grad)[:, None])
        return g.view(logits.shape).to(logits.dtype), None, None, None, None


# -- decoding (§6.1) ------------------------------------------------------------------------------


def length_penalty(length: Tensor | int, alpha: float) -> Tensor | float:
    """Wu et al. 2016, Eq. (14): lp(Y) = ((5 + |Y|) / 6)^α; hypotheses are ranked by log P / lp."""
    return ((5 + length) / 6) ** alpha


def _max_lengths(source: Tensor, pad_id: int, extra: int, cap: int) -> Tensor:
    """Per sentence: source length + `extra` (§6.1: input length + 50), within the position table."""
    return ((source != pad_id).sum(1) + extra).clamp(max=cap - 1)


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    source: Tensor,
    bos_id: int,
    eos_id: int,
    max_extra: int = 50,
) -> list[list[int]]:
    """Pick the most probable next token until EOS or the maximum length; one list per sentence.
    The decoder runs on the new token only, with the keys and values of the prefix cached."""
    config = model.config
    batch = source.size(0)
    source_mask = model.source_mask(source)
    memory = model.encode(source, source_mask)
    limits = _max_lengths(source, config.pad_id, max_extra, config.max_len)
    steps = int(limits.max())
    state = model.new_state(batch, steps + 1, memory)
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=source.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=source.device)
    for step in range(steps):
        logits = model.decode(tokens[:, -1:], memory, source_mask, state)[:, -1]
        next_token = logits.argmax(-1)
        next_token = next_token.masked_fill(finished, config.pad_id)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= (next_token == eos_id) | (step + 1 >= limits)
        if finished.all():
            break
    return [_strip(row[1:].tolist(), eos_id, config.pad_id) for row in tokens]


def _strip(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    out = []
    for i in ids:
        if i == eos_id or i == pad_id:
            break
        out.append(i)
    return out


@torch.no_grad()
def beam_search(
    model: Transformer,
    source: Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_extra: int = 50,
) -> list[list[int]]:
    """§6.1: batched beam search with length penalty α; returns the best hypothesis per sentence.

    All sentences of the batch and their `beam_size` hypotheses decode together as batch rows
    (sentence b, beam k) -> row b·K + k, with cached decoder keys/values reordered after each step.
    At each step the 2K best extensions are considered (so that K live ones remain even if K end
    here); an extension that ends with EOS among the best K becomes a finished hypothesis scored
    log P / lp(length incl. EOS). A sentence is done when it has K finished hypotheses and no live
    one can still beat the worst of them, or at its maximum length (input length + `max_extra`),
    where live hypotheses are finished as they are. The bound on a live hypothesis is
    tensor2tensor's: its log P can only fall, and lp grows with length, so the best it can still
    score is log P / lp(maximum length). (Scoring it at its current length instead, as the search
    once did, can stop while a live hypothesis would still overtake the finished ones.) With
    beam_size 1 and α = 0 this is exactly greedy decoding.
    """
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    config = model.config
    batch, K = source.size(0), beam_size
    device = source.device
    source_mask = model.source_mask(source)
    memory = model.encode(source, source_mask)
    limits = _max_lengths(source, config.pad_id, max_extra, config.max_len).tolist()
    steps = max(limits)
    # Every hypothesis of sentence b reads b's encoder output.
    rows = torch.arange(batch, device=device).repeat_interleave(K)
    memory, source_mask = memory[rows], source_mask[rows]
    state = model.new_state(batch * K, steps + 1, memory)

    scores = torch.full((batch, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep only the first alive at step 0
    tokens = torch.full((batch * K, 1), bos_id, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    for step in range(steps):
        logits = model.decode(tokens[:, -1:], memory, source_mask, state)[:, -1]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.size(-1)
        candidates = (scores[:, :, None] + log_probs.view(batch, K, vocab)).view(batch, K * vocab)
        cand_scores, cand_index = candidates.topk(2 * K, dim=1)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        length = step + 1  # generated tokens, the EOS included
        # Continue with the best K extensions that do not end; finished sentences keep decoding
        # harmlessly until the whole batch is done.
        alive_scores = cand_scores.masked_fill(cand_token == eos_id, float("-inf"))
        scores, pick = alive_scores.topk(K, dim=1)
        for b in range(batch):
            if done[b]:
                continue
            at_limit = length >= limits[b]
            for j in range(K):  # the best K extensions, in order
                score = float(cand_scores[b, j])
                if score == float("-inf"):
                    continue
                ends = int(cand_token[b, j]) == eos_id
                if ends or at_limit:
                    prefix = tokens[b * K + int(cand_beam[b, j]), 1:].tolist()
                    hypothesis = prefix if ends else prefix + [int(cand_token[b, j])]
                    finished[b].append((score / length_penalty(length, alpha), hypothesis))
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            # Done once K hypotheses ended and the best live one cannot beat the worst of them even
            # at the longest length it may reach, where lp is largest (log P <= 0 only falls).
            best_alive = float(scores[b, 0]) / length_penalty(limits[b], alpha)
            if at_limit or (len(finished[b]) >= K and best_alive <= finished[b][-1][0]):
                done[b] = True
        if all(done):
            break
        beam = cand_beam.gather(1, pick)
        next_token = cand_token.gather(1, pick)
        source_rows = (torch.arange(batch, device=device)[:, None] * K + beam).view(-1)
        tokens = torch.cat([tokens[source_rows], next_token.view(-1, 1)], dim=1)
        state.reorder(source_rows)

    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
