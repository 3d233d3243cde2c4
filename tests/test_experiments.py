"""Experiment grids: parallel worker processes give the same runs as one process."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tokeneff.analysis.experiments import outcomes, run_dir, run_grid
from tokeneff.config import ConfigError

TINY = dict(model="tiny-random", max_new_tokens=8, group_size=4, prompts_per_step=4, eval_batch_size=4,
            digits_a=1, digits_b=1, eval_limit=4, lr=1e-2)
TIMING = ("step_seconds", "rollout_seconds", "peak_memory_mb", "eval_seconds")


def _runs(root, workers):
    variants = {"grpo": {"algo": "grpo"}, "tspmo": {"algo": "tspmo"}}
    return run_grid("mul", "multiplication", variants, [0, 1], 3, root=str(root), workers=workers, **TINY), variants


def test_parallel_grid_equals_sequential(tmp_path):
    seq, variants = _runs(tmp_path / "seq", workers=1)
    par, _ = _runs(tmp_path / "par", workers=0)  # one process per core (2 here), spawned
    cols = [c for c in seq.columns if c not in TIMING]
    assert seq[cols].equals(par[cols])
    assert seq.reward_mean.notna().all() and (seq.tokens_in_loss > 0).any()
    for v in variants:
        for s in (0, 1):
            a = load_file(run_dir(str(tmp_path / "seq"), "embedded", "mul", v, s) / "adapter/adapter_model.safetensors")
            b = load_file(run_dir(str(tmp_path / "par"), "embedded", "mul", v, s) / "adapter/adapter_model.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished grid is not run again: the runs resume as done
    again, _ = _runs(tmp_path / "seq", workers=1)
    assert again[cols].equals(seq[cols])


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_bad_workers_one_line(workers, tmp_path):
    with pytest.raises(ConfigError, match="workers="):
        run_grid("x", "multiplication", {"grpo": {}}, [0], 1, root=str(tmp_path), workers=workers, **TINY)


@pytest.mark.parametrize("seeds", ["[0, 1]", [0, "1"], [True]])
def test_bad_seeds_one_line(seeds, tmp_path):
    with pytest.raises(ConfigError, match="seeds=.*list of integers"):
        run_grid("x", "multiplication", {"grpo": {}}, seeds, 1, root=str(tmp_path), **TINY)


def test_outcomes_pair_by_problem_id():
    records = [dict(id="b", correct=True), dict(id="a", correct=False)]
    assert outcomes(records, ["a", "b"]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="lacks problem 'c'"):
        outcomes(records, ["a", "c"])
    json.dumps(records)
