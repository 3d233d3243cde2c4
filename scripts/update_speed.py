"""How much faster is a whole embedded update with the static decode loop than with the eager one? (issue 21)

Runs `tokeneff train` once per rollout backend, side by side (one process per core, one thread each, the same
config and seed), and reports each update's median time, its rollout part and the mean completion length (the
backends draw different samples, so lengths differ a little: compare per-token too). Run it on an otherwise idle
machine with at least as many cores as backends:

    python scripts/update_speed.py                       # embedded multiplication, 12 updates, ~5 min
    python scripts/update_speed.py --task svamp key=value ...

Writes results/benchmarks/update_speed_<device>_<model>_<task>[_<tag>].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokeneff.benchmarks.benchio import device_name
from tokeneff.utils import environment, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="multiplication", choices=("multiplication", "svamp"))
    p.add_argument("--algo", default="grpo")
    p.add_argument("--steps", type=int, default=12, help="updates per backend (the first is left out as warm-up)")
    p.add_argument("--backends", default="tokeneff,static")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--tag", default="", help="appended to the file name, e.g. worked")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.steps < 3:
        p.error(f"--steps {args.steps}: give at least 3 (the first update is warm-up)")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    start = time.strftime("%Y-%m-%dT%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        procs = {b: subprocess.Popen(
            [sys.executable, "-m", "tokeneff", "train", "--algo", args.algo, "--task", args.task, "--model", args.model,
             "--steps", str(args.steps), "--seed", "0", "--out", f"{tmp}/{b}", f"rollout_backend={b}", "threads=1",
             "eval_at_start=false", "eval_limit=1", f"save_every={args.steps}", *args.overrides],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for b in backends}
        rows = []
        for b, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode:
                sys.exit(f"update_speed: the {b} run failed: {err.strip().splitlines()[-1] if err.strip() else ''}")
            m = [json.loads(x) for x in Path(f"{tmp}/{b}/metrics.jsonl").read_text().splitlines()]
            m = [r for r in m if "step_seconds" in r][1:]  # the first update compiles nothing but warms caches
            tokens = [r["completion_len_mean"] for r in m]
            rows.append(dict(backend=b, updates=len(m), step_seconds=statistics.median(r["step_seconds"] for r in m),
                             rollout_seconds=statistics.median(r["rollout_seconds"] for r in m),
                             completion_len_mean=statistics.fmean(tokens),
                             rollout_ms_per_token=1000 * statistics.fmean(
                                 r["rollout_seconds"] / max(r["completion_len_mean"], 1) for r in m)))
    ref = rows[0]
    for r in rows:
        r["update_speedup"] = ref["step_seconds"] / r["step_seconds"]
        r["rollout_speedup"] = ref["rollout_seconds"] / r["rollout_seconds"]
    tag = device_name().split()[0].lower()
    name = f"update_speed_{tag}_{args.model.replace('/', '_')}_{args.task}{'_' + args.tag if args.tag else ''}.json"
    out = Path(args.out) / name
    write_json(out, dict(model=args.model, task=args.task, algo=args.algo, steps=args.steps, overrides=args.overrides,
                         started=start, device=device_name(), environment=environment(), rows=rows))
    print(f"| backend | update (median) | rollout (median) | completion tokens (mean) | rollout ms per token | "
          f"update vs {ref['backend']} |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['step_seconds']:.2f} s | {r['rollout_seconds']:.2f} s | "
              f"{r['completion_len_mean']:.1f} | {r['rollout_ms_per_token']:.0f} | {r['update_speedup']:.2f}× |")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
