"""Decoding with the KV cache: batched generation over prompts of different lengths, sampling
(temperature, top-k, nucleus / top-p of Holtzman et al. 2020) and per-token log-probabilities.

Prompts are padded on the left, so every row's last prompt token sits in the same slot and the
batch decodes in lock-step; each row's rotary positions skip its padding and no real token attends
to padding, so a row's result equals generating it alone (exactly so for greedy decoding, up to
float32 rounding for the logits).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from .cache import Cache
from .model import Llama, XLlamaError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that make no sense, with one clear message."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise XLlamaError(f"temperature must be a finite number >= 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise XLlamaError(f"top_k must be a positive integer, not {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise XLlamaError(f"top_p must be in (0, 1], not {top_p}")


def next_token_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The distribution (batch, vocab), float32, that `sample_next` draws from: the softmax of the
    logits at `temperature`, restricted to the top k and to the nucleus; one-hot on the argmax at
    temperature 0.

    Logits of any float dtype are read in float32. +inf counts as the largest float (the +inf tokens
    share the mass, or the greedy pick is the first of them), −inf is a token that cannot be drawn,
    and probabilities come after subtracting each row's maximum, so huge logits (1e38) never
    overflow. A row that holds a NaN, or only −inf, defines no distribution: it is refused with an
    `XLlamaError` naming the rows, never turned into a token.
    """
    logits = logits.float()
    broken = torch.isnan(logits).any(-1) | torch.isneginf(logits).all(-1)
    if bool(broken.any()):
        rows = broken.nonzero().flatten().tolist()
        raise XLlamaError(
            f"the logits of row(s) {rows[:8]} are NaN or all -inf, so no token can be sampled "
            "(the model's weights or inputs hold non-finite values)"
        )
    logits = logits.clamp(max=torch.finfo(torch.float32).max)  # +inf -> the largest float
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Nucleus: the smallest set of most likely tokens whose mass reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row from logits (batch, vocab): greedy at temperature 0, else drawn from
    `next_token_probs` (see there for top-k, top-p and non-finite logits)."""
    probs = next_token_probs(logits, temperature, top_k, top_p)
    if temperature == 0:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None):
    """(tokens, attention_mask), both (batch, longest), prompts aligned to the right."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, longest - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
    return tokens.to(device), mask.to(device)


def decode_step(model: Llama):
    """`model` under `torch.compile`, for the one-token steps of decoding: the same forward, traced
    with dynamic shapes (the cache grows by one slot a step). Compiled on the first call (tens of
    seconds on a CPU, which needs a C++ compiler); torch keeps the compiled code with the model's
    `forward`, so later calls, through a new wrapper, reuse it."""
    # Inductor leaves RoPE's complex product to eager kernels; that is expected, not a problem.
    warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
    return torch.compile(model, dynamic=True)


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    pad_id: int = 0,
    compile: bool = False,
    cache: Cache | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Returns the new tokens of each row (without its prompt). A row stops after producing one of
    `stop_ids` (its EOS; a chat model's end of turn too), which ends its result; generation ends
    when every row has stopped. `on_token(next_tokens)` is called with the (batch,) tensor after
    every step (streaming). The model is put in eval mode for the call. With `compile`, the
    one-token steps run the same forward under `torch.compile` (see `decode_step`).

    `cache`, for one prompt: a cache (`model.make_cache(1)`) that already holds the prompt's first
    `cache.length` tokens, so only the rest is read (a chat's earlier turns); it is left holding
    the prompt and the new tokens but the last.
    """
    check_sampling_args(temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise XLlamaError("every prompt needs at least one token")
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise XLlamaError(f"prompt of {longest} tokens is longer than the context ({context})")
    if longest + max_new_tokens > context:
        raise XLlamaError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context "
            f"({context}); ask for at most {context - longest} new tokens"
        )
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    try:
        batch = len(prompts)
        tokens, mask = left_pad(prompts, pad_id, device)
        padded = bool((mask == 0).any())
        if cache is None:
            cache = model.make_cache(batch, longest + max_new_tokens)
        elif batch != 1 or cache.length >= longest or cache.max_len < longest + max_new_tokens:
            raise XLlamaError(
                f"a cache of {cache.length} of {cache.max_len} slots cannot continue "
                f"{batch} prompt(s) of {longest} tokens by {max_new_tokens}"
            )
        tokens = tokens[:, cache.length :]  # what the cache does not hold yet
        logits = model(tokens, attention_mask=mask if padded else None, cache=cache, last_only=True)
        logits = logits[:, -1]
        decode = decode_step(model) if compile else model  # the same forward either way
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        steps = 0
        for step in range(max_new_tokens):
            next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
            out[:, step] = next_tokens
            steps = step + 1
            if on_token is not None:
                on_token(next_tokens)
            if len(stops):
                done |= torch.isin(next_tokens, stops)
                if bool(done.all()):
                    break
            if steps == max_new_tokens:
                break
            logits = decode(next_tokens[:, None], cache=cache, last_only=True)[:, -1]
    finally:
        model.train(was_training)
    return [until_stop(row, stop_ids) for row in out[:, :steps].tolist()]


def until_stop(tokens: list[int], stop_ids: Collection[int]) -> list[int]:
    """`tokens` up to and including the first of `stop_ids`, if any."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[t]) under logits (batch, T, vocab): (batch, T), float32, differentiable.

    For a sequence's own tokens: `token_logprobs(model(tokens)[:, :-1], tokens[:, 1:])`. The
    policy-gradient, DPO and pretraining losses of `instructgpt` use it.
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
