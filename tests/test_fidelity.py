"""The reference recipe's loss details, by hand: the dual clip, and padding that never
produces NaN (values and gradients with +/-inf at the pads)."""

import math

import pytest
import torch

from rlsd.algorithms import (
    aggregate,
    clipped_policy_loss,
    method_for,
    opsd_token_advantages,
    rlsd_token_advantages,
    sampled_forward_token_advantages,
)
from rlsd.schema.config import Config, ConfigError, load_config


def loss_and_grad(ratio, adv, dual_clip):
    logps = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv_t = torch.tensor([[adv]], dtype=torch.float64)
    loss, metrics = clipped_policy_loss(logps, old, adv_t, mask, 0.2, 0.28, dual_clip=dual_clip)
    loss.backward()
    return loss.item(), logps.grad.item(), metrics


@pytest.mark.parametrize(
    "ratio, adv, dual, want_loss, want_grad, bound",
    [
        (5.0, -1.0, 3.0, 3.0, 0.0, True),  # the case: bounded at c |A|, no gradient
        (5.0, -1.0, 0.0, 5.0, 5.0, False),  # dual clip off: -A rho = 5, d/dlogp = -A rho = 5
        (2.0, -1.0, 3.0, 2.0, 2.0, False),  # below the bound: unchanged
        (4.0, -2.0, 3.0, 6.0, 0.0, True),  # bound c |A| = 6 < 8
        (5.0, 1.0, 3.0, -1.28, 0.0, False),  # A > 0: the usual clip (1 + eps_high), no dual clip
        (0.5, -1.0, 3.0, 0.8, 0.0, False),  # A < 0, rho below 1 - eps_low: clipped at 0.8
    ],
)
def test_dual_clip_by_hand(ratio, adv, dual, want_loss, want_grad, bound):
    loss, grad, metrics = loss_and_grad(ratio, adv, dual)
    assert loss == pytest.approx(want_loss)
    assert grad == pytest.approx(want_grad)
    assert metrics["policy/dual_clip_frac"] == (1.0 if bound else 0.0)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        loss_and_grad(2.0, -1.0, 0.5)
    with pytest.raises(ConfigError, match="algorithm.dual_clip: must be > 1"):
        load_config(None, {"algorithm.dual_clip": "0.9"})
    assert Config().algorithm.dual_clip == 3.0 and Config().algorithm.std == "unbiased"


def naive_dual_loss(logps, old, adv, mask, eps_low, eps_high, c):
    total, count = 0.0, 0
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            rho, a = math.exp(float(logps[i, t] - old[i, t])), float(adv[i, t])
            loss = max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
            if a < 0:
                loss = min(loss, -a * c)
            total, count = total + loss, count + 1
    return total / count


def test_dual_clip_matches_a_naive_loop():
    gen = torch.Generator().manual_seed(4)
    logps = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = logps - torch.randn(6, 5, generator=gen, dtype=torch.float64)  # ratios up to ~e^3
    adv = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=gen) > 0.2
    loss, metrics = clipped_policy_loss(logps, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    assert loss.item() == pytest.approx(naive_dual_loss(logps, old, adv, mask, 0.2, 0.28, 3.0))
    assert 0 < metrics["policy/dual_clip_frac"] < 1  # the case exercises the bound


def padded_case(pad_value):
    """Two rows of 3 tokens, the last token of row 1 padding, holding `pad_value` in every
    log-prob input (student, old, teacher)."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, pad_value]], dtype=torch.float64)
    teacher = torch.tensor([[-0.8, -2.5, -0.4], [-0.9, -1.0, pad_value]], dtype=torch.float64)
    return torch.tensor([1.0, -2.0], dtype=torch.float64), logps, teacher, mask


@pytest.mark.parametrize("pad", [float("-inf"), float("inf"), float("nan")])
def test_infinite_pads_give_the_clean_values_and_gradients(pad):
    seq_adv, clean, teacher_clean, mask = padded_case(-7.0)
    _, dirty, teacher_dirty, _ = padded_case(pad)

    def run(logps_in, teacher):
        logps = logps_in.clone().requires_grad_(True)
        token_adv, rlsd = rlsd_token_advantages(seq_adv, logps, teacher, mask, 0.5, 0.2)
        opsd, opsd_m = opsd_token_advantages(logps, teacher, mask)
        forward = sampled_forward_token_advantages(logps, teacher, mask)
        loss, _ = clipped_policy_loss(
            logps,
            logps.detach(),
            token_adv + opsd + forward,
            mask,
            0.2,
            0.28,
            "seq_mean_token_mean",
            dual_clip=3.0,
        )
        loss = loss + aggregate(logps, mask, "token_mean")
        loss.backward()
        return [token_adv, opsd, forward, loss.detach(), logps.grad], {**rlsd, **opsd_m}

    want, want_m = run(clean, teacher_clean)
    got, got_m = run(dirty, teacher_dirty)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert got_m == pytest.approx(want_m)


@pytest.mark.parametrize("name", ["grpo", "rlsd", "opsd", "grpo_opsd", "opd"])
def test_every_method_ignores_infinite_pads(name):
    cfg = load_config(
        None,
        {
            "algorithm.name": name,
            **({"teacher.mode": "external", "teacher.model": "x"} if name == "opd" else {}),
        },
    )
    method = method_for(cfg)
    seq_adv, clean, teacher_clean, mask = padded_case(-7.0)
    _, dirty, teacher_dirty, _ = padded_case(float("-inf"))
    want = method.token_advantages(1, seq_adv, clean, teacher_clean, mask)
    got = method.token_advantages(1, seq_adv, dirty, teacher_dirty, mask)
    torch.testing.assert_close(got, want)
    assert bool((got[~mask] == 0).all())


def test_config_defaults_are_not_shared():
    a, b = Config(), Config()
    a.data.task_params["operators"].append("*")
    a.model.lora_target_modules.append("lm_head")
    assert b.data.task_params["operators"] == ["+", "-"]
    assert "lm_head" not in b.model.lora_target_modules
    assert Config().data.task_params["operators"] == ["+", "-"]


def training_loss(cfg, logps, mask, old, token_adv, ref=None):
    """The loss and the log-prob gradient of one micro-batch as training computes it
    (`update.micro_batch_loss`), with a stand-in scorer that returns `logps`."""
    from types import SimpleNamespace

    from rlsd.engine.rollout import Batch
    from rlsd.step.records import Rows
    from rlsd.step.update import Policy, micro_batch_loss

    n, width = mask.shape
    leaf = logps.clone().requires_grad_(True)
    prompt = torch.ones(n, 1, dtype=torch.long)
    batch = Batch(prompt, prompt.bool(), torch.ones(n, width, dtype=torch.long), mask)
    rows = Rows(batch, token_adv[:, 0], ref_logps=ref, old_logps=old, token_adv=token_adv)
    policy = Policy(
        lambda ids, attn, c_mask, share_prefix: leaf[:, : c_mask.shape[1]],
        None,
        SimpleNamespace(device=torch.device("cpu")),
        0,
    )
    sums = {"clipped": 0.0, "dual_clipped": 0.0, "policy/kl_ref": 0.0}
    normaliser = float(mask.sum())
    loss, _, _ = micro_batch_loss(policy, method_for(cfg), cfg, 1, rows, normaliser, sums)
    loss.backward()
    return loss.detach(), leaf.grad, sums


@pytest.mark.parametrize("pad", [float("-inf"), float("inf"), float("nan")])
def test_the_kl_penalty_ignores_infinite_pads(pad):
    """The k3 KL term to the reference, with +/-inf or NaN at a padded position of the policy's
    and the reference's log-probs: the same loss and a finite, equal gradient (its arithmetic
    is masked before it is computed, as in every other pure function)."""
    cfg = load_config(None, {"algorithm.name": "grpo", "algorithm.kl_coef": "0.1"})
    seq_adv, clean, ref_clean, mask = padded_case(-7.0)
    _, dirty, ref_dirty, _ = padded_case(pad)
    token_adv = seq_adv[:, None].expand_as(mask).clone()
    want = training_loss(cfg, clean, mask, clean, token_adv, ref_clean)
    got = training_loss(cfg, dirty, mask, clean, token_adv, ref_dirty)
    assert torch.isfinite(got[1]).all() and got[2]["policy/kl_ref"] > 0
    torch.testing.assert_close(got[:2], want[:2])
    assert got[2] == pytest.approx(want[2])


def test_a_direct_call_of_the_policy_loss_equals_trainings_loss():
    """The pure function's defaults are the config's: called with the clip bounds alone it
    gives the loss training computes under the default config, dual clip (3.0) included."""
    cfg = Config()
    gen = torch.Generator().manual_seed(5)
    logps = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    old = logps - 2.0 * torch.rand(4, 5, generator=gen, dtype=torch.float64)  # ratios up to e^2
    token_adv = -torch.rand(4, 5, generator=gen, dtype=torch.float64)  # penalised tokens
    mask = torch.tensor([[True] * 5, [True] * 4 + [False], [True] * 2 + [False] * 3, [True] * 5])
    alg = cfg.algorithm
    trained, _, sums = training_loss(cfg, logps, mask, old, token_adv)
    assert sums["dual_clipped"] > 0  # the case exercises the dual clip
    direct, _ = clipped_policy_loss(logps, old, token_adv, mask, alg.eps_low, alg.eps_high)
    torch.testing.assert_close(direct, trained)
