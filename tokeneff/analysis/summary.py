"""results/summary.md: each claim of the paper beside our number, its 95% interval and the verdict it supports.

`python -m tokeneff.analysis.summary` first rebuilds every interval and verdict of `<task>_summary.json` (and the
`<task>_final` tables) from the committed per-problem outcomes `<task>_outcomes.csv`, with the functions the notebooks
use (claims.arm_intervals, claim_verdicts), then writes summary.md from them. A task without an outcomes file
keeps its stored intervals and its verdicts read "not auditable" (tests/test_summary.py checks that the committed
files equal what this rebuilds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import pandas as pd

from ..config import check_name
from ..errors import TokeneffError, clip
from ..rundir import check_out_file
from ..utils import atomic_write_bytes, describe_environment, write_json
from .claims import PAPER_BASE, TOKEN_SHARE, arm_intervals, arms_from_table, claim_verdicts, final_table
from .claims import rate as _rate
from .report import plot_gains, save_figure, save_table
from .stats import DELTA, N_BOOT, Interval

EXPERIMENTS = ("mulworked", "svamp", "multiplication")
"""result-file prefixes (an experiment is a task, or mulworked: worked-answer multiplication), in reading order"""
NOT_AUDITABLE = "no per-problem outcomes"
DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)


class Damaged(Exception):
    """A results file that cannot be read as the notebooks wrote it: one line naming it."""

    def __init__(self, f: Path | str, e: BaseException):
        why = f"{type(e).__name__}: {clip(str(e).strip().splitlines()[0] if str(e).strip() else '', 160)}"
        super().__init__(f"{str(f)!r} is damaged ({why}): regenerate it (rerun its notebook) or remove it")


def _here(f: Path) -> bool:
    """Whether a results file is there; one that exists but is not a regular file (a folder, a FIFO) is damaged,
    never taken for missing: the verdicts would silently read "not run"."""
    if f.is_symlink() or f.exists():
        if not f.is_file():
            raise Damaged(f, ValueError("not a regular file: a folder, FIFO or broken link"))
        return True
    return False


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


def rebuild(folder: Path, figures: bool = True) -> list[str]:
    """Recompute the intervals, truncation rates and verdicts of every `<task>_summary.json` in `folder` that has a
    `<task>_outcomes.csv` beside it, and its `<task>_final` table (and, with `figures`, its `<task>_gains` figure).
    Token shares and the run's settings are kept from the summary (they come from the training logs). Returns the
    tasks rebuilt."""

    done = []
    for name in EXPERIMENTS:
        f, o = folder / f"{name}_summary.json", folder / f"{name}_outcomes.csv"
        if not (_here(f) and _here(o)):
            continue
        s = _load(f)
        missing = [k for k in ("task", "arms", "seeds", "problems", "base", "label", "paper_base") if k not in s]
        if missing:
            raise Damaged(f, KeyError(missing[0]))
        task = s["task"]
        variants, seeds = list(s["arms"]), s["seeds"]
        try:
            table = pd.read_csv(o)
            ids, base_vec, final = arms_from_table(table, variants, seeds)
            cut = arms_from_table(table, variants, seeds, "truncated")
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, *DAMAGE) as e:
            raise Damaged(o, e) from None
        if len(ids) != s["problems"]:
            raise ValueError(f"{o}: {len(ids)} problems for the base model, the summary says {s['problems']}")
        shares = {v: a.get("token_share", []) for v, a in s["arms"].items()}
        arms = arm_intervals(final, base_vec, shares, s.get("n_boot", N_BOOT), cut[2] if cut else None)
        s["base"] = dict(s["base"], accuracy=float(base_vec.mean()), truncated=float(cut[1].mean()) if cut else None)
        s["arms"] = {v: {k: (x.__dict__ if isinstance(x, Interval) else x) for k, x in a.items()}
                     for v, a in arms.items()}
        s["claims"] = claim_verdicts(task, arms, s.get("delta", DELTA))
        s["paper_base"] = PAPER_BASE.get(task, s["paper_base"])
        write_json(f, s)
        save_table(final_table(arms, s["label"]), str(folder / f"{name}_final"))
        if figures:
            ax = plot_gains(arms, f"{name}: gain over the base model, paired by problem ({s['problems']} problems)")
            ax.figure.suptitle(f"{s['label']} · 95% paired bootstrap intervals (problems × seeds)", fontsize=9)
            save_figure(ax.figure, str(folder / f"{name}_gains"))
        done.append(name)
    return done


def _accuracy_rows(s: dict, auditable: bool = True) -> list[str]:
    arms = s["arms"]
    name = s.get("experiment") or s["task"]  # mulworked: multiplication with worked answers
    where = (f"{s['label']}, {s['problems']} held-out problems, {s['steps']} updates, "
             f"seeds {','.join(map(str, s['seeds']))}")

    base_cut = s["base"].get("truncated")
    paper_base = PAPER_BASE.get(s["task"], s["paper_base"])
    rows = [f"| {name}: base model accuracy | {paper_base} | {100 * s['base']['accuracy']:.1f}% "
            f"({s['problems']} problems, greedy) | {_rate(base_cut)} | {where} | — |"]
    for c in claim_verdicts(s["task"], arms, s.get("delta", DELTA)):  # recomputed: one rule, in stats.verdict
        v, ref = c["claim"].split(" vs ")[0], "base" if c["claim"].endswith("base model") else "grpo"
        ref_cut = base_cut if ref == "base" else arms.get("grpo", {}).get("truncated")
        cut = "—" if arms[v].get("truncated") is None else f"{v} {_rate(arms[v]['truncated'])} · {ref} {_rate(ref_cut)}"
        said = c["verdict"] if auditable or c["verdict"] == "—" else f"not auditable ({s.get('audit', NOT_AUDITABLE)})"
        rows.append(f"| {name}: {c['claim']} | {c['paper']} | {c['ours']} | {cut} | {where} | **{said}** |")
    for v, a in arms.items():
        acc = _iv(a["accuracy"])
        rows.append(f"| {name}: {v}, accuracy after {s['steps']} updates | — | {100 * acc.mean:.1f}% "
                    f"[{100 * acc.lo:.1f}, {100 * acc.hi:.1f}] | {_rate(a.get('truncated'))} | {where} | — |")
    return rows


def record_wall_time(folder: Path, part: str, seconds: int) -> None:
    """Wall time per part of a tier (`make reproduce-full` runs its SVAMP and multiplication halves apart), kept in
    wall_times.json beside the results so that a later part does not erase an earlier part's time."""

    f = folder / "wall_times.json"
    times = _load(f) if _here(f) else {}
    times[part] = dict(seconds=seconds, finished=datetime.datetime.now().isoformat(timespec="seconds"),
                       machine=f"{platform.machine()}, {os.cpu_count()} cores")
    atomic_write_bytes(f, (json.dumps(times, indent=1) + "\n").encode())


def build(folder: Path) -> str:
    lines = [f"# Summary — `{folder.name}`", "",
             "Paper: Lee & Tong, *Token-Efficient RL for LLM Reasoning* (arXiv 2504.20834), Qwen2-1.5B + "
             "LoRA; it reports no seeds or intervals. Ours: every arm evaluated greedily on the same held-out "
             "problems; gains are differences in accuracy in percentage points with a 95% paired bootstrap interval "
             "(problems resampled jointly for both arms, seeds per arm; `tokeneff/analysis/stats.py`). Verdicts "
             "follow from "
             f"the interval: a claimed gain **holds** if the interval is above 0 and is **contradicted** if it lies "
             f"below +{100 * DELTA:.0f} points (no gain of that size); a claimed absence of gain holds if the interval "
             f"lies below +{100 * DELTA:.0f} and is contradicted if it is above 0; anything else is **unresolved** "
             "(± half-width); an interval from one seed covers the choice of problems only, not run-to-run "
             "variation, so it gets no verdict (**not tested (1 seed)**). Small-scale numbers are **not** the "
             "paper's numbers. Every interval and verdict here is rebuilt from the per-problem outcomes "
             "`<task>_outcomes.csv` by `python -m tokeneff.analysis.summary`; where a task has none, its verdicts "
             "read **not auditable**. The truncation column gives the share of greedy held-out completions cut off "
             "by the token budget (— where the outcomes predate it). The paper's token shares (and its 3×3-digit "
             "multiplication, docs/paper.md) come from a secondary summary of the paper, not from its text. The "
             "`embedded` and `embedded-full` tiers run the same multiplication settings with seeds 0–3 in common: "
             "those runs are the same runs, so agreement between the tiers is not an independent confirmation.",
             ""]
    f = folder / "wall_times.json"
    times = _load(f) if _here(f) else {}  # record_wall_time's, per part
    try:
        for part, t in times.items():
            what = ("the run that produced this folder (its notebooks; setting up .venv not included)"
                    if part == "all" else f"its {part} part")
            where = f" ({t['machine']}, finished {t['finished']})" if "machine" in t else ""
            note = f" {t['note']}" if t.get("note") else ""
            lines += [f"Wall time of {what}: {float(t['seconds']) / 60:.1f} min{where}.{note}"]
    except DAMAGE as e:
        raise Damaged(f, e) from None
    if times:
        lines.append("")

    for name in EXPERIMENTS:  # each experiment's own record: a tier's experiments may run on different days
        f = folder / f"{name}_environment.json"
        if _here(f):
            try:
                lines += [f"Environment that produced `{name}`: {describe_environment(_load(f))}."]
            except DAMAGE as e:
                raise Damaged(f, e) from None
        elif _here(folder / f"{name}_summary.json"):
            lines += [f"Environment that produced `{name}`: not recorded (it predates "
                      "`<experiment>_environment.json`)."]
    lines.append("")
    lines += ["| claim | paper | ours: accuracy or gain, 95% CI | completions truncated | "
              "model · scale · problems · updates | verdict |", "|---|---|---|---|---|---|"]
    found = False
    for name in EXPERIMENTS:
        f = folder / f"{name}_summary.json"
        if _here(f):
            found = True
            try:
                lines += _accuracy_rows(_load(f), _here(folder / f"{name}_outcomes.csv"))
            except DAMAGE as e:
                raise Damaged(f, e) from None
        else:
            lines.append(f"| {name} | — | not run | — | — | — |")
    f = folder / "ablation_summary.json"
    if _here(f):

        s = _load(f)
        try:
            for v, shares in s["share"].items():
                paper = TOKEN_SHARE.get(v, ("—",))[0]
                paper += " (secondary summary)" if paper != "—" else ""
                ours = ", ".join(f"{100 * x:.1f}%" for x in shares) or "—"
                lines.append(f"| share of signal-group completion tokens in the loss: {v} | {paper} | {ours} (per "
                             f"seed) | — | {s['label']}, {s['task']}, {s['steps']} updates | "
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
    ap.add_argument("--no-rebuild", dest="rebuild", action="store_false",
                    help="write summary.md from the stored summaries without recomputing them from the outcomes")
    ap.add_argument("--no-figures", dest="figures", action="store_false",
                    help="when rebuilding, leave the <task>_gains figures as they are")
    a = ap.parse_args(argv)
    try:
        check_name("--name", a.name)
        if a.out:
            a.out = str(check_out_file(a.out, "--out"))  # not a folder, a FIFO or a device: the summary replaces it
    except TokeneffError as e:
        print(f"tokeneff.analysis.summary: error: {e}", file=sys.stderr)
        return 2
    if a.wall_seconds is not None and a.wall_seconds < 0:
        print(f"tokeneff.analysis.summary: error: --wall-seconds {a.wall_seconds}: must not be negative",
              file=sys.stderr)
        return 2
    folder = Path(a.results) / a.name
    if not folder.is_dir():
        print(f"tokeneff.analysis.summary: error: {str(folder)!r} does not exist (run the notebooks first)",
              file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else (Path(a.results) / "summary.md" if a.name == "embedded"
                                     else folder / "summary.md")
    try:
        if a.wall_seconds is not None:
            record_wall_time(folder, a.part or "all", a.wall_seconds)
        if a.rebuild:
            try:
                rebuild(folder, figures=a.figures)
            except DAMAGE as e:  # a summary's fields or an outcomes table
                raise Damaged(f"a *_summary.json or *_outcomes.csv in {folder}", e) from None
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
