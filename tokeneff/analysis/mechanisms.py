"""Did the mechanisms act? Where credit falls in the answer, whether replayed groups carry a comparison, how deep
replay cuts, and each algorithm's token share, from the per-step diagnostics in metrics.jsonl (tokeneff/mechanisms.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..mechanisms import POS_BIN
from .claims import token_share
from .report import save_figure, save_table


def _sum_lists(series: pd.Series) -> np.ndarray:
    rows = [np.asarray(x, dtype=float) for x in series if isinstance(x, list)]
    if not rows:
        return np.zeros(0)
    n = max(len(r) for r in rows)
    return np.sum([np.pad(r, (0, n - len(r))) for r in rows], axis=0)


def mechanism_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per variant, over its seeds and updates (step > 0 rows of a grid's metrics)."""
    rows = []
    for v, d in df[df.step > 0].groupby("variant", sort=False):
        if "credit_pos_hist" not in d:
            continue
        hist = _sum_lists(d.credit_pos_hist)
        pos = (np.arange(len(hist)) + 0.5) * POS_BIN
        cuts = [c for x in d.replay_cut_tokens if isinstance(x, list) for c in x]
        # whole answers: a replayed group's completions continue its prefix, and positions count from the answer's start
        prefix = d.replay_cut_tokens.map(lambda x: sum(x) if isinstance(x, list) else 0)
        answer_len = float((d.completion_len_mean + prefix / (d.groups_fresh + d.groups_replayed)).mean())
        late = hist[pos >= answer_len / 2].sum() / hist.sum() if hist.sum() else float("nan")
        share = token_share(d).share  # per seed, the same share as the accuracy table's
        fresh, replayed = d.groups_fresh.sum(), d.groups_replayed.sum()
        rows.append(dict(
            variant=v, seeds=int(d.seed.nunique()),
            token_share=f"{100 * share.mean():.1f}%",
            credited_tokens_per_update=f"{d.tokens_in_loss.mean():.0f}",
            credit_in_answer_second_half=f"{100 * late:.0f}%",
            fresh_groups_with_signal=f"{100 * d.groups_fresh_signal.sum() / fresh:.0f}% of {fresh}" if fresh else "—",
            replayed_groups_with_signal=(f"{100 * d.groups_replayed_signal.sum() / replayed:.0f}% of {replayed}"
                                         if replayed else "—"),
            replay_cut_tokens=f"{np.mean(cuts):.1f} (median {np.median(cuts):.0f})" if cuts else "—",
            new_tokens=f"{d.completion_len_mean.mean():.1f}", answer_tokens=f"{answer_len:.1f}"))
    return pd.DataFrame(rows)


def plot_mechanisms(df: pd.DataFrame, title: str):
    """Three panels: where credited tokens fall in the answer; groups with reward variance, fresh vs replayed;
    replay's cut depth."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    d = df[df.step > 0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for v, g in d.groupby("variant", sort=False):
        hist = _sum_lists(g.credit_pos_hist)
        if hist.sum():
            axes[0].plot(np.arange(len(hist)) * POS_BIN, hist / hist.sum(), marker=".", label=v)
    axes[0].set(title="Where credited tokens fall in the answer", xlabel=f"position in the answer (tokens, bins of "
                f"{POS_BIN})", ylabel="share of the variant's credited tokens")
    axes[0].legend()
    bars = []
    for v, g in d.groupby("variant", sort=False):
        for kind in ("fresh", "replayed"):
            n = g[f"groups_{kind}"].sum()
            if n:
                bars.append(dict(variant=v, groups=kind, share=g[f"groups_{kind}_signal"].sum() / n))
    if bars:
        sns.barplot(pd.DataFrame(bars), x="variant", y="share", hue="groups", ax=axes[1])
    axes[1].set(title="Groups with unequal rewards (a comparison)", ylabel="share of groups", ylim=(0, 1))
    cuts = pd.DataFrame([dict(variant=v, cut=c) for v, g in d.groupby("variant", sort=False)
                         for x in g.replay_cut_tokens if isinstance(x, list) for c in x])
    if len(cuts):
        sns.histplot(cuts, x="cut", hue="variant", binwidth=POS_BIN, ax=axes[2], stat="count")
    axes[2].set(title="How deep replay cuts", xlabel="replayed prefix (tokens)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def mechanism_report(df: pd.DataFrame, title: str, out_stem: str) -> tuple[pd.DataFrame, object]:
    """Table and figure, written to `<out_stem>.{csv,md,png,svg}`."""
    table = mechanism_table(df)
    fig = plot_mechanisms(df, title)
    save_table(table, out_stem)
    save_figure(fig, out_stem)
    return table, fig
