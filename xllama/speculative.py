"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling").

A small draft model proposes k tokens one by one; the target model scores all of them in one
forward pass; the modified rejection sampling (`verify`) keeps a prefix of the proposal and draws
one more token, so that every token comes out distributed exactly as the target alone would have
sampled it (Leviathan et al., Appendix A.1). Each round costs one target pass for between 1 and
k + 1 tokens, which is where the speed comes from when the target is expensive and the draft
agrees with it often.

Both models keep KV caches. Each round, a cache is rolled back to the tokens that were kept
(`Cache.rollback`) and catches up on the ones it has not seen in one chunk. Decoding uses each
model's own forward (the same as `generate`); batch 1. Sliding-window models are refused: their
rolling cache has already overwritten what a rollback would return to.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Llama, XLlamaError
from .sampling import check_sampling_args, next_token_probs, until_stop


@dataclass
class SpeculationStats:
    """What a speculative generation did: rounds (one target pass each), tokens drafted, drafted
    tokens the target accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def verify(
    p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """The modified rejection sampling (Leviathan et al. §2.3; Chen et al. Algorithm 2).

    p: (k + 1, vocab) the target's distributions after the prefix and after each drafted token;
    q: (k, vocab) the draft's distributions the drafted tokens (k,) were drawn from. Drafted token
    x_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is
    redrawn from norm(max(0, p_i − q_i)) and the rest discarded; if all k are kept, one more is
    drawn from p_{k+1}. Returns (tokens kept, the token drawn after them).
    """
    k = len(drafted)
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, drafted] / q[rows, drafted]  # q_i(x_i) > 0: x_i was drawn from q_i
    u = torch.rand(k, generator=generator, device=p.device)
    rejected = (u >= ratio).nonzero()
    if len(rejected) == 0:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    i = int(rejected[0])
    residual = (p[i] - q[i]).clamp(min=0)
    return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


@torch.inference_mode()
def speculative_generate(
    target: Llama,
    draft: Llama,
    prompt: Sequence[int],
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> tuple[list[int], SpeculationStats]:
    """Continue `prompt` by up to `max_new_tokens` tokens distributed as `target` samples them
    (temperature, top-k, top-p applied to both models), `draft` proposing `k` tokens a round.

    Returns (new tokens, `SpeculationStats`). At temperature 0 the tokens are the target's greedy
    continuation. `stop_ids` and `on_token` behave as in `generate`.
    """
    check_sampling_args(temperature, top_k, top_p)
    if k < 1:
        raise XLlamaError(f"the draft must propose at least one token a round, not k={k}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise XLlamaError(
            f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the target's "
            f"({target.config.vocab_size}): speculation needs the same tokens"
        )
    for model in (target, draft):
        if model.config.sliding_window is not None:
            raise XLlamaError("speculative decoding does not support sliding-window models")
    if not prompt:
        raise XLlamaError("the prompt needs at least one token")
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    if len(prompt) + max_new_tokens > context:
        raise XLlamaError(
            f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the context "
            f"({context})"
        )
    stats = SpeculationStats()
    if max_new_tokens <= 0:
        return [], stats
    device = target.tok_embeddings.weight.device
    was_training = target.training, draft.training
    target.eval(), draft.eval()
    seq = list(prompt)  # every token kept so far; a cache holds seq[: cache.length]
    models = {"target": target, "draft": draft}
    caches = {role: m.make_cache(1, len(prompt) + max_new_tokens) for role, m in models.items()}

    def catch_up(role: str) -> Tensor:
        """Feed the kept tokens that `role`'s cache has not seen; logits after the last one."""
        new = torch.tensor([seq[caches[role].length :]], device=device)
        return models[role](new, cache=caches[role], last_only=True)[0, -1]

    def probs(logits: Tensor) -> Tensor:
        return next_token_probs(logits.reshape(-1, logits.size(-1)), temperature, top_k, top_p)

    try:
        if len(prompt) > 1:  # both read the prompt but its last token, which starts a round
            for role, model in models.items():
                model(torch.tensor([list(prompt[:-1])], device=device), cache=caches[role])
        produced = 0
        while produced < max_new_tokens:
            room = max_new_tokens - produced
            k_round = min(k, room - 1)  # a round makes up to k_round + 1 tokens
            # 1. The draft proposes k_round tokens, one at a time.
            drafted, q = [], []
            if k_round > 0:
                logits = catch_up("draft")
                for j in range(k_round):
                    q.append(probs(logits)[0])
                    drafted.append(int(torch.multinomial(q[-1], 1, generator=generator)))
                    if j + 1 < k_round:
                        token = torch.tensor([[drafted[-1]]], device=device)
                        logits = draft(token, cache=caches["draft"], last_only=True)[0, -1]
            # 2. The target scores the last kept token and every proposal in one pass.
            tokens = torch.tensor([seq[caches["target"].length :] + drafted], device=device)
            p = probs(target(tokens, cache=caches["target"])[0, -(k_round + 1) :])
            # 3. Keep a prefix, draw one more.
            if k_round > 0:
                n, extra = verify(
                    p, torch.stack(q), torch.tensor(drafted, device=device), generator
                )
            else:
                n, extra = 0, int(torch.multinomial(p[0], 1, generator=generator))
            new = drafted[:n] + [extra]
            stats.rounds += 1
            stats.drafted += k_round
            stats.accepted += n
            new = until_stop(new, stop_ids)
            seq += new
            produced += len(new)
            if on_token is not None:
                for token in new:
                    on_token(torch.tensor([token]))
            if new[-1] in stop_ids:
                break
            # 4. Forget what was not kept: each cache keeps seq[:-1] at most (the last token
            # starts the next round).
            for cache in caches.values():
                cache.rollback(min(cache.length, len(seq) - 1))
    finally:
        target.train(was_training[0]), draft.train(was_training[1])
    return seq[len(prompt) :], stats
