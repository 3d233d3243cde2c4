"""Two CPU processes (torchrun, gloo) train data-parallel through accelerate: one metrics file, same adapter."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_train_data_parallel(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("ddp_worker.py")
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(worker), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # one file, one line per step (not one per rank)
    # summed over both ranks: more than one rank (2 prompts x G=4 x 4 tokens = 32) can produce
    assert all(32 < r["tokens_total"] <= 2 * 2 * 4 * 4 for r in rows[1:])
    final = json.loads((out / "final.json").read_text())
    a, b = final["rank_adapter_checksums"]
    assert a == pytest.approx(b, rel=1e-6) and a > 0
    assert sum(r["tokens_in_loss"] for r in rows[1:]) > 0
