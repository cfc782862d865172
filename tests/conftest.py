"""Shared fixtures: a tiny random Llama model with a tokenizer built offline, and run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Calculate 12 + 7. Answer: 19",
    "What is 3 - 5? Answer: -2",
    "Here is a reference solution: 42. Solve the problem in your own way.",
    "End your reply with a final line of the form 'Answer: <answer>'.",
    "To calculate the sum we add the numbers: 1 2 3 4 5 6 7 8 9 0 + - = .",
] * 20

TESTS_DIR = Path(__file__).parent


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    return fast


def build_model_dir(
    path: Path, vocab: int | None = None, seed: int = 0, tokenizer_vocab: int = 400
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(tokenizer_vocab)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_overrides(tiny_model_dir, tmp_path) -> dict[str, str]:
    """Overrides that make the quick-start recipe run on the tiny model in seconds."""
    return {
        "model.name": str(tiny_model_dir),
        "model.lora_r": "4",
        "model.threads": "1",
        "data.size": "64",
        "rollout.max_new_tokens": "12",
        "rollout.num_generations": "4",
        "train.prompts_per_step": "2",
        "train.micro_batch_size": "4",
        "train.steps": "2",
        "train.lr": "0.01",
        "reward.verifiers": f"{TESTS_DIR / 'rewards_for_tests.py'}:length_reward",
        "output.dir": str(tmp_path / "runs"),
        "output.run_name": "t",
        "output.progress": "false",
        "output.log_samples": "0",
        "output.report": "false",
    }
