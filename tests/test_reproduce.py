"""make reproduce's orchestration (scripts/reproduce.py), driven with stand-in commands: lanes side by side, the
first failure's exit code, no lane left running, the summary only after success with the wall time, a signal that
stops every notebook."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = sys.modules["reproduce"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(reproduce)
Lane, Step, run_stages = reproduce.Lane, reproduce.Step, reproduce.run_stages


def py(name: str, code: str) -> Step:
    return Step(name, [sys.executable, "-c", textwrap.dedent(code)])


def touch(path: Path, wait_for: Path | None = None, rc: int = 0) -> Step:
    """Writes `path`; first waits (at most 60 s) for `wait_for`, which only a step of another lane writes."""
    return py(path.name, f"""
        import pathlib, sys, time
        w = {str(wait_for)!r} if {wait_for is not None} else None
        t = time.time()
        while w and not pathlib.Path(w).exists():
            if time.time() - t > 60: sys.exit(9)
            time.sleep(0.05)
        pathlib.Path({str(path)!r}).write_text("x")
        sys.exit({rc})""")


def record_args(path: Path) -> Step:
    return py("summary", f"import pathlib, sys; pathlib.Path({str(path)!r}).write_text(' '.join(sys.argv[1:]))")


def test_lanes_of_a_stage_run_side_by_side_and_the_summary_gets_the_wall_time(tmp_path):
    a1, b1, a2, c = (tmp_path / n for n in ("a1", "b1", "a2", "c"))
    stages = [
        # lane A's step waits for lane B's file: it finishes only if the lanes run at the same time
        [Lane([touch(a1, wait_for=b1), touch(a2)]), Lane([touch(b1)], log=tmp_path / "b.log")],
        [Lane([touch(c, wait_for=a2)])],  # a later stage starts after the earlier one
    ]
    rc = run_stages(stages, record_args(tmp_path / "args"))
    assert rc == 0 and all(p.exists() for p in (a1, b1, a2, c))
    args = (tmp_path / "args").read_text().split()
    assert args[0] == "--wall-seconds" and int(args[1]) >= 0


def test_a_failing_lane_waits_for_its_neighbour_and_stops_the_call_with_its_exit_code(tmp_path):
    late = tmp_path / "late"
    neighbour = py("neighbour", f"import pathlib, time; time.sleep(1); pathlib.Path({str(late)!r}).write_text('x')")
    stages = [
        [Lane([touch(tmp_path / "fails", rc=3), touch(tmp_path / "never")]), Lane([neighbour], log=tmp_path / "n.log")],
        [Lane([touch(tmp_path / "next-stage")])],
    ]
    rc = run_stages(stages, record_args(tmp_path / "args"))
    assert rc == 3
    assert late.exists()  # the other lane was awaited, not orphaned
    assert not (tmp_path / "never").exists() and not (tmp_path / "next-stage").exists()
    assert not (tmp_path / "args").exists()  # no summary after a failure


def test_the_summary_s_own_failure_is_the_exit_code(tmp_path):
    assert run_stages([[Lane([touch(tmp_path / "a")])]], py("summary", "import sys; sys.exit(4)")) == 4


DRIVER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("reproduce", sys.argv[1]); m = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = m; spec.loader.exec_module(m)
    sleeper = lambda pid_file: m.Step("sleeper", [sys.executable, "-c",
        f"import os, pathlib, time; pathlib.Path({pid_file!r}).write_text(str(os.getpid())); time.sleep(300)"])
    lanes = [m.Lane([sleeper(sys.argv[2] + "/a")]), m.Lane([sleeper(sys.argv[2] + "/b")], log=None)]
    sys.exit(m.run_stages([lanes], None))
""")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_running_notebook(tmp_path, sig):
    parent = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT / "scripts" / "reproduce.py"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not all((tmp_path / n).exists() and (tmp_path / n).read_text() for n in ("a", "b")):
            assert parent.poll() is None and time.time() < deadline, parent.communicate()
            time.sleep(0.05)
        pids = [int((tmp_path / n).read_text()) for n in ("a", "b")]
        parent.send_signal(sig)
        out, err = parent.communicate(timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + sig and "run make reproduce again" in out, (out, err)
    assert "Traceback" not in err, err
    assert not [p for p in pids if _alive(p)]


def test_the_plan_is_the_default_tier(capsys):
    assert reproduce.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 01_svamp (embedded) -> 02_multiplication (embedded)\n" in out
    assert "stage 2: 03_ablation_full_vs_selective (embedded) -> 04_memory_and_speed (embedded)\n" in out
    assert "stage 2: 05_trl (embedded)  > " in out and "embedded-05_trl.log" in out
    assert "tokeneff.analysis.summary --name embedded --wall-seconds N" in out
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--profile", "gpu"])
    assert e.value.code == 2
