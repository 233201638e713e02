"""Latent diffusion trained here (Rombach et al. 2022): text-conditioned digits in an autoencoder's
latent space, the small-scale version of Stable Diffusion with the same parts.

- The autoencoder (`dali.vae.AutoencoderKL`, trained by `python -m dali.autoencoder`) compresses
  32×32 digits by f = 4 into 4×8×8 latents; the diffusion model works on z · scaling_factor, the
  factor computed from the data so the latents have unit variance (§4.3.2).
- The prompt "a handwritten seven", "the number 7", "7", ... is tokenized by the project's byte-level
  BPE (`tokenizer.BPETokenizer`, trained on the prompts), framed by <|startoftext|> and
  <|endoftext|> and padded to `CONTEXT` tokens as CLIP frames its input, and encoded by a small
  CLIP text encoder (`dali.clip.CLIPTextEncoder`, τ_θ of §3.3) trained jointly with the U-Net.
- The U-Net is `dali.ldm.LatentUNet` (cross-attention to τ_θ(y) at every level), trained with
  L_LDM = ‖ε − ε_θ(z_t, t, τ_θ(y))‖² (Eq. 2) and the prompt replaced by the empty prompt with
  probability p_uncond, so one network is also ε_θ(z_t, t, ∅) for classifier-free guidance.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import Tensor, nn

from .clip import CLIPTextConfig, CLIPTextEncoder
from .diffusion import DiffusionConfig, GaussianDiffusion
from .ldm import LatentUNet, LatentUNetConfig

CONTEXT = 16  # tokens per prompt, special tokens and padding included
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How prompts describe digit d ({w}: its word, {d}: the numeral). The last two are held out of
# training: the evaluation asks with them too, to see the text encoder generalise over phrasing.
TEMPLATES = (
    "a handwritten {w}",
    "the number {d}",
    "{d}",
    "{w}",
    "the digit {w}",
    "a {w}",
    "an image of the number {w}",
    "digit {d}, written by hand",
    "a picture of a handwritten {d}",
    "someone wrote the number {w}",
)
TRAIN_TEMPLATES, HELD_OUT_TEMPLATES = TEMPLATES[:-2], TEMPLATES[-2:]


def prompt_for(label: int, template: str) -> str:
    return template.format(w=WORDS[label], d=label)


def prompt_corpus() -> str:
    """Every prompt the model can be asked, one per line: what the tokenizer is trained on."""
    return "\n".join(prompt_for(d, t) for d in range(10) for t in TEMPLATES)


def random_prompts(labels: Tensor, generator: random.Random) -> list[str]:
    return [prompt_for(int(d), generator.choice(TRAIN_TEMPLATES)) for d in labels]


def encode_prompts(tokenizer, prompts: list[str], context: int = CONTEXT) -> Tensor:
    """(len(prompts), context) ids: <|startoftext|> prompt <|endoftext|>, padded with <|endoftext|>
    (the empty prompt is the two special tokens and padding)."""
    bos, eos = tokenizer.special_tokens[BOS], tokenizer.special_tokens[EOS]
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode_ordinary(prompt)[: context - 2]
        row = [bos, *ids, eos]
        rows.append(row + [eos] * (context - len(row)))
    return torch.tensor(rows)


class LatentDiffusion(nn.Module):
    """The trained parts (`model`: text encoder and U-Net), their EMA copy, the fixed diffusion."""

    def __init__(self, text: CLIPTextConfig, unet: LatentUNetConfig, diffusion: DiffusionConfig):
        super().__init__()
        self.model = nn.ModuleDict({"text": CLIPTextEncoder(text), "unet": LatentUNet(unet)})
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = GaussianDiffusion(diffusion)

    def eps(self, net: nn.ModuleDict, z: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        """ε_θ(z_t, t, τ_θ(y)) for token ids y."""
        return net["unet"](z, t, net["text"](ids))

    @torch.no_grad()
    def sample(self, ids: Tensor, null_ids: Tensor, guidance: float, steps: int = 50,
               seed: int = 0, shape: tuple[int, ...] | None = None) -> Tensor:  # fmt: skip
        """Latents for each prompt's ids (EMA weights, DDIM η = 0), guided with weight w:
        ε̃ = (1 + w) ε(z, c) − w ε(z, ∅) (Ho & Salimans 2022, Eq. 6)."""
        net = self.ema
        device = next(net.parameters()).device
        c = net["unet"].config
        shape = shape or (len(ids), c.in_channels, 8, 8)
        context = net["text"](torch.cat([ids, null_ids]).to(device))

        def model(z, t):
            both = net["unet"](torch.cat([z, z]), torch.cat([t, t]), context)
            cond, uncond = both.float().chunk(2)
            return (1 + guidance) * cond - guidance * uncond

        generator = torch.Generator(device=device).manual_seed(seed)
        return self.diffusion.sample_ddim(model, shape, steps, 0.0, generator, device,
                                          clip_x0=False)  # fmt: skip
