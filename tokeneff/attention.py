"""Decode-step attention over a prefix that every row shares (rollout_backend=sliced).

The prompts of one batch share their instruction and worked examples: 62 of the 74 tokens of an embedded
multiplication prompt, 78 of ~124 for SVAMP. Repeated into every row of the KV cache, that prefix is read once per
row and per step, by one small product per (row, KV head), which on a CPU runs far below the machine's rate (0.6 ms
a layer at 24 rows x 116 tokens on SmolLM2-135M, a fifth of a decode step). Here the prefix's keys and values
are stored once, and the scores of all rows' queries against it are one matrix product per KV head; the rows' own
columns (their prompt's remainder and what they generated) go through the usual per-row product, and one softmax
runs over both (the "cascade" attention of serving engines). Same float32 arithmetic as SDPA, summed in another
order.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "tokeneff_shared_prefix"
"""the attention implementation's name in transformers' AttentionInterface"""


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix=None, **kwargs):
    """transformers' attention-interface signature. `shared_prefix[layer]` = (keys, values), each [kv_heads, P, dim],
    prepended to every row's `key`/`value` ([rows, kv_heads, R, dim]); `attention_mask` (boolean, True attends, or
    additive) covers the R columns only. Without `shared_prefix`, SDPA as transformers runs it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    pk, pv = shared_prefix[module.layer_idx]
    rows, heads, q_len, dim = query.shape
    kv_heads, prefix = pk.shape[0], pk.shape[1]
    if q_len != 1 or dropout:  # not a decode step (never so in our loops): the prefix repeated, as SDPA needs it
        full = [torch.cat([p.expand(rows, -1, -1, -1), x], 2) for p, x in ((pk, key), (pv, value))]
        if attention_mask is not None:
            ones = attention_mask.new_ones(*attention_mask.shape[:-1], prefix) if attention_mask.dtype == torch.bool \
                else attention_mask.new_zeros(*attention_mask.shape[:-1], prefix)
            attention_mask = torch.cat([ones, attention_mask], -1)
        return sdpa_attention_forward(module, query, *full, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.view(rows, kv_heads, group, dim)
    by_head = q.transpose(0, 1).reshape(kv_heads, rows * group, dim)  # every row's queries of one KV head together
    scores = torch.cat([torch.matmul(by_head, pk.transpose(1, 2)).view(kv_heads, rows, group, prefix).transpose(0, 1),
                        torch.matmul(q, key.transpose(-1, -2))], -1).mul_(scale)
    if attention_mask is not None:
        own = scores[..., prefix:]
        if attention_mask.dtype == torch.bool:
            own.masked_fill_(~attention_mask, float("-inf"))
        else:
            own.add_(attention_mask)
    weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)  # (bfloat16 sampling: as SDPA, in float32)
    on_prefix = weights[..., :prefix].transpose(0, 1).reshape(kv_heads, rows * group, prefix)
    out = torch.matmul(weights[..., prefix:], value)
    out += torch.matmul(on_prefix, pv).view(kv_heads, rows, group, dim).transpose(0, 1)
    return out.reshape(rows, 1, heads, dim), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, shared_prefix_attention)


@contextlib.contextmanager
def shared_prefix_context(model):
    """`model` (a transformers model, not a peft wrapper) attends with `shared_prefix_attention` inside the block;
    yields False, and changes nothing, where the model attends otherwise than by SDPA (eager softcapping, sinks)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register()
    model.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
