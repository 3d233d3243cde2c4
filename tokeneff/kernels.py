"""oneDNN matrix products for the linear layers on a CPU (the options rollout_gemm and train_gemm).

torch's own float32 product on a CPU is MKL's sgemm, which on an AMD CPU takes MKL's generic path: about half of the
rate oneDNN's kernel (torch.ops.mkldnn._linear_pointwise, the one inductor uses) reaches on a weight packed once into
oneDNN's blocked layout (results/benchmarks/decode_limit_cpu_*.json). Same float32 arithmetic, summed in another
order. Here each CPU nn.Linear runs through oneDNN inside a `with onednn_linears(model)` block.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .errors import TokeneffError

DTYPES = (torch.float32, torch.bfloat16)
"""the weight dtypes oneDNN multiplies here (no float16 path on this project's CPUs)"""

_PACKED = WeakIdKeyDictionary()
"""weight -> (its `weight_state` when packed, packed W, packed W^T or None). Keyed by the weight's identity and
dropped with it, so a weight freed and another made at its address cannot meet a stale copy; a weight changed in
place (a new version, as an optimizer step makes), given another storage (`.data = `) or moved (`.to()`) is packed
anew."""


class _Storage:
    """A tensor's storage, held: equal to another only if it is the same storage. Held, not named by its address,
    which a storage made later reuses once this one is freed (a float32 weight cast to bfloat16 and back lands on
    its old address often enough; by address, its copy made before the casts was served). Holding it costs nothing
    while the weight keeps it; one replaced storage per weight until its copy is made anew."""

    __slots__ = ("storage",)

    def __init__(self, w: torch.Tensor):
        self.storage = w.untyped_storage()

    def __eq__(self, other) -> bool:
        return isinstance(other, _Storage) and self.storage._cdata == other.storage._cdata


def weight_state(w: torch.Tensor) -> tuple:
    """What a copy made from `w` depends on that a change of `w` moves: an in-place change through autograd bumps
    its version; `w.data = t` and `module.to()` give it another storage, dtype or device. A write into `w.data`
    moves none of these: peft's `merge_adapter` does that, so layers with a merged adapter are never served from a
    copy."""
    return w._version, _Storage(w), w.storage_offset(), w.dtype, w.device, tuple(w.shape), w.stride()


def packed(w: torch.Tensor, transposed: bool = False, kept: bool = True) -> torch.Tensor:
    """`w` (or its transpose, for products with the gradient) in oneDNN's blocked layout, kept while `w` lives.
    `kept=False`: packed now and not kept, for a weight an adapter is merged into (see `weight_state`)."""
    if not kept:
        return pack_copy(w.detach().t().contiguous() if transposed else w.detach())
    entry, state = _PACKED.get(w), weight_state(w)
    if entry is None or entry[0] != state or (transposed and entry[2] is None):
        pw = entry[1] if entry is not None and entry[0] == state else pack_copy(w.detach())
        pwt = pack_copy(w.detach().t().contiguous()) if transposed else None
        entry = _PACKED[w] = (state, pw, pwt)
    return entry[2] if transposed else entry[1]


def pack_copy(w: torch.Tensor) -> torch.Tensor:
    """A copy of `w` in oneDNN's blocked layout, not kept (`packed` keeps one per weight)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, 32)  # 32: the batch size oneDNN tunes the layout for


def product(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """x W^T + b for a weight and bias that take no gradient; x's gradient g W is a product with packed W^T."""

    @staticmethod
    def forward(ctx, x, w, wt, bias):
        ctx.wt = wt
        return product(w, bias, x)

    @staticmethod
    def backward(ctx, g):
        return product(ctx.wt, None, g.contiguous()), None, None, None


def _frozen_forward(mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled("cpu"):  # mixed precision: autocast's own bfloat16 product
        return torch.nn.functional.linear(x, mod.weight, mod.bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, packed(mod.weight), packed(mod.weight, True), mod.bias)
    return product(packed(mod.weight), mod.bias, x)


@contextlib.contextmanager
def onednn_linears(model, backward: bool = False):
    """Every CPU float32 / bfloat16 nn.Linear of `model` multiplies through oneDNN on packed weights inside the block.
    `backward`: for a loss to backpropagate through (gradients reach the inputs, through packed W^T, a second copy);
    layers whose weight or bias takes a gradient (LoRA's A and B) then keep torch's product. Without it (sampling
    under no_grad) every layer goes through oneDNN. A layer whose forward a hook already wraps (accelerate's
    offloading) is left alone."""
    patched = []
    merged = {id(m.base_layer) for m in model.modules() if getattr(m, "merged", False) and hasattr(m, "base_layer")}
    for mod in model.modules():
        w = mod._parameters.get("weight") if type(mod) is torch.nn.Linear else None
        if w is None or w.device.type != "cpu" or w.dtype not in DTYPES \
                or "forward" in mod.__dict__:
            continue
        if backward:
            if w.requires_grad or (mod.bias is not None and mod.bias.requires_grad) or id(mod) in merged:
                continue
            mod.forward = functools.partial(_frozen_forward, mod)
        else:
            mod.forward = functools.partial(product, packed(w, kept=id(mod) not in merged), mod.bias)
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


def onednn_context(model, option: str, value: str, auto: bool, backward: bool = False):
    """`onednn_linears(model, backward)` where the option (rollout_gemm / train_gemm) asks for it: onednn, or auto
    where the caller's CPU default applies (`auto`) and the model is on a CPU; otherwise torch's own products."""
    return onednn_linears(model, backward) if uses_onednn(model, option, value, auto) else contextlib.nullcontext()


def uses_onednn(model, option: str, value: str, auto: bool) -> bool:
    """Whether the option (rollout_gemm / train_gemm) puts `model`'s products on oneDNN (`onednn_context`)."""
    cpu = next(model.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available()
    if value == "onednn" and not cpu:
        raise TokeneffError(f"{option}=onednn: needs the model on a CPU and a torch built with oneDNN; use "
                            f"{option}=auto or torch")
    return value == "onednn" or (value == "auto" and auto and cpu)
