"""Real checkpoints in and out: Meta's Llama 2 and 3 (`params.json` + `consolidated.*.pth`),
Hugging Face Llama (2 and 3), Mistral and Mixtral (`config.json` + `*.safetensors`), and our own
(`transformer.training.checkpoint` directories).

Nothing here unpickles code: `.pth` shards are read with `torch.load(weights_only=True)`, everything
else is safetensors or JSON. Names are mapped explicitly; a checkpoint that does not fit the model
fails with the tensors that are missing, unexpected or of the wrong shape.

Rotary pairing. Meta's checkpoints rotate adjacent coordinate pairs (x_2i, x_2i+1); Hugging Face's
rotate (x_i, x_i+d/2) and its conversion script permutes the rows of W_q and W_k inside every head
so the two give the same model. `permute_to_half` / `permute_to_adjacent` are that permutation and
its inverse; loaders keep a checkpoint's own pairing unless asked for the other one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from transformer.lora import LoRAConfig, LoRALinear, remove_lora
from transformer.quantize import QuantizedLinear, dequantize_model, quantize_model
from transformer.training import (
    CheckpointError,
    check_checkpoint,
    config_from_dict,
    find_checkpoint,
    load_weights,
)
from transformer.training.checkpoint import read_json_object, read_safetensors, safe_torch_load

from .model import Llama, LlamaConfig, XLlamaError
from .tokenization import load_tokenizer, tokenizer_for_checkpoint

PACKAGE = "xllama"
# QLoRA quantises every linear layer of the base but the output head (kept in float, as
# bitsandbytes' `llm_int8_skip_modules` keeps `lm_head`).
QUANTIZE_SKIP = ("output",)

# --------------------------------------------------------------------------------------------------
# The q/k row permutation between the two rotary pairings
# --------------------------------------------------------------------------------------------------


def permute_to_half(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of W_q / W_k (n_heads·head_dim, dim) from adjacent pairing to rotate-half pairing.

    Inside each head, output row 2i (first of pair i) goes to row i and row 2i+1 to row i + d/2.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_to_adjacent(weight: Tensor, n_heads: int) -> Tensor:
    """Inverse of `permute_to_half`."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def change_pairing(state: dict[str, Tensor], config: LlamaConfig, to: str) -> dict[str, Tensor]:
    """A state dict in our names, with W_q and W_k permuted from config's pairing to `to`."""
    if to == config.rope_pairing:
        return state
    permute = permute_to_half if to == "half" else permute_to_adjacent
    state = dict(state)
    for i in range(config.n_layers):
        for name, heads in (("wq", config.n_heads), ("wk", config.kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = permute(state[key], heads)
    return state


# --------------------------------------------------------------------------------------------------
# Hugging Face names and config
# --------------------------------------------------------------------------------------------------

HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# Mixtral's sparse feed-forward, as its checkpoints store it (one tensor per expert and matrix).
HF_MOE_NAMES = {"feed_forward.gate.weight": "block_sparse_moe.gate.weight"} | {
    f"feed_forward.experts.{{e}}.{w}.weight": f"block_sparse_moe.experts.{{e}}.{w}.weight"
    for w in ("w1", "w2", "w3")
}
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def hf_names(config: LlamaConfig) -> dict[str, str]:
    """{our parameter name: Hugging Face name} for every tensor of the model."""
    names = dict(HF_TOP_NAMES)
    if config.tie_embeddings:
        del names["output.weight"]
    layer_names = dict(HF_LAYER_NAMES)
    if config.n_experts is not None:
        layer_names = {k: v for k, v in layer_names.items() if not k.startswith("feed_forward")}
        for ours, theirs in HF_MOE_NAMES.items():
            for e in range(config.n_experts):
                layer_names[ours.format(e=e)] = theirs.format(e=e)
    for i in range(config.n_layers):
        for ours, theirs in layer_names.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def hf_model_type(config: LlamaConfig) -> str:
    """The Hugging Face architecture a config exports as: Mixtral with experts, Mistral with a
    sliding window, Llama otherwise."""
    if config.position != "rope":
        raise XLlamaError(
            "Hugging Face's Llama, Mistral and Mixtral have rotary positions only; "
            f"a model with position={config.position!r} cannot be exported"
        )
    if config.n_experts is not None:
        return "mixtral"
    return "llama" if config.sliding_window is None else "mistral"


def config_from_hf(hf: dict, rope_pairing: str = "half") -> LlamaConfig:
    """Our config from a Hugging Face Llama, Mistral or Mixtral `config.json` (older and newer
    rope key styles)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in HF_ARCHITECTURES:
        raise XLlamaError(
            f"config.json is for model_type {model_type!r}, not one of {', '.join(HF_ARCHITECTURES)}"
        )
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise XLlamaError(f"rope scaling {kind!r} is not supported (only linear and llama3)")
        moe = _hf_moe(hf, model_type)
        head_dim = hf.get("head_dim") or dim // n_heads
        if head_dim != dim // n_heads:
            raise XLlamaError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise XLlamaError(f"config.json sets {flag}; Llama has no biases")
        return LlamaConfig(
            dim=dim,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            vocab_size=int(hf["vocab_size"]),
            ffn_hidden_dim=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=float(theta),
            rope_pairing=rope_pairing,
            **_rope_scaling_from_hf(rope, kind),
            sliding_window=hf.get("sliding_window") if model_type != "llama" else None,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **moe,
        )
    except KeyError as exc:
        raise XLlamaError(f"config.json lacks {exc.args[0]!r}") from None
    except (AttributeError, TypeError, ValueError) as exc:  # "hidden_size": "x", a list for a dict
        raise XLlamaError(f"config.json: {exc}") from None


def _rope_scaling_from_hf(rope: dict, kind: str) -> dict:
    """Our rope_scaling fields from Hugging Face's rope_scaling / rope_parameters dict."""
    if kind == "default":
        return {}
    fields = {"rope_scaling": float(rope.get("factor", 1.0)), "rope_scaling_type": kind}
    if kind == "llama3":
        fields.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    return fields


def _rope_scaling_to_hf(config: LlamaConfig) -> dict | None:
    if config.rope_scaling_type == "linear":
        return (
            None
            if config.rope_scaling == 1.0
            else {"rope_type": "linear", "factor": config.rope_scaling}
        )
    return {
        "rope_type": "llama3",
        "factor": config.rope_scaling,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_seq_len,
    }


def _hf_moe(hf: dict, model_type: str) -> dict:
    """Our expert fields from a Mixtral config.json (none for Llama and Mistral)."""
    if model_type != "mixtral":
        return {}
    try:
        return {
            "n_experts": int(hf["num_local_experts"]),
            "experts_per_token": int(hf["num_experts_per_tok"]),
        }
    except KeyError as exc:
        raise XLlamaError(f"config.json lacks {exc.args[0]!r}") from None


def config_to_hf(config: LlamaConfig) -> dict:
    """A Hugging Face Llama, Mistral or Mixtral config dict for our config (`hf_model_type`;
    always rotate-half pairing)."""
    model_type = hf_model_type(config)
    hf = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(config),
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if model_type != "llama":
        hf["sliding_window"] = config.sliding_window
    if model_type == "mixtral":
        hf["num_local_experts"] = config.n_experts
        hf["num_experts_per_tok"] = config.experts_per_token
        hf["router_jitter_noise"] = 0.0
    return hf


# --------------------------------------------------------------------------------------------------
# Filling a model from a state dict, with clear errors
# --------------------------------------------------------------------------------------------------


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def fill_model(model: Llama, state: dict[str, Tensor], source: str) -> Llama:
    """Copy `state` (our names) into `model`; name missing, unexpected and mis-shaped tensors."""
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("output.weight", None)
        state = {k: v for k, v in state.items() if k != "output.weight"}
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            c = model.config
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(expected[name].shape)} (dim {c.dim}, n_heads {c.n_heads}, "
                f"n_kv_heads {c.kv_heads}, hidden {c.hidden_dim}, vocab {c.vocab_size})"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope_tables()
    return model


def _empty_model(config: LlamaConfig) -> Llama:
    with torch.device("meta"):
        return Llama(config)


def _to_dtype(state: dict[str, Tensor], dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# --------------------------------------------------------------------------------------------------


def load_hf(
    directory: Path, dtype: torch.dtype | None = torch.float32, rope_pairing: str = "half"
) -> Llama:
    """A Hugging Face Llama, Mistral or Mixtral checkpoint directory -> our model (in
    `rope_pairing`, default its own)."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json (not a Hugging Face checkpoint)")
    config = config_from_hf(json.loads(path.read_text()), rope_pairing="half")
    theirs = read_safetensors(directory)
    names = hf_names(config)
    back = {v: k for k, v in names.items()}
    state = {back.get(name, name): tensor for name, tensor in theirs.items()}
    if config.tie_embeddings:
        state.pop("output.weight", None)
        state.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    model = fill_model(_empty_model(config), _to_dtype(state, dtype), str(directory))
    if rope_pairing != "half":
        return convert_pairing(model, rope_pairing)
    return model


def convert_pairing(model: Llama, to: str) -> Llama:
    """The same model with the other rotary pairing (W_q, W_k rows permuted)."""
    from dataclasses import replace

    config = replace(model.config, rope_pairing=to)
    state = change_pairing(model.state_dict(), model.config, to)
    return fill_model(_empty_model(config), state, "converted model")


def float_state_dict(model: Llama) -> dict[str, Tensor]:
    """The model's weights in our names, with int8/int4/NF4 layers dequantised (on a copy): what
    the exporters write."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        model = copy.deepcopy(model)
        dequantize_model(model)
    return model.state_dict()


def export_hf(model: Llama, directory: Path) -> Path:
    """Write `config.json` + `model.safetensors` that Hugging Face loads as `LlamaForCausalLM`, or
    `MistralForCausalLM` (sliding window) or `MixtralForCausalLM` (experts)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise XLlamaError("the model has LoRA adapters: merge them (xllama.merge) before exporting")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = change_pairing(float_state_dict(model), config, "half")
    names = hf_names(config)
    tensors = {names[k]: v.detach().contiguous().float() for k, v in state.items() if k in names}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------------------------------
# Meta checkpoints (params.json + consolidated.NN.pth, model-parallel shards)
# --------------------------------------------------------------------------------------------------

# Dimension along which Meta's model-parallel shards split each tensor (None: replicated).
# ColumnParallelLinear splits output rows (dim 0), RowParallelLinear input columns (dim 1), and
# ParallelEmbedding the embedding width (dim 1).
META_SHARD_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}


def _meta_shard_dim(name: str):
    key = name.split(".", 2)[2] if name.startswith("layers.") else name
    if key not in META_SHARD_DIM:
        raise CheckpointError(f"unexpected tensor {name!r} in the Meta checkpoint")
    return META_SHARD_DIM[key]


def config_from_meta(params: dict, vocab_size: int, max_seq_len: int = 4096) -> LlamaConfig:
    """Our config from Meta's `params.json` (Llama 2; Llama 3.x with `use_scaled_rope`)."""
    try:
        rope = {}
        if params.get("use_scaled_rope"):  # Llama 3.1 and 3.2: `llama3_frequencies`
            if params.get("rope_scaling_factor") is None:
                raise XLlamaError(
                    "params.json sets use_scaled_rope but no rope_scaling_factor: Meta's code "
                    "takes the factor from the release (8 for Llama 3.1, 32 for Llama 3.2 1B and "
                    '3B); add "rope_scaling_factor" to params.json'
                )
            factor = float(params["rope_scaling_factor"])
            rope = {"rope_scaling": factor, "rope_scaling_type": "llama3"}
        return LlamaConfig(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            max_seq_len=int(params.get("max_seq_len", max_seq_len)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_pairing="adjacent",
            **rope,
        )
    except KeyError as exc:
        raise XLlamaError(f"params.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong kind: "dim": "x"
        raise XLlamaError(f"params.json: {exc}") from None


def read_meta_shards(directory: Path) -> dict[str, Tensor]:
    """Merge `consolidated.*.pth` model-parallel shards into one state dict (our names)."""
    directory = Path(directory)
    paths = sorted(directory.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"no consolidated.*.pth files in {directory}")
    shards = []
    for path in paths:
        shards.append(safe_torch_load(path, mmap=True))
    names = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != names:
            raise CheckpointError(
                f"{path.name} holds other tensors than {paths[0].name}: "
                f"{_listing(set(shard) ^ names)}"
            )
    merged = {}
    for name in names:
        if name == "rope.freqs":  # recomputed from rope_theta
            continue
        dim = _meta_shard_dim(name)
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    return merged


def load_meta(
    directory: Path,
    dtype: torch.dtype | None = torch.float32,
    max_seq_len: int = 4096,
    rope_pairing: str = "adjacent",
) -> Llama:
    """Meta Llama 2 checkpoint directory -> our model (adjacent pairing unless asked otherwise)."""
    directory = Path(directory)
    params_path = directory / "params.json"
    if not params_path.is_file():
        raise CheckpointError(f"{directory} has no params.json (not a Meta Llama checkpoint)")
    params = json.loads(params_path.read_text())
    state = read_meta_shards(directory)
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{directory} does not fit the model: missing tok_embeddings.weight")
    vocab = params.get("vocab_size", -1)
    vocab = state["tok_embeddings.weight"].shape[0] if vocab in (-1, None) else int(vocab)
    config = config_from_meta(params, vocab, max_seq_len)
    model = fill_model(_empty_model(config), _to_dtype(state, dtype), str(directory))
    return convert_pairing(model, rope_pairing) if rope_pairing != "adjacent" else model


# --------------------------------------------------------------------------------------------------
# Our checkpoints, and one entry point for all three
# --------------------------------------------------------------------------------------------------


def load_ours(directory: Path, dtype: torch.dtype | None = None) -> tuple[Llama, dict]:
    """A checkpoint written by `xllama.train` -> (model, its full config dict)."""
    found = check_checkpoint(directory, PACKAGE)
    config = LlamaConfig.from_dict(found.get("model"), f"{directory}/config.json: model")
    model = Llama(config)
    if found.get("quantize"):  # QLoRA's base, or a model quantised for decoding (xllama.quantize)
        quantize_model(
            model,
            found["quantize"],
            skip=tuple(found.get("quantize_skip", QUANTIZE_SKIP)),
            group_size=int(found.get("quantize_group_size", 64)),
        )
    if found.get("lora"):  # a LoRA fine-tune: the checkpoint holds the base and the adapters
        config_from_dict(LoRAConfig, found["lora"], f"{directory}/config.json: lora").apply(model)
    load_weights(directory, model)
    if dtype is not None:
        model = model.to(dtype)
    return model, found


def checkpoint_kind(directory: Path) -> str:
    """`xllama`, `hf` or `meta`, from the files a directory holds."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if (directory / "params.json").is_file():
        return "meta"
    config = directory / "config.json"
    if config.is_file():
        package = read_json_object(config).get("package")
        if package is not None and package != PACKAGE:
            raise CheckpointError(
                f"{directory} is a checkpoint of the {package!r} package, not an xllama model"
            )
        return PACKAGE if package == PACKAGE else "hf"
    raise CheckpointError(
        f"{directory} is not a checkpoint: expected config.json (ours or Hugging Face) "
        "or params.json (Meta)"
    )


def load_model(directory: Path, dtype: torch.dtype | None = torch.float32) -> Llama:
    """Any of the three checkpoint kinds -> our model."""
    kind = checkpoint_kind(directory)
    if kind == "meta":
        return load_meta(directory, dtype)
    if kind == "hf":
        return load_hf(directory, dtype)
    try:
        directory = find_checkpoint(directory)
    except CheckpointError:
        pass
    return load_ours(directory, dtype)[0]


def load_checkpoint(
    directory: Path, tokenizer: str | None = None, dtype: torch.dtype | None = torch.float32
) -> tuple[Llama, object, dict | None]:
    """(model, tokenizer, our config dict or None) of any checkpoint kind. The tokenizer is the file
    `tokenizer` names, else the one an xllama run names, else a `tokenizer.model` (or else a
    `tokenizer.json`) beside the weights; a run trained with LoRA comes back with its adapters
    merged into the weights (and a quantised base dequantised first); a model quantised for
    decoding stays quantised. A Hugging Face or Meta checkpoint's weights are read into `dtype`
    tensor by tensor (None: as stored), so a bfloat16 release read for bfloat16 decoding never
    takes float32's memory; our runs load as saved."""
    config = None
    if checkpoint_kind(directory) == PACKAGE:
        directory = find_checkpoint(directory)
        model, config = load_ours(directory)
        if config.get("lora"):
            dequantize_model(model)
            remove_lora(model)
    else:
        model = load_model(directory, dtype)
    found = load_tokenizer(tokenizer) if tokenizer else tokenizer_for_checkpoint(directory, config)
    if found is None:
        raise XLlamaError(f"{directory} names no tokenizer; pass --tokenizer FILE")
    if found.vocab_size > model.config.vocab_size:
        raise XLlamaError(
            f"the tokenizer has {found.vocab_size} tokens, the model {model.config.vocab_size}"
        )
    return model, found, config
