"""One decode step of a Llama-family model as one function (rollout_step=fused, rollout_backend=sliced).

A decode step of a small model is short (~70 ms for SmolLM2-135M at 24 rows on one CPU thread), so the Python around
its 211 products shows: transformers calls a module per layer part, and peft wraps each adapted layer in a forward
of its own (~0.1 ms at 24 rows; 120 of them in a step with the default LoRA targets q, k, v, o). Here the step is
one loop over the layers, on the same weights and the model's own norm, rotary and activation functions:
- q, k and v are one product with their weights stacked (a stacked copy made once and kept while the weights stay
  the same), and so are the MLP's gate and up;
- each LoRA adapter's update (x A^T B^T) * scale runs beside its product as two small ones: the A matrices of the
  stacked layers stacked, their B matrices as a block diagonal (nothing merged: the adapter changes at every update,
  the big weights do not);
- attention is `tokeneff.attention`'s (the shared prompt prefix once for all rows) or transformers' SDPA.
The same float32 operations as transformers' and peft's forward, on stacked weights: at SmolLM2-135M's shapes on this
project's CPU every step's logits are transformers' bit for bit; where a stacked width falls on a product kernel's
tail (tiny test models) they differ by ~1e-6 (tests/test_fused_step.py). The prefill stays transformers'.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import attention
from .errors import TokeneffError
from .kernels import DTYPES, pack_copy, packed, product, weight_state

FAMILIES = ("llama", "qwen2")
"""model types whose decoder layer is x + attn(norm(x)), then x + down(act(gate(norm(x))) * up(norm(x))), with
rotary q and k and no other part (no q/k norms, no sliding window, no logit softcapping)"""

_STACKED = WeakIdKeyDictionary()
"""model -> its stacked weights (`_stacked`), dropped with the model (not on it: a deep copy cannot copy them)"""


def unsupported(model) -> str | None:
    """Why the fused step cannot run `model` (a transformers model, not a peft wrapper); None where it can."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "it has sliding-window layers"
    if getattr(cfg, "final_logit_softcapping", None):
        return "it caps its logits"
    for layer in model.model.layers[: cfg.num_hidden_layers]:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            why = _linear_unsupported(mod)
            if why:
                return why
    return _linear_unsupported(model.get_output_embeddings())


def _base_linear(mod):
    return getattr(mod, "base_layer", mod)


def _linear_unsupported(mod) -> str | None:
    base = _base_linear(mod)
    if type(base) is not torch.nn.Linear:
        return (f"a layer is a {type(base).__name__}, not a plain nn.Linear (quantised? offloaded? a peft "
                "modules_to_save copy?)")
    if "forward" in base.__dict__ and getattr(base.forward, "func", None) is not product:  # onednn_linears' own
        return "a layer's forward is wrapped (accelerate's offloading?)"
    if base is not mod and (getattr(mod, "lora_variant", None) or getattr(mod, "fan_in_fan_out", False)
                            or any(getattr(mod, "lora_bias", {}).values())):
        return "an adapter is not plain LoRA (DoRA? a LoRA bias?)"
    return None


@dataclass
class Linear:
    """y = x W^T + b (+ x A^T B^T, the adapters' update): several linear layers of one input as one product."""

    weight: torch.Tensor
    """the stacked weights, in oneDNN's packed layout where `onednn`"""
    bias: torch.Tensor | None
    lora: tuple[torch.Tensor, torch.Tensor, float] | None
    """(A [rank, in], B [out, rank], scale) of every active adapter of the stacked layers, B's blocks on a diagonal;
    scale 1.0 where the adapters' scales differ, each then folded into its B"""
    onednn: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mul = product if self.onednn else (lambda w, b, v: F.linear(v, w, b))
        y = mul(self.weight, self.bias, x)
        if self.lora is None:
            return y
        a, b, scale = self.lora  # as peft: in the adapter's dtype, (B (A x)) * scale added, cast back
        return (y + mul(b, None, mul(a, None, x.to(b.dtype))) * scale).to(y.dtype)


def _adapters(mod) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scale) of each active adapter of a peft LoRA layer, as its forward would apply them."""
    if not hasattr(mod, "lora_A") or mod.merged or mod.disable_adapters:
        return []
    return [(mod.lora_A[a].weight, mod.lora_B[a].weight, mod.scaling[a]) for a in mod.active_adapters
            if a in mod.lora_A]


def _stacked(mods, onednn: bool, store: dict) -> torch.Tensor:
    """The base weights of `mods` stacked (packed for oneDNN), made once and kept in `store` while every one of them
    is the same tensor in the same `weight_state` (a weight changed in place, or swapped, is stacked anew). A layer
    with an adapter merged into it (peft's `merge_adapter` writes into `weight.data`, which moves nothing
    `weight_state` sees) is stacked anew at every rollout."""
    weights = [_base_linear(m).weight for m in mods]
    merged = any(getattr(m, "merged", False) for m in mods)
    if len(weights) == 1:
        return packed(weights[0], kept=not merged) if onednn else weights[0]
    key = (tuple(id(w) for w in weights), onednn)
    held = store.get(key)
    if not merged and held is not None and all(r() is w and s == weight_state(w)
                                               for (r, s), w in zip(held[0], weights, strict=True)):
        return held[1]
    w = torch.cat([x.detach() for x in weights])
    w = pack_copy(w) if onednn else w
    if not merged:  # kept, a copy of merged weights would outlive `unmerge_adapter` (which moves no state either)
        store[key] = ([(weakref.ref(x), weight_state(x)) for x in weights], w)
    return w


def fuse(mods, onednn: bool, store: dict) -> Linear:
    """`mods` (linear layers, or peft LoRA layers around them, reading one input) as one `Linear`; oneDNN's products
    where `onednn` and the weights are float32 or bfloat16 (as `onednn_linears`), torch's otherwise."""
    bases = [_base_linear(m) for m in mods]
    onednn = onednn and bases[0].weight.dtype in DTYPES
    biases = [b.bias for b in bases]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else base.weight.new_zeros(base.out_features) for b, base in zip(biases, bases,
                                                                                             strict=True)])
    outs = [base.out_features for base in bases]
    found = [(a, b, scale, sum(outs[:i])) for i, mod in enumerate(mods) for a, b, scale in _adapters(mod)]
    lora = None
    if found:
        one = len({scale for _, _, scale, _ in found}) == 1  # then scaled after the product, as peft does
        a_all = torch.cat([a for a, _, _, _ in found])
        b_all = a_all.new_zeros(sum(outs), len(a_all))
        col = 0
        for a, b, scale, row in found:
            b_all[row:row + b.shape[0], col:col + a.shape[0]] = b if one else b * scale
            col += a.shape[0]
        lora = (*((pack_copy(a_all), pack_copy(b_all)) if onednn else (a_all, b_all)), found[0][2] if one else 1.0)
    return Linear(_stacked(mods, onednn, store), bias, lora, onednn)


class FusedStep:
    """`step(tokens, mask, positions, cache, prefixes)` -> next-token logits [rows, vocab] of a Llama-family model
    (`base`: the transformers model, under its peft wrapper if any; `unsupported` is None), with its LoRA adapters
    active, over a `rollout._sliced_cache` (the tokens' keys and values are written into it). Built at the start of a
    rollout: the adapter changes between rollouts."""

    def __init__(self, base, onednn: bool):
        store = _STACKED.setdefault(base, {})
        for key in [k for k, (refs, _) in store.items() if any(r() is None for r, _ in refs)]:
            del store[key]  # stacked from weights gone since (a rollout's merged or cast copies)
        self.body = base.model
        self.layers = []
        for layer in self.body.layers[: base.config.num_hidden_layers]:  # as the model's forward runs them
            attn, mlp = layer.self_attn, layer.mlp
            groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                      [mlp.down_proj])
            self.layers.append((layer, *(fuse(g, onednn, store) for g in groups)))
        self.head = fuse([base.get_output_embeddings()], onednn, store)
        cfg = base.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rope = sys.modules[type(self.body.layers[0].self_attn).__module__].apply_rotary_pos_emb

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 prefixes: list | None) -> torch.Tensor:
        rows, heads, kv, dim = len(tokens), self.heads, self.kv_heads, self.dim
        h = self.body.embed_tokens(tokens)
        cos, sin = self.body.rotary_emb(h, positions[:, None])  # [rows, 1, dim], as the model computes them
        for i, (layer, qkv, o, gate_up, down) in enumerate(self.layers):
            q, k, v = qkv(layer.input_layernorm(h)).split([heads * dim, kv * dim, kv * dim], -1)
            q, k = self.rope(q.view(rows, heads, 1, dim), k.view(rows, kv, 1, dim), cos, sin)
            k, v = cache.layers[i].update(k, v.view(rows, kv, 1, dim))
            out, _ = attention.shared_prefix_attention(layer.self_attn, q, k, v, mask, scaling=layer.self_attn.scaling,
                                             shared_prefix=prefixes)
            h = h + o(out.reshape(rows, heads * dim))
            g, u = gate_up(layer.post_attention_layernorm(h)).chunk(2, -1)
            h = h + down(layer.mlp.act_fn(g) * u)
        return self.head(self.body.norm(h))


def fused_or_none(base, option: str, device_type: str, onednn: bool) -> FusedStep | None:
    """The fused step of `base` (the transformers model, not its peft wrapper) where `option` (rollout_step) asks for
    it: fused, or auto on a CPU for a supported model."""
    if option == "transformers" or (option == "auto" and device_type != "cpu"):
        return None
    why = unsupported(base)
    if why is None:
        return FusedStep(base, onednn)
    if option == "fused":
        raise TokeneffError(f"rollout_step=fused: {why}; use rollout_step=auto or transformers")
    return None
