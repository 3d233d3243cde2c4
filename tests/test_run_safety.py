"""Nothing outside a run folder is ever touched: links inside a run folder, a failing run beside a
sibling, an interrupt before the first checkpoint, a grid stopped by SIGTERM, a full disk at each write."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY_CLI, error_line, tree
from helpers import refused_last_line as refused  # a run may print progress before its error

from tokeneff import rundir
from tokeneff.cli import main

TINY = [*TINY_CLI, "--algo", "grpo", "max_new_tokens=8", "save_every=1"]


def _train(out, steps, *flags):
    return main(["train", *TINY, "--steps", str(steps), "--out", str(out), *flags])


def _sentinel(root: Path) -> Path:
    v = root / "outside"
    (v / "sub").mkdir(parents=True)
    (v / "a.txt").write_text("keep me\n")
    (v / "sub" / "b.txt").write_text("and me\n")
    return v


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run: checkpoint/, checkpoint.prev/, adapter/, final.json."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert _train(out, 2) == 0
    assert {"checkpoint", "checkpoint.prev", "adapter", "final.json"} <= {p.name for p in out.iterdir()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# links inside a run folder
# ---------------------------------------------------------------------------------------------------------------

LINKS = ["checkpoint", "checkpoint.prev", "checkpoint.tmp", ".tokeneff.lock", "adapter", "adapter.tmp"]
MODES = {"resume": (3, ["--resume"], True), "overwrite": (2, ["--overwrite"], False),
         "finish": (2, ["--resume"], False)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", LINKS)
def test_a_link_inside_a_run_folder_never_changes_anything_outside_it(finished, tmp_path, capsys, name, mode):
    steps, flags, unfinished = MODES[mode]
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    if unfinished:
        (run / "final.json").unlink()
    outside = _sentinel(tmp_path)
    if (run / name).is_dir():
        shutil.rmtree(run / name)
    (run / name).unlink(missing_ok=True)
    os.symlink(outside / "a.txt" if name == ".tokeneff.lock" else outside, run / name)
    before, run_before = tree(outside), tree(run)
    capsys.readouterr()
    code = _train(run, steps, *flags)
    err = capsys.readouterr().err
    assert tree(outside) == before
    assert code == 2 and f"{name!r} is a symbolic link" in error_line(err), err
    assert tree(run) == run_before  # refused before anything was written


def test_a_run_folder_that_is_itself_a_link_stays_allowed(finished, tmp_path, capsys):
    real = tmp_path / "disk2" / "run"
    shutil.copytree(finished, real, symlinks=True)
    (real / "final.json").unlink()
    (tmp_path / "run").symlink_to(real)
    assert _train(tmp_path / "run", 3, "--resume") == 0
    assert json.loads((real / "final.json").read_text())["steps_done"] == 3


def test_delete_removes_links_and_never_their_targets(tmp_path):
    outside = _sentinel(tmp_path)
    before = tree(outside)
    run = tmp_path / "run"
    (run / "checkpoint.tmp" / "adapter").mkdir(parents=True)
    os.symlink(outside, run / "checkpoint.tmp" / "adapter" / "dir-link")
    os.symlink(outside / "a.txt", run / "checkpoint.tmp" / "file-link")
    os.symlink(outside, run / "checkpoint.prev")  # a top-level link: removed as a link
    os.symlink(outside, run / "adapter")
    rundir._rmtree(run / "checkpoint.tmp")
    rundir._rmtree(run / "checkpoint.prev")
    rundir.clear_run(run)
    assert sorted(os.listdir(run)) == [] and tree(outside) == before


# ---------------------------------------------------------------------------------------------------------------
# a run that fails removes only the folders it made, and only while they hold nothing but its lock
# ---------------------------------------------------------------------------------------------------------------

def test_a_failing_run_never_removes_a_sibling_that_finished_meanwhile(tmp_path, capsys, monkeypatch):
    """Run A, into a fresh tree cr/new/a, fails after taking its lock (a LoRA target that is not a linear layer);
    at the instant it cleans up (the fault hook "release"), run B finishes into cr/new/b. Before the fix A removed
    cr/, B with it."""
    siblings = []
    real_hook = rundir._faults.hook

    def hook(phase):
        if phase == "release" and not siblings:
            siblings.append(_train(tmp_path / "cr" / "new" / "b", 1))
        real_hook(phase)

    monkeypatch.setattr(rundir._faults, "hook", hook)
    (tmp_path / "cr").mkdir()
    (tmp_path / "cr" / "mine.txt").write_text("mine")  # cr/ existed: never the run's to remove
    code = _train(tmp_path / "cr" / "new" / "a", 1, "lora_targets=post_attention_layernorm")
    err = capsys.readouterr().err
    assert code == 2 and "not a linear layer" in error_line(err)
    assert siblings == [0]
    b = tmp_path / "cr" / "new" / "b"
    assert json.loads((b / "final.json").read_text())["steps_done"] == 1 and (b / "adapter").is_dir()
    assert not (tmp_path / "cr" / "new" / "a").exists()  # A's own folder, empty but for its lock: removed
    assert (tmp_path / "cr" / "mine.txt").read_text() == "mine"
    # alone, A removes every folder it made, up to the one that existed
    monkeypatch.setattr(rundir._faults, "hook", real_hook)
    assert _train(tmp_path / "cr" / "x" / "y" / "a", 1, "lora_targets=post_attention_layernorm") == 2
    assert not (tmp_path / "cr" / "x").exists() and (tmp_path / "cr").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# an interrupt (Ctrl-C, or SIGTERM: the CLI turns it into KeyboardInterrupt) during the first evaluation
# ---------------------------------------------------------------------------------------------------------------

def test_interrupt_during_the_first_evaluation_says_so_and_a_plain_rerun_starts_over(tmp_path, capsys,
                                                                                       monkeypatch):
    tr = sys.modules["tokeneff.loop"]
    real = tr.evaluate_model

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "evaluate_model", interrupted)
    out = tmp_path / "new" / "run"
    assert _train(out, 1) == 130
    assert "interrupted before the first checkpoint: nothing was kept" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()  # the folders it made are gone with what it wrote
    (tmp_path / "empty").mkdir()
    assert _train(tmp_path / "empty", 1) == 130
    assert [p.name for p in (tmp_path / "empty").iterdir() if p.name != rundir.LOCK_NAME] == []
    monkeypatch.setattr(tr, "evaluate_model", real)
    assert _train(out, 1) == 0  # the same command, not refused as "already holds a run"


# ---------------------------------------------------------------------------------------------------------------
# a grid's parent stopped by SIGTERM leaves no process behind
# ---------------------------------------------------------------------------------------------------------------

GRID = textwrap.dedent("""
    import sys
    from tokeneff.analysis.grid import run_grid
    run_grid("g", "multiplication", {"grpo": {"algo": "grpo"}}, [0, 1], 500, root=sys.argv[1], workers=2,
             model="tiny-random", max_new_tokens=8, group_size=2, prompts_per_step=1, eval_batch_size=2,
             digits_a=1, digits_b=1, eval_limit=2, save_every=1)
""")


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_a_grid_stops_its_workers(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", GRID, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    runs = [tmp_path / "embedded" / "g" / f"grpo-s{s}" for s in (0, 1)]
    try:
        deadline = time.time() + 180
        while not all((r / "checkpoint").is_dir() for r in runs):  # both workers are training
            assert parent.poll() is None and time.time() < deadline, parent.communicate()
            time.sleep(0.5)
        workers = _children(parent.pid)
        assert workers
        parent.send_signal(signal.SIGTERM)
        out, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    # the script ends as SIGTERM ends a process (no KeyboardInterrupt traceback), after stopping its runs
    assert parent.returncode == -signal.SIGTERM and "interrupted: run the grid again" in out, (out, err)
    assert "Traceback" not in err, err
    deadline = time.time() + 20
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)]
    for r in runs:  # each resumes from a complete checkpoint
        assert rundir.verify(r / "checkpoint")[0] is not None


# ---------------------------------------------------------------------------------------------------------------
# a full disk at each write
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_at_each_write_is_one_line_and_the_run_resumes(small_disk, capsys):
    """The run needs about 600 kB; the disk is filled to leave less and less of it, so that each write in turn
    (config, evaluation, metrics, checkpoints, adapter, final.json) is the one that fails."""
    seen = set()
    for free_kb in (0, 8, 24, 64, 160, 260, 380, 500):
        run = small_disk / "run"
        filler = small_disk / "filler"
        filler.write_bytes(b"")
        total = shutil.disk_usage(small_disk).free
        with filler.open("wb") as f:
            f.write(b"\0" * max(0, total - free_kb * 1024))
        capsys.readouterr()
        code = _train(run, 2)
        err = capsys.readouterr().err
        assert code in (0, 2), err
        if code == 2:
            line = error_line(err)
            assert "No space left on device" in line or "could not write" in line, line
            seen.add(line.split("could not write ")[-1].split(" (")[0].split("/")[-1][:20])
        filler.unlink()
        assert _train(run, 2, "--resume") == 0, capsys.readouterr().err  # with space again, the run finishes
        assert json.loads((run / "final.json").read_text())["steps_done"] == 2
        shutil.rmtree(run)
    assert len(seen) >= 3, seen  # several different writes were hit


# ---------------------------------------------------------------------------------------------------------------
# one line for every fault
# ---------------------------------------------------------------------------------------------------------------

EVAL = ["evaluate", "--task", "multiplication", "--model", "tiny-random", "--limit", "2", "digits_a=1", "digits_b=1",
        "max_new_tokens=4"]


def test_damaged_adapters_and_model_folders_are_one_line(finished, tmp_path, capsys, model_dir):
    ev = EVAL + ["--out", tmp_path / "e.json"]
    ad = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", ad)
    w = ad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:300])
    refused(capsys, ev + ["--adapter", ad], "adapter_model.safetensors is truncated")
    w.unlink()
    (ad / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
    refused(capsys, ev + ["--adapter", ad], "adapter_model.bin is a pickle and never loaded")
    (ad / "adapter_config.json").write_text('{"r": 8')
    refused(capsys, ev + ["--adapter", ad], "adapter_config.json is damaged")
    # a model folder whose safetensors header is valid JSON of the wrong form, then weights of another shape
    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": "x"}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 256)
    refused(capsys, ["evaluate", "--model", model_dir, "--task", "multiplication", "--out", tmp_path / "e.json"],
             "model.safetensors is not a valid safetensors file")
    weights.write_bytes(good)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 3 * cfg["intermediate_size"]}))
    refused(capsys, ["evaluate", "--model", model_dir, "--task", "multiplication", "--out", tmp_path / "e.json"],
             "could not load the local model")
    assert not (tmp_path / "e.json").exists()


def test_a_damaged_final_json_or_metrics_line_is_repaired_on_resume(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "final.json").write_text('{"steps_done": 2, "ev')  # cut off
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": Infinity}\n["step", 1]\n{"step": 2, "rew')  # two complete lines that are no rows, one cut off
    capsys.readouterr()
    assert _train(run, 2, "--resume") == 0
    err = capsys.readouterr().err
    assert "final.json is damaged" in err and "Traceback" not in err
    assert "dropped a torn last line (line 6" in err and "dropped line(s) 4, 5: not a metrics row" in err, err
    assert json.loads((run / "final.json").read_text())["steps_done"] == 2
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    good = json.loads((run / "final.json").read_text())
    (run / "final.json").write_text(json.dumps({**good, "final_accuracy": float("nan")}))  # not an accuracy
    assert _train(run, 2, "--resume") == 0
    assert "final.json is damaged" in capsys.readouterr().err
    assert json.loads((run / "final.json").read_text()) == good  # finished again from its checkpoint


def test_run_files_of_the_wrong_kind_are_refused_before_anything_changes(finished, tmp_path, capsys):
    """A FIFO where metrics.jsonl belongs would hang the first write; a folder named final.json would fail only
    after the whole run; a file named adapter would fail at the end too."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "final.json").unlink()
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    resume = ["train", *TINY, "--steps", 3, "--out", run, "--resume"]
    for swap, needle, argv in [
            (None, "'metrics.jsonl' is not a regular file", resume),
            ("final.json", "'final.json' is not a regular file", resume),
            ("adapter", "'adapter' is not a folder", ["train", *TINY, "--steps", 3, "--out", run, "--overwrite"])]:
        if swap == "final.json":
            (run / "metrics.jsonl").unlink()
            (run / "metrics.jsonl").write_text("")
            (run / "final.json").mkdir()
        elif swap == "adapter":
            (run / "final.json").rmdir()
            shutil.rmtree(run / "adapter")
            (run / "adapter").write_text("mine")
        before = tree(run)
        refused(capsys, argv, needle)
        assert tree(run) == before


def test_a_failure_before_the_first_checkpoint_keeps_nothing_and_after_it_keeps_the_checkpoint(tmp_path, capsys,
                                                                                                monkeypatch):
    tr = sys.modules["tokeneff.loop"]
    real = tr.evaluate_model
    calls = []

    def failing(*a, **k):  # the evaluation at step `fail_at` fails as a damaged model would
        calls.append(1)
        if len(calls) == fail_at:
            raise tr.TokeneffError("the model broke")
        return real(*a, **k)

    monkeypatch.setattr(tr, "evaluate_model", failing)
    fail_at, out = 1, tmp_path / "new" / "run"  # the first evaluation, before any checkpoint
    line = refused(capsys, ["train", *TINY, "--steps", 2, "--out", out, "eval_every=1"], "the model broke")
    assert f"nothing was kept in {out}" in line and not (tmp_path / "new").exists()
    calls.clear()
    fail_at = 3  # step 2's evaluation: step 1's checkpoint exists
    line = refused(capsys, ["train", *TINY, "--steps", 2, "--out", out, "eval_every=1"], "the model broke")
    assert f"the checkpoint of step 1 is kept in {out}/checkpoint: add --resume" in line
    monkeypatch.setattr(tr, "evaluate_model", real)
    assert _train(out, 2, "eval_every=1", "--resume") == 0


def test_a_model_folder_without_a_tokenizer_is_one_line_and_leaves_nothing(tmp_path, capsys):
    from tokeneff.models import tiny_random

    model, _ = tiny_random()
    model.save_pretrained(tmp_path / "m")  # weights and config, no tokenizer files
    out = tmp_path / "runs" / "r"
    TINY_M = [a if a != "tiny-random" else str(tmp_path / "m") for a in TINY]
    refused(capsys, ["train", *TINY_M, "--steps", 1, "--out", out], "its tokenizer is empty")
    assert not (tmp_path / "runs").exists()


def test_a_key_given_twice_with_two_values_is_refused(tmp_path, capsys):
    refused(capsys, ["train", *TINY, "--steps", 1, "--out", tmp_path / "r", "beta=0", "beta=0.1"],
             "beta= is given twice ('0' and '0.1')")
    refused(capsys, ["train", *TINY, "--steps", 2, "--out", tmp_path / "r", "steps=4"], "collides with --steps")
    refused(capsys, ["warmstart", "lr=1e-4", "lr=2e-4"], "lr= is given twice")
    assert not (tmp_path / "r").exists()


def test_evaluate_keeps_its_result_when_the_file_cannot_be_written(tmp_path, capsys, monkeypatch):
    import errno

    ev = sys.modules["tokeneff.evaluate"]  # the module (tokeneff.evaluate is also the function)
    real = ev.write_json

    def full(path, obj):
        if Path(path) == tmp_path / "e.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(ev, "write_json", full)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    line = error_line(refused(capsys, EVAL + ["--out", tmp_path / "e.json"], "could not be written (No space left"))
    kept = list((tmp_path / "tmp").glob("tokeneff-eval-*e.json"))
    assert len(kept) == 1 and str(kept[0]) in line and "accuracy" in line
    assert len(json.loads(kept[0].read_text())["records"]) == 2


def test_key_value_anywhere_bench_tilde_and_files_readable_per_umask(tmp_path, capsys, monkeypatch):
    # key=value between options: parsed, so its own check answers (not argparse's "unrecognized arguments")
    refused(capsys, ["train", "--model", "tiny-random", "lr=5", "--steps", "1", "--out", tmp_path / "r", "beta=0"],
             "lr=5.0: must be at most 1")
    with pytest.raises(SystemExit) as e:  # argparse's own errors: one line, exit 2
        main(["train", "--steps", "1", "--bogus", "beta=0"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in error_line(capsys.readouterr().err)
    # bench --out '~/x': expanded once, at the boundary
    import tokeneff.cli as cli

    seen = []
    monkeypatch.setattr(cli, "bench_cli", lambda args: seen.append(args.out))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["bench", "--out", "~/x"]) == 0 and seen == [str(tmp_path / "x")]
    # run files: 0666 less the umask, not mkstemp's 0600
    from tokeneff.utils import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        os.umask(0o077)
        write_json(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_messages_have_a_bounded_length(tmp_path, capsys):
    levels = "\n".join(f" - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9))
    (tmp_path / "bomb.yaml").write_text(f"lora_targets:\n - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                                        f"{levels}\n")  # 9**9 strings if expanded
    err = refused(capsys, ["train", "--config", tmp_path / "bomb.yaml"], "lora_targets=")
    assert len(err) < 1000


def test_duplicate_seeds_are_refused_before_any_run(tmp_path):
    from tokeneff.analysis.grid import run_grid
    from tokeneff.errors import ConfigError

    with pytest.raises(ConfigError, match=r"seed 0 appears more than once"):
        run_grid("x", "multiplication", {"grpo": {}}, [0, 1, 0], 1, root=str(tmp_path), model="tiny-random")
    assert list(tmp_path.iterdir()) == []


def test_weights_made_non_finite_by_an_update_stop_the_run(tmp_path, capsys, monkeypatch):
    import torch

    real = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))  # what an absurd lr or weight_decay does
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    code = _train(tmp_path / "r", 2, "eval_at_start=false")
    err = capsys.readouterr().err
    assert code == 2 and "step 1: the update made LoRA weights non-finite" in error_line(err)
    refused(capsys, ["train", *TINY, "--out", tmp_path / "w", "weight_decay=1e30"],
             "lr * weight_decay must be below 1")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU answer")
def test_evaluate_in_fp16_on_a_cpu_is_refused(tmp_path, capsys):
    refused(capsys, EVAL + ["--out", tmp_path / "e.json", "mixed_precision=fp16"], "needs a CUDA GPU")
    assert not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# a second round of hostile cases
# ---------------------------------------------------------------------------------------------------------------

def test_special_and_damaged_files_never_hang_or_read_as_missing(finished, tmp_path, capsys):
    # a FIFO where config.json belongs: refused before anything reads it (a read would block forever)
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / "config.json")
    for flag in ([], ["--resume"], ["--overwrite"]):
        refused(capsys, ["train", *TINY, "--steps", 1, "--out", tmp_path / "f", *flag],
                 "'config.json' is not a regular file")
    # evaluate --out a FIFO: refused, never replaced by a file
    os.mkfifo(tmp_path / "fifo.json")
    refused(capsys, ["evaluate", "--model", "tiny-random", "--task", "multiplication", "--out",
                      tmp_path / "fifo.json"], "is not a regular file")
    assert not (tmp_path / "fifo.json").is_file()
    # a run whose config.json is damaged is named as such, and left alone
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.json").write_text('{"algo": "grpo", "ta')
    before = tree(run)
    refused(capsys, ["train", *TINY, "--steps", 3, "--out", run, "--resume"], "its config.json is damaged")
    assert tree(run) == before


def test_resume_with_every_checkpoint_damaged_is_refused_and_deletes_nothing(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for ck in ("checkpoint", "checkpoint.prev"):
        opt = run / ck / "optimizer.pt"
        opt.write_bytes(opt.read_bytes()[:100])
    before = tree(run)
    line = refused(capsys, ["train", *TINY, "--steps", 3, "--out", run, "--resume"],
                    "no complete checkpoint to resume from")
    assert "checkpoint/: optimizer.pt has 100 bytes" in line and "checkpoint.prev/:" in line
    assert tree(run) == before  # the metrics, the evaluations and the damaged checkpoints are all still there


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("beta: 0\nbeta: 0.5\n")
    (tmp_path / "c.json").write_text('{"beta": 0, "beta": 0.5}')
    (tmp_path / "m.yaml").write_text("base: &b {beta: 0}\nother:\n  <<: *b\n  beta: 1\n")  # merged keys: overridable
    for f in ("c.yaml", "c.json"):
        refused(capsys, ["train", "--config", tmp_path / f], "gives beta twice")
    from tokeneff.config import load_config_file

    assert load_config_file(str(tmp_path / "m.yaml"))["other"] == {"beta": 1}


def test_option_values_are_bounded_and_grid_variants_cannot_set_what_the_grid_sets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--steps", "9" * 100_000])
    err = capsys.readouterr().err
    assert len(err) < 1000 and "Traceback" not in err, err[:300]
    from tokeneff.analysis.grid import run_grid
    from tokeneff.errors import ConfigError

    with pytest.raises(ConfigError, match="seed= in variant 'a' is set by the grid itself"):
        run_grid("x", "multiplication", {"a": {"seed": 3}}, [0], 1, root=str(tmp_path), model="tiny-random")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_command_loads_its_libraries_is_quiet(tmp_path):
    """The first seconds of `tokeneff` import torch and transformers; a Ctrl-C then is one line, not a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "tokeneff.cli", "train", *TINY, "--steps", "1", "--out",
                             str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err + out, err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------------------
# a third round of hostile cases
# ---------------------------------------------------------------------------------------------------------------

def test_names_never_become_paths_and_outputs_never_replace_special_files(tmp_path, capsys):
    from tokeneff.analysis.grid import run_grid
    from tokeneff.analysis.summary import main as summary_main
    from tokeneff.errors import ConfigError

    sentinel = _sentinel(tmp_path)
    before = tree(sentinel)
    for exp, variants in (("../../outside", {"grpo": {}}), ("x", {"../../outside": {}}), ("x", {"a/b": {}})):
        with pytest.raises(ConfigError, match="must be a plain name"):
            run_grid(exp, "multiplication", variants, [0], 1, root=str(tmp_path / "runs"), model="tiny-random")
    (tmp_path / "results" / "embedded").mkdir(parents=True)
    assert summary_main(["--results", str(tmp_path / "results"), "--name", "../outside"]) == 2
    os.mkfifo(tmp_path / "fifo.md")
    assert summary_main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "fifo.md")]) == 2
    err = capsys.readouterr().err
    assert "must be a plain name" in err and "is not a regular file" in err and "Traceback" not in err
    assert tree(sentinel) == before and not (tmp_path / "runs").exists()
    assert not (tmp_path / "fifo.md").is_file()


def test_dotdot_after_a_link_repeated_options_and_unknown_models_are_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "py").symlink_to(tmp_path / "real" / "deep")
    out = tmp_path / "py" / ".." / "n3" / "n4"  # the OS reads py/.. as real/, not tmp_path
    refused(capsys, ["train", *TINY, "--steps", 1, "--out", out], "'..' after a symbolic link")
    assert not (tmp_path / "n3").exists() and not (tmp_path / "real" / "n3").exists()
    with pytest.raises(SystemExit) as e:
        main(["train", "--algo", "grpo", "--algo", "sgrpo", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--algo is given twice ('grpo' and 'sgrpo')" in capsys.readouterr().err
    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "cache"))
    refused(capsys, ["warmstart", "--model", "nosuch"], "model='nosuch': not a built-in name")
    assert not (tmp_path / "cache").exists()  # not even a lock file


def test_dotdot_without_a_link_is_the_folder_it_names_and_outputs_never_replace_a_fifo(tmp_path, capsys):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "mine.txt").write_text("mine")
    before = tree(tmp_path)
    refused(capsys, ["train", *TINY, "--steps", 1, "--out", tmp_path / "w" / "q" / ".." / ".." / "f"],
             "holds files that are not a tokeneff run")
    assert tree(tmp_path) == before  # no lock in f/, no w/q/ made
    from tokeneff.utils import atomic_write_bytes

    os.mkfifo(tmp_path / "table.md")
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write_bytes(tmp_path / "table.md", b"x")
    assert not (tmp_path / "table.md").is_file()


# ---------------------------------------------------------------------------------------------------------------
# red team round 6: what a user who had not read the fixes still found
# ---------------------------------------------------------------------------------------------------------------

def test_adapters_with_a_wrong_typed_config_or_non_finite_weights_are_one_line(finished, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ev = EVAL + ["--out", tmp_path / "e.json"]
    ad = tmp_path / "typed"
    shutil.copytree(finished / "adapter", ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, r="sixteen")))
    refused(capsys, ev + ["--adapter", ad], "adapter_config.json is damaged")  # was a TypeError traceback
    nan = tmp_path / "nan"
    shutil.copytree(finished / "adapter", nan)
    w = load_file(nan / "adapter_model.safetensors")
    k = next(k for k in w if "lora_B" in k)
    w[k][:] = float("nan")
    save_file(w, nan / "adapter_model.safetensors")
    refused(capsys, ev + ["--adapter", nan], "its weights are not finite")  # was accuracy 0.000, exit 0
    assert not (tmp_path / "e.json").exists()


def test_a_hard_linked_run_file_never_carries_writes_outside_the_run(finished, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    (run / "final.json").unlink()
    outside = tmp_path / "outside.jsonl"
    os.link(run / "metrics.jsonl", outside)  # as `cp -al` leaves a copy of a run
    before = outside.read_bytes()
    assert _train(run, 3, "--resume") == 0, capsys.readouterr().err
    assert outside.read_bytes() == before and (run / "metrics.jsonl").read_bytes() != before
    lock = tmp_path / "outside.lock"
    lock.write_text("mine\n")
    (run / ".tokeneff.lock").unlink(missing_ok=True)
    os.link(lock, run / ".tokeneff.lock")
    refused(capsys, ["train", *TINY, "--steps", 4, "--out", run, "--resume"], "is a hard link to a file elsewhere")
    assert lock.read_text() == "mine\n"


def test_absurd_sizes_and_names_are_bounded_one_line_refusals(tmp_path, capsys, monkeypatch):
    from tokeneff.analysis import summary
    from tokeneff.analysis.grid import run_grid
    from tokeneff.errors import ConfigError

    out = tmp_path / "b"
    refused(capsys, ["bench", "--completion-lens", "9" * 20, "--out", out], "must be between 1 and 32768")  # a hang
    refused(capsys, ["bench", "--vocab-size", "0", "--out", out], "--vocab-size 0: must be between 101")
    for seeds, variants, needle in ((["x" * 100_000], {"grpo": {}}, "must be a list of integers"),
                                    ([10**5000], {"grpo": {}}, "seed <an integer of"),
                                    ([0], {"v" * 100_000: {}}, "at most 100")):
        with pytest.raises(ConfigError, match=needle) as e:
            run_grid("g", "multiplication", variants, seeds, 1, root=str(tmp_path / "g"), workers=1)
        assert len(str(e.value)) < 1000
    assert summary.main(["--wall-seconds", "-5", "--results", str(tmp_path)]) == 2
    assert "--wall-seconds -5: must not be negative" in capsys.readouterr().err
    monkeypatch.setenv("TOKENEFF_CACHE", "~/tkcache")
    monkeypatch.setenv("HOME", str(tmp_path))
    from tokeneff.models import cache_dir

    assert cache_dir() == tmp_path / "tkcache"  # not a folder named '~' in the current one


def test_sizes_that_would_only_exhaust_memory_are_refused_and_an_oom_is_one_line(tmp_path, capsys, monkeypatch):
    """group_size / prompts_per_step of 10**8 allocated until killed (one SIGTERM did not stop it), a LoRA rank of
    10**8 ran peft out of memory with a traceback: refused up front. A real out-of-memory is one line too."""
    import tokeneff.cli as cli

    out = tmp_path / "r"
    for setting, needle in (("group_size=100000000", "group_size=100000000: must be at most 1024"),
                            ("prompts_per_step=100000000", "prompts_per_step=100000000: must be at most 1024"),
                            ("prompts_per_step=1000", "is 128000 completions per update"),  # 1000 x 128
                            ("lora_r=100000000", "lora_r=100000000: above the smaller dimension")):
        base = [a for a in TINY_CLI if a.split("=")[0] not in ("group_size", "prompts_per_step")]
        argv = ["train", "--algo", "grpo", "--steps", "1", "--out", out, *base, setting]
        argv += ["group_size=128"] if "128000" in needle else [] if "group_size" in setting else ["group_size=2"]
        refused(capsys, argv, needle)
        assert not out.exists()

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000 bytes.")

    evaluate = ["evaluate", "--out", tmp_path / "e.json", "--limit", "2",
                *[a for a in TINY_CLI if not a.startswith("eval_limit=")]]
    refused(capsys, ["train", "--algo", "grpo", "--steps", "1", "--out", out, *TINY_CLI, "threads=100000000"],
            "threads=100000000: must be at most")  # a segfault
    refused(capsys, [*evaluate, "threads=100000000"], "threads=100000000: must be at most")
    refused(capsys, [*evaluate, "max_new_tokens=100000000000"], "exceeds the model's context")  # decoded until killed
    assert not out.exists() and not (tmp_path / "e.json").exists()

    monkeypatch.setattr(cli, "train", oom)
    refused(capsys, ["train", "--algo", "grpo", "--steps", "1", "--out", out, *TINY_CLI], "out of memory (")


def test_adapter_files_are_readable_as_the_umask_allows(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert _train(tmp_path / "p", 1) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "p").rglob("*.safetensors")}
    assert modes and set(modes.values()) == {0o644}, modes  # safetensors alone writes 0600
