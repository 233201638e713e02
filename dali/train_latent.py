"""Train text-conditioned latent diffusion on digits (Rombach et al. 2022; `dali.latent`).

    python -m dali.autoencoder --data mnist:../shared/data/mnist --out runs/ae
    python -m dali.train_latent --autoencoder runs/ae --out runs/ldm
    python -m dali.sample --checkpoint runs/ldm --prompt "a handwritten seven" --guidance 2 --out 7.png

Trains the text encoder and the cross-attention U-Net together on the autoencoder's latents of
the images of the autoencoder's data, each image with a prompt drawn from `dali.latent`'s
phrasings of its label (the empty prompt with probability `p_uncond`). The run directory keeps a
copy of the autoencoder and the tokenizer, so it samples on its own. At the end: for each
guidance weight in `eval_guidance`, `eval_samples` images from prompts in the training phrasings
and in two held-out phrasings, scored by the project's classifier (does it read the prompt's
digit?) and by the Fréchet distance against the real-vs-real floor, and a grid with one row per
digit at the weight that follows prompts best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizer import BPETokenizer
from transformer.training import (
    CommandParser,
    ConfigError,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    check_config,
    dataclass_from_args,
    param,
    run_command,
    seed_everything,
    setup_distributed,
)

from .clip import CLIPTextConfig
from .data import DaliError, load_images, save_grid
from .diffusion import DiffusionConfig
from .latent import (
    BOS,
    CONTEXT,
    EOS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    LatentDiffusion,
    encode_prompts,
    prompt_corpus,
    prompt_for,
    random_prompts,
)
from .ldm import LatentUNetConfig
from .pipeline import ema_decay_at, ema_update, load_autoencoder
from .quality import evaluate_samples, train_classifier

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CONTEXT)  # fmt: skip
UNET = LatentUNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 64),
                        cross_attention=(True, True), layers_per_block=2, attention_heads=4,
                        cross_attention_dim=64, norm_num_groups=8)  # fmt: skip
DIFFUSION = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@dataclass(frozen=True)
class LatentTrainConfig:
    steps: int = param(2000, "optimizer steps")
    batch_size: int = param(128, "latents per step")
    lr: float = param(1e-3, "AdamW learning rate (constant after 200 warm-up steps)")
    p_uncond: float = param(0.1, "probability of the empty prompt (Ho & Salimans: 0.1 or 0.2)")
    ema_decay: float = param(0.999, "EMA decay of the weights used for sampling (with warm-up)")
    vocab_size: int = param(300, "byte-level BPE vocabulary learned on the prompts")
    checkpoint_every: int = param(1000, "write a checkpoint every N steps (0 = only at the end)")
    eval_samples: int = param(
        500, "images per guidance weight and phrasing set at the end (0 = none)"
    )
    eval_steps: int = param(25, "DDIM steps for the final evaluation")
    eval_guidance: tuple[float, ...] = param((0.0, 1.0, 2.0, 4.0), "guidance weights w evaluated")

    def __post_init__(self):
        check_config(self, positive=("steps", "batch_size", "lr", "eval_steps"),
                     non_negative=("checkpoint_every", "eval_samples"),
                     probability=("p_uncond", "ema_decay"))  # fmt: skip
        if self.vocab_size < 258:
            raise ConfigError(
                f"LatentTrainConfig.vocab_size must be at least 258 (bytes and 2 specials), "
                f"got {self.vocab_size}"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dali.train_latent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", type=Path, required=True,
                        help="a dali.autoencoder run directory (its images are the training data)")  # fmt: skip
    add_dataclass_arguments(parser, LatentTrainConfig, "training", LatentTrainConfig())
    add_common_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(LatentTrainConfig, args)
    if args.out is None:
        raise DaliError("--out DIR is required: the run directory to write into")
    dist, device = setup_distributed(args.device)
    vae, ae_config = load_autoencoder(args.autoencoder, device)
    data = load_images(ae_config["data"], 32, 1)
    if data.labels is None:
        raise DaliError(f"{data.name} has no labels to write prompts from")
    tokenizer = BPETokenizer.train(prompt_corpus(), cfg.vocab_size, special_tokens=[BOS, EOS],
                                   progress=False)  # fmt: skip
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, **TEXT)
    torch.manual_seed(args.seed)
    ldm = LatentDiffusion(text, UNET, DIFFUSION).to(device)
    optimizer = torch.optim.AdamW(ldm.model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model_config = {"kind": "latent", "text": dataclasses.asdict(text),
                    "unet": dataclasses.asdict(UNET), "diffusion": dataclasses.asdict(DIFFUSION)}  # fmt: skip
    run = TrainingRun(args.out, "dali", model_config, dataclasses.asdict(cfg), ldm, optimizer,
                      dist, device, args.resume, cfg.checkpoint_every, overwrite=args.overwrite,
                      extra_config={"data": ae_config["data"], "autoencoder": str(args.autoencoder),
                                    "seed": args.seed}, log_every=10)  # fmt: skip
    if dist.is_main and args.resume is None:
        tokenizer.save(run.out / "tokenizer.bpe")
        shutil.copytree(Path(args.autoencoder) / "autoencoder", run.out / "autoencoder",
                        dirs_exist_ok=True)  # fmt: skip
    if args.resume is None:
        seed_everything(args.seed + 1)
    scale = vae.config.scaling_factor
    with torch.no_grad():  # the posterior of every training image, once
        stats = [vae.encode(data.images[i : i + 500].to(device)) for i in range(0, len(data), 500)]
    means = torch.cat([m for m, _ in stats])
    stds = torch.cat([(0.5 * v).exp() for _, v in stats])
    n_params = sum(p.numel() for p in ldm.model.parameters())
    run.write(f"dali.train_latent: {len(data)} images of {data.name} as {tuple(means.shape[1:])} "
              f"latents (scale {scale:.4f}); text encoder + U-Net {n_params / 1e6:.2f}M parameters, "
              f"vocabulary {tokenizer.vocab_size}")  # fmt: skip
    for step in run.steps(cfg.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(len(data), (cfg.batch_size,), generator=g)
        z0 = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=g).to(device)
        ) * scale
        prompts = random_prompts(data.labels[index], random.Random(args.seed * 1_000_003 + step))
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = encode_prompts(tokenizer, prompts).to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 200)
        loss = ldm.diffusion.training_loss(lambda z, t, y=ids: ldm.eps(ldm.model, z, t, y), z0)
        run.check_finite(step, loss=loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ldm.model.parameters(), 1.0)
        optimizer.step()
        ema_update(ldm.ema, ldm.model, ema_decay_at(step, cfg.ema_decay, True))
        if (step + 1) % 10 == 0:
            run.log(step, loss=loss.item())
        run.end_of_step(step, {})
    run.save_final(cfg.steps, {})
    if dist.is_main and cfg.eval_samples:
        evaluate(ldm, tokenizer, vae, data, cfg, run, device, args.seed)
    dist.close()
    return 0


def sample_images(ldm, tokenizer, vae, prompts: list[str], guidance: float, steps: int,
                  seed: int, device, batch: int = 250) -> torch.Tensor:  # fmt: skip
    """Images in [-1, 1] for prompts: latents from the diffusion, decoded by the autoencoder."""
    null = encode_prompts(tokenizer, [""])
    out = []
    for i in range(0, len(prompts), batch):
        ids = encode_prompts(tokenizer, prompts[i : i + batch])
        z = ldm.sample(ids, null.expand(len(ids), -1), guidance, steps, seed + i)
        with torch.no_grad():
            out.append(vae.decode(z.to(device) / vae.config.scaling_factor).clamp(-1, 1).cpu())
    return torch.cat(out)


def evaluate(ldm, tokenizer, vae, data, cfg, run, device, seed: int) -> None:
    classifier = train_classifier(data.images, data.labels, seed=seed, device=device)
    labels = torch.arange(cfg.eval_samples) % 10
    rows = []
    for phrasing, templates in (("training", TRAIN_TEMPLATES), ("held-out", HELD_OUT_TEMPLATES)):
        prompts = [prompt_for(int(d), templates[i % len(templates)]) for i, d in enumerate(labels)]
        for w in cfg.eval_guidance:
            started = time.perf_counter()
            images = sample_images(ldm, tokenizer, vae, prompts, w, cfg.eval_steps, seed, device)
            seconds = time.perf_counter() - started
            report = evaluate_samples(images, data.images, classifier[0].features, classifier[0],
                                      seed, device, requested=labels)  # fmt: skip
            rows.append({"phrasing": phrasing, "guidance": w, **report.to_dict(),
                         "classifier_accuracy": classifier[1],
                         "seconds_per_image": seconds / len(prompts)})  # fmt: skip
            run.write(f"{phrasing} prompts, w = {w:g}: requested digit {report.requested_accuracy:.1%}, "
                      f"Fréchet distance {report.distance:.2f} (floor {report.floor:.2f}), "
                      f"{seconds / len(prompts) * 1000:.1f} ms per image")  # fmt: skip
    (run.out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    best = max(rows, key=lambda r: (r["requested_accuracy"], -r["frechet_distance"]))
    prompts = [prompt_for(d, "a handwritten {w}") for d in range(10) for _ in range(10)]
    grid = sample_images(
        ldm, tokenizer, vae, prompts, best["guidance"], cfg.eval_steps, seed + 1, device
    )
    path = save_grid(grid, run.out / "samples" / "prompts.png", nrow=10, scale=2)
    run.write(f"grid ('a handwritten <digit>', one row each, w = {best['guidance']:g}): {path}")


def cli() -> None:
    sys.exit(run_command(main, prog="dali.train_latent"))


if __name__ == "__main__":
    cli()
