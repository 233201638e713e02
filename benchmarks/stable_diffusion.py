"""Stable Diffusion v1.5's real shapes on this machine: seconds per image and memory, ours against
diffusers in one process.

    python benchmarks/stable_diffusion.py --repeats 2

No checkpoint is needed (nothing is downloaded): both sides get the v1.5 architecture with the same
random weights (ours loaded from diffusers' state dict through `dali.stable_diffusion`'s renaming),
in float32. Timed: one denoising step of the U-Net with classifier-free guidance (batch 2: the
prompt and the empty prompt, 4×64×64 latents, 77 context tokens), the text encoder on the two
prompts, and the VAE decoder at 512×512. Seconds per image = text encoder + 50 steps + decoder.
Peak memory is the process's resident set after everything ran (both models are resident).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dali.clip import CLIPTextEncoder, from_hf_state_dict  # noqa: E402
from dali.ldm import LatentUNet, LatentUNetConfig  # noqa: E402
from dali.stable_diffusion import rename  # noqa: E402
from dali.vae import AutoencoderKL, VAEConfig  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_from(hf: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    ours.load_state_dict({rename(k): v for k, v in hf.state_dict().items()})
    return ours.eval()


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    torch.manual_seed(0)
    hf_unet = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8
    ).eval()  # diffusers' defaults are SD v1's U-Net
    hf_vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        sample_size=512,
    ).eval()  # fmt: skip
    hf_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
    )).eval()  # ViT-L/14's text tower, SD v1's  # fmt: skip
    unet = ours_from(hf_unet, LatentUNet(LatentUNetConfig()))
    vae = ours_from(hf_vae, AutoencoderKL(VAEConfig()))
    text = CLIPTextEncoder()
    text.load_state_dict(from_hf_state_dict(hf_text.state_dict()))
    text.eval()
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("text encoder", text), ("VAE", vae), ("U-Net", unet))}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    z, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t, ids = torch.tensor([500, 500]), torch.randint(0, 49408, (2, 77), generator=g)
    latent = torch.randn(1, 4, 64, 64, generator=g)
    rows = [
        ("U-Net step, CFG batch 2", lambda: unet(z, t, ctx), lambda: hf_unet(z, t, ctx).sample),
        ("text encoder, 2 prompts", lambda: text(ids), lambda: hf_text(ids).last_hidden_state),
        ("VAE decode 512×512", lambda: vae.decode(latent), lambda: hf_vae.decode(latent).sample),
    ]
    results = {}
    print(f"parameters: {', '.join(f'{k} {v:,}' for k, v in counts.items())}")
    print(f"{torch.get_num_threads()} threads, float32, median of {args.repeats}\n")
    print("| part | ours (s) | diffusers (s) | diffusers / ours |")
    print("|---|---|---|---|")
    for name, ours, theirs in rows:
        a, b = timed(ours, args.repeats), timed(theirs, args.repeats)
        results[name] = (a, b)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}× |")
    per_image = [results["text encoder, 2 prompts"][i] + 50 * results["U-Net step, CFG batch 2"][i]
                 + results["VAE decode 512×512"][i] for i in (0, 1)]  # fmt: skip
    print(f"| one 512×512 image, 50 steps | {per_image[0]:.0f} | {per_image[1]:.0f} | "
          f"{per_image[1] / per_image[0]:.2f}× |")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\npeak resident memory (both pipelines' weights resident): {peak:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
