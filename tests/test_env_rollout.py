"""Agents' episodes on a model (issue 36): the `env` config section, and the adapter between the
environments (`rlsd.engine.envs`) and multi-turn decoding (`rlsd.engine.episodes`):
`rlsd.engine.envs.rollout`. The token alignment is checked against the chat template's
rendering of the whole conversation; the two masks against what the model and the environment
wrote; failures and truncations against the counts."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch

from rlsd.engine.data import Record, chat_ids
from rlsd.engine.envs import StepResult
from rlsd.engine.envs.calls import render_call, render_results
from rlsd.engine.envs.chat import tool_stop_ids
from rlsd.engine.envs.rollout import EnvSetup, build_environment, episode_rewards, sample_episodes
from rlsd.schema.config import ConfigError, load_config
from rlsd.schema.sections_env import EnvConfig

from .conftest import build_tokenizer

# ----------------------------------------------------------------------------- the env section


def test_the_env_section_defaults_to_no_environment():
    cfg = load_config(None, {})
    assert not cfg.env.active and cfg.env.environment == "" and cfg.env.tools == []


def test_a_built_in_or_a_spec_loads():
    grpo = {"algorithm.name": "grpo"}  # agents train with grpo for now
    cfg = load_config(None, {**grpo, "env.environment": "calculator", "env.max_turns": "4"})
    assert cfg.env.active and cfg.env.max_turns == 4
    cfg = load_config(None, {**grpo, "env.tools": "[tools.py:lookup, pkg.mod:f]"})
    assert cfg.env.tools == ["tools.py:lookup", "pkg.mod:f"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"env.environment": "calculator", "env.tools": "[a.py:f]"}, "env.environment"),
        ({"env.environment": "no_such_builtin"}, "env.environment"),
        ({"env.environment": "file.py:"}, "env.environment"),
        ({"env.tools": "[just_a_name]"}, "env.tools[0]"),
        ({"env.tools": "[a.py:f, a.py:f]"}, "env.tools"),
        ({"env.environment": "calculator", "env.max_turns": "0"}, "env.max_turns"),
        ({"env.environment": "calculator", "env.max_turns": "100000"}, "env.max_turns"),
        ({"env.environment": "calculator", "env.max_tokens": "0"}, "env.max_tokens"),
        ({"env.environment": "calculator", "env.max_turn_tokens": "600"}, "env.max_turn_tokens"),
        ({"env.environment": "calculator", "env.tool_timeout": "0"}, "env.tool_timeout"),
        ({"env.environment": "calculator", "env.tool_output_limit": "0"}, "env.tool_output_limit"),
        ({"env.environment": "calculator", "env.step_timeout": "-1"}, "env.step_timeout"),
        ({"env.environment": "calculator", "env.observation_role": "bot"}, "env.observation_role"),
        ({"env.max_turns": "4"}, "env.max_turns"),  # no environment: the key does nothing
    ],
)
def test_invalid_env_values_are_refused_naming_the_field(overrides, named):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert named in message.split(":")[0] or message.startswith(f"command line: {named}:")


# ----------------------------------------------------------------------------- the adapter


def tiny_model(vocab: int, seed: int = 0):
    """A tiny random Llama over `vocab` ids (any tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def scripted(model, script: list[int]):
    """`model` made to sample `script`, one token per forward (every live row the same token):
    the real decoder and KV cache run; only the chosen tokens are fixed. Returns the hook."""
    queue = list(script)

    def hook(module, args, output):
        token = queue.pop(0)
        output.logits[:, -1] = -1e9
        output.logits[:, -1, token] = 0.0
        return output

    return model.register_forward_hook(hook)


def smollm2_tokenizer():
    """SmolLM2's own tokenizer, when its cached copy loads offline (else None)."""
    from transformers import AutoTokenizer

    from rlsd.engine.models import cache_root

    path = cache_root() / "smollm2-135m-instruct"
    try:
        return AutoTokenizer.from_pretrained(path) if path.exists() else None
    except Exception:
        return None


class Scripted:
    """An environment that replies with scripted observations, then is done."""

    replies: ClassVar[list[str | None]] = []

    def reset(self, record) -> str:
        self.left = list(self.replies)
        return f"Solve: {record.prompt}"

    def step(self, text: str) -> StepResult:
        if not self.left:
            return StepResult(None, True, reward=0.5)
        return StepResult(self.left.pop(0), False, reward=0.25)


def setup_of(factory, role: str = "tool", timeout: float | None = None) -> EnvSetup:
    return EnvSetup("scripted", factory, role, timeout)


def play(tok, turns: list[str], replies: list[str | None], role: str, ends: list[bool]):
    """One scripted episode through the real decoder: the model writes `turns` (each closed
    with the end-of-turn token where `ends` says so), the environment `replies`."""
    eos = tok.eos_token_id
    script = []
    for text, end in zip(turns, ends):
        script += tok.encode(text, add_special_tokens=False) + ([eos] if end else [])
    model = tiny_model(len(tok))
    handle = scripted(model, script)
    Env = type("Env", (Scripted,), {"replies": replies})
    env = EnvConfig(environment="x.py:Env", max_turns=8, max_turn_tokens=300, max_tokens=2000)
    try:
        out = sample_episodes(
            model,
            tok,
            [Record("2 + 3 * 4", "14")],
            setup_of(Env, role),
            1,
            env,
            stop_ids=[eos],
            pad_id=tok.pad_token_id,
            greedy=True,
        )
    finally:
        handle.remove()
    return out, script


CONVERSATIONS = [
    # (model turns, environment replies, observation role)
    (
        ["Step 1: 3 * 4\n" + render_call("calculate", {"expression": "3 * 4"}), "Answer: 14"],
        [render_results(["12"])],
        "tool",
    ),
    (["I think 20.", "Then 14.\nAnswer: 14"], ["No: lower."], "user"),
    (["Hmm.", "Still thinking.", "Answer: 14"], [None, "Go on."], "user"),
]


def full_rendering(tok, first: str, turns: list[str], replies: list[str | None], role: str):
    messages = [{"role": "user", "content": first}]
    for i, text in enumerate(turns):
        messages.append({"role": "assistant", "content": text})
        if i < len(replies) and replies[i] is not None:
            messages.append({"role": role, "content": replies[i]})
    return chat_ids(tok, messages, add_generation_prompt=False)


def check_alignment(tok, turns, replies, role, ends):
    out, script = play(tok, turns, replies, role, ends)
    batch = out.batch
    prompt = batch.prompt_ids[0][batch.prompt_mask[0]].tolist()
    trajectory = batch.completion_ids[0][batch.attention[0]].tolist()
    full = full_rendering(tok, "Solve: 2 + 3 * 4", turns, replies, role)
    # the episode is the whole rendering, up to the end of its final turn (the template's
    # newline after it is not part of the episode, as for a single completion)
    assert prompt + trajectory == full[: len(prompt) + len(trajectory)]
    assert tok.decode(full[len(prompt) + len(trajectory) :]).strip() == ""
    # the two masks: the model's tokens are exactly the script, in order; the rest is the env's
    assert batch.completion_ids[0][batch.completion_mask[0]].tolist() == script
    assert (batch.completion_mask <= batch.attention).all()
    assert out.turns == (len(turns),) and out.truncated == (False,)
    assert out.finals == (turns[-1],) and out.errors == (None,)
    assert out.env_rewards == (0.25 * len(replies) + 0.5,)
    return out


@pytest.mark.parametrize(("turns", "replies", "role"), CONVERSATIONS)
def test_episode_ids_are_the_chat_templates_rendering(turns, replies, role):
    check_alignment(build_tokenizer(), turns, replies, role, [True] * len(turns))


def test_alignment_on_smollm2s_own_tokenizer():
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("SmolLM2's cached tokenizer is not here (rlsd/engine/models.py builds it)")
    for turns, replies, role in CONVERSATIONS:
        check_alignment(tok, turns, replies, role, [True] * len(turns))


def test_a_one_token_tool_call_close_ends_the_turn():
    """With `</tool_call>` one token, the turn stops at it and the environment's reply closes
    the turn (the end-of-turn token is then the environment's, not trained)."""
    tok = build_tokenizer()
    tok.add_tokens(["</tool_call>"])
    call = render_call("calculate", {"expression": "3 * 4"})
    assert tool_stop_ids(tok) == tok.encode("</tool_call>", add_special_tokens=False)
    turns, replies = [f"Step 1: 3 * 4\n{call}", "Answer: 14"], [render_results(["12"])]
    out = check_alignment(tok, turns, replies, "tool", [False, True])
    reply = out.batch.completion_ids[0][out.batch.attention[0] & ~out.batch.completion_mask[0]]
    assert reply.tolist()[0] == tok.eos_token_id  # the template's <|im_end|>, the env's token


class Faulty:
    """Each instance behaves as the next name in `plan` (instances are built in row order)."""

    plan: ClassVar[list[str]] = []
    built = 0

    def __init__(self):
        self.kind = Faulty.plan[Faulty.built % len(Faulty.plan)]
        Faulty.built += 1

    def reset(self, record) -> str:
        if self.kind == "reset_raises":
            raise RuntimeError("no task today")
        return f"Play: {record.prompt}"

    def step(self, text: str):
        if self.kind == "raises":
            raise ValueError("bad move")
        if self.kind == "wrong_type":
            return 3
        if self.kind == "hangs":
            time.sleep(3)
        if self.kind == "forever":
            return StepResult("Again.", False, reward=0.1)
        return StepResult(None, True, reward=1.0)


def test_failures_and_truncation_are_counted_never_raised():
    Faulty.plan = ["ok", "raises", "wrong_type", "hangs", "forever", "reset_raises"]
    Faulty.built = 0
    tok = build_tokenizer()
    model = tiny_model(len(tok))
    env = EnvConfig(
        environment="x.py:Faulty",
        max_turns=3,
        max_turn_tokens=4,
        max_tokens=200,
        step_timeout=0.3,
        truncated_reward=-1.0,
        reward_weight=2.0,
    )
    out = sample_episodes(
        model,
        tok,
        [Record("7 x 6", "42")],
        setup_of(Faulty, "user", 0.3),
        6,
        env,
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        greedy=True,
    )
    errors = out.errors
    assert errors[0] is None and errors[4] is None
    assert "Faulty.step raised ValueError: bad move" in errors[1]
    assert "Faulty.step returned int, not StepResult" in errors[2]
    assert "did not return within 0.3 s" in errors[3]
    assert "reset(record) raised RuntimeError: no task today" in errors[5]
    assert out.truncated == (False, False, False, False, True, False)
    assert out.turns == (1, 1, 1, 1, 3, 1)
    assert out.metrics["env/errors"] == 4 and out.metrics["env/truncated_frac"] == 1 / 6
    assert out.metrics["env/turns_mean"] == 8 / 6
    # the failed reset was decoded after its siblings' first message: one shared prompt
    assert (out.batch.prompt_ids == out.batch.prompt_ids[0]).all()
    rewards = episode_rewards([0.5] * 6, out, env)
    assert rewards == [0.5 + 2.0, 0.5, 0.5, 0.5, -1.0, 0.5]
    # the truncated episode: three model turns, two replies, both masks as decoded
    row = out.batch.completion_mask[4], out.batch.attention[4]
    assert row[0].sum() == 12 and (row[1] & ~row[0]).sum() > 0


class Dealt:
    """A reset that differs per instance (a random deal): rows cannot share a prompt."""

    dealt = 0

    def reset(self, record) -> str:
        Dealt.dealt += 1
        return f"Hand {Dealt.dealt}: {record.prompt}"

    def step(self, text: str) -> StepResult:
        return StepResult(None, True)


def test_rows_whose_first_messages_differ_get_their_own_prompts():
    tok = build_tokenizer()
    env = EnvConfig(environment="x.py:Dealt", max_turn_tokens=3, max_tokens=10)
    out = sample_episodes(
        tiny_model(len(tok)),
        tok,
        [Record("a", "1"), Record("b", "2")],
        setup_of(Dealt, "user"),
        2,
        env,
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
    )
    prompts = [ids[mask].tolist() for ids, mask in zip(out.batch.prompt_ids, out.batch.prompt_mask)]
    firsts = [m[0]["content"] for m in out.messages]
    assert firsts == ["Hand 1: a", "Hand 2: a", "Hand 3: b", "Hand 4: b"]
    assert prompts == [chat_ids(tok, [m[0]], add_generation_prompt=True) for m in out.messages]


def test_the_calculator_runs_batches_of_episodes_with_a_tiny_model():
    """Garbage turns are final answers or counted tool errors, never crashes; a scripted call
    gets the tool's real result back as environment tokens."""
    from rlsd.engine.envs.calculator import calculator_records

    tok = build_tokenizer()
    cfg = load_config(
        None,
        {
            "algorithm.name": "grpo",
            "env.environment": "calculator",
            "env.max_turns": "3",
            "env.max_turn_tokens": "16",
            "env.max_tokens": "120",
        },
    )
    setup = build_environment(cfg.env)
    assert setup.role == "tool" and setup.timeout is None
    try:
        model = tiny_model(len(tok))
        out = sample_episodes(
            model,
            tok,
            calculator_records(3, 0),
            setup,
            2,
            cfg.env,
            stop_ids=[tok.eos_token_id],
            pad_id=tok.pad_token_id,
            temperature=1.0,
        )
        assert out.batch.completion_ids.shape[0] == 6 and len(out.finals) == 6
        assert out.metrics["env/errors"] == 0 and all(e is None for e in out.errors)
        # each garbage turn is a final answer (no call: the episode ends) or a counted call
        assert out.metrics["env/tool_calls"] >= out.metrics["env/tool_errors"]
        call = render_call("calculate", {"expression": "482 + 97"})
        eos = tok.eos_token_id
        script = [*tok.encode(call, add_special_tokens=False), eos]
        script += [*tok.encode("Answer: 579", add_special_tokens=False), eos]
        handle = scripted(model, script)
        try:
            env = EnvConfig(environment="calculator", max_turn_tokens=200, max_tokens=400)
            one = sample_episodes(
                model,
                tok,
                calculator_records(1, 0),
                setup,
                1,
                env,
                stop_ids=[eos],
                pad_id=tok.pad_token_id,
                greedy=True,
            )
        finally:
            handle.remove()
    finally:
        setup.close()
    assert one.metrics["env/tool_calls"] == 1 and one.metrics["env/tool_errors"] == 0
    assert one.messages[0][2] == {"role": "tool", "content": render_results(["579"])}
    assert one.finals == ("Answer: 579",) and one.turns == (2,)
    env_text = tok.decode(one.batch.completion_ids[0][~one.batch.completion_mask[0]])
    assert "<tool_response>\n579\n</tool_response>" in env_text


def test_the_docs_env_section_loads(tmp_path):
    """docs/agents.md's `env` block is a valid config."""
    import re
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "agents.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL) if "env:" in b)
    path = tmp_path / "agent.yaml"
    path.write_text(block)
    cfg = load_config(str(path), {})
    assert cfg.env.environment == "calculator" and cfg.env.max_turns == 8
