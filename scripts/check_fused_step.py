"""Does the fused decode step give transformers' logits bit for bit on the embedded model? (rollout_step, issue 21)

SmolLM2-135M under a LoRA adapter with a random B (a fresh one's B is zero), at each `--scales` value of alpha / r
(2.0 is the embedded profile's; 1.75 rounds), greedy decoding of the first `--prompts` multiplication test prompts:
every step's logits with rollout_step=fused against rollout_step=transformers (both on oneDNN, shared prefix).
A few seconds:

    python scripts/check_fused_step.py

Writes results/benchmarks/fused_step_check_<device>_<model>.json (--out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tokeneff.rollout as rollout
from tokeneff.benchmarks.benchio import device_name
from tokeneff.benchmarks.decode_limit import task_contexts
from tokeneff.config import make_config
from tokeneff.models import load_model
from tokeneff.utils import set_threads, write_json
from tokeneff.warmstart import model_folder


def step_logits(model, tok, contexts, steps: int, step: str) -> list[torch.Tensor]:
    seen = []
    real = rollout.pick_next
    rollout.pick_next = lambda logits, **kw: seen.append(logits.clone()) or real(logits, **kw)
    try:
        rollout.sample(model, tok, contexts, 1, steps, greedy=True, step=step)
    finally:
        rollout.pick_next = real
    return seen[1:]  # [0] is the prefill's, not a decode step's


def main() -> None:
    from peft import get_peft_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--scales", default="2.0,1.75", help="alpha / r of the adapter, comma-separated")
    p.add_argument("--out", default="results/benchmarks")
    args = p.parse_args()
    set_threads(0)
    rows = []
    for scale in (float(x) for x in args.scales.split(",")):
        model, tok = load_model(model_folder(args.model))
        cfg = make_config("embedded")
        cfg.lora_alpha = round(scale * cfg.lora_r)
        model = get_peft_model(model, cfg.peft_config())
        torch.manual_seed(0)
        for name, w in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(w, std=0.02)
        model.eval()
        contexts = task_contexts(tok, args.model, "multiplication", args.prompts)
        fused, ref = (step_logits(model, tok, contexts, args.steps, s) for s in ("fused", "transformers"))
        diff = max((a - b).abs().max().item() for a, b in zip(fused, ref, strict=True))
        rows.append(dict(scale=cfg.lora_alpha / cfg.lora_r, prompts=args.prompts, steps=len(fused),
                         bitwise=all(torch.equal(a, b) for a, b in zip(fused, ref, strict=True)), max_abs_diff=diff))
        print(f"scale {rows[-1]['scale']}: {len(fused)} steps x {args.prompts} rows, logits bit for bit: "
              f"{rows[-1]['bitwise']} (largest difference {diff:.1e})", flush=True)
    path = Path(args.out) / f"fused_step_check_{device_name().split()[0].lower()}_{args.model.replace('/', '_')}.json"
    write_json(path, dict(model=args.model, device=device_name(), torch=torch.__version__, rows=rows))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
