"""The checkpoint protocol: checkpoint.tmp/ written, a manifest (every file's size and hash) last, then the swap
checkpoint/ -> checkpoint.prev/, checkpoint.tmp/ -> checkpoint/; `recover_checkpoints` after a kill.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import TokeneffError
from ..utils import write_json
from . import _faults
from .layout import CKPT, MANIFEST, PREV, TMP, _read_json, _rmtree, say


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
        alt = (f"using {best}/ (step {complete[best]['step']}) instead, which becomes {CKPT}/" if best
               else "removed it; no complete checkpoint is left")
        say(f"{out / CKPT}/ is incomplete or corrupt ({found[CKPT][1]}): {alt}")
    elif CKPT not in found and best == PREV:  # (missing while .tmp is complete: a kill mid-swap, finished below)
        say(f"{out / CKPT}/ is missing: using {best}/ (step {complete[best]['step']}) instead, which becomes {CKPT}/")
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
    _faults.hook("written")
    write_manifest(tmp, meta)
    _faults.hook("manifest")
    _rmtree(out / PREV)
    _faults.hook("prev-removed")
    if (out / CKPT).exists():
        os.replace(out / CKPT, out / PREV)
        _faults.hook("moved")
    os.replace(tmp, out / CKPT)
    fsync_path(out)
    _faults.hook("swapped")
