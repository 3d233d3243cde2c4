"""Notebook 04's figures, re-rendered from the committed benchmark files: readable and naming their model."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from tokeneff.benchmarks.bench import load_results, load_versus  # noqa: E402
from tokeneff.benchmarks.plots import plot_growth, plot_ladder, plot_versus  # noqa: E402

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "benchmarks"


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _check(fig, model: str):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert model in fig._suptitle.get_text()
    titles = [ax.title.get_window_extent(r) for ax in fig.axes if ax.get_title()]
    assert not any(_overlap(a, b) for i, a in enumerate(titles) for b in titles[i + 1:]), "panel titles overlap"
    for ax in fig.axes:
        ticks = [t.get_window_extent(r) for t in ax.get_xticklabels() if t.get_text()]
        assert not any(_overlap(a, b) for a, b in zip(ticks, ticks[1:], strict=False)), "tick labels overlap"


def test_committed_benchmark_figures_are_readable_and_name_the_model():
    vs = load_versus(COMMITTED)
    for _, g in vs.groupby("device"):
        _check(plot_versus(g), g.model.iloc[0])
    # T-SPMO's H200 ratios are against its own TRL rerun, and the table says so
    row = vs[(vs.device == "NVIDIA H200") & (vs.side == "tokeneff-tspmo")].iloc[0]
    assert "vs_trl_h200_qwen2-1.5b_tspmo" in row.ratios_against
    df = load_results(COMMITTED)
    for _, g in df[df.suite == "ladder"].groupby(["device", "completion_len"]):
        _check(plot_ladder(g), "tiny-random (random Qwen2, 4 layers × 256, vocabulary 151,936)")
    for _, g in df[df.suite == "growth"].groupby("device"):
        _check(plot_growth(g), "tiny-random")


def test_notebook_panels_rebuild_the_committed_tables_and_say_what_is_missing(tmp_path, capsys):
    """render_committed (notebook 04's panels from the committed files) gives back the committed tables byte for
    byte, one figure per device; a suite without rows names the command that makes it and writes nothing."""
    from tokeneff.benchmarks.plots import render_committed, save_panel

    written = render_committed(COMMITTED, tmp_path)
    results = COMMITTED.parent
    for stem in ("memory_ladder", "cost_growth", "vs_trl"):
        assert (tmp_path / f"{stem}.md").read_bytes() == (results / f"{stem}.md").read_bytes()
    assert {Path(w).name for w in written} >= {"vs_trl_cpu.png", "vs_trl_nvidia.png", "memory_ladder_cpu.png"}
    empty = load_versus(COMMITTED).iloc[:0]
    assert save_panel(empty, "versus", tmp_path / "none") == [] and not (tmp_path / "none").exists()
    assert "tokeneff bench --vs-trl" in capsys.readouterr().out
