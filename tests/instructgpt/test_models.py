"""Sequence log-probabilities, the SFT loss mask, the reward model, and PPO on a two-armed bandit."""

import copy

import torch
import torch.nn.functional as F

from instructgpt.data import ByteTokenizer, collate, encode_pair
from instructgpt.dpo import pair_logprobs
from instructgpt.model import RewardModel, sequence_logprobs, sft_loss
from instructgpt.ppo import PPOConfig, make_rollout, ppo_update
from xllama import Llama, LlamaConfig


def _llama(vocab=257, seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                             multiple_of=16, max_seq_len=64)).eval()  # fmt: skip


def _seq_logprob(model, sequences, side):
    batch = collate(sequences, pad_id=0, side=side)
    lp, _ = sequence_logprobs(model, batch.tokens, batch.attention_mask, batch.response_mask)
    return lp.sum(1)


def test_padding_side_and_batch_composition_leave_sequence_logprobs_unchanged():
    model, tok = _llama(), ByteTokenizer()
    a = encode_pair(tok, "The value", " is new.", 64)
    b = encode_pair(tok, "An object of a longer prompt", " x", 64)
    c = encode_pair(tok, "Q", " a much longer response than the others", 64)
    alone = _seq_logprob(model, [a], "right")[0]
    for side in ("right", "left"):
        for batch, row in (([a, b], 0), ([b, a], 1), ([c, a, b], 1)):
            together = _seq_logprob(model, batch, side)[row]
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    # and the sum is the log-probability of the response only: a direct per-token computation
    ids, start = a
    logits = model(torch.tensor([ids]))[0]
    direct = sum(F.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(start, len(ids)))
    torch.testing.assert_close(alone, direct, rtol=1e-5, atol=1e-4)


def test_prompt_tokens_carry_no_sft_loss():
    model, tok = _llama(), ByteTokenizer()
    batch = collate(
        [encode_pair(tok, "prompt text", " reply", 64), encode_pair(tok, "p", " r", 64)], 0
    )
    logits = model(batch.tokens, attention_mask=batch.attention_mask).detach().requires_grad_(True)
    loss = sft_loss(logits, batch.tokens, batch.response_mask)
    loss.backward()
    # independent reference: cross-entropy with every non-response target ignored
    targets = batch.tokens[:, 1:].clone()
    targets[batch.response_mask[:, 1:] == 0] = -100
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, 257), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, reference)
    predicts_prompt = batch.response_mask[:, 1:] == 0  # position t predicts token t + 1
    assert logits.grad[:, :-1][predicts_prompt].abs().sum() == 0
    assert logits.grad[:, :-1][~predicts_prompt].abs().sum() > 0


def test_reward_model_reads_last_token_and_normalises():
    model = RewardModel.from_language_model(_llama())
    torch.nn.init.normal_(model.head.weight)
    tok = ByteTokenizer()
    seqs = [encode_pair(tok, "a prompt", " one", 64), encode_pair(tok, "b", " two words", 64)]
    right, left = collate(seqs, 0, "right"), collate(seqs, 0, "left")
    r = model.score(right.tokens, right.attention_mask)
    torch.testing.assert_close(
        model.score(left.tokens, left.attention_mask), r, rtol=1e-5, atol=1e-5
    )
    # the score of the first row is the head at its EOS (position len - 1)
    values = model(right.tokens[:1, : len(seqs[0][0])])
    torch.testing.assert_close(r[0], values[0, -1])
    model.normalise(r.mean().item())
    assert model.score(right.tokens, right.attention_mask).mean().abs() < 1e-5


def test_dpo_loss_is_log2_on_a_real_model_when_policy_is_reference():
    from instructgpt.losses import dpo_loss

    model, tok = _llama(), ByteTokenizer()
    pairs = [("The value", " is new.", " is not."), ("A", " b", " c d")]
    pc, pr = pair_logprobs(model, tok, pairs, 64, "cpu")
    rc, rr = pair_logprobs(copy.deepcopy(model), tok, pairs, 64, "cpu")
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((2,), 0.6931471805599453))


class ArmReward(torch.nn.Module):
    """Reward 1 for pulling arm 1 (the response's first token), 0 otherwise."""

    def score(self, tokens, attention_mask):
        return (tokens[:, 1] == 1).float()


def test_one_ppo_iteration_moves_probability_toward_the_rewarded_arm():
    torch.manual_seed(0)
    policy = _llama(vocab=4).train()  # token 0: the prompt; arms 1, 2; token 3: EOS
    reference = copy.deepcopy(policy).eval()
    value = RewardModel(policy.config)  # zero head: V = 0
    prompt = torch.tensor([[0]])

    def arm_probs():
        with torch.no_grad():
            return torch.softmax(policy(prompt)[0, -1], -1)

    before = arm_probs()
    config = PPOConfig(rollout_batch=64, minibatch=16, ppo_epochs=4, max_new_tokens=1, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    rollout = make_rollout(policy, reference, ArmReward(), value, [[0]] * 64, {3}, config, 0.05, g)
    assert rollout.kl.abs().sum() == 0  # the KL penalty is zero while policy == reference
    assert 0 < rollout.score.mean() < 1  # both outcomes were sampled
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-2)
    stats = ppo_update(
        policy, value, optimizer, rollout, config, generator=torch.Generator().manual_seed(0)
    )
    after = arm_probs()
    assert after[1] > before[1] + 0.05
    assert after[2] < before[2]
    # The first minibatch of the first epoch sees ρ = 1 exactly (nothing clipped, KL 0); later ones
    # see the moved policy, so the averages are strictly positive, and with lr 1e-2 over 4 epochs
    # some ratios leave [0.8, 1.2].
    assert 0 < stats["clip_fraction"] < 1 and stats["approx_kl"] > 0


def test_responses_cut_before_eos_lose_the_missing_eos_penalty():
    """max_new_tokens 1 with EOS = token 3: a response that is just EOS ended; any other was cut.
    Rewards are the constant 0.5, so the score is 0.5 minus the penalty exactly on the cut ones."""

    class Constant(torch.nn.Module):
        def score(self, tokens, attention_mask):
            return torch.full((tokens.size(0),), 0.5)

    torch.manual_seed(0)
    policy = _llama(vocab=4).eval()
    value = RewardModel(policy.config)
    for penalty in (0.0, 2.0):
        config = PPOConfig(rollout_batch=64, max_new_tokens=1, missing_eos_penalty=penalty)
        g = torch.Generator().manual_seed(1)
        rollout = make_rollout(policy, policy, Constant(), value, [[0]] * 64, {3}, config, 0.05, g)
        cut = torch.tensor([r != [3] for r in rollout.responses], dtype=torch.float)
        assert 0 < cut.mean() < 1  # both kinds were sampled
        torch.testing.assert_close(rollout.truncated, cut)
        torch.testing.assert_close(rollout.score, 0.5 - penalty * cut)
