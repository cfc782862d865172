"""Completion log-probs: equal to the naive full log-softmax, with far less peak memory."""

import os
import subprocess
import sys
import textwrap

import torch

from rlsd.engine.logprobs import TokenScorer, naive_logprobs, pads_to_the_right
from rlsd.engine.models import load_model
from rlsd.engine.rollout import completion_mask_from, join, left_pad
from rlsd.schema.config import ModelConfig


def scoring_inputs(tokenizer, gen):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    p_ids, p_mask = left_pad(prompts, tokenizer.pad_token_id)
    c_ids = torch.randint(3, 300, (3, 6), generator=gen)
    c_ids[1, 2] = tokenizer.eos_token_id  # second completion stops early
    c_mask = completion_mask_from(c_ids, [tokenizer.eos_token_id])
    ids, attn = join(p_ids, p_mask, c_ids.masked_fill(~c_mask, tokenizer.pad_token_id), c_mask)
    return ids, attn, c_mask


def test_chunked_logprobs_equal_naive_values_and_gradients(tiny_model_dir):
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), lora=False), torch.float32)
    ids, attn, c_mask = scoring_inputs(tokenizer, torch.Generator().manual_seed(0))
    scorer = TokenScorer(model, temperature=0.7, chunk_rows=4)  # several chunks
    fast = scorer(ids, attn, c_mask)
    (fast * torch.arange(1.0, 7.0)).sum().backward()
    fast_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    slow = naive_logprobs(model, ids, attn, c_mask, temperature=0.7)
    (slow * torch.arange(1.0, 7.0)).sum().backward()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fast_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6
    )
    assert (fast[~c_mask] == 0).all() and (fast[c_mask] < 0).all()


def test_pads_to_the_right_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    order, undo = pads_to_the_right(mask)
    assert order.tolist() == [[2, 3, 4, 0, 1], [0, 1, 2, 3, 4], [1, 2, 3, 4, 0]]
    assert mask.gather(1, order).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    values = torch.arange(15).view(3, 5)
    assert values.gather(1, order).gather(1, undo).equal(values)  # undo undoes the order


def test_the_scorer_never_masks_a_position_from_every_key(tiny_model_dir):
    """The training forward runs with the padding at the end, so each row's first token is
    real and every position can attend to it (no fully masked attention rows, whose backward
    some GPU kernels turn into NaN); the values and gradients equal the naive left-padded
    pass (test above)."""
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), lora=False), torch.float32)
    ids, attn, c_mask = scoring_inputs(tokenizer, torch.Generator().manual_seed(2))
    assert (attn[:, 0] == 0).any()  # the batch is left-padded
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    TokenScorer(model)(ids, attn, c_mask)
    hook.remove()
    assert len(seen) == 1 and (seen[0][:, 0] == 1).all()
    assert seen[0].sum(-1).equal(attn.sum(-1))  # the same tokens, moved


def test_lora_scorer_matches_naive(tiny_model_dir):
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), lora_r=4), torch.float32)
    ids, attn, c_mask = scoring_inputs(tokenizer, torch.Generator().manual_seed(1))
    fast = TokenScorer(model)(ids, attn, c_mask)
    torch.testing.assert_close(fast, naive_logprobs(model, ids, attn, c_mask))


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from rlsd.engine.logprobs import gather_logprobs

    def status(key):  # MiB from /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    torch.manual_seed(0)
    rows, hidden, vocab = 2048, 64, 32000
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * 0.02
    targets = torch.randint(0, vocab, (rows,))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    if sys.argv[1] == "naive":
        out = torch.log_softmax(h @ w.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        out = gather_logprobs(h, w, targets, chunk_rows=128)
    out.sum().backward()
    print(status("VmHWM") - before)
""")


def test_chunked_path_peak_memory_is_below_naive_at_vocab_32k():
    # glibc keeps freed heap memory in the process; pinning its mmap threshold makes every large
    # tensor an mmap that is returned on free, so peak RSS follows the peak of live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, mode],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        return float(out.stdout.strip())

    naive, chunked = peak("naive"), peak("chunked")
    # naive holds (2048, 32000) fp32 logits and their log-softmax: >= 500 MB
    assert naive > 400, naive
    assert chunked < 0.3 * naive, (chunked, naive)
