"""`Run`: one run directory from opening to finishing. Everything `train()` reads or writes on disk goes through it,
so `loop.py` holds the ML and this file the file handling: the checks before anything is loaded, the lock, clearing
or recovering, config.json, restoring the checkpoint (with its messages), metrics rows, evaluations, checkpoints, the
adapter and final.json, and what a stop (Ctrl-C, SIGTERM, an error) leaves behind and says. The directory's rules
(what may be deleted, the checkpoint protocol, the metrics log) are `rundir/`'s; what a checkpoint holds is
`checkpoint.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint, save_checkpoint
from .config import RESULT_KEYS, TrainConfig
from .errors import TokeneffError
from .rundir import (
    CKPT,
    FORMAT_KEY,
    MANIFEST,
    RUN_FORMAT,
    MetricsLog,
    RunLock,
    _rmtree,
    check_out,
    clear_run,
    disk_error,
    recover_checkpoints,
    resolved_as_written,
    say,
    write_failure,
    writing,
)
from .utils import ordinary_permissions, write_json


class Run:
    """The run directory `cfg.out` of one `train()` call. Use: `finished()`; then `with run:` (the lock, and on the
    way out what a stop leaves) `prepare()` once the model has loaded, `restore()`, `log()` / `record_eval()` /
    `save()` in the loop (inside `training()`), `finish()`. Data-parallel ranks each hold one; only the main
    process writes, all take part in checkpoints."""

    def __init__(self, cfg: TrainConfig, accel, resume: bool, overwrite: bool, progress: bool):
        self.cfg, self.accel, self.resume, self.overwrite = cfg, accel, resume, overwrite
        self.progress, self.main = progress, accel.is_main_process
        self.kind = check_out(cfg.to_dict(), resume, overwrite)  # read-only: before anything is loaded or written
        self.out = resolved_as_written(cfg.out, "out")  # as check_out read it: the lock makes the folders it names
        self.fresh = self.kind in ("missing", "empty") or overwrite
        """this call starts the run afresh: what it wrote is removed again if it stops before the first checkpoint"""
        self.started = False
        """config.json written by this call: the run directory has changed"""
        self.lock: RunLock | None = None
        self.metrics: MetricsLog | None = None

    # ------------------------------------------------------------------------------------------- opening

    def finished(self) -> dict[str, Any] | None:
        """On resume, a run that already reached `steps`: its final.json (nothing to train)."""
        out, cfg = self.out, self.cfg
        if not (self.resume and self.kind == "run" and (out / "final.json").is_file()):
            return None
        final = _read_final(out)
        if not (final and final["steps_done"] >= cfg.steps and final.get("algo") == cfg.algo):
            return None
        if final["steps_done"] > cfg.steps:
            raise TokeneffError(f"out={str(out)!r} finished at step {final['steps_done']}; steps={cfg.steps} asks for "
                                "fewer, which its results cannot show: use another --out")
        old = json.loads((out / "config.json").read_text())
        for k in RESULT_KEYS:
            if k in old and old[k] != getattr(cfg, k):
                raise TokeneffError(f"out={str(out)!r} finished with {k}={old[k]!r} (its results were measured so); "
                                    f"{k}={getattr(cfg, k)!r} now would mislabel them: use another --out")
        if self.progress and self.main:
            say(f"{out} finished at step {final['steps_done']}: nothing to resume")
        return final

    def __enter__(self) -> Run:
        self.accel.wait_for_everyone()
        if self.main:  # one process per run directory; checked again now that no other process can change it
            self.lock = RunLock(self.out).acquire()
            self.kind = check_out(self.cfg.to_dict(), self.resume, self.overwrite)
        return self

    def __exit__(self, typ, exc, tb) -> None:
        try:
            if self.main and isinstance(exc, KeyboardInterrupt):
                self._say_interrupted()
            elif self.main and isinstance(exc, Exception):
                kept = self._kept_after_stop()
                if isinstance(exc, TokeneffError) and kept:
                    raise TokeneffError(f"{exc}; {kept}") from None
        finally:
            if self.lock is not None:  # folders this call created are removed again if the run never started
                self.lock.release(remove_created=not (self.out / "config.json").is_file())

    def prepare(self) -> None:
        """Called once the task and model have loaded without error: only now does the directory change."""
        out = self.out
        if self.main:
            with writing(f"{out} (preparing the run folder)"):
                if self.overwrite and self.kind == "run":
                    clear_run(out)
                if self.resume and self.kind == "run":
                    recover_checkpoints(out, strict=True)
            with writing(f"{out}/config.json"):
                write_json(out / "config.json", {**self.cfg.to_dict(), FORMAT_KEY: RUN_FORMAT})
            self.started = True
        self.accel.wait_for_everyone()

    def restore(self, policy, optimizer) -> dict[str, Any] | None:
        """On resume: the adapter and optimiser restored in place, this rank's loop state returned (None: none saved,
        start at step 0). Opens metrics.jsonl, dropping rows the checkpoint does not cover."""
        accel, out = self.accel, self.out
        saved = load_checkpoint(out, policy, optimizer, accel.process_index, accel.num_processes) \
            if self.resume else None
        if self.resume and self.main:
            if saved:
                say(f"resuming from step {saved['step']} ({out / CKPT})")
            elif self.kind == "run" or self.progress:
                say(f"no checkpoint in {out}: starting at step 0")
        with writing(f"{out}/metrics.jsonl"):
            self.metrics = MetricsLog(out / "metrics.jsonl", saved["step"] + 1 if saved else 0, self.main)
        return saved

    # ------------------------------------------------------------------------------------------- the loop

    def log(self, row: dict[str, Any]) -> None:
        with writing(f"{self.out}/metrics.jsonl"):
            self.metrics.write(row)

    def record_eval(self, step: int, result: dict[str, Any]) -> None:
        if self.main:
            with writing(f"{self.out}/eval_step{step}.json"):
                write_json(self.out / f"eval_step{step}.json", result)

    def save(self, policy, optimizer, step: int, evals: list[dict[str, Any]], rank_state: dict[str, Any]) -> None:
        save_checkpoint(self.out, self.accel, policy, optimizer, step, evals, rank_state)

    @contextlib.contextmanager
    def training(self, step: Callable[[], int]) -> Iterator[None]:
        """Around the update loop: an interrupt leaves the newest complete checkpoint in place (a second one may
        have landed inside a save); a failed write the loop did not name is one line naming the step."""
        try:
            yield
        except KeyboardInterrupt:
            if self.main and self.accel.num_processes == 1:
                recover_checkpoints(self.out)
            raise
        except Exception as e:  # noqa: BLE001 - only write failures are mapped, the rest re-raised
            if isinstance(e, TokeneffError) or write_failure(e) is None:
                raise
            raise disk_error(e, f"{self.out} after step {step()}") from None

    def finish(self, policy, final: dict[str, Any]) -> None:
        """The adapter and final.json, replaced together: final.json goes first and comes back last, so that a
        final.json always describes the adapter beside it."""
        out = self.out
        if self.main:
            with writing(f"{out}/final.json"):
                (out / "final.json").unlink(missing_ok=True)
            with writing(f"{out}/adapter"):
                _rmtree(out / "adapter.tmp")  # never through a link
                policy.save_pretrained(out / "adapter.tmp")
                ordinary_permissions(out / "adapter.tmp")
                _rmtree(out / "adapter")
                os.replace(out / "adapter.tmp", out / "adapter")
            with writing(f"{out}/final.json"):
                write_json(out / "final.json", final)
        self.accel.wait_for_everyone()

    # ------------------------------------------------------------------------------------------- stopping

    def _say_interrupted(self) -> None:
        """The message after Ctrl-C or SIGTERM."""
        out = self.out
        if not self.started:  # interrupted while loading (a warm-start build, say): nothing in `out` changed
            print(f"\ninterrupted before the run started: nothing was written in {out}; run the same command again",
                  flush=True)
            return
        kept = self._kept_after_stop()
        if checkpoint_step(out) is not None:
            print(f"\ninterrupted: {kept}", flush=True)
        elif self.fresh:
            print(f"\ninterrupted before the first checkpoint: {kept}; run the same command again to start over",
                  flush=True)
        else:
            print(f"\ninterrupted before the first checkpoint of {out}: run the same command again (with --resume) "
                  "to start at step 0", flush=True)

    def _kept_after_stop(self) -> str:
        """What a run that stopped early leaves, in a few words. A run this call started afresh that has no
        checkpoint yet is cleared, so that the same command simply starts again."""
        out = self.out
        if not self.started:
            return ""  # nothing in `out` changed
        step = checkpoint_step(out)
        if step is not None:
            return f"the checkpoint of step {step} is kept in {out}/{CKPT}: add --resume to continue from it"
        if self.fresh:
            with contextlib.suppress(OSError):
                clear_run(out)
            return f"nothing was kept in {out}"
        return f"{out} has no checkpoint yet: --resume starts it at step 0"


def checkpoint_step(out: Path) -> int | str | None:
    """The step of the complete checkpoint in `out` ("?" when its manifest cannot be read), None when there is none."""
    man = out / CKPT / MANIFEST
    if not man.is_file():
        return None
    try:
        return json.loads(man.read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _read_final(out: Path) -> dict[str, Any] | None:
    """final.json, or None (with a message) when it is damaged: the run then finishes again from its checkpoint."""
    try:
        final = json.loads((out / "final.json").read_text())
    except (OSError, ValueError):
        final = None
    def is_accuracy(a: Any) -> bool:  # None when the run never evaluated; otherwise a share of problems
        return a is None or (isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1)

    if (isinstance(final, dict) and isinstance(final.get("steps_done"), int)
            and not isinstance(final["steps_done"], bool) and is_accuracy(final.get("final_accuracy"))):
        return final
    say(f"{out}/final.json is damaged (cut off or not a run's summary): finishing the run again from its checkpoint")
    return None
