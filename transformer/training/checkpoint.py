"""Checkpoints: a directory with `config.json`, `model.safetensors` and `train_state.pt`.

- Weights are safetensors; the training state (optimizer, step, RNG states, data position) holds
  only tensors and plain Python values and is read with `torch.load(weights_only=True)`: loading a
  checkpoint never runs code.
- Writes go to a temporary sibling directory that is renamed into place, so a crash mid-write
  leaves the previous checkpoint intact and no half-written one under a checkpoint's name.
- Loading compares the stored config with the one asked for and names every field that differs.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from .errors import UserError, one_line

CONFIG_FILE, WEIGHTS_FILE, STATE_FILE = "config.json", "model.safetensors", "train_state.pt"


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or made for another model or config."""


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    """Every random generator a training step may draw from, as plain values and tensors."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[-1], tuple(python[:-1]), None))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    config: dict,
    train_state: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    `config` is JSON-serialisable and should name the package and model (`{"package": ...,
    "model": {...}, ...}`); `train_state` holds the optimizer state dict, the step, RNG states and
    the data position. Everything is written into a temporary sibling (`.NAME.tmp-*`) that is
    renamed into place; an existing `directory` is moved aside first and removed after. A run's
    step checkpoints always get a fresh name (see `TrainingRun.save`), so nothing names a
    checkpoint while it is being replaced.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary folder
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_model(unwrap(model), str(tmp / WEIGHTS_FILE))
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_config(directory: Path) -> dict:
    """The `config.json` of a checkpoint directory, with a clear error when it is not one."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a `config.json`), or one line saying what it holds."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"damaged {path}: not JSON text ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"damaged {path}: expected a JSON object, got {type(data).__name__}")
    return data


def build_from_config(path: Path, build):
    """`build()`, a model made from the foreign config file at `path` (a Hugging Face or diffusers
    `config.json`): a value of the wrong kind there ("hidden_size": "x", a number for a list) is
    one CheckpointError naming the file instead of whatever the constructors raise."""
    try:
        return build()
    except UserError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: a value of the wrong kind ({one_line(exc)})") from None


def config_differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Human-readable list of fields whose values differ between two (nested) config dicts."""
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and list(a) == b):
            out.append(f"{prefix}{key} (checkpoint {b!r}, expected {a!r})")
    return out


def check_checkpoint(directory: Path, package: str, expected_model: dict | None = None) -> dict:
    """Read a checkpoint's config and refuse one from another package or another model config."""
    config = read_config(directory)
    if config.get("package") != package:
        raise CheckpointError(
            f"{directory} is a checkpoint of {config.get('package', 'an unknown package')!r}, "
            f"not of {package!r}"
        )
    if expected_model is not None:
        found = config.get("model")
        if not isinstance(found, dict):
            raise CheckpointError(
                f"damaged {directory}/{CONFIG_FILE}: its 'model' is not an object"
            )
        diffs = config_differences(expected_model, found)
        if diffs:
            raise CheckpointError(
                f"checkpoint {directory} was made for another config; differs in: "
                + "; ".join(diffs)
            )
    return config


def load_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load `model.safetensors` into `model`, naming missing and unexpected tensors on mismatch."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(unwrap(model), str(path), strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(
            f"{path} does not fit the model: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )


def load_train_state(directory: Path) -> dict:
    """The training state of a checkpoint, read with `weights_only=True` (never runs code)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds weights only, no training state to resume from")
    return safe_torch_load(path)


def safe_torch_load(path: Path, mmap: bool = False):
    """`torch.load(weights_only=True)`: tensors and plain values only. A file holding other Python
    objects (which could run code) is refused in one line, without torch's advice on how to load it
    anyway."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refused to read {path}: it holds Python objects beyond tensors and plain values, "
            "which could run code"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {one_line(exc)}") from None


def load_state_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load `state` (the model's own names) into `model` when it fits exactly: every tensor the
    model has, no other, each of the model's shape; otherwise one `CheckpointError` naming the
    source and the first few missing, unexpected and mis-shaped names (a foreign checkpoint)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [n for n in expected if n in state and state[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]}"
        )
    model.load_state_dict(state)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards named by `model.safetensors.index.json`."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{index.name} names {name}, which is not in {directory}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {one_line(exc)}") from None
    return tensors
