"""Post-training losses against hand computations of the papers' formulas on fixed numbers."""

import math

import torch

from tasks.train.losses import bradley_terry_loss, dpo_loss, gae, ppo_losses, sequence_logps


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
