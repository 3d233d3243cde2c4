"""SIGKILL at many instants (inside the checkpoint swap and its clean-up, mid metrics line, during start-up and
recovery, mid step), resume each time: the run must end exactly where an uninterrupted run ends.

Each attempt is a forked child of this (already imported) process, so a restart costs the run's own start-up,
not Python's imports. Kills come two ways: at a named phase of a checkpoint save (TOKENEFF_TEST_KILL_AT, see
rundir._faults.hook), and at random instants with every save phase widened by a pause (TOKENEFF_TEST_PAUSE).
"""

import json
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokeneff import make_config, train
from tokeneff.loop import TIMING_KEYS

PHASES = ("partial", "written", "manifest", "removing", "prev-removed", "moved", "swapped", "torn")


def _cfg(out, steps):
    # T-SPMO with replay on: the replay buffer and its RNG are part of what a resume must restore
    return make_config("embedded", overrides=dict(
        model="tiny-random", task="multiplication", digits_a=1, digits_b=1, algo="tspmo", replay="on",
        steps=steps, group_size=4, prompts_per_step=2, max_new_tokens=6, eval_limit=2, eval_batch_size=2,
        eval_every=3, save_every=1, lr=2e-2, beta=0.04, out=str(out)))


def _child(out, steps, env):
    os.environ.update(env)
    torch.cuda.is_available = lambda: False  # CPU, like the reference: a forked child must not touch CUDA
    try:
        train(_cfg(out, steps), resume=True, progress=False)
    except BaseException:  # noqa: BLE001 - report through the exit code only
        os._exit(3)
    os._exit(0)


def _comparable(run: Path):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run / "final.json").read_text())
    for e in final["evals"]:
        e.pop("seconds")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows], final, adapter


def _kill_loop(tmp_path, steps, n_phase, n_random, seed, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the children fork from this process
    rng = random.Random(seed)
    clean = tmp_path / "clean"
    train(_cfg(clean, steps), progress=False)
    ref_rows, ref_final, ref_adapter = _comparable(clean)

    run = tmp_path / "crash"
    ctx = mp.get_context("fork")
    plan = [("phase", p) for p in rng.sample(PHASES, n_phase)] + [("random", None)] * n_random
    rng.shuffle(plan)
    finished_early, progress = 0, []
    for how, phase in plan:
        if how == "phase":
            env = {"TOKENEFF_TEST_KILL_AT": f"{phase}:{rng.randint(1, 2)}"}
        else:
            env = {"TOKENEFF_TEST_PAUSE": "0.04"}
        proc = ctx.Process(target=_child, args=(run, steps, env))
        proc.start()
        if how == "random":
            proc.join(rng.uniform(0.05, 1.5))  # start-up (recovery included) takes about 1 s, a step 0.3 s
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        proc.join(120)
        if proc.exitcode == -signal.SIGKILL:
            ck = run / "checkpoint" / "state.json"
            progress.append(json.loads(ck.read_text())["step"] if ck.is_file() else None)
        elif proc.exitcode == 0:
            finished_early += 1
            (run / "final.json").unlink()  # finished: pretend the end was lost and keep killing
        else:
            pytest.fail(f"attempt with {env} failed with exit code {proc.exitcode}")
    proc = ctx.Process(target=_child, args=(run, steps, {}))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    rows, final, adapter = _comparable(run)
    assert rows == ref_rows
    assert final == ref_final
    assert adapter.keys() == ref_adapter.keys() and all(torch.equal(adapter[k], ref_adapter[k]) for k in adapter)
    print("checkpoint step after each kill:", progress, "finished early:", finished_early)
    # how far a random kill gets depends on the machine's speed: count only the kills that came before the end
    return sum(1 for s in progress if s is None or s < steps)


def test_kill_loop_thirty_kills(tmp_path, monkeypatch):
    """>= 20 SIGKILLs before the run's end (32 tried: every save phase plus 24 random instants, windows widened),
    resumed each time; about 60 s on a loaded 2-core CPU."""
    kills = _kill_loop(tmp_path, steps=80, n_phase=len(PHASES), n_random=24, seed=1, monkeypatch=monkeypatch)
    assert kills >= 20
