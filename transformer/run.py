"""A training run's directory, logging, checkpoints, resume, Ctrl-C and non-finite losses.

Not a framework: every trainer writes its own loop and calls into a `TrainingRun` for the parts that
are the same everywhere:

    run = TrainingRun(out, package="xllama", model_config=..., train_config=..., model=model,
                      optimizer=opt, dist=dist, device=device, resume=args.resume)
    data_state = run.data_state or {...}         # restored on resume
    for step in run.steps(total_steps):          # starts after the restored step; progress bar
        loss = ...
        run.check_finite(loss, step)             # stops with the step and last good checkpoint
        run.log(step, loss=loss.item(), lr=lr)   # metrics.jsonl + progress bar (rank 0)
        run.end_of_step(step, data_state)        # periodic checkpoints; Ctrl-C saves, exits 130
    run.save(total_steps, data_state)

The run directory holds `config.json`, `metrics.jsonl` and `checkpoints/step_NNNNNNN/`, with
`checkpoints/latest` naming the newest. Only rank 0 writes; every rank restores.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    check_config,
    load_train_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
    write_json_atomic,
)
from .cli import UserError
from .runtime import Distributed


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; training stops instead of writing garbage."""


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip()
    if (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(f"no checkpoint found at {path}")


class TrainingRun:
    def __init__(
        self,
        out: Path,
        package: str,
        model_config: dict,
        train_config: dict,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        dist: Distributed | None = None,
        device: torch.device | None = None,
        resume: Path | None = None,
        checkpoint_every: int = 0,
        keep_last: int = 2,
        extra_config: dict | None = None,
        log_every: int = 1,
    ):
        if out is None:
            raise UserError("--out DIR is required: the run directory to write into")
        self.out = Path(out)
        self.package, self.model, self.optimizer = package, model, optimizer
        self.dist = dist or Distributed()
        self.device = device or torch.device("cpu")
        self.checkpoint_every, self.keep_last, self.log_every = (
            checkpoint_every,
            keep_last,
            log_every,
        )
        self.config = {
            "package": package,
            "model": model_config,
            "train": train_config,
            **(extra_config or {}),
        }
        self.start_step = 0
        self.data_state: dict | None = None
        self.last_checkpoint: Path | None = None
        self._interrupted = False
        self._progress = None
        self._last_log_time = time.perf_counter()
        if resume is not None:
            self._restore(find_checkpoint(resume))
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "config.json", self.config)
            if resume is None:
                (self.out / "metrics.jsonl").write_text("")

    # -- resume ---------------------------------------------------------------------------------
    def _restore(self, checkpoint: Path) -> None:
        check_config(checkpoint, self.package, self.config["model"])
        load_weights(checkpoint, self.model)
        state = load_train_state(checkpoint)
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self.start_step = int(state["step"])
        self.data_state = state.get("data")
        self.last_checkpoint = checkpoint

    # -- the loop ---------------------------------------------------------------------------------
    def steps(self, total_steps: int, desc: str | None = None):
        """Iterate step numbers from the restored step to `total_steps`, with a progress bar."""
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._progress = tqdm(
            total=total_steps,
            initial=self.start_step,
            desc=desc or self.package,
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        try:
            for step in range(self.start_step, total_steps):
                yield step
                self._progress.update(1)
        finally:
            self._progress.close()
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame):
        if self._interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt("interrupted twice; stopped without saving")
        self._interrupted = True

    def check_finite(self, loss: torch.Tensor | float, step: int) -> None:
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteLoss(
                f"non-finite loss ({value}) at step {step}; last good checkpoint: {where}"
            )

    def log(self, step: int, **metrics) -> None:
        """Append one line to metrics.jsonl and show the metrics on the progress bar (rank 0)."""
        if not self.dist.is_main or (step + 1) % self.log_every:
            return
        record = {"step": step + 1, "time": round(time.time(), 3)}
        record.update(
            {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        )
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._progress is not None:
            self._progress.set_postfix(
                {
                    k: f"{v:.4g}" if isinstance(v, float) else v
                    for k, v in record.items()
                    if k not in ("step", "time")
                },
                refresh=False,
            )

    def write(self, message: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if self.dist.is_main:
            tqdm.write(message)

    def end_of_step(self, step: int, data_state: dict | None = None) -> None:
        """After step `step` finished: checkpoint on schedule; on Ctrl-C save and stop (exit 130)."""
        done = step + 1
        interrupted = (
            self.dist.any(self._interrupted, self.device)
            if self.dist.enabled
            else self._interrupted
        )
        if interrupted:
            path = self.save(done, data_state)
            raise KeyboardInterrupt(f"interrupted after step {done}; checkpoint saved to {path}")
        if self.checkpoint_every and done % self.checkpoint_every == 0:
            self.save(done, data_state)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, step: int, data_state: dict | None = None, name: str | None = None) -> Path:
        """Write checkpoints/step_NNNNNNN (rank 0) with the state to resume after `step` steps."""
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, rng_state())
        path = self.out / "checkpoints" / (name or f"step_{step:07d}")
        if self.dist.is_main:
            state = {"step": step, "rng": rng, "data": data_state or {}}
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            save_checkpoint(path, self.model, self.config, state)
            latest = self.out / "checkpoints" / "latest"
            tmp = latest.with_name(".latest.tmp")
            tmp.write_text(path.name + "\n")
            tmp.replace(latest)
            self._prune()
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    def checkpoints(self) -> list[Path]:
        """The run's step checkpoints, oldest first."""
        return sorted((self.out / "checkpoints").glob("step_*"))

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @property
    def raw_model(self) -> torch.nn.Module:
        return unwrap(self.model)
