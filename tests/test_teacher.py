"""Teacher modes: the frozen LoRA teacher stays the initial model, the live one follows."""

import torch

from rlsd.config import load_config
from rlsd.trainer import setup, train_step


def teacher_logps(run, batch):
    return run.teacher.logprobs(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                batch.completion_mask, run.device)


def probe_batch(run):
    from rlsd.rollout import Batch, completion_mask_from, left_pad

    p_ids, p_mask = left_pad([run.renderer.teacher_ids(r) for r in run.records[:2]],
                             run.tokenizer.pad_token_id)
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
    assert run.teacher.frozen_copy is not None
    assert torch.equal(teacher_logps(run, batch), before)


def _joined(batch):
    from rlsd.rollout import join

    return join(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
