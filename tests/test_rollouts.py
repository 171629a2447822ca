"""tasks/train/rollouts.py: sampling layout and seeding, pluggable scoring, reward shaping, the cache."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.generate import generate
from models.heads import ScalarHeadModel
from models.llama import Transformer
from tasks.core.stage import StageError
from tasks.train import rollouts
from tests.helpers.evalhelpers import tiny_model

STOP, PAD = (5, 6), 0
PROMPTS = [[1, 9, 10, 11], [1, 12, 13, 14, 15, 16], [1, 17, 18]]


def sampling(max_new_tokens: int = 6) -> rollouts.Sampling:
    return rollouts.Sampling(
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=None, stop=STOP, pad_id=PAD
    )


def random_policy(seed: int) -> Transformer:
    """Untied, small init: near-uniform next-token distributions, so samples vary from seed to seed."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=32, tie_embeddings=False
    )
    return Transformer(config).eval()


def test_sampled_rows_are_prompt_major_each_seeded_by_its_row():
    model = random_policy(3)
    batch = rollouts.sample_responses(model, PROMPTS, sampling(), seed=7, n_per_prompt=2)
    assert batch["tokens"].shape[0] == 6 and batch["mask"].shape == (6, batch["tokens"].shape[1] - 1)
    responses = []
    for r in range(6):
        prompt = PROMPTS[r // 2]
        gen = torch.Generator().manual_seed(7 * 1000 + r)
        with torch.no_grad():
            alone = generate(
                model, torch.tensor([prompt]), max_new_tokens=6, stop_tokens=STOP, pad_id=PAD, generator=gen
            )[0].tolist()[len(prompt) :]
        alone = alone[: alone.index(PAD)] if PAD in alone else alone
        n = int(batch["lengths"][r])
        assert batch["tokens"][r, :n].tolist() == prompt + alone and n == len(prompt) + len(alone)
        # the mask marks exactly the label positions of response tokens
        assert batch["mask"][r].tolist() == [0.0] * (len(prompt) - 1) + [1.0] * len(alone) + [0.0] * (
            batch["mask"].shape[1] - n + 1
        )
        responses.append(alone)
    assert responses[0] != responses[1] or responses[2] != responses[3]  # G samples of a prompt differ
    again = rollouts.sample_responses(model, [p for p in PROMPTS for _ in range(2)], sampling(), seed=7)
    assert torch.equal(again["tokens"], batch["tokens"])  # n_per_prompt=G == each prompt listed G times


def test_clipped_marks_the_responses_without_a_stop_token():
    """Rows of different lengths, right-padded: the last token of each row's own length decides."""
    prompts = [[1, 9], [1, 9, 10, 11], [1], [1, 12]]
    responses = [[20, STOP[0]], [21, 22, 23], [STOP[1]], [24, 25, 26, 27]]  # ended, cut, ended, cut
    batch = rollouts.response_batch(prompts, responses, PAD)
    assert rollouts.clipped(batch, STOP).tolist() == [False, True, False, True]
    model = random_policy(3)  # near-uniform: 1 new token rarely stops, 2 stop tokens of 64
    sampled = rollouts.sample_responses(model, PROMPTS * 4, sampling(max_new_tokens=1), seed=0)
    last = [sampled["tokens"][r, n - 1].item() for r, n in enumerate(sampled["lengths"].tolist())]
    assert rollouts.clipped(sampled, STOP).tolist() == [t not in STOP for t in last]


def test_reward_function_is_pluggable_and_batched_scores_match_single_rows():
    reward = ScalarHeadModel(tiny_model(64, 32, seed=4)).eval()
    responses = [[20, 21, 5], [22], [23, 24, 25, 26]]
    scorer = lambda batch: rollouts.score_with_reward_model(reward, batch)  # noqa: E731
    got = rollouts.score_responses(scorer, PROMPTS, responses, PAD, "cpu", batch_size=2)
    with torch.no_grad():
        alone = [float(reward(torch.tensor([p + r]))[0, -1]) for p, r in zip(PROMPTS, responses, strict=True)]
    assert max(abs(a - b) for a, b in zip(got, alone, strict=True)) < 1e-5
    by_length = rollouts.score_responses(lambda b: b["lengths"].float(), PROMPTS, responses, PAD, "cpu", 2)
    assert by_length == [len(p) + len(r) for p, r in zip(PROMPTS, responses, strict=True)]


def test_shaped_rewards_are_kl_penalty_plus_score_on_the_last_response_token():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.7, -0.2, -0.9]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -0.4], [-0.1, -0.2, -0.6, -0.9]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # row 0: 4 real tokens, row 1: 5
    rewards, kl = rollouts.shaped_rewards(
        logps, ref, mask, torch.tensor([2.0, -1.0]), torch.tensor([4, 5]), 0.5
    )
    assert torch.allclose(kl, torch.tensor([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.4, 0.0]]))
    expected = torch.tensor([[0.0, 0.5, 0.0 + 2.0, 0.0], [0.0, 0.0, -0.2, 0.0 - 1.0]])
    assert torch.allclose(rewards, expected), rewards


def test_rollout_cache_round_trip_means_and_clear(tmp_path):
    cache, other_rank = rollouts.RolloutCache(tmp_path, 0), rollouts.RolloutCache(tmp_path, 1)
    first = {"kl": torch.tensor([1.0, 3.0]), "tokens": torch.tensor([[1, 2], [3, 4]])}
    cache.save(0, first, {"kl_coef_after": 0.25})
    cache.save(2, {"kl": torch.tensor([5.0])}, {})
    other_rank.save(0, {"kl": torch.tensor([9.0])}, {})
    loaded = cache.load(0)
    assert torch.equal(loaded["tokens"], first["tokens"]) and float(loaded["kl_coef_after"]) == 0.25
    assert loaded["kl_coef_after"].dtype == torch.float64
    assert cache.means("kl") == {0: 2.0, 2: 5.0}
    cache.clear()
    assert cache.means("kl") == {} and other_rank.means("kl") == {0: 9.0}
    with pytest.raises(
        StageError, match=r"rollout of step 2, but its cache .*rank0-step00000002.* is missing"
    ):
        cache.load(2)


def test_ppo_log_probs_are_those_of_the_distribution_responses_are_sampled_from():
    """rlhf computes old, new and reference log-probs from sampling_logits: at temperature 0.5 their
    distribution is the one sample_responses draws from (4000 one-token draws), not the model's own."""
    model = random_policy(5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # sharp logits, so temperature 0.5 and 1 differ clearly
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]  # [V]
    drawn = rollouts.sample_responses(
        model,
        [prompt],
        rollouts.Sampling(max_new_tokens=1, temperature=0.5, top_k=None, stop=(), pad_id=-1),
        seed=11,
        n_per_prompt=4000,
    )["tokens"][:, len(prompt)]
    empirical = torch.bincount(drawn, minlength=logits.numel()).float() / drawn.numel()
    at_temperature = torch.softmax(rollouts.sampling_logits(logits, 0.5), -1)
    assert torch.allclose(at_temperature, torch.softmax(logits / 0.5, -1))
    assert 0.5 * (empirical - at_temperature).abs().sum() < 0.05
    assert 0.5 * (empirical - torch.softmax(logits, -1)).abs().sum() > 0.15
    assert rollouts.sampling_logits(logits, 1.0) is logits and rollouts.sampling_logits(logits, 0.0) is logits
