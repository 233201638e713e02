"""BERT checkpoints in Hugging Face's layout, both ways: `BertForMaskedLM` and `BertForPreTraining`
directories (`config.json` + `model.safetensors` or `pytorch_model.bin`, read without running code)
load into `transformer.bert.Bert`, and `export_hf` writes a `BertForPreTraining` directory that
`transformers` loads as either class. Names are mapped explicitly; anything that does not fit is one
clear line.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .bert import Bert, BertConfig
from .training.checkpoint import (
    CheckpointError,
    read_json_object,
    read_safetensors,
    safe_torch_load,
)

# ours -> Hugging Face's, for one encoder layer (prefix "layers.{i}." / "bert.encoder.layer.{i}.")
LAYER_NAMES = {
    "self_attention.wq": "attention.self.query",
    "self_attention.wk": "attention.self.key",
    "self_attention.wv": "attention.self.value",
    "self_attention.wo": "attention.output.dense",
    "residual1.norm": "attention.output.LayerNorm",
    "feed_forward.w1": "intermediate.dense",
    "feed_forward.w2": "output.dense",
    "residual2.norm": "output.LayerNorm",
}
TOP_NAMES = {
    "embeddings.tokens.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.positions.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.segments.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "mlm_transform.weight": "cls.predictions.transform.dense.weight",
    "mlm_transform.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}
# A BertForMaskedLM has neither; ours then keep their fresh initialisation.
OPTIONAL = {"pooler.weight", "pooler.bias", "nsp.weight", "nsp.bias"}


def hf_names(config: BertConfig) -> dict[str, str]:
    """Every parameter of ours -> its Hugging Face name."""
    names = dict(TOP_NAMES)
    for i in range(config.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
    return names


def config_from_hf(hf: dict) -> BertConfig:
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"model_type {hf.get('model_type')!r} is not bert")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"hidden_act {hf['hidden_act']!r}: only BERT's exact gelu is supported"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError("only absolute position embeddings are supported")
    try:
        return BertConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"],
            max_len=hf["max_position_embeddings"],
            n_segments=hf.get("type_vocab_size", 2),
            dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_id=hf.get("pad_token_id") or 0,
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json has no {exc.args[0]!r}") from None


def load_hf(directory: str | Path) -> Bert:
    """A Hugging Face BERT directory (BertForMaskedLM, BertForPreTraining or BertModel weights with
    the `bert.` prefix or without) as our `Bert`, in float32."""
    directory = Path(directory)
    config = config_from_hf(read_json_object(directory / "config.json"))
    if any(directory.glob("*.safetensors")):
        theirs = read_safetensors(directory)
    elif (directory / "pytorch_model.bin").is_file():
        theirs = safe_torch_load(directory / "pytorch_model.bin")
    else:
        raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {directory}")
    if not any(k.startswith("bert.") for k in theirs):  # a bare BertModel
        theirs = {f"bert.{k}": v for k, v in theirs.items()}
    model = Bert(config)
    state = {}
    for ours, name in hf_names(config).items():
        if name in theirs:
            state[ours] = theirs[name].float()
        elif ours not in OPTIONAL:
            raise CheckpointError(f"{directory} has no tensor {name!r}: not a BERT of this shape")
    missing = [k for k in model.state_dict() if k not in state and k not in OPTIONAL]
    expected = dict(model.state_dict())
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{hf_names(config)[key]} has shape {tuple(tensor.shape)}, the config says "
                f"{tuple(expected[key].shape)}"
            )
    if missing:
        raise CheckpointError(f"{directory} lacks {', '.join(missing[:3])}")
    model.load_state_dict(state, strict=False)
    return model


def export_hf(model: Bert, directory: str | Path, vocab: list[str] | None = None) -> Path:
    """Write a `BertForPreTraining` directory (config.json, model.safetensors, and vocab.txt when
    `vocab` is given) that `transformers` loads as BertForPreTraining or BertForMaskedLM."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff,
        "hidden_act": "gelu",
        "max_position_embeddings": c.max_len,
        "type_vocab_size": c.n_segments,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attention_dropout,
        "layer_norm_eps": c.norm_eps,
        "pad_token_id": c.pad_id,
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }
    state = model.state_dict()
    tensors = {name: state[ours].detach().contiguous() for ours, name in hf_names(c).items()}
    # The output layer is tied to the word embeddings; transformers re-ties it on load.
    tensors["cls.predictions.decoder.weight"] = tensors[
        "bert.embeddings.word_embeddings.weight"
    ].clone()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if vocab is not None:
        (directory / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return directory
