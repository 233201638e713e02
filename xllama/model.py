"""Llama 2 (Touvron et al. 2023), read top to bottom.

A decoder-only Transformer (Vaswani et al. 2017) with the changes Llama made to GPT:

- pre-normalisation with RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm, computed in float32;
- the SwiGLU feed-forward network (Shazeer 2020) with Llama's hidden-size rule;
- rotary position embeddings (RoFormer, Su et al. 2021) applied to queries and keys, instead of
  learned absolute positions; optional linear position interpolation (Chen et al. 2023), or
  Llama 3.1's frequency-dependent scaling (Llama Team 2024) for Llama 3 checkpoints;
- grouped-query attention (Ainslie et al. 2023) through `n_kv_heads` (MHA, GQA and MQA);
- no biases anywhere.

Two options from Mistral 7B (Jiang et al. 2023): sliding-window attention, and its rolling-buffer
KV cache (window W, slot `i % W`). From Mixtral (Jiang et al. 2024): the sparse mixture-of-experts
feed-forward (`n_experts`, top-`experts_per_token` routing), with the Switch Transformer's
load-balancing loss (Fedus et al. 2022) and ST-MoE's router z-loss (Zoph et al. 2022). And ALiBi
(Press et al. 2022) in place of RoPE (`position="alibi"`): no position embeddings, a bias
-m·(i - j) on the attention scores, which extrapolates to sequences longer than training saw.

Attention itself is the shared `transformer.attention.MultiHeadAttention`; rotary embeddings go in
through its `rotary` hook and the per-layer KV caches through its `cache` hook.

Padded batches: every forward takes an optional `attention_mask` (batch, T) with 1 for real tokens
and 0 for padding. Each row's positions count only its real tokens, and no real token attends to
padding, so left- or right-padding never changes a row's results. With a KV cache, pad on the left
(the prompt); every later token of every row is real.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.attention import MultiHeadAttention, alibi_slopes
from transformer.dropout import dropout
from transformer.training import check_config, config_from_dict, param

from .cache import Cache, attention_inputs
from .errors import XLlamaError

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama model. Defaults are Llama 2 7B (Touvron et al. 2023, Table 1 / params.json)."""

    dim: int = param(4096, "model width d_model (hidden size)")
    n_layers: int = param(32, "number of Transformer blocks")
    n_heads: int = param(32, "number of query heads; head_dim = dim // n_heads")
    n_kv_heads: int | None = param(
        None, "number of key/value heads: None or n_heads = MHA, 1 = MQA, in between = GQA"
    )
    vocab_size: int = param(
        32000, "vocabulary size (rows of the embedding and of the output projection)"
    )
    multiple_of: int = param(
        256, "SwiGLU hidden size is rounded up to a multiple of this (Llama's hidden-size rule)"
    )
    ffn_dim_multiplier: float | None = param(
        None, "scales the SwiGLU hidden size 2/3 * 4 * dim before rounding (1.3 for Llama 2 70B)"
    )
    ffn_hidden_dim: int | None = param(
        None,
        "explicit SwiGLU hidden size (HF intermediate_size; each expert's with n_experts); None = Llama's rule from dim",
    )
    norm_eps: float = param(1e-5, "epsilon inside RMSNorm's square root")
    max_seq_len: int = param(
        4096, "longest sequence (context length): rotary tables and KV caches are built for this"
    )
    rope_theta: float = param(
        10000.0, "rotary base: pair i turns at angle position * theta^(-2i / head_dim)"
    )
    rope_pairing: Literal["adjacent", "half"] = param(
        "adjacent",
        "which coordinates rotate together: adjacent (x0,x1),(x2,x3).. as in Meta's checkpoints, or half (x_i, x_{i+d/2}) as in Hugging Face checkpoints (rotate_half)",
    )
    rope_scaling: float = param(
        1.0,
        "RoPE scaling factor: linear position interpolation divides positions by it (Chen et al. 2023); llama3 divides the low frequencies by it",
    )
    rope_scaling_type: Literal["linear", "llama3"] = param(
        "linear",
        "how rope_scaling applies: linear (every position) or llama3 (Llama 3.1: low frequencies divided by it, high ones kept, a smooth blend between)",
        added=True,
    )
    rope_low_freq_factor: float = param(
        1.0,
        "llama3 scaling: wavelengths longer than rope_original_max_seq_len / this are fully scaled",
        added=True,
    )
    rope_high_freq_factor: float = param(
        4.0,
        "llama3 scaling: wavelengths shorter than rope_original_max_seq_len / this are kept",
        added=True,
    )
    rope_original_max_seq_len: int = param(
        8192, "llama3 scaling: the context length the model was pretrained on", added=True
    )
    sliding_window: int | None = param(
        None,
        "Mistral sliding-window attention: each token sees the last W positions; None = full causal",
    )
    position: Literal["rope", "alibi"] = param(
        "rope",
        "how tokens know their position: rope (rotary embeddings) or alibi (linear biases on the attention scores, Press et al. 2022)",
        added=True,
    )
    n_experts: int | None = param(
        None,
        "Mixtral sparse mixture of experts: SwiGLU experts per feed-forward layer; None = dense",
        added=True,
    )
    experts_per_token: int = param(
        2, "experts each token is routed to (top-k; Mixtral: 2 of 8)", added=True
    )
    tie_embeddings: bool = param(
        False, "share the token embedding matrix with the output projection"
    )
    dropout: float = param(
        0.0, "dropout on attention weights and residual branches during training (Llama uses none)"
    )
    init_std: float = param(0.02, "standard deviation of the normal initialisation of every matrix")

    def __post_init__(self):
        check_config(
            self,
            positive=("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                      "ffn_dim_multiplier", "ffn_hidden_dim", "norm_eps", "max_seq_len",
                      "rope_theta", "rope_scaling", "rope_low_freq_factor",
                      "rope_high_freq_factor", "rope_original_max_seq_len", "sliding_window",
                      "init_std", "n_experts"),
            below_one=("dropout",),
        )  # fmt: skip
        n_kv = self.kv_heads
        if self.dim % self.n_heads:
            raise XLlamaError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % n_kv:
            raise XLlamaError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise XLlamaError(f"head_dim ({self.dim // self.n_heads}) must be even for RoPE")
        if self.rope_pairing not in ("adjacent", "half"):
            raise XLlamaError(
                f"rope_pairing must be 'adjacent' or 'half', not {self.rope_pairing!r}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise XLlamaError(f"sliding_window must be positive, not {self.sliding_window}")
        if self.rope_scaling <= 0:
            raise XLlamaError(f"rope_scaling must be positive, not {self.rope_scaling}")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise XLlamaError(
                f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                f"rope_low_freq_factor ({self.rope_low_freq_factor})"
            )
        if self.position not in ("rope", "alibi"):
            raise XLlamaError(f"position must be 'rope' or 'alibi', not {self.position!r}")
        if self.n_experts is not None and not 0 < self.experts_per_token <= self.n_experts:
            raise XLlamaError(
                f"experts_per_token ({self.experts_per_token}) must be between 1 and n_experts "
                f"({self.n_experts})"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4·dim (same parameters as a 4·dim ReLU FFN), times
        ffn_dim_multiplier, rounded up to a multiple of multiple_of (Meta's llama/model.py)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> LlamaConfig:
        return config_from_dict(cls, d, where)


LLAMA2: dict[str, LlamaConfig] = {
    # Llama 2's published shapes (Touvron et al. 2023, Table 1): 6.74B, 13.0B, 69.0B parameters.
    # Training presets (model and training values together) are `xllama.train.PRESETS`.
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    """One of Llama 2's shapes (`LLAMA2`), with optional field overrides."""
    if name not in LLAMA2:
        raise XLlamaError(f"unknown Llama 2 shape {name!r}; choose one of: {', '.join(LLAMA2)}")
    return replace(LLAMA2[name], **overrides)


# --------------------------------------------------------------------------------------------------
# RMSNorm and SwiGLU
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, Eq. 4): x / sqrt(mean(x²) + eps) · g, without mean
    centring or bias. Normalised in float32 whatever the input dtype, cast back, then scaled by the
    gain (Meta's order). `F.rms_norm` is that formula in one kernel."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, Eq. 6): FFN(x) = W2 (SiLU(W1 x) ⊙ W3 x), without biases."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return dropout(out, self.dropout, self.training)


# --------------------------------------------------------------------------------------------------
# Sparse mixture of experts (Mixtral, Jiang et al. 2024, §2.1)
# --------------------------------------------------------------------------------------------------


class MoEFeedForward(nn.Module):
    """Mixtral's sparse feed-forward (Eq. 1-2): y = Σ_{i ∈ top-k} softmax(TopK(x · W_g))_i · E_i(x).

    A linear router without bias (`gate`) scores the n experts (SwiGLU FFNs); each token goes to its
    k best, weighted by the softmax over the k chosen logits (equal to the full softmax renormalised
    over them, Hugging Face's formulation). Dispatch: the (token, expert) pairs are sorted by
    expert, so each expert runs once, on one contiguous slice of its tokens; the weighted outputs
    are added back to their tokens with `index_add_`. No loop over tokens.

    The router logits of the last forward stay in `router_logits` (tokens, n_experts), and the
    number of (token, expert) pairs each expert received in `expert_load` (n_experts,), for the
    training losses and usage statistics (`router_losses`). Parameter names follow Mistral's reference code
    (`feed_forward.gate`, `feed_forward.experts.E.w1`).
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, dropout=0.0):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(n_experts))
        self.top_k, self.dropout = top_k, dropout
        self.router_logits: Tensor | None = None
        self.expert_load: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (tokens, dim)
        logits = self.gate(x)  # (tokens, n_experts)
        top_logits, chosen = logits.topk(self.top_k, dim=-1)  # (tokens, k)
        weights = torch.softmax(top_logits.float(), dim=-1).type_as(x)
        load = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        self.router_logits, self.expert_load = logits, load
        # Group the (token, expert) pairs by expert: expert e's are the e-th slice, load[e] long.
        order = chosen.flatten().argsort(stable=True)
        tokens = order // self.top_k
        grouped = x[tokens].split(load.tolist())
        # In training every expert runs, an idle one on zero rows, so that all take part in the
        # backward pass (as DistributedDataParallel expects); in eval idle experts are skipped.
        outputs = [
            expert(xs) for expert, xs in zip(self.experts, grouped) if len(xs) or self.training
        ]
        y = torch.cat(outputs) * weights.flatten()[order, None]
        out = torch.zeros_like(x).index_add_(0, tokens, y).reshape(shape)
        return dropout(out, self.dropout, self.training)


def router_losses(model: nn.Module, all_reduce=None) -> tuple[Tensor, Tensor, Tensor]:
    """(load-balancing loss, router z-loss, expert fractions) of the last forward, averaged over the
    model's MoE layers.

    Load balancing (Switch Transformer, Fedus et al. 2022, Eq. 4-6, with top-k routing as in
    Hugging Face's Mixtral): n · Σ_i f_i · P_i, where f_i is the fraction of tokens that have expert
    i among their k (Σ f = k) and P_i the mean router probability of expert i; k when balanced.
    Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): the mean of (log Σ_j exp x_j)² over tokens.
    Fractions: f_i / k per expert (sums to 1), detached, for logging.

    `all_reduce` (data parallelism: averages a tensor over processes) makes f the whole batch's
    counts rather than this process's; f carries no gradient, so with P averaged by the gradient
    all-reduce the processes together compute the loss one process would on the whole batch.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not layers or any(m.router_logits is None for m in layers):
        raise XLlamaError("router_losses needs a forward pass of a mixture-of-experts model")
    logits = [m.router_logits.float() for m in layers]
    # f_i: each layer's share of tokens routed to expert i (counts: no gradient)
    f = torch.stack([m.expert_load / m.router_logits.size(0) for m in layers]).float()
    if all_reduce is not None:
        f = all_reduce(f)
    p = torch.stack([torch.softmax(x, dim=-1).mean(0) for x in logits])  # P_i
    balance = (f.size(-1) * (f * p).sum(-1)).mean()
    z_loss = torch.stack([torch.logsumexp(x, dim=-1).square().mean() for x in logits]).mean()
    top_k = torch.tensor([[m.top_k] for m in layers], device=f.device)
    return balance, z_loss, (f / top_k).mean(0)


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoFormer, §3.4)
# --------------------------------------------------------------------------------------------------


def rope_tables(
    head_dim: int,
    max_len: int,
    theta: float = 10000.0,
    scaling: float = 1.0,
    scaling_type: str = "linear",
    llama3: tuple[float, float, int] = (1.0, 4.0, 8192),
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, (max_len, head_dim / 2), in float32.

    Pair i of a head turns by m · θ_i at position m, θ_i = theta^(-2i/d) (RoFormer Eq. 15). Linear
    position interpolation (Chen et al. 2023) uses m / scaling instead of m, so a model trained on L
    positions reads L · scaling of them. `scaling_type="llama3"` scales the frequencies instead
    (`llama3_frequencies`, with `llama3` = its low and high frequency factors and original length).
    """
    inv_freq = rope_frequencies(head_dim, theta)
    positions = torch.arange(max_len, dtype=torch.float64)
    if scaling_type == "llama3":
        inv_freq = llama3_frequencies(inv_freq, scaling, *llama3)
    else:
        positions = positions / scaling
    angles = torch.outer(positions, inv_freq)
    return angles.cos().float(), angles.sin().float()


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Tensor:
    """θ_i = theta^(-2i/d) for the head_dim / 2 pairs of a head (RoFormer Eq. 15), float64."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def llama3_frequencies(
    inv_freq: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original: int
) -> Tensor:
    """Llama 3.1's RoPE scaling (Llama Team 2024, "The Llama 3 Herd of Models"; Meta's
    `apply_scaling`, Hugging Face's rope_type "llama3"), for a context longer than the `original`
    length L the model was pretrained on. A pair whose wavelength 2π/θ_i is shorter than
    L / high_freq_factor turns as before; one longer than L / low_freq_factor turns `factor` times
    slower (θ_i / factor, interpolation); in between, θ_i is blended as (1 - s) θ_i / factor + s θ_i
    with s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    wavelength = 2 * torch.pi / inv_freq
    s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - s) * inv_freq / factor + s * inv_freq
    return torch.where(
        wavelength < original / high_freq_factor,
        inv_freq,
        torch.where(wavelength > original / low_freq_factor, inv_freq / factor, blended),
    )


def apply_rope(x: Tensor, rotation: Tensor, pairing: str = "adjacent") -> Tensor:
    """Rotate each pair of coordinates of x (..., T, head_dim) by its angle (RoFormer Eq. 34).

    `rotation` holds e^{i m θ_j} = cos + i·sin as complex numbers, broadcastable to
    (..., T, head_dim / 2) (Meta's `freqs_cis`). With `adjacent` pairing, coordinates (2j, 2j+1)
    form pair j, read as one complex number and multiplied by its rotation (Meta's formulation);
    with `half`, coordinates (j, j + d/2) do (the Hugging Face `rotate_half` layout). The two are the
    same model up to a fixed permutation of the rows of W_q and W_k inside each head (see
    `xllama.convert.permute_to_half`). Computed in float32, returned in x's dtype.
    """
    x32 = x.float()
    if pairing == "adjacent":  # (x_2j, x_2j+1) as a complex number, times e^{i m θ_j}
        pairs = torch.view_as_complex(x32.reshape(*x.shape[:-1], -1, 2))
        out = torch.view_as_real(pairs * rotation).flatten(-2)
    else:  # (x_j, x_{j+d/2}): rotate_half
        cos, sin = rotation.real, rotation.imag
        x1, x2 = x32.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Rotary:
    """The `rotary` hook of MultiHeadAttention for one forward pass: `apply_rope` to q and k. The
    positions' rotations e^{i m θ} are built once per forward from the cos/sin tables and shared by
    every layer."""

    def __init__(self, cos: Tensor, sin: Tensor, pairing: str):
        self.rotation, self.pairing = torch.complex(cos, sin), pairing

    def __call__(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rope(q, self.rotation, self.pairing), apply_rope(
            k, self.rotation, self.pairing
        )


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """One pre-norm decoder block: h = x + Attention(RMSNorm(x)); out = h + FFN(RMSNorm(h)), the
    FFN being SwiGLU, or Mixtral's mixture of SwiGLU experts."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = MultiHeadAttention(
            config.dim, config.n_heads, config.kv_heads, bias=False, dropout=config.dropout
        )
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.n_experts is None:
            self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.dropout)
        else:
            self.feed_forward = MoEFeedForward(
                config.dim,
                config.hidden_dim,
                config.n_experts,
                config.experts_per_token,
                config.dropout,
            )
        self.dropout = config.dropout

    def forward(self, x, mask=None, is_causal=False, cache=None, rotary=None, bias=None) -> Tensor:
        attn = self.attention(
            self.attention_norm(x),
            mask=mask,
            is_causal=is_causal,
            cache=cache,
            rotary=rotary,
            bias=bias,
        )
        h = x + dropout(attn, self.dropout, self.training)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The Llama 2 decoder. Parameter names follow Meta's checkpoints (`tok_embeddings`,
    `layers.N.attention.wq`, `feed_forward.w1`, `norm`, `output`), so those load without renaming.

    `forward(tokens)` gives logits (batch, T, vocab); `hidden_states(tokens)` the final normed
    hidden states (batch, T, dim) that `output` projects (for reward and value heads).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        c = self.config
        llama3 = (c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_seq_len)
        return rope_tables(
            c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling, c.rope_scaling_type, llama3
        )

    def reset_rope_tables(self) -> None:
        """Recompute the rotary tables (after building the model on the meta device)."""
        c = self.config
        cos, sin = self._rope_tables()
        self.rope_cos = cos.to(self.tok_embeddings.weight.device)
        self.rope_sin = sin.to(self.tok_embeddings.weight.device)
        self.alibi_slopes = alibi_slopes(c.n_heads).to(self.tok_embeddings.weight.device)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (a tied matrix counted once); without the input embedding if asked."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def make_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Cache:
        """A preallocated KV cache for `batch` rows and up to `max_len` slots."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise XLlamaError(
                f"{max_len} positions asked for; the context is {self.config.max_seq_len}"
            )
        weight = self.tok_embeddings.weight
        return Cache(self.config, batch, max_len, weight.device, dtype or weight.dtype)

    # -- forward --------------------------------------------------------------------------------
    def hidden_states(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        """Final RMSNorm-ed hidden states (batch, T, dim) of `tokens` (batch, T).

        attention_mask: (batch, T), 1 = real token, 0 = padding (left or right).
        positions: (batch, T) rotary positions; by default each row counts its real tokens.
        cache: a `Cache` from `make_cache`: the tokens continue what it holds.

        With ALiBi the distances i - j are counted in cache slots, which equal token distances
        between real tokens when padding is on the left or the right only (as `left_pad` does).
        """
        T = tokens.size(1)
        if cache is None and T > self.config.max_seq_len:
            raise XLlamaError(
                f"sequence of {T} tokens is longer than the context ({self.config.max_seq_len})"
            )
        alibi = self.alibi_slopes if self.config.position == "alibi" else None
        positions, start, mask, is_causal, bias = attention_inputs(
            self.config, tokens, attention_mask, positions, cache, alibi
        )
        rotary = None
        if (
            alibi is None and positions is None
        ):  # the same positions for every row: slice the tables
            cos, sin = self.rope_cos.narrow(0, start, T), self.rope_sin.narrow(0, start, T)
            rotary = Rotary(cos, sin, self.config.rope_pairing)
        elif alibi is None:  # per-row positions: (batch, 1, T, head_dim / 2)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
            rotary = Rotary(cos, sin, self.config.rope_pairing)
        h = self.tok_embeddings(tokens)
        h = dropout(h, self.config.dropout, self.training)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            h = layer(h, mask, is_causal, cache=layer_cache, rotary=rotary, bias=bias)
        return self.norm(h)

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: Cache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
    ):
        """Logits (batch, T, vocab) in float32; with `return_hidden`, (logits, hidden_states).

        `last_only` projects only the last position (decoding: skips T-1 rows of the big matmul).
        """
        h = self.hidden_states(tokens, attention_mask, positions, cache)
        logits = self.output(h[:, -1:] if last_only else h).float()
        return (logits, h) if return_hidden else logits


def count_params_meta(config: LlamaConfig) -> int:
    """Parameters of a config without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        model = Llama(config)
    return model.num_params()


def loss_fn(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy, averaged over non-ignored targets."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index
    )


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matrices a token goes through (with experts: the
    router and its k experts) plus 12·L·d·T for attention (PaLM App. B)."""
    ffn = 3 * config.dim * config.hidden_dim
    if config.n_experts is not None:
        ffn = ffn * config.experts_per_token + config.dim * config.n_experts
    n = config.n_layers * (
        config.dim * config.head_dim * (config.n_heads * 2 + config.kv_heads * 2) + ffn
    )
    n += config.dim * config.vocab_size
    return 6 * n + 12 * config.n_layers * config.dim * seq_len
