"""`tokeneff bench`: peak memory and time of one training step per algorithm, and rollout throughput.

Each (algorithm, completion length, group size) runs in a fresh subprocess so that peak memory is its own:
CUDA: torch.cuda.max_memory_allocated minus the memory held after loading (weights + adapters).
CPU: peak resident set size (ru_maxrss) minus the RSS after loading, i.e. what the step added at its peak.
Groups are synthetic but shaped like real ones: completions share prefixes and branch at random points, so
T-SPMO credits tokens at branch points, not only at position 0.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import TokeneffError
from .utils import atomic_write_bytes, write_json

ALGOS = ("grpo", "sgrpo", "tspmo")
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def _model(spec: dict[str, Any]):
    from .models import load_model, tiny_random

    if spec.get("shape") == "qwen2-1.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = tiny_random()[1]
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_1_5B)).to(torch.bfloat16)
        return model, tok
    if spec["model"] == "tiny-random":
        return tiny_random(vocab_size=spec.get("vocab_size"), hidden=256, layers=4)
    return load_model(spec["model"])


def _synthetic_group(G: int, L: int, vocab: int, rng: random.Random) -> tuple[list[list[int]], list[float]]:
    comps = [[rng.randrange(100, vocab) for _ in range(L)]]
    for _ in range(G - 1):
        parent = comps[rng.randrange(len(comps))]
        cut = rng.randrange(L)
        comps.append(parent[:cut] + [rng.randrange(100, vocab) for _ in range(L - cut)])
    return comps, [float(i % 2) for i in range(G)]


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """One training step (forward + backward on the credited tokens) for one configuration."""
    from peft import LoraConfig, get_peft_model

    from .algorithms import ALGORITHMS
    from .config import make_config
    from .loss import SelectiveLogProbs, policy_loss
    from .rollout import left_pad

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = _model(spec)
    model = get_peft_model(model.to(device), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj",
                                                                                                 "v_proj", "o_proj"]))
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
    lp = SelectiveLogProbs(model, share_prompt=True)
    batch = dict(ctx_ids=ctx_ids.to(device), ctx_mask=ctx_mask.to(device),
                 comp_ids=torch.tensor(comps, device=device),
                 comp_mask=torch.ones(G, L, dtype=torch.long, device=device),
                 row_ctx=torch.zeros(G, dtype=torch.long, device=device),
                 rows=torch.tensor(credits.seq, device=device), pos=torch.tensor(credits.pos, device=device))
    adv, w = torch.tensor(credits.adv, device=device), torch.tensor(credits.weight, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
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
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        what = "CUDA max allocated above weights+adapters"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        what = "peak RSS above RSS after loading"
    return dict(spec, device=_device_name(), peak_memory_mb=max(peak, 0.0), memory_measure=what,
                step_seconds=min(times), tokens_in_loss=len(credits), tokens_total=G * L,
                frac_tokens_in_loss=len(credits) / (G * L))


def rollout_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of `sample` (prompt KV shared by the group) vs plain HF generate on repeated prompts."""
    from .rollout import left_pad, sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = _model(spec)
    model = model.to(device).eval()
    G, L, P, B = spec["group_size"], spec["completion_len"], spec["prompt_len"], spec.get("prompts", 4)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 1000) for _ in range(P)] for _ in range(B)]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tok.pad_token_id = 0
    out = {}
    for name in ("hf_generate", "tokeneff_sample"):
        t0 = time.perf_counter()
        with torch.no_grad():
            if name == "hf_generate":
                ids, mask = left_pad([p for p in prompts for _ in range(G)], 0)
                model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=L,
                               min_new_tokens=L, do_sample=True, top_k=0, pad_token_id=0)
            else:
                sample(model, tok, prompts, G, L)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_tokens_per_s"] = B * G * L / (time.perf_counter() - t0)
    return dict(spec, device=_device_name(), kind="rollout", **out)


def run_bench(model: str = "tiny-random", shape: str | None = None, completion_lens=(64,), group_sizes=(8,),
              prompt_len: int = 120, vocab_size: int = 151936, gradient_checkpointing: bool = False,
              out: str = "results/benchmarks", rollout: bool = True) -> list[dict[str, Any]]:
    """Every algorithm x length x group size in its own subprocess; writes JSON + CSV named by device."""
    for v in list(completion_lens) + list(group_sizes):
        if int(v) < 1:
            raise TokeneffError(f"completion lengths and group sizes must be positive, got {v}")
    if shape and not torch.cuda.is_available():
        raise TokeneffError(f"--shape {shape} needs a GPU (it allocates a 1.5B-parameter model)")
    rows = []
    specs = [dict(model=model, shape=shape, vocab_size=vocab_size, algo=a, completion_len=int(L), group_size=int(G),
                  prompt_len=prompt_len, gradient_checkpointing=gradient_checkpointing)
             for L in completion_lens for G in group_sizes for a in ALGOS]
    from tqdm.auto import tqdm

    for spec in tqdm(specs, desc="bench"):
        proc = subprocess.run([sys.executable, "-m", "tokeneff.bench", json.dumps(spec)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise TokeneffError(f"bench {spec['algo']} L={spec['completion_len']} failed: "
                                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rollout:
        spec = dict(model=model, shape=shape, vocab_size=vocab_size, completion_len=int(completion_lens[0]),
                    group_size=int(group_sizes[0]), prompt_len=prompt_len)
        proc = subprocess.run([sys.executable, "-m", "tokeneff.bench", json.dumps(dict(spec, kind="rollout"))],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            rollout_row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            rollout_row = dict(spec, kind="rollout", error=proc.stderr.strip().splitlines()[-1:])
    device = rows[0]["device"] if rows else _device_name()
    tag = ("gpu" if "CPU" not in device else "cpu") + f"_{shape or model}".replace("/", "_")
    result = dict(device=device, torch=torch.__version__, steps=rows, rollout=rollout_row if rollout else None)
    write_json(Path(out) / f"bench_{tag}.json", result)
    import pandas as pd

    atomic_write_bytes(Path(out) / f"bench_{tag}.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    return rows


def load_results(folder: str | Path):
    import pandas as pd

    frames = []
    for f in sorted(Path(folder).glob("bench_*.json")):
        data = json.loads(f.read_text())
        df = pd.DataFrame(data["steps"])
        df["model"] = df["shape"].fillna(df["model"]) if "shape" in df else df["model"]
        frames.append(df)
    if not frames:
        raise TokeneffError(f"no bench_*.json in {folder}: run `tokeneff bench` first")
    return pd.concat(frames, ignore_index=True)


def bench_cli(args) -> None:
    def ints(text: str, name: str) -> list[int]:
        try:
            vals = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise TokeneffError(f"{name}={text!r}: expected comma-separated integers") from None
        if not vals or min(vals) < 1:
            raise TokeneffError(f"{name}={text!r}: expected positive integers")
        return vals

    if args.vs_trl:
        raise TokeneffError("--vs-trl is not implemented yet: TRL's GRPOTrainer comparison is run by hand "
                            "(see README, Benchmarks)")
    rows = run_bench(model=args.model, shape=args.shape,
                     completion_lens=ints(args.completion_lens, "--completion-lens"),
                     group_sizes=ints(args.group_sizes, "--group-sizes"), vocab_size=args.vocab_size, out=args.out)
    for r in rows:
        print(f"{r['device']:<22} {r['algo']:<6} L={r['completion_len']:<5} G={r['group_size']:<3} "
              f"peak {r['peak_memory_mb']:8.1f} MiB  step {r['step_seconds']:.3f} s  tokens in loss "
              f"{r['frac_tokens_in_loss']:.1%}")
    print(f"written to {args.out}/")


if __name__ == "__main__":  # one configuration, in a fresh process
    spec = json.loads(sys.argv[1])
    print(json.dumps(rollout_throughput(spec) if spec.get("kind") == "rollout" else one(spec)))
