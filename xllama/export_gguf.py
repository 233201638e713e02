"""Export to GGUF, llama.cpp's file format: `python -m xllama.export_gguf --checkpoint DIR --out
model.gguf [--type f32|f16|q8_0]`.

The file is written by the `gguf` package (llama.cpp's own reader and writer, the `gguf` extra);
this module is the mapping from our model and tokenizer to llama.cpp's `llama` architecture:

- metadata: `llama.*` shape keys (context, width, blocks, FFN size, heads, KV heads, RMSNorm ε,
  rotary base and dimension, linear rope scaling; expert counts for a mixture of experts), and
  Llama 3.1's RoPE scaling as the `rope_freqs` tensor of per-pair frequency divisors;
- tensors in llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `ffn_gate_exps` with the experts
  stacked) and in Meta's adjacent rotary pairing, which llama.cpp's `llama` architecture rotates
  (our `rope_pairing="half"` models have W_q and W_k permuted back, `convert.change_pairing`);
- f32, f16 (norms stay f32, as llama.cpp's converter keeps them) or Q8_0 (blocks of 32 int8 with
  an f16 scale, by `gguf.quants`; rows not a multiple of 32 stay f16);
- the tokenizer: our byte-level BPE as llama.cpp's `gpt2` model (tokens and merges in GPT-2's
  printable byte alphabet, pre-tokenizer `llama-bpe` for Llama 3's or our GPT-4 split pattern,
  `gpt-2` for GPT-2's; Llama 3's `tokenizer.json` and tiktoken `tokenizer.model` included), a
  SentencePiece model as its `llama` model (pieces, scores, types); a Hugging Face chat model's
  chat template (its `tokenizer_config.json`) as `tokenizer.chat_template`. A character tokenizer
  has no llama.cpp counterpart and is refused, as are ALiBi and sliding-window models (llama.cpp's
  `llama` architecture has neither).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from tokenizer import bytes_to_unicode
from tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, LLAMA3_PATTERN
from transformer.training import CommandParser, run_command

from .convert import change_pairing, float_state_dict, load_checkpoint
from .model import Llama, LlamaConfig, XLlamaError, llama3_frequencies, rope_frequencies
from .tokenization import chat_template

TYPES = ("f32", "f16", "q8_0")
# Our split patterns, by name -> (pattern, llama.cpp's pre-tokenizer; `llama-bpe` is Llama 3's).
PRE_TOKENIZERS = {"gpt4": (GPT4_PATTERN, "llama-bpe"), "llama3": (LLAMA3_PATTERN, "llama-bpe"),
                  "gpt2": (GPT2_PATTERN, "gpt-2")}  # fmt: skip

# Our tensor names -> llama.cpp's (per block: "blk.N." + ...).
LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.gate.weight": "ffn_gate_inp.weight",  # the router of a mixture of experts
}
EXPERT_NAMES = {
    "w1": "ffn_gate_exps.weight",
    "w2": "ffn_down_exps.weight",
    "w3": "ffn_up_exps.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}


def gguf_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """{llama.cpp name: float32 tensor}, W_q and W_k in the adjacent rotary pairing (quantised
    layers dequantised)."""
    c = model.config
    state = change_pairing(
        {k: v.detach().float() for k, v in float_state_dict(model).items()}, c, "adjacent"
    )
    tensors = {}
    for ours, theirs in TOP_NAMES.items():
        if ours == "output.weight" and c.tie_embeddings:
            continue  # llama.cpp reads the embedding when output.weight is absent
        tensors[theirs] = state[ours]
    for i in range(c.n_layers):
        prefix = f"layers.{i}."
        for ours, theirs in LAYER_NAMES.items():
            if prefix + ours in state:
                tensors[f"blk.{i}.{theirs}"] = state[prefix + ours]
        if c.n_experts is not None:  # (experts, out, in), one tensor per matrix
            for w, theirs in EXPERT_NAMES.items():
                stacked = [state[f"{prefix}feed_forward.experts.{e}.{w}.weight"]
                           for e in range(c.n_experts)]  # fmt: skip
                tensors[f"blk.{i}.{theirs}"] = torch.stack(stacked)
    return tensors


def llama3_rope_factors(c: LlamaConfig) -> np.ndarray:
    """Llama 3.1's RoPE scaling as llama.cpp reads it (`rope_freqs`): θ_i / θ_i scaled, per pair."""
    theta = rope_frequencies(c.head_dim, c.rope_theta)
    scaled = llama3_frequencies(theta, c.rope_scaling, c.rope_low_freq_factor,
                                c.rope_high_freq_factor, c.rope_original_max_seq_len)  # fmt: skip
    return (theta / scaled).numpy().astype(np.float32)


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    kind = getattr(tokenizer, "kind", None)
    if kind == "sentencepiece":
        sp = tokenizer.sp
        tokens, scores, types = [], [], []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            if sp.is_unknown(i):
                types.append(gguf.TokenType.UNKNOWN)
            elif sp.is_control(i):
                types.append(gguf.TokenType.CONTROL)
            elif sp.is_byte(i):
                types.append(gguf.TokenType.BYTE)
            elif sp.is_unused(i):
                types.append(gguf.TokenType.UNUSED)
            else:
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_unk_token_id(sp.unk_id())
    elif hasattr(tokenizer, "bpe"):  # our byte-level BPE
        bpe = tokenizer.bpe
        pre = next((llama for p, llama in PRE_TOKENIZERS.values() if p == bpe.pattern), None)
        if pre is None:
            raise XLlamaError(
                "the BPE split pattern has no llama.cpp pre-tokenizer; GGUF export knows "
                f"{', '.join(PRE_TOKENIZERS)}"
            )
        alphabet = bytes_to_unicode()
        spell = lambda token: "".join(alphabet[b] for b in token)  # noqa: E731
        specials = {i: s for s, i in (bpe.special_tokens or {}).items()}
        tokens, scores, types = [], [], []
        for i in range(tokenizer.vocab_size):
            tokens.append(specials[i] if i in specials else spell(bpe.token_bytes(i)))
            types.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
        merges = [f"{spell(bpe.token_bytes(a))} {spell(bpe.token_bytes(b))}"
                  for (a, b), _ in sorted(bpe.merges.items(), key=lambda kv: kv[1])]  # fmt: skip
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
        scores = None
    else:
        raise XLlamaError(
            f"llama.cpp has no tokenizer like this one ({kind or type(tokenizer).__name__}): GGUF "
            "export needs a byte-level BPE or a SentencePiece model"
        )
    for i in range(len(tokens), vocab_size):  # rows the model has beyond the tokenizer's
        tokens.append(f"<unused{i}>")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(0.0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(tokenizer.bos_id is not None)  # Llama 2 and 3 begin with BOS; ours not
    template = chat_template(tokenizer)
    if template is not None:  # a chat model's: llama.cpp picks its dialog format from it
        writer.add_chat_template(template)


def export_gguf(model: Llama, tokenizer, path: Path, dtype: str = "f32") -> Path:
    """Write `model` and `tokenizer` to a GGUF file llama.cpp loads (module docstring)."""
    try:
        import gguf
    except ImportError:
        raise XLlamaError("GGUF export needs the gguf package: pip install -e '.[gguf]'") from None
    if dtype not in TYPES:
        raise XLlamaError(f"unknown GGUF type {dtype!r}; choose one of: {', '.join(TYPES)}")
    c = model.config
    if c.position != "rope":
        raise XLlamaError("llama.cpp's llama architecture has rotary positions only, not ALiBi")
    if c.sliding_window is not None:
        raise XLlamaError("llama.cpp's llama architecture has no sliding window")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling_type == "llama3":  # as a tensor of per-pair divisors of the frequency
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(c))
    elif c.rope_scaling != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling)
    if c.n_experts is not None:
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.experts_per_token)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    writer.add_file_type(file_type)
    add_tokenizer(writer, tokenizer, c.vocab_size)
    for name, tensor in gguf_tensors(model).items():
        data = tensor.numpy()
        if dtype == "f32" or data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)  # a crash never leaves a half-written file under the name
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="xllama.export_gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True,
        help="any checkpoint the project loads (an xllama run, a Hugging Face or a Meta directory)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    parser.add_argument(
        "--type", choices=TYPES, default="f32",
        help="tensor type: f32, f16 (norms stay f32) or q8_0 (default: f32)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", help="tokenizer file, if the checkpoint names none (default: its own)"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, args.tokenizer)
    path = export_gguf(model, tokenizer, args.out, args.type)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, {args.type}, llama architecture")
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="xllama.export_gguf"))


if __name__ == "__main__":
    cli()
