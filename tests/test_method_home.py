"""Each method's identity wholly in its object: it builds itself from its own config section,
declares its options, and is asked (never its config) by the config's checks, the help, the
model card, the update and the TRL bridge. The last tests follow CONTRIBUTING.md's "Adding a
method" once, from this file alone: a toy variant of RLSD with one option of its own."""

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from rlsd.algorithms import METHODS, method_for
from rlsd.algorithms.method import GRPO_OPSD, OPD, OPSD, RLSD, Method
from rlsd.commands.export import model_card
from rlsd.schema.config import Config, ConfigError, help_rows, load_config, opt, to_yaml

ROOT = Path(__file__).parent.parent


def test_the_config_schema_imports_without_torch():
    """The schema (and the choices it offers) loads without torch: the method names, their
    help and their checks are asked for lazily, when a config is validated."""
    code = (
        "import sys, rlsd.schema.config; assert 'torch' not in sys.modules, 'torch'; "
        "c = rlsd.schema.config.Config(); assert 'torch' not in sys.modules, 'Config()'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_method_builds_itself_from_its_own_section():
    cfg = load_config(
        None,
        {
            "rlsd.lambda": "0.3",
            "rlsd.eps_w": "0.1",
            "rlsd.lambda_warmup_steps": "4",
            "rlsd.lambda_decay_steps": "8",
            "rlsd.negative_only": "true",
            "rlsd.thought_only": "true",
            "rlsd.thought_open": "<r>",
            "rlsd.thought_close": "</r>",
        },
    )
    assert method_for(cfg) == RLSD(0.3, 0.1, 4, 8, True, True, "<r>", "</r>")
    assert method_for(cfg) == METHODS["rlsd"].from_config(cfg)
    opsd = {"opsd.divergence": "topk", "opsd.direction": "forward", "opsd.topk": "5"}
    for name, want in (
        ("opsd", OPSD("topk", "forward", 5)),
        ("grpo_opsd", GRPO_OPSD("topk", "forward", 5, beta=0.25)),
        ("opd", OPD("topk", "forward", 5)),
    ):
        extra = {"opsd.beta": "0.25"} if name == "grpo_opsd" else {}
        mode = {"teacher.mode": "external", "teacher.model": "m"} if name == "opd" else {}
        cfg = load_config(None, {"algorithm.name": name, **opsd, **extra, **mode})
        assert method_for(cfg) == want and type(method_for(cfg)) is type(want)
    assert method_for(load_config(None, {"algorithm.name": "grpo"})) == Method()


def test_span_tags_and_the_divergence_direction_come_from_the_object():
    """What the diagnostics (`span_tags`) and the update (`reverse_divergence`) ask."""
    tags = {"rlsd.thought_open": "<reason>", "rlsd.thought_close": "</reason>"}
    assert method_for(load_config(None, tags)).span_tags == ("<reason>", "</reason>")
    assert method_for(load_config(None, {})).span_tags == ("<think>", "</think>")  # defaults
    for name in ("grpo", "opsd", "grpo_opsd"):
        method = method_for(load_config(None, {"algorithm.name": name}))
        assert method.span_tags is None and method.reverse_divergence
    assert method_for(load_config(None, {})).reverse_divergence  # rlsd: no exact divergence
    forward = {"algorithm.name": "opsd", "opsd.direction": "forward"}
    assert not method_for(load_config(None, forward)).reverse_divergence
    assert not OPD(direction="forward").reverse_divergence


def test_the_health_check_and_the_heat_map_ask_the_object():
    """`spans_required` (progress.Watch's spanless stop) and `multiplier_bound` (the credit
    heat map's full colour: lambda * eps_w, the most a multiplier moves from 1)."""
    strong = {"rlsd.lambda": "1.0", "rlsd.eps_w": "0.5", "rlsd.thought_only": "true"}
    method = method_for(load_config(None, strong))
    assert method.spans_required and method.multiplier_bound == 0.5
    default = method_for(load_config(None, {}))
    assert not default.spans_required and default.multiplier_bound == pytest.approx(0.1)
    for name in ("grpo", "opsd", "grpo_opsd"):
        other = method_for(load_config(None, {"algorithm.name": name}))
        assert not other.spans_required and other.multiplier_bound is None


def test_the_options_a_method_cannot_combine_are_its_own_check():
    with pytest.raises(ConfigError, match="rlsd.thought_open/thought_close: both tags"):
        load_config(None, {"rlsd.thought_only": "true", "rlsd.thought_close": ""})
    load_config(None, {"rlsd.thought_close": ""})  # no span asked for: no tags needed
    with pytest.raises(ConfigError, match="opsd.topk: only applies to opsd.divergence=topk"):
        load_config(None, {"algorithm.name": "opsd", "opsd.topk": "4"})
    assert RLSD(thought_only=True, thought_open="").option_problem(set())
    assert OPSD().option_problem({"opsd.topk"}) and not OPSD("topk").option_problem({"opsd.topk"})


def test_the_model_card_names_each_method_in_its_own_words(tmp_path):
    for name, kind in METHODS.items():
        cfg = Config()
        cfg.algorithm.name = name
        card = model_card(cfg, tmp_path / "run", tmp_path / "run" / "checkpoint-1", {})
        assert f"with **{kind.description}** by" in card
    assert METHODS["grpo_opsd"].description == "GRPO plus an on-policy self-distillation term"


def test_the_trl_bridge_builds_the_same_rlsd_object(tmp_path):
    pytest.importorskip("trl")
    from rlsd.integrations.trl import RLSDConfig, rlsd_method

    args = RLSDConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        rlsd_lambda=0.7,
        rlsd_eps_w=0.3,
        rlsd_lambda_warmup_steps=2,
        rlsd_lambda_decay_steps=9,
        rlsd_negative_only=True,
        rlsd_thought_only=True,
        rlsd_thought_open="<a>",
        rlsd_thought_close="</a>",
    )
    assert rlsd_method(args) == RLSD(0.7, 0.3, 2, 9, True, True, "<a>", "</a>")
    defaults = rlsd_method(RLSDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert defaults == method_for(load_config(None, {}))  # the same defaults as rlsd's loop


@pytest.mark.parametrize(
    "path",
    [
        "rlsd/schema/config.py",
        "rlsd/commands/export.py",
        "rlsd/integrations/trl.py",
        "rlsd/step/update.py",
        "rlsd/step/diagnostics.py",
        "rlsd/report/html.py",
    ],
)
def test_the_checks_the_card_and_the_bridge_ask_the_method_not_its_section(path):
    source = (ROOT / path).read_text()
    for leak in ("cfg.rlsd", "cfg.opsd", '"rlsd.", "opsd."', "rlsd_token_advantages", "lambda_at"):
        assert leak not in source, f"{path} reads {leak}"
    assert "METHODS = {" not in source  # no second table of the methods


def test_a_registered_class_must_say_what_it_is():
    with pytest.raises(TypeError, match="set description in the class body"):

        @dataclass(frozen=True)
        class Nameless(RLSD):
            name = "nameless"
            summary = "no description"

    assert "nameless" not in METHODS
    with pytest.raises(TypeError, match="already registered by rlsd.algorithms.method.RLSD"):

        @dataclass(frozen=True)
        class Twin(RLSD):
            name, summary, description = "rlsd", "a second rlsd", "RLSD again"

    assert METHODS["rlsd"] is RLSD


# --- CONTRIBUTING.md's recipe, followed from this file alone --------------------------------


@dataclass
class ToyOptions:
    """The toy's config section, `toy_rlsd.*` (each field declared once with `opt`)."""

    gain: float = opt(2.0, "Scale of RLSD's token credit (a toy option).", low=0)


CREDIT: list[torch.Tensor] = []  # what the toy's token_advantages returned, call by call


def define_toy() -> type[RLSD]:
    """Step 1 of the recipe: the class (a variant of RLSD) with its own option; defining it
    registers it."""

    @dataclass(frozen=True)
    class ToyRLSD(RLSD):
        """RLSD's credit times `gain`."""

        name = "toy_rlsd"
        summary = "RLSD's credit times toy_rlsd.gain"
        description = "Toy RLSD (RLSD's token credit scaled by a gain)"
        options = (*RLSD.options, "toy_rlsd.")
        config_section = ToyOptions
        gain: float = 2.0

        @classmethod
        def from_config(cls, cfg):
            return replace(super().from_config(cfg), gain=cfg.toy_rlsd.gain)

        def token_advantages(self, step, seq_adv, logps, teacher_logps, mask, span=None):
            out = self.gain * super().token_advantages(
                step, seq_adv, logps, teacher_logps, mask, span
            )
            CREDIT.append(out.detach().clone())
            return out

    return ToyRLSD


@pytest.fixture
def toy():
    CREDIT.clear()
    kind = define_toy()
    yield kind
    METHODS.pop(kind.name)  # other tests see the built-in methods only


def test_a_new_method_owns_its_section_in_the_config(toy):
    cfg = load_config(
        None, {"algorithm.name": "toy_rlsd", "toy_rlsd.gain": "3", "rlsd.eps_w": "0.1"}
    )
    assert cfg.toy_rlsd.gain == 3.0 and Config().toy_rlsd.gain == 2.0
    assert method_for(cfg) == toy(eps_w=0.1, gain=3.0)
    with pytest.raises(
        ConfigError, match="toy_rlsd.gain: only applies to algorithm.name=toy_rlsd, not rlsd"
    ):
        load_config(None, {"algorithm.name": "rlsd", "toy_rlsd.gain": "3"})
    with pytest.raises(ConfigError, match="toy_rlsd.gain: must be >= 0, got -1.0"):
        load_config(None, {"algorithm.name": "toy_rlsd", "toy_rlsd.gain": "-1"})
    with pytest.raises(ConfigError, match="opsd.beta: only applies to algorithm.name=grpo_opsd"):
        load_config(None, {"algorithm.name": "toy_rlsd", "opsd.beta": "0.5"})
    load_config(None, {"algorithm.name": "rlsd", "toy_rlsd.gain": "2.0"})  # a default restated


def test_a_new_method_is_in_the_help_and_the_choices(toy):
    from rlsd.commands.parser import fields_help

    rows = {key: (default, text) for key, default, text in help_rows()}
    assert rows["toy_rlsd.gain"] == ("2.0", "Scale of RLSD's token credit (a toy option).")
    name_help = rows["algorithm.name"][1]
    assert "toy_rlsd (RLSD's credit times toy_rlsd.gain)" in name_help
    assert name_help.endswith("One of: grpo, rlsd, opsd, grpo_opsd, opd, toy_rlsd.")
    assert "toy_rlsd.gain  [default: 2.0]" in fields_help()
    with pytest.raises(
        ConfigError, match="must be one of grpo, rlsd, opsd, grpo_opsd, opd, toy_rlsd"
    ):
        load_config(None, {"algorithm.name": "toy"})


def test_a_new_method_trains_with_its_own_credit_and_saves_its_section(toy, tiny_overrides):
    """Its token_advantages is the credit the update uses (the logged credit of every trained
    row is what it returned), and the run's saved config holds its section."""
    from rlsd.step.trainer import train

    overrides = {
        **tiny_overrides,
        "algorithm.name": "toy_rlsd",
        "toy_rlsd.gain": "0.5",
        "train.steps": "1",
    }
    run_dir = train(load_config(None, overrides))
    assert CREDIT, "the update never asked the toy for its credit"
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    logged = [s for s in map(json.loads, lines) if "token_advantage" in s]
    credit = torch.cat(CREDIT)
    assert len(logged) == credit.shape[0] > 0
    for row, sample in enumerate(logged):
        n = len(sample["token_ids"])
        torch.testing.assert_close(
            torch.tensor(sample["token_advantage"]), credit[row, :n], atol=1e-5, rtol=0
        )
    assert "toy_rlsd:\n  gain: 0.5\n" in to_yaml(load_config(run_dir / "config.yaml", saved=True))


def test_a_method_section_may_not_replace_a_built_in_one():
    @dataclass(frozen=True)
    class Train(Method):
        name, summary, description = "train", "a clash", "A clash"
        options = ("train.",)
        config_section = ToyOptions

    try:
        with pytest.raises(TypeError, match="would replace the built-in section train"):
            Config()
    finally:
        METHODS.pop("train")
    with pytest.raises(TypeError, match="list 'other.'"):

        @dataclass(frozen=True)
        class Other(Method):
            name, summary, description = "other", "no prefix", "No prefix"
            config_section = ToyOptions
