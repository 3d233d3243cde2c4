"""How much faster is a whole embedded update with another rollout backend than with the eager loop? (issue 21)

Runs `tokeneff train` once per backend (`--backends`, names as `tokeneff bench --decode-limit` takes them: sliced+bf16
is sliced sampling from a bfloat16 copy of the weights), the same config and seed, one thread each, one process per
core at a time (`--parallel 1`: each alone). Reports each update's median time, its rollout part and the rest
(backward and optimizer step), the mean completion length and the tokens in the loss. The backends draw different
samples (sliced draws by inverse CDF), so lengths and the tokens each update trains on differ: the rollout column
compares the decode paths, the update column also carries that difference in work. On an otherwise idle machine:

    python scripts/update_speed.py                       # embedded multiplication, 12 updates, ~6 min
    python scripts/update_speed.py --task svamp key=value ...

Run one after another, whichever backend runs last meets the machine as it is then (its speed drifts by 10-20% here
within minutes): `--rounds R` splits every run into R resumed parts, the backends taking turns between parts
(resume is bit for bit, so the updates are the ones an unbroken run makes), and leaves out each part's first update."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokeneff.benchmarks.benchio import device_name
from tokeneff.benchmarks.decode_limit import BACKEND_SPECS, backend_overrides, parse_backends
from tokeneff.errors import TokeneffError
from tokeneff.utils import environment, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="multiplication", choices=("multiplication", "svamp"))
    p.add_argument("--algo", default="grpo")
    p.add_argument("--steps", type=int, default=12, help="updates per backend (the first is left out as warm-up)")
    p.add_argument("--backends", default="tokeneff,sliced,sliced+bf16", help=f"from {', '.join(BACKEND_SPECS)}")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--tag", default="", help="appended to the file name, e.g. worked")
    p.add_argument("--parallel", type=int, default=0,
                   help="runs at a time (default: one per core, at most one per backend); 1 runs each alone")
    p.add_argument("--rounds", type=int, default=1,
                   help="split each run into this many resumed parts, the backends taking turns between parts, so "
                        "that the machine's drift reaches them alike; each part's first update is left out too")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.steps < 3:
        p.error(f"--steps {args.steps}: give at least 3 (the first update is warm-up)")
    try:
        backends = parse_backends(args.backends)
    except TokeneffError as e:
        p.error(f"--backends: {e}")
    if args.parallel < 0:
        p.error(f"--parallel {args.parallel}: give 0 (one per core) or more")
    if not 1 <= args.rounds <= args.steps // 2:
        p.error(f"--rounds {args.rounds}: give 1 to {args.steps // 2} (each part needs two updates, one left out)")
    parallel = args.parallel or min(len(backends), os.cpu_count() or 1)
    own = {b: [f"{k}={v}" for k, v in backend_overrides(b).items()] for b in backends}
    start = time.strftime("%Y-%m-%dT%H:%M:%S")
    ends = [args.steps * (r + 1) // args.rounds for r in range(args.rounds)]  # each part's last update
    with tempfile.TemporaryDirectory() as tmp:
        for r, end in enumerate(ends):
            for i in range(0, len(backends), parallel):  # waves of `parallel` runs, one thread each
                wave = {b: subprocess.Popen(
                    [sys.executable, "-m", "tokeneff", "train", "--algo", args.algo, "--task", args.task, "--model",
                     args.model, "--steps", str(end), "--seed", "0", "--out", f"{tmp}/{b}", *own[b],
                     *(["--resume"] if r else []), "threads=1", "eval_at_start=false", "eval_limit=1",
                     f"save_every={ends[0]}", *args.overrides],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for b in backends[i: i + parallel]}
                for b, proc in wave.items():
                    err = proc.communicate()[1]
                    if proc.returncode:
                        sys.exit(f"update_speed: the {b} run failed: "
                                 f"{err.strip().splitlines()[-1] if err.strip() else ''}")
        rows = []
        first = {1} | {end + 1 for end in ends[:-1]}  # each process's first update warms its caches: left out
        for b in backends:
            m = [json.loads(x) for x in Path(f"{tmp}/{b}/metrics.jsonl").read_text().splitlines()]
            m = [r for r in m if "step_seconds" in r and r["step"] not in first]
            tokens = [r["completion_len_mean"] for r in m]
            rows.append(dict(backend=b, updates=len(m), step_seconds=statistics.median(r["step_seconds"] for r in m),
                             rollout_seconds=statistics.median(r["rollout_seconds"] for r in m),
                             rest_seconds=statistics.median(r["step_seconds"] - r["rollout_seconds"] for r in m),
                             tokens_in_loss_mean=statistics.fmean(r["tokens_in_loss"] for r in m),
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
    write_json(out, dict(model=args.model, task=args.task, algo=args.algo, steps=args.steps, rounds=args.rounds,
                         overrides=args.overrides,
                         parallel=parallel, started=start, device=device_name(), environment=environment(),
                         rows=rows))
    print(f"| backend | update (median) | rollout (median) | rest (median) | tokens in the loss (mean) | completion "
          f"tokens (mean) | rollout ms per token | rollout vs {ref['backend']} | update vs {ref['backend']} |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['step_seconds']:.2f} s | {r['rollout_seconds']:.2f} s | "
              f"{r['rest_seconds']:.2f} s | {r['tokens_in_loss_mean']:.0f} | {r['completion_len_mean']:.1f} | "
              f"{r['rollout_ms_per_token']:.0f} | "
              f"{r['rollout_speedup']:.2f}× | {r['update_speedup']:.2f}× |")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
