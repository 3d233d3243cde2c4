"""results/summary.md: each claim of the paper beside our number, its 95% interval and the verdict it supports.

Reads the `<task>_summary.json` and `ablation_summary.json` files the notebooks write; computes nothing new.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config import clip
from ..utils import atomic_write_bytes
from .stats import DELTA, Interval

DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)


class Damaged(Exception):
    """A results file that cannot be read as the notebooks wrote it: one line naming it."""

    def __init__(self, f: Path, e: BaseException):
        why = f"{type(e).__name__}: {clip(str(e).strip().splitlines()[0] if str(e).strip() else '', 160)}"
        super().__init__(f"{str(f)!r} is damaged ({why}): regenerate it (rerun its notebook) or remove it")


def _load(f: Path):
    """A results JSON file (a JSON object), or Damaged."""
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Damaged(f, e) from None
    if not isinstance(data, dict):
        raise Damaged(f, TypeError(f"a JSON {type(data).__name__}, not an object"))
    return data


def _iv(d: dict | None) -> Interval | None:
    return Interval(**d) if d else None


def _accuracy_rows(s: dict) -> list[str]:
    arms = s["arms"]
    where = (f"{s['label']}, {s['problems']} held-out problems, {s['steps']} updates, "
             f"seeds {','.join(map(str, s['seeds']))}")
    rows = [f"| {s['task']}: base model accuracy | {s['paper_base']} | {100 * s['base']['accuracy']:.1f}% "
            f"({s['problems']} problems, greedy) | {where} | — |"]
    from .experiments import claim_verdicts

    for c in claim_verdicts(s["task"], arms, s.get("delta", DELTA)):  # recomputed: one rule, in stats.verdict
        rows.append(f"| {s['task']}: {c['claim']} | {c['paper']} | {c['ours']} | {where} | **{c['verdict']}** |")
    for v, a in arms.items():
        acc = _iv(a["accuracy"])
        rows.append(f"| {s['task']}: {v}, accuracy after {s['steps']} updates | — | {100 * acc.mean:.1f}% "
                    f"[{100 * acc.lo:.1f}, {100 * acc.hi:.1f}] | {where} | — |")
    return rows


def record_wall_time(folder: Path, part: str, seconds: int) -> None:
    """Wall time per part of a tier (`make reproduce-full` runs its SVAMP and multiplication halves apart), kept in
    wall_times.json beside the results so that a later part does not erase an earlier part's time."""
    import datetime
    import platform

    f = folder / "wall_times.json"
    times = _load(f) if f.is_file() else {}
    times[part] = dict(seconds=seconds, finished=datetime.datetime.now().isoformat(timespec="seconds"),
                       machine=f"{platform.machine()}, {os.cpu_count()} cores")
    atomic_write_bytes(f, (json.dumps(times, indent=1) + "\n").encode())


def build(folder: Path) -> str:
    lines = [f"# Summary — `{folder.name}`", "",
             "Paper: Lee & Tong, *Token-Efficient RL for LLM Reasoning* (arXiv 2504.20834), Qwen2-1.5B-Instruct + "
             "LoRA; it reports no seeds or intervals. Ours: every arm evaluated greedily on the same held-out "
             "problems; gains are differences in accuracy in percentage points with a 95% paired bootstrap interval "
             "(problems resampled jointly for both arms, seeds per arm; `tokeneff/analysis/stats.py`). Verdicts "
             "follow from "
             f"the interval: a claimed gain **holds** if the interval is above 0 and is **contradicted** if it lies "
             f"below +{100 * DELTA:.0f} points (no gain of that size); a claimed absence of gain holds if the interval "
             f"lies below +{100 * DELTA:.0f} and is contradicted if it is above 0; anything else is **unresolved** "
             "(± half-width). Small-scale numbers are **not** the paper's numbers.", ""]
    f = folder / "wall_times.json"
    times = _load(f) if f.is_file() else {}  # record_wall_time's, per part
    try:
        for part, t in times.items():
            what = ("the run that produced this folder (its notebooks; setting up .venv not included)"
                    if part == "all" else f"its {part} part")
            where = f" ({t['machine']}, finished {t['finished']})" if "machine" in t else ""
            lines += [f"Wall time of {what}: {float(t['seconds']) / 60:.1f} min{where}."]
    except DAMAGE as e:
        raise Damaged(f, e) from None
    if times:
        lines.append("")
    lines += ["| claim | paper | ours: accuracy or gain, 95% CI | model · scale · problems · updates | verdict |",
              "|---|---|---|---|---|"]
    found = False
    for task in ("svamp", "multiplication"):
        f = folder / f"{task}_summary.json"
        if f.is_file():
            found = True
            try:
                lines += _accuracy_rows(_load(f))
            except DAMAGE as e:
                raise Damaged(f, e) from None
        else:
            lines.append(f"| {task} | — | not run | — | — |")
    f = folder / "ablation_summary.json"
    if f.is_file():
        from .experiments import TOKEN_SHARE

        s = _load(f)
        try:
            for v, shares in s["share"].items():
                paper = TOKEN_SHARE.get(v, ("—",))[0]
                ours = ", ".join(f"{100 * x:.1f}%" for x in shares) or "—"
                lines.append(f"| share of signal-group completion tokens in the loss: {v} | {paper} | {ours} (per "
                             f"seed) | {s['label']}, {s['task']}, {s['steps']} updates | "
                             f"**{s['verdicts'].get(v, '—')}** |")
        except DAMAGE as e:
            raise Damaged(f, e) from None
    if not found:
        lines += ["", "No experiment summaries in this folder yet: run `make reproduce`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokeneff.analysis.summary")
    ap.add_argument("--name", "--profile", dest="name", default="embedded", help="folder under --results")
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", help="default: results/summary.md for embedded, else results/<name>/summary.md")
    ap.add_argument("--wall-seconds", type=int)
    ap.add_argument("--part", help="with --wall-seconds: the part of the tier that took it (kept per part)")
    a = ap.parse_args(argv)
    folder = Path(a.results) / a.name
    if not folder.is_dir():
        print(f"tokeneff.analysis.summary: error: {str(folder)!r} does not exist (run the notebooks first)")
        return 2
    out = Path(a.out) if a.out else (Path(a.results) / "summary.md" if a.name == "embedded"
                                     else folder / "summary.md")
    try:
        if a.wall_seconds is not None:
            record_wall_time(folder, a.part or "all", a.wall_seconds)
        text = build(folder)
        atomic_write_bytes(out, text.encode())
    except Damaged as e:
        print(f"tokeneff.analysis.summary: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tokeneff.analysis.summary: error: could not write {str(e.filename or out)!r} ({e.strerror})",
              file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
