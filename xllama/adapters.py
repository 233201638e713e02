"""LoRA adapters of Llama models, in our layout and in Hugging Face `peft`'s.

LoRA itself (Hu et al. 2021) is `transformer.lora`, shared by every package. Here: the Llama
specifics.

- Which layers: `ATTENTION` (W_q, W_k, W_v, W_o: the default) and `FEED_FORWARD` (SwiGLU's W1, W2,
  W3), by our module names.
- `peft` interop. `save_peft_adapter` writes what `PeftModel.from_pretrained(LlamaForCausalLM...)`
  loads on top of the model `xllama.convert.export_hf` wrote: Hugging Face module names
  (`model.layers.N.self_attn.q_proj`), and B's rows of W_q and W_k permuted to the rotate-half
  pairing exactly as `export_hf` permutes the weights (ΔW = B A, so permuting ΔW's rows is
  permuting B's). `load_any_adapter` reads either layout, so an adapter `peft` saved for an HF Llama
  loads onto the same model loaded here.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from transformer.lora import LoRAError, load_adapter, read_adapter, save_adapter

from .convert import permute_to_adjacent, permute_to_half
from .model import Llama

ATTENTION = ("wq", "wk", "wv", "wo")
FEED_FORWARD = ("w1", "w2", "w3")
HF_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
OUR_MODULES = {hf: ours for ours, hf in HF_MODULES.items()}
PEFT_PREFIX = "base_model.model."


def _hf_module(ours: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj`; `output` -> `lm_head`."""
    if ours == "output":
        return "lm_head"
    parts = ours.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in HF_MODULES:
        raise LoRAError(f"{ours} has no Hugging Face counterpart")
    return f"model.layers.{parts[1]}.{HF_MODULES[parts[2]]}"


def _our_module(hf: str) -> str:
    if hf == "lm_head":
        return "output"
    parts = hf.split(".")
    if (
        len(parts) != 5
        or parts[:2] != ["model", "layers"]
        or ".".join(parts[3:]) not in OUR_MODULES
    ):
        raise LoRAError(f"the peft adapter adapts {hf!r}, which a Llama model does not have")
    return f"layers.{parts[2]}.{OUR_MODULES['.'.join(parts[3:])]}"


def _heads(model: Llama, module: str) -> int | None:
    """Heads whose rows the rotary pairing permutes (W_q: n_heads, W_k: n_kv_heads), else None."""
    if module.endswith("attention.wq"):
        return model.config.n_heads
    if module.endswith("attention.wk"):
        return model.config.kv_heads
    return None


def save_peft_adapter(model: Llama, directory: Path) -> Path:
    """The model's adapters in `peft`'s layout, for the Hugging Face export of its base."""
    to_half = model.config.rope_pairing == "adjacent"

    def to_peft(tensors: dict[str, Tensor], config: dict) -> tuple[dict[str, Tensor], dict]:
        out = {}
        for key, tensor in tensors.items():
            module, factor = key.rsplit(".", 1)
            heads = _heads(model, module)
            if factor == "lora_B" and heads and to_half:
                tensor = permute_to_half(tensor, heads).contiguous()
            out[f"{PEFT_PREFIX}{_hf_module(module)}.{factor}.weight"] = tensor
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": config["r"],
            "lora_alpha": config["lora_alpha"],
            "lora_dropout": config["lora_dropout"],
            "target_modules": [_hf_module(m) for m in config["target_modules"]],
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "modules_to_save": None,
        }
        return out, peft_config

    return save_adapter(model, directory, rename=to_peft)


def load_any_adapter(model: Llama, directory: Path) -> list[str]:
    """An adapter in our layout or `peft`'s, onto `model`; returns the adapted module names."""
    tensors, config = read_adapter(directory)
    if any(k.startswith(PEFT_PREFIX) for k in tensors):
        tensors, config = _from_peft(model, tensors, config, directory)
    return load_adapter(model, directory, tensors, config)


def _from_peft(model: Llama, tensors, config: dict, directory: Path):
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{directory} holds a {config['peft_type']} adapter, not LoRA")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise LoRAError(f"{directory}: peft's {flag} is not supported here")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoRAError(
            f"{directory}: per-layer ranks or alphas (peft's rank_pattern) are not supported here"
        )
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{directory}: adapters with trained biases are not supported here")
    to_adjacent = model.config.rope_pairing == "adjacent"
    ours = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight"):
            raise LoRAError(f"{directory}: unexpected tensor {key!r} in a peft LoRA adapter")
        module, factor = key[len(PEFT_PREFIX) : -len(".weight")].rsplit(".", 1)
        if factor == "base_layer" and module == "lm_head":
            # peft saves the base output layer beside its adapter (for resized vocabularies);
            # here the base is the model the adapter is loaded onto: it must be that layer.
            if tensor.shape != model.output.weight.shape:
                raise LoRAError(f"{directory}: the adapter's lm_head is for another vocabulary")
            continue
        if factor not in ("lora_A", "lora_B"):
            raise LoRAError(f"{directory}: unexpected tensor {key!r} in a peft LoRA adapter")
        module = _our_module(module)
        heads = _heads(model, module)
        if factor == "lora_B" and heads and to_adjacent:
            tensor = permute_to_adjacent(tensor, heads).contiguous()
        ours[f"{module}.{factor}"] = tensor
    settings = {"r": config["r"], "lora_alpha": config["lora_alpha"]}
    return ours, {**settings, "lora_dropout": config.get("lora_dropout", 0.0)}
