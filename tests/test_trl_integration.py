"""RLSD inside TRL's GRPOTrainer (rlsd.integrations.trl) on the tiny model, on the CPU.

Every trainer here: 2 prompts x 4 completions of at most 8 tokens, fp32, seed 0, no KL term. The
reward is the parity of the first sampled token, so every group has mixed rewards (non-zero
advantages) whatever the random model samples.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rlsd.algorithms.rlsd import rlsd_token_advantages
from rlsd.engine.context import Context
from rlsd.engine.runfiles import read_jsonl
from rlsd.integrations import trl as rlsd_trl
from rlsd.integrations.trl import RLSDConfig, RLSDDataError, RLSDGRPOTrainer
from rlsd.integrations.trl_memory import memory_key
from rlsd.integrations.trl_teacher import TRL_TEACHER_TEMPLATE
from rlsd.report.html import write_report
from rlsd.schema.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("Calculate 12 + 7.", "12 + 7 = 19. Answer: 19"), ("What is 3 - 5?", "Answer: -2")]


def rows() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": q}], "solution": s, "teacher": q}
        for q, s in QUESTIONS
    ]


def first_token_parity(completion_ids, **kwargs) -> list[float]:
    return [float(ids[0] % 2) for ids in completion_ids]


def common(tmp_path: Path, **overrides) -> dict:
    return {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "beta": 0.0,
        "temperature": 1.0,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "disable_tqdm": True,
        "shuffle_dataset": False,
        **overrides,
    }


def build(
    model_dir, tmp_path, cls=RLSDGRPOTrainer, data=None, callbacks=None, peft=None, **overrides
):
    config = RLSDConfig if cls is RLSDGRPOTrainer else GRPOConfig
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return cls(
        model=model,
        reward_funcs=[first_token_parity],
        args=config(**common(tmp_path, **overrides)),
        train_dataset=Dataset.from_list(data if data is not None else rows()),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft,
    )


def rollout(trainer) -> dict:
    """One seeded rollout batch through the trainer's hook (train mode), as TRL's loop makes it."""
    trainer.model.train()
    batch = [row for row in trainer.train_dataset for _ in range(4)]
    torch.manual_seed(123)
    return trainer._generate_and_score_completions(batch)


def loss_and_grads(trainer, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, outside it here
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def completion_logps(model, prompt_ids, prompt_mask, batch) -> torch.Tensor:
    """log P(y_t) of the batch's completion ids after the prompts: a plain forward and
    log-softmax, independent of TRL's fused head."""
    completion = batch["completion_ids"]
    ids = torch.cat([prompt_ids, completion], dim=1)
    attention = torch.cat([prompt_mask, batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    logits = logits[:, prompt_ids.shape[1] - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def left_padded(lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, lists))
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in lists])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in lists])
    return ids, mask


def test_trains_two_steps_logs_rlsd_metrics_and_writes_rlsd_run_files(tiny_model_dir, tmp_path):
    log_dir = tmp_path / "rlsd"
    trainer = build(
        tiny_model_dir,
        tmp_path,
        rlsd_log_dir=str(log_dir),
        rlsd_log_samples=0,
        rlsd_lambda_decay_steps=4,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    assert [entry["rlsd/lambda"] for entry in logged] == [0.375, 0.25]  # step = global_step + 1
    for entry in logged:
        assert entry["teacher/context_reference_frac"] == 1.0
        assert entry["rlsd/delta_std"] > 0 and torch.isfinite(torch.tensor(entry["loss"]))
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())

    samples = read_jsonl(log_dir / "samples.jsonl")  # the loader `rlsd report` uses
    assert [s["step"] for s in samples] == [1] * 8 + [2] * 8
    first = samples[0]
    assert first["prompt"] == QUESTIONS[0][0] and first["answer"] == QUESTIONS[0][1]
    assert len(first["token_advantage"]) == len(first["token_ids"]) > 0
    assert QUESTIONS[0][1] in first["teacher_prompt"]
    assert first["teacher_context_kind"] == "reference"
    assert any(s["advantage"] != 0 and "credit_multiplier" in s for s in samples)
    assert read_jsonl(log_dir / "metrics.jsonl")[0]["rlsd/lambda"] == 0.375
    page = write_report(log_dir, tokenizer=trainer.processing_class).read_text()
    assert 'id="heatmap"' in page and "No logged completion carries" not in page


def test_lambda_zero_gives_grpo_loss_and_gradients_bit_for_bit(tiny_model_dir, tmp_path):
    ours = build(tiny_model_dir, tmp_path, rlsd_lambda=0.0)
    plain = build(tiny_model_dir, tmp_path, cls=GRPOTrainer)
    mine, theirs = rollout(ours), rollout(plain)
    assert torch.equal(mine["completion_ids"], theirs["completion_ids"])
    assert mine["advantages"].shape == mine["completion_ids"].shape  # (B, T) against (B,)
    assert (theirs["advantages"] != 0).any()
    loss, grads = loss_and_grads(ours, mine)
    plain_loss, plain_grads = loss_and_grads(plain, theirs)
    assert torch.equal(loss, plain_loss)  # 0 here: on-policy, equal lengths, sum(A) = 0
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    assert any(g.abs().sum() > 0 for g in grads.values())
    for trainer in (ours, plain):  # and two whole steps through TRL's loop
        trainer.model.zero_grad()
        torch.manual_seed(0)
        trainer.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (ours, plain)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for (name, p), q in zip(ours.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), name


def test_token_advantages_equal_rlsd_token_advantages_on_a_fixed_batch(tiny_model_dir, tmp_path):
    lam, eps_w = 1.0, 0.9  # wide clip: each token's weight is exp(sign(A) * Delta) itself
    ours = build(tiny_model_dir, tmp_path, rlsd_lambda=lam, rlsd_eps_w=eps_w)
    plain = build(tiny_model_dir, tmp_path, cls=GRPOTrainer)
    batch, reference = rollout(ours), rollout(plain)
    tokenizer, model = ours.processing_class, ours.model
    student = completion_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch)
    teacher_ids = []
    for question, solution in QUESTIONS:
        text = (
            f"{question}\n\nHere is a reference solution:\n{solution}\n\nAfter understanding "
            "the reference solution, solve the problem in your own way."
        )
        message = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)
        teacher_ids += [list(ids["input_ids"] if hasattr(ids, "keys") else ids)] * 4
    t_ids, t_mask = left_padded(teacher_ids, tokenizer.pad_token_id)
    teacher = completion_logps(model, t_ids, t_mask, batch)
    mask = batch["completion_mask"]
    expected, _ = rlsd_token_advantages(reference["advantages"], student, teacher, mask, lam, eps_w)
    torch.testing.assert_close(batch["advantages"], expected, atol=2e-5, rtol=1e-4)
    flat = reference["advantages"].unsqueeze(1).expand_as(expected)
    assert (expected - flat)[mask.bool()].abs().max() > 1e-3  # the teacher did move the credit


@pytest.mark.parametrize("option", ["rlsd_negative_only", "rlsd_thought_only"])
def test_negative_only_and_thought_only_keep_grpo_credit_where_documented(
    tiny_model_dir, tmp_path, option
):
    # thought_only with tags no completion holds: no token lies in a reasoning span
    tags = {"rlsd_thought_open": "<reason>", "rlsd_thought_close": "</reason>"}
    extra = tags if option == "rlsd_thought_only" else {}
    trainer = build(tiny_model_dir, tmp_path, rlsd_lambda=1.0, **{option: True}, **extra)
    batch = rollout(trainer)
    grpo = torch.tensor(list(trainer._logs["advantages"])[-8:])
    mask = batch["completion_mask"].bool()
    uniform = grpo.unsqueeze(1).expand_as(batch["advantages"]).masked_fill(~mask, 0.0)
    same = (batch["advantages"] == uniform).all(dim=1)
    if option == "rlsd_negative_only":
        assert same[grpo > 0].all() and not same[grpo < 0].any()
    else:
        assert same.all() and trainer._metrics["train"]["rlsd/multiplier_mean_answer"] == [1.0]
        assert trainer._metrics["train"]["rlsd/reweighted_frac"] == [0.0]


def test_a_teacher_prompt_equal_to_the_students_gives_delta_zero(tiny_model_dir, tmp_path):
    trainer = build(
        tiny_model_dir,
        tmp_path,
        rlsd_lambda=1.0,
        rlsd_teacher_prompt_column="teacher",
        rlsd_privileged=False,
    )
    batch = rollout(trainer)
    grpo = torch.tensor(list(trainer._logs["advantages"])[-8:])  # TRL's own (B,) advantages
    mask = batch["completion_mask"].bool()
    expected = grpo.unsqueeze(1).expand_as(batch["advantages"]).masked_fill(~mask, 0.0)
    assert torch.equal(batch["advantages"], expected) and (grpo != 0).any()
    assert trainer._metrics["train"]["rlsd/delta_mean"] == [0.0]
    assert trainer._metrics["train"]["rlsd/delta_std"] == [0.0]


def test_the_preflight_refuses_a_teacher_prompt_equal_to_the_students(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="teacher's prompt equals the student's"):
        build(tiny_model_dir, tmp_path, rlsd_teacher_prompt_column="teacher")
    with pytest.raises(ConfigError, match="does not contain its context"):
        build(tiny_model_dir, tmp_path, rlsd_teacher_template="{{ prompt }} (think hard)")
    hides_memory = "{{ prompt }} ({% if context_kind == 'reference' %}{{ context }}{% endif %})"
    with pytest.raises(ConfigError, match="does not contain its context"):
        build(
            tiny_model_dir,
            tmp_path,
            rlsd_context=["reference", "memory"],
            rlsd_teacher_template=hides_memory,
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rlsd_reference_column": "worked"}, "rlsd_reference_column='worked': the training"),
        ({"rlsd_teacher_prompt_column": "hint"}, "rlsd_teacher_prompt_column='hint': the"),
    ],
)
def test_a_missing_column_fails_naming_it(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(RLSDDataError, match=message) as caught:
        build(tiny_model_dir, tmp_path, **overrides)
    assert "its columns: prompt, solution, teacher" in str(caught.value)
    data = [{**row, "solution": ""} for row in rows()]
    with pytest.raises(RLSDDataError, match="row 0 has no reference"):
        build(tiny_model_dir, tmp_path, data=data)


def test_the_sync_teacher_refreshes_at_the_documented_steps_and_resumes(tiny_model_dir, tmp_path):
    after_step: dict[int, torch.Tensor] = {}

    class Weights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            after_step[state.global_step] = model.lm_head.weight.detach().clone()

    sync = {"rlsd_teacher_mode": "sync", "rlsd_sync_every": 2}
    saving = {"save_strategy": "steps", "save_steps": 3}
    trainer = build(tiny_model_dir, tmp_path, callbacks=[Weights()], max_steps=5, **sync, **saving)
    initial = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert trainer.rlsd_sync_steps == [0, 2, 4]
    teacher = trainer._rlsd_teacher.lm_head.weight
    assert torch.equal(teacher, after_step[4]) and not torch.equal(teacher, after_step[5])
    assert not torch.equal(after_step[2], initial)

    checkpoint = tmp_path / "out" / "checkpoint-3"
    state = json.loads((checkpoint / "rlsd_state.json").read_text())
    assert state == {"sync_steps": [0, 2]}
    resumed = build(tiny_model_dir, tmp_path, max_steps=3, **sync)  # nothing left to train
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.rlsd_sync_steps == [0, 2]
    assert torch.equal(resumed._rlsd_teacher.lm_head.weight, after_step[2])


def test_the_frozen_teacher_is_the_initial_policy_with_or_without_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for peft in (lora, None):
        trainer = build(
            tiny_model_dir, tmp_path, peft=peft, rlsd_teacher_mode="frozen", learning_rate=0.1
        )
        trainer.train()  # two steps move the policy (the adapter, or every weight)
        batch = rollout(trainer)
        prompts = [row["prompt"] for row in trainer.train_dataset for _ in range(4)]
        teacher = trainer._rlsd_teacher_logps(prompts, batch)  # the student's prompts
        initial = completion_logps(base, batch["prompt_ids"], batch["prompt_mask"], batch)
        now = completion_logps(trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch)
        mask = batch["completion_mask"].bool()
        torch.testing.assert_close(teacher[mask], initial[mask], atol=2e-5, rtol=1e-4)
        assert (now - initial)[mask].abs().max() > 1e-3, peft


def test_sibling_context_is_the_shortest_correct_other_completion(tiny_model_dir, tmp_path):
    trainer = build(tiny_model_dir, tmp_path, rlsd_context=["sibling", "reference"])
    inputs = [row for row in rows() for _ in range(4)]
    lengths = [5, 3, 2, 2, 4, 4, 4, 4]
    ids = torch.tensor([[40 + i] * n + [0] * (5 - n) for i, n in enumerate(lengths)])
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    trainer._rlsd_rewards = torch.tensor([[1.0], [0], [1], [1], [0], [1], [0], [0]])
    contexts, prompts = trainer._rlsd_teacher_prompts(
        inputs, {"completion_ids": ids, "completion_mask": mask}, "train"
    )
    text = trainer.processing_class.decode
    # group 0 (correct 0, 2, 3): each row gets the shortest correct other, ties to the lowest
    # index; group 1's only correct completion (5) has no sibling and falls to the reference
    chosen = [2, 2, 3, 2, 5, None, 5, 5]
    for row, pick in enumerate(chosen):
        if pick is None:
            assert contexts[row].kind == "reference" and contexts[row].text == QUESTIONS[1][1]
        else:
            assert contexts[row].kind == "sibling"
            assert contexts[row].text == text(ids[pick][: lengths[pick]])
            assert contexts[row].text in prompts[row][-1]["content"]
    assert prompts[0][-1]["content"].startswith(QUESTIONS[0][0])
    assert "a correct solution written earlier" in prompts[0][-1]["content"]


def hand_rollout(trainer, lengths: list[int], rewards: list[float], first_id: int) -> tuple:
    """Contexts and teacher prompts of a made-up rollout of the two prompts (row i's tokens:
    `first_id + i`, `lengths[i]` of them), then the memory's offer; and the completions' text."""
    inputs = [row for row in rows() for _ in range(4)]
    ids = torch.tensor([[first_id + i] * n + [0] * (6 - n) for i, n in enumerate(lengths)])
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    trainer._rlsd_rewards = torch.tensor(rewards).unsqueeze(1)
    contexts, prompts = trainer._rlsd_teacher_prompts(
        inputs, {"completion_ids": ids, "completion_mask": mask}, "train"
    )
    metrics = trainer._rlsd_remember("train", trainer.state.global_step + 1)
    texts = [trainer.processing_class.decode(ids[i][:n]) for i, n in enumerate(lengths)]
    return contexts, prompts, metrics, texts


def test_memory_context_is_the_best_earlier_correct_completion(tiny_model_dir, tmp_path):
    trainer = build(tiny_model_dir, tmp_path, rlsd_context=["memory", "reference"])
    # rollout 1: nothing stored before it, so every row falls to the reference; prompt 0's
    # correct rows 0 (reward 1.0, 2 tokens), 2 (1.5, 5) and 3 (1.5, 4) are offered in row
    # order, each beating the last (reward first, then fewer tokens); prompt 1 has none
    contexts, _, metrics, texts = hand_rollout(
        trainer, [2, 3, 5, 4, 1, 2, 3, 4], [1.0, 0, 1.5, 1.5, 0, 0, 0, 0], 40
    )
    assert [c.kind for c in contexts] == ["reference"] * 8
    assert metrics == {"memory/size": 0.0, "memory/hit_frac": 0.0, "memory/stored": 3.0}
    key = memory_key(rows()[0]["prompt"])
    assert key == '[{"content": "Calculate 12 + 7.", "role": "user"}]'
    assert trainer.rlsd_memory.state_dict() == [
        {"key": key, "text": texts[3], "reward": 1.5, "length": 4, "step": 1}
    ]
    # rollout 2: prompt 0's rows see row 3 of rollout 1, prompt 1's still the reference; its
    # own row 0 (reward 1.5, 3 tokens) is shorter and replaces it, for later rollouts only;
    # a shorter completion of lower reward (row 1) does not
    contexts, prompts, metrics, _ = hand_rollout(
        trainer, [3, 1, 2, 2, 2, 2, 2, 2], [1.5, 1.0, 0, 0, 1, 0, 0, 0], 50
    )
    assert contexts[:4] == [Context("memory", texts[3])] * 4
    assert [c.kind for c in contexts[4:]] == ["reference"] * 4
    assert texts[3] in prompts[0][-1]["content"]
    assert "a correct solution written earlier" in prompts[0][-1]["content"]
    assert metrics == {"memory/size": 1.0, "memory/hit_frac": 0.5, "memory/stored": 2.0}
    best = trainer.rlsd_memory.get(key)
    shorter = trainer.processing_class.decode([50] * 3)
    assert (best.text, best.reward, best.length, best.step) == (shorter, 1.5, 3, 1)
    assert len(trainer.rlsd_memory) == 2
    assert trainer._rlsd_remember("eval", 3)["memory/size"] == 2.0  # eval rollouts: not offered
    assert "memory/stored" not in trainer._rlsd_remember("eval", 3)


def test_memory_is_logged_saved_in_checkpoints_and_restored(tiny_model_dir, tmp_path):
    memory = {"rlsd_context": ["memory", "reference"], "rlsd_memory_size": 8}
    saving = {"save_strategy": "steps", "save_steps": 1}
    trainer = build(tiny_model_dir, tmp_path, **memory, **saving)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # step 1 finds the memory empty; each prompt's group has a correct completion (mixed
    # parity), so step 2 sees a memory for every row
    assert [e["memory/size"] for e in logged] == [0.0, 2.0]
    assert [e["memory/hit_frac"] for e in logged] == [0.0, 1.0]
    assert [e["teacher/context_memory_frac"] for e in logged] == [0.0, 1.0]
    assert [e["teacher/context_reference_frac"] for e in logged] == [1.0, 0.0]
    assert logged[0]["memory/stored"] >= 2
    saved = trainer.rlsd_memory.state_dict()
    assert len(saved) == 2 and {e["step"] for e in saved} <= {1, 2}
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "rlsd_state.json").read_text())
    assert state == {"context_memory": saved}  # live teacher: no sync state, no teacher file
    assert not (tmp_path / "out" / "checkpoint-2" / "rlsd_teacher.safetensors").exists()
    first = json.loads((tmp_path / "out" / "checkpoint-1" / "rlsd_state.json").read_text())
    assert [e["step"] for e in first["context_memory"]] == [1, 1]
    resumed = build(tiny_model_dir, tmp_path, **memory)  # max_steps 2: nothing left to train
    assert len(resumed.rlsd_memory) == 0
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.rlsd_memory.state_dict() == saved
    assert list(resumed.rlsd_memory.entries) == list(trainer.rlsd_memory.entries)  # order too


@pytest.mark.parametrize(
    ("overrides", "rollouts_at"),
    [
        ({"num_iterations": 2}, [0]),  # one rollout, two optimizer steps over it
        ({"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}, [0, 1]),
    ],
)
def test_the_credit_is_computed_once_per_rollout_batch(
    tiny_model_dir, tmp_path, overrides, rollouts_at
):
    trainer = build(tiny_model_dir, tmp_path, **overrides)
    calls = []
    hook = trainer._rlsd_teacher_logps

    def counted(prompts, output):
        calls.append(trainer.state.global_step)
        return hook(prompts, output)

    trainer._rlsd_teacher_logps = counted
    trainer.train()
    assert calls == rollouts_at and trainer.state.global_step == 2
    for part in trainer._buffered_inputs:  # TRL's buffer, split after the credit was set
        assert part["advantages"].shape == part["completion_ids"].shape


def test_config_checks_name_the_field_and_the_trl_range_matches_the_extra():
    with pytest.raises(ConfigError, match="rlsd_teacher_mode='external'"):
        RLSDConfig(output_dir="x", use_cpu=True, rlsd_teacher_mode="external")
    for sources in (["notes"], ["sibling", "sibling"], []):
        with pytest.raises(ConfigError, match="rlsd_context=.*: must list each of reference"):
            RLSDConfig(output_dir="x", use_cpu=True, rlsd_context=sources)
    with pytest.raises(ConfigError, match="rlsd_memory_size=0: must be >= 1"):
        RLSDConfig(output_dir="x", use_cpu=True, rlsd_memory_size=0)
    accepted = RLSDConfig(output_dir="x", use_cpu=True, rlsd_context=["memory", "sibling"])
    assert accepted.rlsd_memory_size == 4096
    with pytest.raises(ImportError, match="supports TRL >=1.16,<1.17, found TRL 1.15.2"):
        rlsd_trl.check_trl_version("1.15.2")
    rlsd_trl.check_trl_version("1.16.0")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pin = f"trl>={rlsd_trl.TRL_MIN},<{rlsd_trl.TRL_BELOW}"
    assert extras["trl"] == [pin]
    assert "rlsd[trl]" in extras["test"]
    assert "{{ context }}" in TRL_TEACHER_TEMPLATE


def run_script(text: str, where: str, changes: list, tmp_path: Path, monkeypatch) -> dict:
    """The first python block of `text`, with each (old, new) change (old must be there: the
    script still says what the test assumes), run in tmp_path; returns its namespace."""
    script = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    for old, new in changes:
        assert old in script, old
        script = script.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, where, "exec"), namespace)
    return namespace


def test_the_documented_script_runs(tiny_model_dir, tmp_path, monkeypatch):
    changes = [
        ('MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"', f"MODEL = {str(tiny_model_dir)!r}"),
        ("range(2, 40)", "range(2, 3)"),
        ("max_completion_length=128", "max_completion_length=8, use_cpu=True, bf16=False"),
        ("max_steps=60", "max_steps=1"),
        ("num_generations=8", "num_generations=4"),
    ]
    text = (ROOT / "docs" / "trl.md").read_text()
    trainer = run_script(text, "docs/trl.md", changes, tmp_path, monkeypatch)["trainer"]
    assert trainer.state.global_step == 1 and trainer.rlsd_sync_steps == [0]
    assert (tmp_path / "rlsd-trl-run" / "rlsd" / "samples.jsonl").is_file()


def test_the_minimal_script_runs(tiny_model_dir, tmp_path, monkeypatch):
    changes = [
        ('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tiny_model_dir))),
        ("range(2, 40)", "range(2, 3)"),
        ("max_steps=60", "max_steps=1"),
        ("num_generations=8,", "num_generations=4, max_completion_length=8, use_cpu=True,"),
    ]
    text = (ROOT / "docs" / "trl.md").read_text()
    section = text[text.index("## A minimal script") :]
    namespace = run_script(section, "docs/trl.md", changes, tmp_path, monkeypatch)
    assert namespace["trainer"].state.global_step == 1
    samples = (tmp_path / "rlsd-trl-run" / "rlsd" / "samples.jsonl").read_text().splitlines()
    assert samples and all(json.loads(line)["step"] == 1 for line in samples)
