"""A training run's directory, logging, checkpoints, resume, Ctrl-C and non-finite values.

Not a framework: every trainer writes its own loop and calls into a `TrainingRun` for the parts that
are the same everywhere:

    run = TrainingRun(out, package="xllama", model_config=..., train_config=..., model=model,
                      optimizer=opt, dist=dist, device=device, resume=args.resume,
                      overwrite=args.overwrite)
    data_state = run.data_state or {...}         # restored on resume
    for step in run.steps(total_steps):          # starts after the restored step; progress bar
        loss = ...
        run.check_finite(step, loss=loss)        # stops with the step and last good checkpoint
        run.log(step, loss=loss.item(), lr=lr)   # metrics.jsonl + progress bar (rank 0)
        run.end_of_step(step, data_state)        # weights finite? periodic checkpoints; Ctrl-C
    run.save_final(total_steps, data_state)      # unless end_of_step has just written it

Given `deadline=` (a `time.perf_counter()` value), `end_of_step` returns True once it has passed on
any rank; the loop stops there and saves that step instead (`transformer.train --time-limit`).

The run directory holds `config.json`, `metrics.jsonl` and `checkpoints/step_NNNNNNN/`, with
`checkpoints/latest` naming the newest, and `checkpoints/best/`: the weights of the lowest
validation loss so far (`run.keep_best(step, val_loss)` after each evaluation, as nanoGPT keeps
its best `ckpt.pt`), an ordinary checkpoint without training state. Only rank 0 writes; every rank restores. The promises:

- One owner: the main process locks the directory (`.lock`, an `flock` that dies with its process,
  so a crashed run's lock is simply taken over) for as long as it lives; a second process is refused
  in one line. A directory that already holds a run is continued only with `--resume` and replaced
  only with `--overwrite`.
- Atomic checkpoints: each is written under a temporary name and renamed into place, and `latest`
  is switched after, so it only ever names a complete checkpoint. A step saved twice is written
  beside the first (`step_N.1`) before the first is removed. Temporaries left by a killed process
  are removed on the next start. `latest` is a plain name inside `checkpoints/`, nothing else.
- Exact resume: the checkpoint holds the weights, the optimizer, every RNG, the data position and
  the number of `metrics.jsonl` lines written so far; resuming cuts the log back to that line.
- Nothing non-finite is kept: a non-finite loss or statistic, or a non-finite weight after a step,
  stops training with the step number and the last checkpoint, and no checkpoint is written with a
  non-finite tensor, so the one named is good.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import time
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_train_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
    write_json_atomic,
)
from .errors import UserError, one_line
from .progress import progress_bar, progress_write
from .runtime import Distributed

CHECKPOINT_NAME = re.compile(r"step_(\d+)(?:\.(\d+))?")
LOCK_FILE = ".lock"
BEST = "best"  # checkpoints/best: the lowest validation loss so far


class NonFiniteError(UserError):
    """A loss, statistic or weight became NaN or infinite; training stops instead of going on."""


class RunDirectoryError(UserError):
    """A run directory that is in use by another process, or holds a run that was not resumed."""


# -- the run directory ----------------------------------------------------------------------------

_locked: dict[Path, int] = {}  # run directories this process holds -> the open, flock-ed file


def lock_run_directory(out: Path) -> None:
    """Hold `out/.lock` for the rest of this process (a no-op if it already does).

    The lock is an `flock`, which the kernel drops when its process dies however it dies: a
    crashed run's directory is free again at once, and a live run's is refused in one line.
    """
    out = Path(out)
    key = out.resolve()
    if key in _locked:
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirectoryError(
            f"{out} is in use by {owner}; wait for it to finish or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    _locked[key] = fd


def claim_run_directory(
    out: Path | None,
    resume: Path | None = None,
    overwrite: bool = False,
    dist: Distributed | None = None,
) -> Path:
    """Make `out` this run's: locked, and empty unless the run resumes from a checkpoint inside it.

    A directory that holds anything else is refused, or emptied with `overwrite`. Temporaries that
    a killed process left behind are removed. Call it before writing anything into `out` (a
    trainer that saves a tokenizer first); `TrainingRun` calls it too. Only the main process
    touches the directory; the others wait for it.
    """
    if out is None:
        raise UserError("--out DIR is required: the run directory to write into")
    out, dist = Path(out), dist or Distributed()
    if resume is not None and overwrite:
        raise RunDirectoryError("--resume continues a run and --overwrite replaces it: give one")
    if dist.is_main and out.resolve() not in _locked:
        if out.exists() and not out.is_dir():
            raise RunDirectoryError(f"--out {out} exists and is not a directory")
        lock_run_directory(out)
        inside = resume is not None and _is_within(find_checkpoint(resume), out)
        leftovers = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if leftovers and not inside:
            if not overwrite:
                raise RunDirectoryError(
                    f"{out} already holds a run ({', '.join(leftovers[:4])}"
                    f"{', ...' if len(leftovers) > 4 else ''}); continue it with --resume {out}, "
                    "replace it with --overwrite, or choose another --out"
                )
            for name in leftovers:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        _remove_temporaries(out / "checkpoints")
    dist.barrier()
    return out


def _is_within(path: Path, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def _remove_temporaries(checkpoints: Path) -> None:
    """Half-written checkpoints and `latest` files of a process that was killed while saving."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.glob(".*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's step checkpoints, oldest first."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("step_*"):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), int(match[2] or 0), path))
    return [path for *_, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step a run's checkpoint was saved at, from its name (`step_0000500` or `step_0000500.1`)."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a step checkpoint of a run directory")
    return int(match[1])


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(f"{latest} names {name!r}, not a checkpoint of this run")
        return path / "checkpoints" / name
    if (path / "model.safetensors").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint or run directory not found: {path}")
    raise CheckpointError(f"no checkpoint found at {path}")


# -- the run --------------------------------------------------------------------------------------


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
        overwrite: bool = False,
        deadline: float | None = None,
    ):
        self.dist = dist or Distributed()
        self.out = claim_run_directory(out, resume, overwrite, self.dist)
        self.package, self.model, self.optimizer = package, model, optimizer
        self.device = device or torch.device("cpu")
        self.checkpoint_every, self.keep_last = checkpoint_every, keep_last
        self.log_every = max(1, log_every)
        self.deadline = deadline  # a time.perf_counter() value: stop after the step that passes it
        self.config = {
            "package": package,
            "model": model_config,
            "train": train_config,
            **(extra_config or {}),
        }
        self.start_step = 0
        self.data_state: dict | None = None
        self.last_checkpoint: Path | None = None
        self.best: dict | None = None  # {"step", "val_loss"} of checkpoints/best
        self.metrics_lines = 0
        self._interrupted = False
        self._progress = None
        if resume is not None:
            self._restore(find_checkpoint(resume))
        if self.dist.is_main:
            write_json_atomic(self.out / "config.json", self.config)
            if resume is None:
                (self.out / "metrics.jsonl").write_text("")

    # -- resume ---------------------------------------------------------------------------------
    def _restore(self, checkpoint: Path) -> None:
        check_checkpoint(checkpoint, self.package, self.config["model"])
        load_weights(checkpoint, self.model)
        state = load_train_state(checkpoint)
        if self.optimizer is not None and "optimizer" in state:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as exc:  # e.g. other parameter groups than the run that saved it
                raise CheckpointError(
                    f"{checkpoint}: its optimizer state does not fit this run's optimizer "
                    f"({one_line(exc)})"
                ) from None
        rng = state["rng"]
        set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self.start_step = int(state["step"])
        self.data_state = state.get("data")
        self.best = state.get("best")
        self.last_checkpoint = checkpoint
        if self.dist.is_main:
            self._restore_metrics(checkpoint, state.get("metrics_lines"))

    def _restore_metrics(self, checkpoint: Path, lines: int | None) -> None:
        """Cut `metrics.jsonl` back to what was written when the checkpoint was saved (copied from
        the checkpoint's own run when resuming into a new directory)."""
        source = checkpoint.parent.parent / "metrics.jsonl"
        rows = source.read_text().splitlines(keepends=True) if source.is_file() else []
        if lines is None:  # a checkpoint written before the count was kept: cut by step
            rows = [r for r in rows if json.loads(r).get("step", 0) <= self.start_step]
        else:
            rows = rows[:lines]
        tmp = self.out / ".metrics.jsonl.tmp"
        tmp.write_text("".join(rows))
        tmp.replace(self.out / "metrics.jsonl")
        self.metrics_lines = len(rows)

    # -- the loop ---------------------------------------------------------------------------------
    def steps(self, total_steps: int, desc: str | None = None):
        """Iterate step numbers from the restored step to `total_steps`, with a progress bar."""
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._progress = progress_bar(
            total=total_steps,
            initial=self.start_step,
            desc=desc or self.package,
            disable=not self.dist.is_main,
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

    def _stop(self, what: str, step: int) -> NonFiniteError:
        where = self.last_checkpoint or "none written yet"
        return NonFiniteError(f"{what} at step {step + 1}; last good checkpoint: {where}")

    def check_finite(self, step: int, **values: torch.Tensor | float) -> None:
        """Stop training if any of the named values (loss, statistics) is NaN or infinite."""
        for name, value in values.items():
            number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(number):
                raise self._stop(f"non-finite {name} ({number})", step)

    def check_weights(self, step: int) -> None:
        """Stop training if any weight or buffer of the model is NaN or infinite."""
        bad = _non_finite_tensors(self.raw_model)
        if bad:
            raise self._stop(f"non-finite weights after the update ({', '.join(bad[:3])})", step)

    def log(self, step: int, **metrics) -> None:
        """Append one line to metrics.jsonl and show the scalar metrics on the progress bar (rank 0)."""
        if not self.dist.is_main or (step + 1) % self.log_every:
            return
        record = {"step": step + 1, "time": round(time.time(), 3)}
        record.update(
            {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        )
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metrics_lines += 1
        if self._progress is not None:
            self._progress.set_postfix(
                {
                    k: f"{v:.4g}" if isinstance(v, float) else v
                    for k, v in record.items()
                    if k not in ("step", "time") and not isinstance(v, (list, dict))
                },  # lists (per-expert shares) stay in metrics.jsonl, off the bar
                refresh=False,
            )

    def write(self, message: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if self.dist.is_main:
            progress_write(message)

    def end_of_step(self, step: int, data_state: dict | None = None) -> bool:
        """After step `step` finished: check the weights, checkpoint on schedule; on Ctrl-C save
        and stop (exit 130). True when the run's deadline has passed (on any rank, so all ranks
        stop on the same step): the caller ends its loop there as at its last step."""
        self.check_weights(step)
        done = step + 1
        if self.dist.any(self._interrupted, self.device):
            path = self.save(done, data_state)
            raise KeyboardInterrupt(f"interrupted after step {done}; checkpoint saved to {path}")
        if self.checkpoint_every and done % self.checkpoint_every == 0:
            self.save(done, data_state)
        if self.deadline is None:
            return False
        return self.dist.any(time.perf_counter() >= self.deadline, self.device)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, step: int, data_state: dict | None = None) -> Path:
        """Write a checkpoint of the state after `step` steps (rank 0) and make it `latest`."""
        bad = _non_finite_tensors(self.raw_model)
        if bad:
            raise self._stop(f"non-finite weights ({', '.join(bad[:3])})", step - 1)
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, rng_state())
        checkpoints = self.out / "checkpoints"
        same_step = [p for p in list_checkpoints(self.out) if checkpoint_step(p) == step]
        name, n = f"step_{step:07d}", 0
        while (checkpoints / name).exists():  # a step saved twice: write beside the first
            n += 1
            name = f"step_{step:07d}.{n}"
        path = checkpoints / name
        if self.dist.is_main:
            state = {
                "step": step,
                "rng": rng,
                "data": data_state or {},
                "metrics_lines": self.metrics_lines,
            }
            if self.best is not None:  # runs that validate: the record of checkpoints/best
                state["best"] = self.best
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            save_checkpoint(path, self.model, self.config, state)
            latest = checkpoints / "latest"
            tmp = checkpoints / ".latest.tmp"
            tmp.write_text(name + "\n")
            tmp.replace(latest)
            for old in same_step:
                shutil.rmtree(old, ignore_errors=True)
            self._prune(step)
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    def save_final(self, step: int, data_state: dict | None = None) -> Path:
        """The checkpoint after the last step, for a trainer whose loop has just ended: `save`,
        unless the latest checkpoint already holds this very step (`end_of_step` wrote it because
        `checkpoint_every` divides the step count, or a resumed run had no step left), which is
        returned instead of being written a second time. A trainer that changes the model after
        its loop (the reward model's normalisation) calls `save`."""
        last = self.last_checkpoint  # a run resumed from another directory writes its own copy
        if last is not None and self.out in last.parents and checkpoint_step(last) == step:
            return last
        return self.save(step, data_state)

    @property
    def best_checkpoint(self) -> Path:
        return self.out / "checkpoints" / BEST

    def keep_best(self, step: int, val_loss: float) -> bool:
        """After an evaluation at the end of step `step`: if `val_loss` is the lowest so far, write
        the weights to `checkpoints/best` (atomically; its config.json says the step and the loss).
        Every rank calls it with the same loss; rank 0 writes. Returns whether the loss improved.

        A run that goes on past its best point keeps training (and its `latest` checkpoint), but
        the model it is judged by is this one, as in nanoGPT.
        """
        if not math.isfinite(val_loss) or (
            self.best is not None and not val_loss < self.best["val_loss"]
        ):
            return False
        self.best = {"step": step + 1, "val_loss": float(val_loss)}
        if self.dist.is_main:
            save_checkpoint(self.best_checkpoint, self.model, {**self.config, "best": self.best})
        self.dist.barrier()
        return True

    def load_best(self) -> dict | None:
        """Put the weights of `checkpoints/best` into the model; returns its step and loss."""
        if self.best is not None:
            load_weights(self.best_checkpoint, self.model)
        return self.best

    def checkpoints(self) -> list[Path]:
        """The run's step checkpoints, oldest first."""
        return list_checkpoints(self.out)

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `step`. Checkpoints of later steps (left
        by a run that went further before this one resumed from an earlier checkpoint) are not this
        run's past: they stay until this run saves the same step."""
        if self.keep_last <= 0:
            return
        mine = [p for p in self.checkpoints() if checkpoint_step(p) <= step]
        for old in mine[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @property
    def raw_model(self) -> torch.nn.Module:
        return unwrap(self.model)


def _non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers holding a NaN or an inf."""
    named = chain(model.named_parameters(), model.named_buffers())
    tensors = [(n, t.detach()) for n, t in named if t.is_floating_point()]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
    return [name for (name, _), ok in zip(tensors, finite) if not ok]
