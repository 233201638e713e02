"""The model against independent computations: cached decoding vs full forward, padding, the
rolling-buffer cache vs a brute-force windowed forward (each with RoPE and with ALiBi), RoPE
pairings, RMSNorm, parameter counts."""

import math
import shutil
from dataclasses import replace

import pytest
import torch

from benchmarks.xllama import CONFIGS as BENCHMARK_CONFIGS
from xllama import Llama, LlamaConfig, XLlamaError, get_config, token_logprobs
from xllama.model import RMSNorm, apply_rope, count_params_meta, rope_tables
from xllama.sampling import generate
from xllama.train import PRESETS

TINY = PRESETS["tiny"].model

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def tiny(n_kv_heads=2, **kw) -> Llama:
    torch.manual_seed(0)
    cfg = replace(TINY, n_kv_heads=n_kv_heads, **kw)
    return Llama(cfg).eval()


POSITIONS = ["rope", "alibi"]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", HEADS)
def test_cached_decoding_equals_full_forward(kind, position):
    model = tiny(HEADS[kind], position=position)
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 20)
        pieces = [model(tokens[:, :7], cache=cache)]  # a prompt chunk, then one token at a time
        for t in range(7, 20):
            pieces.append(model(tokens[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_and_right_padding_do_not_change_rows(position):
    model = tiny(position=position)
    a, b = torch.randint(1, 256, (1, 12)), torch.randint(1, 256, (1, 5))
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        pad = torch.zeros(1, 7, dtype=torch.long)
        right = model(
            torch.cat([a, torch.cat([b, pad], 1)]),
            attention_mask=torch.cat(
                [torch.ones(1, 12), torch.cat([torch.ones(1, 5), torch.zeros(1, 7)], 1)]
            ),
        )
        left = model(
            torch.cat([a, torch.cat([pad, b], 1)]),
            attention_mask=torch.cat(
                [torch.ones(1, 12), torch.cat([torch.zeros(1, 7), torch.ones(1, 5)], 1)]
            ),
        )
    torch.testing.assert_close(right[0], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[0], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right[1, :5], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[1, 7:], alone_b[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", HEADS)
def test_batched_greedy_generation_equals_each_prompt_alone(kind, position):
    model = tiny(HEADS[kind], position=position)
    prompts = [[5, 9, 200, 3, 17, 8, 44], [7], [100, 101, 102]]
    batched = generate(model, prompts, 12, temperature=0)
    alone = [generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert batched == alone
    # Against a cache-free greedy loop over the full forward pass.
    for prompt, result in zip(prompts, alone):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert result == seq[len(prompt) :]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoding_equals_the_cache_free_greedy_loop():
    """`generate(compile=True)` runs the one-token steps under torch.compile; greedy tokens equal
    a cache-free loop over the eager full forward, for a padded batch too."""
    model = tiny()
    prompts = [[5, 9, 200, 3], [7]]
    compiled = generate(model, prompts, 6, temperature=0, compile=True)
    for prompt, result in zip(prompts, compiled):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert result == seq[len(prompt) :]


def test_per_row_stop_ids_stop_rows_independently():
    model = tiny()
    prompts = [[5, 9, 200], [7, 1]]
    free = generate(model, prompts, 10, temperature=0)
    eos = free[0][3]  # the 4th token of row 0 becomes the EOS
    stopped = generate(model, prompts, 10, temperature=0, stop_ids=[eos])
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    row1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == row1
    # Two stop ids (EOS and a chat model's end of turn): each row ends at the first it produces.
    stops = {free[0][3], free[1][1]}
    stopped = generate(model, prompts, 10, temperature=0, stop_ids=stops)
    for row, result in zip(free, stopped):
        first = min(i for i, token in enumerate(row) if token in stops)
        assert result == row[: first + 1]


def test_a_cache_holding_the_prompts_start_continues_it_as_a_fresh_one():
    """A chat's next turn reads only what its cache does not hold: the same greedy tokens."""
    model = tiny()
    first = [5, 9, 200, 17, 3]
    cache = model.make_cache(1)
    answer = generate(model, [first], 6, temperature=0, cache=cache)[0]
    assert cache.length == len(first) + len(answer) - 1  # the last new token is not read yet
    second = first + answer + [44, 45, 46]
    assert generate(model, [second], 6, temperature=0, cache=cache) == generate(
        model, [second], 6, temperature=0
    )
    cache.rollback(3)  # a prompt that shares only its first 3 tokens
    other = first[:3] + [7, 7, 7]
    assert generate(model, [other], 4, temperature=0, cache=cache) == generate(
        model, [other], 4, temperature=0
    )
    with pytest.raises(XLlamaError, match="cannot continue 2 prompt"):
        generate(model, [other, other], 2, cache=model.make_cache(2))


@pytest.mark.parametrize("position", POSITIONS)
def test_sliding_window_rolling_cache_equals_windowed_forward(position):
    window = 5
    model = tiny(sliding_window=window, position=position)
    tokens = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 40)
        assert cache.rolling and cache.layers[0].k.size(2) == window
        pieces = [model(tokens[:, :8], cache=cache)]  # chunk longer than the window
        for t in range(8, 23):
            pieces.append(model(tokens[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    # Brute force, one layer (with more, windows compound): token t of the windowed model equals
    # the plain causal model run on tokens t-W+1..t only (RoPE and ALiBi are relative), reference
    # attention.
    one = tiny(sliding_window=window, n_layers=1, position=position)
    plain = tiny(n_layers=1, position=position)
    plain.load_state_dict(one.state_dict())
    for layer in plain.layers:
        layer.attention.kernel = "reference"
    with torch.no_grad():
        banded = one(tokens)
        for t in (3, 9, 17):
            alone = plain(tokens[:, max(0, t - window + 1) : t + 1])[:, -1]
            torch.testing.assert_close(banded[:, t], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_sliding_window_generation_with_padding_matches_alone(position):
    model = tiny(sliding_window=4, position=position)
    prompts = [[5, 9, 200, 3, 17, 8, 44, 1, 2], [7, 8]]
    batched = generate(model, prompts, 10, temperature=0)
    assert batched == [generate(model, [p], 10, temperature=0)[0] for p in prompts]


def test_alibi_model_ignores_the_rotary_settings():
    a, b = tiny(position="alibi"), tiny(position="alibi", rope_theta=7.0, rope_pairing="half")
    rope = tiny()
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens))
        assert not torch.allclose(a(tokens), rope(tokens), atol=1e-4)


def test_rope_pairings_agree_through_the_weight_permutation():
    from xllama.convert import permute_to_half

    model = tiny(n_kv_heads=2)
    cfg = model.config
    half = Llama(replace(TINY, n_kv_heads=2, rope_pairing="half")).eval()
    state = model.state_dict()
    for i in range(cfg.n_layers):
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = permute_to_half(state[key], heads)
    half.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(half(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_rope_rotation_is_the_complex_product():
    """Adjacent pairing equals multiplying (x_2i + i x_2i+1) by e^{i m θ_i} (RoFormer Eq. 34)."""
    d, m = 8, torch.arange(6)
    cos, sin = rope_tables(d, 6, theta=10000.0)
    x = torch.randn(6, d)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(6, d // 2, 2).contiguous())
    expected = torch.view_as_real(
        z * torch.polar(torch.ones(6, d // 2).double(), m[:, None] * theta)
    )
    rotation = torch.complex(cos, sin)
    torch.testing.assert_close(apply_rope(x, rotation, "adjacent"), expected.flatten(-2).float())


def test_half_pairing_is_hugging_faces_rotate_half():
    """`half` pairing against Hugging Face's formula, written out: x·cos + rotate_half(x)·sin with
    cos/sin repeated over both halves of the head."""
    cos, sin = rope_tables(16, 10)
    x = torch.randn(2, 4, 10, 16)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
    expected = x * cos2 + rotate_half * sin2
    torch.testing.assert_close(apply_rope(x, torch.complex(cos, sin), "half"), expected)


def test_linear_position_interpolation_scales_positions():
    cos2, sin2 = rope_tables(8, 20, scaling=2.0)
    cos1, sin1 = rope_tables(8, 20)
    torch.testing.assert_close(cos2[10], cos1[5])
    torch.testing.assert_close(sin2[4], sin1[2])


def test_rmsnorm_in_float32_matches_hand_computation():
    norm = RMSNorm(4, eps=1e-6)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, -1.0])
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    rms = math.sqrt((1 + 4 + 9 + 0.25) / 4 + 1e-6)
    expected = torch.tensor([[1 / rms, -4 / rms, 1.5 / rms, -0.5 / rms]])
    torch.testing.assert_close(norm(x), expected)
    # bf16 input, against Hugging Face's LlamaRMSNorm (Meta's order: normalise in float32, cast back
    # to bf16, then multiply by the float32 gain, which gives float32), bit for bit.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(4, eps=1e-6)
    ref.weight.data = norm.weight.data.clone()
    x16 = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.1, 7.0, -3.3, 2.2]]).bfloat16()
    out, expected16 = norm(x16), ref(x16)
    assert out.dtype == expected16.dtype == torch.float32
    assert torch.equal(out, expected16)


def test_swiglu_hidden_size_rule():
    assert get_config("llama2-7b").hidden_dim == 11008
    assert get_config("llama2-13b").hidden_dim == 13824
    assert get_config("llama2-70b").hidden_dim == 28672
    assert BENCHMARK_CONFIGS["bench-4.9m"].hidden_dim == 688
    assert BENCHMARK_CONFIGS["bench-31.6m"].hidden_dim == 1376


@pytest.mark.parametrize(
    "name, billions", [("llama2-7b", 6.74), ("llama2-13b", 13.0), ("llama2-70b", 69.0)]
)
def test_llama2_parameter_counts_on_meta_device(name, billions):
    n = count_params_meta(get_config(name))
    assert round(n / 1e9, 2 if billions < 10 else 1) == billions


SHAPES = {**{n: p.model for n, p in PRESETS.items()}, **BENCHMARK_CONFIGS}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_counts_equal_hugging_face_llama_of_the_same_shape(name):
    transformers = pytest.importorskip("transformers")
    c = SHAPES[name]
    hf = transformers.LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, vocab_size=c.vocab_size,
        tie_word_embeddings=c.tie_embeddings,
    )  # fmt: skip
    with torch.device("meta"):
        expected = sum(p.numel() for p in transformers.LlamaForCausalLM(hf).parameters())
    assert count_params_meta(c) == expected


def test_tied_embeddings_share_one_matrix():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == tiny().num_params() - 256 * 32


def test_token_logprobs_by_hand():
    """log p(y) = z_y − log Σ_j e^{z_j}, in float64 by hand; bf16 logits are read in float32."""
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]])
    targets = torch.tensor([[1, 0]])
    expected = [
        2.0 - math.log(math.e + math.e**2 + 1),
        0.5 - math.log(math.e**0.5 + math.e**-1 + math.e**3),
    ]
    torch.testing.assert_close(token_logprobs(logits, targets), torch.tensor([expected]))
    lp16 = token_logprobs(logits.bfloat16(), targets)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, torch.tensor([expected]), atol=2e-2, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(XLlamaError, match="longer than the context"):
        generate(model, [[1] * 65], 1)
    with pytest.raises(XLlamaError, match="top_p"):
        generate(model, [[1]], 1, top_p=1.5)
    with pytest.raises(XLlamaError, match="top_p"):
        generate(model, [[1]], 1, top_p=0.0)
    with pytest.raises(XLlamaError, match="unknown Llama 2 shape"):
        get_config("llama9")
    with pytest.raises(XLlamaError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=32, n_heads=4, n_kv_heads=3)


def test_sampling_is_finite_with_extreme_logits_and_respects_the_nucleus():
    from xllama import sample_next

    logits = torch.tensor(
        [
            [1e30, 1e30 - 1e24, -1e30, float("-inf"), 0.0],
            [float("inf"), 0.0, 0.0, 0.0, 0.0],
            [3.0, 2.0, 1.0, 0.0, -1.0],
        ]
    )
    g = torch.Generator().manual_seed(0)
    # Row 0: token 1 trails by 1e24 (still −2e22 at temperature 50), row 1 has an +inf: both always
    # give token 0, whatever the filters; row 2 keeps its most likely token under every filter.
    for top_p in (1e-6, 0.5, 0.9, 1.0):
        for top_k in (None, 2):
            for temperature in (1e-4, 1.0, 50.0):
                draws = sample_next(logits, temperature, top_k, top_p, g)
                assert draws[:2].tolist() == [0, 0]
                if top_p == 1e-6 or temperature == 1e-4:
                    assert draws[2].item() == 0
    # Probabilities 0.665, 0.245, 0.090, ...: top_p 0.7 keeps the first two tokens only.
    draws = torch.stack([sample_next(logits[2:], 1.0, None, 0.7, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    draws = torch.stack([sample_next(logits[2:], 1.0, 3, None, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    assert sample_next(logits, 0.0).tolist() == [0, 0, 0]
