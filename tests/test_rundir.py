"""The run directory: --overwrite deletes only a run, one process per run, torn metrics, checkpoint recovery."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CLI, refused, tree

from tokeneff import rundir

TRAIN = ["train", *TINY_CLI, "--steps", "1", "max_new_tokens=4"]


def _fake_run(folder: Path, marker: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(algo="sgrpo", task="multiplication", model="tiny-random", steps=1, out=str(folder))
    if marker:
        cfg[rundir.FORMAT_KEY] = rundir.RUN_FORMAT
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.jsonl").write_text('{"step": 0}\n')
    (folder / "eval_step0.json").write_text("{}")
    (folder / "checkpoint" / "adapter").mkdir(parents=True)
    (folder / "checkpoint" / "state.json").write_text('{"step": 1}')


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "data.csv").write_text("x\n")
    before = tree(d)
    for flags in (["--overwrite"], ["--resume"], []):
        err = refused(capsys, TRAIN + ["--out", str(d)] + flags, "holds files that are not a tokeneff run")
        assert "--overwrite" not in err
    assert tree(d) == before


def test_overwrite_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text('{"anything": 1}')  # a config.json that is not a run's
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    err = refused(capsys, TRAIN + ["--out", ".", "--overwrite"], "not a tokeneff run")
    assert "--overwrite" not in err and tree(tmp_path) == before
    # even a real run is never deleted when it is the current folder (or a parent of it, or home)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "config.json").unlink()
    _fake_run(tmp_path)
    before = tree(tmp_path)
    refused(capsys, TRAIN + ["--out", ".", "--overwrite"], "is the current folder: it is never deleted")
    (tmp_path / "inner").mkdir()
    monkeypatch.chdir(tmp_path / "inner")
    refused(capsys, TRAIN + ["--out", "..", "--overwrite"], "is a parent of the current folder")
    assert {k: v for k, v in tree(tmp_path).items() if k != "inner"} == before


def test_overwrite_refuses_home(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _fake_run(tmp_path)
    before = tree(tmp_path)
    refused(capsys, TRAIN + ["--out", "~", "--overwrite"], "is your home folder")
    assert tree(tmp_path) == before


def test_model_folder_as_out_is_refused_without_suggesting_overwrite(model_dir, capsys):
    m = model_dir
    before = tree(m)
    for flags in ([], ["--overwrite"], ["--resume"]):
        err = refused(capsys, TRAIN + ["--out", str(m)] + flags, "is a model folder")
        assert "--overwrite" not in err
    assert tree(m) == before


@pytest.mark.parametrize("where", ["notes.txt", "checkpoint/notes.txt", "adapter/mine/x.bin",
                                   "checkpoint.prev/adapter/notes.txt"])
def test_overwrite_refuses_a_run_holding_a_foreign_file(tmp_path, capsys, where):
    """Also deep inside the run's own folders: --overwrite deletes those whole."""
    run = tmp_path / "run"
    _fake_run(run)
    (run / where).parent.mkdir(parents=True, exist_ok=True)
    (run / where).write_text("mine")
    before = tree(run)
    err = refused(capsys, TRAIN + ["--out", str(run), "--overwrite"], f"also holds '{where.split('/x.bin')[0]}'")
    assert "nothing was deleted" in err and tree(run) == before


def test_overwrite_deletes_only_run_files_and_older_runs_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run)
    (run / ".metrics.jsonl.abc123").write_text("half")  # a temp file left by a kill
    (run / "adapter.tmp").mkdir()
    assert rundir.check_out(dict(out=str(run), algo="sgrpo"), resume=False, overwrite=True) == "run"
    rundir.clear_run(run)
    assert list(run.iterdir()) == []
    older = tmp_path / "older"  # written before the format marker existed: refused, never deleted
    _fake_run(older, marker=False)
    before = tree(older)
    for flag in ("--resume", "--overwrite"):
        refused(capsys, TRAIN + ["--out", str(older), flag], "written by an older tokeneff (before run format 1)")
    assert tree(older) == before
    legacy_without_metrics = tmp_path / "x"
    legacy_without_metrics.mkdir()
    (legacy_without_metrics / "config.json").write_text('{"algo": "sgrpo", "task": "svamp", "model": "m", "steps": 1}')
    assert rundir.classify(legacy_without_metrics) == "foreign"


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    refused(capsys, TRAIN + ["--out", str(tmp_path / "r"), "--resume", "--overwrite"], "exclude each other")


# ---------------------------------------------------------------------------------------------------------
# lock
# ---------------------------------------------------------------------------------------------------------

def test_second_process_on_a_run_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tokeneff.rundir import RunLock\n"
        f"RunLock(Path({str(run)!r})).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _fake_run(run)
        err = refused(capsys, TRAIN + ["--out", str(run), "--resume"], f"is in use by process {holder.pid}")
        assert "--overwrite" not in err
    finally:
        holder.kill()
        holder.wait()
    lock = rundir.RunLock(run).acquire()  # the kernel released the dead holder's lock
    lock.release()


# ---------------------------------------------------------------------------------------------------------
# checkpoints: recovery from every state a kill can leave
# ---------------------------------------------------------------------------------------------------------

def _ckpt(folder: Path, step: int, complete: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    (folder / "rank0.pt").write_bytes(os.urandom(64))
    if complete:
        rundir.write_manifest(folder, dict(step=step, num_processes=1))


@pytest.mark.parametrize("layout, expect_step, expect_message", [
    ({"checkpoint": 2, "checkpoint.prev": 1}, 2, None),
    ({"checkpoint": 2, "checkpoint.prev": 1, "checkpoint.tmp": -3}, 2, None),  # killed while writing tmp
    ({"checkpoint": 2, "checkpoint.tmp": 3}, 3, None),  # killed while removing prev
    ({"checkpoint": 2, "checkpoint.prev": -1, "checkpoint.tmp": 3}, 3, None),  # prev half-deleted
    ({"checkpoint.prev": 2, "checkpoint.tmp": 3}, 3, None),  # killed between the two renames
    ({"checkpoint": -3, "checkpoint.prev": 2}, 2, "incomplete or corrupt"),  # corrupt current: fall back
    ({"checkpoint": -3}, None, "no complete checkpoint"),
    ({"checkpoint.prev": 2}, 2, "checkpoint/ is missing: using checkpoint.prev/ (step 2)"),
])
def test_recovery_picks_the_newest_complete_checkpoint(tmp_path, capsys, layout, expect_step, expect_message):
    for name, step in layout.items():
        _ckpt(tmp_path / name, abs(step), complete=step > 0)
    man = rundir.recover_checkpoints(tmp_path)
    err = capsys.readouterr().err
    assert (man["step"] if man else None) == expect_step
    assert (expect_message in err) if expect_message else err == ""
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ([] if expect_step is None else ["checkpoint"] + (["checkpoint.prev"] if "checkpoint.prev" in left
                                                                     else []))
    if expect_step is not None:
        assert rundir.verify(tmp_path / "checkpoint")[0]["step"] == expect_step
        if (tmp_path / "checkpoint.prev").exists():
            assert rundir.verify(tmp_path / "checkpoint.prev")[0]["step"] < expect_step


def test_a_flipped_byte_makes_a_checkpoint_incomplete(tmp_path):
    _ckpt(tmp_path / "c", 1)
    assert rundir.verify(tmp_path / "c")[0] is not None
    data = bytearray((tmp_path / "c" / "rank0.pt").read_bytes())
    data[10] ^= 1
    (tmp_path / "c" / "rank0.pt").write_bytes(bytes(data))
    assert "does not match its hash" in rundir.verify(tmp_path / "c")[1]
