"""metrics.jsonl: one JSON row per step, appended; repaired on resume (rows past the checkpoint, a torn last line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..utils import atomic_write_bytes
from . import _faults
from .layout import NOFOLLOW, say


class MetricsLog:
    """metrics.jsonl, one JSON object per step. On (re)start, rows from `keep_below_step` on are dropped (the
    checkpoint is older than them), and so are a torn last line (a kill or a full disk during a write) and
    duplicate steps, each with a message."""

    def __init__(self, path: Path, keep_below_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not (enabled and path.is_file()):
            return
        lines = path.read_bytes().decode(errors="replace").split("\n")
        kept, bad, torn, dup, seen = [], [], set(), 0, set()
        last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
        for i, ln in enumerate(lines):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except ValueError:
                bad.append(i)
                torn.add(i)
                continue
            try:
                step = row["step"]
                if isinstance(step, bool) or not isinstance(step, int):
                    raise TypeError
            except (TypeError, KeyError):  # valid JSON but not a row: the wrong type, no step, a step of 2.5
                bad.append(i)
                continue
            if step >= keep_below_step:
                continue
            if step in seen:
                dup += 1
                continue
            seen.add(step)
            kept.append(ln)
        if last in torn:  # a kill or a full disk during a write cuts off the last line only
            say(f"{path}: dropped a torn last line (line {last + 1}, cut off by an interruption or a full disk)")
        others = [str(i + 1) for i in bad if i != last or last not in torn]
        if others:
            say(f"{path}: dropped line(s) {', '.join(others)}: not a metrics row (not JSON, or no integer step)")
        if dup:
            say(f"{path}: dropped {dup} duplicate step row(s)")
        text = "".join(ln + "\n" for ln in kept).encode()
        # rewritten (atomically, as a file of its own) also when it is a hard link, e.g. of a copy made with
        # `cp -al`: the rows appended next must never reach the other name's file
        if text != path.read_bytes() or os.lstat(path).st_nlink > 1:
            atomic_write_bytes(path, text)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666)
        with os.fdopen(fd, "a") as f:
            if os.environ.get("TOKENEFF_TEST_KILL_AT", "").startswith("torn"):  # test: a kill mid-line
                f.write(line[: len(line) // 2])
                f.flush()
                _faults.hook("torn")
                line = line[len(line) // 2:]
            f.write(line)
            f.flush()
