"""Two masks, never one: in an agent's episode the tool and environment tokens between the
model's turns are attended (`Batch.completion_attention`) but never trained or credited
(`Batch.completion_mask`). Checked by gradient through the real update, and through the
credit, the batch operations and the teacher pass."""

import torch

from rlsd.engine.rollout import Batch, concat_batches
from rlsd.schema.config import load_config
from rlsd.step.records import Rows
from rlsd.step.trainer import setup
from rlsd.step.update import Policy, credit, policy_update

ENV = [2, 3]  # completion columns holding the environment's reply


def episode_batch(run) -> Batch:
    """Two rows: [model, model, env, env, model, model(stop)], the second one a turn shorter."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 200, (2, 5), generator=gen)
    ids = torch.randint(3, 200, (2, 6), generator=gen)
    attention = torch.ones(2, 6, dtype=torch.bool)
    attention[1, 5] = False
    model = attention.clone()
    model[:, ENV] = False
    ids[1, 5] = run.tokenizer.pad_token_id
    return Batch(prompt, torch.ones_like(prompt, dtype=torch.bool), ids, model, attention)


class Capture(torch.nn.Module):
    """The policy's scorer, keeping each output's gradient for the test to read."""

    def __init__(self, scorer):
        super().__init__()
        self.inner, self.outputs, self.masks = scorer, [], []

    def forward(self, ids, attn, c_mask, *args, **kwargs):
        out = self.inner(ids, attn, c_mask, *args, **kwargs)
        out.retain_grad()
        self.outputs.append(out)
        self.masks.append(c_mask.clone())
        return out


def test_environment_tokens_are_attended_but_move_no_parameter(tiny_overrides):
    run = setup(load_config(None, {**tiny_overrides, "algorithm.name": "grpo"}))
    batch = episode_batch(run)
    spy = Capture(run.scorer)
    policy = Policy(spy, run.optimizer, run.accelerator, run.tokenizer.pad_token_id)
    rows = Rows(batch, torch.tensor([1.0, -1.0]))
    update = policy_update(policy, run.method, run.cfg, 1, rows, float(batch.completion_mask.sum()))
    [logps], [seen] = spy.outputs, spy.masks
    assert seen.tolist() == batch.attention.tolist()  # the forward ran every real token
    grad = logps.grad  # d loss / d log P(token): zero wherever the model did not sample
    assert grad[:, ENV].abs().sum() == 0 and grad[~batch.completion_mask].abs().sum() == 0
    assert (grad[batch.completion_mask] != 0).all()
    assert update.logps[:, ENV].abs().sum() == 0  # returned at the model's tokens only
    assert update.token_adv[:, ENV].abs().sum() == 0
    # the environment's tokens are attended: the model's next turn depends on them
    alone = Batch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        from rlsd.step.update import _scoring_inputs

        full = run.scorer(*_scoring_inputs(batch, slice(None), run.device))
        cut = run.scorer(*_scoring_inputs(alone, slice(None), run.device))
    assert not torch.allclose(full[0, 4:6], cut[0, 4:6])


def test_the_credit_and_the_teacher_see_the_model_tokens_only(tiny_overrides):
    run = setup(load_config(None, {**tiny_overrides, "algorithm.name": "rlsd"}))
    batch = episode_batch(run)
    logps = torch.randn(2, 6)
    teacher = logps + torch.randn(2, 6)  # a teacher that disagrees everywhere
    rows = Rows(batch, torch.tensor([1.0, -1.0]), teacher_logps=teacher)
    token_adv = credit(run.method, 1, rows, logps)
    assert token_adv[:, ENV].abs().sum() == 0 and token_adv[1, 5] == 0
    assert (token_adv[batch.completion_mask] != 0).all()
    from rlsd.step.scoring import scored_by, sequence_lengths

    prompts = [row.tolist() for row in batch.prompt_ids]
    scores = scored_by(run.scorers, run.teacher, prompts, batch)
    assert scores.logps[0, ENV].abs().sum() > 0  # scored over every real token
    assert sequence_lengths(prompts, batch) == (5 + 6, 5 + 5)  # tool text is forwarded too


def test_batch_operations_keep_both_masks():
    ids = torch.arange(8).view(2, 4)
    model = torch.tensor([[True, False, True, True], [True, True, False, False]])
    attention = torch.tensor([[True, True, True, True], [True, True, True, False]])
    batch = Batch(ids, torch.ones(2, 4, dtype=torch.bool), ids, model, attention)
    assert batch.select(torch.tensor([1])).attention.tolist() == [attention[1].tolist()]
    assert batch.cut(2).attention.tolist() == attention[:, :2].tolist()
    assert batch.cut(2).completion_mask.tolist() == model[:, :2].tolist()
    single = Batch(ids[:1, :2], torch.ones(1, 2, dtype=torch.bool), ids[:1, :2], model[:1, :2])
    assert single.attention is single.completion_mask  # one completion: the same tokens
    both = concat_batches([batch, single], pad_id=0)
    assert both.attention.tolist()[2] == [True, False, False, False]
    assert both.completion_mask.tolist()[:2] == model.tolist()
    assert concat_batches([single, single], pad_id=0).completion_attention is None
    rows = Rows(batch, torch.ones(2)).cut(3)
    assert rows.batch.attention.shape == (2, 3)
