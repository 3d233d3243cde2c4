"""Batched sampling: every prompt of a step x G completions in one batch, the prompt's KV cache shared by its group."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .config import BACKENDS
from .errors import TokeneffError


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


def pick_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
              greedy: bool = False) -> torch.Tensor:
    """Next token per row: argmax, or a draw from softmax(logits / T) restricted to the top-p nucleus."""
    if greedy:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_p < 1:
        from transformers import TopPLogitsWarper

        scores = TopPLogitsWarper(top_p)(None, scores)
    try:
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1)
    except RuntimeError as e:  # torch's own check, no extra sync: the model's output is not finite
        if "probability tensor" not in str(e):
            raise
        raise TokeneffError("sampling failed: the model's next-token probabilities are not finite (are its weights, or "
                            "the LoRA update, finite? a damaged model folder or a too large lr)") from None


def _share_prefix(model, cache, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, min_shared: int = 8):
    """Forward the tokens every context starts with once, into `cache` for all rows; return what is left.

    Prompts of one task share their instruction and worked examples (most of an evaluation prompt), so a batch
    of U contexts prefills that part once instead of U times. Returns the ids still to forward, the attention
    mask over [shared | ids] (padding sits between the two, masked out) and the position ids of `ids`."""
    lens = ctx_mask.sum(-1)
    width = ctx_ids.shape[1]
    rows = [ctx_ids[i, width - int(n):] for i, n in enumerate(lens.tolist())]
    limit = int(lens.min()) - 1  # every context keeps at least one token of its own
    shared = 0
    if len(rows) > 1 and limit > 0:
        same = (torch.stack([r[:limit] for r in rows]) == rows[0][:limit]).all(0)
        shared = int(same.int().cumprod(0).sum())
    if shared < min_shared:
        return ctx_ids, ctx_mask, (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    # the shared tokens sit right-aligned in every row: all rows are at least `shared` long
    model(input_ids=rows[0][None, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(len(rows))
    suffix_ids, suffix_mask = left_pad([r[shared:].tolist() for r in rows], 0)
    suffix_ids, suffix_mask = suffix_ids.to(ctx_ids.device), suffix_mask.to(ctx_ids.device)
    full = torch.cat([suffix_mask.new_ones(len(rows), shared), suffix_mask], 1)
    return suffix_ids, full, (full.cumsum(-1) - 1).clamp(min=0)[:, shared:]


def prefill_groups(model, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int):
    """Prefill each context once (the prefix all contexts share only once) and repeat its cache to its G rows.
    Returns the first token's logits, the DynamicCache and the attention mask, all with U * G rows."""
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = DynamicCache(config=base.config)
    ids, ctx_mask, pos = _share_prefix(model, cache, ctx_ids, ctx_mask)
    out = model(input_ids=ids, attention_mask=ctx_mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    logits = out.logits[:, -1].repeat_interleave(num_samples, 0)
    cache.batch_repeat_interleave(num_samples)
    return logits, cache, ctx_mask.repeat_interleave(num_samples, 0)


def decode_loop(model, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int, max_new_tokens: int,
                eos: set[int], **pick) -> list[list[int]]:
    """Token-by-token sampling with a KV cache. Each context is prefilled once and its cache copied to its G
    rows; a row that emits EOS leaves the batch (its cache rows are dropped), so the step's cost follows the
    rows still running rather than the longest one, which `generate` pays for every row."""
    logits, cache, mask = prefill_groups(model, ctx_ids, ctx_mask, num_samples)
    live = torch.arange(mask.shape[0], device=mask.device)  # original row of each row still in the batch
    next_pos = mask.sum(-1)
    eos_ids = torch.tensor(sorted(eos), device=mask.device)
    gen: list[list[int]] = [[] for _ in range(mask.shape[0])]
    for t in range(max_new_tokens):
        tok = pick_next(logits, **pick)
        for r, k in zip(live.tolist(), tok.tolist(), strict=True):
            gen[r].append(k)
        keep = ~torch.isin(tok, eos_ids)
        if t == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            live, tok, mask, next_pos = live[idx], tok[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return gen


def static_decode_loop(model, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int,
                       max_new_tokens: int, eos: set[int], compile: bool = False, **pick) -> list[list[int]]:
    """decode_loop on preallocated tensors: the KV cache (a transformers StaticCache) and the attention mask are
    sized context + max_new_tokens once, and each step writes one column in place instead of concatenating.
    Finished rows stay in the batch until the running ones are at most half of it; then the batch shrinks to
    them. Halving bounds the shapes a compiled step sees to log2(rows) and costs no more than shrinking at every
    EOS on a CPU (README, "Memory and speed"). Rows run on past their EOS; `sample` cuts each at its first."""
    from transformers import StaticCache

    logits, grown, ctx_mask = prefill_groups(model, ctx_ids, ctx_mask, num_samples)
    rows, width = ctx_mask.shape
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = StaticCache(config=base.config, max_cache_len=width + max_new_tokens - 1)
    for layer, src in zip(cache.layers, grown.layers, strict=True):
        layer.lazy_initialization(src.keys, src.values)
        layer.keys[:, :, :width], layer.values[:, :, :width] = src.keys, src.values
        layer.cumulative_length.fill_(width)
    del grown
    mask = ctx_mask.new_zeros(rows, width + max_new_tokens - 1)
    mask[:, :width] = ctx_mask
    ctx_len = ctx_mask.sum(-1)
    live = torch.arange(rows, device=mask.device)  # original row of each row in the batch
    done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    eos_ids = torch.tensor(sorted(eos), device=mask.device)
    gen = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=mask.device)
    forward = compiled_forward(model) if compile else model
    for t in range(max_new_tokens):
        tok = pick_next(logits, **pick)
        gen[live, t] = tok
        done |= torch.isin(tok, eos_ids)
        running = len(done) - int(done.sum())
        if t == max_new_tokens - 1 or running == 0:
            break
        if 2 * running <= len(done):
            idx = (~done).nonzero().squeeze(1)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            live, tok, mask, ctx_len, done = live[idx], tok[idx], mask[idx], ctx_len[idx], done[idx]
        mask[:, width + t] = 1
        logits = forward(input_ids=tok[:, None], attention_mask=mask, position_ids=(ctx_len + t)[:, None],
                         past_key_values=cache, use_cache=True).logits[:, -1]
    return gen.tolist()


@contextlib.contextmanager
def merged_lora(model):
    """Sample with each LoRA layer's weight W + scale * B @ A in place of W and the adapter switched off: one
    matrix product per layer instead of three. The original weights are put back untouched (not un-merged by
    subtraction, which would round them), so training continues on exactly the weights it had."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or not hasattr(model, "disable_adapter") or any(m.merged or m.lora_variant for m in layers):
        yield
        return
    originals = [m.base_layer.weight for m in layers]
    try:
        for m, w in zip(layers, originals, strict=True):
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            m.base_layer.weight = torch.nn.Parameter(w + delta, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for m, w in zip(layers, originals, strict=True):
            m.base_layer.weight = w


def compiled_forward(model):
    """`model`'s forward under torch.compile (inductor; CUDA graphs on a GPU), compiled once per model class and
    mode and reused by later rollouts: the compiled function holds no model, so none is kept alive by it."""
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
    return functools.partial(_compiled(type(model), mode), model)


@functools.cache
def _compiled(cls: type, mode: str | None):
    return torch.compile(cls.forward, mode=mode)


def hf_generate(model, tokenizer, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int,
                max_new_tokens: int, eos: set[int], temperature: float = 1.0, top_p: float = 1.0,
                greedy: bool = False, static: bool = False) -> list[list[int]]:
    """transformers `generate` on every context repeated G times (static: a fixed-shape, compilable cache)."""
    ids = ctx_ids.repeat_interleave(num_samples, 0)
    mask = ctx_mask.repeat_interleave(num_samples, 0)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    if static:
        kw["cache_implementation"] = "static"
    elif num_samples > 1 and ctx_ids.shape[1] > 1:
        # all but the last context token: generate() then feeds the last one and continues from the cache
        _, cache = prefill(model, ctx_ids[:, :-1], ctx_mask[:, :-1])
        cache.batch_repeat_interleave(num_samples)
        kw["past_key_values"] = cache
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos), **kw)
    return out[:, ids.shape[1]:].tolist()


def generate_rows(model, tokenizer, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int,
                  max_new_tokens: int, eos: set[int], backend: str = "tokeneff", compile: bool = False,
                  merge_lora: bool = False, **pick) -> list[list[int]]:
    """The backend's generated rows, each possibly running on past its first EOS (`eos` empty: full length)."""
    if backend == "tokeneff":
        return decode_loop(model, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos, **pick)
    if backend == "static":
        with merged_lora(model) if merge_lora else contextlib.nullcontext():
            return static_decode_loop(model, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos, compile, **pick)
    return hf_generate(model, tokenizer, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos,
                       static=backend == "hf-static", **pick)


@torch.no_grad()
def sample(model, tokenizer, contexts: list[list[int]], num_samples: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, backend: str = "tokeneff",
           compile: bool = False, merge_lora: bool = False) -> Rollout:
    """Generate `num_samples` completions for each context (token ids); rows are context-major.

    Backends: tokeneff, our loop (prompt KV shared by its group, finished rows leave the batch); static, the same
    on a preallocated cache and mask (`compile`: its decode step under torch.compile; `merge_lora`: the adapter
    merged into a sampling copy of the adapted weights); hf, transformers `generate` seeded with the shared prompt
    KV; hf-static, `generate` with a static KV cache (compiled forward and CUDA graphs on a GPU; prompts
    repeated, since a static cache cannot be seeded from another cache).
    """
    if backend not in BACKENDS:
        raise TokeneffError(f"rollout_backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    device = next(model.parameters()).device
    ctx_ids, ctx_mask = left_pad(contexts, tokenizer.pad_token_id)
    ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
    eos = eos_ids(model, tokenizer)
    pick = dict(temperature=temperature, top_p=top_p, greedy=greedy)
    # eval mode: no dropout while sampling, and no activation checkpointing, which in train mode makes
    # transformers drop the KV cache (each new token would then see no context)
    was_training = model.training
    model.eval()
    try:
        gen = generate_rows(model, tokenizer, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos, backend, compile,
                            merge_lora, **pick)
    finally:
        model.train(was_training)
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
    return Rollout(ctx_ids.cpu(), ctx_mask.cpu(), comp_ids, comp_mask, completions, truncated)


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)
