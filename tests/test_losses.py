"""Post-training losses against hand computations of the papers' formulas on fixed numbers."""

import math

import pytest
import torch

from tasks.train.losses import (
    bradley_terry_loss,
    dpo_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_k3,
    ppo_losses,
    sequence_logps,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_sigmoid_loss_matches_paper_formula():
    pc, pr, rc, rr = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0], [-11.5, -2.5]
    beta = 0.1
    losses, chosen, rejected = dpo_loss(
        torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta=beta
    )
    for i in range(2):
        logits = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert math.isclose(losses[i].item(), -math.log(sigmoid(beta * logits)), rel_tol=1e-6)
        assert math.isclose(chosen[i].item(), beta * (pc[i] - rc[i]), rel_tol=1e-6)
        assert math.isclose(rejected[i].item(), beta * (pr[i] - rr[i]), rel_tol=1e-6)


def test_dpo_label_smoothing_and_ipo():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    beta, eps = 0.5, 0.1
    logits = (-3.0 + 4.0) - (-5.0 + 4.5)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = -(1 - eps) * math.log(sigmoid(beta * logits)) - eps * math.log(sigmoid(-beta * logits))
    assert math.isclose(smoothed.item(), expected, rel_tol=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert math.isclose(ipo.item(), (logits - 1 / (2 * beta)) ** 2, rel_tol=1e-6)


def test_bradley_terry_loss():
    loss = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]))
    assert torch.allclose(loss, torch.tensor([-math.log(sigmoid(1.5)), -math.log(sigmoid(-2.0))]))


def test_sequence_logps_sums_masked_positions():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    labels = torch.tensor([[0, 1]])
    both = sequence_logps(logits, labels, torch.tensor([[1.0, 1.0]]))
    second = sequence_logps(logits, labels, torch.tensor([[0.0, 1.0]]))
    assert math.isclose(both.item(), math.log(0.5) + math.log(0.8), rel_tol=1e-6)
    assert math.isclose(second.item(), math.log(0.8), rel_tol=1e-6)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_is_clipped():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    values = torch.zeros(1, 2)
    pg, vf, clipfrac = ppo_losses(
        new, old, adv, values, values, values, mask, clip_range=0.2, clip_range_value=0.2
    )
    # token 1: max(-1*1.5, -1*1.2) = -1.2 ; token 2: max(1*0.5, 1*0.8) = 0.8
    assert math.isclose(pg.item(), (-1.2 + 0.8) / 2, rel_tol=1e-6)
    assert clipfrac.item() == 1.0
    assert vf.item() == 0.0


def test_ppo_value_loss_is_clipped_around_the_old_values():
    """0.5 * max((v - R)^2, (clip(v, v_old +- 0.2) - R)^2), the mean over unmasked tokens, by hand."""
    old_values = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    values = torch.tensor([[1.0, 1.1, -0.5, 2.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 0.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    zeros = torch.zeros(1, 4)
    _, vf, _ = ppo_losses(
        zeros, zeros, zeros, values, old_values, returns, mask, clip_range=0.2, clip_range_value=0.2
    )
    # token 1: v moved +1.0, clipped to 0.2: max((1 - 2)^2, (0.2 - 2)^2) = 3.24 (the clipped term is larger)
    # token 2: v moved +0.1, inside the range: (1.1 - 0)^2 = 1.21
    # token 3: v moved -0.5, clipped to -0.2: max((-0.5)^2, (-0.2)^2) = 0.25 (the unclipped term is larger)
    assert math.isclose(vf.item(), 0.5 * (3.24 + 1.21 + 0.25) / 3, rel_tol=1e-6)
    vf.backward()
    # The clipped term is flat in v (token 1); the others pull v toward R; padding gets nothing.
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1.1 / 3, -0.5 / 3, 0.0]]))


# ---------------------------------------------------------------------------------------------- GRPO
def test_group_advantages_are_relative_to_the_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    adv, std = group_advantages(rewards, 4, scale=True, eps=1e-4)
    # group 1: mean 0.5, unbiased std sqrt(((0.5^2) * 4) / 3) = sqrt(1/3); group 2: all equal
    s1 = math.sqrt(1 / 3)
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(std, torch.tensor([s1, 0.0]), atol=1e-6)
    unscaled, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO: r - mean only
    assert torch.allclose(unscaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_kl_k3_matches_hand_computation():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    expected = [math.exp(d) - d - 1 for d in (-0.5, 1.0, 0.0)]  # d = ref - logp
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([expected]), atol=1e-6)
    assert (kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()  # k3 is never negative


def test_grpo_loss_clips_the_ratio_in_the_direction_of_the_advantage():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))  # ratios 1.5, 0.5 in both rows
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = grpo_loss(new, old, adv, mask, epsilon=0.2)
    # row 0 (A=1): -min(1.5, 1.2) = -1.2 ; -min(0.5, 0.8) = -0.5
    # row 1 (A=-1): -min(-1.5, -1.2) = 1.5 ; -min(-0.5, -0.8) = 0.8
    assert math.isclose(loss.item(), ((-1.2 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2, rel_tol=1e-6)
    # clipped term active: row 0 token 0 (ratio > 1.2, A > 0), row 1 token 1 (ratio < 0.8, A < 0)
    assert stats["clip_ratio"].item() == 0.5
    assert stats["kl"].item() == 0.0  # no reference given


def test_grpo_loss_aggregations_and_kl_term():
    old = torch.zeros(2, 3)
    new = torch.zeros(2, 3)  # ratio 1 everywhere: the policy term is -A per token
    ref = torch.tensor([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # completions of 2 and 3 tokens
    beta = 0.1
    k = [[math.exp(0.5) - 0.5 - 1, 0.0, 0.0], [0.0, math.exp(-1.0) + 1.0 - 1, 0.0]]
    per = [[-2.0 + beta * k[0][0], -2.0 + beta * k[0][1]], [1.0 + beta * k[1][0], 1.0 + beta * k[1][1], 1.0]]
    total = sum(sum(r) for r in per)

    def run(loss_type: str) -> float:
        loss, stats = grpo_loss(
            new,
            old,
            adv,
            mask,
            epsilon=0.2,
            beta=beta,
            ref_logps=ref,
            loss_type=loss_type,
            max_completion_length=4,
        )
        assert math.isclose(stats["kl"].item(), (k[0][0] + k[1][1]) / 5, rel_tol=1e-6)
        return loss.item()

    assert math.isclose(run("grpo"), (sum(per[0]) / 2 + sum(per[1]) / 3) / 2, rel_tol=1e-6)
    assert math.isclose(run("dapo"), total / 5, rel_tol=1e-6)
    assert math.isclose(run("dr_grpo"), total / (2 * 4), rel_tol=1e-6)
    no_kl, _ = grpo_loss(new, old, adv, mask, epsilon=0.2, beta=0.0, ref_logps=ref, loss_type="dapo")
    assert math.isclose(no_kl.item(), (-2.0 * 2 + 1.0 * 3) / 5, rel_tol=1e-6)  # beta 0: no KL term


def test_grpo_loss_gradient_pushes_up_positive_advantages():
    new = torch.zeros(2, 1, requires_grad=True)
    loss, _ = grpo_loss(new, new.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1), epsilon=0.2)
    loss.backward()
    assert new.grad is not None and new.grad[0, 0] < 0 < new.grad[1, 0]  # descent raises row 0's logp


def test_grpo_loss_bad_options_are_named():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="loss_type='bnpo'"):
        grpo_loss(x, x, torch.zeros(1), x, epsilon=0.2, loss_type="bnpo")
    with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
        grpo_loss(x, x, torch.zeros(1), x, epsilon=0.2, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="beta=0.1 needs the reference"):
        grpo_loss(x, x, torch.zeros(1), x, epsilon=0.2, beta=0.1)


def test_dpo_packed_pairs_give_the_padded_log_probs_and_loss():
    """dpo.packing: the pairs' sequences packed into rows (doc_ids) give each response the log-prob, the
    DPO loss and the gradient of the padded batch, in fewer tokens. Fails if a sequence attends across a
    row boundary, positions do not restart, or a target is attributed to the wrong sequence."""
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.core.config import DPOConfig
    from tasks.data.chat_data import Pair, pair_batch
    from tasks.dpo import DirectPreference, pair_logps, pairs_batch

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64)
    )
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 128, (n,), generator=g).tolist()

    # uneven lengths: one long pair pads every short one in the padded layout
    pairs = [Pair(ids(p), ids(c), ids(r)) for p, c, r in [(30, 20, 9), (5, 3, 7), (8, 12, 2), (11, 4, 6)]]
    padded, packed = pairs_batch(pairs, 0, 0), pairs_batch(pairs, 0, 63)
    assert packed["x"].numel() < padded["tokens"][:, :-1].numel()
    assert packed["x"].shape[1] <= 63 and int(packed["doc_ids"].max()) >= 1  # several sequences a row
    with torch.no_grad():
        for a, b in zip(pair_logps(model, padded), pair_logps(model, packed), strict=True):
            assert torch.allclose(a, b, atol=1e-4), (a, b)
        # and each equals the sequence scored alone (no leak from the longest pair's padding or neighbours)
        alone = pair_logps(model, pair_batch(pairs[1:2], 0))
        assert torch.allclose(alone[0], pair_logps(model, packed)[0][1], atol=1e-4)

    ref = torch.randn(len(pairs), 2, generator=g) - 30.0
    cfg = DPOConfig()
    grads = []
    for width in (0, 63):
        objective = DirectPreference(pairs, ref, cfg, 0, pack_width=width)
        batch = objective._batch([0, 1, 2, 3])
        model.zero_grad()
        loss, metrics = objective.loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), metrics, model.layers[0].attn.q_proj.weight.grad.clone()))
    (l0, m0, g0), (l1, m1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-5)
    assert all(math.isclose(m0[k], m1[k], abs_tol=1e-4) for k in m0)
    assert torch.allclose(g0, g1, atol=1e-5)
    # tokens_in counts real tokens only, the same in both layouts
    padded_tokens = DirectPreference(pairs, ref, cfg, 0).tokens_in(padded)
    assert padded_tokens == DirectPreference(pairs, ref, cfg, 0, 63).tokens_in(packed)
    assert padded_tokens == sum(len(p.prompt) + len(r) for p in pairs for r in (p.chosen, p.rejected))
