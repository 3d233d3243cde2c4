"""`tokeneff bench`: each saving measured in turn, and the end-to-end comparison with TRL's GRPOTrainer."""

import json

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from tokeneff.benchmarks.bench import VARIANTS, _full_logits_logp, run_bench
from tokeneff.errors import TokeneffError
from tokeneff.loss import SelectiveLogProbs
from tokeneff.models import tiny_random
from tokeneff.rollout import left_pad


def test_full_logits_baseline_matches_selective_head():
    """The naive baseline the ladder starts from computes the same numbers as the path training uses."""
    model, tok = tiny_random(seed=3)
    ctx_ids, ctx_mask = left_pad([[5, 6, 7], [8, 9, 10, 11]], tok.pad_token_id)
    comp_ids = torch.randint(3, 90, (4, 6), generator=torch.Generator().manual_seed(0))
    batch = (ctx_ids, ctx_mask, comp_ids, torch.ones_like(comp_ids), torch.tensor([0, 0, 1, 1]),
             torch.tensor([0, 1, 3, 3]), torch.tensor([0, 5, 2, 0]))
    # the baseline takes no position_ids, so compare on rows whose context is not left-padded
    assert_close(_full_logits_logp(*batch, model=model)[2:], SelectiveLogProbs(model)(*batch)[2:],
                 rtol=1e-4, atol=1e-5)


def test_bench_ladder_writes_every_variant(tmp_path):
    rows = run_bench(completion_lens=(6,), group_sizes=(2,), vocab_size=300, prompt_len=5, out=str(tmp_path),
                     ladder=True, name="_t")
    assert sorted({(r["algo"], r["variant"]) for r in rows}) == sorted(
        (a, v) for a in ("grpo", "sgrpo", "tspmo") for v in VARIANTS)
    for r in rows:
        assert r["step_seconds"] > 0 and 0 < r["tokens_in_loss"] <= r["tokens_total"] == 12
    data = json.loads((tmp_path / "bench_cpu_tiny-random_t.json").read_text())
    assert data["suite"] == "t"
    roll = data["rollout"]
    assert roll["tokeneff_sample_tokens_per_s"] > 0 and roll["hf_generate_static_tokens_per_s"] > 0
    assert roll["static_sample_tokens_per_s"] > 0 and roll["sliced_sample_tokens_per_s"] > 0
    assert len(pd.read_csv(tmp_path / "bench_cpu_tiny-random_t.csv")) == len(rows)


def test_versus_trl_same_settings(tmp_path):
    pytest.importorskip("trl")
    from tokeneff.benchmarks.versus_trl import versus_trl

    # shape "tiny": random weights saved as a local checkpoint, as `--shape qwen2-1.5b` does on a GPU
    res = versus_trl(shape="tiny", group_size=2, max_new_tokens=6, steps=2, algos=("grpo", "tspmo"),
                     out=str(tmp_path), progress=False, trl_trainers=("tspmo",), gemm="torch")
    trl, *ours, trl_ours = res["rows"]
    assert trl["side"] == "trl-grpo" and [r["side"] for r in ours] == ["tokeneff-grpo", "tokeneff-tspmo"]
    assert res["gemm"] == "torch" and all(r["gemm"] == "torch" for r in ours)  # like for like: TRL's products
    assert trl_ours["side"] == "trl-tspmo"  # our TSPMOTrainer inside TRL
    for r in res["rows"]:
        assert len(r["step_seconds"]) == 2 and all(0 < n <= 6 for n in r["completion_len_mean"])
        assert r["time_ratio_to_trl"] == pytest.approx(r["warm_step_seconds"] / trl["warm_step_seconds"])
        # at this tiny size the peak can be the imports, shared with the weights-only process: >=, not >
        assert r["peak_memory_mb"] >= res["weights_memory_mb"] > 0
    assert (tmp_path / "vs_trl_cpu_tiny.json").is_file() and res["model"] == "tiny (random weights)"
    # random weights earn no reward: both sides get the synthetic one, so every group of ours carries signal
    assert res["reward"] == "synthetic" and res["complete"]
    for r in ours:
        assert all(n > 0 for n in r["tokens_in_loss"])
    assert len(trl_ours["step_seconds"]) == 2


def test_the_synthetic_task_rewards_every_other_completion_and_leaves_svamp_alone():
    from tokeneff.benchmarks.versus_trl import synthetic_reward, synthetic_task
    from tokeneff.config import make_config
    from tokeneff.tasks import make_task

    task = synthetic_task()
    assert task.reward(prompts=[None] * 4, completions=["a"] * 4, answer=[1.0] * 4) == [0.0, 1.0, 0.0, 1.0]
    assert make_task(make_config("embedded")).reward is not synthetic_reward
    assert synthetic_reward([None] * 3, ["x", "y", "z"]) == [0.0, 1.0, 0.0]


def _fail_on(n, result):
    calls = []

    def run(spec, *args):
        calls.append(spec)
        if len(calls) == n:
            raise TokeneffError("boom")
        return result(spec)
    return run


def test_bench_keeps_what_it_measured_when_a_configuration_fails(tmp_path, monkeypatch):
    import tokeneff.benchmarks.bench as bench

    row = lambda spec: dict(spec, device="CPU (2 cores)", peak_memory_mb=1.0, step_seconds=0.1, tokens_in_loss=1,
                            tokens_total=2, frac_tokens_in_loss=0.5)
    monkeypatch.setattr(bench, "_in_subprocess", _fail_on(3, row))
    with pytest.raises(TokeneffError, match="boom"):
        run_bench(completion_lens=(4,), out=str(tmp_path), rollout=False)
    data = json.loads((tmp_path / "bench_cpu_tiny-random.json").read_text())
    assert [r["algo"] for r in data["steps"]] == ["grpo", "sgrpo"] and data["complete"] is False
    # the rollout first, in two processes (the compiled static cache apart): a failure in the second keeps the first
    roll = lambda spec: row(spec) if "algo" in spec else dict(spec, device="GPU", **{f"{b}_tokens_per_s": 1.0
                                                                                    for b in spec["backends"]})
    monkeypatch.setattr(bench, "_in_subprocess", _fail_on(2, roll))
    with pytest.raises(TokeneffError, match="boom"):
        run_bench(completion_lens=(4,), out=str(tmp_path))
    data = json.loads((tmp_path / "bench_cpu_tiny-random.json").read_text())
    assert data["steps"] == [] and data["device"] == "GPU" and data["complete"] is False
    assert {k for k in data["rollout"] if k.endswith("_per_s")} == {"hf_generate_tokens_per_s",
                                                                   "tokeneff_sample_tokens_per_s",
                                                                   "sliced_sample_tokens_per_s",
                                                                   "static_sample_tokens_per_s"}
    monkeypatch.setattr(bench, "_in_subprocess", _fail_on(0, roll))
    run_bench(completion_lens=(4,), out=str(tmp_path))
    data = json.loads((tmp_path / "bench_cpu_tiny-random.json").read_text())
    assert len(data["steps"]) == 3 and data["complete"] is True and "backends" not in data["rollout"]
    assert data["rollout"]["hf_generate_static_tokens_per_s"] == 1.0


def test_versus_trl_keeps_the_sides_it_finished(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import tokeneff.benchmarks.versus_trl as vs

    side = lambda spec: dict(side=spec["side"] if spec["side"] != "tokeneff" else f"tokeneff-{spec['algo']}",
                             peak_memory_mb=10.0 if spec["side"] == "weights" else 20.0, step_seconds=[2.0, 1.0],
                             completion_len_mean=[4.0, 4.0])
    monkeypatch.setattr(vs, "_run_side", _fail_on(4, side))  # weights, TRL, grpo, then sgrpo fails
    with pytest.raises(TokeneffError, match="boom"):
        vs.versus_trl(model="tiny-random", steps=2, out=str(tmp_path), progress=False)
    data = json.loads((tmp_path / "vs_trl_cpu_tiny-random.json").read_text())
    assert [r["side"] for r in data["rows"]] == ["trl", "tokeneff-grpo"] and data["complete"] is False
    assert data["rows"][1]["memory_ratio_to_trl"] == 1.0 and data["reward"] == "task"


def test_one_memory_reader_for_training_and_benchmarks():
    import tokeneff.benchmarks.bench as bench
    import tokeneff.benchmarks.versus_trl as vs
    from tokeneff.utils import memory_mb

    assert bench.memory_mb is memory_mb and vs.memory_mb is memory_mb
    cpu = torch.device("cpu")
    now, peak = memory_mb(device=cpu), memory_mb(peak=True, device=cpu)
    # MiB of this process's resident set (torch loaded); ru_maxrss lags VmRSS by a page or so
    assert 10 < now < 1e6 and peak > now - 1


def test_decode_limit_puts_the_backends_side_by_side(tmp_path):
    from tokeneff.benchmarks.decode_limit import decode_limit

    rows = decode_limit("tiny-random", batches=(4,), context=8, out=str(tmp_path), backends=("tokeneff", "static"),
                        eval_limit=3)
    steps, evals = rows[:4], rows[4:]
    assert [(r["contexts"], r["batch"], r["backend"]) for r in steps] == [
        ("random", 4, "tokeneff"), ("random", 4, "static"), ("multiplication", 4, "tokeneff"),
        ("multiplication", 4, "static")]
    assert steps[0]["context"] == 8 and steps[2]["context"] > 8  # a prompt: instruction, worked example, problem
    assert all(r["floor_ms"] > 0 and r["fraction_of_limit"] == pytest.approx(r["floor_ms"] / r["step_ms"])
               for r in steps)
    assert [(r["backend"], r["task"], r["n"], r["flips_vs"]) for r in evals] == [
        ("tokeneff", "multiplication", 3, "tokeneff"), ("static", "multiplication", 3, "tokeneff")]
    assert evals[1]["flips"] == len(evals[1]["differ"]) == 0 and evals[1]["accuracy"] == evals[0]["accuracy"]
    assert json.loads((tmp_path / "decode_limit_cpu_tiny-random.json").read_text()) == rows
    with pytest.raises(TokeneffError, match="backend 'vllm': must be one of sliced, sliced"):
        decode_limit("tiny-random", backends=("vllm",))
    with pytest.raises(TokeneffError, match="contexts 'real': must be random or task"):
        decode_limit("tiny-random", contexts=("real",))
