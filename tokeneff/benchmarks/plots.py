"""Figures of notebook 04 from the benchmark tables (bench.load_results, bench.load_versus): each names its model
and device, with tick labels and titles that do not overlap. Re-rendered from the committed files by
`python -m tokeneff.benchmarks.plots` without rerunning a benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def plot_versus(g):
    """Whole training steps, TRL's GRPOTrainer vs ours on one device (rows of bench.load_versus)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    sns.barplot(g, x="side", y="warm_step_seconds", ax=axes[0])
    sns.barplot(g, x="side", y="peak_above_weights_mb", ax=axes[1])
    axes[0].set(title="Seconds per step (after the first)", ylabel="seconds", xlabel="")
    axes[1].set(title="Peak memory above the weights", ylabel="MiB", xlabel="")
    return _finish(fig, axes, f"{model_name(g)} — {g.device.iloc[0]}: TRL GRPOTrainer vs tokeneff, same settings")


def plot_ladder(g):
    """Which change saves what, one device and completion length (the `ladder` suite of bench.load_results)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    sns.barplot(g, x="variant", y="peak_memory_mb", hue="algo", ax=axes[0])
    sns.barplot(g, x="variant", y="step_seconds", hue="algo", ax=axes[1])
    axes[0].set(title="Peak memory above the weights", ylabel="MiB", xlabel="")
    axes[1].set(title="Step time", ylabel="seconds", xlabel="")
    L = g.completion_len.iloc[0]
    return _finish(fig, axes, f"{model_name(g)} — {g.device.iloc[0]}: one training step, completions of {L} tokens")


def plot_growth(g):
    """Cost against completion length and group size on one device (the `growth` suite)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    sns.lineplot(g, x="completion_len", y="peak_memory_mb", hue="algo", style="group_size", marker="o", ax=axes[0])
    sns.lineplot(g, x="completion_len", y="step_seconds", hue="algo", style="group_size", marker="o", ax=axes[1])
    axes[0].set(title="Memory growth", ylabel="MiB above the weights", xlabel="completion length", xscale="log")
    axes[1].set(title="Step-time growth", ylabel="seconds", xlabel="completion length", xscale="log")
    fig.suptitle(f"{model_name(g)} — {g.device.iloc[0]}: one training step", fontsize=11)
    return fig


def render_committed(committed: str | Path = "results/benchmarks", results_dir: str | Path = "results") -> list[str]:
    """The ladder, growth and vs-TRL figures and tables of notebook 04 from the committed benchmark files only."""
    from ..analysis.report import save_figure, save_table
    from .bench import VERSUS_COLUMNS, load_results, load_versus

    out, written = Path(results_dir), []
    df = load_results(committed)
    for (device, _L), g in df[df.suite == "ladder"].groupby(["device", "completion_len"]):
        written += save_figure(plot_ladder(g), str(out / f"memory_ladder_{device.split()[0].lower()}"))
    for device, g in df[df.suite == "growth"].groupby("device"):
        written += save_figure(plot_growth(g), str(out / f"cost_growth_{device.split()[0].lower()}"))
    vs = load_versus(committed)
    for device, g in vs.groupby("device"):
        written += save_figure(plot_versus(g), str(out / f"vs_trl_{device.split()[0].lower()}"))
    save_table(vs[VERSUS_COLUMNS], str(out / "vs_trl"))
    return written + [str(out / "vs_trl.md")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokeneff.benchmarks.plots", description=render_committed.__doc__)
    ap.add_argument("--committed", default="results/benchmarks")
    ap.add_argument("--results", default="results")
    a = ap.parse_args(argv)
    print("\n".join(render_committed(a.committed, a.results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
