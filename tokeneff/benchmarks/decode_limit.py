"""How close do CPU rollouts come to this machine's limit? (`tokeneff bench --decode-limit`)

One decode step of a causal LM at batch B is, apart from attention over the cache, one matrix product per
linear layer: [B, in] x [in, out]. Its floor on this machine is the sum over the step's linear layers of
    2 * B * in * out / (the GEMM rate this machine reaches on exactly that shape, on the same threads),
plus attention (2 * 2 * B * context * hidden per layer) at the best of those rates. We time the real step (the
model's forward with a KV cache, as in rollout.decode_loop) and report floor / measured: the fraction of the
machine's matrix-product speed that the rollout reaches. Both sides run on the threads the runs use (1).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..utils import set_threads, write_json


def _gemm_rate(m: int, k: int, n: int, min_seconds: float = 0.2) -> float:
    """FLOP/s of a float32 [m, k] x [k, n] product, the best of three timed bursts."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def linear_shapes(model) -> Counter:
    """(in, out) of every matrix a decode step multiplies by, with multiplicity (the LM head included)."""
    shapes: Counter = Counter()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[(mod.in_features, mod.out_features)] += 1
    return shapes


@torch.no_grad()
def decode_step_seconds(model, batch: int, context: int, steps: int = 12) -> float:
    """Median wall time of one cached decode step at `batch` rows after a `context`-token prefill, as our decode
    loop runs it: forward with attention mask and positions, last-position logits, a sampled token per row."""
    from transformers import DynamicCache

    from ..rollout import pick_next

    cache = DynamicCache(config=model.config)
    vocab = min(model.config.vocab_size, 1000)
    ids = torch.randint(10, vocab, (batch, context))
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = torch.randint(10, vocab, (batch,))
    times = []
    for i in range(steps):
        pos = torch.full((batch, 1), context + i)
        mask = torch.ones(batch, context + i + 1, dtype=torch.long)
        t0 = time.perf_counter()
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
        tok = pick_next(logits).clamp(max=vocab - 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def decode_limit(model_name: str = "smollm2-135m", batches=(24, 50), context: int = 96, threads: int = 1,
                 out: str | None = None) -> list[dict[str, Any]]:
    from ..models import load_model
    from ..warmstart import model_folder
    from .benchio import device_name

    set_threads(threads)
    model, _ = load_model(model_folder(model_name))
    model.eval()
    shapes = linear_shapes(model)
    cfg = model.config
    rows = []
    for b in batches:
        rates = {s: _gemm_rate(b, *s) for s in shapes}
        floor = sum(n * 2 * b * s[0] * s[1] / rates[s] for s, n in shapes.items())
        attn_flops = 4 * b * context * cfg.hidden_size * cfg.num_hidden_layers
        floor += attn_flops / max(rates.values())
        flops = sum(n * 2 * b * s[0] * s[1] for s, n in shapes.items()) + attn_flops
        measured = decode_step_seconds(model, b, context)
        rows.append(dict(device=device_name(), model=model_name, threads=threads, batch=b, context=context,
                         step_ms=1000 * measured, floor_ms=1000 * floor, fraction_of_limit=floor / measured,
                         gflop_per_step=flops / 1e9, achieved_gflops=flops / measured / 1e9,
                         gemm_gflops_by_shape={f"{b}x{k}x{n}": r / 1e9 for (k, n), r in rates.items()},
                         tokens_per_s=b / measured))
    if out:
        tag = device_name().split()[0].lower()
        write_json(Path(out) / f"decode_limit_{tag}_{model_name.replace('/', '_')}.json", rows)
    return rows
