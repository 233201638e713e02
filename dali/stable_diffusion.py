"""Stable Diffusion v1 checkpoints in the diffusers layout, read into this package's modules.

A diffusers pipeline directory holds `model_index.json` and one folder per component:
`tokenizer/` (CLIP's vocab.json + merges.txt: `tokenizer.CLIPTokenizer`), `text_encoder/`
(`dali.clip.CLIPTextEncoder`), `vae/` (`dali.vae.AutoencoderKL`), `unet/` and `scheduler/`.
Each folder's `config.json` gives the shapes; the weights are safetensors, renamed from diffusers'
names to ours by the rules below, and every tensor must be used and every parameter filled.
Nothing here runs code from the directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from transformer.training import CheckpointError, steps_bar
from transformer.training.checkpoint import (
    build_from_config,
    load_state_exactly,
    read_json_object,
    read_safetensors,
)

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
    return read_json_object(path)


def load_weights(model: nn.Module, folder: Path) -> nn.Module:
    """The folder's safetensors, renamed, into `model`; a tensor left over or a parameter left
    empty is one error naming the first few."""
    state = {rename(name): tensor for name, tensor in read_safetensors(folder).items()}
    load_state_exactly(model, state, folder)
    return model.eval()


def load_vae(folder: str | Path) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` folder (e.g. a pipeline's `vae/`)."""
    folder = Path(folder)
    config = read_config(folder)
    for key in ("down_block_types", "up_block_types"):
        kinds = set(config.get(key, []))
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise CheckpointError(f"{folder}: {key} {sorted(kinds)} is not Stable Diffusion's VAE")
    model = build_from_config(
        folder / "config.json", lambda: AutoencoderKL(VAEConfig.from_hf(config))
    )
    return load_weights(model, folder)


def load_unet(folder: str | Path) -> LatentUNet:
    """A diffusers `UNet2DConditionModel` folder of Stable Diffusion v1's kind (a pipeline's `unet/`)."""
    folder = Path(folder)
    try:  # from_hf refuses other U-Nets (SD 2, SDXL) with a ValueError saying why
        config = LatentUNetConfig.from_hf(read_config(folder))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    return load_weights(
        build_from_config(folder / "config.json", lambda: LatentUNet(config)), folder
    )


# -- the pipeline ---------------------------------------------------------------------------------

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
# Schedulers whose config gives the β schedule; sampling here is always DDIM (η = 0) on it.
SCHEDULERS = {"DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
              "DPMSolverMultistepScheduler"}  # fmt: skip


class StableDiffusion:
    """Text to image (Rombach et al. 2022, §4.3): CLIP encodes the prompt, DDIM (Song et al. 2021)
    runs the U-Net in the autoencoder's latent space with classifier-free guidance (Ho & Salimans
    2022), and the decoder turns the latents into an image.

    Guidance uses Stable Diffusion's scale s: ε̃ = ε(z, ∅) + s·(ε(z, c) − ε(z, ∅)), which is Ho &
    Salimans' Eq. 6 with w = s − 1 (`dali.pipeline.generate`'s w); ∅ is the empty prompt's
    encoding. The DDIM steps follow the scheduler config: "leading" timesteps shifted by
    `steps_offset`, and ᾱ after the last step 1 or ᾱ_0 (`set_alpha_to_one`)."""

    def __init__(self, tokenizer, text_encoder, vae, unet, diffusion, steps_offset=0,
                 set_alpha_to_one=True):  # fmt: skip
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.diffusion, self.steps_offset = diffusion, steps_offset
        self.set_alpha_to_one = set_alpha_to_one

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        ids = torch.tensor(
            self.tokenizer.batch(prompts, self.text_encoder.config.max_position_embeddings)
        )
        return self.text_encoder(ids.to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}×{width}")
        return (n, self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def generate_latents(self, prompts: list[str], steps: int = 50, guidance: float = 7.5,
                         height: int = 512, width: int = 512, seed: int = 0,
                         latents: Tensor | None = None, negative: str = "",
                         progress: bool = False) -> Tensor:  # fmt: skip
        """The final latents z_0 for each prompt (unscaled by the VAE's factor: decode them)."""
        if guidance < 0:
            raise ValueError(f"the guidance scale must be at least 0, got {guidance}")
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative] * len(prompts))
        if latents is None:
            g = torch.Generator(device=self.device).manual_seed(seed)
            latents = torch.randn(self.latent_shape(len(prompts), height, width), generator=g,
                                  device=self.device)  # fmt: skip
        z = latents.to(self.device)
        stride = self.diffusion.timesteps // steps
        taus = [t + self.steps_offset for t in self.diffusion.ddim_timesteps(steps)]
        for t in steps_bar(taus, progress, f"ddim-{steps}"):
            both = self.unet(torch.cat([z, z]), torch.tensor(t, device=self.device),
                             torch.cat([uncond, cond]))  # fmt: skip
            eps_uncond, eps_cond = both.float().chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            t_prev = t - stride
            if t_prev < 0:  # after the last step: ᾱ = 1, or ᾱ_0 without set_alpha_to_one
                t_prev = -1 if self.set_alpha_to_one else 0
            z, _ = self.diffusion.ddim_step(eps, z, t, t_prev, 0.0, None, clip_x0=False)
        return z

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from the sampler's latents (divided by the scaling factor first)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).clamp(-1, 1)

    def __call__(self, prompts: list[str], **kwargs) -> Tensor:
        return self.decode(self.generate_latents(prompts, **kwargs))


def load_stable_diffusion(directory: str | Path) -> StableDiffusion:
    """A diffusers Stable Diffusion v1 directory (`model_index.json` and the component folders)."""
    from tokenizer.clip import CLIPTokenizer
    from tokenizer.errors import TokenizerError

    from .clip import load_clip_text
    from .diffusion import DiffusionConfig, GaussianDiffusion

    directory = Path(directory)
    index = directory / "model_index.json"
    if not index.is_file():
        raise CheckpointError(
            f"{directory} has no model_index.json: not a diffusers pipeline directory"
        )
    components = read_json_object(index)
    missing = [name for name in COMPONENTS if not (directory / name).is_dir()]
    if missing:
        raise CheckpointError(f"{directory} lacks the component folder(s) {', '.join(missing)}")
    scheduler_kind = (components.get("scheduler") or [None, None])[-1]
    if scheduler_kind not in SCHEDULERS:
        raise CheckpointError(
            f"{index} names the scheduler {scheduler_kind!r}; known: {', '.join(sorted(SCHEDULERS))}"
        )
    folder = directory / "scheduler"
    path = folder / "scheduler_config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no scheduler_config.json")
    scheduler = read_json_object(path)
    kind = scheduler.get("beta_schedule", "linear")
    if kind not in ("linear", "scaled_linear"):
        raise CheckpointError(
            f"{path}: beta_schedule {kind!r} is not supported (linear, scaled_linear)"
        )
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{path}: only ε-prediction (Stable Diffusion v1) is supported")
    diffusion = GaussianDiffusion(DiffusionConfig(
        timesteps=scheduler.get("num_train_timesteps", 1000), schedule=kind,
        beta_start=scheduler.get("beta_start", 0.00085), beta_end=scheduler.get("beta_end", 0.012),
    ))  # fmt: skip
    try:
        tokenizer = CLIPTokenizer.load(directory / "tokenizer")
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    return StableDiffusion(
        tokenizer, load_clip_text(directory / "text_encoder"), load_vae(directory / "vae"),
        load_unet(directory / "unet"), diffusion, scheduler.get("steps_offset", 0),
        scheduler.get("set_alpha_to_one", True),
    )  # fmt: skip
