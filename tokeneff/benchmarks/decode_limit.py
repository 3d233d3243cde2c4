"""How close do CPU rollouts come to this machine's limit? (`tokeneff bench --decode-limit`)

One decode step of a causal LM at batch B is, apart from attention over the cache, one matrix product per
linear layer: [B, in] x [in, out]. Its floor on this machine is the sum over the step's linear layers of
    2 * B * in * out / (the GEMM rate this machine reaches on exactly that shape, on the same threads, by the faster
                       of torch's own kernel and oneDNN's on a packed weight),
plus attention (2 * 2 * B * context * hidden per layer) at the best of those rates. We time the real step of
each rollout backend (its own loop: forward with a KV cache, sampling, bookkeeping) on two kinds of context, random
tokens (no two rows share a prefix) and a task's prompts (a shared instruction and worked examples, as in every
rollout and evaluation here), and report floor / measured:
the fraction of the machine's matrix-product speed that the rollout reaches. Both sides run on the threads the
runs use (1). With `eval_limit`, also a greedy evaluation per backend: its time and its flips against the first.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import make_config
from ..errors import TokeneffError
from ..evaluate import evaluate_model
from ..kernels import packed, product
from ..models import load_model
from ..rollout import build_prompt, encode_prompts, generate_rows, left_pad
from ..tasks import make_task
from ..utils import set_threads, write_json
from ..warmstart import model_folder
from .benchio import device_name


def _gemm_rate(m: int, k: int, n: int, min_seconds: float = 0.2) -> dict[str, float]:
    """FLOP/s of a float32 [m, k] x [k, n] product, the best of three timed bursts, by each kernel a step can use:
    torch's own (`a @ b`: MKL's sgemm on this CPU) and oneDNN's on a packed weight (rollout_gemm=onednn)."""
    a, w = torch.randn(m, k), torch.randn(n, k)
    kernels = {"torch": (lambda: a @ w.T)}
    if torch.backends.mkldnn.is_available():
        kernels["onednn"] = functools.partial(product, packed(w), None, a)
    rates = {}
    for name, run in kernels.items():
        run()
        best = 0.0
        for _ in range(3):
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_seconds / 3:
                run()
                reps += 1
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
        rates[name] = best
    return rates


def linear_shapes(model) -> Counter:
    """(in, out) of every matrix a decode step multiplies by, with multiplicity (the LM head included)."""
    shapes: Counter = Counter()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[(mod.in_features, mod.out_features)] += 1
    return shapes


BACKEND_SPECS = ("sliced", "sliced+hfstep", "sliced+sdpa", "sliced+torch", "sliced+merge", "sliced+bf16", "tokeneff",
                 "tokeneff+torch", "static", "static+onednn", "static+compile", "hf", "hf-static")
"""what `--backends` may name: a rollout backend; +torch: torch's own matrix products on a CPU where the default is
oneDNN's (rollout_gemm and train_gemm; tokeneff+torch is the default before 2026-12-01); sliced with its LoRA
merged for sampling, a bfloat16 sampling copy of the weights, or the shared prompt prefix repeated in every row and
attended by SDPA (+sdpa), or each step as transformers' forward (+hfstep: rollout_step=transformers: sliced as it
ran on 2026-12-01 before the fused step); static with oneDNN's products or compiled"""
_EXTRAS = {"": {}, "compile": dict(rollout_compile=True), "merge": dict(rollout_merge_lora=True),
           "bf16": dict(rollout_dtype="bfloat16"), "torch": dict(rollout_gemm="torch", train_gemm="torch"),
           "onednn": dict(rollout_gemm="onednn"), "sdpa": dict(rollout_attention="sdpa"),
           "hfstep": dict(rollout_step="transformers")}


def _check(spec: str) -> None:
    if spec not in BACKEND_SPECS:
        raise TokeneffError(f"backend {spec!r}: must be one of {', '.join(BACKEND_SPECS)}")


def parse_backends(text: str) -> list[str]:
    """The comma-separated --backends names, each checked."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    for spec in names:
        _check(spec)
    return names


def backend_overrides(spec: str) -> dict[str, Any]:
    """The config overrides a --backends name stands for (`tokeneff train key=value`)."""
    _check(spec)
    name, _, extra = spec.partition("+")
    return dict(rollout_backend=name, **_EXTRAS[extra])


def _backend(spec: str) -> dict[str, Any]:
    """`generate_rows`'s keywords for a --backends name, as a run with its overrides passes them."""
    return make_config("embedded", overrides=backend_overrides(spec)).rollout_options()


def random_contexts(batch: int, context: int, vocab: int) -> list[list[int]]:
    """`batch` contexts of `context` random tokens: no two share a prefix."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, min(vocab, 1000), (batch, context), generator=g).tolist()


def _embedded_task(task: str, model_name: str):
    """The embedded profile's config for `task` on `model_name`, and the task it makes."""
    cfg = make_config("embedded", overrides=dict(task=task, model=model_name))
    return cfg, make_task(cfg)


def task_contexts(tokenizer, model_name: str, task: str, batch: int) -> list[list[int]]:
    """The prompts of the first `batch` test problems of `task` (embedded profile), as an evaluation batch sends
    them: each starts with the instruction and worked examples every other one starts with."""
    _, t = _embedded_task(task, model_name)
    problems = t.problems("test")
    return encode_prompts(tokenizer, [build_prompt(tokenizer, t.messages(problems[i % len(problems)]))
                                      for i in range(batch)])


@torch.no_grad()
def decode_step_seconds(model, tokenizer, contexts: list[list[int]], backends=("tokeneff",), steps: int = 28,
                        repeats: int = 3) -> dict[str, float]:
    """Wall time of one decode step per backend, a row per context, through the backend's own loop (forward,
    sampling, bookkeeping): the median interval between consecutive calls of the input embedding (one per step, in
    every backend's step; the fused step calls no LM-head module) over the last `steps` steps with no EOS, the least
    over `repeats` runs. Intervals, not a whole run's time, so the prefill (most of a short run, and as noisy) does
    not enter. A compiled step, whose modules no hook sees, is timed as runs of 4 and 4 + `steps` tokens and their
    difference per token. The backends take turns in each round, so a drift of the machine's speed (10-20% here)
    reaches them all alike."""
    ids, mask = left_pad(contexts, tokenizer.pad_token_id or 0)
    stamps: list[float] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    best: dict[tuple[str, int], float] = {}
    try:
        for _ in range(repeats):
            for backend in backends:
                for n in ((4, 4 + steps) if "compile" in backend else (1 + steps,)):
                    stamps.clear()
                    t0 = time.perf_counter()
                    generate_rows(model, tokenizer, ids, mask, 1, n, set(), **_backend(backend))
                    took = time.perf_counter() - t0
                    if "compile" not in backend:  # stamps: the prefill's (one or two), then one per step
                        last = stamps[-steps:]
                        took = statistics.median(b - a for a, b in zip(last, last[1:], strict=False))
                    best[backend, n] = min(best.get((backend, n), float("inf")), took)
    finally:
        hook.remove()
    return {b: (best[b, 4 + steps] - best[b, 4]) / steps if "compile" in b else best[b, 1 + steps] for b in backends}


def decode_limit(model_name: str = "smollm2-135m", batches=(24, 50), context: int = 96, threads: int = 1,
                 out: str | None = None, backends=("tokeneff",), eval_limit: int = 0,
                 eval_task: str = "multiplication", contexts=("random", "task"),
                 adapter: bool = False) -> list[dict[str, Any]]:
    """One row per (contexts, batch, backend): the decode step against this machine's floor, on `context` random
    tokens per row ("random") or on the prompts of `eval_task`'s first test problems ("task": a shared instruction
    and worked examples, then the problem); with `eval_limit`, one row per backend: the greedy evaluation of that
    many `eval_task` test problems (embedded profile), its wall time and its completions that differ from the first
    backend's (greedy flips). `adapter`: the model under a fresh LoRA adapter of the embedded profile (as a run
    samples it: its products run beside the model's; the floor stays the model's own)."""
    for b in backends:
        _check(b)  # a misspelt name fails before anything is measured
    for kind in contexts:
        if kind not in ("random", "task"):
            raise TokeneffError(f"contexts {kind!r}: must be random or task")
    set_threads(threads)
    model, tok = load_model(model_folder(model_name))
    model.eval()
    shapes = linear_shapes(model)
    cfg = model.config
    if adapter:
        from peft import get_peft_model

        model = get_peft_model(model, make_config("embedded").peft_config()).eval()
    rows = []
    for b in batches:
        by_kernel = {s: _gemm_rate(b, *s) for s in shapes}
        rates = {s: max(r.values()) for s, r in by_kernel.items()}  # the floor takes the faster kernel per shape
        products = sum(n * 2 * b * s[0] * s[1] for s, n in shapes.items())
        products_floor = sum(n * 2 * b * s[0] * s[1] / rates[s] for s, n in shapes.items())
        for kind in contexts:
            ctx = random_contexts(b, context, cfg.vocab_size) if kind == "random" else task_contexts(
                tok, model_name, eval_task, b)
            mean_ctx = sum(map(len, ctx)) / len(ctx)
            attn_flops = 4 * b * mean_ctx * cfg.hidden_size * cfg.num_hidden_layers
            floor = products_floor + attn_flops / max(rates.values())
            flops = products + attn_flops
            for backend, measured in decode_step_seconds(model, tok, ctx, backends).items():
                rows.append(dict(device=device_name(), model=model_name, adapter=adapter, threads=threads,
                                 backend=backend, batch=b,
                                 contexts="random" if kind == "random" else eval_task, context=mean_ctx,
                                 step_ms=1000 * measured, floor_ms=1000 * floor, fraction_of_limit=floor / measured,
                                 gflop_per_step=flops / 1e9, achieved_gflops=flops / measured / 1e9,
                                 gemm_gflops_by_shape={f"{b}x{k}x{n}": {name: r / 1e9 for name, r in rs.items()}
                                                       for (k, n), rs in by_kernel.items()},
                                 tokens_per_s=b / measured))
    if eval_limit:
        rows += eval_times(model, tok, model_name, backends, eval_limit, eval_task)
    if out:
        tag = device_name().split()[0].lower()
        name = model_name.replace('/', '_') + ("_lora" if adapter else "")
        write_json(Path(out) / f"decode_limit_{tag}_{name}.json", rows)
    return rows


def eval_times(model, tok, model_name: str, backends, limit: int, task: str) -> list[dict[str, Any]]:
    """Greedy evaluation of the first `limit` (0: all) test problems per backend, as `tokeneff evaluate` runs it
    (embedded profile), timed; each completion that differs from the first backend's is listed."""
    cfg, t = _embedded_task(task, model_name)
    problems = t.problems("test")[: limit or None]
    rows, first = [], None
    for backend in backends:
        t0 = time.perf_counter()
        res = evaluate_model(model, tok, t, problems, cfg.eval_batch_size, cfg.eval_max_new_tokens or
                             cfg.max_new_tokens, progress=False, **_backend(backend))
        seconds = time.perf_counter() - t0
        records = res["records"]
        first = first or (backend, records)
        differ = [dict(id=a["id"], first=a["completion"], this=b["completion"])
                  for a, b in zip(first[1], records, strict=True) if a["completion"] != b["completion"]]
        rows.append(dict(device=device_name(), model=model_name, adapter=hasattr(model, "peft_config"),
                         backend=backend, kind="eval", task=task,
                         n=res["n"], eval_seconds=seconds, accuracy=res["accuracy"], flips_vs=first[0],
                         flips=len(differ), differ=differ))
    return rows
