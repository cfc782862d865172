"""The objective's formulas against hand-computed numbers and naive loop references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsd.algorithms import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    group_outcomes,
    lambda_at,
    rlsd_token_advantages,
)

SQ3 = math.sqrt(3.0)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv, metrics = group_advantages(rewards, 4, scale_std=True, eps=0.0)
    # the default, unbiased std (as the reference code and TRL): group 1 has mean 0.25 and
    # squared deviations 0.5625 + 3 x 0.0625 = 0.75, / (4 - 1) = 0.25, std 0.5: 0.75 / 0.5 = 1.5;
    # group 3: deviations +-0.5, 1.0 / 3, std 1/sqrt(3): +-sqrt(3)/2
    want = [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -SQ3 / 2, SQ3 / 2, -SQ3 / 2, SQ3 / 2]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    assert metrics["adv/zero_group_frac"] == pytest.approx(1 / 3)
    # population std (divide by 4): group 1's std is sqrt(0.1875), 0.75 / 0.433 = sqrt(3)
    adv, _ = group_advantages(rewards, 4, scale_std=True, eps=0.0, std="population")
    want = [SQ3, -1 / SQ3, -1 / SQ3, -1 / SQ3, 0, 0, 0, 0, -1, 1, -1, 1]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown std estimator"):
        group_advantages(rewards, 4, std="sample")


def test_all_equal_groups_are_exactly_zero_even_with_eps():
    adv, _ = group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.3]), 4, eps=1e-6)
    assert torch.equal(adv, torch.zeros(4))


def test_dr_grpo_does_not_scale_by_std():
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_group_outcomes_by_hand():
    # groups of 4: 4 correct, 0 correct, 1 correct, 3 correct
    flags = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1]
    shares = group_outcomes(torch.tensor(flags, dtype=torch.bool), 4)
    assert shares == {"all_correct": 0.25, "all_wrong": 0.25, "mixed": 0.5}
    assert group_outcomes(torch.ones(3, dtype=torch.bool), 1)["all_correct"] == 1.0
    for bad in (torch.zeros(6, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)):
        with pytest.raises(ValueError, match="groups of 4"):
            group_outcomes(bad, 4)


def rlsd_case():
    seq_adv = torch.tensor([2.0, -1.0])
    logps = torch.tensor([[-1.0, -2.0, -3.0, -1.0], [-1.0, -2.0, -3.0, -1.0]])
    delta = torch.tensor([0.1, -0.5, 0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    return seq_adv, logps, logps + delta, mask


def test_rlsd_token_advantages_by_hand():
    seq_adv, logps, teacher, mask = rlsd_case()
    token_adv, metrics = rlsd_token_advantages(seq_adv, logps, teacher, mask, 0.5, 0.2)
    # A > 0: w = exp(+delta) = [1.10517, 0.6065 -> 0.8, 1.6487 -> 1.2, 1]; m = 0.5 + 0.5 w
    # A < 0: w = exp(-delta) = [0.90484, 1.6487 -> 1.2, 0.6065 -> 0.8, 1]
    want = torch.tensor(
        [
            [2 * (0.5 + 0.5 * math.exp(0.1)), 1.8, 2.2, 2.0],
            [-(0.5 + 0.5 * math.exp(-0.1)), -1.1, -0.9, 0.0],
        ]
    )
    torch.testing.assert_close(token_adv, want)
    assert metrics["rlsd/clip_low_frac"] == pytest.approx(2 / 7)
    assert metrics["rlsd/clip_high_frac"] == pytest.approx(2 / 7)
    assert metrics["rlsd/lambda"] == 0.5
    assert metrics["rlsd/delta_mean"] == pytest.approx(
        (0.1 - 0.5 + 0.5 + 0.0 + 0.1 - 0.5 + 0.5) / 7
    )


def test_rlsd_lambda_zero_is_grpo_bit_for_bit():
    torch.manual_seed(0)
    seq_adv = torch.randn(6)
    logps, teacher = -torch.rand(6, 9) * 5, -torch.rand(6, 9) * 5
    mask = torch.rand(6, 9) > 0.3
    token_adv, _ = rlsd_token_advantages(seq_adv, logps, teacher, mask, 0.0, 0.2)
    assert torch.equal(token_adv, seq_adv.unsqueeze(1) * mask)


def test_teacher_equal_to_student_gives_unit_weights():
    seq_adv, logps, _, mask = rlsd_case()
    token_adv, metrics = rlsd_token_advantages(seq_adv, logps, logps.clone(), mask, 0.5, 0.2)
    assert torch.equal(token_adv, seq_adv.unsqueeze(1) * mask)
    assert metrics["rlsd/weight_mean"] == 1.0 and metrics["rlsd/delta_mean"] == 0.0


def test_rlsd_credit_carries_no_gradient():
    seq_adv, logps, teacher, mask = rlsd_case()
    logps = logps.clone().requires_grad_(True)
    token_adv, _ = rlsd_token_advantages(seq_adv, logps, teacher, mask, 0.5, 0.2)
    assert not token_adv.requires_grad


def naive_rlsd(seq_adv, logps, teacher, mask, lam, eps_w):
    out = torch.zeros_like(logps)
    for i in range(logps.shape[0]):
        a = float(seq_adv[i])
        sign = (a > 0) - (a < 0)
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            w = math.exp(sign * (float(teacher[i, t]) - float(logps[i, t])))
            w = min(max(w, 1 - eps_w), 1 + eps_w)
            out[i, t] = a * ((1 - lam) + lam * w)
    return out


def naive_loss(logps, old, token_adv, mask, eps_low, eps_high):
    total, count = 0.0, 0
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(float(logps[i, t]) - float(old[i, t]))
            a = float(token_adv[i, t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            total += -min(ratio * a, clipped * a)
            count += 1
    return total / count


def test_rlsd_and_loss_match_naive_loops_on_random_inputs():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        seq_adv = torch.randn(5, generator=gen, dtype=torch.float64)
        logps = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 4
        teacher = logps + torch.randn(5, 7, generator=gen, dtype=torch.float64) * 0.5
        old = logps + torch.randn(5, 7, generator=gen, dtype=torch.float64) * 0.3
        mask = torch.rand(5, 7, generator=gen) > 0.25
        token_adv, _ = rlsd_token_advantages(seq_adv, logps, teacher, mask, 0.7, 0.25)
        torch.testing.assert_close(token_adv, naive_rlsd(seq_adv, logps, teacher, mask, 0.7, 0.25))
        loss, _ = clipped_policy_loss(logps, old, token_adv, mask, 0.2, 0.28)
        assert loss.item() == pytest.approx(naive_loss(logps, old, token_adv, mask, 0.2, 0.28))


@settings(max_examples=200, deadline=None)
@given(  # no subnormal advantages: 5e-324 * 0.5 rounds to 0 in any float arithmetic
    st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=4, max_size=4),
    st.lists(st.floats(-20, 20), min_size=12, max_size=12),
    st.floats(0, 1),
    st.floats(0, 0.99),
)
def test_rlsd_never_flips_an_advantage_sign(adv, deltas, lam, eps_w):
    seq_adv = torch.tensor(adv, dtype=torch.float64)
    logps = torch.zeros(4, 3, dtype=torch.float64)
    teacher = torch.tensor(deltas, dtype=torch.float64).view(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    token_adv, _ = rlsd_token_advantages(seq_adv, logps, teacher, mask, lam, eps_w)
    assert torch.equal(torch.sign(token_adv), torch.sign(seq_adv).unsqueeze(1).expand(4, 3))
    nonzero = seq_adv != 0
    ratio = token_adv[nonzero] / seq_adv[nonzero].unsqueeze(1)  # the multiplier m_t
    assert bool(((ratio >= 1 - lam * eps_w - 1e-9) & (ratio <= 1 + lam * eps_w + 1e-9)).all())


def test_lambda_schedule_by_hand():
    values = [lambda_at(s, 0.5, warmup=10, decay=20) for s in (0, 5, 10, 20, 30, 40)]
    assert values == pytest.approx([0.0, 0.25, 0.5, 0.25, 0.0, 0.0])
    assert lambda_at(7, 0.5) == 0.5
    assert lambda_at(3, 0.5, warmup=4) == pytest.approx(0.375)
    assert lambda_at(30, 0.5, decay=60) == pytest.approx(0.25)


def test_clipped_loss_inside_and_outside_both_bounds():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    ratio = torch.tensor([[1.1, 1.5, 0.5, 1.5, 0.5]])
    old = torch.zeros(1, 5)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, metrics = clipped_policy_loss(ratio.log(), old, adv, mask, 0.2, 0.28)
    # inside: -1.1; above 1+eps_high with A>0: -1.28; below 1-eps_low with A<0: +0.8;
    # A<0 above the bound and A>0 below it stay unclipped (pessimistic): +1.5 and -0.5
    per_token = [-1.1, -1.28, 0.8, 1.5, -0.5]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert metrics["policy/clip_frac"] == pytest.approx(2 / 5)


def test_clipped_loss_gradient_is_minus_advantage_at_ratio_one():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = clipped_policy_loss(logps, logps.detach(), adv, mask, 0.2, 0.28)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, 0.5, 0.0]]))


def test_token_mean_uses_the_mask_and_the_given_normaliser():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate(per_token, mask, "token_mean", normaliser=10).item() == pytest.approx(0.7)
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "nope")


def test_policy_loss_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    logps = (-torch.rand(3, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old = logps.detach() + torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.05
    adv = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=gen) > 0.2
    assert torch.autograd.gradcheck(
        lambda x: clipped_policy_loss(x, old, adv, mask, 0.2, 0.28)[0], (logps,)
    )
