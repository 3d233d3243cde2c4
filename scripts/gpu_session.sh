#!/usr/bin/env bash
# One short GPU session (one H100/H200), offline, everything at the Qwen2-1.5B shape with random weights:
#   a. versions + nvidia-smi          b. whole steps vs TRL 1.16 GRPOTrainer (G=8, <= 256 tokens, 3 steps)
#   c. one step per algorithm + rollout tokens/s at batch 64 x 256 (HF eager, HF static cache compiled, ours)
#   d. the memory ladder (L=256)      e. 10 updates per algorithm with the paper profile   f. cost growth
# in that order of priority, each started only if the time left (BUDGET_S, from the script's start) covers it,
# and cut off at its cap. After each stage $OUT/gpu_results.tar.gz is packed anew (result files named by
# device, runs' metrics, the log), so a run killed at any point still returns what it measured; the log is
# tee'd to $OUT/gpu_session.log as it goes.
#
#   OUT=/some/empty/dir bash scripts/gpu_session.sh            # on the GPU machine (make gpu-session)
#   OUT=/tmp/gpuout TINY=1 bash scripts/gpu_session.sh         # the same plumbing at toy size on a CPU
# Knobs (environment): BUDGET_S (GPU default 420 s: a-c fit, d-f run only if time is left), STAGES (default
# bcdef), TRAIN_STEPS (10), VS_STEPS (3), CAP_B (260), VS_FLAGS (e.g. --no-trl-trainers --algos tspmo), NO_ENV
# (1: skip stage a), PYTHON (python3), INSTALL/WHEELS/SITE (below), MODEL_DIR (the saved random model).
#
# Wheels: if .whl/ holds wheels (trl, datasets, ... that the machine lacks), they are installed with
# --target into $SITE (default /tmp/site) and put first on PYTHONPATH; the repo itself is imported from
# PYTHONPATH too (no pip install -e). If the carried versions cannot be imported together with the machine's
# packages, the script falls back to the machine's huggingface_hub, then to its transformers/peft, and logs it.
# Random weights never earn a reward, so stages b and e reward every other completion of a group
# (tokeneff.benchmarks.versus_trl.synthetic_reward) on every side: the point is the cost of steps that carry signal.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
TINY=${TINY:-0}
STAGES=${STAGES:-bcdef}  # which of the stages b-f to run (a always runs), e.g. STAGES=de
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}  # folder of wheels to install into $SITE first; INSTALL=0 (the default with TINY=1): none
INSTALL=${INSTALL:-$([ "$TINY" = 1 ] && echo 0 || echo 1)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=${TQDM_MININTERVAL:-15} \
       TOKENEFF_CACHE=${TOKENEFF_CACHE:-/tmp/tokeneff-cache}
START=$(date +%s)
LOG=$OUT/gpu_session.log
TAR=$OUT/gpu_results.tar.gz

if [ "$TINY" = 1 ]; then  # toy sizes, a CPU, the project's .venv; nothing written outside runs/gpu_tiny
  BUDGET_S=${BUDGET_S:-900}
  DEV=cpu RES=runs/gpu_tiny/benchmarks RUNS=runs/gpu_tiny MODEL_DIR=${MODEL_DIR:-runs/gpu_tiny/tiny-model}
  SHAPE=tiny MODEL_ARGS=(--model tiny-random --vocab-size 1000)
  L=16 LENS=8,16,24 VS_TOKENS=8 VS_STEPS=2 TRAIN_STEPS=2 TRAIN_TOKENS=8 STEP_EST_S=20
  TRAIN_EXTRA='{"prompts_per_step": 2, "eval_batch_size": 2, "eval_limit": 2, "mixed_precision": "no"}'
  #     est cap (s): the least time worth starting a stage with, and the most it may take
  EST_B=60  CAP_B=400; EST_C=30 CAP_C=300; EST_D=30 CAP_D=300; EST_E=40; EST_F=30 CAP_F=300
else
  BUDGET_S=${BUDGET_S:-420}
  DEV=gpu RES=results/benchmarks RUNS=runs/gpu MODEL_DIR=${MODEL_DIR:-/tmp/tokeneff-qwen2-1.5b-random}
  SHAPE=qwen2-1.5b MODEL_ARGS=(--shape qwen2-1.5b)
  L=256 LENS=256,512,1024 VS_TOKENS=256 VS_STEPS=${VS_STEPS:-3} TRAIN_STEPS=${TRAIN_STEPS:-10} TRAIN_TOKENS=200 STEP_EST_S=8
  TRAIN_EXTRA='{"eval_limit": 8}'
  EST_B=150 CAP_B=${CAP_B:-260}; EST_C=90  CAP_C=240; EST_D=100 CAP_D=240; EST_E=60; EST_F=120 CAP_F=300
fi
mkdir -p "$RES" "$RUNS"

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

pack() {  # results of this session only (named by device), runs' small files, the log; atomically
  local files=()
  mapfile -t files < <({ ls "$RES"/*_"$DEV"_*
                         find "$RUNS"/{grpo,sgrpo,tspmo} -maxdepth 1 -type f -name '*.json*'
                         ls "$OUT"/env.txt "$LOG"; } 2>/dev/null | sort -u)
  # tar's own messages go to a file apart: written into the log it archives, they made tar exit 1 ("file changed")
  tar -czf "$TAR.tmp" --transform "s|^${OUT#/}/||" "${files[@]}" 2>"$OUT/tar.err" && mv -f "$TAR.tmp" "$TAR"
}

stage() {  # stage NAME EST CAP command...: skipped when less than EST seconds are left, cut off at CAP
  local name=$1 est=$2 cap=$3 lim t0 rc cmd
  shift 3
  if [[ $STAGES != *${name:0:1}* ]]; then
    log "== $name: not in STAGES=$STAGES"
    return 0
  fi
  lim=$(left)
  if (( lim < est )); then
    log "== $name: SKIPPED, $lim s left of BUDGET_S=$BUDGET_S (needs ~$est s)"
    return 0
  fi
  (( lim > cap )) && lim=$cap
  cmd="$*"
  cmd=${cmd//$'\n'/ }
  log "== $name: start (cut off after $lim s): ${cmd:0:300}"
  t0=$(date +%s)
  timeout -k 15 "$lim" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && log "== $name: CUT OFF at $lim s (partial results kept)"
  log "== $name: rc=$rc wall $(( $(date +%s) - t0 )) s"
  pack
}

log "gpu_session: TINY=$TINY BUDGET_S=$BUDGET_S OUT=$OUT host $(hostname) nproc $(nproc)"

# --- wheels the machine lacks (trl, datasets, ...), with a fallback to its own versions ---
IMPORTS="import torch, transformers, peft, accelerate, trl, datasets; from trl import GRPOTrainer; \
import tokeneff.train, tokeneff.benchmarks.versus_trl"
if [ "$INSTALL" = 1 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  t0=$(date +%s)
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
       "$WHEELS"/*.whl >>"$LOG" 2>&1; then  # no pip: these wheels are pure Python, unpacking them is installing them
    log "pip install failed: unpacking the wheels into $SITE instead"
    "$PY" -c "import glob, sys, zipfile
for w in sorted(glob.glob(sys.argv[2] + '/*.whl')): zipfile.ZipFile(w).extractall(sys.argv[1])" "$SITE" "$WHEELS" \
      2>&1 | tee -a "$LOG"
  fi
  export PYTHONPATH=$SITE:$PWD
  log "wheels installed into $SITE in $(( $(date +%s) - t0 )) s: $(ls "$WHEELS" | tr '\n' ' ')"
  for fallback in "" "huggingface_hub* httpx2* httpcore2* truststore* click* idna*" "transformers* peft*"; do
    if [ -n "$fallback" ]; then
      log "imports failed: falling back to the machine's own: $fallback"
      (cd "$SITE" && rm -rf $fallback)
    fi
    "$PY" -c "$IMPORTS" >>"$LOG" 2>&1 && break
  done
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi

# --- a. versions (NO_ENV=1 skips it: ~20 s that a very short session may need) ---
if [ "${NO_ENV:-0}" = 1 ]; then
  log "== a. env: skipped (NO_ENV=1)"
else
{
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers", "triton"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:  # noqa: BLE001
        print(m, "NOT IMPORTABLE:", type(e).__name__, str(e)[:200])
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt" >> "$LOG"
log "== a. env: done"
pack
fi

TK=("$PY" -m tokeneff.cli)  # the `tokeneff` entry point, without installing the package

# --- b. whole steps vs TRL's GRPOTrainer ---
if [ "$TINY" = 1 ]; then  # the CLI's --shape is qwen2-1.5b only (GPU): the same function with the tests' toy shape
  stage "b. vs-trl" $EST_B $CAP_B "$PY" -c "from tokeneff.benchmarks.versus_trl import versus_trl, print_versus
print_versus(versus_trl(shape='tiny', group_size=4, max_new_tokens=$VS_TOKENS, steps=$VS_STEPS,
                        gradient_checkpointing=True, out='$RES'))"
else
  stage "b. vs-trl" $EST_B $CAP_B "${TK[@]}" bench --vs-trl --shape qwen2-1.5b --group-sizes 8 --max-new-tokens $VS_TOKENS \
    --steps $VS_STEPS --gradient-checkpointing --out "$RES" ${VS_FLAGS:-}
fi

# --- c. one step per algorithm (shared-prompt path, no checkpointing) + rollout tokens/s, batch 8 prompts x G=8 ---
stage "c. default bench + rollout" $EST_C $CAP_C "${TK[@]}" bench "${MODEL_ARGS[@]}" --completion-lens $L --group-sizes 8 \
  --out "$RES"

# --- d. where the memory goes ---
stage "d. ladder" $EST_D $CAP_D "${TK[@]}" bench "${MODEL_ARGS[@]}" --ladder --name ladder --completion-lens $L \
  --gradient-checkpointing --no-rollout --out "$RES"

# --- e. paper profile, a few updates per algorithm (model saved once, reused) ---
TRAIN_PY='# e: tokeneff train --profile paper, rewards synthetic
import json, os, shutil, sys
from pathlib import Path
shape, folder, algo, steps, out, tokens, extra = sys.argv[1:8]
if not (Path(folder) / "model.safetensors").is_file():
    from tokeneff.benchmarks.benchio import save_random_shape
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    save_random_shape(shape, folder + ".tmp")
    os.replace(folder + ".tmp", folder)
from tokeneff.loop import train
from tokeneff.benchmarks.versus_trl import synthetic_rewards
over = dict(model=folder, algo=algo, steps=int(steps), out=out, max_new_tokens=int(tokens), eval_at_start=False)
over.update(json.loads(extra))
with synthetic_rewards():
    final = train(profile="paper", overwrite=True, **over)
print("final", json.dumps(final))
'
algos=(grpo sgrpo tspmo)
for i in 0 1 2; do
  algo=${algos[$i]}
  share=$(( $(left) / (3 - i) ))  # an equal share of what is left for each algorithm still to run
  steps=$TRAIN_STEPS
  fit=$(( (share - 45) / STEP_EST_S ))  # ~45 s: imports, loading, the final evaluation
  if [[ $STAGES == *e* ]] && (( share >= EST_E && fit < steps )); then
    (( fit < 2 )) && fit=2
    log "e. $algo: only ~$share s for it: $fit steps instead of $steps (~$STEP_EST_S s a step)"
    steps=$fit
  fi
  cap=$share; (( cap < EST_E )) && cap=$EST_E
  stage "e. train $algo ($steps steps)" $EST_E $cap "$PY" -c "$TRAIN_PY" $SHAPE "$MODEL_DIR" $algo $steps \
    "$RUNS/$algo" $TRAIN_TOKENS "$TRAIN_EXTRA"
done

# --- f. cost growth with completion length ---
stage "f. growth" $EST_F $CAP_F "${TK[@]}" bench "${MODEL_ARGS[@]}" --name growth --completion-lens $LENS --group-sizes 8 \
  --no-rollout --gradient-checkpointing --out "$RES"

log "gpu_session: done in $(( $(date +%s) - START )) s"
pack
ls -la "$OUT" | tee -a "$LOG"
