"""Experiment grids: parallel worker processes give the same runs as one process."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tokeneff.analysis.claims import arms_from_table, outcomes, outcomes_table
from tokeneff.analysis.experiments import ablation
from tokeneff.analysis.grid import grid_outcomes, pick_variants, run_dir, run_grid
from tokeneff.errors import ConfigError

TINY = dict(model="tiny-random", max_new_tokens=8, group_size=4, prompts_per_step=4, eval_batch_size=4,
            digits_a=1, digits_b=1, eval_limit=4, lr=1e-2)
TIMING = ("step_seconds", "rollout_seconds", "peak_memory_mb")


def _runs(root, workers):
    variants = {"grpo": {"algo": "grpo"}, "tspmo": {"algo": "tspmo"}}
    base = (dict(task="multiplication", profile="embedded", root=str(root), **TINY),)  # evaluated beside the runs
    return run_grid("mul", "multiplication", variants, [0, 1], 3, root=str(root), workers=workers, base_evals=base,
                    **TINY), variants


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
    # the base model's evaluation ran in the pool and gave the same outcomes as in one process
    (fs,), (fp,) = (list((tmp_path / d / "embedded").glob("base_multiplication_*.json")) for d in ("seq", "par"))
    assert json.loads(fs.read_text())["records"] == json.loads(fp.read_text())["records"]
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


def test_pick_variants_keeps_the_order_given_and_names_a_bad_value():
    assert list(pick_variants(["tspmo-noreplay", "grpo"])) == ["tspmo-noreplay", "grpo"]
    assert pick_variants(["tspmo-noreplay"])["tspmo-noreplay"] == {"algo": "tspmo", "replay": "off"}
    with pytest.raises(ConfigError, match=r"unknown \['tspmo_noreplay'\]"):
        pick_variants(["grpo", "tspmo_noreplay"])
    for bad in ("grpo", [], ["grpo", "grpo"], [1]):
        with pytest.raises(ConfigError, match="variants="):
            pick_variants(bad)
    # T-SPMO's replay: on for multiplication, as the task's default (auto: off) for SVAMP, whose runs hold that config
    assert pick_variants(["tspmo"])["tspmo"]["replay"] == "on"
    assert pick_variants(["tspmo", "tspmo-replay"], "svamp") == {"tspmo": {"algo": "tspmo"},
                                                                  "tspmo-replay": {"algo": "tspmo", "replay": "on"}}
    with pytest.raises(ConfigError, match=r"unknown \['tspmo-noreplay'\]; choose from .* \(svamp\)"):
        pick_variants(["tspmo-noreplay"], "svamp")


def test_outcomes_pair_by_problem_id():
    records = [dict(id="b", correct=True), dict(id="a", correct=False)]
    assert outcomes(records, ["a", "b"]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="lacks problem 'c'"):
        outcomes(records, ["a", "c"])
    json.dumps(records)


def test_ablation_without_p_sweep_trains_no_sweep_runs(tmp_path):
    out = tmp_path / "results"
    res = ablation("multiplication", [0], 2, [], runs_dir=str(tmp_path), results_dir=str(out), workers=1, **TINY)
    assert res.sweep.empty and not (tmp_path / "embedded" / "multiplication-psweep").exists()
    assert not (out / "embedded" / "ablation_p_sweep.csv").exists()
    assert (out / "embedded" / "ablation_token_share.csv").is_file()
    summary = json.loads((out / "embedded" / "ablation_summary.json").read_text())
    assert summary["sweep"] == [] and set(summary["share"]) == {"grpo", "sgrpo", "tspmo"}


def test_outcomes_table_holds_every_evaluation_paired_by_problem(tmp_path):
    ids = ["p0", "p1", "p2"]
    for variant, seed, step, correct in [("grpo", 0, 5, [1, 0, 0]), ("grpo", 1, 5, [0, 0, 1]),
                                         ("grpo", 0, 9, [1, 1, 0]), ("grpo", 1, 9, [1, 1, 1])]:
        d = run_dir(str(tmp_path), "embedded", "mul", variant, seed)
        d.mkdir(parents=True, exist_ok=True)
        records = [dict(id=i, correct=bool(c)) for i, c in reversed(list(zip(ids, correct)))]  # stored out of order
        (d / f"eval_step{step}.json").write_text(json.dumps(dict(records=records)))
    by_step = {step: grid_outcomes(str(tmp_path), "embedded", "mul", ["grpo"], [0, 1], ids, step) for step in (5, 9)}
    t = outcomes_table(by_step, "mul", [0, 1], ids, np.array([0.0, 1.0, 0.0]))
    assert list(t.columns) == ["experiment", "variant", "seed", "step", "id", "correct"]
    assert t[t.variant == "base"].correct.tolist() == [0, 1, 0]
    got = t[t.variant == "grpo"].groupby(["seed", "step"]).correct.apply(list).to_dict()
    assert got == {(0, 5): [1, 0, 0], (0, 9): [1, 1, 0], (1, 5): [0, 0, 1], (1, 9): [1, 1, 1]}


def test_outcomes_table_keeps_truncation_and_reads_back_at_the_last_step(tmp_path):
    ids = ["p0", "p1", "p2"]
    for seed, step, correct, cut in [(0, 5, [1, 0, 0], [0, 1, 1]), (1, 5, [0, 0, 1], [1, 1, 0]),
                                     (0, 9, [1, 1, 0], [0, 0, 1]), (1, 9, [1, 1, 1], [0, 0, 0])]:
        d = run_dir(str(tmp_path), "embedded", "mul", "grpo", seed)
        d.mkdir(parents=True, exist_ok=True)
        records = [dict(id=i, correct=bool(c), truncated=bool(t)) for i, c, t in reversed(list(zip(ids, correct, cut)))]
        (d / f"eval_step{step}.json").write_text(json.dumps(dict(records=records)))

    def at(step, key):
        return grid_outcomes(str(tmp_path), "embedded", "mul", ["grpo"], [0, 1], ids, step, key)

    t = outcomes_table({s: at(s, "correct") for s in (5, 9)}, "mul", [0, 1], ids, np.array([0.0, 1.0, 0.0]),
                       {s: at(s, "truncated") for s in (5, 9)}, np.array([1.0, 1.0, 0.0]))
    assert list(t.columns)[-1] == "truncated"
    assert t[(t.seed == 1) & (t.step == 5)].truncated.tolist() == [1, 1, 0]
    # read back from the CSV, as the summary's rebuild does: the last step, rows in the base model's id order
    back = pd.read_csv(io.StringIO(t.sample(frac=1, random_state=0).sort_values("variant").to_csv(index=False)))
    got_ids, base, arms = arms_from_table(back, ["grpo"], [0, 1])
    base_order = back[back.variant == "base"].id.tolist()
    assert got_ids == base_order
    expect = {"p0": [1, 1], "p1": [1, 1], "p2": [0, 1]}
    assert arms["grpo"].T.tolist() == [expect[i] for i in base_order]
    _, base_cut, cut = arms_from_table(back, ["grpo"], [0, 1], "truncated")
    assert cut["grpo"].mean() == 1 / 6 and base_cut.mean() == 2 / 3
    assert arms_from_table(back.drop(columns="truncated"), ["grpo"], [0, 1], "truncated") is None


def test_accuracy_experiment_writes_what_the_summary_rebuilds(tmp_path):
    # the notebooks' summary and the one rebuilt from its outcomes file alone are the same file, truncation and
    # the environment that decided the numbers included
    from tokeneff.analysis.experiments import accuracy_experiment
    from tokeneff.analysis.summary import rebuild

    res = accuracy_experiment("multiplication", pick_variants(["grpo", "tspmo"]), [0, 1], 2, runs_dir=str(tmp_path),
                              results_dir=str(tmp_path / "results"), workers=1, n_boot=500, eval_every=1, **TINY)
    out = tmp_path / "results" / "embedded"
    table = pd.read_csv(out / "multiplication_outcomes.csv")
    assert set(table.truncated) <= {0, 1} and len(table) == 4 + 2 * 2 * 2 * 4  # base + variants x seeds x steps
    written = (out / "multiplication_summary.json").read_text()
    s = json.loads(written)
    assert s["base"]["truncated"] == table[table.variant == "base"].truncated.mean()
    assert s["arms"]["tspmo"]["truncated"] == table[(table.variant == "tspmo") & (table.step == 2)].truncated.mean()
    env = json.loads((out / "multiplication_environment.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["threads"] == 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    final = (out / "multiplication_final.csv").read_text()
    assert "truncated" in final.splitlines()[0]
    assert res.figure.axes[1].get_xlabel().startswith("gain over the base model")
    assert rebuild(out, figures=False) == ["multiplication"]
    assert (out / "multiplication_summary.json").read_text() == written
    assert (out / "multiplication_final.csv").read_text() == final


def test_p_sweep_writes_its_per_problem_outcomes(tmp_path):
    out = tmp_path / "results" / "embedded"
    res = ablation("multiplication", [0], 2, [1.0], runs_dir=str(tmp_path), results_dir=str(tmp_path / "results"),
                   workers=1, **TINY)
    t = pd.read_csv(out / "ablation_p_sweep_outcomes.csv")
    assert set(t.variant) == {"base", "sgrpo-P1.0", "sgrpo-P0.5"} and set(t.step) == {0, 2}
    assert len(t) == 3 * TINY["eval_limit"] and set(t.truncated) <= {0, 1}
    # the sweep table's accuracies are these outcomes' means
    for v, acc in zip(res.sweep.variant, res.sweep.accuracy, strict=True):
        assert acc.startswith(f"{100 * t[t.variant == v].correct.mean():.1f}%")


def test_every_notebook_parameters_cell_parses_without_a_papermill_warning(caplog):
    """papermill reads each line of the `parameters` cell (for `papermill --help-notebook` and type hints); a line it
    cannot parse prints a warning on every run."""
    from papermill.translators import PythonTranslator

    for nb_path in sorted(Path(__file__).resolve().parents[1].glob("notebooks/*.ipynb")):
        cells = [c for c in json.loads(nb_path.read_text())["cells"]
                 if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(cells) == 1, nb_path.name
        source = "".join(cells[0]["source"])
        caplog.clear()
        params = PythonTranslator.inspect({"source": source})
        assigned = [ln.split("=")[0].strip() for ln in source.splitlines() if ln and not ln[0].isspace()
                    and "=" in ln.split("#")[0]]
        assert not caplog.records and [p.name for p in params] == assigned, (nb_path.name, caplog.text)


def test_the_ablation_refuses_seeds_or_steps_other_than_the_runs_it_reuses(tmp_path):
    from tokeneff.analysis.experiments import ablation

    out = tmp_path / "results" / "embedded"
    out.mkdir(parents=True)
    (out / "multiplication_summary.json").write_text(json.dumps({"seeds": [0, 1], "steps": 30}))
    for seeds, steps in (([0, 1], 40), ([0, 1, 2], 30), ([1, 0], 30)):
        with pytest.raises(ConfigError, match=r"notebook 02 ran seeds=\[0, 1\], steps=30"):
            ablation("multiplication", seeds, steps, [], runs_dir=str(tmp_path / "runs"),
                     results_dir=str(tmp_path / "results"), model="tiny-random")
    assert not (tmp_path / "runs").exists()  # refused before any run


def test_shared_settings_take_only_the_notebooks_own_parameters_and_build_a_named_warm_start(monkeypatch):
    """What every run of a notebook shares, from its parameters cell: `extra` first, then the evaluation settings it
    has, the model when set (a warm-start name is built first, once), the token budget when set; task settings last."""
    import tokeneff.analysis.experiments as ex
    from tokeneff.analysis.experiments import shared_settings

    built = []
    monkeypatch.setattr(ex, "resolve", lambda name, build=False, adapters=None: built.append((name, build, adapters)))
    nb02 = dict(extra={"lr": 1e-4, "eval_limit": 7}, eval_every=10, eval_limit=0, model="", seeds=[0], steps=3)
    assert shared_settings(nb02) == {"lr": 1e-4, "eval_every": 10, "eval_limit": 0}
    assert built == []
    nb01 = dict(extra={}, eval_every=20, eval_limit=0, eval_split="val", model="smollm2-135m+sftepoch",
                max_completion_length=64, results_dir="../results")
    assert shared_settings(nb01, num_shots=0) == dict(eval_every=20, eval_limit=0, eval_split="val",
                                                     model="smollm2-135m+sftepoch", max_new_tokens=64, num_shots=0)
    kept = Path("../results/embedded-full/warmstarts")  # a committed adapter is merged, not trained again
    assert built == [("smollm2-135m+sftepoch", True, kept)]
    assert "max_new_tokens" not in shared_settings(dict(extra={}, model="smollm2-135m", max_completion_length=0))
    assert built == [("smollm2-135m+sftepoch", True, kept)]  # a plain model name is not a warm start: nothing built


def test_committed_base_evaluations_keep_their_cache_names():
    """Config fields added later (rollout_gemm, rollout_attention, rollout_step) must not rename the base evaluations
    a committed grid cached: the SVAMP grid from +sftepochmlp (sampled with static) finds its committed file, and
    another product, attention or step is another key."""
    from pathlib import Path

    from tokeneff.analysis.grid import eval_digest
    from tokeneff.config import make_config

    over = dict(task="svamp", model="smollm2-135m+sftepochmlp", rollout_backend="static", max_new_tokens=64,
                eval_limit=0)
    digest = eval_digest(make_config("embedded", overrides=over))
    runs = Path(__file__).resolve().parents[1] / "results/embedded-full/runs/svamp-sftepochmlp/embedded"
    assert (runs / f"base_svamp_smollm2-135m+sftepochmlp_n0_{digest}.json").is_file()
    assert eval_digest(make_config("embedded", overrides=dict(over, rollout_gemm="onednn"))) != digest
    sliced = dict(over, rollout_backend="sliced")
    for later in (dict(rollout_attention="sdpa"), dict(rollout_step="transformers")):
        assert eval_digest(make_config("embedded", overrides=dict(sliced, **later))) != eval_digest(
            make_config("embedded", overrides=sliced))
