"""Batched sampling: every prompt of a step x G completions in one `generate` call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    context_ids: torch.Tensor
    """[U, P] left-padded contexts (prompt, plus a replayed partial answer), one per group"""
    context_mask: torch.Tensor
    completion_ids: torch.Tensor
    """[U * G, C] right-padded completions, context-major (rows g*G .. g*G+G-1 belong to context g)"""
    completion_mask: torch.Tensor
    completions: list[list[int]]
    """generated tokens of each row, up to and including the first EOS"""
    truncated: list[bool]
    """True where no EOS came within max_new_tokens"""
    group_size: int


def build_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The model's chat template where it has one; otherwise a plain Q/A transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lines = [f"{'Question' if m['role'] == 'user' else 'Answer'}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAnswer:"


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id}


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool = True):
    """Run the body over left-padded contexts; returns (last hidden states, KV cache)."""
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = DynamicCache(config=base.config) if use_cache else None
    out = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             past_key_values=cache, use_cache=use_cache)
    return out.last_hidden_state, cache


@torch.no_grad()
def sample(model, tokenizer, contexts: list[list[int]], num_samples: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    """Generate `num_samples` completions for each context (token ids); rows are context-major.

    The contexts' KV cache is computed once and shared by their G samples (a G-fold saving on the prompt).
    """
    device = next(model.parameters()).device
    ctx_ids, ctx_mask = left_pad(contexts, tokenizer.pad_token_id)
    ids = ctx_ids.to(device).repeat_interleave(num_samples, 0)
    mask = ctx_mask.to(device).repeat_interleave(num_samples, 0)
    gen_kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                           top_p=top_p, top_k=0)
    if num_samples > 1 and ctx_ids.shape[1] > 1:
        # all but the last context token: generate() then feeds the last one and continues from the cache
        _, cache = prefill(model, ctx_ids[:, :-1].to(device), ctx_mask[:, :-1].to(device))
        cache.batch_repeat_interleave(num_samples)
        gen_kwargs["past_key_values"] = cache
    eos = eos_ids(model, tokenizer)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos), **gen_kwargs)
    gen = out[:, ids.shape[1]:].tolist()
    completions, truncated = [], []
    for row in gen:
        end = next((t for t, tok in enumerate(row) if tok in eos), None)
        completions.append(row[: end + 1] if end is not None else row)
        truncated.append(end is None)
    width = max(1, max(len(c) for c in completions))
    comp_ids = torch.full((len(gen), width), tokenizer.pad_token_id, dtype=torch.long)
    comp_mask = torch.zeros((len(gen), width), dtype=torch.long)
    for i, c in enumerate(completions):
        comp_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        comp_mask[i, : len(c)] = 1
    return Rollout(ctx_ids, ctx_mask, comp_ids, comp_mask, completions, truncated, num_samples)


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)
