"""The static-cache decoder: the eager decoder's tokens (greedy, and sampled with the same seed)
while rows leave by bucket, the bucket schedule, `graph` refused off CUDA, a training step with
it; on CUDA only, the captured graphs give the static decoder's tokens."""

import math
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch

from rlsd.engine import decode_static as static_module
from rlsd.engine.decode import decode
from rlsd.engine.decode_static import bucket_for, buckets, decode_static
from rlsd.engine.rollout import left_pad
from rlsd.schema.config import ConfigError, load_config

TEXTS = [
    "Calculate 12 + 7.",
    "What is 3 - 5? Think.",
    "Hi",
    "To calculate the sum",
    "Here is a reference",
    "End your reply",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model with its matrices scaled up: varied greedy text (the plain random model
    repeats one token), so stop tokens end rows at many different steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id)


def staggered_stops(model, ids, mask, pad) -> list[int]:
    """Stop ids that end the greedy rows at different steps: row r's token at step 2r + 1."""
    free = decode(model, ids, mask, 1, 16, [pad], pad, greedy=True)
    return [pad, *{int(free[r, 2 * r + 1]) for r in range(free.shape[0] - 1)}]


def spy_widths(monkeypatch) -> list[int]:
    widths: list[int] = []
    real = static_module.StaticStep.compact

    def compact(self, slots, width):
        widths.append(width)
        return real(self, slots, width)

    monkeypatch.setattr(static_module.StaticStep, "compact", compact)
    return widths


def test_greedy_equals_the_eager_decoder_while_buckets_shrink(lm, monkeypatch):
    model, tok = lm
    ids, mask = prompts(tok)
    pad = tok.pad_token_id
    stops = staggered_stops(model, ids, mask, pad)
    widths = spy_widths(monkeypatch)
    eager = decode(model, ids, mask, 3, 16, stops, pad, greedy=True)
    ours = decode_static(model, ids, mask, 3, 16, stops, pad, greedy=True)
    assert torch.equal(ours, eager)
    lengths = (eager != pad).sum(1)
    assert len(set(lengths.tolist())) >= 4  # rows finished at several different steps
    assert (ours[:, -1] != pad).any()  # and some ran to the end
    assert len(widths) >= 2 and widths == sorted(widths, reverse=True)  # shrank, by bucket
    assert set(widths) <= set(buckets(18))


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)],
)
def test_sampling_draws_as_the_eager_decoder(lm, sampling, monkeypatch):
    """Same uniform draws, in the same row order: the same tokens under the same seed."""
    model, tok = lm
    ids, mask = prompts(tok)
    pad = tok.pad_token_id
    stops = [pad, *range(5, len(tok), 9)]  # ~1 in 9 tokens ends a row: rows stop at random
    widths = spy_widths(monkeypatch)
    torch.manual_seed(1)
    eager = decode(model, ids, mask, 4, 12, stops, pad, **sampling)
    torch.manual_seed(1)
    ours = decode_static(model, ids, mask, 4, 12, stops, pad, **sampling)
    assert torch.equal(ours, eager)
    assert len(set((eager != pad).sum(1).tolist())) >= 4 and widths  # rows left at random
    assert len({tuple(r.tolist()) for r in ours}) > 6  # sampled, not all the same


def test_bucket_schedule():
    assert buckets(18) == [18, 16, 8, 4, 2, 1]
    assert buckets(16) == [16, 8, 4, 2, 1]
    assert buckets(1) == [1]
    sizes = buckets(12)
    live = [12, 11, 9, 8, 7, 5, 4, 3, 2, 1]
    assert [bucket_for(n, sizes) for n in live] == [12, 12, 12, 8, 8, 8, 4, 4, 2, 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_graph_is_refused_without_cuda(lm):
    with pytest.raises(ConfigError, match="rollout.decoder: graph .*CUDA"):
        load_config(None, {"rollout.decoder": "graph"})
    model, tok = lm
    ids, mask = prompts(tok)
    with pytest.raises(ConfigError, match="rollout.decoder: graph .*CUDA"):
        decode_static(model, ids, mask, 2, 4, [0], 0, greedy=True, graphs=True)


def test_graph_is_refused_on_the_cpu_device():
    with pytest.raises(ConfigError, match="rollout.decoder: graph .*model.device cpu"):
        load_config(None, {"rollout.decoder": "graph", "model.device": "cpu"})
    assert load_config(None, {"rollout.decoder": "static"}).rollout.decoder == "static"


def test_a_training_step_runs_with_the_static_decoder(tiny_overrides, monkeypatch):
    from rlsd.step.trainer import setup, train_step

    calls = []
    real = static_module.decode_static

    def counted(*args, **kwargs):
        calls.append(kwargs.get("graphs"))
        return real(*args, **kwargs)

    monkeypatch.setattr("rlsd.engine.rollout.decode_static", counted)
    run = setup(load_config(None, {**tiny_overrides, "rollout.decoder": "static"}))
    metrics = train_step(run, 1)
    assert calls and not any(calls)  # the static decoder, without graphs
    assert metrics["completion/length_mean"] > 0 and metrics["train/nonfinite"] == 0
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphs_give_the_static_decoders_tokens(lm):
    model, tok = lm
    model = model.cuda()
    ids, mask = (t.cuda() for t in prompts(tok))
    pad = tok.pad_token_id
    stops = staggered_stops(model, ids, mask, pad)
    static = decode_static(model, ids, mask, 3, 16, stops, pad, greedy=True)
    graph = decode_static(model, ids, mask, 3, 16, stops, pad, greedy=True, graphs=True)
    assert torch.equal(graph, static)
    assert torch.equal(static, decode(model, ids, mask, 3, 16, stops, pad, greedy=True))
    torch.manual_seed(2)
    sampled = decode_static(model, ids, mask, 4, 12, stops, pad, top_k=20)
    torch.manual_seed(2)
    assert torch.equal(
        sampled, decode_static(model, ids, mask, 4, 12, stops, pad, top_k=20, graphs=True)
    )
    model.cpu()


def test_graph_bookkeeping_with_a_stand_in_for_cuda_graphs(lm, monkeypatch):
    """The CUDA calls replaced by stand-ins (capture runs the step once, replay reruns it into
    the captured output tensor): warm-ups, fill-count rewinds, per-bucket outputs and the
    in-place buffers give the static decoder's tokens."""
    graphs = []
    real_forward = static_module.StaticStep.forward

    class Graph:
        def replay(self):
            assert self.step.width == self.width  # replayed at the width it was captured at
            self.out.copy_(real_forward(self.step))

        def pool(self):
            return None

    @contextmanager
    def capture(graph, pool=None, capture_error_mode="global"):
        graph.capturing = True
        graphs.append(graph)
        yield
        graph.capturing = False

    def forward(self):
        out = real_forward(self)
        if graphs and getattr(graphs[-1], "capturing", False):
            graphs[-1].step, graphs[-1].width, graphs[-1].out = self, self.width, out
        return out

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(static_module.StaticStep, "forward", forward)
    monkeypatch.setattr(static_module, "require_cuda", lambda device: None)
    for name, value in {
        "Stream": lambda: stream,
        "current_stream": lambda: stream,
        "stream": lambda s: nullcontext(),
        "CUDAGraph": Graph,
        "graph": capture,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    model, tok = lm
    ids, mask = prompts(tok)
    pad = tok.pad_token_id
    stops = staggered_stops(model, ids, mask, pad)
    static = decode_static(model, ids, mask, 3, 16, stops, pad, greedy=True)
    graph = decode_static(model, ids, mask, 3, 16, stops, pad, greedy=True, graphs=True)
    assert torch.equal(graph, static)
    widths = [g.width for g in graphs]
    assert len(widths) >= 3 and widths == sorted(set(widths), reverse=True)  # one per bucket
    torch.manual_seed(3)
    sampled = decode_static(model, ids, mask, 4, 12, stops, pad, top_p=0.9)
    torch.manual_seed(3)
    assert torch.equal(
        sampled, decode_static(model, ids, mask, 4, 12, stops, pad, top_p=0.9, graphs=True)
    )
