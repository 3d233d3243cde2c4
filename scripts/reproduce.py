"""`make reproduce`: the default tier's five notebooks in lanes, their wall time, and one exit code.

Why lanes: notebooks 01 and 02 run grids with a process per core, so they go one after the other; 03 + 04 and 05
use one core each, so they run side by side (05's output goes to a log, shown when it ends). The summary gets the
whole call's wall time and runs only when every notebook succeeded. A failing lane does not stop the other: its
notebook is awaited (never orphaned) and the first failure's exit code is the call's. Ctrl-C or SIGTERM stops every
notebook still running and exits 130 / 143. This replaces a shell choreography no test could reach
(tests/test_reproduce.py drives it with stand-in commands).

    python scripts/reproduce.py --profile embedded          # what make reproduce runs
    python scripts/reproduce.py --dry-run                   # print the plan
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokeneff.config import PROFILES

ROOT = Path(__file__).resolve().parents[1]
# Stages run one after the other; the lanes of a stage side by side; a lane's notebooks in order.
STAGES = [
    [["01_svamp", "02_multiplication"]],
    [["03_ablation_full_vs_selective", "04_memory_and_speed"], ["05_trl"]],
]


@dataclass
class Step:
    name: str
    argv: list[str]


@dataclass
class Lane:
    """Runs its steps in order in a thread, stopping at the first failure; a lane other than a stage's first
    writes to `log` (two notebooks' progress bars interleaved on one terminal are unreadable)."""

    steps: list[Step]
    log: Path | None = None
    rc: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    stopped: bool = False

    def run(self) -> None:
        out = open(self.log, "w") if self.log else None
        try:
            for s in self.steps:
                if self.stopped:
                    return
                print(f"== {s.name}" + (f" (beside the others; its output in {self.log})" if self.log else ""),
                      flush=True)
                t = time.monotonic()
                # its own process group, so that stopping it reaches the kernel and the grid workers it starts
                self.proc = subprocess.Popen(s.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None,
                                             start_new_session=True)
                self.rc = self.proc.wait()
                self.seconds[s.name] = time.monotonic() - t
                if self.rc != 0:
                    print(f"== {s.name} failed (exit {self.rc})", flush=True)
                    return
        finally:
            if out:
                out.close()

    def stop(self) -> None:
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def run_stages(stages: list[list[Lane]], finish: Step | None = None) -> int:
    """Run every stage; then `finish` with the wall time appended (`--wall-seconds N`) if all succeeded."""
    start = time.monotonic()
    lanes_now: list[Lane] = []
    stop_rc = 0

    def on_signal(signum, _frame):
        nonlocal stop_rc
        stop_rc = 128 + signum
        for lane in lanes_now:
            lane.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for lanes in stages:
            lanes_now[:] = lanes
            threads = [threading.Thread(target=lane.run) for lane in lanes]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # join with a timeout: the main thread stays able to take a signal
                    t.join(0.2)
            for lane in lanes:
                if lane.log and lane.log.exists():
                    print(f"== output of {', '.join(s.name for s in lane.steps)} ({lane.log}):", flush=True)
                    print(lane.log.read_text(errors="replace"), flush=True)
            for lane in lanes:
                for name, sec in lane.seconds.items():
                    print(f"== {name}: {sec / 60:.1f} min", flush=True)
            if stop_rc:
                print(f"== stopped by signal {stop_rc - 128}; run make reproduce again to continue", flush=True)
                return stop_rc
            failed = [lane.rc for lane in lanes if lane.rc != 0]
            if failed:
                return failed[0]
        wall = round(time.monotonic() - start)
        print(f"== all notebooks done in {wall / 60:.1f} min", flush=True)
        if finish is not None:
            return subprocess.run(finish.argv + ["--wall-seconds", str(wall)], cwd=ROOT).returncode
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def plan(profile: str, venv: Path) -> tuple[list[list[Lane]], Step]:
    def notebook(nb: str) -> Step:
        return Step(f"{nb} ({profile})", [str(venv / "bin" / "papermill"), "--cwd", "notebooks", "-p", "profile",
                                          profile, f"notebooks/{nb}.ipynb", f"results/{profile}/notebooks/{nb}.ipynb"])

    stages = [[Lane([notebook(nb) for nb in lane], log=None if i == 0 else ROOT / "runs" / f"{profile}-{lane[0]}.log")
               for i, lane in enumerate(stage)] for stage in STAGES]
    summary = Step("summary", [str(venv / "bin" / "python"), "-m", "tokeneff.analysis.summary", "--name", profile])
    return stages, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="embedded", choices=PROFILES)
    p.add_argument("--venv", default=".venv", help="the virtual environment holding papermill (default .venv)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    a = p.parse_args(argv)
    venv = ROOT / a.venv
    if not a.dry_run and not (venv / "bin" / "papermill").exists():
        p.error(f"--venv {a.venv}: no papermill in it (run make setup)")
    stages, summary = plan(a.profile, venv)
    if a.dry_run:
        for i, stage in enumerate(stages, 1):
            for lane in stage:
                log = f"  > {lane.log}" if lane.log else ""
                print(f"stage {i}: " + " -> ".join(s.name for s in lane.steps) + log)
        print("then: " + " ".join(summary.argv) + " --wall-seconds N")
        return 0
    (ROOT / "results" / a.profile / "notebooks").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs").mkdir(exist_ok=True)
    return run_stages(stages, summary)


if __name__ == "__main__":
    sys.exit(main())
