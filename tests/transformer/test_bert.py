"""BERT against Hugging Face's BertForMaskedLM / BertForPreTraining (same weights, both ways), the
parameter counts of §3 on the meta device, and the masking rule of §3.1 by counting."""

import pytest
import torch

from transformer.bert import IGNORE, PRESETS, Bert, BertConfig, mask_tokens, mlm_loss
from transformer.bert_hf import export_hf, load_hf
from transformer.training import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

TINY = BertConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=40,
                  dropout=0.0, attention_dropout=0.0)  # fmt: skip


def _hf_config(config: BertConfig):
    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff, max_position_embeddings=config.max_len,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=config.pad_id,
    )  # fmt: skip


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY.vocab_size, (3, 17), generator=g)
    ids[1, 12:] = 0  # padding
    segments = torch.zeros_like(ids)
    segments[:, 9:] = 1
    attention = (ids != 0).long()
    return ids, segments, attention


def _random_hf(cls, seed=0):
    torch.manual_seed(seed)
    model = cls(_hf_config(TINY)).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0, so a swapped name shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("cls", ["BertForMaskedLM", "BertForPreTraining"])
def test_hf_checkpoint_gives_identical_logits(tmp_path, cls):
    theirs = _random_hf(getattr(transformers, cls))
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids, segments, attention = _batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=segments, attention_mask=attention)
        hidden = ours(ids, segments, attention)
        logits = expected.logits if cls == "BertForMaskedLM" else expected.prediction_logits
        real = attention.bool()  # padded positions' outputs are not defined the same way
        torch.testing.assert_close(
            ours.mlm_logits(hidden)[real], logits[real], atol=1e-4, rtol=1e-4
        )
        if cls == "BertForPreTraining":
            torch.testing.assert_close(
                ours.nsp_logits(hidden), expected.seq_relationship_logits, atol=1e-5, rtol=1e-4
            )


def test_export_loads_in_transformers_with_identical_logits(tmp_path):
    torch.manual_seed(1)
    ours = Bert(TINY).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(ours, tmp_path, vocab=[f"t{i}" for i in range(TINY.vocab_size)])
    ids, segments, attention = _batch(2)
    pretraining = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    mlm = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hidden = ours(ids, segments, attention)
        real = attention.bool()
        for out in (pretraining(input_ids=ids, token_type_ids=segments, attention_mask=attention),
                    mlm(input_ids=ids, token_type_ids=segments, attention_mask=attention)):  # fmt: skip
            got = out.logits if hasattr(out, "logits") else out.prediction_logits
            torch.testing.assert_close(
                got[real], ours.mlm_logits(hidden)[real], atol=1e-4, rtol=1e-4
            )
        nsp = pretraining(input_ids=ids, token_type_ids=segments, attention_mask=attention)
        torch.testing.assert_close(
            nsp.seq_relationship_logits, ours.nsp_logits(hidden), atol=1e-5, rtol=1e-4
        )
    assert load_hf(tmp_path).state_dict().keys() == ours.state_dict().keys()


@pytest.mark.parametrize("name,millions", [("base", 110), ("large", 340)])
def test_base_and_large_have_the_papers_sizes_and_hfs_counts(name, millions):
    """§3: 110M and 340M; the same count as transformers' BertForPreTraining of that shape."""
    config = PRESETS[name]
    with torch.device("meta"):
        ours = Bert(config).num_params()
        theirs = transformers.BertForPreTraining(_hf_config(config))
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours == n_theirs
    assert abs(ours / 1e6 - millions) / millions < 0.03


def test_masking_rule_by_counting():
    """15% of maskable positions chosen; of those 80/10/10; special positions never chosen."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 250), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # [CLS]
    inputs, labels = mask_tokens(
        ids, maskable, mask_id=4, vocab_size=1000, generator=g, random_from=5
    )
    chosen = labels != IGNORE
    assert not chosen[:, 0].any()
    assert abs(chosen[:, 1:].float().mean().item() - 0.15) < 0.003
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    randomised = chosen & ~masked & ~kept
    n = chosen.sum().item()
    # within 4 standard deviations of each binomial proportion (a random draw equals the
    # original 1/995 of the time, which moves "kept" by 0.01 points)
    for count, p in ((masked, 0.8), (kept, 0.1), (randomised, 0.1)):
        assert abs(count.sum().item() / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert inputs[randomised].min() >= 5
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        mask_tokens(ids, maskable, 4, 1000, probability=1.0)


def test_mlm_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 1]])
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (torch.exp(torch.tensor(1.0)) + 2))
    torch.testing.assert_close(mlm_loss(logits, labels), expected)


def test_bad_configs_and_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        BertConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="exceeds the position table"):
        Bert(TINY)(torch.ones(1, TINY.max_len + 1, dtype=torch.long))
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_hf(tmp_path)
