"""Experiment grids: (variant x seed) runs that resume, skip what is done, and run in parallel.

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

from ..config import EVAL_KEYS, MAX_SEED, TrainConfig, check_name, make_config
from ..errors import ConfigError, show
from ..evaluate import evaluate
from ..loop import train
from .claims import outcomes

# Each task's variants, picked by name in notebooks 01, 02 and 06. T-SPMO's replay is on for multiplication (long
# answers, the paper's use) and off for SVAMP; the other setting is an ablation of T-SPMO's resampling (the full tier
# runs tspmo-noreplay on multiplication).
VARIANTS = {
    "multiplication": {"grpo": {"algo": "grpo"}, "sgrpo": {"algo": "sgrpo"}, "tspmo": {"algo": "tspmo", "replay": "on"},
                       "tspmo-noreplay": {"algo": "tspmo", "replay": "off"}},
    "svamp": {"grpo": {"algo": "grpo"}, "sgrpo": {"algo": "sgrpo"}, "tspmo": {"algo": "tspmo"},  # replay auto: off
              "tspmo-replay": {"algo": "tspmo", "replay": "on"}},
}


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def pick_variants(names: list[str], task: str = "multiplication") -> dict[str, dict[str, Any]]:
    """The task's VARIANTS by name, in the order given; a clear error for anything else."""
    if task not in VARIANTS:
        raise ConfigError(f"task={show(task)}: no variants defined; choose from {list(VARIANTS)}")
    table = VARIANTS[task]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"variants={show(names)}: must be a non-empty list of names, e.g. [grpo, tspmo] "
                          "(papermill: -y 'variants: [grpo, tspmo]')")
    bad = [n for n in names if n not in table]
    if bad or len(set(names)) != len(names):
        what = f"unknown {show(bad)}" if bad else "a name repeated"
        raise ConfigError(f"variants={show(list(names))}: {what}; choose from {list(table)} ({task})")
    return {n: table[n] for n in names}


def run_dir(root: str, profile: str, experiment: str, variant: str, seed: int) -> Path:
    return Path(root) / profile / experiment / f"{variant}-s{seed}"


def eval_digest(cfg: TrainConfig) -> str:
    """The base evaluation's cache key: everything that changes the problems, the prompts or the greedy completions.
    rollout_gemm, rollout_attention and rollout_step (2026-12) are left out at their default, auto, so that the
    evaluations cached before they existed (made with the products, attention and step auto still gives their
    backends, tokeneff and static) keep their names."""
    later = ("rollout_gemm", "rollout_attention", "rollout_step")
    key = {k: v for k, v in cfg.to_dict().items() if k in EVAL_KEYS and not (k in later and v == "auto")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def base_accuracy(task: str, profile: str = "embedded", root: str = "runs", **overrides) -> dict[str, Any]:
    """Greedy accuracy of the model without adapters on the eval set (every problem's outcome kept); cached."""
    cfg = make_config(profile, overrides=dict(task=task, **overrides))
    digest = eval_digest(cfg)
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
    grid, the base model would hold one core while the others sat idle.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"workers={show(workers)}: must be 0 (one per core) or a positive integer")
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"seeds={show(seeds)}: must be a list of integers, e.g. [0, 1] "
                          "(papermill: -y 'seeds: [0, 1]'; -p passes a string)")
    out_of_range = [x for x in seeds if not 0 <= x <= MAX_SEED]
    if out_of_range:
        raise ConfigError(f"seeds: seed {show(out_of_range[0])} must be between 0 and {MAX_SEED}")
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
