"""Benchmark: our DDPM U-Net against diffusers' UNet2DModel, and DDIM-50 against ancestral-1000.

    python benchmarks/dali.py                                   # speed, one process
    python benchmarks/dali.py --quality runs/digits --n 500     # + Fréchet distance of the samplers

Speed: the same architecture at equal parameter count (1,112,801 each: 16×16 grayscale, channels
32/64/64, one residual block per level, attention at 8×8 and in the middle), built by us
(`dali.model.UNet`) and by diffusers (`UNet2DModel`). Timed in one process, alternating between
the two so both see the same machine load:
  training step   forward + L_simple + backward + Adam step, batch 64
  denoising step  one DDIM step (network forward + scheduler update) for 16 samples, no grad
Reported: the median over --repeats rounds, and the ratio diffusers / ours (above 1: we are faster).

Quality: the Fréchet distance (classifier features, dali.quality) of DDIM-50 (η = 0), with x̂₀
clipped at every step (our default and diffusers') and with the raw x̂₀ of Song et al., and of the
paper's 1000-step ancestral sampler, from the same checkpoint, number of samples and seed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dali.diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from dali.model import UNet, UNetConfig  # noqa: E402

OUR_CONFIG = UNetConfig(16, 1, 32, (1, 2, 2), 1, (8,), norm_groups=8)


def diffusers_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        dropout=0.1,
    )


def train_step_timer(model, forward, batch: int):
    diffusion = GaussianDiffusion(DiffusionConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    x0 = torch.rand(batch, 1, 16, 16) * 2 - 1
    model.train()

    def step() -> float:
        start = time.perf_counter()
        loss = diffusion.training_loss(forward, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def ours_denoise_timer(model, n: int, steps: int = 5):
    diffusion = GaussianDiffusion(DiffusionConfig())
    model.eval()

    @torch.no_grad()
    def run() -> float:
        start = time.perf_counter()
        diffusion.sample_ddim(model, (n, 1, 16, 16), steps, 0.0, torch.Generator().manual_seed(0))
        return (time.perf_counter() - start) / steps

    return run


def diffusers_denoise_timer(model, n: int, steps: int = 5):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    scheduler.set_timesteps(steps)
    model.eval()

    @torch.no_grad()
    def run() -> float:
        start = time.perf_counter()
        x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        return (time.perf_counter() - start) / steps

    return run


def speed(repeats: int, batch: int, n_samples: int) -> None:
    torch.manual_seed(0)
    ours = UNet(OUR_CONFIG)
    theirs = diffusers_unet()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"parameters: ours {n_ours:,}, diffusers UNet2DModel {n_theirs:,}")
    timers = {
        ("train", "ours"): train_step_timer(ours, ours, batch),
        ("train", "diffusers"): train_step_timer(theirs, lambda x, t: theirs(x, t).sample, batch),
        ("denoise", "ours"): ours_denoise_timer(ours, n_samples),
        ("denoise", "diffusers"): diffusers_denoise_timer(theirs, n_samples),
    }
    times = {key: [] for key in timers}
    for timer in timers.values():  # warm-up
        timer()
    for _ in range(repeats):
        for key, timer in timers.items():  # interleaved: both see the same load
            times[key].append(timer())
    print("\n| measurement | ours (ms) | diffusers (ms) | diffusers / ours |")
    print("|---|---|---|---|")
    for what, label in [
        ("train", f"training step, batch {batch}"),
        ("denoise", f"DDIM denoising step, {n_samples} samples"),
    ]:
        a = statistics.median(times[(what, "ours")]) * 1e3
        b = statistics.median(times[(what, "diffusers")]) * 1e3
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


def quality(checkpoint: Path, n: int, seed: int) -> None:
    from dali.data import load_images
    from dali.evaluate import measure_quality
    from dali.pipeline import generate, load_ddpm

    ddpm, config = load_ddpm(checkpoint)
    c = ddpm.unet_config
    data = load_images(config.get("data", "digits"), c.image_size, c.in_channels)
    rows = []
    T = ddpm.diffusion.timesteps
    runs = [
        ("DDIM-50 (η=0)", "ddim", 50, True),
        ("DDIM-50 (η=0), raw x̂₀ (--no-ddim-clip-x0)", "ddim", 50, False),
        (f"ancestral-{T}", "ancestral", None, False),
    ]
    for label, sampler, steps, clip in runs:
        start = time.perf_counter()
        samples = generate(
            ddpm, n, sampler, steps, seed=seed, batch_size=n, progress=True, ddim_clip_x0=clip
        )
        seconds = time.perf_counter() - start
        report = measure_quality(ddpm, data, n, samples=samples, seed=seed)
        rows.append((label, report, seconds))
    print(
        f"\n| sampler | Fréchet distance | floor | classes present | sampling time ({n} samples) |"
    )
    print("|---|---|---|---|---|")
    for label, r, seconds in rows:
        present = sum(k > 0 for k in r.label_counts)
        print(f"| {label} | {r.distance:.3f} | {r.floor:.3f} | {present}/10 | {seconds:.0f} s |")
    ddim, raw, ancestral = (row[1].distance for row in rows)
    print(
        f"DDIM-50 / ancestral-{T} distance: {ddim / ancestral:.2f} ({raw / ancestral:.2f} raw x̂₀)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="training batch")
    parser.add_argument("--samples", type=int, default=16, help="samples per denoising step")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--quality", type=Path, default=None, help="checkpoint for DDIM vs ancestral"
    )
    parser.add_argument("--n", type=int, default=500, help="samples per sampler for --quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if not args.skip_speed:
        speed(args.repeats, args.batch, args.samples)
    if args.quality is not None:
        quality(args.quality, args.n, args.seed)


if __name__ == "__main__":
    main()
