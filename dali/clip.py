"""CLIP's text encoder (Radford et al. 2021, §2.4), the text side of Stable Diffusion v1.

A GPT-2-style Transformer over at most 77 tokens (`tokenizer.CLIPTokenizer`): token embeddings
plus learned position embeddings; pre-norm blocks of causal multi-head self-attention (the shared
`transformer.attention.MultiHeadAttention`) and an MLP with quick-GELU, x·σ(1.702x); a final layer
norm. Stable Diffusion conditions its U-Net on all 77 final hidden states (Rombach et al. 2022,
§3.3: τ_θ(y)), not only the pooled end-of-text state CLIP's contrastive loss uses.

The defaults are ViT-L/14's text tower, the one Stable Diffusion v1 uses (123M parameters).
`load_clip_text(dir)` reads a Hugging Face `CLIPTextModel` directory (`config.json` +
safetensors, with or without the `text_model.` prefix), e.g. a diffusers pipeline's
`text_encoder/`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from transformer.attention import MultiHeadAttention
from transformer.training import CheckpointError
from transformer.training.checkpoint import (
    build_from_config,
    load_state_exactly,
    read_json_object,
    read_safetensors,
)


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, config: dict) -> CLIPTextConfig:
        """The fields of a Hugging Face `CLIPTextConfig` (or a `CLIPConfig`'s `text_config`)."""
        config = config.get("text_config", config)
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation, x·σ(1.702x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": nn.functional.gelu}


class CLIPLayer(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)): the pre-norm block of GPT-2 that CLIP uses."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = MultiHeadAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), is_causal=True)
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unknown hidden_act {config.hidden_act!r}; known: {', '.join(ACTIVATIONS)}"
            )
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        """(batch, T ≤ 77) token ids -> (batch, T, hidden) final-normed hidden states."""
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)


# Hugging Face's names -> ours, per layer (the rest keep their names).
_HF_LAYER = {
    "self_attn.q_proj": "self_attn.wq",
    "self_attn.k_proj": "self_attn.wk",
    "self_attn.v_proj": "self_attn.wv",
    "self_attn.out_proj": "self_attn.wo",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}


def from_hf_state_dict(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """A `CLIPTextModel` state dict in our names (`text_model.` prefix optional; the position ids
    buffer and any projection are not part of the encoder)."""
    out = {}
    for name, tensor in hf.items():
        name = name.removeprefix("text_model.")
        if name.endswith("position_ids") or not name.startswith(
            ("embeddings.", "encoder.layers.", "final_layer_norm.")
        ):
            continue
        name = name.removeprefix("embeddings.").replace("encoder.layers.", "layers.")
        for hf_name, ours in _HF_LAYER.items():
            name = name.replace(f".{hf_name}.", f".{ours}.")
        out[name] = tensor
    return out


def load_clip_text(directory: str | Path) -> CLIPTextEncoder:
    """A Hugging Face `CLIPTextModel` directory as our encoder, every weight accounted for."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not a CLIP text encoder directory")
    config = read_json_object(config_path)
    model = build_from_config(config_path, lambda: CLIPTextEncoder(CLIPTextConfig.from_hf(config)))
    load_state_exactly(model, from_hf_state_dict(read_safetensors(directory)), directory)
    return model.eval()
