"""Train a DDPM (Algorithm 1) on digits, MNIST or a folder of images.

    python -m dali.train --out runs/digits                      # embedded digits, CPU minutes
    python -m dali.train --data mnist:../shared/data/mnist --out runs/mnist
    python -m dali.train --data folder:photos/ --config cifar10 --out runs/photos
    torchrun --nproc-per-node 2 -m dali.train --out runs/ddp    # data parallel, unchanged

Adam with linear warm-up, gradient clipping, an EMA of the weights (saved in every checkpoint, so
resume is exact; sampling uses it), optional random horizontal flips. Writes a sample grid every
`--sample-every` steps, checkpoints, and at the end a grid and the quality numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer.training import (
    CommandParser,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    autocast,
    check_config,
    choose_preset,
    dataclass_from_args,
    param,
    preset_flags,
    run_command,
    seed_everything,
    select_dtype,
    setup_distributed,
)

from .data import DaliError, load_images, save_grid
from .diffusion import DiffusionConfig
from .model import UNetConfig
from .pipeline import DDPM, ema_decay_at, ema_update, generate


@dataclass
class TrainConfig:
    steps: int = param(800_000, "Optimizer steps (paper: 800k for CIFAR-10).")
    batch_size: int = param(128, "Global batch size, split across processes (paper: 128).")
    lr: float = param(2e-4, "Adam learning rate (paper: 2e-4).")
    warmup_steps: int = param(5000, "Linear learning-rate warm-up steps (paper: 5000).")
    grad_clip: float = param(1.0, "Clip the gradient norm to this (paper: 1.0; 0 disables).")
    ema_decay: float = param(
        0.9999,
        "Decay of the exponential moving average of the weights used for sampling (paper: 0.9999).",
    )
    ema_warmup: bool = param(
        False, "Use decay min(ema_decay, (1+n)/(10+n)) after n updates, for short runs."
    )
    hflip: bool = param(
        False,
        "Random horizontal flips of the training images (paper: on for CIFAR-10; off for digits).",
    )
    sample_every: int = param(
        10_000, "Write a sample grid (DDIM-50, EMA weights) every this many steps (0: never)."
    )
    checkpoint_every: int = param(
        10_000, "Write a checkpoint every this many steps (0: only at the end)."
    )
    log_every: int = param(10, "Append the loss to metrics.jsonl every this many steps.")
    eval_samples: int = param(
        1000, "Samples generated at the end to measure quality (labelled data only; 0 skips)."
    )
    eval_sampler: Literal["ancestral", "ddim"] = param(
        "ddim", "Sampler for the final quality numbers: ancestral (1000 steps) or ddim."
    )
    eval_steps: int = param(100, "DDIM steps for the final quality numbers.")
    p_uncond: float = param(
        0.1,
        "Class-conditional models: probability of training on the null label instead of the "
        "image's, so one network is both ε(x, c) and ε(x, ∅) (Ho & Salimans 2022: 0.1 or 0.2).",
        added=True,
    )

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_size", "lr", "log_every", "eval_steps"),
            non_negative=("warmup_steps", "grad_clip", "sample_every", "checkpoint_every",
                          "eval_samples"),
            probability=("ema_decay", "p_uncond"),
        )  # fmt: skip


@dataclass
class Preset:
    """A named preset (`--config NAME`): one record of the U-Net's shape, the diffusion and the
    training values. Flags override single fields; `--help` shows the values of the preset chosen."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    train: TrainConfig


# Short CPU runs deviate from the paper's optimisation (documented in dali/README.md): a larger
# learning rate, a short warm-up and an EMA with warm-up and a smaller decay, because 0.9999 averages
# over ~10,000 steps, longer than the whole run.
_SHORT = dict(
    warmup_steps=100, ema_decay=0.999, ema_warmup=True, sample_every=500, checkpoint_every=500
)
# 28×28 grayscale (MNIST): 28 -> 14 -> 7, attention at 7×7.
_MNIST_UNET = UNetConfig(
    image_size=28,
    in_channels=1,
    channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(7,),
    norm_groups=8,
)
PRESETS: dict[str, Preset] = {
    "digits": Preset(
        UNetConfig(
            image_size=8,
            in_channels=1,
            channels=32,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(4,),
            norm_groups=8,
        ),
        DiffusionConfig(),
        TrainConfig(steps=1500, batch_size=64, lr=1e-3, eval_samples=1000, eval_steps=50, **_SHORT),
    ),
    "gray16": Preset(
        UNetConfig(
            image_size=16,
            in_channels=1,
            channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(8,),
            norm_groups=8,
        ),
        DiffusionConfig(),
        TrainConfig(steps=20_000, **{**_SHORT, "sample_every": 2000, "checkpoint_every": 2000}),
    ),
    "mnist": Preset(
        _MNIST_UNET,
        DiffusionConfig(),
        TrainConfig(steps=4000, batch_size=64, lr=5e-4, eval_samples=1000, **_SHORT),
    ),
    # What a shared 2-core CPU can train in ~40 minutes: one block per level, batch 32, EMA 0.995.
    "mnist-cpu": Preset(
        dataclasses.replace(_MNIST_UNET, num_res_blocks=1),
        DiffusionConfig(),
        TrainConfig(
            steps=3000,
            batch_size=32,
            lr=1e-3,
            eval_samples=500,
            eval_steps=50,
            **{**_SHORT, "ema_decay": 0.995, "sample_every": 250, "checkpoint_every": 250},
        ),
    ),
    "gray32": Preset(
        UNetConfig(
            image_size=32,
            in_channels=1,
            channels=64,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(8,),
            norm_groups=16,
        ),
        DiffusionConfig(),
        TrainConfig(),
    ),
    "cifar10": Preset(UNetConfig(), DiffusionConfig(), TrainConfig(hflip=True)),
}
DEFAULT_PRESET = {"digits": "digits", "mnist": "mnist", "folder": "cifar10"}


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    """The flags; `preset` (default: digits) supplies the defaults `--help` shows."""
    preset = preset or PRESETS["digits"]
    parser = CommandParser(
        prog="dali.train",
        description="Train a DDPM (Ho et al. 2020). The default trains on scikit-learn's 8×8 digits "
        "(offline) and produces recognisable digits in a few CPU minutes.",
    )
    parser.add_argument(
        "--data",
        default="digits",
        help="digits (embedded, 1,797 8×8 images), mnist:DIR (idx files) or folder:DIR "
        "(PNG/JPEG of one size, resized and centre-cropped to --image-size)",
    )
    parser.add_argument(
        "--config",
        choices=sorted(PRESETS),
        default=None,
        help="preset for model, diffusion and training (default: digits for digits, mnist for "
        "mnist:DIR, cifar10 for folder:DIR); flags below override single fields",
    )
    add_common_arguments(parser, training=True)
    add_dataclass_arguments(parser, UNetConfig, "model (U-Net; the preset's values)", preset.unet)
    add_dataclass_arguments(parser, DiffusionConfig, "diffusion", preset.diffusion)
    add_dataclass_arguments(parser, TrainConfig, "training", preset.train)
    return parser


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the base learning rate, then constant (the paper's schedule)."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def batch_indices(
    seed: int, step: int, n: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of `step`: image indices, flip decisions and uniform draws for dropping
    labels, a pure function of (seed, step), so resume and every process agree without any
    stored data position."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(n, (batch_size,), generator=g)
    flip = torch.rand(batch_size, generator=g) < 0.5
    return index, flip, torch.rand(batch_size, generator=g)


def main(argv=None) -> int:
    early = preset_flags(argv, config=None, data="digits")
    name = early.config or DEFAULT_PRESET.get(early.data.partition(":")[0], "digits")
    preset = choose_preset(PRESETS, name)
    args = build_parser(preset).parse_args(argv)
    unet_config = dataclass_from_args(UNetConfig, args, base=preset.unet)
    diffusion_config = dataclass_from_args(DiffusionConfig, args, base=preset.diffusion)
    train_config = dataclass_from_args(TrainConfig, args, base=preset.train)
    if train_config.eval_samples and not 1 <= train_config.eval_steps <= diffusion_config.timesteps:
        raise DaliError(f"--eval-steps must be between 1 and T = {diffusion_config.timesteps}")
    if args.out is None:
        raise DaliError("--out DIR is required: the run directory to write into")

    data = load_images(args.data, unet_config.image_size, unet_config.in_channels)
    if unet_config.num_classes:
        if data.labels is None:
            raise DaliError(f"--num-classes needs labelled data; {data.name} has no labels")
        if int(data.labels.max()) >= unet_config.num_classes or int(data.labels.min()) < 0:
            raise DaliError(
                f"{data.name} has labels 0..{int(data.labels.max())}, more than --num-classes "
                f"{unet_config.num_classes}"
            )
    dist, device = setup_distributed(args.device)
    if train_config.batch_size % dist.world_size:
        raise DaliError(
            f"--batch-size {train_config.batch_size} does not split over {dist.world_size} processes"
        )
    dtype = select_dtype(args.dtype, device)
    torch.manual_seed(args.seed)  # identical initial weights on every process
    ddpm = DDPM(unet_config, diffusion_config).to(device)
    optimizer = torch.optim.Adam(ddpm.model.parameters(), lr=train_config.lr)
    run = TrainingRun(
        args.out,
        package="dali",
        model_config=ddpm.model_config(),
        train_config=dataclasses.asdict(train_config),
        model=ddpm,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=train_config.checkpoint_every,
        extra_config={"data": args.data, "seed": args.seed},
        log_every=train_config.log_every,
    )
    if args.resume is None:
        seed_everything(args.seed + 1 + dist.rank)  # timesteps and noise differ per process
    run.write(
        f"dali.train: {len(data)} images {tuple(data.images.shape[1:])} from {data.name}; "
        f"U-Net {ddpm.model.num_parameters() / 1e6:.2f}M parameters; {dist.world_size} process(es) "
        f"on {device}"
    )
    net = ddpm.model
    if args.compile:
        net = torch.compile(net)
    if dist.enabled:
        net = DistributedDataParallel(net)
    images = data.images
    per_rank = train_config.batch_size // dist.world_size
    diffusion = ddpm.diffusion
    data_state = run.data_state or {}

    for step in run.steps(train_config.steps):
        ddpm.model.train()
        index, flip, draw = batch_indices(args.seed, step, len(images), train_config.batch_size)
        rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        x0 = images[index[rows]].to(device)
        labels = None
        if unet_config.num_classes:  # classifier-free guidance: drop the label with p_uncond
            labels = data.labels[index[rows]]
            labels = labels.masked_fill(draw[rows] < train_config.p_uncond, unet_config.num_classes)
            labels = labels.to(device)
        if train_config.hflip:
            x0 = torch.where(flip[rows, None, None, None].to(device), x0.flip(-1), x0)
        lr = lr_at(step, train_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, dtype):
            loss = diffusion.training_loss(lambda x, t, c=labels: net(x, t, c), x0)
        run.check_finite(step, loss=loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ddpm.model.parameters(), train_config.grad_clip)
        optimizer.step()
        ema_update(
            ddpm.ema,
            ddpm.model,
            ema_decay_at(step, train_config.ema_decay, train_config.ema_warmup),
        )
        if (step + 1) % train_config.log_every == 0:
            run.log(step, loss=dist.all_reduce_mean(loss.detach()).item(), lr=lr)
        if (
            dist.is_main
            and train_config.sample_every
            and (step + 1) % train_config.sample_every == 0
        ):
            grid = generate(ddpm, 64, "ddim", 50, seed=args.seed, device=device, dtype=dtype)
            save_grid(
                grid, run.out / "samples" / f"step_{step + 1:07d}.png", scale=_scale(unet_config)
            )
        run.end_of_step(step, data_state)

    started = time.perf_counter()
    checkpoint = run.save_final(train_config.steps, data_state)
    if dist.is_main:
        grid = generate(
            ddpm, 64, "ancestral", seed=args.seed, device=device, dtype=dtype, progress=True
        )
        path = save_grid(
            grid, run.out / "samples" / "final_ancestral.png", scale=_scale(unet_config)
        )
        run.write(
            f"checkpoint: {checkpoint}\nsamples (ancestral, {diffusion.timesteps} steps): {path}"
        )
        if data.labels is not None and train_config.eval_samples > 0:
            from .evaluate import measure_quality

            report = measure_quality(
                ddpm,
                data,
                train_config.eval_samples,
                train_config.eval_sampler,
                train_config.eval_steps,
                seed=args.seed,
                device=device,
                dtype=dtype,
            )
            for line in report.lines():
                run.write(line)
            (run.out / "quality.json").write_text(
                json.dumps(
                    {
                        **report.to_dict(),
                        "sampler": train_config.eval_sampler,
                        "steps": train_config.eval_steps,
                    },
                    indent=2,
                )
                + "\n"
            )
        run.write(
            f"end-of-training sampling and evaluation took {time.perf_counter() - started:.0f}s"
        )
    dist.close()
    return 0


def _scale(config: UNetConfig) -> int:
    """Upscale factor so that small images make a grid one can look at."""
    return max(1, 64 // config.image_size)


def cli() -> None:
    """Console script `dali-train`: the same as `python -m dali.train`."""
    sys.exit(run_command(main, prog="dali.train"))


if __name__ == "__main__":
    cli()
