"""Batched sampling: every prompt of a step x G completions in one `generate` call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor
    """[B, P + C]: left-padded context (prompt, plus a replay prefix) followed by the right-padded completion"""
    attention_mask: torch.Tensor
    context_len: int
    """P: the completion starts at column P"""
    completions: list[list[int]]
    """generated tokens of each row, up to and including the first EOS"""
    truncated: list[bool]
    """True where no EOS came within max_new_tokens"""


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


@torch.no_grad()
def sample(model, tokenizer, contexts: list[list[int]], num_samples: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    """Generate `num_samples` completions for each context (token ids); rows are context-major."""
    device = next(model.parameters()).device
    ids, mask = left_pad([c for c in contexts for _ in range(num_samples)], tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    gen_kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                           top_p=top_p, top_k=0)
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
    return Rollout(input_ids=torch.cat([ids.cpu(), comp_ids], 1), attention_mask=torch.cat([mask.cpu(), comp_mask], 1),
                   context_len=ids.shape[1], completions=completions, truncated=truncated)


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)
