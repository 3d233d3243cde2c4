"""Figures and tables for results/: intervals that fit bounded data, honest labels, atomic files."""

from __future__ import annotations

import io

import pandas as pd

from ..config import WARM_STARTS
from ..utils import atomic_write_bytes
from .stats import DELTA, Interval

MODEL_LABELS = {"smollm2-135m": "SmolLM2-135M-Instruct", "Qwen/Qwen2-1.5B-Instruct": "Qwen2-1.5B-Instruct"}


def model_label(model: str) -> str:
    """`smollm2-135m+sftepoch` -> "SmolLM2-135M + SFT warm start (whole epoch)", as tables and figures show it."""
    for suffix, (_, label) in WARM_STARTS.items():
        if model.endswith(suffix):
            base = model.removesuffix(suffix)
            return f"{'SmolLM2-135M' if base == 'smollm2-135m' else base} + SFT warm start{label}"
    return MODEL_LABELS.get(model, model)


def scale_label(profile: str, model: str, seeds: int) -> str:
    scale = "paper scale (GPU)" if profile == "paper" else f"{profile} scale (CPU, small model)"
    return f"{model_label(model)} · {scale} · {seeds} seed{'s' if seeds != 1 else ''}"


def pct(iv: Interval | None, signed: bool = False) -> str:
    """'40.5% [36.0, 45.0]' or, for a gain, '+7.5 [+2.5, +12.5] pts'."""
    if iv is None:
        return "—"
    if signed:
        return f"{iv.points()} pts"
    return f"{100 * iv.mean:.1f}% [{100 * iv.lo:.1f}, {100 * iv.hi:.1f}]"


def save_figure(fig, path_stem: str) -> list[str]:
    """PNG and SVG, each written atomically; the same figure gives the same bytes (no date, fixed SVG ids), so that
    a rebuild changes a committed figure only where its content changed."""
    import matplotlib

    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        meta = {"Date": None} if ext == "svg" else {}
        with matplotlib.rc_context({"svg.hashsalt": "tokeneff"}):
            fig.savefig(buf, format=ext, dpi=120, bbox_inches="tight", metadata=meta)
        atomic_write_bytes(f"{path_stem}.{ext}", buf.getvalue())
        out.append(f"{path_stem}.{ext}")
    return out


def save_table(df: pd.DataFrame, path_stem: str) -> None:
    """CSV and Markdown, each written atomically."""
    atomic_write_bytes(f"{path_stem}.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(f"{path_stem}.md", (df.to_markdown(index=False) + "\n").encode())


def _palette(variants):
    import seaborn as sns

    return dict(zip(sorted(variants), sns.color_palette("colorblind"), strict=False))


def plot_accuracy(curve: pd.DataFrame, title: str, base: float | None = None, ax=None):
    """Held-out accuracy per evaluated step: mean over seeds and problems, 95% bootstrap band (problems x seeds).

    curve: columns variant, step, mean, lo, hi (claims.accuracy_curve)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    colors = _palette(curve.variant.unique())
    for variant, g in curve.groupby("variant"):
        ax.plot(g.step, g["mean"], marker="o", label=variant, color=colors[variant])
        ax.fill_between(g.step, g.lo, g.hi, alpha=0.15, color=colors[variant])
    if base is not None:
        ax.axhline(base, ls="--", color="gray", label="base model")
    ax.set(xlabel="update step", ylabel="held-out accuracy", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_metric(df: pd.DataFrame, y: str, ylabel: str, title: str, smooth: int = 1, ax=None):
    """A logged metric per step: mean over seeds with seaborn's 95% bootstrap interval over seeds (which stays
    inside the range of the data, unlike a t-interval); `smooth` > 1 averages over a moving window of steps."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    d = df.dropna(subset=[y]).sort_values("step").copy()
    if smooth > 1:
        d[y] = d.groupby(["variant", "seed"])[y].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    # a seeded bootstrap: the same runs draw the same figure
    sns.lineplot(d, x="step", y=y, hue="variant", errorbar=("ci", 95), seed=0, ax=ax,
                 palette=_palette(d.variant.unique()))
    ax.set(xlabel="update step", ylabel=ylabel + (f" (mean of {smooth} steps)" if smooth > 1 else ""), title=title)
    ax.legend(fontsize=8)
    return ax


def plot_gains(arms: dict, title: str, ax=None, delta: float | None = None):
    """Each variant's gain over the base model with its 95% paired interval (arms: claims.arm_intervals, or
    as stored in <task>_summary.json). Accuracy bands of two arms can overlap while their paired difference is
    clear of zero: this panel shows the difference itself."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.6 * len(arms) + 1.6))
    colors = _palette(arms)
    names = list(arms)
    for i, v in enumerate(names):
        g = arms[v]["vs_base"]
        g = Interval(**g) if isinstance(g, dict) else g
        ax.errorbar(100 * g.mean, i, xerr=[[100 * (g.mean - g.lo)], [100 * (g.hi - g.mean)]], fmt="o", capsize=4,
                    color=colors[v])
        ax.annotate(g.points(), (100 * g.hi, i), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0, color="gray", lw=1)
    ax.axvline(100 * (DELTA if delta is None else delta), color="gray", lw=1, ls=":")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.invert_yaxis()
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.35 * (hi - lo))  # room for the labels
    ax.set(xlabel="gain over the base model (accuracy points; dotted: +2, the practical margin)", title=title)
    return ax
