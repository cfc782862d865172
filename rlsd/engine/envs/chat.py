"""An episode's conversation as token ids that continue it exactly as the chat template would
render the whole conversation, without ever re-tokenizing the past.

The prompt is the template's rendering of the first messages (an optional system message, the
environment's first user message) with the assistant header. After each model turn the
environment's reply is rendered as the text the template puts there, found once per tokenizer
by rendering a conversation of sentinel strings (`ChatFrame.of`): for ChatML (SmolLM2) it is

    <|im_end|>\\n<|im_start|>tool\\n{observation}<|im_end|>\\n<|im_start|>assistant\\n

(the end of the model's message, the observation's message in its role, the header of the
next assistant turn), or `<|im_end|>\\n<|im_start|>assistant\\n` when the environment adds
nothing. When the model's turn ended with its end-of-turn token (`<|im_end|>`, sampled and
trained), the reply starts after it; when the turn ended any other way (at `</tool_call>`, or
cut at `env.max_turn_tokens`), the reply carries the template's end-of-turn text itself, as
environment tokens. Only the reply is tokenized, on its own: it starts and ends at the
template's fixed text, so its ids are those the template's rendering of the whole conversation
gives (checked by tests/test_env_rollout.py on a ChatML tokenizer and on SmolLM2's).

The turn's stop: a model turn ends at the tokenizer's end-of-turn ids (the run's stop ids) and,
when `</tool_call>` is one token in the vocabulary (as in Qwen's), at it too (`tool_stop_ids`):
that token stays in the turn's text and the reply closes the turn. SmolLM2 has no such token:
its turns end at `<|im_end|>` after the call, as the chat template renders an assistant message
holding a call (and as the calculator's expert episodes teach in `rlsd sft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...schema.config import ConfigError
from ..data import chat_ids
from .calls import CLOSE

ROLE_FIELD = "env.observation_role"
_USER, _TURN, _OBS = "\x1erlsd-user\x1e", "\x1erlsd-turn\x1e", "\x1erlsd-observation\x1e"


@dataclass(frozen=True)
class ChatFrame:
    """The chat template's fixed text around an episode's turns, for one tokenizer and role."""

    tokenizer: Any
    role: str  # the observations' chat role ("tool" or "user")
    system_prompt: str  # "" = none (the template's default, if it has one)
    before_observation: str  # after the model's text, up to the observation's text
    after_observation: str  # after the observation's text: the next assistant header
    next_turn: str  # after the model's text when the environment adds nothing

    @classmethod
    def of(cls, tokenizer: Any, role: str, system_prompt: str = "") -> ChatFrame:
        """The frame of `tokenizer`'s chat template (ConfigError without one, or when it
        cannot render a message in `role`)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "env: the tokenizer has no chat template; an agent's turns and the "
                "environment's replies are rendered as chat messages (use a chat model)"
            )
        head = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _TURN}]
        try:
            with_obs = _render(tokenizer, [*head, {"role": role, "content": _OBS}], system_prompt)
            without = _render(tokenizer, head, system_prompt)
        except Exception as exc:
            raise ConfigError(
                f"{ROLE_FIELD}: the chat template cannot render a {role!r} message after an "
                f"assistant turn ({type(exc).__name__}: {exc})"
            ) from None
        between = _after(with_obs, _TURN)
        if _OBS not in between:
            raise ConfigError(f"{ROLE_FIELD}: the chat template drops {role!r} messages")
        before, after = between.split(_OBS, 1)
        return cls(tokenizer, role, system_prompt, before, after, _after(without, _TURN))

    def prompt_ids(self, first_message: str) -> list[int]:
        """The episode's prompt: the first messages and the assistant header, as ids."""
        return chat_ids(self.tokenizer, self.messages(first_message), add_generation_prompt=True)

    def messages(self, first_message: str) -> list[dict[str, str]]:
        """The conversation's first messages (the system message, when one is set)."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": first_message}]

    def turn_text(self, turn: list[int], end_ids: set[int]) -> str:
        """The model's turn as the text the environment reads (and the message's content): its
        ids decoded, without the end-of-turn token that closed it."""
        if turn and turn[-1] in end_ids:
            turn = turn[:-1]
        return self.tokenizer.decode(
            turn, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def reply_ids(self, turn: list[int], end_ids: set[int], observation: str | None) -> list[int]:
        """The ids after a model turn (the environment's, never trained): the end of its
        message (less the end-of-turn token the model wrote, if it wrote it), the observation's
        message (none when `observation` is None) and the next assistant header."""
        if observation is None:
            text = self.next_turn
        else:
            text = f"{self.before_observation}{observation}{self.after_observation}"
        if turn and turn[-1] in end_ids:
            written = self.tokenizer.decode([turn[-1]], skip_special_tokens=False)
            text = text.removeprefix(written)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _render(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str) -> str:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tokenizer.apply_chat_template(
        [*system, *messages], add_generation_prompt=True, tokenize=False
    )


def _after(text: str, sentinel: str) -> str:
    if sentinel not in text:
        raise ConfigError(f"{ROLE_FIELD}: the chat template drops assistant messages")
    return text.split(sentinel, 1)[1]


def tool_stop_ids(tokenizer: Any) -> list[int]:
    """[the id of `</tool_call>`] when it is one token (a turn then ends at it), else []."""
    ids = tokenizer.encode(CLOSE, add_special_tokens=False)
    return list(ids) if len(ids) == 1 else []
