"""results/summary.md: each claim of the paper beside our number, with model, scale, seeds and 95% CI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report import fmt_ci, mean_ci
from .utils import atomic_write_bytes


def _verdict(ours: list[float], base: float, expect_gain: bool) -> str:
    m, h, n = mean_ci(ours)
    if n < 2 or h != h:
        return "inconclusive (too few seeds)"
    lo, hi = m - h, m + h
    if expect_gain:
        return "yes" if lo > base else ("no gain at this budget" if hi <= base else "inconclusive (CI spans base)")
    return "yes (no gain)" if lo <= base else "no (it gained)"


def build(results: Path, profile: str, wall_seconds: int | None = None) -> str:
    d = results / profile
    lines = [f"# Summary — profile `{profile}`", "",
             "Paper: Lee & Tong, *Token-Efficient RL for LLM Reasoning* (arXiv 2504.20834), Qwen2-1.5B + LoRA. "
             "Our numbers are from the runs in this folder; mean ± 95% t-interval over seeds. "
             "Embedded-scale numbers are **not** the paper's numbers: different model (SmolLM2-135M), CPU budget "
             "of a few updates.", ""]
    if wall_seconds:
        lines += [f"`make reproduce PROFILE={profile}` wall time: {wall_seconds / 60:.1f} min.", ""]
    lines += ["| claim | paper | ours (model, scale, seeds, 95% CI) | holds at our scale? |", "|---|---|---|---|"]
    for task, name in (("svamp", "SVAMP"), ("multiplication", "Multiplication")):
        f = d / f"{task}_summary.json"
        if not f.is_file():
            lines.append(f"| {name} | — | not run | — |")
            continue
        s = json.loads(f.read_text())
        base, label = s["base"], s["label"]
        paper_base = "46%" if task == "svamp" else "not given"
        lines.append(f"| {name}: base model accuracy | {paper_base} | {base:.1%} ({label}, {s['eval_limit'] or 'all'} "
                     f"held-out problems) | — |")
        for algo, paper, gain in (("sgrpo", ">70%" if task == "svamp" else "not reported", True),
                                  ("tspmo", ">70%" if task == "svamp" else "strong gain", True),
                                  ("grpo", "no gain over base", False)):
            if algo not in s["final"]:
                continue
            lines.append(f"| {name}: {algo} after {s['steps']} updates | {paper} | {fmt_ci(s['final'][algo])} "
                         f"({label}) | {_verdict(s['final'][algo], base, gain)} |")
        if "tspmo-noreplay" in s["final"]:
            lines.append(f"| {name}: tspmo without replay | not reported | {fmt_ci(s['final']['tspmo-noreplay'])} "
                         f"({label}) | — |")
    f = d / "ablation_summary.json"
    if f.is_file():
        # Groups whose rewards are all equal carry no loss under any algorithm, so the share of *all* sampled
        # tokens understates what the paper counts; the ratio to full-token GRPO (which credits every token of
        # every group with signal) is the comparable number.
        s = json.loads(f.read_text())
        grpo_mean = mean_ci(s["share"].get("grpo", []))[0]
        for algo, paper in (("grpo", "100%"), ("sgrpo", "30–50%"), ("tspmo", "< 5%")):
            vals = s["share"].get(algo, [])
            if not vals:
                continue
            rel = mean_ci(vals)[0] / grpo_mean if grpo_mean else float("nan")
            ok = {"grpo": True, "sgrpo": 0.3 <= rel <= 0.5, "tspmo": rel < 0.05}[algo]
            lines.append(f"| share of completion tokens in the loss: {algo} | {paper} | {fmt_ci(vals)} of all sampled "
                         f"tokens = {rel:.0%} of full-token GRPO's ({s['label']}) | {'yes' if ok else 'no'} |")
    full = [(n, json.loads((d / n).read_text())) for n in ("base_full_svamp.json", "base_full_multiplication_2x1.json")
            if (d / n).is_file()]
    if full:  # written by `tokeneff evaluate` on the whole test sets; the notebooks use subsets
        lines += ["", "Base model on the full held-out sets (`tokeneff evaluate`, greedy): " + "; ".join(
            f"{r['task']} {r['accuracy']:.1%} on {r['n']} problems (`{n}`)" for n, r in full) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokeneff.summary")
    ap.add_argument("--profile", default="embedded")
    ap.add_argument("--results", default="results")
    ap.add_argument("--wall-seconds", type=int)
    a = ap.parse_args(argv)
    text = build(Path(a.results), a.profile, a.wall_seconds)
    atomic_write_bytes(Path(a.results) / "summary.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
