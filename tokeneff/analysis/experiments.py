"""The notebooks' experiments: the accuracy experiment (notebooks 01, 02, 06) and the ablation (notebook 03), each
a grid of runs (grid.py) turned into intervals, verdicts (claims.py), figures and tables under results/; and the
parameters every notebook shares (its smoke scale for CI, the settings given to every run)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import check_name, make_config
from ..errors import ConfigError
from ..rundir import check_writable
from ..utils import atomic_write_bytes, environment, write_json
from ..warmstart import KEPT_ADAPTERS, is_warm_start_name, resolve
from .claims import (
    PAPER_BASE,
    TOKEN_SHARE,
    accuracy_curve,
    arm_intervals,
    claim_verdicts,
    final_table,
    outcomes,
    outcomes_table,
    share_verdict,
    token_share,
)
from .credits_view import credited_tokens, plot_credited
from .grid import base_accuracy, grid_outcomes, pick_variants, run_grid
from .report import pct, plot_accuracy, plot_gains, plot_metric, save_figure, save_table, scale_label
from .stats import DELTA, N_BOOT, Interval, paired_bootstrap

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
    out = dict(params.get("extra") or {})
    out.update({k: params[k] for k in ("eval_every", "eval_limit", "eval_split") if k in params})
    if params.get("model"):
        if is_warm_start_name(params["model"]):  # a committed adapter is merged rather than trained (an hour)
            resolve(params["model"], build=True, adapters=Path(params.get("results_dir", "../results")) / KEPT_ADAPTERS)
        out["model"] = params["model"]
    if params.get("max_completion_length"):
        out["max_new_tokens"] = params["max_completion_length"]
    return dict(out, **task_settings)


@dataclass
class AccuracyResult:
    """What notebooks 01, 02 and 06 show (the same numbers are in the files written under results/)."""

    df: pd.DataFrame  # every run's metrics.jsonl rows, with variant, seed and algo columns
    curve: pd.DataFrame  # accuracy per evaluated step with its interval (claims.accuracy_curve)
    table: pd.DataFrame  # <experiment>_final: accuracy, gains, truncation, token share per variant
    claims: pd.DataFrame  # each of the paper's claims with our interval and verdict
    summary: dict[str, Any]  # <experiment>_summary.json
    figure: Any  # the curves, gains and training-reward panels


@dataclass
class AblationResult:
    """What notebook 03 shows."""

    df: pd.DataFrame  # the reused accuracy runs' metrics
    table: pd.DataFrame  # token share per algorithm against the paper's range, with a verdict
    sweep: pd.DataFrame  # S-GRPO's P sweep against the base model (empty when not swept)
    figure: Any


def accuracy_experiment(task: str, variants: dict[str, dict[str, Any]], seeds: list[int], steps: int,
                        profile: str = "embedded", runs_dir: str = "runs", results_dir: str = "results",
                        experiment: str | None = None, workers: int = 0, n_boot: int = N_BOOT,
                        delta: float = DELTA, results_name: str = "", **common) -> AccuracyResult:
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
    return AccuracyResult(df=df, curve=curve, table=table, claims=claims_df, summary=summary, figure=fig)


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
             n_boot: int = N_BOOT, **common) -> AblationResult:
    """Notebook 03: token shares and KL drift of the accuracy experiment's runs (reused), S-GRPO's P sweep
    against the base model, and the tokens T-SPMO credits in real groups."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    cfg = make_config(profile, overrides=dict(common, task=task))
    out = Path(results_dir) / (results_name or profile)
    label = scale_label(profile, cfg.model, len(seeds))
    variants = pick_variants(list(TOKEN_SHARE), task)  # the paper's three algorithms, the runs of notebook 02
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
    # no random jitter: the same runs draw the same figure
    sns.stripplot(shares, x="variant", y="share", ax=axes[0], color="black", jitter=False)
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
    return AblationResult(df=df, table=table.drop(columns="shares"), sweep=sweep, figure=fig)
