"""Do the preallocated rollout backends decode as the eager loop does? (issue 21)

Greedy completions of each `--backends` entry (default: sliced, static) against `tokeneff` for the embedded model in
float32, on every multiplication (200) and SVAMP (300) test problem, evaluated as `tokeneff evaluate` does (embedded
profile). The loops compute the same function on other shapes (static: a fixed-width cache, rows leaving by halves),
so logits may differ in the last bits and a near-tie may flip; this counts the flips and lists each one. On an idle
machine:

    python scripts/check_static_decode.py            # ~12 min on one thread; --limit 10 for a smoke check

With `--adapter`, a trained run's LoRA adapter on `--model` (its base: a warm start such as
smollm2-135m+sftepochmlp): the fused step adds the adapter's update beside each product, peft after it.

Writes results/benchmarks/static_decode_check_<device>_<model>[_<tag>].json (--out, --tag).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokeneff.benchmarks.benchio import device_name
from tokeneff.benchmarks.decode_limit import eval_times, parse_backends
from tokeneff.errors import TokeneffError
from tokeneff.models import load_model
from tokeneff.utils import set_threads, write_json
from tokeneff.warmstart import model_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=0, help="first N test problems of each task (0: all)")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--backends", default="sliced,static", help="compared with tokeneff, comma-separated")
    p.add_argument("--tag", default="", help="appended to the file name, e.g. shared-prefix")
    p.add_argument("--adapter", default="", help="a run's adapter/ folder, on --model (the run's base model)")
    args = p.parse_args()
    try:
        backends = parse_backends(args.backends)
    except TokeneffError as e:
        p.error(f"--backends: {e}")
    set_threads(0)  # one thread, as every run
    model, tok = load_model(model_folder(args.model))  # float32
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    rows = []
    for task in ("multiplication", "svamp"):
        got = eval_times(model, tok, args.model, ("tokeneff", *backends), args.limit, task)
        rows += got
        for r in got[1:]:
            print(f"{task}: {r['flips']} of {r['n']} greedy completions differ ({r['backend']} vs tokeneff); accuracy "
                  f"{got[0]['accuracy']:.3f} -> {r['accuracy']:.3f}; {got[0]['eval_seconds']:.0f} s -> "
                  f"{r['eval_seconds']:.0f} s", flush=True)
    tag = device_name().split()[0].lower()
    suffix = f"_{args.tag}" if args.tag else ""
    path = Path(args.out) / f"static_decode_check_{tag}_{args.model.replace('/', '_')}{suffix}.json"
    write_json(path, dict(model=args.model, adapter=args.adapter or None, limit=args.limit,
                          total_flips=sum(r["flips"] for r in rows), rows=rows))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
