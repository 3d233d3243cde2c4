"""Experiment grids for the notebooks: (variant x seed) runs that resume and skip what is done.

Plumbing, not algorithm: each run is an ordinary `train(...)` into runs/<profile>/<experiment>/<variant>-s<seed>.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .config import make_config
from .evaluate import evaluate
from .train import train

# The paper's reported numbers (PAPER.md), shown beside ours and never mixed with them.
PAPER = {
    "svamp_base": 0.46, "svamp_sgrpo": ">0.70", "svamp_tspmo": ">0.70", "svamp_grpo": "no gain over base",
    "multiplication_tspmo": "strong gain", "multiplication_grpo": "no gain over base",
    "tokens_grpo": 1.0, "tokens_sgrpo": "0.30-0.50", "tokens_tspmo": "<0.05",
}


def run_dir(root: str, profile: str, experiment: str, variant: str, seed: int) -> Path:
    return Path(root) / profile / experiment / f"{variant}-s{seed}"


def base_accuracy(task: str, profile: str = "embedded", root: str = "runs", **overrides) -> dict[str, Any]:
    """Greedy accuracy of the model without adapters on the eval set; computed once and cached."""
    cfg = make_config(profile, overrides=dict(task=task, **overrides))
    path = Path(root) / profile / f"base_{task}_{cfg.model.replace('/', '_')}_n{cfg.eval_limit}.json"
    if path.is_file():
        return json.loads(path.read_text())
    res = evaluate(task=task, model=cfg.model, limit=cfg.eval_limit, profile=profile, out=str(path),
                   **{k: v for k, v in overrides.items() if k not in ("model",)})
    return res


def run_grid(experiment: str, task: str, variants: dict[str, dict[str, Any]], seeds: list[int], steps: int,
             profile: str = "embedded", root: str = "runs", **common) -> pd.DataFrame:
    """Train every variant with every seed (resuming unfinished runs); return all metrics as one table."""
    frames = []
    for variant, over in variants.items():
        for seed in seeds:
            out = run_dir(root, profile, experiment, variant, seed)
            cfg = make_config(profile, overrides=dict(common, task=task, steps=steps, seed=seed, out=str(out),
                                                      eval_at_start=False, **over))
            train(cfg, resume=True)
            df = pd.read_json(out / "metrics.jsonl", lines=True)
            df["variant"], df["seed"], df["algo"] = variant, seed, cfg.algo
            frames.append(df)
    return pd.concat(frames, ignore_index=True)
