import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tokeneff.loop as train_mod
from tokeneff import TokeneffError, train
from tokeneff.loop import TIMING_KEYS
from tokeneff.tasks import Problem, Task


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


class FirstDigitTask(Task):
    """Toy task for the tiny model: reward 1 when the completion starts with a digit (about 1 in 10 at first)."""

    name = "first-digit"

    def problems(self, split):
        return [Problem(id=f"p{i}", question=f"Say a number {i}.", answer=0.0) for i in range(16)]

    @staticmethod
    def reward(prompts, completions, answer, **columns):
        return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


@pytest.fixture
def toy_task():
    return FirstDigitTask(num_shots=0)


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_tiny_run_writes_metrics_adapter_and_changes_lora(tiny_cfg, tmp_path, toy_task, algo):
    cfg = tiny_cfg(algo=algo, steps=3, lr=0.05, lora_dropout=0.0, group_size=8, prompts_per_step=4)
    final = train(cfg, progress=False, custom_task=toy_task)
    run = tmp_path / "run"
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "frac_groups_zero_std", "loss", "kl", "tokens_in_loss",
                "tokens_total", "completion_len_mean", "step_seconds", "peak_memory_mb"):
        assert key in rows[1]
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    assert json.loads((run / "config.json").read_text())["algo"] == algo
    assert final["steps_done"] == 3 and (run / "final.json").is_file()
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert sum(r["tokens_in_loss"] for r in rows[1:]) > 0, "the toy task should give some groups a signal"
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"


@pytest.mark.parametrize("algo, rollout", [("sgrpo", {}), ("tspmo", {}),  # the default rollout: sliced
                                           ("sgrpo", dict(rollout_backend="tokeneff")),
                                           ("sgrpo", dict(rollout_backend="static", rollout_merge_lora=True)),
                                           ("sgrpo", dict(rollout_dtype="bfloat16"))],
                         ids=["sgrpo", "tspmo", "sgrpo-tokeneff", "sgrpo-static-merged", "sgrpo-bf16"])
def test_training_raises_reward(tiny_cfg, toy_task, algo, rollout):
    cfg = tiny_cfg(algo=algo, steps=30, group_size=8, prompts_per_step=4, max_new_tokens=4, lr=0.03,
                   beta=0.0, lora_dropout=0.0, eval_limit=1, save_every=100, **rollout)
    train(cfg, progress=False, custom_task=toy_task)
    rewards = [r["reward_mean"] for r in _metrics(__import__("pathlib").Path(cfg.out))[1:]]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (first, last)


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
def test_checkpointed_training_raises_reward(tiny_cfg, toy_task, gemm, monkeypatch):
    """Activation checkpointing recomputes the forward inside backward: with train_gemm=onednn that recomputation
    must run through the same oneDNN layers as the forward (torch's checkpoint compares what each saved), and the
    run must learn. (At this lr the toy run collapses after ~24 updates with or without checkpointing: 15 here.)"""
    import tokeneff.kernels as kernels

    calls = []
    apply = kernels._FrozenLinear.apply
    monkeypatch.setattr(kernels._FrozenLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    cfg = tiny_cfg(algo="sgrpo", steps=15, group_size=8, prompts_per_step=4, max_new_tokens=4, lr=0.03, beta=0.0,
                   lora_dropout=0.0, eval_limit=1, save_every=100, gradient_checkpointing=True, train_gemm=gemm)
    train(cfg, progress=False, custom_task=toy_task)
    rewards = [r["reward_mean"] for r in _metrics(__import__("pathlib").Path(cfg.out))[1:]]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    assert bool(calls) == (gemm == "onednn")


def test_same_seed_same_metrics_and_resume_continues_identically(tiny_cfg, tmp_path, capsys):
    a = tiny_cfg(steps=4, out=str(tmp_path / "a"), save_every=2, eval_every=2)
    b = tiny_cfg(steps=4, out=str(tmp_path / "b"), save_every=2, eval_every=2)
    train(a, progress=False)
    train(b, progress=False)
    ref = _strip_timing(_metrics(tmp_path / "a"))
    assert ref == _strip_timing(_metrics(tmp_path / "b"))

    # stop after step 2 (a checkpoint) with a stray step-3 line, as a crash would leave it, then resume
    c = tiny_cfg(steps=2, out=str(tmp_path / "c"), save_every=2, eval_every=2)
    train(c, progress=False)
    with (tmp_path / "c" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 123}) + "\n")
        f.write(json.dumps({"step": 4, "reward_mean": 0.5})[:17])  # a torn last line (full disk, kill)
    (tmp_path / "c" / "final.json").unlink()
    capsys.readouterr()
    train(tiny_cfg(steps=4, out=str(tmp_path / "c"), save_every=2, eval_every=2), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "dropped a torn last line (line 5" in err and "resuming from step 2" in err
    assert _strip_timing(_metrics(tmp_path / "c")) == ref


def test_checkpoint_of_the_previous_format_still_resumes_identically(tiny_cfg, tmp_path):
    """Checkpoints written before LoopState also held numpy's RNG state in each rank file (nothing draws from it):
    such a checkpoint must resume, and end where an uninterrupted run ends."""
    import numpy as np

    from tokeneff import rundir

    train(tiny_cfg(steps=4, out=str(tmp_path / "a"), save_every=2, eval_every=2, algo="tspmo"), progress=False)
    train(tiny_cfg(steps=2, out=str(tmp_path / "c"), save_every=2, eval_every=2, algo="tspmo"), progress=False)
    ck = tmp_path / "c" / "checkpoint"
    rank = torch.load(ck / "rank0.pt", weights_only=True)
    s = np.random.get_state()
    torch.save({**rank, "numpy_rng": [s[0], s[1].tolist(), *s[2:]]}, ck / "rank0.pt")
    man = json.loads((ck / "manifest.json").read_text())
    (ck / "manifest.json").unlink()
    rundir.write_manifest(ck, {k: v for k, v in man.items() if k != "files"})
    (tmp_path / "c" / "final.json").unlink()
    train(tiny_cfg(steps=4, out=str(tmp_path / "c"), save_every=2, eval_every=2, algo="tspmo"), resume=True,
          progress=False)
    assert _strip_timing(_metrics(tmp_path / "c")) == _strip_timing(_metrics(tmp_path / "a"))


def test_resume_without_checkpoint_says_so_and_never_duplicates_rows(tiny_cfg, capsys):
    cfg = tiny_cfg(steps=2)
    train(cfg, progress=False)
    run = __import__("pathlib").Path(cfg.out)
    ref = _strip_timing(_metrics(run))
    import shutil

    shutil.rmtree(run / "checkpoint")
    shutil.rmtree(run / "checkpoint.prev")
    (run / "final.json").unlink()
    capsys.readouterr()
    train(cfg, resume=True, progress=False)
    assert "no checkpoint in" in capsys.readouterr().err
    assert _strip_timing(_metrics(run)) == ref  # steps 0, 1, 2 once each


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tiny_cfg, capsys):
    cfg = tiny_cfg(steps=3)
    train(cfg, progress=False)
    run = __import__("pathlib").Path(cfg.out)
    ref = _strip_timing(_metrics(run))
    (run / "checkpoint" / "optimizer.pt").write_bytes(b"garbage")  # bit rot, a bad disk
    (run / "final.json").unlink()
    capsys.readouterr()
    train(cfg, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "incomplete or corrupt (optimizer.pt has 7 bytes" in err and "using checkpoint.prev/ (step 2)" in err
    assert "resuming from step 2" in err
    assert _strip_timing(_metrics(run)) == ref


def test_refuses_to_mix_runs(tiny_cfg):
    cfg = tiny_cfg(steps=1)
    train(cfg, progress=False)
    with pytest.raises(TokeneffError, match="already holds a run"):
        train(cfg, progress=False)
    with pytest.raises(TokeneffError, match="holds a different run: algo='sgrpo' there, 'grpo' now"):
        train(tiny_cfg(steps=1, algo="grpo"), resume=True, progress=False)
    with pytest.raises(TokeneffError, match="holds a different run: lr=0.01 there, 0.02 now"):
        train(tiny_cfg(steps=2, lr=0.02), resume=True, progress=False)
    # keys that do not change the trajectory may change on resume
    final = train(tiny_cfg(steps=2, eval_limit=2, eval_batch_size=2, save_every=3, threads=1), resume=True,
                  progress=False)
    assert final["steps_done"] == 2
    train(tiny_cfg(steps=1, algo="grpo"), overwrite=True, progress=False)


def test_concurrent_resume_is_refused_naming_the_holder(tmp_path, capsys):
    from tokeneff.cli import main

    args = ["train", "--model", "tiny-random", "--task", "multiplication", "--steps", "500", "--out",
            str(tmp_path / "r"), "digits_a=1", "digits_b=1", "group_size=4", "prompts_per_step=2", "max_new_tokens=8",
            "eval_limit=4", "save_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "tokeneff.cli"] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "r" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.1)
        assert main(args + ["--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by process {proc.pid}" in err and len(err.splitlines()) == 1
    finally:
        proc.kill()
        proc.wait()
    steps = [r["step"] for r in _metrics(tmp_path / "r")]
    assert len(steps) == len(set(steps))


def test_sigkill_then_resume_matches_uninterrupted(tiny_cfg, tmp_path):
    """A real crash: the CLI is SIGKILLed after its step-3 checkpoint; --resume must end where a clean run ends."""
    args = ["--model", "tiny-random", "--task", "multiplication", "--algo", "sgrpo", "--steps", "6", "digits_a=1",
            "digits_b=1", "group_size=4", "prompts_per_step=2", "eval_limit=4",
            "eval_batch_size=4", "save_every=3", "lr=0.01", "max_new_tokens=24"]
    cmd = [sys.executable, "-m", "tokeneff.cli", "train"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(cmd + args + ["--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True)
    crash = tmp_path / "crash"
    proc = subprocess.Popen(cmd + args + ["--out", str(crash)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = crash / "checkpoint" / "state.json"
        if ck.is_file() and json.loads(ck.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crash / "final.json").exists(), "the run finished before it could be killed"
    subprocess.run(cmd + args + ["--out", str(crash), "--resume"], check=True, env=env, capture_output=True)
    assert _strip_timing(_metrics(crash)) == _strip_timing(_metrics(tmp_path / "clean"))


def test_nonfinite_loss_is_skipped_then_stops(tiny_cfg, monkeypatch):
    real = train_mod.policy_loss
    monkeypatch.setattr(train_mod, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"),
                                                                  torch.tensor(0.0)))
    with pytest.raises(TokeneffError, match="non-finite losses in a row"):
        train(tiny_cfg(steps=10, max_bad_steps=2), progress=False)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_finishes_the_step_checkpoints_it_and_resumes_bit_for_bit(tmp_path, sig):
    """One Ctrl-C (or SIGTERM, SIGHUP): the step in progress completes, is checkpointed (not only the last periodic
    save) and the process exits 128 + the signal (130, 143, 129) saying how to resume; the resumed run then ends
    exactly where an uninterrupted one does."""
    args = ["--model", "tiny-random", "--task", "multiplication", "--algo", "tspmo", "--steps", "40",
            "digits_a=1", "digits_b=1", "group_size=4", "prompts_per_step=2", "max_new_tokens=8", "eval_limit=4",
            "eval_every=5", "save_every=1000", "lr=0.01", "replay=on"]
    cmd = [sys.executable, "-m", "tokeneff.cli", "train"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the child gets the default disposition: under nohup (pytest started so) SIGHUP is inherited ignored, and the run
    # rightly keeps it ignored (install_sigterm_handler)
    proc = subprocess.Popen(cmd + args + ["--out", str(tmp_path / "r")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert "--resume" in out and "Traceback" not in err
    rows = _metrics(tmp_path / "r")
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert 3 <= state["step"] == rows[-1]["step"] < 40  # the step it stopped at, with its metrics row
    subprocess.run(cmd + args + ["--out", str(tmp_path / "r"), "--resume"], check=True, env=env, capture_output=True)
    subprocess.run(cmd + args + ["--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True)
    assert _strip_timing(_metrics(tmp_path / "r")) == _strip_timing(_metrics(tmp_path / "clean"))
    adapter = "adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "r" / adapter), load_file(tmp_path / "clean" / adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_group_sampler_prefix_reaches_the_rollout_and_the_reward(tiny_cfg, monkeypatch):
    """T-SPMO replay through the loop: a picked (problem, prefix) is sampled as prompt + prefix, and the reward
    sees prefix + completion (dropping the prefix anywhere in the loop fails here)."""
    from tokeneff.models import char_tokenizer

    picks, contexts, texts = [], [], []
    real_sampler, real_sample = train_mod.group_sampler, train_mod.sample

    def recording_sampler(cfg):
        s = real_sampler(cfg)
        pick = s.pick
        s.pick = lambda: picks.append(pick()) or picks[-1]
        return s

    class Recording(FirstDigitTask):
        def reward(self, prompts, completions, answer, **columns):
            texts.append(list(completions))
            return FirstDigitTask.reward(prompts, completions, answer)

    monkeypatch.setattr(train_mod, "group_sampler", recording_sampler)
    monkeypatch.setattr(train_mod, "sample", lambda m, t, ctxs, *a, **k: contexts.append(ctxs) or real_sample(
        m, t, ctxs, *a, **k))
    cfg = tiny_cfg(algo="tspmo", replay="on", replay_fraction=1.0, steps=4, group_size=8, max_new_tokens=6,
                   save_every=100)
    train(cfg, progress=False, custom_task=Recording(num_shots=0))
    tok, n, G = char_tokenizer(), cfg.prompts_per_step, cfg.group_size
    assert len(picks) == len(contexts) * n == len(texts) * n == 4 * n
    replayed = 0
    for k, pick in enumerate(picks):
        step, j = divmod(k, n)
        if pick is None or not pick[1]:
            continue
        replayed += 1
        prefix = pick[1]
        assert contexts[step][j][-len(prefix):] == prefix
        assert all(t.startswith(tok.decode(prefix)) for t in texts[step][j * G:(j + 1) * G])
    assert replayed > 0, "no group was replayed from a non-empty prefix: the check above checked nothing"
