"""Decoding with int8/int4 weights: `xllama.quantize` writes a checkpoint that loads back quantised
and decodes close to the float model; `xllama.generate --quantize` does it on the fly; mistakes are
one line."""

import pytest
import torch

from transformer.quantize import Int4Linear, Int8Linear
from transformer.training import run_command
from xllama.convert import load_checkpoint
from xllama.generate import main as generate_main
from xllama.quantize import main as quantize_main
from xllama.train import main as train_main

TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind\n" * 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    (tmp / "text.txt").write_text(TEXT)
    args = ["--config", "tiny", "--device", "cpu", "--text", str(tmp / "text.txt"), "--steps", "30"]
    args += ["--tokenizer", "char", "--max-seq-len", "32", "--sample-tokens", "0", "--lr", "1e-2"]
    assert train_main(args + ["--out", str(tmp / "run")]) == 0
    return tmp


@pytest.mark.parametrize("kind,group,layer", [("int8", 64, Int8Linear), ("int4", 32, Int4Linear)])
def test_quantized_checkpoint_loads_quantised_and_decodes_close_to_float(run, kind, group, layer):
    out = run / f"q-{kind}"
    args = ["--checkpoint", str(run / "run"), "--kind", kind, "--out", str(out)]
    assert quantize_main(args + ["--group-size", str(group)]) == 0
    model, tokenizer, config = load_checkpoint(out)
    float_model, _, _ = load_checkpoint(run / "run")
    linears = [m for m in model.modules() if isinstance(m, layer)]
    assert len(linears) == 2 * 7 + 1  # every linear layer of the 2 blocks, and the output head
    assert config["quantize"] == kind
    tokens = torch.tensor([tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        quantized, reference = model(tokens), float_model(tokens)
    # Quantisation moves the logits a little, not the model's mind: same top token at most
    # positions, small log-probability changes.
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.9
    drift = (quantized.log_softmax(-1) - reference.log_softmax(-1)).abs().mean()
    assert drift < {"int8": 0.02, "int4": 0.15}[kind]


def test_generate_quantizes_on_the_fly_and_mistakes_are_one_line(run, capsys):
    common = ["--checkpoint", str(run / "run"), "--prompt", "To", "--max-new-tokens", "6"]
    assert generate_main(common + ["--quantize", "int4", "--group-size", "64"]) == 0
    assert "MB of weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # the parser refuses the flag
        run_command(generate_main, common + ["--quantize", "int4", "--group-size", "48"])
    code = refused.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--group-size" in err[0]
    assert quantize_main(["--checkpoint", str(run / "run"), "--kind", "int8", "--out",
                          str(run / "twice")]) == 0  # fmt: skip
    capsys.readouterr()
    code = run_command(
        quantize_main,
        ["--checkpoint", str(run / "twice"), "--kind", "int4", "--out", str(run / "thrice")],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already quantised" in err[0]


def test_quantized_checkpoint_exports_and_merges_as_float(run):
    """The exporters write dequantised weights of a checkpoint quantised for decoding, never its
    packed buffers: HF and GGUF files with every tensor, equal to the dequantised layers."""
    from xllama.convert import export_hf, load_hf
    from xllama.export_gguf import gguf_tensors
    from xllama.merge import main as merge_main

    out = run / "q-export"
    assert (
        quantize_main(["--checkpoint", str(run / "run"), "--kind", "int8", "--out", str(out)]) == 0
    )
    model, tokenizer, _ = load_checkpoint(out)
    expected = model.layers[0].attention.wv.dequantized_weight()
    assert merge_main(["--checkpoint", str(out), "--dequantize", "--format", "hf",
                       "--out", str(run / "q-hf")]) == 0  # fmt: skip
    reloaded = load_hf(run / "q-hf")
    assert torch.equal(reloaded.layers[0].attention.wv.weight, expected)
    export_hf(model, run / "q-hf-direct")  # the exporter itself, on the quantised model
    assert torch.equal(load_hf(run / "q-hf-direct").layers[0].attention.wv.weight, expected)
    tokens = torch.tensor([tokenizer.encode("To be")])
    with torch.no_grad():  # the quantised model's kernel runs in bfloat16: close, not equal
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=0.05, rtol=0.05)
    tensors = gguf_tensors(model)  # what export_gguf writes, by llama.cpp's names
    assert len(tensors) == 2 * 9 + 3 and torch.equal(tensors["blk.0.attn_v.weight"], expected)
