"""Figures of notebook 04 from the benchmark tables (bench.load_results, bench.load_versus): each names its model
and device, with tick labels and titles that do not overlap. Re-rendered from the committed files by
`python -m tokeneff.benchmarks.plots` without rerunning a benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.report import save_figure, save_table
from .bench import VERSUS_COLUMNS, load_results, load_versus


def model_name(g) -> str:
    """The model of a benchmark table; tiny-random is bench._model's: random Qwen2, 4 layers, width 256, with the
    vocabulary it was given (its cost is mostly the LM head)."""
    names = []
    for m in g.model.unique():
        vocab = g[g.model == m].vocab_size.dropna().unique() if "vocab_size" in g else []
        tiny = m == "tiny-random" and len(vocab) == 1
        names.append(f"{m} (random Qwen2, 4 layers × 256, vocabulary {int(vocab[0]):,})" if tiny else m)
    return ", ".join(names)


def _finish(fig, axes, suptitle: str):
    """Category names on two lines ('tokeneff-sgrpo' -> 'tokeneff / sgrpo'), so that neighbours never collide."""
    for ax in axes:
        ax.set_xticks(ax.get_xticks(), [t.get_text().replace("-", "\n", 1) for t in ax.get_xticklabels()])
    fig.suptitle(suptitle, fontsize=11)
    return fig


def _two_panels():
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    return plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")


def plot_memory_speed(g):
    """Memory and time of one training step against completion length on one device (the `default` suite)."""
    import seaborn as sns

    fig, axes = _two_panels()
    sns.lineplot(g, x="completion_len", y="peak_memory_mb", hue="algo", style="model", marker="o", ax=axes[0])
    sns.lineplot(g, x="completion_len", y="step_seconds", hue="algo", style="model", marker="o", ax=axes[1])
    axes[0].set(title="Training-step memory above the weights", ylabel="MiB", xlabel="completion length")
    axes[1].set(title="Training-step time", ylabel="seconds", xlabel="completion length")
    fig.suptitle(f"{model_name(g)} — {g.device.iloc[0]}: one training step", fontsize=11)
    return fig


def plot_versus(g):
    """Whole training steps, TRL's GRPOTrainer vs ours on one device (rows of bench.load_versus)."""
    import seaborn as sns

    fig, axes = _two_panels()
    sns.barplot(g, x="side", y="warm_step_seconds", ax=axes[0])
    sns.barplot(g, x="side", y="peak_above_weights_mb", ax=axes[1])
    axes[0].set(title="Seconds per step (after the first)", ylabel="seconds", xlabel="")
    axes[1].set(title="Peak memory above the weights", ylabel="MiB", xlabel="")
    return _finish(fig, axes, f"{model_name(g)} — {g.device.iloc[0]}: TRL GRPOTrainer vs tokeneff, same settings")


def plot_ladder(g):
    """Which change saves what, one device and completion length (the `ladder` suite of bench.load_results)."""
    import seaborn as sns

    fig, axes = _two_panels()
    sns.barplot(g, x="variant", y="peak_memory_mb", hue="algo", ax=axes[0])
    sns.barplot(g, x="variant", y="step_seconds", hue="algo", ax=axes[1])
    axes[0].set(title="Peak memory above the weights", ylabel="MiB", xlabel="")
    axes[1].set(title="Step time", ylabel="seconds", xlabel="")
    L = g.completion_len.iloc[0]
    return _finish(fig, axes, f"{model_name(g)} — {g.device.iloc[0]}: one training step, completions of {L} tokens")


def plot_growth(g):
    """Cost against completion length and group size on one device (the `growth` suite)."""
    import seaborn as sns

    fig, axes = _two_panels()
    sns.lineplot(g, x="completion_len", y="peak_memory_mb", hue="algo", style="group_size", marker="o", ax=axes[0])
    sns.lineplot(g, x="completion_len", y="step_seconds", hue="algo", style="group_size", marker="o", ax=axes[1])
    axes[0].set(title="Memory growth", ylabel="MiB above the weights", xlabel="completion length", xscale="log")
    axes[1].set(title="Step-time growth", ylabel="seconds", xlabel="completion length", xscale="log")
    fig.suptitle(f"{model_name(g)} — {g.device.iloc[0]}: one training step", fontsize=11)
    return fig


_STEP = ["device", "model", "algo", "group_size", "completion_len", "peak_memory_mb", "step_seconds",
         "frac_tokens_in_loss"]
# Notebook 04's panels, one entry per benchmark suite: (figure, file stem, table, what to run when it is missing).
# Figures are one per device (and, for the ladder, per completion length when a device has several).
PANELS = {
    "default": (plot_memory_speed, "memory_speed", lambda g: g[_STEP], "tokeneff bench"),
    "ladder": (plot_ladder, "memory_ladder",
               lambda g: g.pivot_table(index=["device", "completion_len", "variant"], columns="algo",
                                       values="peak_memory_mb", sort=False).reset_index(),
               "tokeneff bench --ladder --name ladder --completion-lens 256"),
    "growth": (plot_growth, "cost_growth", lambda g: g[_STEP], "tokeneff bench --name growth --completion-lens "
               "256,512,1024 --group-sizes 8,16"),
    "versus": (plot_versus, "vs_trl", None, "tokeneff bench --vs-trl --model smollm2-135m"),
}


def save_panel(rows, suite: str, results_dir: str | Path) -> list[str]:
    """One suite's figures (one per device) and table, written into results_dir; `rows` are that suite's rows
    (bench.load_results filtered by suite, or bench.load_versus). Says what to run when there are none."""
    plot, stem, table, command = PANELS[suite]
    if rows.empty:
        print(f"no {suite} benchmark file yet: {command}")
        return []
    out, written = Path(results_dir), []
    for device, g in rows.groupby("device"):
        lengths = sorted(g.completion_len.unique()) if suite == "ladder" else [None]
        for L in lengths:
            part = g if L is None else g[g.completion_len == L]
            name = f"{stem}_{device.split()[0].lower()}" + (f"_{L}" if len(lengths) > 1 else "")
            written += save_figure(plot(part), str(out / name))
    save_table(rows[VERSUS_COLUMNS] if table is None else table(rows), str(out / stem))
    return written + [str(out / f"{stem}.md")]


def render_committed(committed: str | Path = "results/benchmarks", results_dir: str | Path = "results") -> list[str]:
    """The ladder, growth and vs-TRL figures and tables of notebook 04 from the committed benchmark files only."""
    df = load_results(committed)
    return (save_panel(df[df.suite == "ladder"], "ladder", results_dir)
            + save_panel(df[df.suite == "growth"], "growth", results_dir)
            + save_panel(load_versus(committed), "versus", results_dir))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokeneff.benchmarks.plots", description=render_committed.__doc__)
    ap.add_argument("--committed", default="results/benchmarks")
    ap.add_argument("--results", default="results")
    a = ap.parse_args(argv)
    print("\n".join(render_committed(a.committed, a.results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
