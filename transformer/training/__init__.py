"""The training platform every trainer of every package uses; not paper content.

- `errors`: `UserError` and `run_command` (one stderr line and exit 2 for a user's mistake).
- `config`: configs that check themselves (`check_config` in `__post_init__`).
- `cli`: config dataclasses as flags, and the flags every command takes.
- `runtime`: device (on the CPU, glibc keeps freed memory), precision, seeding, `torchrun`
  process groups.
- `checkpoint`: atomic checkpoint directories read without running code.
- `schedule`: warm-up + cosine learning rate, AdamW's weight-decay groups.
- `progress`: progress bars (widgets only where a notebook can draw them).
- `run`: a run directory (lock, `metrics.jsonl`, checkpoints, resume, Ctrl-C, non-finite values).

Small and boring on purpose: no framework, each trainer writes its own loop.
"""

# First: it makes a Ctrl-C while torch loads one line (see errors.py).
from .errors import UserError, one_line, run_command

# isort: split
from .checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_train_state,
    load_weights,
    read_config,
    save_checkpoint,
)
from .cli import (
    CommandParser,
    add_common_arguments,
    add_dataclass_arguments,
    choose_preset,
    dataclass_from_args,
    float_in,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_int,
    preset_flags,
)
from .config import ConfigError, check_config, config_from_dict, param
from .progress import progress_bar, progress_write, steps_bar
from .run import (
    NonFiniteError,
    RunDirectoryError,
    TrainingRun,
    checkpoint_step,
    claim_run_directory,
    find_checkpoint,
    list_checkpoints,
    lock_run_directory,
)
from .runtime import (
    Distributed,
    autocast,
    keep_freed_memory,
    seed_everything,
    select_device,
    select_dtype,
    setup_distributed,
)
from .schedule import set_lr, warmup_cosine, weight_decay_groups

__all__ = [
    "progress_bar",
    "progress_write",
    "steps_bar",
    "CommandParser",
    "float_in",
    "int_at_least",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "CheckpointError",
    "ConfigError",
    "Distributed",
    "NonFiniteError",
    "RunDirectoryError",
    "TrainingRun",
    "UserError",
    "add_common_arguments",
    "add_dataclass_arguments",
    "choose_preset",
    "preset_flags",
    "autocast",
    "check_config",
    "config_from_dict",
    "checkpoint_step",
    "claim_run_directory",
    "check_checkpoint",
    "dataclass_from_args",
    "find_checkpoint",
    "list_checkpoints",
    "load_train_state",
    "load_weights",
    "one_line",
    "param",
    "keep_freed_memory",
    "lock_run_directory",
    "read_config",
    "run_command",
    "save_checkpoint",
    "seed_everything",
    "select_device",
    "select_dtype",
    "set_lr",
    "setup_distributed",
    "warmup_cosine",
    "weight_decay_groups",
]
