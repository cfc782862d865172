"""RLSD in TRL: `RLSDGRPOTrainer(GRPOTrainer)` and `RLSDConfig(GRPOConfig)` (docs/trl.md).

After TRL's rollout and rewards (`_generate_and_score_completions`, called through super()), the
trainer scores the very completion ids under the teacher's prompt (teacher prompt ids + the
student's completion ids, never re-tokenized text), takes the student's log-probs of the same
tokens, and replaces TRL's sequence advantages (B,) by rlsd's per-token advantages (B, T) from
the RLSD method object (`rlsd_method`: built from the `rlsd_*` settings by `method_for`, as rlsd's
own loop builds it), which TRL's `_compute_loss` accepts as they are.
The credit is computed once per rollout batch, in that hook, so with `num_iterations > 1` or
`steps_per_generation > 1` every pass over TRL's buffered batch uses the same credit.

Teacher weights (`rlsd_teacher_mode`):
- `live`: the policy being trained;
- `frozen`: the initial policy: a PEFT model with its adapter disabled (TRL's "ref" adapter when
  there is one), else TRL's reference model when `beta != 0`, else a frozen copy taken at start;
- `sync`: a copy of the policy taken at global step 0 and then refreshed at the first rollout at
  or after global steps N, 2N, ... (N = `rlsd_sync_every`): with one rollout per optimizer step
  (TRL's default), optimizer steps kN+1 .. (k+1)N (1-based) learn from the policy's weights
  after step kN. `rlsd_sync_steps` lists the global steps the copy was taken at. The copy and
  that step are saved in each TRL checkpoint (`rlsd_teacher.safetensors`, `rlsd_state.json`)
  and restored by `train(resume_from_checkpoint=...)`.

Context sources (`rlsd_context`, first available wins per completion, chosen by rlsd's own
`choose_contexts` before the credit): `reference`, `sibling` and `memory`. The memory is rlsd's
own `ContextMemory`, keyed by the prompt itself (`trl_memory.memory_key`); after the credit,
each training rollout's correct completions (all processes' rows, gathered in rank order, so
every process holds the same store) are offered to it by rlsd's `remember`. Its entries are
saved in each TRL checkpoint (`rlsd_state.json`) and restored on resume.

The lambda schedule's step is `state.global_step + 1` at the rollout (1-based, as rlsd's loop).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version

TRL_MIN, TRL_BELOW = "1.16", "1.17"  # the range pyproject's `trl` extra pins (tested: 1.16.0)


def check_trl_version(version: str) -> None:
    if not Version(TRL_MIN) <= Version(version) < Version(TRL_BELOW):
        raise ImportError(
            f"rlsd.integrations.trl supports TRL >={TRL_MIN},<{TRL_BELOW}, found TRL {version}: "
            f"it overrides GRPOTrainer hooks whose signatures change between releases "
            f"(pip install 'rlsd[trl]')"
        )


try:
    import trl
except ImportError:
    raise ImportError("rlsd.integrations.trl needs TRL: pip install 'rlsd[trl]'") from None
check_trl_version(trl.__version__)

from accelerate.utils import gather_object, is_peft_model  # noqa: E402
from safetensors.torch import load_model, save_model  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import pad, use_adapter  # noqa: E402

from ..algorithms.method import RLSD, method_for  # noqa: E402
from ..algorithms.spans import reasoning_span_mask, span_split, token_pieces  # noqa: E402
from ..engine.context import Context, ContextMemory, choose_contexts, context_metrics  # noqa: E402
from ..engine.preflight import ALIGNMENT_SAMPLE, PROBE, generation_header  # noqa: E402
from ..engine.runfiles import JsonlWriter  # noqa: E402
from ..schema.config import AlgorithmConfig, Config, ConfigError, RlsdConfig  # noqa: E402
from .trl_memory import (  # noqa: E402
    Rollout,
    memory_key,
    memory_metrics,
    offer_rollout,
    read_state,
    state_dict,
    write_state,
)
from .trl_teacher import (  # noqa: E402
    TRL_TEACHER_TEMPLATE,
    RLSDDataError,
    RunFiles,
    check_columns,
    check_header,
    check_rlsd_fields,
    check_teacher_text,
    compile_template,
    is_conversational,
    prompt_text,
    ready_prompt,
    reference_text,
    rendered_prompt,
    report_config,
    sample_lines,
    user_text,
)

__all__ = ["RLSDConfig", "RLSDDataError", "RLSDGRPOTrainer"]
TEACHER_FILE = "rlsd_teacher.safetensors"


def _opt(default: Any, text: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class RLSDConfig(GRPOConfig):
    """GRPOConfig plus RLSD's fields (rlsd's own config names in brackets: see
    `rlsd train --help`). Every GRPOConfig field keeps its TRL meaning."""

    rlsd_lambda: float = _opt(0.5, "Mixing weight of the teacher's credit (rlsd.lambda).")
    rlsd_eps_w: float = _opt(0.2, "Clip of the token weights to [1-eps_w, 1+eps_w] (rlsd.eps_w).")
    rlsd_lambda_warmup_steps: int = _opt(0, "Linear warm-up of lambda from 0 (steps).")
    rlsd_lambda_decay_steps: int = _opt(0, "Linear decay of lambda to 0 after warm-up (steps).")
    rlsd_negative_only: bool = _opt(False, "Reweight only completions with A < 0.")
    rlsd_thought_only: bool = _opt(False, "Reweight only tokens inside the reasoning span.")
    rlsd_thought_open: str = _opt("<think>", "Tag opening the reasoning span (thought_only).")
    rlsd_thought_close: str = _opt("</think>", "Tag closing the reasoning span (thought_only).")
    rlsd_teacher_mode: str = _opt("live", "Teacher weights: live, frozen or sync.")
    rlsd_sync_every: int = _opt(20, "Steps between refreshes of the sync teacher.")
    rlsd_teacher_prompt_column: str | None = _opt(
        None, "Column holding each row's ready teacher prompt (then no template is rendered)."
    )
    rlsd_teacher_template: str = _opt(
        TRL_TEACHER_TEMPLATE,
        "Jinja template of the teacher's user message: prompt (the student's user text), "
        "context, context_kind and every dataset column.",
    )
    rlsd_context: list[str] = _opt(
        ["reference"], "Context sources in order, first available wins: reference, sibling, memory."
    )
    rlsd_memory_size: int = _opt(
        4096,
        "Prompts the memory of earlier successes holds (rlsd_context memory); the entry stored "
        "longest ago is evicted first. Saved in checkpoints (teacher.memory_size).",
    )
    rlsd_reference_column: str = _opt("solution", "Column holding the reference (context).")
    rlsd_correct_reward: float = _opt(
        1.0, "A completion is correct (a sibling) when the first reward function gives >= this."
    )
    rlsd_privileged: bool = _opt(
        True, "False: a control run whose teacher may see the student's prompt (no checks)."
    )
    rlsd_log_dir: str | None = _opt(
        None, "Directory for rlsd's run files (samples.jsonl, metrics.jsonl, config.yaml)."
    )
    rlsd_log_samples: int = _opt(8, "Completions per rollout written to samples.jsonl (0: all).")

    def __post_init__(self):
        super().__post_init__()
        check_rlsd_fields(self)


def rlsd_method(args: RLSDConfig) -> RLSD:
    """The RLSD method object of these settings: rlsd's `method_for` on a config whose rlsd
    section holds them, so the bridge and rlsd's loop build the credit the same way. Each
    `rlsd.<key>` comes from the setting `rlsd_<key>` (rlsd.lambda from rlsd_lambda); a key the
    bridge has no setting for (max_spanless_steps, a stop rule of rlsd's loop) keeps its default."""
    settings = {f.name: f"rlsd_{f.name.rstrip('_')}" for f in fields(RlsdConfig)}
    section = RlsdConfig(
        **{name: getattr(args, key) for name, key in settings.items() if hasattr(args, key)}
    )
    return method_for(Config(algorithm=AlgorithmConfig(name=RLSD.name), rlsd=section))


class RLSDGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with RLSD's per-token credit (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RLSDConfig):
            raise ConfigError("RLSDGRPOTrainer: pass args=RLSDConfig(...), not a GRPOConfig")
        if self.tools or self.environment_factories is not None or self._is_vlm:
            raise ConfigError(
                "RLSDGRPOTrainer: tools, environments and vision-language models are not "
                "supported yet (the teacher would score tool output and images as text)"
            )
        self._rlsd_template = compile_template(self.args.rlsd_teacher_template)
        self.rlsd_method = rlsd_method(self.args)
        self._rlsd_rewards: torch.Tensor | None = None
        self._rlsd_teacher = self._rlsd_initial_teacher()
        self.rlsd_sync_steps: list[int] = [0] if self.args.rlsd_teacher_mode == "sync" else []
        self.rlsd_memory = self._rlsd_new_memory()
        self._rlsd_rollout: Rollout | None = None
        self._rlsd_samples = self._rlsd_open_log_dir()
        self._rlsd_preflight()

    # --- the teacher's weights -------------------------------------------------------------

    def _rlsd_copy(self) -> torch.nn.Module:
        teacher = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        return teacher.eval().requires_grad_(False)

    def _rlsd_initial_teacher(self) -> torch.nn.Module | None:
        mode = self.args.rlsd_teacher_mode
        if mode == "live" or (mode == "frozen" and is_peft_model(self.model)):
            return None
        if mode == "frozen" and self.ref_model is not None:
            return self.ref_model
        return self._rlsd_copy()

    @contextmanager
    def _rlsd_teacher_model(self):
        """The model that scores the teacher's prompts, in the configured mode."""
        if self._rlsd_teacher is not None:
            yield self._rlsd_teacher
        elif self.args.rlsd_teacher_mode == "frozen":
            model = self.accelerator.unwrap_model(self.model)
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                yield self.model
        else:
            yield self.model

    def _rlsd_maybe_sync(self) -> None:
        step, last = self.state.global_step, self.rlsd_sync_steps[-1]
        if step - last >= self.args.rlsd_sync_every:
            policy = self.accelerator.unwrap_model(self.model)
            self._rlsd_teacher.load_state_dict(policy.state_dict())
            self.rlsd_sync_steps.append(step)

    def _rlsd_new_memory(self) -> ContextMemory | None:
        """rlsd's store of earlier successes, when a rendered teacher prompt can show it."""
        args = self.args
        if "memory" not in args.rlsd_context or args.rlsd_teacher_prompt_column:
            return None
        return ContextMemory(args.rlsd_memory_size)

    def _rlsd_state(self) -> dict[str, Any]:
        sync = self.rlsd_sync_steps if self.args.rlsd_teacher_mode == "sync" else None
        return state_dict(sync, self.rlsd_memory)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self._rlsd_state()
        if not state or not self.args.should_save:
            return
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        out = Path(self._get_output_dir(trial=trial)) / folder
        if "sync_steps" in state:
            save_model(self._rlsd_teacher, str(out / TEACHER_FILE))
        write_state(out, state)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self._rlsd_state():
            return
        sync = self.args.rlsd_teacher_mode == "sync"
        state = read_state(checkpoint, sync)
        if sync:
            load_model(self._rlsd_teacher, str(Path(checkpoint) / TEACHER_FILE))
            self.rlsd_sync_steps = state["sync_steps"]
        if self.rlsd_memory is not None:
            self.rlsd_memory.load_state_dict(state.get("context_memory", []))

    # --- start-up checks -------------------------------------------------------------------

    def _rlsd_needed_columns(self) -> dict[str, str]:
        if self.args.rlsd_teacher_prompt_column:
            return {self.args.rlsd_teacher_prompt_column: "rlsd_teacher_prompt_column"}
        if "reference" in self.args.rlsd_context:
            return {self.args.rlsd_reference_column: "rlsd_reference_column"}
        return {}

    def _rlsd_preflight_prompts(self, row: dict, index: int) -> list[tuple[Any, str | None]]:
        """(teacher prompt, the context it must show) per configured source, for one row."""
        if self.args.rlsd_teacher_prompt_column:
            return [(ready_prompt(row, self.args.rlsd_teacher_prompt_column, index), None)]
        out = []
        for kind in self.args.rlsd_context:
            if kind == "reference":
                text = reference_text(row, self.args.rlsd_reference_column, index)
            else:  # sibling, memory: a probe text stands for the completion shown
                text = PROBE
            out.append((rendered_prompt(self._rlsd_template, row, Context(kind, text)), text))
        return out

    def _rlsd_preflight(self) -> None:
        """On TRL's tokenizer and chat template: the columns exist; for the first rows, each
        teacher prompt differs from the student's and shows its context, and both end with
        the chat template's assistant header (rlsd.engine.preflight's rules)."""
        data = self.train_dataset
        columns = getattr(data, "column_names", None)
        if columns is None:  # an IterableDataset without known columns: checked per batch
            return
        check_columns(list(columns), self._rlsd_needed_columns())
        rows = [data[i] for i in range(min(ALIGNMENT_SAMPLE, len(data)))]
        conversational = bool(rows) and is_conversational(rows[0]["prompt"])
        header = (
            generation_header(self._tokenizer)
            if conversational and self.chat_template is None
            else []
        )
        for index, row in enumerate(rows):
            check_header(self._rlsd_ids([row["prompt"]])[0], header, "the student prompt", index)
            for teacher, shown in self._rlsd_preflight_prompts(row, index):
                where = f"row {index} ({user_text(row['prompt'], 'prompt')[:40]!r})"
                if self.args.rlsd_privileged:
                    check_teacher_text(row["prompt"], teacher, shown, where)
                check_header(self._rlsd_ids([teacher])[0], header, "the teacher prompt", index)

    def _rlsd_ids(self, prompts: list[Any]) -> list[list[int]]:
        """Prompt ids exactly as TRL tokenizes the student's (its chat template and kwargs)."""
        return [list(ids) for ids in self._tokenize_prompts(prompts)[0]]

    # --- the credit ------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rlsd_rewards = rewards  # (all processes' rows, reward functions)
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.args.rlsd_teacher_mode == "sync":
            self._rlsd_maybe_sync()
        step = self.state.global_step + 1
        args, method = self.args, self.rlsd_method
        contexts, teacher_prompts = self._rlsd_teacher_prompts(inputs, output, mode)
        mask = output["completion_mask"]
        student = self._rlsd_student_logps(output)
        teacher = self._rlsd_teacher_logps(teacher_prompts, output)
        span = None
        if method.thought_only:
            pieces = token_pieces(self._tokenizer, output["completion_ids"], mask)
            span = reasoning_span_mask(pieces, *method.span_tags, mask.shape[1]).to(mask.device)
        seq_adv = output["advantages"]
        token_adv, multiplier = method.credit(step, seq_adv, student, teacher, mask, span)
        metrics = method.metrics(step, seq_adv, student, teacher, token_adv, mask, span)
        if span is not None:  # the mean multiplier inside and outside the reasoning span
            metrics.update(span_split(multiplier, span, mask))
        if contexts is not None:
            metrics.update(context_metrics(contexts, args.rlsd_context))
        if self.rlsd_memory is not None:
            metrics.update(self._rlsd_remember(mode, step))
        self._rlsd_log_metrics(mode, metrics)
        if mode == "train" and self._rlsd_samples is not None:
            self._rlsd_write_samples(step, inputs, output, token_adv, contexts, teacher_prompts)
        output["advantages"] = token_adv  # (B, T): TRL's _compute_loss takes it as is
        return output

    def _rlsd_total_rewards(self) -> torch.Tensor:
        """Each row's reward as TRL sums it (weighted reward functions, NaN skipped)."""
        weights = self.reward_weights.to(self._rlsd_rewards.device)
        return (self._rlsd_rewards * weights).nansum(dim=1)

    def _rlsd_remember(self, mode: str, step: int) -> dict[str, float]:
        """After the credit: the memory's size and hit rate, then (training rollouts only)
        the offer of the rollout's correct completions to it."""
        rollout = self._rlsd_rollout
        metrics = memory_metrics(self.rlsd_memory, rollout.keys)
        if mode == "train":
            rewards = self._rlsd_total_rewards().tolist()
            metrics.update(offer_rollout(self.rlsd_memory, rollout, rewards, step))
        return metrics

    def _rlsd_local_slice(self, rows: int) -> slice:
        start = self.accelerator.process_index * rows
        return slice(start, start + rows)

    def _rlsd_completion_lists(self, output: dict[str, Any]) -> list[list[int]]:
        ids, mask = output["completion_ids"], output["completion_mask"].bool()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]

    def _rlsd_teacher_prompts(
        self, inputs: list[dict], output: dict[str, Any], mode: str
    ) -> tuple[list[Context | None] | None, list[Any]]:
        """Each row's context (None with a ready teacher-prompt column) and teacher prompt."""
        args = self.args
        needed = self._rlsd_needed_columns()
        check_columns(list(inputs[0]), needed)
        if args.rlsd_teacher_prompt_column:
            prompts = [
                ready_prompt(row, args.rlsd_teacher_prompt_column, i)
                for i, row in enumerate(inputs)
            ]
            if args.rlsd_privileged:
                for i, (row, teacher) in enumerate(zip(inputs, prompts)):
                    check_teacher_text(row["prompt"], teacher, None, f"batch row {i}")
            return None, prompts
        local = self._rlsd_completion_lists(output)
        texts = gather_object(self._tokenizer.batch_decode(local, skip_special_tokens=True))
        lengths = gather_object([len(ids) for ids in local])
        keys = gather_object([memory_key(row["prompt"]) for row in inputs])
        first = self._rlsd_rewards[:, 0].tolist()
        correct = [r >= args.rlsd_correct_reward for r in first]  # NaN (unscored): False
        references = gather_object(
            [str(row.get(args.rlsd_reference_column) or "") for row in inputs]
        )
        group = self.num_generations if mode == "train" else self.num_generations_eval
        chosen = choose_contexts(
            args.rlsd_context, references, keys, texts, correct, lengths, group, self.rlsd_memory
        )
        self._rlsd_rollout = Rollout(keys, texts, correct, lengths)  # offered after the credit
        contexts = chosen[self._rlsd_local_slice(len(inputs))]
        for i, (row, context) in enumerate(zip(inputs, contexts)):
            if context is not None and context.kind == "reference":
                reference_text(row, args.rlsd_reference_column, i)
        prompts = [rendered_prompt(self._rlsd_template, r, c) for r, c in zip(inputs, contexts)]
        return contexts, prompts

    def _rlsd_logps(self, model, prompt_ids, prompt_mask, output) -> torch.Tensor:
        """log P(y_t) of the completion ids after the given prompts, as TRL scores them."""
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        mode = "train" if self.model.training else "eval"
        size = getattr(self.args, f"per_device_{mode}_batch_size")
        kwargs = self.args.gradient_checkpointing_kwargs
        with torch.no_grad(), disable_gradient_checkpointing(self.model, kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, ids, attention, completion_ids.size(1), batch_size=size
            )
        return logps

    def _rlsd_student_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """The policy's log-probs at rollout time: TRL's old_per_token_logps when it computed
        them, else one no-grad forward of the same rows."""
        if output.get("old_per_token_logps") is not None:
            return output["old_per_token_logps"]
        return self._rlsd_logps(self.model, output["prompt_ids"], output["prompt_mask"], output)

    def _rlsd_teacher_logps(self, prompts: list[Any], output: dict[str, Any]) -> torch.Tensor:
        device = output["completion_ids"].device
        rows = [torch.tensor(ids) for ids in self._rlsd_ids(prompts)]
        multiple = self.pad_to_multiple_of
        ids = pad(rows, self._tokenizer.pad_token_id, "left", multiple).to(device)
        mask = pad([torch.ones_like(r) for r in rows], 0, "left", multiple).to(device)
        with self._rlsd_teacher_model() as model:
            return self._rlsd_logps(model, ids, mask, output)

    def _rlsd_log_metrics(self, mode: str, metrics: dict[str, float]) -> None:
        """The step's rlsd diagnostics as TRL metrics, averaged over the processes."""
        every = [m for m in gather_object([metrics]) if m]
        for name in sorted({k for m in every for k in m}):
            values = [m[name] for m in every if name in m]
            self._metrics[mode][name].append(sum(values) / len(values))

    # --- rlsd's run files ------------------------------------------------------------------

    def _rlsd_open_log_dir(self) -> JsonlWriter | None:
        where = self.args.rlsd_log_dir
        if not where or not self.accelerator.is_main_process:
            return None
        out = Path(where)
        out.mkdir(parents=True, exist_ok=True)
        args = self.args
        settings = {
            "rlsd.lambda": args.rlsd_lambda,
            "rlsd.eps_w": args.rlsd_eps_w,
            "teacher.mode": args.rlsd_teacher_mode,
        }
        if args.max_steps > 0:
            settings["train.steps"] = args.max_steps
        name = self.accelerator.unwrap_model(self.model).config._name_or_path or "trl-model"
        (out / "config.yaml").write_text(report_config(name, settings), encoding="utf-8")
        self.add_callback(RunFiles(JsonlWriter(out / "metrics.jsonl")))
        return JsonlWriter(out / "samples.jsonl")

    def _rlsd_write_samples(self, step, inputs, output, token_adv, contexts, teacher_prompts):
        ids = self._rlsd_completion_lists(output)
        local = self._rlsd_local_slice(len(inputs))
        rewards = self._rlsd_rewards[local]
        column = self.args.rlsd_reference_column
        batch = {
            "prompt": [user_text(r["prompt"], "prompt") for r in inputs],
            "answer": [str(r.get(column) or "") for r in inputs],
            "completion": self._tokenizer.batch_decode(ids, skip_special_tokens=True),
            "reward": self._rlsd_total_rewards()[local].tolist(),
            "correct": [bool(r >= self.args.rlsd_correct_reward) for r in rewards[:, 0].tolist()],
            "advantage": output["advantages"].tolist(),
            "token_ids": ids,
            "token_advantage": token_adv.tolist(),
            "context": contexts or [Context("column", "")] * len(inputs),
            "teacher_prompt": [prompt_text(p) for p in teacher_prompts],
        }
        for line in sample_lines(batch, step, self.args.rlsd_log_samples):
            self._rlsd_samples.write(line)
