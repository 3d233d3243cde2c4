"""results/summary.md: verdicts recomputed from the stored intervals, and wall times kept per part of a tier."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tokeneff.analysis.summary import build, main

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _summary(folder, lo, hi, seeds=2):
    iv = dict(mean=(lo + hi) / 2, lo=lo, hi=hi, seeds=seeds, problems=200)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multiplication_summary.json").write_text(json.dumps(dict(
        task="multiplication", label="tiny", problems=200, steps=30, seeds=[0, 1], paper_base="not reported",
        base=dict(accuracy=0.33, n=200), arms={"tspmo": dict(accuracy=iv, vs_base=iv, vs_grpo=None)})))
    # build() audits only tasks with per-problem outcomes beside them (their content is rebuild()'s business)
    (folder / "multiplication_outcomes.csv").write_text("experiment,variant,seed,step,id,correct\n")


def test_verdict_follows_the_stored_interval(tmp_path):
    _summary(tmp_path / "a", 0.01, 0.09)
    assert "| multiplication: tspmo vs the base model | strong gain | +5.0 [+1.0, +9.0] pts" in build(tmp_path / "a")
    assert "| **holds** |" in build(tmp_path / "a")
    _summary(tmp_path / "b", -0.06, 0.04)
    assert "**unresolved (± 5.0 points)**" in build(tmp_path / "b")
    _summary(tmp_path / "c", 0.01, 0.09, seeds=1)  # one run: the interval is clear of zero, but no verdict
    assert "| +5.0 [+1.0, +9.0] pts |" in build(tmp_path / "c")
    assert "| **not tested (1 seed)** |" in build(tmp_path / "c") and "| **holds** |" not in build(tmp_path / "c")
    assert "| **not tested (1 seed)** |" not in build(tmp_path / "a")


def test_wall_time_of_each_part_is_kept(tmp_path):
    _summary(tmp_path / "full", 0.01, 0.09)
    args = ["--results", str(tmp_path), "--name", "full", "--no-rebuild"]
    assert main([*args, "--part", "svamp", "--wall-seconds", "600"]) == 0
    assert main([*args, "--part", "multiplication", "--wall-seconds", "1200"]) == 0
    text = (tmp_path / "full" / "summary.md").read_text()
    assert "Wall time of its svamp part: 10.0 min" in text and "Wall time of its multiplication part: 20.0 min" in text
    # a rerun of one part replaces that part's time only
    main([*args, "--part", "svamp", "--wall-seconds", "300"])
    text = (tmp_path / "full" / "summary.md").read_text()
    assert "svamp part: 5.0 min" in text and "multiplication part: 20.0 min" in text


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["--results", str(tmp_path), "--name", "nothing"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_damaged_summary_or_wall_time_files_are_one_line(tmp_path, capsys):
    folder = tmp_path / "embedded"
    for name, content in (("multiplication_summary.json", '{"task": "multipl'),  # cut off
                          ("multiplication_summary.json", "[1, 2]"),
                          ("multiplication_summary.json", json.dumps(dict(task="multiplication", arms={}))),
                          ("wall_times.json", '{"all": {"seconds"'),  # cut off
                          ("ablation_summary.json", "NaN")):
        _summary(folder, 0.01, 0.09)
        (folder / "wall_times.json").unlink(missing_ok=True)
        (folder / name).write_text(content)
        for extra in ([], ["--wall-seconds", "5"]):
            assert main(["--results", str(tmp_path), "--no-rebuild", *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"{name}' is damaged" in err, err
        (folder / name).unlink()
    _summary(folder, 0.01, 0.09)  # its outcomes table holds no problem: the rebuild says so in one line
    assert main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err and "0 problems" in err, err


@pytest.mark.parametrize("under,tier,summary_md", [
    ("", "embedded", "summary.md"), ("", "embedded-full", "embedded-full/summary.md"),
    ("embedded-full", "svamp-sftepoch", "svamp-sftepoch/summary.md"),  # the SVAMP grid from the earlier warm start
])
def test_committed_summaries_equal_what_the_outcomes_rebuild(tmp_path, under, tier, summary_md):
    # a copy of the tier whose summaries lose every interval, verdict and base accuracy wherever an outcomes file
    # exists: the command must restore the committed files from the per-problem outcomes alone
    src = RESULTS / under / tier
    dst = tmp_path / tier
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.png", "*.svg", "notebooks"))
    blanked = 0
    for f in dst.glob("*_summary.json"):
        if not (dst / f.name.replace("_summary.json", "_outcomes.csv")).is_file():
            continue
        s = json.loads(f.read_text())
        zero = dict(mean=0.0, lo=0.0, hi=0.0, seeds=len(s["seeds"]), problems=s["problems"])
        for a in s["arms"].values():
            a.update({k: zero for k in ("accuracy", "vs_base", "vs_grpo") if a.get(k)})
        s["claims"], s["base"]["accuracy"] = [], 0.0
        f.write_text(json.dumps(s))
        (dst / f.name.replace("_summary.json", "_final.csv")).unlink()
        blanked += 1
    assert blanked >= 1
    assert main(["--results", str(tmp_path), "--name", tier, "--no-figures"]) == 0
    for f in [*sorted(src.glob("*_summary.json")), *sorted(src.glob("*_final.*"))]:
        assert (dst / f.name).read_text() == f.read_text(), f"{tier}/{f.name} differs from what the outcomes give"
    assert (tmp_path / summary_md).read_text() == (RESULTS / under / summary_md).read_text()


def test_a_task_without_outcomes_is_not_audited(tmp_path):
    _summary(tmp_path / "a", 0.01, 0.09)
    assert "| **holds** |" in build(tmp_path / "a")
    (tmp_path / "a" / "multiplication_outcomes.csv").unlink()
    text = build(tmp_path / "a")
    assert "| **not auditable (no per-problem outcomes)** |" in text and "| **holds** |" not in text
    s = json.loads((tmp_path / "a" / "multiplication_summary.json").read_text())
    (tmp_path / "a" / "multiplication_summary.json").write_text(json.dumps(dict(s, audit="runs lost")))
    assert "| **not auditable (runs lost)** |" in build(tmp_path / "a")


def test_results_files_of_the_wrong_kind_are_damaged_not_missing(tmp_path, capsys):
    """A FIFO or a folder in place of a results file must not read as "not run": the verdicts would silently change."""
    folder = tmp_path / "embedded"
    _summary(folder, 0.01, 0.09)
    (folder / "multiplication_outcomes.csv").unlink()
    os.mkfifo(folder / "multiplication_outcomes.csv")
    assert main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiplication_outcomes.csv' is damaged (ValueError: not a regular" in err
    (folder / "multiplication_outcomes.csv").unlink()
    (folder / "multiplication_summary.json").unlink()
    (folder / "multiplication_summary.json").mkdir()
    assert main(["--results", str(tmp_path), "--no-rebuild"]) == 2
    assert "multiplication_summary.json' is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["2", "-1", "nan", "yes"])
def test_an_outcome_that_is_not_0_or_1_is_damage_not_a_summary(tmp_path, capsys, value):
    """An accuracy of 167% was once written from an outcomes file whose 0s had become 2s: refuse it in one line."""
    dst = tmp_path / "embedded-full"
    skip = shutil.ignore_patterns("*.png", "*.svg", "notebooks", "runs")
    shutil.copytree(RESULTS / "embedded-full", dst, ignore=skip)
    f = dst / "multiplication_outcomes.csv"
    lines = f.read_text().splitlines()
    col = lines[0].split(",").index("correct")
    row = lines[5].split(",")
    lines[5] = ",".join([*row[:col], value, *row[col + 1:]])
    f.write_text("\n".join(lines) + "\n")
    before = (dst / "multiplication_summary.json").read_text()
    assert main(["--results", str(tmp_path), "--name", "embedded-full", "--no-figures"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiplication_outcomes.csv' is damaged" in err and "(row 6)" in err, err
    assert (dst / "multiplication_summary.json").read_text() == before  # nothing written from it
