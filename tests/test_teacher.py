"""Teacher modes: the frozen LoRA teacher stays the initial model, the live one follows."""

import pytest
import torch

from rlsd.schema.config import load_config
from rlsd.step.trainer import setup, train_step


def teacher_logps(run, batch):
    return run.teacher.logprobs(
        batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, run.device
    ).logps


def probe_batch(run):
    from rlsd.engine.rollout import Batch, completion_mask_from, left_pad

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
    from rlsd.engine.rollout import join

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
    from rlsd.schema.config import ConfigError

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
    from rlsd.engine.logprobs import TokenScorer
    from rlsd.engine.rollout import left_pad

    batch = probe_batch(run)
    p_ids, p_mask = left_pad(
        [run.renderer.student_ids(r) for r in run.records[:2]], run.tokenizer.pad_token_id
    )
    plain = batch.__class__(p_ids, p_mask, batch.completion_ids, batch.completion_mask)
    want = TokenScorer(run.teacher.external.lm)(*_joined(plain), plain.completion_mask)
    torch.testing.assert_close(teacher_logps(run, plain), want)


def test_passes_run_only_as_far_as_their_longest_completion(tiny_overrides):
    """The teacher pass, the old log-probs and the update's micro-batches cut a pass's
    completions at its longest one (the columns after it are padding in every row) and give
    the values of scoring the whole width, zeros at the padding included."""
    from rlsd.engine.rollout import Batch, completion_mask_from
    from rlsd.engine.teacher import trim_right, used_width, widen
    from rlsd.step.update import current_logps

    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert used_width(mask) == 2 and used_width(torch.zeros(2, 4, dtype=torch.bool)) == 1
    assert trim_right(torch.arange(8).view(2, 4), mask)[0].tolist() == [[0, 1], [4, 5]]
    assert widen(torch.ones(2, 2, 3), 4)[:, 2:].abs().sum() == 0
    assert widen(torch.ones(2, 2, 3), 4).shape == (2, 4, 3)

    sizes = {"teacher.batch_size": "2", "train.micro_batch_size": "2"}
    run = run_for({**tiny_overrides, **sizes, "train.share_prefix": "false"}, "live")
    eos = run.tokenizer.eos_token_id
    base = probe_batch(run)
    p_ids, p_mask = base.prompt_ids.repeat(2, 1), base.prompt_mask.repeat(2, 1)
    c_ids = torch.full((4, 9), 50)
    c_ids[0, 8], c_ids[1, 5], c_ids[2, 1], c_ids[3, 0] = eos, eos, eos, eos  # pass 2: 2 columns
    c_mask = completion_mask_from(c_ids, run.stop_ids)
    batch = Batch(p_ids, p_mask, c_ids.masked_fill(~c_mask, run.tokenizer.pad_token_id), c_mask)
    widths = []
    embed = run.scorer.lm.get_input_embeddings()
    embed.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    whole = run.scorer(*_joined(batch), batch.completion_mask).detach()
    full_width, widths[:] = widths[0], []
    for logps in (teacher_logps(run, batch), current_logps(run.policy, run.cfg, batch)):
        torch.testing.assert_close(logps, whole, rtol=1e-5, atol=1e-6)
        assert logps[2:, 2:].abs().sum() == 0 and logps[:2, 5:].abs().sum() > 0
    assert sorted(widths)[0] < full_width  # the second pass of each ran 7 columns fewer


def stopping_early(*args, **kwargs):
    """The rollout, with row i's completion cut after 1 + (3 i mod 11) tokens (the tiny random
    model never stops by itself): completions of many lengths."""
    from rlsd.engine.rollout import Batch, sample_completions

    batch = sample_completions(*args, **kwargs)
    width = batch.completion_ids.shape[1]
    lengths = torch.tensor([1 + (3 * i) % 11 for i in range(len(batch.completion_ids))])
    mask = batch.completion_mask & (torch.arange(width) < lengths.unsqueeze(1))
    ids = batch.completion_ids.masked_fill(~mask, args[3] if len(args) > 3 else 0)
    return Batch(batch.prompt_ids, batch.prompt_mask, ids, mask)


def _steps(overrides: dict, monkeypatch, trim: bool) -> tuple[list[dict], dict, list[bool]]:
    """Two training steps; with `trim` off every pass runs the batch's whole width. Also
    returns, per pass that could be cut, whether it was."""
    import rlsd.engine.teacher
    import rlsd.step.sampling
    import rlsd.step.update

    real, cuts = rlsd.engine.teacher.used_width, []

    def recorded(mask):
        width = real(mask) if trim else mask.shape[1]
        cuts.append(width < mask.shape[1])
        return width

    for module in (rlsd.engine.teacher, rlsd.step.update):
        monkeypatch.setattr(module, "used_width", recorded)
    monkeypatch.setattr(rlsd.step.sampling, "sample_completions", stopping_early)
    run = setup(load_config(None, overrides))
    metrics = [train_step(run, step) for step in (1, 2)]
    monkeypatch.undo()
    weights = {n: p.detach().clone() for n, p in run.scorer.named_parameters() if p.requires_grad}
    return metrics, weights, cuts


@pytest.mark.parametrize(
    "extra",
    [
        {"algorithm.name": "rlsd", "teacher.batch_size": "3"},
        {"algorithm.name": "opsd", "opsd.divergence": "topk", "train.ppo_epochs": "2"},
    ],
    ids=["rlsd-micro-batches", "opsd-topk-epochs"],
)
def test_training_with_cut_passes_equals_whole_width_passes(tiny_overrides, monkeypatch, extra):
    overrides = {**tiny_overrides, **extra, "train.micro_batch_size": "2"}
    cut, cut_weights, cuts = _steps({**overrides, "output.run_name": "cut"}, monkeypatch, True)
    whole, whole_weights, _ = _steps({**overrides, "output.run_name": "w"}, monkeypatch, False)
    assert any(cuts), "some pass ran fewer columns (else this compares nothing)"
    for a, b in zip(cut, whole):
        for key in a:
            if isinstance(a[key], float) and not key.startswith("perf/"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for name, tensor in cut_weights.items():  # float32 sums in another order, through Adam
        torch.testing.assert_close(tensor, whole_weights[name], rtol=1e-3, atol=1e-5)
