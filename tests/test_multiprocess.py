"""Two CPU processes (torchrun, gloo) train data-parallel through accelerate: one metrics file, same adapter;
killed and resumed, each rank continues from its own data position and RNG."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokeneff.loop import TIMING_KEYS

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(*args, env=None):
    return subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", str(WORKER), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None and not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_processes_train_data_parallel_and_resume_per_rank(tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # one file, one line per step (not one per rank)
    # summed over both ranks: more than one rank (2 prompts x G=4 x 4 tokens = 32) can produce
    assert all(32 < r["tokens_total"] <= 2 * 2 * 4 * 4 for r in rows[1:])
    final = json.loads((out / "final.json").read_text())
    a, b = final["rank_adapter_checksums"]
    assert a == pytest.approx(b, rel=1e-6) and a > 0
    assert sum(r["tokens_in_loss"] for r in rows[1:]) > 0

    # rank 0 is SIGKILLed right after its step-2 checkpoint; torchrun stops rank 1
    crash = tmp_path / "crash"
    proc = _torchrun(crash, env={"TOKENEFF_TEST_KILL_AT": "swapped:2"})
    assert proc.returncode != 0 and not (crash / "final.json").exists()
    ck = crash / "checkpoint"
    assert json.loads((ck / "manifest.json").read_text())["num_processes"] == 2
    ranks = [torch.load(ck / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["data_pos"] != ranks[1]["data_pos"]  # each rank's own position is kept
    proc = _torchrun(crash, "resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from step 2" in proc.stderr

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]

    assert strip(_rows(crash)) == strip(rows)
    assert json.loads((crash / "final.json").read_text())["rank_adapter_checksums"] == final["rank_adapter_checksums"]
