"""InstructGPT's alignment pipeline (Ouyang et al. 2022): SFT, a reward model and PPO, plus DPO
(Rafailov et al. 2023), on xllama models. Commands: `python -m instructgpt.sft | reward | ppo |
dpo | pipeline | evaluate`."""

# First, before torch loads: a command interrupted while starting prints one line
# (transformer/training/errors.py).
import transformer.training  # noqa: F401

# isort: split
from .checkpoints import load_policy, load_reward_model
from .data import (
    DataError,
    Demonstration,
    GoldLabeler,
    InstructGPTError,
    Ranking,
    collate,
    encode_pair,
    read_demonstrations,
    read_prompts,
    read_rankings,
    task_demonstrations,
    task_prompts,
)
from .losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_surrogate_loss,
    clipped_value_loss,
    dpo_loss,
    gae,
    kl_penalised_rewards,
    ptx_loss,
    ranking_accuracy,
    ranking_loss,
    whiten,
)
from .model import RewardModel, sample_responses, sequence_logprobs, sft_loss

__all__ = [
    "AdaptiveKLController",
    "DataError",
    "Demonstration",
    "FixedKLController",
    "GoldLabeler",
    "InstructGPTError",
    "Ranking",
    "RewardModel",
    "clipped_surrogate_loss",
    "clipped_value_loss",
    "collate",
    "dpo_loss",
    "encode_pair",
    "gae",
    "kl_penalised_rewards",
    "load_policy",
    "load_reward_model",
    "ptx_loss",
    "ranking_accuracy",
    "ranking_loss",
    "read_demonstrations",
    "read_prompts",
    "read_rankings",
    "sample_responses",
    "sequence_logprobs",
    "sft_loss",
    "task_demonstrations",
    "task_prompts",
    "whiten",
]
