"""The run directory: what --overwrite may delete, one process per run, checkpoints that survive a kill.

A run directory is recognised by its `config.json`: the resolved config plus `tokeneff_run_format`. Runs written
before the field existed (a config.json of tokeneff's fields next to a metrics.jsonl, checkpoints without
manifests) are recognised only to be refused in one line. `--overwrite` deletes only a run directory, and only when
everything in it is something a run writes.

Checkpoints: `checkpoint/` (latest) and `checkpoint.prev/` (the one before) are complete, each with a
`manifest.json` (every file's size and SHA-256, plus the step) written last. A save writes `checkpoint.tmp/`,
then removes `checkpoint.prev/`, renames `checkpoint/` to `checkpoint.prev/` and `checkpoint.tmp/` to
`checkpoint/`. A kill at any instant leaves at least one complete checkpoint (or none before the first save);
`recover_checkpoints` (run at start, under the lock) picks the newest complete one, finishes an interrupted
swap and removes the leftovers.

The parts, by responsibility: `layout` (names, kinds of folder, checks, overwrite safety, deletion, failed writes),
`lock` (one process per run), `checkpoints` (the save protocol and recovery), `metrics` (metrics.jsonl) and
`_faults` (test fault points).
"""

from ._faults import hook
from .checkpoints import finish_save, fsync_path, recover_checkpoints, start_save, verify, write_manifest
from .layout import (
    CKPT,
    FORMAT_KEY,
    LOCK_NAME,
    MANIFEST,
    PREV,
    RUN_FORMAT,
    TMP,
    _rmtree,
    check_no_links,
    check_out,
    check_out_file,
    check_out_folder,
    check_writable,
    classify,
    clear_run,
    disk_error,
    is_run_entry,
    resolved_as_written,
    run_config,
    say,
    write_failure,
    writing,
)
from .lock import RunLock
from .metrics import MetricsLog

__all__ = ["hook", "finish_save", "fsync_path", "recover_checkpoints", "start_save", "verify", "write_manifest",
           "CKPT", "FORMAT_KEY", "LOCK_NAME", "MANIFEST", "PREV", "RUN_FORMAT", "TMP", "_rmtree", "check_no_links",
           "check_out", "check_out_file", "check_out_folder", "check_writable", "classify", "clear_run",
           "disk_error", "is_run_entry", "resolved_as_written", "run_config", "say", "write_failure", "writing",
           "RunLock", "MetricsLog"]
