"""BERT (Devlin et al. 2019): the Transformer's encoder alone, pretrained by filling in masked words.

Read top to bottom beside the paper:

- `BertConfig` and `PRESETS`: `base` and `large` are §3's BERT_BASE (L=12, H=768, A=12, 110M
  parameters) and BERT_LARGE (L=24, H=1024, A=16, 340M); `mini` and `tiny` are CPU sizes from the
  same family (Turc et al. 2019's L=4/H=256 and L=2/H=128).
- §3.2 / Figure 2 `BertEmbeddings`: token + segment (A or B) + learned position embeddings, then
  LayerNorm and dropout.
- §3 the encoder: `transformer.model.EncoderLayer`, the translation model's own layer (post-norm,
  as Vaswani et al.), with GELU in the feed-forward network and LayerNorm ε = 1e-12.
- §3.1 the heads: the pooler (tanh of a dense layer on the [CLS] state), Task #1 masked LM (dense,
  GELU, LayerNorm, then the output layer tied to the token embeddings, plus a bias) and Task #2
  next sentence prediction (a linear layer on the pooled [CLS]).
- §4 `BertClassifier`: fine-tuning, a classification layer on the pooled [CLS] state.
- §3.1 / Appendix A.1 `mask_tokens`: 15% of the positions are chosen; of those 80% become [MASK],
  10% a random token, 10% stay; the loss is on the chosen positions only.

Weights load from and export to Hugging Face's `BertForMaskedLM` / `BertForPreTraining`
(`transformer.bert_hf`), with identical logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import padding_mask
from .dropout import Dropout
from .model import EncoderLayer, TransformerConfig
from .training.config import ConfigError, check_config, param

IGNORE = -100  # label of the positions the masked-LM loss skips (as Hugging Face's)


@dataclass(frozen=True)
class BertConfig:
    """The model's shape; the defaults are BERT_BASE (§3)."""

    vocab_size: int = param(30522, "WordPiece vocabulary size (BERT's uncased vocabulary: 30,522)")
    d_model: int = param(768, "H, the hidden size")
    n_layers: int = param(12, "L, the number of encoder layers")
    n_heads: int = param(12, "A, the number of attention heads")
    d_ff: int = param(3072, "feed-forward inner size (4H)")
    max_len: int = param(512, "positions of the learned position table (longest input)")
    n_segments: int = param(2, "segment embeddings: sentence A and sentence B")
    dropout: float = param(0.1, "dropout on embeddings and on every sub-layer output")
    attention_dropout: float = param(0.1, "dropout on the attention probabilities")
    norm_eps: float = param(1e-12, "LayerNorm epsilon (BERT's code: 1e-12)")
    pad_id: int = param(0, "the [PAD] token's id: never attended to")

    def __post_init__(self):
        check_config(
            self,
            positive=("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len",
                      "n_segments", "norm_eps"),
            non_negative=("pad_id",),
            below_one=("dropout", "attention_dropout"),
        )  # fmt: skip
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"BertConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.pad_id >= self.vocab_size:
            raise ConfigError(f"BertConfig.pad_id {self.pad_id} is not in the vocabulary")

    def encoder_config(self) -> TransformerConfig:
        """The translation model's config for the same encoder layers (its decoder is unused)."""
        return TransformerConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_encoder_layers=self.n_layers,
            n_decoder_layers=1,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation="gelu",
            max_len=self.max_len,
            norm_eps=self.norm_eps,
            pad_id=self.pad_id,
        )

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "base": BertConfig(),
    "large": BertConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    "mini": BertConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=128),
    "tiny": BertConfig(d_model=128, n_layers=2, n_heads=2, d_ff=512, max_len=128),
}


class BertEmbeddings(nn.Module):
    """§3.2, Figure 2: the input representation is the sum of the token, segment and position
    embeddings (all learned), normalised."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.positions = nn.Embedding(config.max_len, config.d_model)
        self.segments = nn.Embedding(config.n_segments, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, ids: Tensor, segments: Tensor) -> Tensor:
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.tokens(ids) + self.segments(segments) + self.positions(positions)
        return self.dropout(self.norm(x))


class Bert(nn.Module):
    """The encoder with BERT's pretraining heads: `forward` gives the final hidden states;
    `mlm_logits`, `pooled` and `nsp_logits` the heads of §3.1."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        encoder = config.encoder_config()
        self.layers = nn.ModuleList(EncoderLayer(encoder) for _ in range(config.n_layers))
        self.pooler = nn.Linear(config.d_model, config.d_model)
        # Task #1: masked LM. A transform, then the output layer tied to the token embeddings.
        self.mlm_transform = nn.Linear(config.d_model, config.d_model)
        self.mlm_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        # Task #2: next sentence prediction, IsNext / NotNext.
        self.nsp = nn.Linear(config.d_model, 2)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialiser: weights N(0, 0.02), biases 0, LayerNorm 1 and 0."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, ids: Tensor, segments: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(batch, T) ids, segment ids (default all A) and a mask that is 1 at real tokens
        (default: ids != pad_id) -> (batch, T, d_model) hidden states."""
        if ids.size(1) > self.config.max_len:
            raise ValueError(
                f"input of {ids.size(1)} tokens exceeds the position table ({self.config.max_len})"
            )
        if segments is None:
            segments = torch.zeros_like(ids)
        if attention_mask is None:
            attention_mask = ids != self.config.pad_id
        mask = padding_mask(~attention_mask.bool())
        x = self.embeddings(ids, segments)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Task #1: scores over the vocabulary at every position (the loss uses the masked ones)."""
        h = self.mlm_norm(F.gelu(self.mlm_transform(hidden)))
        return h @ self.embeddings.tokens.weight.t() + self.mlm_bias

    def pooled(self, hidden: Tensor) -> Tensor:
        """The pooler: tanh(W h_[CLS] + b), the sequence's summary for classification."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """Task #2: (batch, 2) scores for IsNext (0) and NotNext (1)."""
        return self.nsp(self.pooled(hidden))


class BertClassifier(nn.Module):
    """§4 fine-tuning: one classification layer W on the pooled [CLS] state C, softmax(C Wᵀ); for
    a sentence pair the input is [CLS] A [SEP] B [SEP] with segments 0 and 1 (Hugging Face's
    BertForSequenceClassification)."""

    def __init__(self, bert: Bert, n_classes: int = 2):
        super().__init__()
        self.bert = bert
        self.dropout = Dropout(bert.config.dropout)
        self.classifier = nn.Linear(bert.config.d_model, n_classes)
        Bert._init_weights(self.classifier)

    def forward(
        self, ids: Tensor, segments: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        hidden = self.bert(ids, segments, attention_mask)
        return self.classifier(self.dropout(self.bert.pooled(hidden)))


def mask_tokens(
    ids: Tensor,
    maskable: Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    probability: float = 0.15,
    random_from: int = 0,
) -> tuple[Tensor, Tensor]:
    """§3.1 Task #1 (Appendix A.1): choose each maskable position with `probability`; replace the
    chosen ones by [MASK] 80% of the time, by a random token 10%, keep them 10%.

    `maskable` is False at special tokens and padding. Random replacements are drawn from ids
    `random_from`..vocab_size-1 (skip the special tokens by putting them first). Returns (inputs,
    labels): labels hold the original id at chosen positions and `IGNORE` elsewhere.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"the masking probability must be in (0, 1), got {probability}")
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = (draw < probability) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_ids = torch.randint(random_from, vocab_size, ids.shape, generator=generator,
                               device=ids.device)  # fmt: skip
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the chosen positions only."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
