"""Bad inputs: each is one line on stderr and exit code 2 (or a documented correct behaviour), with
nothing written."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_CLI
from helpers import refused as one_line

from tokeneff import TokeneffError, make_config, train
from tokeneff.cli import main
from tokeneff.tasks.svamp import shipped_test_ids

TINY = [*TINY_CLI, "--steps", "1", "max_new_tokens=4"]


def _train(tmp_path, *extra):
    """TINY with `extra`'s key=value in place of TINY's own (a key is given once)."""
    keys = {str(e).split("=", 1)[0] for e in extra if "=" in str(e)}
    base = [a for a in TINY if not (isinstance(a, str) and "=" in a and a.split("=", 1)[0] in keys)]
    return ["train", *base, *extra, "--out", tmp_path / "run"]


def _nothing_written(tmp_path):
    assert not (tmp_path / "run").exists()


# --- config files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a text file (expected YAML or JSON)"),
    (b"1: 2\n", "config key 1 is not a name"),
    (b"lr: null\n", "lr: null is not a value (leave the key out for the default"),
    (b"algo: [sgrpo]\n", "algo=['sgrpo']: expected str, got a list"),
    (b"lora_r: {a: 1}\n", "lora_r={'a': 1}: expected int, got a mapping"),
    (b"profile: paper\n", "profile='paper' in config file"),
    (b"svamp_dir: [a, b]\n", "svamp_dir=['a', 'b']: expected str, got a list"),
])
def test_malformed_config_file(tmp_path, capsys, content, needle):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    one_line(capsys, _train(tmp_path, "--config", f), needle)
    _nothing_written(tmp_path)


def test_config_file_that_is_a_folder(tmp_path, capsys):
    one_line(capsys, _train(tmp_path, "--config", tmp_path), "is a folder: name a YAML or JSON file")


def test_documented_list_of_lora_targets_and_tilde_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("lora_targets: [q_proj, v_proj]\nout: ~/runs/x\nsvamp_dir: ~/svamp\n")
    cfg = make_config("embedded", file="~/c.yaml")
    assert cfg.lora_targets == "q_proj,v_proj"
    assert cfg.out == str(tmp_path / "runs" / "x") and cfg.svamp_dir == str(tmp_path / "svamp")


# --- numbers that passed the old checks -------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("temperature=1e-30", "temperature=1e-30: must be between 0.01 and 100"),
    ("temperature=1e6", "temperature=1000000.0: must be between 0.01 and 100"),
    ("lr=1e10", "lr=10000000000.0: must be at most 1"),
    (f"seed={2**40}", f"seed={2**40}: must be at most 4294967293"),
    ("max_new_tokens=5000", "max_new_tokens=5000: with the longest prompt"),
    ("eval_max_new_tokens=4000", "eval_max_new_tokens=4000: with the longest prompt"),
    ("num_shots=9", "num_shots=9: the multiplication task has 3 worked examples"),
])
def test_out_of_range_numbers(tmp_path, capsys, override, needle):
    one_line(capsys, _train(tmp_path, override), needle)
    _nothing_written(tmp_path)


# --- LoRA targets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, needle", [
    ("lm_head", "'lm_head' is bypassed by the selective LM head"),
    ("q_proj,input_layernorm", "'input_layernorm' is a Qwen2RMSNorm, not a linear layer"),
    ("act_fn", "'act_fn' is a SiLUActivation, not a linear layer"),
])
def test_lora_targets_that_cannot_train(tmp_path, capsys, targets, needle):
    one_line(capsys, _train(tmp_path, f"lora_targets={targets}"), needle)
    _nothing_written(tmp_path)


# --- model folders, adapters, caches ---------------------------------------------------------------------

def test_model_folder_empty_truncated_or_incomplete(tmp_path, capsys, model_dir):
    argv = ["train", "--model", None, "--task", "multiplication", "--steps", "1", "--out", tmp_path / "run"]
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(capsys, [a if a is not None else empty for a in argv], "the folder is empty")
    one_line(capsys, [a if a is not None else model_dir / "config.json" for a in argv], "is a file: pass the model's")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line(capsys, [a if a is not None else model_dir for a in argv], "model.safetensors is truncated")
    weights.unlink()
    one_line(capsys, [a if a is not None else model_dir for a in argv], "no *.safetensors weights in the folder")
    (model_dir / "config.json").unlink()
    one_line(capsys, [a if a is not None else model_dir for a in argv], "no config.json in the folder")
    _nothing_written(tmp_path)


def test_adapter_of_another_base_model(tmp_path, capsys, model_dir):
    from peft import LoraConfig, get_peft_model

    from tokeneff.models import tiny_random

    # a LoRA adapter trained on a narrower model: its shapes do not fit tiny-random
    narrow, _ = tiny_random(hidden=32)
    get_peft_model(narrow, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter32")
    capsys.readouterr()
    ev = ["evaluate", "--task", "multiplication", "--model", "tiny-random", "--limit", "1", "--out",
          tmp_path / "e.json", "digits_a=1", "digits_b=1"]
    one_line(capsys, ev + ["--adapter", tmp_path / "adapter32"], "does not fit model='tiny-random'")
    # a run's adapter: its config.json names the base model
    run = tmp_path / "run_other"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"algo": "sgrpo", "model": "smollm2-135m"}))
    one_line(capsys, ev + ["--adapter", run / "adapter"], "was trained on model='smollm2-135m'")
    assert not (tmp_path / "e.json").exists()


def test_unwritable_cache_and_output_folders(tmp_path, capsys, monkeypatch):
    assert Path("/proc/1").is_dir()  # root may write anywhere else: /proc refuses even root
    monkeypatch.setenv("TOKENEFF_CACHE", "/proc/1/tokeneff-cache")
    one_line(capsys, ["train", "--model", "smollm2-135m", "--steps", "1", "--out", tmp_path / "run"],
             "cache='/proc/1/tokeneff-cache': cannot write in '/proc/1'")
    one_line(capsys, ["train", *TINY, "--out", "/proc/1/tokeneff-run"], "out='/proc/1/tokeneff-run': cannot write in")
    (tmp_path / "f").write_text("x")
    one_line(capsys, ["train", *TINY, "--out", tmp_path / "f" / "run"], "is a file, not a folder")
    _nothing_written(tmp_path)


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tiny_cfg, monkeypatch):
    from tokeneff import rundir

    cfg = tiny_cfg(steps=3)
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(str(f))
        if len(calls) > 3:  # the first checkpoint has 2 torch.save calls (rank0.pt, optimizer.pt)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TokeneffError, match=r"could not write the checkpoint of step 2 .*\(No space left on device\)"):
        train(cfg, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert rundir.verify(Path(cfg.out) / "checkpoint")[0]["step"] == 1
    final = train(cfg, resume=True, progress=False)  # space freed: it goes on
    assert final["steps_done"] == 3


def test_resume_with_another_number_of_processes(tiny_cfg):
    cfg = tiny_cfg(steps=1)
    train(cfg, progress=False)
    man = Path(cfg.out) / "checkpoint" / "manifest.json"
    man.write_text(json.dumps(dict(json.loads(man.read_text()), num_processes=2)))
    with pytest.raises(TokeneffError, match="was written by 2 processes, this run has 1: resume with 2"):
        train(tiny_cfg(steps=2), resume=True, progress=False)


# --- SVAMP copies ----------------------------------------------------------------------------------------

def _svamp(tmp_path, ids, answer=1.0):
    d = tmp_path / "svamp"
    d.mkdir(exist_ok=True)
    recs = [dict(ID=i, Body="Tom has 2 apples.", Question="How many?", Answer=answer) for i in ids]
    (d / "SVAMP.json").write_text(json.dumps(recs))
    return d


@pytest.mark.parametrize("ids, answer, needle", [
    (["chal-1", "chal-2"], "NaN", "record 'chal-1' has non-finite Answer 'NaN'"),
    (["chal-1", "chal-1"], 1.0, "ID 'chal-1' appears twice (records 0 and 1)"),
    (["other-1", "other-2"], 1.0, "the test split is empty (none of its IDs is in the shipped ID lists"),
    ("TEST", 1.0, "the train split is empty (all of its IDs are in the shipped ID lists"),
])
def test_svamp_copies(tmp_path, capsys, ids, answer, needle):
    ids = shipped_test_ids()[:3] if ids == "TEST" else ids
    d = _svamp(tmp_path, ids, answer)
    err = one_line(capsys, ["train", "--model", "tiny-random", "--task", "svamp", "--steps", "1", "--out",
                            tmp_path / "run", f"svamp_dir={d}"], needle)
    assert str(d / "SVAMP.json") in err
    _nothing_written(tmp_path)
    if "split is empty" in needle:
        split = "test" if "test split" in needle else "train"
        one_line(capsys, ["evaluate", "--model", "tiny-random", "--task", "svamp", "--split", split, "--out",
                          tmp_path / "e.json", f"svamp_dir={d}"], needle)
        assert not (tmp_path / "e.json").exists()


# --- precision, option collisions, outputs -----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_fp16_without_a_gpu(tmp_path, capsys):
    one_line(capsys, _train(tmp_path, "mixed_precision=fp16"), "mixed_precision='fp16': needs a CUDA GPU")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "--model", "tiny-random", "model=smollm2-135m"], "override 'model=smollm2-135m' collides with "
                                                                   "evaluate's --model"),
    (["evaluate", "--limit", "2", "eval_limit=3"], "override 'eval_limit=3' collides with evaluate's --limit"),
    (["evaluate", "--task", "svamp", "task=multiplication"], "collides with evaluate's --task"),
    (["evaluate", "out=runs/x"], "override 'out=runs/x' collides with evaluate's --out"),
    (["train", "--model", "tiny-random", "--steps", "3", "steps=5"], "override 'steps=5' collides with --steps 3"),
    (["warmstart", "--model", "tiny-random", "model=smollm2-135m"], "override 'model=smollm2-135m' collides with "
                                                                    "--model tiny-random"),
])
def test_overrides_that_collide_with_options(tmp_path, capsys, argv, needle):
    if argv[0] == "evaluate":
        argv = argv + ["--out", tmp_path / "e.json"]
    elif argv[0] == "warmstart":
        pass  # no --out: it writes into the cache
    else:
        argv = argv + ["--out", tmp_path / "run"]
    one_line(capsys, argv, needle)
    assert not (tmp_path / "e.json").exists()
    _nothing_written(tmp_path)


def test_outputs_are_checked_before_the_compute(tmp_path, capsys):
    ev = ["evaluate", "--model", "tiny-random", "--task", "multiplication", "--limit", "1", "--out"]
    (tmp_path / "dir").mkdir()
    one_line(capsys, ev + [tmp_path / "dir"], "is a folder: name a file in it")
    one_line(capsys, ev + ["/proc/1/eval.json"], "cannot write in '/proc/1'")
    (tmp_path / "file").write_text("x")
    one_line(capsys, ["bench", "--out", tmp_path / "file"], "--out=")
    one_line(capsys, ["bench", "--out", tmp_path / "file"], "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_evaluate_accepts_a_run_folder_as_adapter(tmp_path, tiny_cfg, capsys):
    cfg = tiny_cfg(steps=1)
    train(cfg, progress=False)
    assert main(["evaluate", "--model", "tiny-random", "--task", "multiplication", "--limit", "1",
                 "--adapter", cfg.out, "--out", str(tmp_path / "e.json"), "digits_a=1", "digits_b=1",
                 "max_new_tokens=4"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 1


def test_rerun_with_other_settings_never_relabels_a_finished_run(tiny_cfg):
    """What grid.run_grid meets when a notebook is rerun with other parameters over runs on disk."""
    cfg = tiny_cfg(steps=2)
    train(cfg, progress=False)
    assert train(cfg, resume=True, progress=False)["steps_done"] == 2  # same settings: its results, at once
    with pytest.raises(TokeneffError, match="finished at step 2; steps=1 asks for fewer"):
        train(tiny_cfg(steps=1), resume=True, progress=False)
    with pytest.raises(TokeneffError, match="finished with eval_limit=4 .*; eval_limit=2 now would mislabel them"):
        train(tiny_cfg(steps=2, eval_limit=2), resume=True, progress=False)
    with pytest.raises(TokeneffError, match="holds a different run: lr=0.01 there, 0.02 now"):
        train(tiny_cfg(steps=2, lr=0.02), resume=True, progress=False)
