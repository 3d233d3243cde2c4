"""Batched sampling: every prompt of a step x G completions in one batch, the prompt's KV cache shared by its group."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .attention import NAME as SHARED_PREFIX
from .attention import shared_prefix_context
from .config import ATTENTIONS, BACKENDS, GEMMS, ROLLOUT_DTYPES, STEPS
from .errors import TokeneffError
from .fused_step import fused_or_none
from .kernels import onednn_linears, uses_onednn, weight_state


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


def _base(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool = True):
    """Run the body over left-padded contexts; returns (last hidden states, KV cache)."""
    from transformers import DynamicCache

    base = _base(model)
    cache = DynamicCache(config=base.config) if use_cache else None
    out = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             past_key_values=cache, use_cache=use_cache)
    return out.last_hidden_state, cache


def pick_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
              draw: str = "multinomial") -> torch.Tensor:
    """Next token per row: argmax, or a draw from softmax(logits / T) restricted to the top-p nucleus.

    draw="multinomial" is torch.multinomial, which draws one exponential per vocabulary entry (49,152 per row for
    SmolLM2: 12% of a CPU decode step at batch 24); "inverse-cdf" draws one uniform per row and finds it in the
    running sum of the probabilities (float32, as GPU samplers do: each token's mass is off by at most half an ulp
    of the sum before it, < 6e-8), 12x cheaper on a CPU. Both sample the same distribution from different random
    numbers, so a seed gives different tokens under each."""
    if greedy:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_p < 1:
        from transformers import TopPLogitsWarper

        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = scores.softmax(-1)
    if draw == "inverse-cdf":
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        if torch.isfinite(total).all():
            u = torch.rand(total.shape, dtype=total.dtype, device=total.device) * total
            return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)
    else:
        try:
            return torch.multinomial(probs, 1).squeeze(1)
        except RuntimeError as e:  # torch's own check, no extra sync: the model's output is not finite
            if "probability tensor" not in str(e):
                raise
    raise TokeneffError("sampling failed: the model's next-token probabilities are not finite (are its weights, or "
                        "the LoRA update, finite? a damaged model folder or a too large lr)")


def _body(model):
    """The decoder without its LM head (the LoRA layers inside it stay active). The prefill needs the head on each
    row's last position only, and applies it to that 2-D slice: transformers' `logits_to_keep=1` hands the head a
    strided [rows, 1, hidden] view, which a bfloat16 product on a CPU expands into a batched product copying the
    head's weight once per row (8 s for 50 rows of SmolLM2's 49,152 x 576 head, against 10 ms)."""
    return _base(model).get_decoder()


def _share_prefix(model, cache, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, min_shared: int = 8):
    """Forward the tokens every context starts with once, into `cache` for all rows; return what is left.

    Prompts of one task share their instruction and worked examples (most of an evaluation prompt), so a batch
    of U contexts prefills that part once instead of U times. Returns the ids still to forward, the attention
    mask over [shared | ids] (padding sits between the two, masked out), the position ids of `ids`, and the number
    of shared tokens (0: nothing forwarded)."""
    lens = ctx_mask.sum(-1)
    width = ctx_ids.shape[1]
    rows = [ctx_ids[i, width - int(n):] for i, n in enumerate(lens.tolist())]
    limit = int(lens.min()) - 1  # every context keeps at least one token of its own
    shared = 0
    if len(rows) > 1 and limit > 0:
        same = (torch.stack([r[:limit] for r in rows]) == rows[0][:limit]).all(0)
        shared = int(same.int().cumprod(0).sum())
    if shared < min_shared:
        return ctx_ids, ctx_mask, (ctx_mask.cumsum(-1) - 1).clamp(min=0), 0
    # the shared tokens sit right-aligned in every row: all rows are at least `shared` long
    _body(model)(input_ids=rows[0][None, :shared], past_key_values=cache, use_cache=True)  # the cache only
    cache.batch_repeat_interleave(len(rows))
    suffix_ids, suffix_mask = left_pad([r[shared:].tolist() for r in rows], 0)
    suffix_ids, suffix_mask = suffix_ids.to(ctx_ids.device), suffix_mask.to(ctx_ids.device)
    full = torch.cat([suffix_mask.new_ones(len(rows), shared), suffix_mask], 1)
    return suffix_ids, full, (full.cumsum(-1) - 1).clamp(min=0)[:, shared:], shared


def prefill_groups(model, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int):
    """Prefill each context once (the prefix all contexts share only once) and repeat its cache to its G rows.
    Returns the first token's logits, the DynamicCache and the attention mask, all with U * G rows, and how many
    leading tokens every row shares."""
    from transformers import DynamicCache

    base = _base(model)
    cache = DynamicCache(config=base.config)
    ids, ctx_mask, pos, shared = _share_prefix(model, cache, ctx_ids, ctx_mask)
    hidden = _body(model)(input_ids=ids, attention_mask=ctx_mask, position_ids=pos, past_key_values=cache,
                          use_cache=True).last_hidden_state[:, -1]
    logits = base.get_output_embeddings()(hidden)
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)  # as the model's forward does
    logits = (torch.tanh(logits / cap) * cap if cap else logits).repeat_interleave(num_samples, 0)
    cache.batch_repeat_interleave(num_samples)
    return logits, cache, ctx_mask.repeat_interleave(num_samples, 0), shared


def decode_loop(model, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int, max_new_tokens: int,
                eos: set[int], **pick) -> list[list[int]]:
    """Token-by-token sampling with a KV cache. Each context is prefilled once and its cache copied to its G
    rows; a row that emits EOS leaves the batch (its cache rows are dropped), so the step's cost follows the
    rows still running rather than the longest one, which `generate` pays for every row."""
    logits, cache, mask, _ = prefill_groups(model, ctx_ids, ctx_mask, num_samples)
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


def _sliced_cache(grown, capacity: int, shared: int = 0):
    """`grown` (a DynamicCache of full-attention layers) with each layer moved into buffers `capacity` tokens long;
    its first `shared` columns, the same in every row, are kept once, apart (`SlicedLayer.prefix`)."""
    from transformers import DynamicLayer

    class SlicedLayer(DynamicLayer):
        """A DynamicLayer on preallocated buffers: `update` writes the new columns in place and returns views up to
        the length so far, so a step neither copies the cache (DynamicLayer's torch.cat) nor attends past it. The
        views hold the columns after the shared prefix, which `shared_prefix_attention` reads from `prefix`."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.prefix = (keys[0, :, :shared].contiguous(), values[0, :, :shared].contiguous())
            keys, values = keys[:, :, shared:], values[:, :, shared:]
            rows, heads, self.length, _ = keys.shape
            self.kbuf = keys.new_empty(rows, heads, capacity - shared, keys.shape[-1])
            self.vbuf = values.new_empty(rows, heads, capacity - shared, values.shape[-1])
            self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length] = keys, values
            self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            self.kbuf[:, :, self.length:end], self.vbuf[:, :, self.length:end] = key_states, value_states
            self.length = end
            self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return shared + self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            n, end = len(indices), self.length  # rows move up in place: no new buffer
            self.kbuf[:n, :, :end], self.vbuf[:n, :, :end] = self.kbuf[indices, :, :end], self.vbuf[indices, :, :end]
            self.kbuf, self.vbuf = self.kbuf[:n], self.vbuf[:n]
            self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]

    kinds = {type(layer).__name__ for layer in grown.layers} - {"DynamicLayer"}
    if kinds:  # the step's one mask, full attention over the buffers, would be wrong for these
        raise TokeneffError(f"rollout_backend=sliced: the model has {', '.join(sorted(kinds))} cache layers (a sliding "
                            "window?); sample with rollout_backend=tokeneff")
    grown.layers = [SlicedLayer(layer.keys, layer.values) for layer in grown.layers]
    return grown


def static_decode_loop(model, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, num_samples: int,
                       max_new_tokens: int, eos: set[int], compile: bool = False, sliced: bool = False,
                       share_prefix: bool = True, step: str = "transformers", onednn: bool = False,
                       **pick) -> list[list[int]]:
    """decode_loop on preallocated tensors: the KV cache and the attention mask are sized context + max_new_tokens
    once, and each step writes one column in place instead of concatenating. Two shapes of step:
    - `sliced` (rollout_backend=sliced): each step attends only up to the length so far (views of the buffers), a
      row that emits EOS leaves the batch at once, as in `decode_loop`, whose batch shapes (and so greedy tokens)
      it keeps, and tokens are drawn by inverse CDF (`pick_next`); with `share_prefix`, the tokens every context
      starts with are kept once and attended by one product for all rows (`tokeneff.attention`); `step`
      (rollout_step): the step as one function (`tokeneff.fused_step`, its products on oneDNN where `onednn`)
      or transformers' forward;
    - fixed (rollout_backend=static): a transformers StaticCache and the full-width mask, shapes that torch.compile
      and CUDA graphs (`compile`) can replay; finished rows stay in the batch until the running ones are at most
      half of it, so a compiled step sees at most log2(rows) shapes, and tokens are drawn by torch.multinomial.
    Rows run on past their EOS where they stay in the batch; `sample` cuts each at its first."""
    from transformers import StaticCache

    logits, grown, ctx_mask, shared = prefill_groups(model, ctx_ids, ctx_mask, num_samples)
    rows, width = ctx_mask.shape
    capacity = width + max_new_tokens - 1
    attention = contextlib.ExitStack()
    fused = fused_or_none(_base(model), step, ctx_ids.device.type, onednn) if sliced else None
    if sliced:  # the prefix every row shares is attended once for all rows (by the fused step, or where the model
        # attends by SDPA)
        if not (share_prefix and shared and (fused is not None
                                             or attention.enter_context(shared_prefix_context(_base(model))))):
            shared = 0
        cache, forward = _sliced_cache(grown, capacity, shared), model
        prefixes = [layer.prefix for layer in cache.layers] if shared else None
        attends = getattr(_base(model).config, "_attn_implementation", "sdpa")
        if fused is None and attends not in ("sdpa", SHARED_PREFIX, "eager"):
            raise TokeneffError(f"rollout_backend=sliced: the model attends by {attends!r}, which takes no 4-D mask; "
                                "load it with attn_implementation='sdpa' or sample with rollout_backend=tokeneff")
        additive = fused is None and attends == "eager"  # eager attention adds its mask: 0 or -inf, not a boolean
        extra = dict(shared_prefix=prefixes) if shared else {}
    else:
        base = _base(model)
        cache = StaticCache(config=base.config, max_cache_len=capacity)
        for layer, src in zip(cache.layers, grown.layers, strict=True):
            layer.lazy_initialization(src.keys, src.values)
            layer.keys[:, :, :width], layer.values[:, :, :width] = src.keys, src.values
            layer.cumulative_length.fill_(width)
        forward, extra = compiled_forward(model) if compile else model, {}
        shared = 0  # static keeps the shared prefix in every row of its cache
    del grown
    # sliced passes sdpa's own 4-D boolean mask (True attends) over the columns after the shared prefix, which
    # transformers takes as it is: from a 2-D mask it builds one at every step, which made a bfloat16 step 1.5x
    # slower on a CPU. static passes the 2-D mask, from which transformers builds each layer kind's own.
    own = width - shared  # each row's columns before it generates
    mask = torch.zeros((rows, 1, 1, capacity - shared), dtype=torch.bool if sliced else ctx_mask.dtype,
                       device=ctx_mask.device)
    mask[:, 0, 0, :own] = ctx_mask[:, shared:]
    ctx_len = ctx_mask.sum(-1)
    live = torch.arange(rows, device=mask.device)  # original row of each row in the batch
    done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    eos_ids = torch.tensor(sorted(eos), device=mask.device)
    gen = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=mask.device)
    with attention:
        for t in range(max_new_tokens):
            tok = pick_next(logits, draw="inverse-cdf" if sliced else "multinomial", **pick)
            gen[live, t] = tok
            done |= torch.isin(tok, eos_ids)
            running = len(done) - int(done.sum())
            if t == max_new_tokens - 1 or running == 0:
                break
            if running < len(done) and (sliced or 2 * running <= len(done)):
                idx = (~done).nonzero().squeeze(1)
                if sliced:
                    cache.batch_select_indices(idx)
                else:
                    for layer in cache.layers:
                        layer.keys, layer.values = layer.keys[idx], layer.values[idx]
                live, tok, mask, ctx_len, done = live[idx], tok[idx], mask[idx], ctx_len[idx], done[idx]
            mask[:, 0, 0, own + t] = 1
            step_mask = mask[..., :own + t + 1] if sliced else mask[:, 0, 0]
            if sliced and additive:
                step_mask = torch.zeros(step_mask.shape, dtype=logits.dtype, device=mask.device).masked_fill_(
                    ~step_mask, torch.finfo(logits.dtype).min)
            if fused is not None:
                logits = fused(tok, step_mask, ctx_len + t, cache, prefixes)
            else:
                logits = forward(input_ids=tok[:, None], attention_mask=step_mask,
                                 position_ids=(ctx_len + t)[:, None], past_key_values=cache, use_cache=True,
                                 **extra).logits[:, -1]
    return gen.tolist()


DTYPES = dict(zip(ROLLOUT_DTYPES, (None, torch.bfloat16), strict=True))
"""rollout_dtype: the model's own weights, or a bfloat16 copy for sampling"""


@contextlib.contextmanager
def sampling_weights(model, merge_lora: bool = False, dtype: torch.dtype | None = None):
    """Sample with other weights than training's: each LoRA layer's W + scale * B @ A in place of W with the adapter
    switched off (`merge_lora`: one matrix product per layer instead of three), and/or every weight cast to `dtype`
    (a bfloat16 copy: a CPU with AVX-512 BF16 multiplies it ~3x faster than float32; the LoRA update is then merged
    too). The originals are put back untouched (not un-merged or cast back, which would round them), so training
    continues on exactly the weights it had. Casts of weights that training leaves alone are kept on the model
    between rollouts; a weight's version counter says when one changed."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    merge = (merge_lora or dtype is not None) and bool(layers) and hasattr(model, "disable_adapter")
    if merge and any(m.merged or m.lora_variant or m.disable_adapters for m in layers):
        merge = False  # a merged, DoRA-like or switched-off adapter: leave it as it is
    swaps: dict[tuple[torch.nn.Module, str], torch.nn.Parameter] = {}
    if merge:
        for m in layers:
            w = m.base_layer.weight
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            swaps[m.base_layer, "weight"] = (w + delta).to(dtype or w.dtype)
    if dtype is not None:
        cache = model.__dict__.setdefault("_tokeneff_casts", {})
        adapters = {id(p) for m in layers for p in (*m.lora_A.parameters(), *m.lora_B.parameters())}
        live = {id(p): weight_state(p) for p in model.parameters()}
        for key in [k for k, (state, _) in cache.items() if live.get(k) != state]:  # a weight changed: drop its cast
            del cache[key]
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is None or (mod, name) in swaps or id(p) in adapters or not p.is_floating_point():
                    continue
                if id(p) not in cache:  # a Parameter, kept as one object: oneDNN's packed copy follows its identity
                    cache[id(p)] = (live[id(p)], torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
                swaps[mod, name] = cache[id(p)][1]
    if not swaps:
        yield
        return
    originals = {key: key[0]._parameters[key[1]] for key in swaps}
    try:
        for (mod, name), w in swaps.items():
            is_param = isinstance(w, torch.nn.Parameter)
            mod._parameters[name] = w if is_param else torch.nn.Parameter(w, requires_grad=False)
        with model.disable_adapter() if merge else contextlib.nullcontext():
            yield
    finally:
        for (mod, name), w in originals.items():
            mod._parameters[name] = w


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
                  max_new_tokens: int, eos: set[int], backend: str = "sliced", compile: bool = False,
                  merge_lora: bool = False, dtype: str = "float32", gemm: str = "auto", attention: str = "auto",
                  step: str = "auto", **pick) -> list[list[int]]:
    """The backend's generated rows, each possibly running on past its first EOS (`eos` empty: full length)."""
    if backend == "tokeneff":
        return decode_loop(model, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos, **pick)
    if backend in ("static", "sliced"):
        onednn = uses_onednn(model, "rollout_gemm", gemm, backend == "sliced")
        with sampling_weights(model, merge_lora, DTYPES[dtype]), \
                onednn_linears(model) if onednn else contextlib.nullcontext():
            share = attention == "shared-prefix" or (attention == "auto" and ctx_ids.device.type == "cpu")
            return static_decode_loop(model, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos, compile,
                                      backend == "sliced", share, step, onednn, **pick)
    return hf_generate(model, tokenizer, ctx_ids, ctx_mask, num_samples, max_new_tokens, eos,
                       static=backend == "hf-static", **pick)


@torch.no_grad()
def sample(model, tokenizer, contexts: list[list[int]], num_samples: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, backend: str = "sliced",
           compile: bool = False, merge_lora: bool = False, dtype: str = "float32", gemm: str = "auto",
           attention: str = "auto", step: str = "auto") -> Rollout:
    """Generate `num_samples` completions for each context (token ids); rows are context-major.

    Backends: sliced (the default), our loop on a preallocated KV cache and mask (prompt KV shared by its group,
    each step attending up to the length so far, finished rows leaving the batch, draws by inverse CDF); tokeneff,
    the same on a KV cache grown by concatenation (draws by torch.multinomial); static, fixed shapes for
    torch.compile and CUDA graphs (`compile`; rows leave by halves); hf, transformers `generate` seeded with the
    shared prompt KV; hf-static, `generate` with a static KV cache (compiled, CUDA graphs on a GPU; prompts
    repeated, since a static cache cannot be seeded from another cache). sliced and static sample with other
    weights on request: `merge_lora`, the adapter merged into a copy of the adapted weights; `dtype`="bfloat16", a
    bfloat16 copy of every weight (`sampling_weights`); `gemm` (rollout_gemm): their linear layers' products through
    oneDNN on packed weights (`onednn_linears`; auto: with sliced on a CPU) or torch's own; `attention`
    (rollout_attention, sliced): the prefix every context shares attended once for all rows (`tokeneff.attention`;
    auto: on a CPU) or repeated in every row through SDPA; `step` (rollout_step, sliced): each decode step as one
    function over stacked weights (`tokeneff.fused_step`; auto: on a CPU, for the model families it knows) or as
    transformers' forward.
    """
    if backend not in BACKENDS:
        raise TokeneffError(f"rollout_backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise TokeneffError(f"rollout_dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    if gemm not in GEMMS:
        raise TokeneffError(f"rollout_gemm={gemm!r}: must be one of {', '.join(GEMMS)}")
    if attention not in ATTENTIONS:
        raise TokeneffError(f"rollout_attention={attention!r}: must be one of {', '.join(ATTENTIONS)}")
    if step not in STEPS:
        raise TokeneffError(f"rollout_step={step!r}: must be one of {', '.join(STEPS)}")
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
                            merge_lora, dtype, gemm, attention, step, **pick)
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
