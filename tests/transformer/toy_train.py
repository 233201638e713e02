"""A minimal trainer on the shared infrastructure, run by test_infra.py (also under torchrun)."""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer.training import (
    TrainingRun,
    add_common_arguments,
    checkpoint_step,
    run_command,
    seed_everything,
    setup_distributed,
)

GLOBAL_BATCH = 8


def main(argv=None):
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--interrupt-at", type=int, default=-1)
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--nan-weights-at", type=int, default=-1)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (fault tests)")
    parser.add_argument("--big", type=int, default=0, help="an extra big x big layer: slow saves")
    args = parser.parse_args(argv)
    dist, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(4, args.width),
        torch.nn.ReLU(),
        torch.nn.Dropout(args.dropout),
        torch.nn.Linear(args.width, 1),
    )
    if args.big:
        model.append(torch.nn.Linear(1, args.big * args.big, bias=False))  # weight only: bulk
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = TrainingRun(
        args.out,
        package="toy",
        model_config={"width": args.width},
        train_config={"steps": args.steps},
        model=model,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
    )
    if args.resume is None:
        seed_everything(args.seed + 1 + dist.rank)
    if dist.enabled:
        model = DistributedDataParallel(model)
    data = run.data_state or {"seen": 0}
    per_rank = GLOBAL_BATCH // dist.world_size
    for step in run.steps(args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(GLOBAL_BATCH, 4, generator=g)
        y = x.sum(1, keepdim=True)
        rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        out = model(x[rows])[:, :1]
        loss = torch.nn.functional.mse_loss(out, y[rows])
        if step == args.nan_at:
            loss = loss * float("nan")
        run.check_finite(step, loss=loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == args.nan_weights_at:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        data["seen"] += GLOBAL_BATCH
        run.log(step, loss=dist.all_reduce_mean(loss).item())
        if step == args.interrupt_at:
            run._on_sigint(None, None)  # as if Ctrl-C arrived during this step
        time.sleep(args.sleep)
        run.end_of_step(step, data)
    if run.last_checkpoint is None or checkpoint_step(run.last_checkpoint) != args.steps:
        run.save(args.steps, data)
    dist.close()


if __name__ == "__main__":
    sys.exit(run_command(main, prog=Path(__file__).name))
