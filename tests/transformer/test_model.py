"""The encoder-decoder Transformer against torch.nn.Transformer, hand computations and itself
decoded two ways (cached vs recomputed, beam 1 vs greedy)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.attention import MultiHeadAttention, StaticKVCache
from transformer.model import (
    Transformer,
    TransformerConfig,
    beam_search,
    greedy_decode,
    label_smoothed_loss,
    learning_rate,
    length_penalty,
    sinusoidal_positions,
)
from transformer.train import PRESETS

TINY = TransformerConfig(
    vocab_size=23,
    d_model=16,
    n_encoder_layers=2,
    n_decoder_layers=2,
    n_heads=4,
    d_ff=32,
    dropout=0.0,
    max_len=64,
)


def _copy_attention(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    d = ours.wq.weight.size(1)
    for i, proj in enumerate((ours.wq, ours.wk, ours.wv)):
        proj.weight.copy_(ref.in_proj_weight[i * d : (i + 1) * d])
        proj.bias.copy_(ref.in_proj_bias[i * d : (i + 1) * d])
    ours.wo.weight.copy_(ref.out_proj.weight)
    ours.wo.bias.copy_(ref.out_proj.bias)


def _copy_ffn_norms(ours_layer, ref_layer, n_norms):
    ours_layer.feed_forward.w1.load_state_dict(ref_layer.linear1.state_dict())
    ours_layer.feed_forward.w2.load_state_dict(ref_layer.linear2.state_dict())
    for i in range(1, n_norms + 1):
        getattr(ours_layer, f"residual{i}").norm.load_state_dict(
            getattr(ref_layer, f"norm{i}").state_dict()
        )


def _load_from_torch(model: Transformer, ref: nn.Transformer) -> None:
    with torch.no_grad():
        for ours, theirs in zip(model.encoder_layers, ref.encoder.layers):
            _copy_attention(ours.self_attention, theirs.self_attn)
            _copy_ffn_norms(ours, theirs, 2)
        for ours, theirs in zip(model.decoder_layers, ref.decoder.layers):
            _copy_attention(ours.self_attention, theirs.self_attn)
            _copy_attention(ours.cross_attention, theirs.multihead_attn)
            _copy_ffn_norms(ours, theirs, 3)


def _batch(config, batch=3, src_len=7, tgt_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(3, config.vocab_size, (batch, src_len), generator=g)
    target = torch.randint(3, config.vocab_size, (batch, tgt_len), generator=g)
    source[0, -2:] = config.pad_id  # padded sentences exercise the key-padding masks
    source[2, -4:] = config.pad_id
    return source, target


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_matches_torch_nn_transformer(kernel, pre_norm):
    """Post-norm (the paper) and pre-norm (`norm_first=True` in torch) against torch.nn.Transformer
    with the same weights."""
    torch.manual_seed(0)
    config = TransformerConfig(**{**TINY.__dict__, "pre_norm": pre_norm})
    model = Transformer(config).eval()
    ref = nn.Transformer(
        d_model=config.d_model,
        nhead=config.n_heads,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=config.d_ff,
        dropout=0.0,
        batch_first=True,
        norm_first=pre_norm,
    ).eval()
    if pre_norm:  # a pre-norm stack ends with a LayerNorm, in both implementations
        with torch.no_grad():
            model.encoder_norm.load_state_dict(ref.encoder.norm.state_dict())
            model.decoder_norm.load_state_dict(ref.decoder.norm.state_dict())
    else:  # torch always ends both stacks with a LayerNorm; the paper's post-norm stack has none
        ref.encoder.norm = nn.Identity()
        ref.decoder.norm = nn.Identity()
    _load_from_torch(model, ref)
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.kernel = kernel
    source, target = _batch(config)
    ours = model(source, target)
    with torch.no_grad():
        src_emb, tgt_emb = model.source_embedding(source), model.target_embedding(target)
        hidden = ref(
            src_emb,
            tgt_emb,
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(target.size(1)),
            src_key_padding_mask=source == config.pad_id,
            memory_key_padding_mask=source == config.pad_id,
            tgt_is_causal=True,
        )
        expected = model.output_projection(hidden)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_positions_and_embedding_scale_by_hand():
    table = sinusoidal_positions(10, 6)
    pos, i = 7, 1  # dimensions 2i and 2i+1
    angle = pos / 10000 ** (2 * i / 6)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    model = Transformer(TINY).eval()
    ids = torch.tensor([[5, 6]])
    emb = model.source_embedding(ids)
    expected = model.source_embedding.tokens.weight[ids] * 4.0 + sinusoidal_positions(2, 16)
    torch.testing.assert_close(emb, expected)


def test_word_dropout_zeroes_whole_tokens_at_its_rate():
    """Each token's embedding is either dropped entirely (only its position remains) or kept and
    scaled by the inverse keep probability 1 / (1 - p) (within the 1/2^15 to which
    transformer.dropout rounds p); about p of the tokens are dropped; evaluation leaves them alone."""
    p = 0.3
    scale = 1 / (1 - p)
    config = TransformerConfig(**{**TINY.__dict__, "word_dropout": p})
    model = Transformer(config)
    embedding = model.source_embedding
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (200, 50))
    positions = sinusoidal_positions(50, 16)
    token = embedding.tokens.weight[ids] * 4.0
    out = embedding(ids).detach()
    dropped = torch.isclose(out, positions.expand_as(out), atol=1e-5).all(-1)
    kept = torch.isclose(out - positions, token * scale, rtol=1e-4, atol=1e-5).all(-1)
    assert bool((dropped ^ kept).all())  # every token is one or the other, never a mixture
    rate, sd = dropped.float().mean().item(), math.sqrt(p * (1 - p) / ids.numel())
    assert abs(rate - p) < 5 * sd
    torch.testing.assert_close(embedding.eval()(ids), token + positions)


def test_tied_embeddings_share_one_matrix():
    model = Transformer(TINY)
    assert model.output_projection.weight is model.source_embedding.tokens.weight
    assert model.target_embedding is model.source_embedding
    untied = Transformer(TransformerConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    assert untied.output_projection.weight is not untied.source_embedding.tokens.weight


@pytest.mark.parametrize("name, millions", [("base", 65), ("big", 213)])
def test_presets_have_the_parameter_counts_of_table_3(name, millions):
    """Counted against torch.nn.Transformer of the same shape (less its two final LayerNorms, which
    the post-norm paper model has not) plus one tied 37,000 x d_model embedding, and against the
    paper's Table 3 (65M and 213M)."""
    config = PRESETS[name].model
    with torch.device("meta"):  # count without allocating
        ours = sum(p.numel() for p in Transformer(config).parameters())
        ref = nn.Transformer(config.d_model, config.n_heads, config.n_encoder_layers,
                             config.n_decoder_layers, config.d_ff)  # fmt: skip
        expected = sum(p.numel() for p in ref.parameters()) - 4 * config.d_model
    assert ours == expected + config.vocab_size * config.d_model
    # 63.1M and 214.2M: within 3% of the paper's rounded figures (its exact vocabulary size is
    # not given; 37,000 is "about" it).
    assert abs(ours / 1e6 - millions) / millions < 0.03


def test_learning_rate_is_equation_3():
    d, warmup = 512, 4000
    # by hand: 512^-0.5 = 0.0441942, 4000^-1.5 = 3.95285e-6
    assert learning_rate(1, d, warmup) == pytest.approx(0.0441942 * 3.95285e-6, rel=1e-5)
    assert learning_rate(4000, d, warmup) == pytest.approx(0.0441942 / math.sqrt(4000), rel=1e-6)
    assert learning_rate(16000, d, warmup) == pytest.approx(0.0441942 / 126.4911, rel=1e-5)
    peak = max(learning_rate(s, d, warmup) for s in range(1, 10000))
    assert peak == learning_rate(4000, d, warmup)


def test_label_smoothed_loss_by_hand():
    """The Annotated Transformer's target: 1 − ε on the reference, ε / (V − 2) on every other
    token but padding (id 0), which gets nothing."""
    logits = torch.tensor([[[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    target = torch.tensor([[1, 3, 0]])  # the last position is padding
    loss, n = label_smoothed_loss(logits, target, smoothing=0.1, pad_id=0)
    expected = 0.0
    for row, y in ((logits[0, 0].tolist(), 1), (logits[0, 1].tolist(), 3)):
        log_z = math.log(sum(math.exp(v) for v in row))
        nll = [log_z - v for v in row]
        q = [0.0 if j == 0 else 0.9 if j == y else 0.1 / 2 for j in range(4)]  # by hand
        expected += sum(qj * lj for qj, lj in zip(q, nll))
    assert n == 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_puts_no_mass_on_padding():
    """d loss / d logit_j = p_j − q_j, so the padding logit's gradient is p_pad exactly (q_pad = 0),
    while with torch's label_smoothing it would be p_pad − ε/V."""
    logits = torch.randn(1, 5, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.tensor([[3, 1, 6, 2, 5]])
    loss, _ = label_smoothed_loss(logits, target, smoothing=0.1, pad_id=0)
    loss.backward()
    p = torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad[..., 0], p[..., 0])
    q = torch.full((1, 5, 7), 0.1 / 5).scatter(-1, target[..., None], 0.9)
    q[..., 0] = 0
    torch.testing.assert_close(logits.grad, p - q)


def test_label_smoothed_loss_matches_torch_soft_target_cross_entropy():
    """Loss and gradient against torch's cross-entropy with probability targets, given the q of
    §5.4 explicitly: padding rows count for nothing, the upstream gradient scales, and bfloat16
    logits get a bfloat16 gradient."""
    g = torch.Generator().manual_seed(0)
    vocab, pad, eps = 11, 2, 0.1
    target = torch.randint(pad + 1, vocab, (3, 6), generator=g)
    target[0, 4:] = pad
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(3, 6, vocab, generator=g)).to(dtype).requires_grad_()
        loss, n = label_smoothed_loss(logits, target, smoothing=eps, pad_id=pad)
        (0.5 * loss).backward()

        reference = logits.detach().float().requires_grad_()
        q = torch.full((3, 6, vocab), eps / (vocab - 2)).scatter(-1, target[..., None], 1 - eps)
        q[..., pad] = 0
        per_token = F.cross_entropy(reference.transpose(1, 2), q.transpose(1, 2), reduction="none")
        expected = (per_token * (target != pad)).sum()
        (0.5 * expected).backward()

        assert n == int((target != pad).sum()) == 16
        torch.testing.assert_close(loss, expected)
        assert logits.grad.dtype == dtype
        tol = {} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 1e-2}
        torch.testing.assert_close(logits.grad.float(), reference.grad, **tol)
        assert (logits.grad[0, 4:] == 0).all()


def test_length_penalty_is_gnmt():
    assert length_penalty(7, 0.6) == pytest.approx((12 / 6) ** 0.6)
    assert length_penalty(3, 0.0) == 1.0


def _trained_ish_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(TINY).eval()
    with torch.no_grad():  # sharpen the output distribution so decodes are long and varied
        model.output_projection.weight.mul_(3.0)
    return model


def _greedy_recomputing_the_prefix(model, source, bos_id, eos_id, steps):
    """Greedy decoding without a cache, for one sentence: the decoder reads the whole prefix at
    every step."""
    tokens = [bos_id]
    for _ in range(steps):
        logits = model(source[None], torch.tensor([tokens]))[0, -1]
        tokens.append(int(logits.argmax()))
        if tokens[-1] == eos_id:
            break
    return [t for t in tokens[1:] if t != eos_id]


def test_cached_decoding_equals_recomputing_the_prefix():
    model = _trained_ish_model()
    source, _ = _batch(TINY, batch=4, src_len=6)
    cached = greedy_decode(model, source, bos_id=1, eos_id=2, max_extra=8)
    with torch.no_grad():
        full = [
            _greedy_recomputing_the_prefix(model, s[s != 0], 1, 2, int((s != 0).sum()) + 8)
            for s in source
        ]
    assert cached == full
    assert max(len(h) for h in cached) > 3
    # the logits, not only the argmax, agree step by step
    source_mask = model.source_mask(source)
    memory = model.encode(source, source_mask)
    prefix = torch.randint(3, TINY.vocab_size, (4, 6))
    state = model.new_state(4, 6, memory)
    steps = [model.decode(prefix[:, t : t + 1], memory, source_mask, state) for t in range(6)]
    torch.testing.assert_close(
        torch.cat(steps, 1), model.decode(prefix, memory, source_mask), rtol=1e-5, atol=1e-5
    )


def test_static_cross_attention_cache_projects_once():
    attn = MultiHeadAttention(16, 4).eval()
    x, context = torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    cache = StaticKVCache()
    first = attn(x, context, cache=cache)
    again = attn(x, torch.zeros_like(context), cache=cache)  # the context is not read again
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, attn(x, context))


def test_beam_one_without_length_penalty_equals_greedy():
    for seed in range(3):
        model = _trained_ish_model(seed)
        source, _ = _batch(TINY, batch=5, src_len=6, seed=seed)
        greedy = greedy_decode(model, source, bos_id=1, eos_id=2, max_extra=10)
        beam = beam_search(model, source, bos_id=1, eos_id=2, beam_size=1, alpha=0.0, max_extra=10)
        assert beam == greedy


class _ScriptedDecoder:
    """A stand-in for the Transformer whose next-token probabilities depend only on the tokens
    decoded so far (after BOS), from a table: enough to construct a search by hand."""

    def __init__(self, table, vocab=5, eos=2):
        self.table, self.vocab, self.eos = table, vocab, eos
        self.config = TINY

    def source_mask(self, source):
        return source != 0

    def encode(self, source, mask):
        return source.float()

    def new_state(self, rows, max_len, memory):
        decoder = self

        class State:
            history = [() for _ in range(rows)]

            def reorder(self, index):
                self.history = [self.history[i] for i in index.tolist()]

        decoder.state = State()
        return decoder.state

    def decode(self, tokens, memory, mask, state):
        rows = []
        for r, token in enumerate(tokens[:, -1].tolist()):
            if token != 1:  # BOS starts every row; later tokens extend its history
                state.history[r] = state.history[r] + (token,)
            probs = self.table(state.history[r])
            rows.append([math.log(max(p, 1e-12)) for p in probs])
        return torch.tensor(rows)[:, None, :]


def test_beam_search_does_not_stop_while_a_live_hypothesis_can_still_win():
    """After BOS: EOS has p = 0.5 (score log 0.5 / lp(1) = -0.69), token 3 has 0.45. After 3, token
    4 follows with p 0.999 until the sequence has 9 tokens, then EOS. That hypothesis scores
    about -0.81 / lp(10) = -0.47 with α = 0.6: better, though at step 1 its raw score (-0.80)
    was below the finished one. Scoring the live hypothesis at its current length stops at
    step 1 and returns the empty translation; the bound at the maximum length keeps searching."""

    def table(history):
        if not history:
            return [0.0, 0.0, 0.5, 0.45, 0.05]  # pad, bos, eos, 3, 4
        if len(history) < 9:
            return [0.0, 0.0, 0.0005, 0.0005, 0.999]
        return [0.0, 0.0, 0.999, 0.0005, 0.0005]

    decoder = _ScriptedDecoder(table)
    source = torch.full((1, 10), 5)  # 10 source tokens: up to 60 output tokens
    for K in (1, 2):
        best = beam_search(decoder, source, bos_id=1, eos_id=2, beam_size=K, alpha=0.6)
        assert best == [[3] + [4] * 8], K
        score = (math.log(0.45) + 8 * math.log(0.999) + math.log(0.999)) / length_penalty(10, 0.6)
        assert score > math.log(0.5) / length_penalty(1, 0.6)  # the premise: it really wins
    # Without a length penalty the finished EOS is best and the search may stop at once.
    assert beam_search(decoder, source, 1, 2, beam_size=1, alpha=0.0) == [[]]


def _sequence_log_prob(model, source, hypothesis, eos_id=2, bos_id=1):
    target = torch.tensor([[bos_id] + hypothesis + [eos_id]])
    logits = model(source[None], target[:, :-1])
    logp = torch.log_softmax(logits, -1)[0]
    return sum(logp[t, target[0, t + 1]].item() for t in range(len(hypothesis) + 1))


def test_beam_search_finds_a_hypothesis_at_least_as_good_as_greedy():
    torch.manual_seed(7)  # a model whose greedy decodes end with EOS for two of the sentences
    model = Transformer(TINY).eval()
    with torch.no_grad():
        model.output_projection.weight.mul_(2.0)
        model.output_projection.weight[2].mul_(2.0)  # EOS
    source, _ = _batch(TINY, batch=4, src_len=5, seed=1)
    alpha = 0.6
    greedy = greedy_decode(model, source, bos_id=1, eos_id=2, max_extra=6)
    beam = beam_search(model, source, bos_id=1, eos_id=2, beam_size=4, alpha=alpha, max_extra=6)
    compared = 0
    for b in range(4):
        if len(greedy[b]) >= (source[b] != 0).sum() + 6:
            continue  # greedy hit the length limit without EOS: not a finished hypothesis
        beam_score, greedy_score = (
            _sequence_log_prob(model, source[b], h) / length_penalty(len(h) + 1, alpha)
            for h in (beam[b], greedy[b])
        )
        assert beam_score >= greedy_score - 1e-5
        compared += 1
    assert compared >= 2  # the comparison above really ran
    # batched beam search equals decoding each sentence alone
    for b in range(4):
        alone = beam_search(
            model, source[b : b + 1, : int((source[b] != 0).sum())], 1, 2, 4, alpha, 6
        )
        assert alone[0] == beam[b]
