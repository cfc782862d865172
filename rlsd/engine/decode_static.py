"""The own decoder on a static KV cache, with the decode step optionally replayed as CUDA graphs.

`rollout.decoder: static` / `graph`; the default stays `own` (`decode.py`) until GPU figures
exist. Same plan as `decode.decode`: each prompt prefilled once (a `DynamicCache`, exactly as
there), its keys and values copied G times into a preallocated transformers `StaticCache`, and
finished rows leaving the batch. Here they leave **by bucket**: the step runs at a few fixed
widths (`buckets`: the batch, then the powers of two below it); a finished row stays in its slot
(computed, ignored) until the live rows fit the next narrower bucket, then the live rows are
copied to the front of every buffer, in order, and the step narrows. With fixed shapes and fixed
buffer addresses the step can be captured once per bucket and replayed per token.

Positions and masks keep `decode.py`'s semantics for left-padded prompts: a row's positions
count its real tokens; the attention mask is the prompt's padding mask followed by ones up to
the cache length (the causal mask, offset by the cache's own fill count, hides the slots not
written yet), so it never changes during decoding. `StaticLayer` has no batch selection (only
the dynamic layers do), so each layer's keys/values are pointed at the leading rows of its own
preallocated tensors; the layer types are checked (full attention only).

Sampling reuses `decode.next_tokens` (its filters and `sample_rows`) outside the graph, on the
live rows only, in the eager decoder's row order: the same uniform draws in the same order, so
sampled tokens equal the eager decoder's whenever the logits do. The logits can differ by
rounding (attention over the whole static cache length, masked, instead of the filled part);
on the CPU in float32 the tests find greedy and sampled tokens equal on the tiny model; in
bfloat16 on a GPU greedy runs may part after a near tie.

CUDA graphs (`graph`): manual `torch.cuda.CUDAGraph` capture, not `torch.compile(mode=
"reduce-overhead")`: no compile time nor recompiles per bucket, the captured kernels are the
eager step's own (so `graph` should give `static`'s tokens exactly: a CUDA-only test checks),
and nothing depends on dynamo tracing transformers' code. Each bucket is captured when first
used (two warm-up steps on a side stream, the cache fill count restored after them), and all of
a call's graphs share one memory pool (replayed in the order captured, widest first). The
captured region reads only the static buffers (token ids, positions, mask, cache) and contains
no host sync (a rotary embedding that reads positions on the host, dynamic or long RoPE, would
fail to capture); the bookkeeping (stop check, compaction) runs outside it, one host sync per
token, two when rows finish. Graphs are captured per call: parameters updated in place keep
their addresses, but a call never replays a graph over weights it did not capture. On the CPU
the tests run this logic with stand-ins for the CUDA calls; the real capture and the GPU speed
are not yet measured (issue 24).
"""

from __future__ import annotations

import torch

from ..schema.config import ConfigError
from .decode import cache_keyword, next_tokens

WARMUP_STEPS = 2  # eager steps on a side stream before each capture (lazy library init)
ALIGN = 16  # cache length rounded up to this: aligned mask rows for the fused attention kernels


def buckets(rows: int) -> list[int]:
    """The batch widths the decode step runs at, widest first: `rows`, then the powers of two
    below it."""
    sizes = {rows}
    size = 1
    while size < rows:
        sizes.add(size)
        size *= 2
    return sorted(sizes, reverse=True)


def bucket_for(live: int, sizes: list[int]) -> int:
    """The narrowest bucket that holds `live` rows."""
    return min(size for size in sizes if size >= live)


class StaticStep:
    """The decode step's fixed buffers: a `StaticCache` for `rows` sequences of up to `length`
    positions, and the step's token ids, positions and mask; a bucket of width w is the leading
    w rows of each. Built from the prefill's `DynamicCache` (B prompts), repeated `group` times."""

    def __init__(self, model, prefilled, prompt_mask, positions, group: int, length: int):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        if len(self.cache.layers) != len(prefilled.layers) or any(
            type(layer) is not StaticLayer for layer in self.cache.layers
        ):
            raise ConfigError(
                "rollout.decoder: static and graph support full-attention models only (this "
                "one has sliding-window or other cache layers); use rollout.decoder own"
            )
        self.filled = prompt_mask.shape[1]  # cache slots written, the same for every row
        self.rows = prompt_mask.shape[0] * group
        self.full = []  # each layer's whole keys and values
        for layer, source in zip(self.cache.layers, prefilled.layers):
            keys, values = source.keys, source.values
            layer.lazy_initialization(
                keys.new_zeros(self.rows, keys.shape[1], 0, keys.shape[3]),
                values.new_zeros(self.rows, values.shape[1], 0, values.shape[3]),
            )
            layer.keys[:, :, : self.filled] = keys.repeat_interleave(group, 0)
            layer.values[:, :, : self.filled] = values.repeat_interleave(group, 0)
            self.full.append((layer.keys, layer.values))
        self.rewind()
        device = prompt_mask.device
        self.ids = torch.zeros(self.rows, 1, dtype=torch.long, device=device)
        self.position = positions[:, -1:].repeat_interleave(group, 0) + 1
        self.mask = torch.ones(self.rows, length, dtype=torch.bool, device=device)
        self.mask[:, : self.filled] = prompt_mask.bool().repeat_interleave(group, 0)
        self.keyword = cache_keyword(model)
        self.width = self.rows

    def rewind(self) -> None:
        """Set every layer's fill count (a device tensor the cache advances) to `filled`."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.filled)

    def narrow(self, width: int) -> None:
        """Run the next steps on the leading `width` rows."""
        for layer, (keys, values) in zip(self.cache.layers, self.full):
            layer.keys, layer.values, layer.batch_size = keys[:width], values[:width], width
        self.width = width

    def compact(self, slots: torch.Tensor, width: int) -> None:
        """Move the rows in `slots` (ascending) to the front, in order, then narrow to `width`."""
        n, filled = slots.shape[0], self.filled
        for keys, values in self.full:
            keys[:n, :, :filled] = keys[slots, :, :filled]
            values[:n, :, :filled] = values[slots, :, :filled]
        self.ids[:n], self.position[:n], self.mask[:n] = (
            self.ids[slots],
            self.position[slots],
            self.mask[slots],
        )
        self.narrow(width)

    def forward(self) -> torch.Tensor:
        """One decode step over the current bucket: (width, V) logits; reads only the buffers."""
        w = self.width
        out = self.model(
            input_ids=self.ids[:w],
            attention_mask=self.mask[:w],
            position_ids=self.position[:w],
            use_cache=True,
            logits_to_keep=1,
            **{self.keyword: self.cache},
        )
        return out.logits[:, -1]

    def advance(self) -> None:
        """After a step: the next token sits one position and one cache slot further."""
        self.position[: self.width] += 1
        self.filled += 1


class GraphSteps:
    """`StaticStep.forward` captured as one CUDA graph per bucket width, replayed per token."""

    def __init__(self, step: StaticStep):
        self.step = step
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # each graph's output buffer
        self.pool = None

    def __call__(self) -> torch.Tensor:
        width = self.step.width
        if width not in self.graphs:
            self.capture(width)
        self.graphs[width].replay()
        return self.logits[width]

    def capture(self, width: int) -> None:
        step = self.step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # writes only the current slot, which the replay
                step.forward()  # overwrites; the fill count goes back after each
                step.rewind()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.logits[width] = step.forward()
        step.rewind()
        self.pool = graph.pool()
        self.graphs[width] = graph


def require_cuda(device: torch.device) -> None:
    """Refuse `graph` on a device without CUDA graphs, naming the field."""
    if device.type != "cuda":
        raise ConfigError(
            f"rollout.decoder: graph captures CUDA graphs and needs a CUDA device, not "
            f"{device.type}; use rollout.decoder static or own"
        )


def prefill(model, prompt_ids, prompt_mask, group: int, max_new_tokens: int):
    """Run the prompts once, as `decode.decode` does: ((B*group, V) last logits, StaticStep)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask.long(),
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword(model): cache},
    )
    logits = out.logits[:, -1].repeat_interleave(group, 0)
    length = -(-(prompt_ids.shape[1] + max_new_tokens) // ALIGN) * ALIGN
    return logits, StaticStep(model, cache, prompt_mask, positions, group, length)


@torch.no_grad()
def decode_static(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group: int,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    graphs: bool = False,
) -> torch.Tensor:
    """`decode.decode` on a static cache, rows leaving by bucket; with `graphs` (CUDA only) each
    bucket's step is a CUDA graph. Returns (B*group, T) completion ids like `decode.decode`."""
    device = prompt_ids.device
    if graphs:
        require_cuda(device)
    logits, step = prefill(model, prompt_ids, prompt_mask, group, max_new_tokens)
    run_step = GraphSteps(step) if graphs else step.forward
    sizes = buckets(step.rows)
    alive = torch.arange(step.rows, device=device)  # the output row of each live row
    slots = alive.clone()  # its row in the step's buffers
    tokens = torch.full((step.rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    stops = torch.tensor(stop_ids, device=device)
    width = 0
    for t in range(max_new_tokens):
        chosen = next_tokens(logits, greedy, temperature, top_k, top_p)
        tokens[alive, t] = chosen
        width = t + 1
        keep = ~torch.isin(chosen, stops)
        live = int(keep.sum())  # the token's one host sync (a second when rows finished)
        if t == max_new_tokens - 1 or live == 0:
            break
        if live < keep.shape[0]:
            index = keep.nonzero().flatten()
            alive, slots, chosen = alive[index], slots[index], chosen[index]
            if bucket_for(live, sizes) < step.width:
                step.compact(slots, bucket_for(live, sizes))
                slots = torch.arange(live, device=device)
        step.ids[slots, 0] = chosen
        logits = run_step()
        step.advance()
        if slots.shape[0] < step.width:
            logits = logits[slots]
    return tokens[:, :width]
