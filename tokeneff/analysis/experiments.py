"""Experiment grids for the notebooks: (variant x seed) runs that resume, skip what is done, and run in parallel.

Plumbing, not algorithm: each run is an ordinary `train(...)` into runs/<profile>/<experiment>/<variant>-s<seed>.

Why worker processes, one intra-op thread each: on a small CPU, PyTorch's OpenMP threads spin-wait and
collapse as soon as anything else wants the cores (a 24x576x1536 GEMM on this 2-core machine: 69 GFLOP/s
with 1 thread, 2.8 with 2 under light load). Independent runs, one per core, each single-threaded, use
the machine fully and never fight. A run's numbers do not depend on the worker that runs it: the same
config (threads included) gives the same metrics sequentially or in parallel (tests/test_experiments.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..config import EVAL_KEYS, TrainConfig, check_name, make_config
from ..errors import ConfigError, show
from ..evaluate import evaluate
from ..loop import train
from ..rundir import check_writable
from ..utils import atomic_write_bytes, environment, write_json
from .report import pct, plot_accuracy, plot_gains, plot_metric, save_figure, save_table, scale_label
from .stats import DELTA, N_BOOT, Interval, paired_bootstrap, verdict

# The paper's reported results, shown beside ours and never mixed with them. Each accuracy claim is
# (variant, compared with, expected: "gain" | "no gain" | None for not reported, the paper's words).
# "X above grpo" is implied by the paper (X gains, full-token GRPO does not), not stated as a number.
PAPER_BASE = {"svamp": "46% (Qwen2-1.5B)", "multiplication": "not reported"}
CLAIMS: dict[str, list[tuple[str, str, str | None, str]]] = {
    "svamp": [("sgrpo", "base", "gain", "46% → over 70%"), ("tspmo", "base", "gain", "46% → over 70%"),
              ("grpo", "base", "no gain", "no gain over the base model"),
              ("sgrpo", "grpo", "gain", "above full-token GRPO (implied)"),
              ("tspmo", "grpo", "gain", "above full-token GRPO (implied)")],
    "multiplication": [("tspmo", "base", "gain", "strong gain"), ("grpo", "base", "no gain", "no gain over base"),
                       ("tspmo", "grpo", "gain", "above full-token GRPO (implied)"),
                       ("sgrpo", "base", None, "not reported"), ("tspmo-noreplay", "base", None, "not reported")],
}
# The multiplication experiment's variants, picked by name in notebook 02 (make reproduce runs the paper's three
# algorithms; the full tier adds T-SPMO without replay, an ablation of T-SPMO's resampling).
VARIANTS = {"grpo": {"algo": "grpo"}, "sgrpo": {"algo": "sgrpo"}, "tspmo": {"algo": "tspmo", "replay": "on"},
            "tspmo-noreplay": {"algo": "tspmo", "replay": "off"}}
# Share of completion tokens that carry loss, relative to full-token GRPO: (low, high) bounds the paper gives.
TOKEN_SHARE = {"grpo": ("100%", 1.0, 1.0), "sgrpo": ("30–50%", 0.30, 0.50), "tspmo": ("< 5%", 0.0, 0.05)}


# CI (`make test`, TOKENEFF_SMOKE=1): every notebook at tiny scale, its files outside results/.
SMOKE = dict(model="tiny-random", max_new_tokens=8, group_size=4, prompts_per_step=2, eval_batch_size=4,
             digits_a=1, digits_b=1)
SMOKE_PARAMS = dict(seeds=[0], steps=2, eval_every=1, eval_limit=4, workers=1, p_values=[1.0], model="tiny-random",
                    group_size=4, max_completion_length=8, sgrpo_alpha=2, sgrpo_k=4, digits_a=1, digits_b=1,
                    results_dir="../runs/smoke/results", runs_dir="../runs/smoke")


def smoke_scale(params: dict[str, Any]) -> dict[str, Any]:
    """Every notebook's second cell: `globals().update(smoke_scale(globals()))`. Under TOKENEFF_SMOKE=1 (CI,
    `make smoke`) it returns the tiny-scale value of each parameter the notebook has (and `extra` with SMOKE's
    TrainConfig fields), so the same notebook runs in seconds with its files under runs/smoke/, never results/;
    otherwise nothing."""
    if os.environ.get("TOKENEFF_SMOKE") != "1":
        return {}
    out = {k: v for k, v in SMOKE_PARAMS.items() if k in params}
    if "extra" in params:
        out["extra"] = dict(params["extra"], **SMOKE)
    return out


def shared_settings(params: dict[str, Any], **task_settings) -> dict[str, Any]:
    """The TrainConfig overrides an accuracy notebook gives every run, from its parameters cell (`globals()`):
    `extra`, then eval_every / eval_limit / eval_split, `model` when set and `max_new_tokens` from
    `max_completion_length` when set (each only where the notebook has that parameter), then `task_settings`.
    A warm-start model name is built here, once (cached), before the grid's workers load it: loading never trains."""
    from ..warmstart import is_warm_start_name, resolve

    out = dict(params.get("extra") or {})
    out.update({k: params[k] for k in ("eval_every", "eval_limit", "eval_split") if k in params})
    if params.get("model"):
        if is_warm_start_name(params["model"]):
            resolve(params["model"], build=True)
        out["model"] = params["model"]
    if params.get("max_completion_length"):
        out["max_new_tokens"] = params["max_completion_length"]
    return dict(out, **task_settings)


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def pick_variants(names: list[str]) -> dict[str, dict[str, Any]]:
    """VARIANTS by name, in the order given; a clear error for anything else."""
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"variants={names!r}: must be a non-empty list of names, e.g. [grpo, tspmo] "
                          "(papermill: -y 'variants: [grpo, tspmo]')")
    bad = [n for n in names if n not in VARIANTS]
    if bad or len(set(names)) != len(names):
        what = f"unknown {bad}" if bad else "a name repeated"
        raise ConfigError(f"variants={list(names)!r}: {what}; choose from {list(VARIANTS)}")
    return {n: VARIANTS[n] for n in names}


def run_dir(root: str, profile: str, experiment: str, variant: str, seed: int) -> Path:
    return Path(root) / profile / experiment / f"{variant}-s{seed}"


def base_accuracy(task: str, profile: str = "embedded", root: str = "runs", **overrides) -> dict[str, Any]:
    """Greedy accuracy of the model without adapters on the eval set (every problem's outcome kept); cached."""
    cfg = make_config(profile, overrides=dict(task=task, **overrides))
    # cached per everything that changes the problems, the prompts or the greedy completions
    key = {k: v for k, v in cfg.to_dict().items() if k in EVAL_KEYS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(root) / profile / f"base_{task}_{cfg.model.replace('/', '_')}_n{cfg.eval_limit}_{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return evaluate(task=task, model=cfg.model, limit=cfg.eval_limit, profile=profile, out=str(path),
                    split=cfg.eval_split, **{k: v for k, v in overrides.items() if k not in ("model", "eval_split")})


def _worker_init() -> None:
    """Workers ignore Ctrl-C (in a terminal it reaches the whole process group): the grid stops them itself. On
    Linux a worker is also killed when the grid's process dies (even by SIGKILL), so that none is left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(1)


@contextlib.contextmanager
def _stop_signals():
    """SIGTERM and SIGHUP (a job scheduler, a closed terminal) stop the grid as Ctrl-C does; once the runs are
    stopped, the signal is delivered again to the handler it had before, so that a script ends as that signal ends
    it (by default: quietly, exit status 128 + signal) rather than with a KeyboardInterrupt traceback."""
    received: list[int] = []

    def stop(signum, _):
        received.append(signum)
        raise KeyboardInterrupt

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) not in (signal.SIG_IGN, None):
                old[sig] = signal.signal(sig, stop)
    try:
        yield
    except KeyboardInterrupt as e:
        sig = received[0] if received else getattr(e, "signum", None)  # one worker: train() took the signal
        if sig in old:
            for s, handler in old.items():
                signal.signal(s, handler)
            old.clear()
            os.kill(os.getpid(), sig)  # returns only if that handler did not end the process
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _train_one(cfg: TrainConfig) -> str:
    """Worker entry point (a top-level function, so that spawned processes can import it)."""
    train(cfg, resume=True, progress=False)
    return cfg.out


def _base_one(kwargs: dict[str, Any]) -> str:
    """Worker entry point for a base-model evaluation (cached on disk, read back by `base_accuracy`)."""
    base_accuracy(**kwargs)
    return f"base {kwargs['task']}"


def run_grid(experiment: str, task: str, variants: dict[str, dict[str, Any]], seeds: list[int], steps: int,
             profile: str = "embedded", root: str = "runs", workers: int = 0,
             base_evals: tuple[dict[str, Any], ...] = (), **common) -> pd.DataFrame:
    """Train every variant with every seed (resuming unfinished runs); return all metrics as one table.

    workers: parallel processes (0: one per core; 1: in this process, one run after another). Each run uses
    `threads` intra-op threads (config; the embedded default is 1).
    base_evals: `base_accuracy` arguments, evaluated in the same pool beside the runs: evaluated before the
    grid, the base model would hold one core while the others sat idle (~2.5 min for SVAMP on this machine).
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"workers={workers!r}: must be 0 (one per core) or a positive integer")
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"seeds={seeds!r}: must be a list of integers, e.g. [0, 1] "
                          "(papermill: -y 'seeds: [0, 1]'; -p passes a string)")
    if not variants or not seeds:
        raise ConfigError(f"{experiment}: needs at least one variant and one seed")
    check_name("experiment", experiment)
    for variant in variants:
        check_name("variant", variant)
    if len(set(seeds)) != len(seeds):
        dup = next(x for x in seeds if list(seeds).count(x) > 1)
        raise ConfigError(f"seeds={show(list(seeds))}: seed {dup} appears more than once (each seed is one run)")
    grid_keys = {"task", "steps", "seed", "out", "eval_at_start"}  # the grid sets these for every run
    for variant, over in variants.items():
        clash = sorted(grid_keys & (set(over) | set(common)))
        if clash:
            where = f"variant {variant!r}" if clash[0] in over else "the common settings"
            raise ConfigError(f"{experiment}: {clash[0]}= in {where} is set by the grid itself (task, steps, seeds, "
                              "runs folder): pass it to run_grid instead")
    configs = [make_config(profile, overrides=dict(common, task=task, steps=steps, seed=seed, eval_at_start=False,
                                                   out=str(run_dir(root, profile, experiment, variant, seed)), **over))
               for variant, over in variants.items() for seed in seeds]
    jobs = [(_base_one, kw) for kw in base_evals] + [(_train_one, cfg) for cfg in configs]
    workers = min(workers or default_workers(), len(jobs))
    bar = tqdm(total=len(jobs), desc=f"{experiment}: runs", unit="run")
    with _stop_signals():  # SIGTERM, SIGHUP: as Ctrl-C
        if workers == 1:
            for kw in base_evals:
                base_accuracy(**kw)
                bar.update()
            for cfg in configs:
                train(cfg, resume=True)
                bar.update()
        else:
            # spawn, not fork: a forked child inherits the parent's OpenMP and tokenizer thread pools half-set-up
            others = set(mp.active_children())  # the pool's workers are the children started after this
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
            try:
                for fut in as_completed([pool.submit(fn, arg) for fn, arg in jobs]):
                    bar.set_postfix_str(Path(fut.result()).name)  # re-raises a worker's error here
                    bar.update()
            except KeyboardInterrupt:
                # Stop every run at once, as a kill would: each resumes bit-for-bit from its last checkpoint (every
                # save_every steps) when the grid is run again. A kill at any instant is safe (rundir/).
                for proc in set(mp.active_children()) - others:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                print("interrupted: run the grid again to resume each run from its last checkpoint", flush=True)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    frames = []
    for (variant, _), cfg in zip([(v, s) for v in variants for s in seeds], configs, strict=True):
        df = pd.read_json(Path(cfg.out) / "metrics.jsonl", lines=True)
        df["variant"], df["seed"], df["algo"] = variant, cfg.seed, cfg.algo
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def outcomes(records: list[dict[str, Any]], ids: list[str], key: str = "correct") -> np.ndarray:
    """0/1 outcome per problem, in the order of `ids` (the pairing across arms); key="truncated": whether the
    completion hit the token budget."""
    by_id = {r["id"]: float(r[key]) for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"evaluation lacks problem {missing[0]!r}: arms must be evaluated on the same problems")
    return np.array([by_id[i] for i in ids])


def grid_outcomes(root: str, profile: str, experiment: str, variants: list[str], seeds: list[int],
                  ids: list[str], step: int | None = None, key: str = "correct") -> dict[str, np.ndarray]:
    """Per variant: [seeds, problems] outcomes (`key` of each record) at `step` (default: each run's last
    evaluation)."""
    out = {}
    for v in variants:
        rows = []
        for s in seeds:
            d = run_dir(root, profile, experiment, v, s)
            evals = sorted(d.glob("eval_step*.json"), key=lambda p: int(p.stem.removeprefix("eval_step")))
            f = d / f"eval_step{step}.json" if step is not None else (evals[-1] if evals else None)
            if f is None or not f.is_file():
                raise FileNotFoundError(f"{d}: no evaluation{'' if step is None else f' at step {step}'}")
            rows.append(outcomes(json.loads(f.read_text())["records"], ids, key))
        out[v] = np.stack(rows)
    return out


def outcomes_table(by_step: dict[int, dict[str, np.ndarray]], experiment: str, seeds: list[int], ids: list[str],
                   base_vec: np.ndarray, truncated: dict[int, dict[str, np.ndarray]] | None = None,
                   base_truncated: np.ndarray | None = None) -> pd.DataFrame:
    """Every evaluation's per-problem outcome (the base model at step 0): the data behind every interval, so that a
    reader can recompute them (`python -m tokeneff.analysis.summary`) or test another question without rerunning
    anything. by_step: step -> variant -> [seeds, problems] outcomes (`grid_outcomes` at that step); truncated,
    base_truncated: the same for whether each completion hit the token budget (a `truncated` column)."""
    cols = ["experiment", "variant", "seed", "step", "id", "correct"]

    def frame(v, s, step, row, cut):
        d = dict(variant=v, seed=s, step=step, id=ids, correct=row.astype(int))
        return pd.DataFrame(d if cut is None else dict(d, truncated=cut.astype(int)))

    frames = [frame("base", 0, 0, base_vec, base_truncated)]
    for step, arms in by_step.items():
        for v, a in arms.items():
            cut = truncated[step][v] if truncated is not None else [None] * len(seeds)
            frames += [frame(v, s, step, row, c) for s, row, c in zip(seeds, a, cut, strict=True)]
    return pd.concat(frames, ignore_index=True).assign(experiment=experiment)[
        cols + (["truncated"] if truncated is not None else [])]


def arms_from_table(table: pd.DataFrame, variants: list[str], seeds: list[int], column: str = "correct"
                    ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None:
    """The inverse of `outcomes_table` at each variant's last evaluated step: (problem ids in the base model's
    order, the base model's outcomes, variant -> [seeds, problems]). None if the table has no `column` (outcome
    files written before the `truncated` column)."""
    if column not in table.columns:
        return None
    base = table[table.variant == "base"]
    ids = base.id.tolist()
    out = {}
    for v in variants:
        t = table[table.variant == v]
        last = t[t.step == t.step.max()]
        out[v] = np.stack([last[last.seed == s].set_index("id").loc[ids, column].to_numpy(float) for s in seeds])
    return ids, base[column].to_numpy(float), out


def arm_intervals(final: dict[str, np.ndarray], base_vec: np.ndarray, shares: dict[str, list[float]],
                  n_boot: int = N_BOOT, truncated: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: accuracy, gain over the base model and over full-token GRPO (paired bootstrap intervals), the
    token shares per seed, and the share of its completions cut off by the token budget (None: not recorded)."""
    def iv(a, b=None) -> Interval:
        return paired_bootstrap(a, b, n_boot=n_boot)

    return {v: dict(accuracy=iv(a), vs_base=iv(a, base_vec),
                    vs_grpo=iv(a, final["grpo"]) if "grpo" in final and v != "grpo" else None,
                    token_share=list(shares.get(v, [])),
                    truncated=float(truncated[v].mean()) if truncated is not None else None)
            for v, a in final.items()}


def rate(x: float | None) -> str:
    """A share of completions as '12.3%', or '—' where it was not recorded."""
    return "—" if x is None else f"{100 * x:.1f}%"


def final_table(arms: dict[str, dict[str, Any]], label: str) -> pd.DataFrame:
    """<task>_final: accuracy, gains and truncation per variant (arms: `arm_intervals`, or as stored in JSON)."""
    def as_iv(x):
        return Interval(**x) if isinstance(x, dict) else x

    return pd.DataFrame([dict(variant=v, accuracy=pct(as_iv(a["accuracy"])),
                              gain_vs_base=pct(as_iv(a["vs_base"]), True), gain_vs_grpo=pct(as_iv(a["vs_grpo"]), True),
                              truncated=rate(a.get("truncated")),
                              token_share=f"{100 * np.mean(a['token_share']):.0f}%" if a["token_share"] else "—",
                              scale=label) for v, a in arms.items()])


def claim_verdicts(task: str, arms: dict[str, dict[str, Any]], delta: float = DELTA) -> list[dict[str, str]]:
    """Each of the paper's claims about `task` with our interval and the verdict it supports. `arms` maps a variant
    to its intervals (`vs_base`, `vs_grpo`: Interval or its dict, as stored in <task>_summary.json)."""
    out = []
    for v, ref, expect, paper in CLAIMS.get(task, []):
        d = arms.get(v, {}).get("vs_base" if ref == "base" else "vs_grpo")
        if d is None:
            continue
        d = d if isinstance(d, Interval) else Interval(**d)
        # one run: the interval resamples problems only, run-to-run variation is not in it, so no verdict
        said = ("not tested (1 seed)" if d.seeds < 2 else verdict(d, expect, delta)) if expect else "—"
        out.append(dict(claim=f"{v} vs {'the base model' if ref == 'base' else 'full-token GRPO'}", paper=paper,
                        ours=pct(d, signed=True), verdict=said))
    return out


def token_share(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed): credited tokens / tokens of the groups with reward variance. Groups whose rewards are
    all equal carry no loss under any algorithm, so this is the share the paper compares (GRPO = 100%)."""
    g = df[df.step > 0].groupby(["variant", "seed"])
    signal = g.tokens_in_signal_groups.sum()
    return (g.tokens_in_loss.sum() / signal.where(signal > 0)).rename("share").reset_index()  # NaN: no signal


def accuracy_curve(by_step: dict[int, dict[str, np.ndarray]], variants: list[str],
                   base_vec: np.ndarray) -> pd.DataFrame:
    """Accuracy at every evaluated step with a 95% bootstrap interval over problems and seeds; base at step 0.
    by_step: step -> variant -> [seeds, problems] outcomes (`grid_outcomes` at that step)."""
    b = paired_bootstrap(base_vec)
    rows = [dict(variant=v, step=0, mean=b.mean, lo=b.lo, hi=b.hi) for v in variants]
    for step, arms in by_step.items():
        for v, a in arms.items():
            iv = paired_bootstrap(a)
            rows.append(dict(variant=v, step=step, mean=iv.mean, lo=iv.lo, hi=iv.hi))
    return pd.DataFrame(rows)


def accuracy_experiment(task: str, variants: dict[str, dict[str, Any]], seeds: list[int], steps: int,
                        profile: str = "embedded", runs_dir: str = "runs", results_dir: str = "results",
                        experiment: str | None = None, workers: int = 0, n_boot: int = N_BOOT,
                        delta: float = DELTA, results_name: str = "", **common) -> dict[str, Any]:
    """The whole accuracy experiment of notebooks 01, 02 and 06: base model once, the grid of runs, paired bootstrap
    intervals (each variant against the base model and against full-token GRPO), verdicts per claim of the
    paper (the task's claims), figures, tables and `<experiment>_summary.json` under results_dir/profile
    (experiment: the task's name unless given, e.g. mulworked for worked-answer multiplication)."""
    experiment = check_name("experiment", experiment or task)
    if results_name:
        check_name("results_name", results_name)
    check_writable(Path(results_dir) / (results_name or profile), "results_dir")  # before the hours of training
    cfg = make_config(profile, overrides=dict(common, task=task))
    df = run_grid(experiment, task, variants, seeds, steps, profile, runs_dir, workers=workers,
                  base_evals=(dict(task=task, profile=profile, root=runs_dir, **common),), **common)
    base = base_accuracy(task, profile, runs_dir, **common)  # evaluated in the grid's pool, read from its cache
    ids = [r["id"] for r in base["records"]]
    base_vec, base_cut = outcomes(base["records"], ids), outcomes(base["records"], ids, "truncated")
    names = list(variants)
    label = scale_label(profile, cfg.model, len(seeds))

    final = grid_outcomes(runs_dir, profile, experiment, names, seeds, ids)
    final_cut = grid_outcomes(runs_dir, profile, experiment, names, seeds, ids, key="truncated")
    shares = token_share(df)
    shares = {v: [float(x) for x in shares[shares.variant == v].share.dropna()] for v in names}
    arms = arm_intervals(final, base_vec, shares, n_boot, final_cut)
    claims = claim_verdicts(task, arms, delta)

    eval_steps = sorted(int(x) for x in df.dropna(subset=["eval_accuracy"]).step.unique() if x > 0)
    # every evaluation's outcomes, read once: the curve and the outcomes file both use them
    by_step = {step: grid_outcomes(runs_dir, profile, experiment, names, seeds, ids, step) for step in eval_steps}
    curve = accuracy_curve(by_step, names, base_vec)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 4.4), width_ratios=[1, 1, 1])
    plot_accuracy(curve, f"{experiment}: held-out accuracy ({len(ids)} problems)", base["accuracy"], ax=axes[0])
    # the accuracy bands of two arms overlap even where their paired difference is clear: show the difference
    plot_gains(arms, f"{experiment}: gain over the base model after {steps} updates (paired)", ax=axes[1], delta=delta)
    plot_metric(df[df.step > 0], "reward_mean", "training reward", f"{experiment}: training reward", smooth=5,
                ax=axes[2])
    fig.suptitle(f"{label} · 95% bootstrap intervals (problems × seeds)")
    fig.tight_layout()
    out = Path(results_dir) / (results_name or profile)
    save_figure(fig, str(out / f"{experiment}_curves"))

    table = final_table(arms, label)
    save_table(table, str(out / f"{experiment}_final"))
    claims_df = pd.DataFrame(claims)
    summary = dict(task=task, experiment=experiment, label=label, model=cfg.model, profile=profile, steps=steps,
                   seeds=list(seeds), problems=len(ids),
                   base=dict(accuracy=base["accuracy"], n=len(ids), truncated=float(base_cut.mean())),
                   paper_base=PAPER_BASE.get(task, "—"), delta=delta, n_boot=n_boot, eval_steps=eval_steps,
                   arms={v: {k: (x.__dict__ if isinstance(x, Interval) else x) for k, x in a.items()}
                         for v, a in arms.items()},
                   claims=claims, variants=variants,
                   config={k: v for k, v in cfg.to_dict().items() if k not in ("out", "seed")})
    write_json(out / f"{experiment}_summary.json", summary)
    # what decides these numbers (utils.py); one per experiment: a tier's experiments may run on different days
    write_json(out / f"{experiment}_environment.json", environment(cfg.threads or 1))
    cut_by_step = {step: grid_outcomes(runs_dir, profile, experiment, names, seeds, ids, step, "truncated")
                   for step in eval_steps}
    table_out = outcomes_table(by_step, experiment, seeds, ids, base_vec, cut_by_step, base_cut)
    atomic_write_bytes(str(out / f"{experiment}_outcomes.csv"), table_out.to_csv(index=False).encode())
    return dict(df=df, curve=curve, table=table, claims=claims_df, summary=summary, figure=fig)


def share_verdict(shares: list[float], lo: float, hi: float) -> str:
    """Every seed inside the paper's range: holds; every seed outside it: contradicted; else unresolved."""
    if not shares:
        return "—"
    inside = [lo - 1e-9 <= x <= hi + 1e-9 for x in shares]
    return "holds" if all(inside) else ("contradicted" if not any(inside) else "unresolved (seeds disagree)")


def _check_reuse(summary: Path, seeds: list[int], steps: int) -> None:
    """Notebook 03 reuses notebook 02's runs: other seeds or steps would train runs 02 never reported, or extend its
    finished ones (a larger `steps` resumes them), so they must be 02's, as its summary records them."""
    if not summary.is_file():
        return  # 02 has not run here: the grid trains the runs as 02 would
    try:
        prior = json.loads(summary.read_text())
        theirs = (list(prior["seeds"]), int(prior["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{str(summary)!r} is damaged: rerun notebook 02, whose runs this notebook reuses") from None
    if (list(seeds), steps) != theirs:
        raise ConfigError(f"seeds={list(seeds)}, steps={steps}: notebook 02 ran seeds={theirs[0]}, steps={theirs[1]} "
                          f"({str(summary)!r}) and this notebook reuses its runs: use the same, or rerun 02 first")


def ablation(task: str, seeds: list[int], steps: int, p_values: list[float], profile: str = "embedded",
             runs_dir: str = "runs", results_dir: str = "results", results_name: str = "", workers: int = 0,
             n_boot: int = N_BOOT, **common) -> dict[str, Any]:
    """Notebook 03: token shares and KL drift of the accuracy experiment's runs (reused), S-GRPO's P sweep
    against the base model, and the tokens T-SPMO credits in real groups."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .credits_view import credited_tokens, plot_credited

    cfg = make_config(profile, overrides=dict(common, task=task))
    out = Path(results_dir) / (results_name or profile)
    label = scale_label(profile, cfg.model, len(seeds))
    variants = pick_variants(list(TOKEN_SHARE))  # the paper's three algorithms, the runs of notebook 02
    _check_reuse(out / f"{task}_summary.json", seeds, steps)
    df = run_grid(task, task, variants, seeds, steps, profile, runs_dir, workers=workers, **common)
    shares = token_share(df)
    rows = []
    for v, (paper, lo, hi) in TOKEN_SHARE.items():
        s = [float(x) for x in shares[shares.variant == v].share.dropna()]
        rows.append(dict(variant=v, share_of_signal_tokens=f"{100 * np.mean(s):.1f}% (seeds: "
                         + ", ".join(f"{100 * x:.1f}%" for x in s) + ")" if s else "—",
                         paper=paper, verdict=share_verdict(s, lo, hi), scale=label, shares=s))
    table = pd.DataFrame(rows)

    base = base_accuracy(task, profile, runs_dir, **common)
    ids = [r["id"] for r in base["records"]]
    base_vec = outcomes(base["records"], ids)
    sweep = pd.DataFrame(columns=["variant", "P", "accuracy", "gain_vs_base"])
    if p_values:  # optional: one seed per P, two more runs (the full tier sweeps; make reproduce does not)
        sweep_variants = {f"sgrpo-P{p}": {"algo": "sgrpo", "sgrpo_p": p} for p in p_values}
        run_grid(task + "-psweep", task, sweep_variants, seeds[:1], steps, profile, runs_dir, workers=workers,
                 **common)
        arms, cuts = ({**grid_outcomes(runs_dir, profile, task + "-psweep", list(sweep_variants), seeds[:1], ids,
                                       key=k),
                        f"sgrpo-P{cfg.sgrpo_p}": grid_outcomes(runs_dir, profile, task, ["sgrpo"], seeds[:1], ids,
                                                               key=k)["sgrpo"]} for k in ("correct", "truncated"))
        # the per-problem outcomes behind the sweep's intervals (the P runs' last evaluation; step: their steps)
        table_out = outcomes_table({steps: arms}, task + "-psweep", seeds[:1], ids, base_vec, {steps: cuts},
                                   outcomes(base["records"], ids, "truncated"))
        atomic_write_bytes(str(out / "ablation_p_sweep_outcomes.csv"), table_out.to_csv(index=False).encode())
        sweep = pd.DataFrame([dict(variant=v, P=float(v.removeprefix("sgrpo-P")),
                                   accuracy=pct(paired_bootstrap(a, n_boot=n_boot)),
                                   gain_vs_base=pct(paired_bootstrap(a, base_vec, n_boot=n_boot), True))
                              for v, a in arms.items()]).sort_values("P")

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    sns.barplot(shares, x="variant", y="share", ax=axes[0], errorbar=None)
    sns.stripplot(shares, x="variant", y="share", ax=axes[0], color="black")
    axes[0].set(title="Share of signal-group completion tokens in the loss (dots: seeds)", ylabel="share")
    plot_metric(df[df.step > 0], "kl", "KL(policy ‖ base), k3 on credited tokens", "KL drift from the base model",
                smooth=5, ax=axes[1])
    fig.suptitle(f"{label} · {task}")
    save_figure(fig, str(out / "ablation"))
    save_table(table.drop(columns="shares"), str(out / "ablation_token_share"))
    if p_values:
        save_table(sweep, str(out / "ablation_p_sweep"))
    write_json(out / "ablation_summary.json", dict(task=task, label=label, steps=steps, seeds=list(seeds),
                                                   share={r["variant"]: r["shares"] for r in rows},
                                                   verdicts={r["variant"]: r["verdict"] for r in rows},
                                                   sweep=sweep.to_dict("records")))

    examples = credited_tokens(task=task, profile=profile, num_groups=3, **common)
    fig2 = plot_credited(examples, title=f"Tokens T-SPMO credits (green +, red −) — "
                                         f"{scale_label(profile, cfg.model, 1)}")
    save_figure(fig2, str(out / "tspmo_credited_tokens"))
    return dict(df=df, table=table.drop(columns="shares"), sweep=sweep, figure=fig)
