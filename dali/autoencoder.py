"""Train latent diffusion's first stage, the KL-regularised autoencoder (Rombach et al. 2022, §3).

    python -m dali.autoencoder --data mnist:../shared/data/mnist --out runs/ae

`dali.vae.AutoencoderKL` at a small size (1 channel, 16/32/32 channels, f = 4: 32×32 digits ->
4×8×8 latents; MNIST's 28×28 are resized to 32×32), trained with latent diffusion's objective
without its perceptual and adversarial terms: the L1 reconstruction error summed over the pixels
plus `kl_weight` (the paper's 1e-6) times KL(q(z|x) ‖ N(0, I)) summed over the latent, per image.
At the end it computes the latent scaling factor from the data (§4.3.2: one over the standard
deviation of the latents of the training images) and writes `OUT/autoencoder/`, the checkpoint
`python -m dali.train_latent --autoencoder OUT` reads, and a grid of real images above their
reconstructions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import torch

from transformer.training import (
    CommandParser,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    check_config,
    dataclass_from_args,
    param,
    run_command,
    save_checkpoint,
    seed_everything,
    setup_distributed,
)

from .data import DaliError, load_images, save_grid
from .vae import AutoencoderKL, VAEConfig

IMAGE_SIZE = 32
SMALL = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                  layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=1.0)  # fmt: skip
HELD_OUT = 1000  # the last images, for the reconstruction error


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    steps: int = param(2000, "optimizer steps")
    batch_size: int = param(64, "images per step")
    lr: float = param(1e-3, "Adam learning rate (constant after 100 warm-up steps)")
    kl_weight: float = param(1e-6, "weight of the KL term (Rombach et al.: 1e-6)")
    checkpoint_every: int = param(1000, "write a checkpoint every N steps (0 = only at the end)")

    def __post_init__(self):
        check_config(self, positive=("steps", "batch_size", "lr"),
                     non_negative=("kl_weight", "checkpoint_every"))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dali.autoencoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits",
                        help="labelled images: digits (embedded 8×8) or mnist:DIR (default: digits)")  # fmt: skip
    add_dataclass_arguments(parser, AutoencoderTrainConfig, "training", AutoencoderTrainConfig())
    add_common_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(AutoencoderTrainConfig, args)
    if args.out is None:
        raise DaliError("--out DIR is required: the run directory to write into")
    data = load_images(args.data, IMAGE_SIZE, 1)
    if len(data) <= HELD_OUT + cfg.batch_size:
        raise DaliError(
            f"{data.name} has {len(data)} images; the autoencoder needs more than {HELD_OUT + cfg.batch_size}"
        )
    train, held_out = data.images[:-HELD_OUT], data.images[-HELD_OUT:]
    dist, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(SMALL).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    model_config = {"kind": "autoencoder", "vae": dataclasses.asdict(SMALL)}
    run = TrainingRun(args.out, "dali", model_config, dataclasses.asdict(cfg), vae, optimizer,
                      dist, device, args.resume, cfg.checkpoint_every,
                      extra_config={"data": args.data, "seed": args.seed},
                      overwrite=args.overwrite, log_every=10)  # fmt: skip
    if args.resume is None:
        seed_everything(args.seed + 1)
    n = sum(p.numel() for p in vae.parameters())
    run.write(f"dali.autoencoder: {len(train)} training images {IMAGE_SIZE}×{IMAGE_SIZE} from "
              f"{data.name}; {n / 1e6:.2f}M parameters, f = 4")  # fmt: skip
    for step in run.steps(cfg.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x = train[torch.randint(len(train), (cfg.batch_size,), generator=g)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 100)
        mean, log_var = vae.encode(x)
        recon = vae.decode(vae.sample(mean, log_var))
        rec = (recon - x).abs().flatten(1).sum(1).mean()
        kl = vae.kl(mean, log_var).mean()
        loss = rec + cfg.kl_weight * kl
        run.check_finite(step, loss=loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            run.log(step, loss=loss.item(), l1_per_pixel=rec.item() / x[0].numel(), kl=kl.item())
        run.end_of_step(step, {})
    run.save_final(cfg.steps, {})

    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(train[i : i + 500].to(device))[0]
                           for i in range(0, min(len(train), 5000), 500)])  # fmt: skip
        scale = 1.0 / means.std().item()
        recon = torch.cat([vae(held_out[i : i + 500].to(device)) for i in range(0, HELD_OUT, 500)])
        mse = (recon.cpu() - held_out).pow(2).mean().item()
    config = {**run.config, "model": {"kind": "autoencoder",
                                      "vae": {**dataclasses.asdict(SMALL), "scaling_factor": scale}}}  # fmt: skip
    if dist.is_main:
        path = save_checkpoint(run.out / "autoencoder", vae, config)
        grid = torch.cat([held_out[:16], recon[:16].cpu().clamp(-1, 1)])
        save_grid(grid, run.out / "reconstructions.png", nrow=16, scale=2)
        run.write(f"held-out reconstruction MSE {mse:.4f} (images in [-1, 1]); latent std "
                  f"{means.std().item():.3f} -> scaling factor {scale:.4f}; checkpoint {path}")  # fmt: skip
    dist.close()
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="dali.autoencoder"))


if __name__ == "__main__":
    cli()
