"""results/summary.md: verdicts recomputed from the stored intervals, and wall times kept per part of a tier."""

import json

from tokeneff.analysis.summary import build, main


def _summary(folder, lo, hi, seeds=2):
    iv = dict(mean=(lo + hi) / 2, lo=lo, hi=hi, seeds=seeds, problems=200)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multiplication_summary.json").write_text(json.dumps(dict(
        task="multiplication", label="tiny", problems=200, steps=30, seeds=[0, 1], paper_base="not reported",
        base=dict(accuracy=0.33, n=200), arms={"tspmo": dict(accuracy=iv, vs_base=iv, vs_grpo=None)})))


def test_verdict_follows_the_stored_interval(tmp_path):
    _summary(tmp_path / "a", 0.01, 0.09)
    assert "| multiplication: tspmo vs the base model | strong gain | +5.0 [+1.0, +9.0] pts" in build(tmp_path / "a")
    assert "**holds**" in build(tmp_path / "a")
    _summary(tmp_path / "b", -0.06, 0.04)
    assert "**unresolved (± 5.0 points)**" in build(tmp_path / "b")
    _summary(tmp_path / "c", 0.01, 0.09, seeds=1)  # one run: the verdict carries its caveat
    assert "**holds (1 seed: run-to-run variation is not in the interval)**" in build(tmp_path / "c")
    assert "(1 seed" not in build(tmp_path / "a")


def test_wall_time_of_each_part_is_kept(tmp_path):
    _summary(tmp_path / "full", 0.01, 0.09)
    args = ["--results", str(tmp_path), "--name", "full"]
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
    assert "does not exist" in capsys.readouterr().out


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
            assert main(["--results", str(tmp_path), *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"{name}' is damaged" in err, err
        (folder / name).unlink()
