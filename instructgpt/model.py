"""InstructGPT's models (Ouyang et al. 2022, §3.5), all xllama decoders.

- The policy π and the frozen SFT/reference model π_SFT are plain `xllama.Llama` language models.
- The reward model r_θ(x, y) is the SFT model with its unembedding replaced by a projection to one
  scalar, read at the last token of the response (`RewardModel`).
- The value function V(s_t) of PPO has the same shape, read at every position; InstructGPT
  initialises it from the reward model (`RewardModel.values`).

Also here: sequence log-probabilities (the quantity SFT, PPO and DPO are written in), and
sampling responses with the KV cache through `xllama.sampling.generate`.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from xllama import Llama, LlamaConfig
from xllama.sampling import generate, token_logprobs

from .losses import masked_mean


class RewardModel(nn.Module):
    """A Llama backbone with a scalar head instead of the vocabulary projection.

    `forward` gives a scalar per position (batch, T); `score` reads it at each row's last real
    token, which is the last response token (its EOS when present). The head's bias carries the
    normalisation of §3.5: after training it is shifted so reference demonstrations score 0 on
    average.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.backbone = Llama(config)
        self.backbone.output = nn.Identity()  # the unembedding is not used: drop its weights
        self.head = nn.Linear(config.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_language_model(cls, lm: Llama) -> RewardModel:
        """Initialise the backbone from a (SFT) language model."""
        model = cls(lm.config)
        state = {k: v for k, v in lm.state_dict().items() if not k.startswith("output.")}
        model.backbone.load_state_dict(state, strict=True)
        return model.to(next(lm.parameters()).device)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = self.backbone.hidden_states(tokens, attention_mask)
        return self.head(hidden).squeeze(-1).float()

    def score(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """r(x, y) per row (batch,): the head at the last real token (left or right padding)."""
        values = self(tokens, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    @torch.no_grad()
    def normalise(self, mean_score: float) -> None:
        """Shift the head so that a sequence that scored `mean_score` now scores 0."""
        self.head.bias -= mean_score


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a (batch, T) 0/1 mask."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(1)


def sequence_logprobs(
    model: Llama, tokens: Tensor, attention_mask: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-token log π(y_t | x, y_<t) of the response tokens, in the (batch, T − 1) frame where
    column t predicts token t + 1; returns (logprobs, mask), zero outside the response.

    Sum a row to get log π(y | x). Positions follow each row's real tokens and no token attends to
    padding, so padding side and batch composition leave these unchanged.
    """
    logits = model(tokens, attention_mask=attention_mask)[:, :-1]
    mask = response_mask[:, 1:].bool()
    return token_logprobs(logits, tokens[:, 1:]) * mask, mask


def sft_loss(logits: Tensor, tokens: Tensor, response_mask: Tensor) -> Tensor:
    """Next-token cross-entropy on response tokens only, averaged per token (prompt tokens carry no
    loss: they are conditioning, not targets)."""
    mask = response_mask[:, 1:].bool()
    return -masked_mean(token_logprobs(logits[:, :-1], tokens[:, 1:]), mask)


@torch.no_grad()
def sample_responses(
    policy: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: Collection[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample a response per prompt (token ids, ending with one of `stops` unless cut at
    `max_new_tokens`: EOS, and a chat model's end of turn), decoding with the KV cache in
    batches."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        out += generate(
            policy,
            prompts[i : i + batch_size],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=stops,
            generator=generator,
        )
    return out
