"""Teacher modes: the frozen LoRA teacher stays the initial model, the live one follows."""

import pytest
import torch

from rlsd.config import load_config
from rlsd.trainer import setup, train_step


def teacher_logps(run, batch):
    return run.teacher.logprobs(
        batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, run.device
    ).logps


def probe_batch(run):
    from rlsd.rollout import Batch, completion_mask_from, left_pad

    p_ids, p_mask = left_pad(
        [run.renderer.teacher_ids(r) for r in run.records[:2]], run.tokenizer.pad_token_id
    )
    c_ids = torch.tensor([[40, 41, 42, 43], [44, 45, run.tokenizer.eos_token_id, 0]])
    c_mask = completion_mask_from(c_ids, run.stop_ids)
    return Batch(p_ids, p_mask, c_ids, c_mask)


def run_for(overrides, mode):
    cfg = load_config(None, {**overrides, "teacher.mode": mode, "output.run_name": mode})
    return setup(cfg)


def test_frozen_lora_teacher_is_the_initial_model(tiny_overrides):
    run = run_for(tiny_overrides, "frozen")
    batch = probe_batch(run)
    before = teacher_logps(run, batch)
    student_before = run.scorer(*_joined(batch), batch.completion_mask).detach()
    torch.testing.assert_close(before, student_before)  # LoRA B starts at 0: same model
    for step in (1, 2, 3):
        train_step(run, step)
    assert torch.equal(teacher_logps(run, batch), before)
    student_after = run.scorer(*_joined(batch), batch.completion_mask).detach()
    assert not torch.allclose(student_after, student_before)


def test_live_teacher_moves_with_the_policy(tiny_overrides):
    run = run_for(tiny_overrides, "live")
    batch = probe_batch(run)
    before = teacher_logps(run, batch)
    for step in (1, 2, 3):
        train_step(run, step)
    after = teacher_logps(run, batch)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, run.scorer(*_joined(batch), batch.completion_mask).detach())


def test_frozen_full_finetune_teacher_keeps_a_copy(tiny_overrides):
    run = run_for({**tiny_overrides, "model.lora": "false"}, "frozen")
    batch = probe_batch(run)
    before = teacher_logps(run, batch)
    train_step(run, 1)
    train_step(run, 2)
    assert run.teacher.copy is not None
    assert torch.equal(teacher_logps(run, batch), before)


def _joined(batch):
    from rlsd.rollout import join

    return join(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)


@pytest.mark.parametrize("lora", ["true", "false"])
def test_sync_teacher_changes_exactly_every_n_steps(tiny_overrides, lora):
    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "teacher.mode": "sync",
            "teacher.sync_every": "2",
            "model.lora": lora,
            "output.run_name": f"sync{lora}",
        },
    )
    run = setup(cfg)
    batch = probe_batch(run)
    seen = []
    for step in range(1, 6):
        refreshed = run.teacher.maybe_sync(step)
        seen.append((refreshed, teacher_logps(run, batch)))
        run.teacher.maybe_sync = lambda s: False  # train_step must not refresh a second time
        train_step(run, step)
        del run.teacher.maybe_sync
    assert [r for r, _ in seen] == [True, False, True, False, True]
    same = [torch.equal(seen[i][1], seen[i + 1][1]) for i in range(4)]
    assert same == [True, False, True, False]  # constant within a period, new at steps 3 and 5
    student = run.scorer(*_joined(batch), batch.completion_mask).detach()
    run.teacher.maybe_sync(7)
    torch.testing.assert_close(teacher_logps(run, batch), student)  # a refresh copies the policy
    # scoring with the snapshot leaves the policy's own weights untouched
    torch.testing.assert_close(run.scorer(*_joined(batch), batch.completion_mask).detach(), student)


def test_external_teacher_with_another_tokenizer_is_refused(tiny_overrides, tmp_path):
    from rlsd.config import ConfigError

    from .conftest import build_model_dir

    other = build_model_dir(tmp_path / "other", tokenizer_vocab=350)
    cfg = load_config(
        None,
        {
            **tiny_overrides,
            "algorithm.name": "opd",
            "teacher.mode": "external",
            "teacher.model": str(other),
        },
    )
    with pytest.raises(ConfigError, match="teacher.model: its tokenizer differs"):
        setup(cfg)


def test_opd_scores_with_the_external_model_on_the_plain_prompt(tiny_overrides, tmp_path):
    from .conftest import build_model_dir

    other = build_model_dir(tmp_path / "teacher", seed=1)
    run = setup(
        load_config(
            None,
            {
                **tiny_overrides,
                "algorithm.name": "opd",
                "teacher.mode": "external",
                "teacher.model": str(other),
            },
        )
    )
    metrics = train_step(run, 1)
    assert metrics["opsd/reverse_kl"] != 0 and metrics["train/skipped_update"] == 0
    from rlsd.logprobs import TokenScorer
    from rlsd.rollout import left_pad

    batch = probe_batch(run)
    p_ids, p_mask = left_pad(
        [run.renderer.student_ids(r) for r in run.records[:2]], run.tokenizer.pad_token_id
    )
    plain = batch.__class__(p_ids, p_mask, batch.completion_ids, batch.completion_mask)
    want = TokenScorer(run.teacher.external.lm)(*_joined(plain), plain.completion_mask)
    torch.testing.assert_close(teacher_logps(run, plain), want)
