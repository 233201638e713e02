"""Loading policies and reward models from checkpoints (ours, xllama's, or a Llama release).

A model written by an instructgpt command is a run directory of the shared `TrainingRun`
(`config.json`, `metrics.jsonl`, `checkpoints/step_N/`) with its tokenizer's file beside them; its
`config.json` says `{"package": "instructgpt", "model": {"kind": "policy" | "reward",
"llama": LlamaConfig}, "tokenizer": {...}}`. A base model may also be an xllama checkpoint
(package "xllama") or a checkpoint xllama loads: a Hugging Face Llama / Mistral / Mixtral
directory or a Meta release directory, with its own tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from transformer.lora import LoRAConfig, remove_lora
from transformer.training import config_from_dict, find_checkpoint, load_weights, read_config
from transformer.training.checkpoint import read_json_object
from xllama import Llama, LlamaConfig
from xllama.convert import load_checkpoint

from .data import InstructGPTError
from .model import RewardModel
from .task_tokenizer import load_task_tokenizer, with_eos


def _llama_config(checkpoint: Path, kind: str | None) -> tuple[LlamaConfig, str]:
    config = read_config(checkpoint)
    package, model = config.get("package"), config.get("model", {})
    if package == "instructgpt":
        found = model.get("kind")
        if kind is not None and found != kind:
            raise InstructGPTError(f"{checkpoint} holds a {found} model, not a {kind} model")
        return LlamaConfig.from_dict(
            model.get("llama"), f"{checkpoint}/config.json: model.llama"
        ), found
    if package == "xllama":
        if kind == "reward":
            raise InstructGPTError(f"{checkpoint} is an xllama language model, not a reward model")
        llama = model.get("llama", model)
        return LlamaConfig.from_dict(llama, f"{checkpoint}/config.json: model"), "policy"
    raise InstructGPTError(
        f"{checkpoint} is a checkpoint of {package!r}; expected an instructgpt or xllama model"
    )


def load_policy(path: Path, device=None) -> tuple[Llama, object, Path]:
    """A language model (base, SFT, PPO or DPO policy) and its tokenizer from a run or checkpoint
    directory, or from a Llama release directory. Returns (model, tokenizer, checkpoint
    directory)."""
    path = Path(path)
    if (path / "policy" / "model.safetensors").is_file():  # a PPO or DPO run directory
        path = path / "policy"
    if is_release(path):
        model, tokenizer, _ = load_checkpoint(path)
        return model.to(device or "cpu"), with_eos(tokenizer, path), path
    checkpoint = find_checkpoint(path)
    config, _ = _llama_config(checkpoint, "policy")
    model = _load(Llama(config), checkpoint)
    return model.to(device or "cpu"), load_task_tokenizer(checkpoint), checkpoint


def load_reward_model(path: Path, device=None) -> tuple[RewardModel, object, Path]:
    checkpoint = find_checkpoint(Path(path))
    config, _ = _llama_config(checkpoint, "reward")
    model = _load(RewardModel(config), checkpoint)
    return model.to(device or "cpu"), load_task_tokenizer(checkpoint), checkpoint


def is_release(path: Path) -> bool:
    """Whether `path` is a Hugging Face or Meta directory (a `config.json` that names no package
    of ours, or a `params.json`) rather than a run or checkpoint of this project."""
    config = path / "config.json"
    if (path / "params.json").is_file():
        return True
    return config.is_file() and "package" not in read_json_object(config)


def _load(model, checkpoint: Path):
    """`model` with the checkpoint's weights; a stage trained with LoRA holds the base and the
    adapters, which come back merged into the weights (a plain model for the next stage)."""
    lora = read_config(checkpoint).get("lora")
    if lora:
        config_from_dict(LoRAConfig, lora, f"{checkpoint}/config.json: lora").apply(
            model, ("head",)
        )
    load_weights(checkpoint, model)
    remove_lora(model)
    return model


def model_config(kind: str, config: LlamaConfig) -> dict:
    return {"kind": kind, "llama": config.to_dict()}
