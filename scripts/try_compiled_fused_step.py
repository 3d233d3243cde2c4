"""Does torch.compile (inductor) make the fused decode step faster on this CPU? (issue 21: "the step compiled")

SmolLM2-135M under a fresh LoRA adapter of the embedded profile, `--batch` rows of multiplication test prompts,
rollout_backend=sliced with the fused step (oneDNN products, shared prefix), once as it runs and once with the
step compiled by inductor with dynamic shapes (the rows and the attended length change every step). Inductor's own
lowering of oneDNN's packed product fails on dynamic shapes, so the compiled step calls it as an opaque custom op,
as eager does. A step is the median interval between consecutive steps over the last `--steps`, the least over
`--rounds` rounds in which the two take turns. The compilation (seconds; minutes here) is timed apart. One thread.

    python scripts/try_compiled_fused_step.py

Writes results/benchmarks/fused_step_compiled_<device>_<model>.json (--out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import tokeneff.fused_step as fs
from tokeneff.benchmarks.benchio import device_name
from tokeneff.benchmarks.decode_limit import task_contexts
from tokeneff.config import make_config
from tokeneff.models import load_model
from tokeneff.rollout import generate_rows, left_pad
from tokeneff.utils import set_threads, write_json
from tokeneff.warmstart import model_folder


@torch.library.custom_op("tokeneff_try::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, w, bias):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def opaque_product(weight, bias, x):
    return onednn_linear(x.to(weight.dtype), weight, bias)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    set_threads(1)
    from peft import get_peft_model

    model, tok = load_model(model_folder(args.model))
    model = get_peft_model(model.eval(), make_config("embedded").peft_config()).eval()
    ids, mask = left_pad(task_contexts(tok, args.model, "multiplication", args.batch), tok.pad_token_id or 0)
    eager_call = fs.FusedStep.__call__
    compiled = torch.compile(eager_call, dynamic=True)
    stamps: list[float] = []

    def with_compiled(self, *a):
        stamps.append(time.perf_counter())
        real, fs.product = fs.product, opaque_product  # inside the step only: `unsupported` checks for the real one
        try:
            return compiled(self, *a)
        finally:
            fs.product = real

    def with_eager(self, *a):
        stamps.append(time.perf_counter())
        return eager_call(self, *a)

    def step_seconds(call) -> float:
        fs.FusedStep.__call__ = call
        try:
            stamps.clear()
            generate_rows(model, tok, ids, mask, 1, 1 + args.steps, set(), backend="sliced", step="fused")
        finally:
            fs.FusedStep.__call__ = eager_call
        assert len(stamps) == args.steps, "every step ran fused"
        return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    t0 = time.perf_counter()
    step_seconds(with_compiled)  # compiles (every shape the run meets)
    compile_s = time.perf_counter() - t0
    best = {"eager": float("inf"), "compiled": float("inf")}
    for r in range(args.rounds):
        for name, call in (("eager", with_eager), ("compiled", with_compiled)):
            best[name] = min(best[name], step_seconds(call))
        print(f"round {r + 1}: eager {best['eager'] * 1e3:.1f} ms, compiled {best['compiled'] * 1e3:.1f} ms",
              flush=True)
    row = dict(device=device_name(), model=args.model, adapter="fresh LoRA, embedded profile", batch=args.batch,
               context="multiplication test prompts", threads=1, torch=torch.__version__, steps=args.steps,
               rounds=args.rounds, eager_step_s=best["eager"], compiled_step_s=best["compiled"],
               compiled_over_eager=best["eager"] / best["compiled"], compile_and_first_run_s=compile_s,
               when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(row)
    name = args.model.replace("/", "_")
    out = Path(args.out or f"results/benchmarks/fused_step_compiled_{device_name().split()[0].lower()}_{name}.json")
    write_json(out, row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
