"""Decoding with the LoRA adapter folded into the weights: the same logits and greedy ids as the
unmerged adapter, the base weights put back bit for bit (also after an error), bf16 untouched."""

import pytest
import torch

from rlsd.decode import decode
from rlsd.models import merged_lora
from rlsd.rollout import left_pad


def lora_model(tiny_model_dir, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation, so give it values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def inputs(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = left_pad([tok(t)["input_ids"] for t in ["Calculate 12 + 7.", "Hi there"]],
                         tok.pad_token_id)
    return ids, mask, tok.pad_token_id


def test_merged_logits_and_greedy_ids_equal_the_adapter_and_weights_come_back(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    ids, mask, pad = inputs(tiny_model_dir)
    before = base_weights(model)
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask.long()).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask.long()).logits
        greedy = decode(model, ids, mask, 1, 10, [pad], pad, greedy=True)
        with merged_lora(model):
            merged = model(input_ids=ids, attention_mask=mask.long()).logits
            merged_greedy = decode(model, ids, mask, 1, 10, [pad], pad, greedy=True)
        after = model(input_ids=ids, attention_mask=mask.long()).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)  # applied once, not twice
    assert torch.equal(merged_greedy, greedy)
    assert torch.equal(after, adapted)  # the adapter is on again
    for name, value in base_weights(model).items():
        assert torch.equal(value, before[name]), name  # bit for bit


def test_weights_come_back_after_an_error(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    before = base_weights(model)
    with pytest.raises(RuntimeError, match="boom"), merged_lora(model):
        assert not all(torch.equal(v, before[n]) for n, v in base_weights(model).items())
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[n]) for n, v in base_weights(model).items())
    assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_bf16_and_models_without_lora_are_left_as_they_are(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_model_dir, torch.bfloat16)
    before = base_weights(model)
    with merged_lora(model):  # bf16 would round a small update away: decode unmerged
        assert all(torch.equal(v, before[n]) for n, v in base_weights(model).items())
        assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = {n: p.data_ptr() for n, p in plain.named_parameters()}
    with merged_lora(plain):
        assert all(p.data_ptr() == weights[n] for n, p in plain.named_parameters())
