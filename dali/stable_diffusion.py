"""Stable Diffusion v1 checkpoints in the diffusers layout, read into this package's modules.

A diffusers pipeline directory holds `model_index.json` and one folder per component:
`tokenizer/` (CLIP's vocab.json + merges.txt: `tokenizer.CLIPTokenizer`), `text_encoder/`
(`dali.clip.CLIPTextEncoder`), `vae/` (`dali.vae.AutoencoderKL`), `unet/` and `scheduler/`.
Each folder's `config.json` gives the shapes; the weights are safetensors, renamed from diffusers'
names to ours by the rules below, and every tensor must be used and every parameter filled.
Nothing here runs code from the directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from transformer.training import CheckpointError
from transformer.training.checkpoint import read_safetensors

from .ldm import LatentUNet, LatentUNetConfig
from .vae import AutoencoderKL, VAEConfig

# diffusers' names -> ours, applied in order (regular expressions on the full tensor name).
_RENAMES = [
    (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.blocks.\2."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.resample."),
    (r"\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r".up.\1.blocks.\2."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", r".up.\1.resample."),
    (r"\.mid_block\.resnets\.0\.", ".middle.block1."),
    (r"\.mid_block\.resnets\.1\.", ".middle.block2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".middle.attention.norm."),
    (r"\.mid_block\.attentions\.0\.(to_q|query)\.", ".middle.attention.attention.wq."),
    (r"\.mid_block\.attentions\.0\.(to_k|key)\.", ".middle.attention.attention.wk."),
    (r"\.mid_block\.attentions\.0\.(to_v|value)\.", ".middle.attention.attention.wv."),
    (r"\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", ".middle.attention.attention.wo."),
    (r"\.mid_block\.attentions\.0\.", ".middle.attention."),  # the U-Net's SpatialTransformer
    (r"\.down_blocks\.(\d+)\.attentions\.(\d+)\.", r".down.\1.attentions.\2."),
    (r"\.up_blocks\.(\d+)\.attentions\.(\d+)\.", r".up.\1.attentions.\2."),
    (r"\.(attn[12])\.to_q\.", r".\1.wq."),
    (r"\.(attn[12])\.to_k\.", r".\1.wk."),
    (r"\.(attn[12])\.to_v\.", r".\1.wv."),
    (r"\.(attn[12])\.to_out\.0\.", r".\1.wo."),
    (r"\.ff\.net\.0\.proj\.", ".ff_in."),
    (r"\.ff\.net\.2\.", ".ff_out."),
    (r"^\.time_embedding\.linear_1\.", ".time_mlp.0."),
    (r"^\.time_embedding\.linear_2\.", ".time_mlp.2."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.time_emb_proj\.", ".time_proj."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def rename(name: str) -> str:
    """One diffusers tensor name in ours."""
    name = "." + name
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name[1:]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"damaged {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"damaged {path}: expected a JSON object")
    return config


def load_weights(model: nn.Module, folder: Path) -> nn.Module:
    """The folder's safetensors, renamed, into `model`; a tensor left over or a parameter left
    empty is one error naming the first few."""
    state = {rename(name): tensor for name, tensor in read_safetensors(folder).items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [n for n in expected if n in state and state[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{folder} does not fit its config: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]}"
        )
    model.load_state_dict(state)
    return model.eval()


def load_vae(folder: str | Path) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` folder (e.g. a pipeline's `vae/`)."""
    folder = Path(folder)
    config = read_config(folder)
    for key in ("down_block_types", "up_block_types"):
        kinds = set(config.get(key, []))
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise CheckpointError(f"{folder}: {key} {sorted(kinds)} is not Stable Diffusion's VAE")
    return load_weights(AutoencoderKL(VAEConfig.from_hf(config)), folder)


def load_unet(folder: str | Path) -> LatentUNet:
    """A diffusers `UNet2DConditionModel` folder of Stable Diffusion v1's kind (a pipeline's `unet/`)."""
    folder = Path(folder)
    try:
        config = LatentUNetConfig.from_hf(read_config(folder))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    return load_weights(LatentUNet(config), folder)
