"""What a run directory holds and what may be done to it: its names, what kind of folder `--out` is, the checks
before anything is loaded or written, overwrite safety, deletion that never follows a link, and failed writes
mapped to one line.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import FIELD_NAMES, RESUMABLE_KEYS
from ..errors import TokeneffError, clip, show
from . import _faults

RUN_FORMAT = 1
FORMAT_KEY = "tokeneff_run_format"
LOCK_NAME = ".tokeneff.lock"
CKPT, PREV, TMP = "checkpoint", "checkpoint.prev", "checkpoint.tmp"
MANIFEST = "manifest.json"
# What a run writes (anything else in a folder means it is not only a run, and --overwrite leaves it alone).
RUN_NAMES = {"config.json", "metrics.jsonl", "final.json", "adapter", "adapter.tmp", CKPT, PREV, TMP, LOCK_NAME}
RUN_PATTERNS = (re.compile(r"eval_step\d+\.json"),
                # atomic_write_bytes' temp files, left by a kill during a write
                re.compile(r"\.(config\.json|metrics\.jsonl|final\.json|eval_step\d+\.json)\..+"))
# ... and inside its folders (adapter/, the checkpoints and their adapter/): peft's files, the checkpoint's, and
# atomic_write_bytes' temp files
INNER_NAMES = {"adapter", "adapter_config.json", "adapter_model.safetensors", "README.md", "state.json",
               "optimizer.pt", MANIFEST}
INNER_PATTERNS = (re.compile(r"rank\d+\.pt"), re.compile(r"\.(state\.json|manifest\.json)\..+"))
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json",
               "tokenizer_config.json", "generation_config.json")


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def say(msg: str) -> None:
    print(f"tokeneff: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# what a folder is
# ----------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    """A regular file's JSON, else None (a FIFO in its place would block the read forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_config(out: Path) -> dict[str, Any] | None:
    """The run's config.json if `out` is a tokeneff run directory, else None."""
    cfg = _read_json(out / "config.json")
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get(FORMAT_KEY), int) else None


def _is_older_run(out: Path) -> bool:
    """A run written before the format field existed: tokeneff's fields in config.json, next to a metrics.jsonl."""
    cfg = _read_json(out / "config.json")
    return (isinstance(cfg, dict) and {"algo", "task", "model", "steps"} <= cfg.keys()
            and all(k in FIELD_NAMES for k in cfg) and (out / "metrics.jsonl").is_file())


def is_run_entry(name: str) -> bool:
    return name in RUN_NAMES or any(p.fullmatch(name) for p in RUN_PATTERNS)


def foreign_inside(out: Path) -> str | None:
    """The first file or folder inside a run's own folders that a run does not write (e.g. checkpoint/notes.txt), or
    None. Links are not followed (deleting removes the link itself)."""
    for top in sorted(RUN_NAMES):  # the folders among them (check_no_links has refused links and misplaced kinds)
        if not (out / top).is_dir() or (out / top).is_symlink():
            continue
        for root, dirs, files in os.walk(out / top):  # followlinks=False
            for name in sorted(dirs + files):
                if name not in INNER_NAMES and not any(p.fullmatch(name) for p in INNER_PATTERNS):
                    return str((Path(root) / name).relative_to(out))
    return None


def _is_model_folder(out: Path) -> bool:
    cfg = _read_json(out / "config.json")
    if isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg):
        return True
    return any((out / n).exists() for n in MODEL_FILES) or any(out.glob("*.safetensors")) or any(out.glob("*.gguf"))


def classify(out: Path) -> str:
    """missing | file | empty | run | older (a run before format 1) | model | foreign"""
    if not out.exists():
        return "file" if out.is_symlink() else "missing"
    if not out.is_dir():
        return "file"
    if not [p for p in out.iterdir() if p.name != LOCK_NAME]:
        return "empty"
    if run_config(out) is not None:
        return "run"
    if _is_older_run(out):
        return "older"
    return "model" if _is_model_folder(out) else "foreign"


RUN_FOLDERS = {"adapter", "adapter.tmp", CKPT, PREV, TMP}


def linked_entries(out: Path) -> list[str]:
    """The names in `out` that a run writes or deletes and that are symbolic links (`out` itself may be one)."""
    try:
        return sorted(e.name for e in os.scandir(out) if is_run_entry(e.name) and e.is_symlink())
    except OSError:
        return []


def misplaced_entry(out: Path) -> tuple[str, str] | None:
    """(name, what it should be) for the first run file that is not a regular file, or run folder that is not a
    folder: a FIFO would hang a write, a folder named final.json would fail only at the end of the run."""
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except OSError:
        return None
    for e in entries:
        if not is_run_entry(e.name) or e.is_symlink():
            continue
        if e.name in RUN_FOLDERS:
            if not e.is_dir(follow_symlinks=False):
                return e.name, "a folder"
        elif not e.is_file(follow_symlinks=False):
            return e.name, "a regular file"
    return None


def check_no_links(out: Path, out_s: str) -> None:
    """Refuse a run folder whose own files are links (a run never writes or deletes through one), or whose run
    files are of the wrong kind (a folder, FIFO or device where a file belongs; a file where a folder belongs)."""
    links = linked_entries(out)
    if links:
        try:
            target = f" (to {show(os.readlink(out / links[0]))})"
        except OSError:
            target = ""
        raise TokeneffError(f"out={show(out_s)}: {links[0]!r} is a symbolic link{target}; tokeneff never writes or "
                            "deletes through a link inside a run folder (the folder itself may be one): replace it "
                            "with a real file or folder, or use another --out")
    odd = misplaced_entry(out)
    if odd:
        raise TokeneffError(f"out={show(out_s)}: {odd[0]!r} is not {odd[1]}, as a run keeps it; tokeneff does not "
                            "replace it: move it away, or use another --out")


def nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path, what: str, shown: str | None = None) -> None:
    """`path` (a folder, existing or to be created) can be created and written: one line if not. `shown`: the
    value to name in the message (default: path)."""
    anc = nearest_existing(path)
    path = shown if shown is not None else str(path)
    if not anc.is_dir():
        raise TokeneffError(f"{what}={str(path)!r}: {str(anc)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".tokeneff-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TokeneffError(f"{what}={str(path)!r}: cannot write in {str(anc)!r} ({e.strerror})") from None


def resolved_as_written(out: str, what: str) -> Path:
    """`out` with '..' taken as written (`a/b/..` is `a`), `~` expanded; refused where a symbolic link comes before a
    '..', since the OS would then go up from where the link points. Every output path goes through here, so that
    the folder a path names is the folder that is checked, created and written."""
    p = Path(out).expanduser()
    for i, part in enumerate(p.parts):
        if part == ".." and any(Path(*p.parts[:j]).is_symlink() for j in range(1, i + 1)):
            raise TokeneffError(f"{what}={show(out)}: '..' after a symbolic link goes where the link points, not back "
                                "up the path as written: give the path without '..'")
    return Path(os.path.normpath(p))


def check_out_file(out: str, what: str = "out") -> Path:
    """An output file (e.g. evaluate's JSON): not a folder, and its folder writable. Checked before the compute."""
    if not out or out.endswith(("/", os.sep)) or Path(out).name in ("", ".", ".."):
        raise TokeneffError(f"{what}={show(out)}: name a file, e.g. eval.json")
    p = resolved_as_written(out, what)
    if p.is_dir():
        raise TokeneffError(f"{what}={show(out)} is a folder: name a file in it, e.g. {str(p / 'eval.json')!r}")
    check_writable(p.parent, what, out)
    if p.exists() and not p.is_file():
        raise TokeneffError(f"{what}={out!r} exists and is not a regular file (a FIFO or device?): name another file")
    if p.exists() and not os.access(p, os.W_OK):
        raise TokeneffError(f"{what}={out!r}: the file is not writable")
    return p


def check_out_folder(out: str, what: str = "--out") -> Path:
    """An output folder (e.g. bench's): not a file, and writable. Checked before the compute."""
    p = resolved_as_written(out, what)
    if p.exists() and not p.is_dir():
        raise TokeneffError(f"{what}={out!r} is a file, not a folder")
    check_writable(p, what)
    return p


def _protected(out: Path) -> str | None:
    """Why `out` must never be deleted, or None."""
    r, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if r == cwd:
        return "is the current folder"
    if r in cwd.parents:
        return "is a parent of the current folder"
    if r == home or r in home.parents:
        return "is your home folder or above it"
    return None


def check_same_run(old: dict[str, Any], new: dict[str, Any], out: str) -> None:
    """On resume, every key that changes the trajectory must be as before."""
    for k, v in new.items():
        if k in RESUMABLE_KEYS or k not in old or k == FORMAT_KEY:
            continue
        if old[k] != v:
            raise TokeneffError(f"out={out!r} holds a different run: {k}={old[k]!r} there, {v!r} now (on resume only "
                                f"{', '.join(RESUMABLE_KEYS)} may change): use another --out or --overwrite")


def check_out(cfg_dict: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Read-only check of the run directory before anything is computed or written; returns its kind."""
    out_s = cfg_dict["out"]
    if resume and overwrite:
        raise TokeneffError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                            "--overwrite replaces it")
    out = resolved_as_written(out_s, "out")  # the folder the path names; '..' after a link refused
    if out.is_dir():  # before anything in it is read: links and run files of the wrong kind (a FIFO would block)
        check_no_links(out, out_s)
    kind = classify(out)
    if kind == "file":
        raise TokeneffError(f"out={out_s!r} exists and is not a directory")
    if kind == "older":
        raise TokeneffError(f"out={out_s!r} was written by an older tokeneff (before run format {RUN_FORMAT}), which "
                            "this one neither resumes nor overwrites: use another --out")
    if kind == "model":
        raise TokeneffError(f"out={out_s!r} is a model folder (config.json, weights or tokenizer), not a tokeneff run: "
                            "use another --out")
    if kind == "foreign" and (out / "config.json").is_file() and any(is_run_entry(p.name) and p.name != "config.json"
                                                                     for p in out.iterdir() if p.name != LOCK_NAME):
        raise TokeneffError(f"out={out_s!r} looks like a tokeneff run, but its config.json is damaged or not a run's "
                            "config: nothing was changed; use another --out")
    if kind == "foreign":
        names = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise TokeneffError(f"out={out_s!r} holds files that are not a tokeneff run ({shown}): use a new or empty "
                            "folder")
    if kind == "run":
        old = run_config(out) or {}
        if isinstance(old.get(FORMAT_KEY), int) and old[FORMAT_KEY] > RUN_FORMAT:
            raise TokeneffError(f"out={out_s!r} was written by a newer tokeneff (run format {old[FORMAT_KEY]}, this "
                                f"one reads {RUN_FORMAT}): upgrade tokeneff or use another --out")
        if not (resume or overwrite):
            raise TokeneffError(f"out={out_s!r} already holds a run: pass --resume to continue it or --overwrite to "
                                "replace it")
        if resume:
            check_same_run(old, cfg_dict, out_s)
        if overwrite:
            why = _protected(out)
            if why:
                raise TokeneffError(f"out={out_s!r} {why}: it is never deleted; give the run its own folder")
            extra = min((p.name for p in out.iterdir() if not is_run_entry(p.name)), default=None)
            extra = extra or foreign_inside(out)
            if extra:
                raise TokeneffError(f"out={out_s!r} also holds {extra!r}, which a tokeneff run does not write: "
                                    "nothing was deleted; move it away or use another --out")
    if kind in ("missing", "empty") or overwrite:
        check_writable(out, "out")
    return kind


def clear_run(out: Path) -> None:
    """Delete what a run wrote (check_out has verified that nothing else is there); the lock file stays."""
    for p in out.iterdir():
        if p.name == LOCK_NAME or not is_run_entry(p.name):
            continue
        _rmtree(p)


def _rmtree(path: Path) -> None:
    """Delete a file or a folder file by file, never following a link: a link is removed, never what it points
    to. The walk holds each folder open (O_NOFOLLOW) and removes names relative to it, so a folder swapped for a
    link meanwhile is not entered either. (The test hook can pause after the first removal: a kill then leaves
    half of it.)"""
    first = [True]

    def removed(depth: int) -> None:
        if first[0] and depth > 0:  # the first thing removed inside the folder
            first[0] = False
            _faults.hook("removing")

    def remove_in(parent_fd: int, name: str, depth: int) -> None:
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            removed(depth)
            return
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | NOFOLLOW, dir_fd=parent_fd)
        try:
            with os.scandir(fd) as it:
                names = sorted(e.name for e in it)
            for n in names:
                remove_in(fd, n, depth + 1)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
        removed(depth)

    path = Path(path)
    try:
        parent_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return
    try:
        remove_in(parent_fd, path.name, 0)
    finally:
        os.close(parent_fd)


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, if `e` is a write failure: OSError, safetensors' SafetensorError, torch.save's
    RuntimeError ("file write failed") and the like; None for anything else."""
    if isinstance(e, OSError):
        return e.strerror or clip(str(e), 200)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and any(
            w in str(e).lower() for w in ("write", "writing", "no space", "read-only", "i/o", "ioerror", "iostream",
                                           "unexpected pos", "inline_container", "file", "disk"))):
        return clip(text, 200)
    return None


def disk_error(e: BaseException, what: str) -> TokeneffError:
    why = write_failure(e) or clip(str(e), 200)
    return TokeneffError(f"could not write {what} ({why}): free space or fix the folder")


@contextmanager
def writing(what: str, error=disk_error):
    """Map a failed write inside the block (see write_failure) to one line naming `what`."""
    try:
        yield
    except TokeneffError:
        raise
    except Exception as e:  # noqa: BLE001 - filtered by write_failure, re-raised otherwise
        if write_failure(e) is None:
            raise
        raise error(e, what) from None
