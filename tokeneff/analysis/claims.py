"""The paper's claims about each task, and the arithmetic from per-problem outcomes to intervals and verdicts.

Shared by the notebooks' experiments (experiments.py) and by `python -m tokeneff.analysis.summary`, which rebuilds
every interval and verdict from the committed outcome files with these same functions: one definition of each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..errors import show
from .report import pct
from .stats import DELTA, N_BOOT, Interval, paired_bootstrap, verdict

# The paper's reported results, shown beside ours and never mixed with them. Each accuracy claim is
# (variant, compared with, expected: "gain" | "no gain" | None for not reported, the paper's words).
# "X above grpo" is implied by the paper (X gains, full-token GRPO does not), not stated as a number.
PAPER_BASE = {"svamp": "46% (Qwen2-1.5B)", "multiplication": "not reported"}


CLAIMS: dict[str, list[tuple[str, str, str | None, str]]] = {
    "svamp": [("sgrpo", "base", "gain", "46% → over 70%"), ("tspmo", "base", "gain", "46% → over 70%"),
              ("grpo", "base", "no gain", "no gain over the base model"),
              ("sgrpo", "grpo", "gain", "above full-token GRPO (implied)"),
              ("tspmo", "grpo", "gain", "above full-token GRPO (implied)")],
    "multiplication": [("tspmo", "base", "gain", "strong gain"), ("grpo", "base", "no gain", "no gain over base"),
                       ("tspmo", "grpo", "gain", "above full-token GRPO (implied)"),
                       ("sgrpo", "base", None, "not reported"), ("tspmo-noreplay", "base", None, "not reported")],
}


# Share of completion tokens that carry loss, relative to full-token GRPO: (low, high) bounds the paper gives.
TOKEN_SHARE = {"grpo": ("100%", 1.0, 1.0), "sgrpo": ("30–50%", 0.30, 0.50), "tspmo": ("< 5%", 0.0, 0.05)}


def outcomes(records: list[dict[str, Any]], ids: list[str], key: str = "correct") -> np.ndarray:
    """0/1 outcome per problem, in the order of `ids` (the pairing across arms); key="truncated": whether the
    completion hit the token budget."""
    by_id = {r["id"]: float(r[key]) for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"evaluation lacks problem {missing[0]!r}: arms must be evaluated on the same problems")
    return np.array([by_id[i] for i in ids])


def outcomes_table(by_step: dict[int, dict[str, np.ndarray]], experiment: str, seeds: list[int], ids: list[str],
                   base_vec: np.ndarray, truncated: dict[int, dict[str, np.ndarray]] | None = None,
                   base_truncated: np.ndarray | None = None) -> pd.DataFrame:
    """Every evaluation's per-problem outcome (the base model at step 0): the data behind every interval, so that a
    reader can recompute them (`python -m tokeneff.analysis.summary`) or test another question without rerunning
    anything. by_step: step -> variant -> [seeds, problems] outcomes (`grid_outcomes` at that step); truncated,
    base_truncated: the same for whether each completion hit the token budget (a `truncated` column)."""
    cols = ["experiment", "variant", "seed", "step", "id", "correct"]

    def frame(v, s, step, row, cut):
        d = dict(variant=v, seed=s, step=step, id=ids, correct=row.astype(int))
        return pd.DataFrame(d if cut is None else dict(d, truncated=cut.astype(int)))

    frames = [frame("base", 0, 0, base_vec, base_truncated)]
    for step, arms in by_step.items():
        for v, a in arms.items():
            cut = truncated[step][v] if truncated is not None else [None] * len(seeds)
            frames += [frame(v, s, step, row, c) for s, row, c in zip(seeds, a, cut, strict=True)]
    return pd.concat(frames, ignore_index=True).assign(experiment=experiment)[
        cols + (["truncated"] if truncated is not None else [])]


def arms_from_table(table: pd.DataFrame, variants: list[str], seeds: list[int], column: str = "correct"
                    ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None:
    """The inverse of `outcomes_table` at each variant's last evaluated step: (problem ids in the base model's
    order, the base model's outcomes, variant -> [seeds, problems]). None if the table has no `column` (outcome
    files written before the `truncated` column)."""
    if column not in table.columns:
        return None
    values = pd.to_numeric(table[column], errors="coerce")  # an outcome is 0 or 1 (True/False): nothing else
    bad = table[column][~values.isin([0, 1])]
    if len(bad):
        raise ValueError(f"column {column!r} holds {show(bad.iloc[0])} (row {bad.index[0] + 2}): outcomes are 0 or 1")
    base = table[table.variant == "base"]
    ids = base.id.tolist()
    out = {}
    for v in variants:
        t = table[table.variant == v]
        last = t[t.step == t.step.max()]
        out[v] = np.stack([last[last.seed == s].set_index("id").loc[ids, column].to_numpy(float) for s in seeds])
    return ids, base[column].to_numpy(float), out


def arm_intervals(final: dict[str, np.ndarray], base_vec: np.ndarray, shares: dict[str, list[float]],
                  n_boot: int = N_BOOT, truncated: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: accuracy, gain over the base model and over full-token GRPO (paired bootstrap intervals), the
    token shares per seed, and the share of its completions cut off by the token budget (None: not recorded)."""
    def iv(a, b=None) -> Interval:
        return paired_bootstrap(a, b, n_boot=n_boot)

    return {v: dict(accuracy=iv(a), vs_base=iv(a, base_vec),
                    vs_grpo=iv(a, final["grpo"]) if "grpo" in final and v != "grpo" else None,
                    token_share=list(shares.get(v, [])),
                    truncated=float(truncated[v].mean()) if truncated is not None else None)
            for v, a in final.items()}


def rate(x: float | None) -> str:
    """A share of completions as '12.3%', or '—' where it was not recorded."""
    return "—" if x is None else f"{100 * x:.1f}%"


def final_table(arms: dict[str, dict[str, Any]], label: str) -> pd.DataFrame:
    """<task>_final: accuracy, gains and truncation per variant (arms: `arm_intervals`, or as stored in JSON)."""
    def as_iv(x):
        return Interval(**x) if isinstance(x, dict) else x

    return pd.DataFrame([dict(variant=v, accuracy=pct(as_iv(a["accuracy"])),
                              gain_vs_base=pct(as_iv(a["vs_base"]), True), gain_vs_grpo=pct(as_iv(a["vs_grpo"]), True),
                              truncated=rate(a.get("truncated")),
                              token_share=f"{100 * np.mean(a['token_share']):.0f}%" if a["token_share"] else "—",
                              scale=label) for v, a in arms.items()])


def claim_verdicts(task: str, arms: dict[str, dict[str, Any]], delta: float = DELTA) -> list[dict[str, str]]:
    """Each of the paper's claims about `task` with our interval and the verdict it supports. `arms` maps a variant
    to its intervals (`vs_base`, `vs_grpo`: Interval or its dict, as stored in <task>_summary.json)."""
    out = []
    for v, ref, expect, paper in CLAIMS.get(task, []):
        d = arms.get(v, {}).get("vs_base" if ref == "base" else "vs_grpo")
        if d is None:
            continue
        d = d if isinstance(d, Interval) else Interval(**d)
        # one run: the interval resamples problems only, run-to-run variation is not in it, so no verdict
        said = ("not tested (1 seed)" if d.seeds < 2 else verdict(d, expect, delta)) if expect else "—"
        out.append(dict(claim=f"{v} vs {'the base model' if ref == 'base' else 'full-token GRPO'}", paper=paper,
                        ours=pct(d, signed=True), verdict=said))
    return out


def share_verdict(shares: list[float], lo: float, hi: float) -> str:
    """Every seed inside the paper's range: holds; every seed outside it: contradicted; else unresolved."""
    if not shares:
        return "—"
    inside = [lo - 1e-9 <= x <= hi + 1e-9 for x in shares]
    return "holds" if all(inside) else ("contradicted" if not any(inside) else "unresolved (seeds disagree)")


def token_share(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed): credited tokens / tokens of the groups with reward variance. Groups whose rewards are
    all equal carry no loss under any algorithm, so this is the share the paper compares (GRPO = 100%)."""
    g = df[df.step > 0].groupby(["variant", "seed"])
    signal = g.tokens_in_signal_groups.sum()
    return (g.tokens_in_loss.sum() / signal.where(signal > 0)).rename("share").reset_index()  # NaN: no signal


def accuracy_curve(by_step: dict[int, dict[str, np.ndarray]], variants: list[str],
                   base_vec: np.ndarray) -> pd.DataFrame:
    """Accuracy at every evaluated step with a 95% bootstrap interval over problems and seeds; base at step 0.
    by_step: step -> variant -> [seeds, problems] outcomes (`grid_outcomes` at that step)."""
    b = paired_bootstrap(base_vec)
    rows = [dict(variant=v, step=0, mean=b.mean, lo=b.lo, hi=b.hi) for v in variants]
    for step, arms in by_step.items():
        for v, a in arms.items():
            iv = paired_bootstrap(a)
            rows.append(dict(variant=v, step=step, mean=iv.mean, lo=iv.lo, hi=iv.hi))
    return pd.DataFrame(rows)
