"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021), for any `nn.Linear`.

§4.1: a frozen pre-trained weight W₀ (d_out × d_in) gets a trainable low-rank update ΔW = B A, with
B (d_out × r), A (r × d_in) and r ≪ min(d_in, d_out), and the forward pass becomes

    h = W₀ x + (α / r) · B A x                                                      (Eq. 3)

A starts random Gaussian and B at zero, so ΔW = 0 and training starts exactly at the pre-trained
model; the update is scaled by α / r so that changing r needs no new learning rate. Only A and B
train. At deployment, W = W₀ + (α / r) B A is merged into the weight (no extra latency), and
subtracted again to switch tasks.

Written once for every package: `add_lora(model, targets, rank, alpha, dropout)` wraps each
linear layer whose name matches a target pattern in a `LoRALinear` (the frozen layer as `base`,
plus `lora_A` / `lora_B`); `remove_lora` puts the (merged) layers back, so the model saves and
exports under its own names again. Dropout applies to the adapter's input only (as in Hugging
Face `peft`, whose `lora_dropout` this is).

Adapters are saved alone (`save_adapter`: `adapter_model.safetensors` + `adapter_config.json`, a
few hundred KB), and `load_adapter` puts them on a model that was given the same targets; loading
onto another base (other shapes or names) is refused with one line. `adapters_disabled(model)`
runs the base model alone (the frozen reference of DPO and PPO, without a second copy).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout
from .quantize import QuantizedLinear
from .training import UserError, check_config, param

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRAError(UserError, ValueError):
    """A LoRA setting or adapter that cannot be used on this model."""


@dataclass(frozen=True)
class LoRAConfig:
    """What a trainer's `--lora-*` flags choose. Rank 0 means no adapters: every weight trains."""

    lora_rank: int = param(0, "rank r of the LoRA update B·A (0 = no adapters: full fine-tuning)")
    lora_alpha: float = param(16.0, "α: the update is scaled by α / r (Hu et al. §4.1)")
    lora_dropout: float = param(0.0, "dropout on the adapters' input")
    lora_targets: tuple[str, ...] = param(
        ("wq", "wk", "wv", "wo"),
        "linear layers that get adapters, by name or glob: the attention projections; add w1 w2 "
        "w3 for Llama's feed-forward and output for its head",
    )

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a JSON list too
        check_config(self, non_negative=("lora_rank",), positive=("lora_alpha",),
                     below_one=("lora_dropout",))  # fmt: skip
        if not self.lora_targets:
            raise LoRAError("LoRAConfig.lora_targets names no layer")

    def apply(self, model: nn.Module, trainable: Iterable[str] = ()) -> list[str]:
        """`add_lora` with these settings (nothing when the rank is 0); the adapted names."""
        if self.lora_rank == 0:
            return []
        return add_lora(model, self.lora_targets, self.lora_rank, self.lora_alpha,
                        self.lora_dropout, trainable)  # fmt: skip


class LoRALinear(nn.Module):
    """A frozen linear layer with a low-rank update: y = base(x) + (α / r) · B A dropout(x) (Eq. 3).

    `base` is the layer it adapts (an `nn.Linear`, or a quantised linear layer of
    `transformer.quantize`: QLoRA), frozen; `lora_A` (r, in) and `lora_B` (out, r) are the trainable
    factors. `merge()` adds (α / r) B A into a float base's weight (the forward is then the base
    alone), `unmerge()` subtracts it again; a quantised base is not merged (dequantise it first).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        tensors = [*base.parameters(), *base.buffers()]
        device = tensors[0].device if tensors else None
        dtype = getattr(base, "compute_dtype", None) or next(
            (t.dtype for t in tensors if t.is_floating_point()), None
        )
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        # §4.1: "random Gaussian initialization for A and zero for B" (std 1/r, peft's "gaussian").
        self.lora_A = nn.Parameter(
            torch.randn(rank, self.in_features, device=device, dtype=dtype) / rank
        )
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = Dropout(dropout)
        self.merged = False
        self.enabled = True

    def delta_weight(self) -> Tensor:
        """ΔW = (α / r) B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return y + update * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise LoRAError(
                f"cannot merge into a {type(self.base).__name__} base: dequantise the model first"
            )
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern names a module by its last component (`wq`) or its full name, glob-style
    (`layers.0.attention.*`)."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def is_linear(module: nn.Module) -> bool:
    """An `nn.Linear` or a quantised linear layer (`transformer.quantize`): what LoRA adapts."""
    return isinstance(module, (nn.Linear, QuantizedLinear))


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers (what `add_lora` can target), adapted ones included
    (by their own name, not their `base`'s)."""
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    bases = {f"{name}.base" if name else "base" for name in adapted}
    return [name for name, m in model.named_modules()
            if name in adapted or (is_linear(m) and name not in bases)]  # fmt: skip


def add_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    trainable: Iterable[str] = (),
) -> list[str]:
    """Put a LoRA adapter on every linear layer matching `targets` and freeze everything else but
    the modules matching `trainable` (a reward model's new head: peft's `modules_to_save`);
    returns the adapted module names."""
    targets = list(targets)
    if rank < 1:
        raise LoRAError(f"LoRA rank must be a positive integer, not {rank}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise LoRAError(f"LoRA alpha must be a positive number, not {alpha}")
    if not 0 <= dropout < 1:
        raise LoRAError(f"LoRA dropout must be in [0, 1), not {dropout}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("the model already has LoRA adapters")
    chosen = [n for n in linear_names(model) if _matches(n, targets)]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
        raise LoRAError(
            f"LoRA targets {targets} match no linear layer; the model's are: {', '.join(names)}"
        )
    model.requires_grad_(False)
    trainable = list(trainable)
    for name, module in model.named_modules():
        if trainable and name and _matches(name, trainable):
            module.requires_grad_(True)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return chosen


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def merge_lora(model: nn.Module) -> None:
    """W = W₀ + (α / r) B A in every adapted layer (§4.1: no inference latency)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (switch back to W₀ + a trainable update)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Put every adapted layer's base back in its place (merged first unless `merge=False`) and
    make every parameter trainable again, so the model saves, exports and trains exactly like one
    that never had adapters."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    model.requires_grad_(True)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model W₀ alone inside the block (adapters kept, not applied)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise LoRAError("adapters are merged into the weights; unmerge before disabling them")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{`<module>.lora_A`, `<module>.lora_B`: tensor} of every adapted layer."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def lora_settings(model: nn.Module) -> dict:
    """rank, alpha, dropout and targets of the model's adapters (one setting for all layers)."""
    layers = list(lora_layers(model))
    if not layers:
        raise LoRAError("the model has no LoRA adapters")
    _, first = layers[0]
    return {
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p,
        "target_modules": [name for name, _ in layers],
    }


def save_adapter(
    model: nn.Module,
    directory: Path,
    rename: Callable[[dict[str, Tensor], dict], tuple[dict[str, Tensor], dict]] | None = None,
    metadata: dict | None = None,
) -> Path:
    """`adapter_model.safetensors` + `adapter_config.json` in `directory`: the adapters alone.

    `rename(tensors, config)` may rewrite both into another library's layout (xllama's
    `save_peft_adapter` writes Hugging Face `peft`'s). Files are written atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().float() for k, v in adapter_state_dict(model).items()}
    config = {**lora_settings(model), **(metadata or {})}
    if rename is not None:
        tensors, config = rename(tensors, config)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / ADAPTER_WEIGHTS)
    tmp = directory / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(directory / ADAPTER_CONFIG)
    return directory


def read_adapter(directory: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, config) of an adapter directory, checked to be readable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise LoRAError(
            f"{directory} is not an adapter directory ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})"
        )
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise LoRAError(f"cannot read the adapter in {directory}: {exc}") from None
    if not isinstance(config, dict) or "r" not in config or "lora_alpha" not in config:
        raise LoRAError(f"{config_path} holds no LoRA rank and alpha")
    return tensors, config


def load_adapter(model: nn.Module, directory: Path, tensors=None, config=None) -> list[str]:
    """Put the adapter saved in `directory` on `model` (adding LoRA layers where it has none);
    returns the adapted module names. A mismatch of names or shapes is one `LoRAError` line."""
    if tensors is None:
        tensors, config = read_adapter(directory)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    known = set(linear_names(model))
    missing = [m for m in modules if m not in known]
    if missing:
        raise LoRAError(
            f"the adapter in {directory} is for another model: it adapts {missing[0]!r}, which "
            f"this model does not have ({len(missing)} such layer(s))"
        )
    if not any(True for _ in lora_layers(model)):
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        add_lora(model, modules, rank, alpha, float(config.get("lora_dropout", 0.0)))
    layers = dict(lora_layers(model))
    for module in modules:
        layer = layers.get(module)
        if layer is None:
            raise LoRAError(f"the adapter adapts {module!r}, which has no LoRA layer here")
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None:
            raise LoRAError(f"the adapter in {directory} lacks lora_A or lora_B of {module!r}")
        if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
            raise LoRAError(
                f"the adapter in {directory} is for another model: {module} has lora_A "
                f"{tuple(a.shape)} / lora_B {tuple(b.shape)}, this model needs "
                f"{tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}"
            )
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    return modules


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
