"""Figures and tables for results/: confidence intervals, honest labels, atomic files."""

from __future__ import annotations

import io
import math

import pandas as pd

from .utils import atomic_write_bytes

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values) -> tuple[float, float, int]:
    """Mean and half-width of a 95% t-interval over seeds (nan half-width with one seed)."""
    vals = [float(v) for v in values if v == v]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(vals) / n
    if n == 1:
        return m, float("nan"), 1
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return m, T95.get(n - 1, 1.96) * sd / math.sqrt(n), n


def fmt_ci(values, pct: bool = True) -> str:
    m, h, n = mean_ci(values)
    k = 100 if pct else 1
    unit = "%" if pct else ""
    if n == 0:
        return "n/a"
    return f"{m * k:.1f}{unit} ± {h * k:.1f} (n={n})" if n > 1 else f"{m * k:.1f}{unit} (n=1)"


def scale_label(profile: str, model: str, seeds: int) -> str:
    scale = "embedded scale (CPU, small model)" if profile == "embedded" else "paper scale"
    return f"{model} · {scale} · {seeds} seed{'s' if seeds != 1 else ''}"


def save_figure(fig, path_stem: str) -> list[str]:
    """PNG and SVG, each written atomically."""
    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120, bbox_inches="tight")
        atomic_write_bytes(f"{path_stem}.{ext}", buf.getvalue())
        out.append(f"{path_stem}.{ext}")
    return out


def save_table(df: pd.DataFrame, path_stem: str) -> None:
    """CSV and Markdown, each written atomically."""
    atomic_write_bytes(f"{path_stem}.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(f"{path_stem}.md", (df.to_markdown(index=False) + "\n").encode())


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, seed): accuracy at the last evaluated step."""
    ev = df.dropna(subset=["eval_accuracy"]).sort_values("step")
    return ev.groupby(["variant", "seed"], as_index=False).last()[["variant", "seed", "step", "eval_accuracy"]]


def curve_table(df: pd.DataFrame, y: str) -> pd.DataFrame:
    """Per (variant, step): mean and 95% t-interval of `y` over seeds."""
    rows = []
    for (variant, step), g in df.dropna(subset=[y]).groupby(["variant", "step"]):
        m, h, n = mean_ci(g[y])
        rows.append(dict(variant=variant, step=step, mean=m, lo=m - h if h == h else m, hi=m + h if h == h else m,
                         n=n))
    return pd.DataFrame(rows)


def plot_curves(df: pd.DataFrame, y: str, ylabel: str, title: str, base: float | None = None, ax=None):
    """Mean over seeds with a 95% confidence band; the base model as a dashed line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    tab = curve_table(df, y)
    palette = dict(zip(sorted(tab.variant.unique()), sns.color_palette("colorblind"), strict=False))
    for variant, g in tab.groupby("variant"):
        ax.plot(g.step, g["mean"], marker="o", label=variant, color=palette[variant])
        ax.fill_between(g.step, g.lo, g.hi, alpha=0.2, color=palette[variant])
    if base is not None:
        ax.axhline(base, ls="--", color="gray", label="base model")
    ax.set(xlabel="update step", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return ax
