"""`tokeneff bench`: peak memory and time of one training step per algorithm, and rollout throughput.

Each (algorithm, completion length, group size) runs in a fresh subprocess so that peak memory is its own:
CUDA: torch.cuda.max_memory_allocated minus the memory held after loading (weights + adapters).
CPU: peak resident set size (ru_maxrss) minus the RSS after loading, i.e. what the step added at its peak.
Groups are synthetic but shaped like real ones: completions share prefixes and branch at random points, so
T-SPMO credits tokens at branch points, not only at position 0.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS
from ..config import ALGOS, MAX_GROUP, LoraSettings, make_config
from ..errors import TokeneffError, show
from ..loss import SelectiveLogProbs, policy_loss
from ..models import load_model, tiny_random
from ..rollout import left_pad, sample
from ..rundir import check_out_folder
from ..utils import memory_mb, set_threads
from ..warmstart import model_folder
from .benchio import QWEN2_1_5B, device_name, run_in_subprocess, save_result
from .versus_trl import print_versus, versus_trl

MAX_LEN, MAX_G = 32768, MAX_GROUP  # the largest completion length and group size a benchmark accepts (train's)
# Where the memory saving comes from, one change at a time (`--ladder`):
VARIANTS = ("full-logits",    # plain forward of [prompt | completion] rows, [G, T, V] logits, log_softmax
            "chunked-head",   # same forward, TRL's chunked LM head at the credited positions only
            "truncated",      # + each row forwarded only up to its own last credited position
            "shared-prompt")  # + the prompt forwarded once for its group (what training uses)


def _model(spec: dict[str, Any]):
    if spec.get("shape") == "qwen2-1.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = tiny_random()[1]
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_1_5B)).to(torch.bfloat16)
        return model, tok
    if spec["model"] == "tiny-random":
        return tiny_random(vocab_size=spec.get("vocab_size"), hidden=256, layers=4)
    return load_model(model_folder(spec["model"]))


def _synthetic_group(G: int, L: int, vocab: int, rng: random.Random) -> tuple[list[list[int]], list[float]]:
    comps = [[rng.randrange(100, vocab) for _ in range(L)]]
    for _ in range(G - 1):
        parent = comps[rng.randrange(len(comps))]
        cut = rng.randrange(L)
        comps.append(parent[:cut] + [rng.randrange(100, vocab) for _ in range(L - cut)])
    return comps, [float(i % 2) for i in range(G)]


def _full_logits_logp(ctx_ids, ctx_mask, comp_ids, comp_mask, row_ctx, rows, pos, *, model=None):
    """The naive baseline: logits at every position of every row, then log_softmax, then pick."""
    ids, mask = torch.cat([ctx_ids[row_ctx], comp_ids], 1), torch.cat([ctx_mask[row_ctx], comp_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits.float(), -1)
    return logp[rows, ctx_ids.shape[1] + pos - 1, comp_ids[rows, pos]]


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """One training step (forward + backward on the credited tokens) for one configuration."""
    from peft import get_peft_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = _model(spec)
    # the step alone, without LoRA dropout (as the committed tables were measured); otherwise RL's LoRA settings
    model = get_peft_model(model.to(device), LoraSettings(lora_dropout=0.0).peft_config())
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    cfg = make_config("paper", overrides=dict(algo=spec["algo"], beta=0.0, group_size=spec["group_size"]))
    G, L, P = spec["group_size"], spec["completion_len"], spec["prompt_len"]
    vocab = model.config.vocab_size
    rng = random.Random(0)
    comps, rewards = _synthetic_group(G, L, vocab, rng)
    credits = ALGORITHMS[spec["algo"]](comps, rewards, cfg, rng)
    ctx_ids, ctx_mask = left_pad([[rng.randrange(100, vocab) for _ in range(P)]], 0)
    variant = spec.get("variant", "shared-prompt")
    if variant == "full-logits":
        lp = functools.partial(_full_logits_logp, model=model)
    else:
        lp = SelectiveLogProbs(model, share_prompt=variant == "shared-prompt",
                               truncate=variant in ("truncated", "shared-prompt"))
    batch = dict(ctx_ids=ctx_ids.to(device), ctx_mask=ctx_mask.to(device),
                 comp_ids=torch.tensor(comps, device=device),
                 comp_mask=torch.ones(G, L, dtype=torch.long, device=device),
                 row_ctx=torch.zeros(G, dtype=torch.long, device=device),
                 rows=torch.tensor(credits.seq, device=device), pos=torch.tensor(credits.pos, device=device))
    adv, w = torch.tensor(credits.adv, device=device), torch.tensor(credits.weight, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = memory_mb()
    times = []
    for _ in range(spec.get("repeats", 2)):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = policy_loss(lp(**batch), adv, w)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = memory_mb(peak=True) - loaded
    what = ("CUDA max allocated above weights+adapters" if device.type == "cuda"
            else "peak RSS above RSS after loading")
    return dict(spec, device=device_name(), peak_memory_mb=max(peak, 0.0), memory_measure=what,
                step_seconds=min(times), tokens_in_loss=len(credits), tokens_total=G * L,
                frac_tokens_in_loss=len(credits) / (G * L))


def rollout_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of `sample` (our loop: prompt KV shared by the group; also on a preallocated cache, `static`) vs
    HF generate on repeated prompts, eager and with a static cache. Fixed-length completions, so the loop's gain
    from dropping finished rows is not in these numbers (it shows in whole steps, `--vs-trl`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = _model(spec)
    model = model.to(device).eval()
    G, L, P, B = spec["group_size"], spec["completion_len"], spec["prompt_len"], spec.get("prompts", 4)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, min(1000, model.config.vocab_size)) for _ in range(P)] for _ in range(B)]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tok.pad_token_id = 0
    ids, mask = left_pad([p for p in prompts for _ in range(G)], 0)

    def hf(**kw) -> int:
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=L, min_new_tokens=L,
                       do_sample=True, top_k=0, pad_token_id=0, **kw)
        return B * G * L

    def ours(backend: str = "tokeneff", **kw) -> int:  # stops a row at the tokenizer's EOS (rare: random weights)
        return sum(len(c) for c in sample(model, tok, prompts, G, L, backend=backend, **kw).completions)

    # static: a fixed-shape KV cache, which transformers compiles (CUDA graphs) on a GPU; its first call compiles.
    # `tokeneff bench` runs it in a process of its own, so that a compilation cut short leaves the others measured.
    # sliced_fused_sample: the fused decode step, which `auto` gives sliced on a CPU only (not measured on a GPU)
    backends = dict(hf_generate=hf, tokeneff_sample=ours, sliced_sample=lambda: ours("sliced"),
                    sliced_fused_sample=lambda: ours("sliced", step="fused"), static_sample=lambda: ours("static"),
                    static_compiled_sample=lambda: ours("static", compile=True),
                    hf_generate_static=lambda: hf(cache_implementation="static"))
    out = {}
    for name in spec.get("backends", list(backends)):
        run = backends[name]
        # on a GPU every backend's first call is apart (CUDA/cuBLAS warm-up for whichever runs first, compilation
        # for the static cache); a CPU has neither, and its calls are slow, so it times one call
        try:
            for attempt in ("first", "warm") if device.type == "cuda" else ("warm",):
                t0 = time.perf_counter()
                with torch.no_grad():
                    n_tokens = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if attempt == "first":
                    out[f"{name}_first_call_seconds"] = dt
        except Exception as e:  # noqa: BLE001 - e.g. a compilation failure: recorded, the others still count
            if name != "hf_generate_static":
                raise
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            continue
        out[f"{name}_tokens_per_s"] = n_tokens / dt
    return dict(spec, device=device_name(), kind="rollout", **out)


def _in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    return run_in_subprocess("tokeneff.benchmarks.bench", spec, f"bench {spec.get('algo', spec.get('kind'))} "
                                                     f"L={spec['completion_len']} G={spec['group_size']}")


def run_bench(model: str = "tiny-random", shape: str | None = None, completion_lens=(64,), group_sizes=(8,),
              prompt_len: int = 120, vocab_size: int = 151936, gradient_checkpointing: bool = False,
              out: str = "results/benchmarks", rollout: bool = True, ladder: bool = False,
              name: str = "") -> list[dict[str, Any]]:
    """Every algorithm x length x group size (x variant with `ladder`) in its own subprocess; writes
    bench_<device>_<model><name>.json and .csv."""
    for what, values, top in (("completion length", completion_lens, MAX_LEN), ("group size", group_sizes, MAX_G)):
        for v in values:
            if not 1 <= int(v) <= top:  # a bound, not a hang: 10**20 tokens would allocate until killed
                raise TokeneffError(f"{what} {show(v)}: must be between 1 and {top}")
    if not 101 <= vocab_size <= 1_000_000:  # synthetic tokens are drawn from [100, vocab_size)
        raise TokeneffError(f"--vocab-size {show(vocab_size)}: must be between 101 and 1000000")
    if shape and not torch.cuda.is_available():
        raise TokeneffError(f"--shape {shape} needs a GPU (it allocates a 1.5B-parameter model)")
    out = str(check_out_folder(out, "out"))  # before the compute: a file or unwritable folder fails now, not at the end

    specs = [dict(model=model, shape=shape, vocab_size=vocab_size, algo=a, completion_len=int(L), group_size=int(G),
                  prompt_len=prompt_len, gradient_checkpointing=gradient_checkpointing, variant=v)
             for L in completion_lens for G in group_sizes for a in ALGOS
             for v in (VARIANTS if ladder else VARIANTS[-1:])]
    tag = ("gpu" if torch.cuda.is_available() else "cpu") + f"_{shape or model}{name}".replace("/", "_")

    def save(complete: bool) -> None:  # after every configuration: an interrupted run keeps what it measured
        first = rows[0] if rows else rollout_row or {}
        device = first.get("device") or device_name()  # from a subprocess: no CUDA context in this one
        result = dict(device=device, torch=torch.__version__, suite=name.lstrip("_") or "default", steps=rows,
                      rollout=rollout_row, complete=complete)
        save_result(Path(out) / f"bench_{tag}", result, rows)

    rows: list[dict[str, Any]] = []
    rollout_row: dict[str, Any] | None = None
    if rollout:  # first, and the compiled static cache apart: a compilation cut short loses only its own numbers
        spec = dict(model=model, shape=shape, vocab_size=vocab_size, completion_len=int(completion_lens[0]),
                    group_size=int(group_sizes[0]), prompt_len=prompt_len, kind="rollout",
                    prompts=8 if shape else 2)  # GPU: 8 prompts x G=8 = 64 rows; CPU: 16 rows
        cuda = torch.cuda.is_available()
        compiled = ["hf_generate_static"] + (["static_compiled_sample"] if cuda else [])
        eager = ["hf_generate", "tokeneff_sample", "sliced_sample"] + (["sliced_fused_sample"] if cuda else [])
        for backends in (eager + ["static_sample"], compiled):
            rollout_row = dict(rollout_row or {}, **_in_subprocess(dict(spec, backends=backends)))
            rollout_row.pop("backends")
            save(complete=False)
    for spec in tqdm(specs, desc="bench"):
        rows.append(_in_subprocess(spec))
        save(complete=False)
    save(complete=True)
    return rows


def load_results(*folders: str | Path):
    """All bench_*.json of the folders as one table, with each file's `suite` (`default`, `ladder`, `growth`,
    ...: its --name); files from older versions, without `variant`, are the training path (`shared-prompt`)."""
    frames, seen = [], set()
    for folder in folders:
        for f in sorted(Path(folder).glob("bench_*.json")):
            if f.name in seen:
                continue
            seen.add(f.name)
            data = json.loads(f.read_text())
            df = pd.DataFrame(data["steps"])
            df["model"] = df["shape"].fillna(df["model"]) if "shape" in df else df["model"]
            df["variant"] = df["variant"] if "variant" in df else VARIANTS[-1]
            df["suite"] = data.get("suite", "default")
            frames.append(df)
    if not frames:
        raise TokeneffError(f"no bench_*.json in {', '.join(map(str, folders))}: run `tokeneff bench` first")
    return pd.concat(frames, ignore_index=True)


# notebook 04's vs-TRL table (results/vs_trl.md)
VERSUS_COLUMNS = ["device", "model", "side", "warm_step_seconds", "time_ratio_to_trl", "peak_above_weights_mb",
                  "memory_ratio_to_trl", "peak_memory_mb", "completion_len_mean", "ratios_against"]


def load_versus(*folders: str | Path):
    """All vs_trl_*.json (TRL GRPOTrainer vs ours) as one table; empty when none was run."""
    rows = []
    for folder in folders:
        for f in sorted(Path(folder).glob("vs_trl_*.json")):
            data = json.loads(f.read_text())
            # each file's ratios are against the trl-grpo run of that same file (a later file, e.g. T-SPMO's,
            # reruns TRL beside it): say which, since only the first trl-grpo row of a device is shown
            ref = next((r for r in data["rows"] if r["side"] == "trl-grpo"), None)
            against = (f"trl-grpo of {f.stem} ({ref['warm_step_seconds']:.2f} s/step, "
                       f"{ref['peak_above_weights_mb']:.0f} MiB)" if ref else "—")
            rows += [dict({k: v for k, v in r.items() if not isinstance(v, list)}, device=data["device"],
                          model=data["model"], group_size=data["group_size"], max_new_tokens=data["max_new_tokens"],
                          completion_len_mean=sum(r["completion_len_mean"]) / len(r["completion_len_mean"]),
                          ratios_against=against)
                     for r in data["rows"]]
    return pd.DataFrame(rows).drop_duplicates(subset=["device", "model", "side"]) if rows else pd.DataFrame()


def bench_cli(args) -> None:
    def ints(text: str, name: str) -> list[int]:
        try:
            vals = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise TokeneffError(f"{name}={show(text)}: expected comma-separated integers") from None
        if not vals or min(vals) < 1:
            raise TokeneffError(f"{name}={show(text)}: expected positive integers")
        return vals

    if args.name and not all(c.isalnum() or c in "-_" for c in args.name):
        raise TokeneffError(f"--name={args.name!r}: use letters, digits, - and _ only")
    if args.vs_trl:
        if not 1 <= args.max_new_tokens <= MAX_LEN:
            raise TokeneffError(f"--max-new-tokens={show(args.max_new_tokens)}: must be between 1 and {MAX_LEN}")
        algos = tuple(a.strip() for a in args.algos.split(",") if a.strip())
        bad = [a for a in algos if a not in ALGOS]
        if bad or not algos:
            raise TokeneffError(f"--algos={args.algos!r}: expected a comma-separated subset of {','.join(ALGOS)}")
        res = versus_trl(model=args.model, shape=args.shape, group_size=ints(args.group_sizes, "--group-sizes")[0],
                         max_new_tokens=args.max_new_tokens, steps=args.steps, algos=algos,
                         gradient_checkpointing=args.gradient_checkpointing, out=args.out, gemm=args.gemm,
                         **({"trl_trainers": ()} if args.no_trl_trainers else {}))
        print_versus(res)
        print(f"written to {args.out}/")
        return
    rows = run_bench(model=args.model, shape=args.shape,
                     completion_lens=ints(args.completion_lens, "--completion-lens"),
                     group_sizes=ints(args.group_sizes, "--group-sizes"), vocab_size=args.vocab_size, out=args.out,
                     gradient_checkpointing=args.gradient_checkpointing, ladder=args.ladder,
                     rollout=not args.no_rollout,
                     name=f"_{args.name}" if args.name else "")
    for r in rows:
        print(f"{r['device']:<22} {r['algo']:<6} {r['variant']:<14} L={r['completion_len']:<5} G={r['group_size']:<3} "
              f"peak {r['peak_memory_mb']:8.1f} MiB  step {r['step_seconds']:.3f} s  tokens in loss "
              f"{r['frac_tokens_in_loss']:.1%}")
    print(f"written to {args.out}/")


if __name__ == "__main__":  # one configuration, in a fresh process
    spec = json.loads(sys.argv[1])
    if not torch.cuda.is_available():
        set_threads(0)  # one thread, as every run here: measured fastest, and steady beside other work (utils)
    print(json.dumps(rollout_throughput(spec) if spec.get("kind") == "rollout" else one(spec)))
