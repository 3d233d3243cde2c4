"""How far is a bfloat16 sampler from the float32 policy it stands in for? (rollout_dtype=bfloat16, issue 21)

Samples G completions for a few training problems with `rollout_dtype=bfloat16` (the sliced backend, a fresh LoRA
adapter as at the start of a run, temperature 1), then asks the float32 training forward (the loss's
`SelectiveLogProbs`) for the log-probability of every sampled token, and compares it with the sampler's own. Their
difference is the log of the importance ratio pi_float32 / pi_bfloat16 that an exact on-policy update would weight each
token by; nothing in tokeneff applies it. Embedded profile, one thread:

    python scripts/bf16_rollout_gap.py                                   # multiplication, ~1 min
    python scripts/bf16_rollout_gap.py --task svamp --model smollm2-135m+sftepochmlp max_new_tokens=64

Writes results/benchmarks/bf16_rollout_gap_<device>_<model>_<task>[_<tag>].json and prints it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tokeneff.rollout as rollout
from tokeneff import make_config
from tokeneff.benchmarks.benchio import device_name
from tokeneff.loss import SelectiveLogProbs
from tokeneff.models import load_model
from tokeneff.rollout import build_prompt, encode_prompts, sample
from tokeneff.tasks import make_task
from tokeneff.utils import set_threads, write_json
from tokeneff.warmstart import model_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="multiplication", choices=("multiplication", "svamp"))
    p.add_argument("--problems", type=int, default=6, help="training problems, G completions each")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    over = dict(kv.split("=", 1) for kv in args.overrides)
    cfg = make_config("embedded", overrides=dict(over, task=args.task, model=args.model, rollout_dtype="bfloat16"))
    set_threads(1)
    from peft import get_peft_model

    model, tok = load_model(model_folder(cfg.model))
    torch.manual_seed(cfg.seed)
    policy = get_peft_model(model, cfg.peft_config())
    task = make_task(cfg)
    ctx = encode_prompts(tok, [build_prompt(tok, task.messages(q)) for q in task.problems("train")[: args.problems]])
    steps, real = [], rollout.pick_next  # the sampler's logits at each step, as it draws from them
    rollout.pick_next = lambda logits, **kw: steps.append(logits.float()) or real(logits, **kw)
    try:
        roll = sample(policy, tok, ctx, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                      **cfg.rollout_options())
    finally:
        rollout.pick_next = real
    comps, sampler, batch = roll.completions, {}, list(range(len(roll.completions)))
    for t, logits in enumerate(steps):  # sliced: the batch holds the rows still running
        lp = torch.log_softmax(logits / cfg.temperature, -1)
        for i, r in enumerate(batch):
            if t < len(comps[r]):
                sampler[r, t] = float(lp[i, comps[r][t]])
        batch = [r for r in batch if len(comps[r]) > t + 1]
    cells = sorted(sampler)
    policy.eval()
    with torch.no_grad():
        trained = SelectiveLogProbs(policy, temperature=cfg.temperature)(
            roll.context_ids, roll.context_mask, roll.completion_ids, roll.completion_mask,
            torch.arange(len(comps)) // cfg.group_size, torch.tensor([r for r, _ in cells]),
            torch.tensor([t for _, t in cells]))
    gap = trained - torch.tensor([sampler[c] for c in cells])
    ratio = gap.exp()
    result = dict(model=cfg.model, task=args.task, overrides=args.overrides, device=device_name(), tokens=len(cells),
                  completions=len(comps), mean_abs_logp_gap=float(gap.abs().mean()),
                  max_abs_logp_gap=float(gap.abs().max()),
                  mean_logp_gap=float(gap.mean()), ratio_p01=float(ratio.quantile(0.01)),
                  ratio_p99=float(ratio.quantile(0.99)),
                  share_ratio_outside_0_9_to_1_1=float(((ratio < 0.9) | (ratio > 1.1)).float().mean()))
    tag = device_name().split()[0].lower()
    path = Path(args.out) / (f"bf16_rollout_gap_{tag}_{cfg.model.replace('/', '_')}_{args.task}"
                             f"{'_' + args.tag if args.tag else ''}.json")
    write_json(path, result)
    print(json.dumps(result, indent=1), f"\n-> {path}")


if __name__ == "__main__":
    main()
