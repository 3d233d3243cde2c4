#!/bin/bash
# Did a refactor change any result? Tiny runs of each algorithm (T-SPMO with replay) and a resumed run, hashed
# without timings, paths, the checkpoint manifests (hashes of the files compared here) or peft's unordered
# target_modules. Run it at the old commit and at the new one, then compare:
#   git worktree add /tmp/old <rev> && (cd /tmp/old && bash /path/to/scripts/bitwise_runs.sh /tmp/bw-old)
#   bash scripts/bitwise_runs.sh /tmp/bw-new /tmp/bw-old      # prints the files that differ; exit 1 if any
# ~1 min on one core. Config fields added since the old commit show up as a differing config.json: check them.
set -e
OUT=$(realpath -m "$1"); REF=${2:+$(realpath -m "$2")}
[ -n "$1" ] || { echo "usage: $0 OUTDIR [REFERENCE_OUTDIR]"; exit 2; }
[ ! -e "$OUT" ] || { echo "$OUT exists: give a new folder"; exit 2; }
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
PY=${PY:-$(git rev-parse --show-toplevel)/.venv/bin/python}
S="--model tiny-random --task multiplication digits_a=2 digits_b=1 max_new_tokens=12 group_size=4 prompts_per_step=2
   eval_limit=4 eval_every=2 save_every=2 lr=1e-2"
for a in grpo sgrpo tspmo; do
  $PY -m tokeneff train --algo $a --steps 4 --out "$OUT/$a" $S replay=on > "$OUT/$a.log" 2>&1
done
$PY -m tokeneff train --algo tspmo --steps 2 --out "$OUT/res" $S > "$OUT/res1.log" 2>&1
$PY -m tokeneff train --algo tspmo --steps 4 --out "$OUT/res" --resume $S > "$OUT/res2.log" 2>&1
$PY - "$OUT" "$REF" <<'PY'
import hashlib, json, sys
from pathlib import Path
import torch
out, ref = Path(sys.argv[1]), sys.argv[2]
TIMING = {"step_seconds", "rollout_seconds", "peak_memory_mb", "seconds", "wall_seconds"}
def clean(o):
    if isinstance(o, dict):
        return {k: sorted(v) if k == "target_modules" else clean(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [clean(v) for v in o]
    return "<out>" if isinstance(o, str) and o.startswith(str(out)) else o
hashes = {}
for p in sorted(out.rglob("*")):
    if p.is_dir() or p.suffix == ".log" or p.name in (".tokeneff.lock", "manifest.json", "hashes.json"):
        continue
    if p.suffix == ".jsonl":
        data = json.dumps([clean(json.loads(line)) for line in p.read_text().splitlines()]).encode()
    elif p.suffix == ".json":
        data = json.dumps(clean(json.loads(p.read_text().replace(str(out), "<out>"))), sort_keys=True).encode()
    elif p.suffix == ".pt":
        obj = torch.load(p, weights_only=False)
        data = repr(clean(obj) if isinstance(obj, dict) else obj).encode()
    else:
        data = p.read_bytes()
    hashes[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()[:16]
(out / "hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True))
print(f"{len(hashes)} files hashed -> {out / 'hashes.json'}")
if ref:
    old = json.loads((Path(ref) / "hashes.json").read_text())
    differ = [k for k in sorted(set(old) | set(hashes)) if old.get(k) != hashes.get(k)]
    print("identical" if not differ else "differ: " + ", ".join(differ))
    sys.exit(1 if differ else 0)
PY
