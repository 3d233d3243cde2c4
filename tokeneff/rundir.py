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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import FIELD_NAMES, RESUMABLE_KEYS, TokeneffError, clip, show
from .utils import atomic_write_bytes, write_json

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


def check_out_file(out: str, what: str = "out") -> Path:
    """An output file (e.g. evaluate's JSON): not a folder, and its folder writable. Checked before the compute."""
    p = Path(out).expanduser()
    if p.is_dir():
        raise TokeneffError(f"{what}={out!r} is a folder: name a JSON file, e.g. {str(p / 'eval.json')!r}")
    if not p.name or out.endswith(("/", os.sep)):
        raise TokeneffError(f"{what}={out!r}: name a file, e.g. eval.json")
    check_writable(p.parent, what, out)
    if p.exists() and not p.is_file():
        raise TokeneffError(f"{what}={out!r} exists and is not a regular file (a FIFO or device?): name a JSON file")
    if p.exists() and not os.access(p, os.W_OK):
        raise TokeneffError(f"{what}={out!r}: the file is not writable")
    return p


def check_out_folder(out: str, what: str = "--out") -> Path:
    """An output folder (e.g. bench's): not a file, and writable. Checked before the compute."""
    p = Path(out).expanduser()
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
    out = Path(out_s)
    if resume and overwrite:
        raise TokeneffError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                            "--overwrite replaces it")
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
            extra = sorted(p.name for p in out.iterdir() if not is_run_entry(p.name))
            if extra:
                raise TokeneffError(f"out={out_s!r} also holds {extra[0]!r}, which a tokeneff run does not write: "
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


# ----------------------------------------------------------------------------------------------------------
# one process per run directory
# ----------------------------------------------------------------------------------------------------------

class RunLock:
    """An OS lock (flock) on out/.tokeneff.lock, held while a process trains into `out`. The kernel releases it
    when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, out: Path):
        self.out, self.fd = out, None
        self.created: list[Path] = []
        """the folders acquire() made, deepest first"""

    def acquire(self) -> RunLock:
        out = self.out
        missing = []
        p = out
        while not p.exists() and not p.is_symlink() and p != p.parent:
            missing.append(p)
            p = p.parent
        path = out / LOCK_NAME
        try:
            for d in reversed(missing):
                try:
                    d.mkdir()
                    self.created.insert(0, d)
                except FileExistsError:  # another run made it meanwhile: it is not ours to remove
                    pass
            fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666)
        except OSError as e:
            self.release(remove_created=True)
            if e.errno == errno.ELOOP:
                raise TokeneffError(f"out={show(str(out))}: {LOCK_NAME!r} is a symbolic link; tokeneff never writes "
                                    "through a link inside a run folder: remove it") from None
            raise TokeneffError(f"out={show(str(out))}: cannot open the run's lock {show(str(path))} "
                                f"({e.strerror})") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            self.fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TokeneffError(f"out={str(out)!r} is in use by process {holder} (lock {str(path)!r}): wait for it "
                                "to finish or stop it") from None
        try:  # the holder's PID, for the message above; a full disk only loses it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd
        return self

    def release(self, remove_created: bool = False) -> None:
        """Unlock; with remove_created (a run that failed before writing anything), also remove the folders
        acquire() created, deepest first, each only while it holds nothing but this run's lock file: a folder that
        holds anything else (another run created beside it meanwhile, say) stays, and so do the folders above it."""
        if remove_created and self.created:
            hook("release")
            lock = self.out / LOCK_NAME
            try:
                if self.fd is not None and os.path.samestat(os.fstat(self.fd), os.lstat(lock)):
                    lock.unlink()
            except OSError:
                pass
            for d in self.created:
                try:
                    os.rmdir(d)  # never deletes anything but an empty folder
                except OSError:
                    break
            self.created = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------

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


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that renames in it reach the disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """Every file's size and hash, then the manifest itself (atomically): a folder with a valid manifest whose
    files all match is complete."""
    files = {}
    for p in _files(folder):
        fsync_path(p)
        files[p.relative_to(folder).as_posix()] = dict(size=p.stat().st_size, sha256=_sha256(p))
    for d in {p.parent for p in _files(folder)} | {folder}:
        fsync_path(d)
    write_json(folder / MANIFEST, dict(meta, files=files))
    fsync_path(folder)


def verify(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") if `folder` is a complete checkpoint, else (None, why)."""
    if not folder.is_dir():
        return None, "missing"
    man = _read_json(folder / MANIFEST)
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict) or not isinstance(man.get("step"), int):
        return None, "no complete manifest.json"
    for rel, info in man["files"].items():
        p = folder / rel
        if not p.is_file():
            return None, f"{rel} is missing"
        if p.stat().st_size != info.get("size"):
            return None, f"{rel} has {p.stat().st_size} bytes, the manifest says {info.get('size')}"
        if _sha256(p) != info.get("sha256"):
            return None, f"{rel} does not match its hash"
    return man, ""


def _rmtree(path: Path) -> None:
    """Delete a file or a folder file by file, never following a link: a link is removed, never what it points
    to. The walk holds each folder open (O_NOFOLLOW) and removes names relative to it, so a folder swapped for a
    link meanwhile is not entered either. (The test hook can pause after the first removal: a kill then leaves
    half of it.)"""
    first = [True]

    def removed(depth: int) -> None:
        if first[0] and depth > 0:  # the first thing removed inside the folder
            first[0] = False
            hook("removing")

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


def recover_checkpoints(out: Path, strict: bool = False) -> dict[str, Any] | None:
    """Called at start under the lock: make `checkpoint/` the newest complete checkpoint (finishing a swap a kill
    interrupted, or falling back to the previous one), delete leftovers; return its manifest or None. strict (a
    resume): when checkpoint/ or checkpoint.prev/ exist but none is complete (damaged from outside: a kill always
    leaves one whole), refuse in one line and delete nothing, rather than start the run over."""
    found: dict[str, tuple[dict[str, Any] | None, str]] = {}
    for name in (CKPT, PREV, TMP):
        if (out / name).exists():
            found[name] = verify(out / name)
    complete = {n: m for n, (m, _) in found.items() if m is not None}
    if strict and not complete and ({CKPT, PREV} & found.keys()):
        why = "; ".join(f"{n}/: {found[n][1]}" for n in (CKPT, PREV) if n in found)
        raise TokeneffError(f"out={str(out)!r}: no complete checkpoint to resume from ({why}): nothing was deleted; "
                            "--overwrite starts the run again")
    best = max(complete, key=lambda n: (complete[n]["step"], n == CKPT), default=None)
    if CKPT in found and found[CKPT][0] is None:
        alt = (f"using {best}/ (step {complete[best]['step']}) instead" if best
               else "removed it; no complete checkpoint is left")
        say(f"{out / CKPT}/ is incomplete or corrupt ({found[CKPT][1]}): {alt}")
    elif CKPT not in found and best == PREV:  # (missing while .tmp is complete: a kill mid-swap, finished below)
        say(f"{out / CKPT}/ is missing: using {best}/ (step {complete[best]['step']}) instead")
    if best == TMP:  # killed during a swap: finish it
        _rmtree(out / PREV)
        if CKPT in complete:
            os.replace(out / CKPT, out / PREV)
        else:
            _rmtree(out / CKPT)
        os.replace(out / TMP, out / CKPT)
    elif best == PREV:
        _rmtree(out / CKPT)
        os.replace(out / best, out / CKPT)
    elif best is None:
        _rmtree(out / CKPT)  # corrupt, and nothing to fall back to
    _rmtree(out / TMP)
    if (out / PREV).exists() and verify(out / PREV)[0] is None:
        _rmtree(out / PREV)
    fsync_path(out)
    return complete[best] if best else None


def start_save(out: Path) -> Path:
    """A fresh checkpoint.tmp/ (rank 0, before the ranks write their parts)."""
    tmp = out / TMP
    _rmtree(tmp)
    (tmp / "adapter").mkdir(parents=True)
    return tmp


def finish_save(out: Path, meta: dict[str, Any]) -> None:
    """Manifest last, then the swap. Invariant before and after: checkpoint/ (if any) is complete."""
    tmp = out / TMP
    hook("written")
    write_manifest(tmp, meta)
    hook("manifest")
    _rmtree(out / PREV)
    hook("prev-removed")
    if (out / CKPT).exists():
        os.replace(out / CKPT, out / PREV)
        hook("moved")
    os.replace(tmp, out / CKPT)
    fsync_path(out)
    hook("swapped")


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
        if text != path.read_bytes():
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
                hook("torn")
                line = line[len(line) // 2:]
            f.write(line)
            f.flush()
