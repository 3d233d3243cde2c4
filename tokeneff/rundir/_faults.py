"""Test fault points of the run directory: a pause at every phase of a checkpoint save, a SIGKILL at a named one.
Off unless the environment sets them; production code only calls `hook(phase)`.
"""

from __future__ import annotations

import os
import signal
import time

_hook_counts: dict[str, int] = {}


def hook(phase: str) -> None:
    """Test hooks, off unless set: TOKENEFF_TEST_PAUSE=seconds sleeps at every phase of a checkpoint save
    (widening the windows a random kill can land in); TOKENEFF_TEST_KILL_AT=phase[:n] SIGKILLs this process
    the n-th time (default 1st) it reaches `phase` (tests/test_killloop.py). Tests may also replace this function
    to act at a phase (tests/test_run_safety.py: a sibling run finishing while a failing run cleans up)."""
    pause = os.environ.get("TOKENEFF_TEST_PAUSE")
    if pause:
        time.sleep(float(pause))
    kill_at = os.environ.get("TOKENEFF_TEST_KILL_AT")
    if kill_at:
        name, _, n = kill_at.partition(":")
        if name == phase:
            _hook_counts[phase] = _hook_counts.get(phase, 0) + 1
            if _hook_counts[phase] == int(n or 1) and os.environ.get("RANK", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
