"""Supervised warm start (warmstart.py): built once on tiny-random with 16 problems, cached, reused, rebuilt when
the recipe changes, never half-written, loadable as `<base>+sft`, and never trained on a SVAMP test problem."""

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

from tokeneff import warmstart as ws
from tokeneff.errors import ConfigError, TokeneffError
from tokeneff.models import load_model, tiny_random
from tokeneff.rollout import build_prompt
from tokeneff.tasks import SVAMP, extract_answer

TINY = dict(model="tiny-random", max_examples=16, batch_size=4, lr=1e-2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENEFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def built(cache):
    cfg = ws.make_warmstart_config(TINY)
    return cfg, ws.build_warm_start(cfg, progress=False)


def answer_logprob(model, tok, row) -> float:
    """Sum of log-probabilities of a training example's answer tokens after its prompt."""
    prompt = build_prompt(tok, row["prompt"])
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return logp[len(p) - 1:].gather(-1, targets[len(p) - 1:, None]).sum().item()


def test_build_trains_merges_and_records(built):
    cfg, path = built
    assert path.parent == Path(os.environ["TOKENEFF_CACHE"]) / "warmstart"
    assert path.name == f"tiny-random-{ws.recipe_hash(cfg)}"
    info = json.loads((path / "warmstart.json").read_text())
    assert info["examples"] == 16 and info["recipe_hash"] == ws.recipe_hash(cfg)
    assert info["recipe"]["config"]["lr"] == 1e-2 and info["recipe"]["versions"]["trl"]
    assert info["wall_seconds"] > 0 and info["optimizer_steps"] == 4
    assert info["loss_log"][-1]["loss"] < info["loss_log"][0]["loss"]

    warm, tok = load_model(str(path))  # an ordinary merged checkpoint: no adapter
    base, _ = tiny_random()
    assert not any("lora" in n for n, _ in warm.named_parameters())
    w, b = warm.state_dict(), base.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w[q], b[q])  # LoRA merged into the attention projections
    assert torch.equal(w["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # not a LoRA target

    rows, _ = ws.training_examples(cfg)
    warm.eval(), base.eval()
    assert answer_logprob(warm, tok, rows[0]) > answer_logprob(base, tok, rows[0]) + 1.0


def test_second_call_reuses_the_cache(built, monkeypatch):
    cfg, path = built
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("rebuilt a cached warm start")

    monkeypatch.setattr(ws, "_train_and_save", no_training)
    assert ws.build_warm_start(ws.make_warmstart_config(TINY), progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_kept_adapter_rebuilds_the_same_weights_without_training(built, tmp_path, monkeypatch):
    """The adapter a build keeps, exported to a folder (as committed with the results), rebuilds the cache entry
    in a fresh cache by merging alone, to the same bytes; an adapter of another recipe is refused."""
    cfg, path = built
    shelf = tmp_path / "warmstarts"
    assert ws.build_warm_start(cfg, progress=False, adapters=shelf) == path  # cached: exported only
    kept = shelf / path.name
    assert sorted(p.name for p in kept.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "warmstart.json"]

    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(ws, "_train_and_save", lambda *a, **k: pytest.fail("trained although an adapter was kept"))
    again = ws.build_warm_start(cfg, progress=False, adapters=shelf)
    assert again != path and again.name == path.name
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (path / name).read_bytes(), name
    assert json.loads((again / "warmstart.json").read_text())["merged_from_adapter"] == str(kept)

    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "other"))
    info = json.loads((kept / "warmstart.json").read_text())
    (kept / "warmstart.json").write_text(json.dumps(dict(info, recipe_hash="0" * 16)))
    with pytest.raises(ConfigError, match="warmstart.json is for recipe '0000000000000000'"):
        ws.build_warm_start(cfg, progress=False, adapters=shelf)
    assert not (tmp_path / "other" / "warmstart" / path.name).exists()  # nothing half-built under its name
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="adapters=.*file.*: not a folder"):
        ws.build_warm_start(cfg, progress=False, adapters=tmp_path / "file")


def _damage(folder: Path, how: str) -> None:
    if how == "missing":
        (folder / "adapter_config.json").unlink()
    elif how == "bad json":
        (folder / "warmstart.json").write_text('{"recipe_hash": ')
    elif how == "not an object":
        (folder / "adapter_config.json").write_text("[1, 2]")
    elif how == "truncated weights":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how, needle", [
    ("missing", "lacks adapter_config.json"),
    ("bad json", "is unreadable or damaged"),
    ("not an object", "is damaged (a JSON file is not an object)"),
    ("truncated weights", "the adapter does not load"),
])
def test_a_damaged_kept_adapter_is_one_line_and_nothing_is_cached(built, tmp_path, monkeypatch, capsys, how, needle):
    from tokeneff.cli import main

    cfg, path = built
    shelf = tmp_path / "warmstarts"
    ws.export_adapter(path, shelf)
    _damage(shelf / path.name, how)
    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(ws, "_train_and_save", lambda *a, **k: pytest.fail("trained around a damaged adapter"))
    argv = ["warmstart", "--model", "tiny-random", "--adapters", str(shelf)]
    assert main(argv + [f"{k}={v}" for k, v in TINY.items() if k != "model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and path.name in err, err
    assert not (tmp_path / "fresh" / "warmstart" / path.name).exists()


@pytest.mark.parametrize("where, needle", [("", "adapters='': give a folder"),
                                           ("file", "not a folder"), ("file/sub", "is a file, not a folder")])
def test_a_bad_adapters_folder_is_refused_before_any_work(built, tmp_path, monkeypatch, where, needle):
    cfg, _ = built
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "fresh"))  # not built: the check must come first
    monkeypatch.setattr(ws, "_train_and_save", lambda *a, **k: pytest.fail("trained before checking --adapters"))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ws.build_warm_start(cfg, progress=False, adapters=str(tmp_path / where) if where else "")


def test_cli_says_how_the_entry_was_built_and_where_its_adapter_is_kept(built, tmp_path, capsys):
    from tokeneff.cli import main

    cfg, path = built
    argv = ["warmstart", "--model", "tiny-random", "--adapters", str(tmp_path / "kept")]
    assert main(argv + [f"{k}={v}" for k, v in TINY.items() if k != "model"]) == 0
    out = capsys.readouterr().out
    assert f"built: trained; adapter: kept in '{tmp_path / 'kept' / path.name}'" in out
    assert (tmp_path / "kept" / path.name / "adapter_model.safetensors").is_file()


def test_changed_recipe_or_data_gives_another_folder(built, tmp_path):
    cfg, path = built
    for change in (dict(lr=2e-2), dict(seed=1), dict(max_examples=17), dict(lora_r=8), dict(num_shots=2),
                   dict(model="smollm2-135m")):
        other = ws.make_warmstart_config({**TINY, **change})
        assert ws.cache_path(other) != path, change
    # the data's location is not part of the recipe, its content is
    src = ws._svamp_dir(cfg)
    copy = tmp_path / "svamp"
    (copy / "mawps-asdiv-a_svamp").mkdir(parents=True)
    (copy / "SVAMP.json").write_bytes((src / "SVAMP.json").read_bytes())
    csv = (src / "mawps-asdiv-a_svamp" / "train.csv").read_bytes()
    (copy / "mawps-asdiv-a_svamp" / "train.csv").write_bytes(csv)
    assert ws.cache_path(ws.make_warmstart_config({**TINY, "svamp_dir": str(copy)})) == path
    (copy / "mawps-asdiv-a_svamp" / "train.csv").write_bytes(csv.replace(b"books", b"novels"))
    assert ws.cache_path(ws.make_warmstart_config({**TINY, "svamp_dir": str(copy)})) != path


def test_interrupted_build_is_never_used(cache, monkeypatch):
    cfg = ws.make_warmstart_config({**TINY, "seed": 7})
    target = ws.cache_path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)

    def killed(cfg, out, progress):  # dies half-way through writing
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ws, "_train_and_save", killed)
    with pytest.raises(KeyboardInterrupt):
        ws.build_warm_start(cfg, progress=False)
    assert not target.exists()
    assert not list(target.parent.glob(f".{target.name}-*"))  # its temporary folder was removed

    # a process killed outright (SIGKILL) leaves its temporary folder behind, and may have left an incomplete
    # folder under the final name: neither is used, the next call builds
    leftover = target.parent / f".{target.name}-dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    (leftover / "warmstart.json").write_text("{}")
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"partial")
    calls = []

    def fake(cfg, out, progress):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"complete")
        (out / "warmstart.json").write_text("{}")

    monkeypatch.setattr(ws, "_train_and_save", fake)
    assert ws.build_warm_start(cfg, progress=False) == target
    assert len(calls) == 1 and calls[0] != leftover
    assert (target / "model.safetensors").read_bytes() == b"complete"


def test_sft_model_name_loads_the_warm_start(built, monkeypatch):
    cfg, path = built
    monkeypatch.setattr(ws, "default_config",
                        lambda base, suffix="+sft": ws.make_warmstart_config({**TINY, "model": base}))
    monkeypatch.setattr(ws, "_train_and_save", lambda *a, **k: pytest.fail("rebuilt"))
    assert ws.resolve("tiny-random+sft") == path
    model, tok = load_model(ws.model_folder("tiny-random+sft"))
    assert tok.padding_side == "left" and tok.chat_template and tok.pad_token_id is not None
    ids = tok(build_prompt(tok, [{"role": "user", "content": "1 + 1?"}]), return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_cli_prints_folder_and_hash(built, capsys):
    from tokeneff.cli import main

    cfg, path = built
    argv = ["warmstart", "--model", "tiny-random"] + [f"{k}={v}" for k, v in TINY.items() if k != "model"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(path) in out and ws.recipe_hash(cfg) in out


@pytest.mark.parametrize("over, needle", [
    (dict(lr="-1"), "lr=-1.0"),
    (dict(lr="fast"), "lr='fast'"),
    (dict(batch_size="0"), "batch_size=0"),
    (dict(max_examples="-3"), "max_examples=-3"),
    (dict(epochs="1.5"), "epochs='1.5'"),
    (dict(lora_dropout="1"), "lora_dropout=1.0"),
    (dict(lora_targets=" , "), "lora_targets"),
    (dict(model=""), "model=''"),
    (dict(max_example="1"), "did you mean 'max_examples'"),
    (dict(lr="5"), "lr=5.0: must be at most 1"),  # as train's ranges: never a NaN model in the cache
    (dict(seed=str(2**40)), "seed=1099511627776: must be at most"),
])
def test_bad_option_is_one_line_config_error(over, needle, capsys):
    from tokeneff.cli import main

    with pytest.raises(ConfigError) as e:
        ws.make_warmstart_config(over)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1
    assert main(["warmstart"] + [f"{k}={v}" for k, v in over.items()]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="<base>"):
        ws.resolve("+sft")


def test_training_data_has_no_svamp_test_problem_and_the_rl_prompt_format():
    cfg = ws.WarmStartConfig(model="tiny-random", max_examples=0)
    rows, counts = ws.training_examples(cfg)
    assert counts["problems"] == 3138 and len(rows) == 3138 - counts["dropped_bad_equation"] > 3100
    assert counts["dropped_test_overlap"] == 0
    subset, _ = ws.training_examples(ws.WarmStartConfig(model="tiny-random"))  # the default: a seeded 1,200
    assert len(subset) == 1200 and all(r in rows for r in subset[:50])

    def norm(text):
        return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())

    svamp = SVAMP(num_shots=cfg.num_shots)
    test = {norm(p.question) for p in svamp.problems("test")}
    assert len(test) == 300
    questions = [r["prompt"][-1]["content"] for r in rows]
    assert not test & {norm(q) for q in questions}
    assert not test & {norm(m["content"]) for r in rows[:1] for m in r["prompt"]}  # nor the few-shot turns

    # the prompt is exactly what RL sends (same messages, same template), the answer in the prompt's format
    _, tok = tiny_random()
    for row in rows[:50]:
        assert row["prompt"][:-1] == svamp.messages(svamp.problems("test")[0])[:-1]
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        assert full.startswith(build_prompt(tok, row["prompt"]))
        answer = row["completion"][0]["content"]
        assert re.fullmatch(r"[\d.()+\-*/ ]+ = [\d.]+\. The answer is [\d.]+\.", answer), answer
        assert extract_answer(answer) is not None


@pytest.mark.parametrize("eq, nums, text", [
    ("- number0 * number1 number2", [25000, 1500, 8], "25000 - 1500 * 8 = 13000. The answer is 13000."),
    ("/ + number0 number1 number2", [9, 7, 8], "(9 + 7) / 8 = 2. The answer is 2."),
    ("- number0 - number1 number2", [9, 7, 1], "9 - (7 - 1) = 3. The answer is 3."),
    ("- - number0 number1 number2", [9, 7, 1], "9 - 7 - 1 = 1. The answer is 1."),
    ("* number0 12.0", [2.5], "2.5 * 12 = 30. The answer is 30."),
    ("/ number0 number1", [10, 4], "10 / 4 = 2.5. The answer is 2.5."),
    ("/ number0 number1", [4, 3], "4 / 3 = 1.33333333333. The answer is 1.33333333333."),
])
def test_worked_answer(eq, nums, text):
    assert ws.worked_answer(eq, [float(n) for n in nums])[0] == text


def test_non_finite_weights_are_never_cached(cache, monkeypatch):
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def diverged(self, *a, **k):  # what an absurd learning rate leaves
        model = real(self, *a, **k)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", diverged)
    cfg = ws.make_warmstart_config({**TINY, "seed": 11})
    with pytest.raises(ConfigError, match="weights are not finite.*nothing was cached"):
        ws.build_warm_start(cfg, progress=False)
    target = ws.cache_path(cfg)
    assert not target.exists() and not [p for p in target.parent.glob(f".{target.name}-*") if p.is_dir()]


def test_unwritable_cache_is_one_line_for_warmstart(tmp_path, monkeypatch, capsys):
    from tokeneff.cli import main

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TOKENEFF_CACHE", str(tmp_path / "file" / "cache"))
    for argv in (["warmstart", "--model", "tiny-random", "max_examples=4"],
                 ["warmstart", "--model", "tiny-random+sftmul", "max_examples=4"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a file, not a folder" in err and "TOKENEFF_CACHE" in err, err


def test_loading_never_trains_a_warm_start_not_built_is_one_line_naming_the_command(cache, tmp_path, monkeypatch,
                                                                                   capsys):
    from tokeneff.cli import main

    monkeypatch.setattr(ws, "_train_and_save", lambda *a, **k: pytest.fail("loading trained a warm start"))
    for name in ("tiny-random+sft", "tiny-random+sftepoch", "tiny-random+sftmul"):
        for argv in (["train", "--model", name, "--task", "multiplication", "--steps", "1", "--out",
                      str(tmp_path / "run")],
                     ["evaluate", "--model", name, "--task", "multiplication", "--out", str(tmp_path / "e.json")]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "not built yet" in err, err
            assert f"tokeneff warmstart --model {name}" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "e.json").exists()
    with pytest.raises(TokeneffError, match="is a warm start"):
        load_model("tiny-random+sft")  # below the name: only folders and plain names


def test_a_warm_start_name_given_to_the_warmstart_command_builds_that_recipe():
    cfg = ws.make_warmstart_config({"model": "smollm2-135m+sftmul", "max_examples": "10"})
    assert cfg == dataclasses.replace(ws.default_config("smollm2-135m", "+sftmul"), max_examples=10)
    assert ws.make_warmstart_config({"model": "smollm2-135m+sftepoch"}) == ws.default_config("smollm2-135m",
                                                                                              "+sftepoch")


def test_multiplication_warm_start_trains_on_worked_answers_of_training_products_only():
    from tokeneff.tasks.multiplication import Multiplication, worked_answer

    cfg = ws.default_config("smollm2-135m", "+sftmul")
    rows, counts = ws.training_examples(cfg)
    assert len(rows) == cfg.max_examples and counts["problems"] == 5000
    task = Multiplication(digits_a=2, digits_b=2)
    held = {f"What is {a} * {b}?" for a, b in task.pairs("val") + task.pairs("test")}
    questions = [r["prompt"][-1]["content"] for r in rows]
    assert not held & set(questions)
    a, b = (int(x) for x in questions[0].removeprefix("What is ").rstrip("?").split(" * "))
    assert rows[0]["completion"][0]["content"] == worked_answer(a, b)
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]  # zero-shot: the recipe's num_shots=0
    # SVAMP's recipe is what it was before multiplication was added: its hash and cached warm start stay valid
    committed = json.loads(Path("results/embedded-full/warmstart.json").read_text())["recipe"]
    assert ws.recipe(ws.default_config("smollm2-135m"))["config"] == committed["config"]
    assert ws.split_name("smollm2-135m+sftmul") == ("smollm2-135m", "+sftmul")
    assert ws.split_name("smollm2-135m+sft") == ("smollm2-135m", "+sft") and ws.split_name("smollm2-135m") is None
    # the whole-epoch SVAMP warm start differs from the default only in taking every training problem
    epoch = ws.default_config("smollm2-135m", "+sftepoch")
    assert epoch.task == "svamp" and epoch.max_examples == 0
    assert dataclasses.replace(epoch, max_examples=ws.default_config("smollm2-135m").max_examples) == \
        ws.default_config("smollm2-135m")
    assert [ws.name_for(ws.default_config("smollm2-135m", s)) for s in ("+sft", "+sftepoch", "+sftmul")] == \
        ["smollm2-135m+sft", "smollm2-135m+sftepoch", "smollm2-135m+sftmul"]
    assert ws.name_for(dataclasses.replace(epoch, lr=1e-4)) is None
    from tokeneff.analysis.report import model_label

    assert [model_label(f"smollm2-135m{s}") for s in ("", "+sft", "+sftepoch", "+sftmul")] == [
        "SmolLM2-135M-Instruct", "SmolLM2-135M + SFT warm start", "SmolLM2-135M + SFT warm start (whole epoch)",
        "SmolLM2-135M + SFT warm start (worked multiplication)"]
    assert model_label("Qwen/Qwen2-1.5B+sft") == "Qwen/Qwen2-1.5B + SFT warm start"


def test_a_stopped_build_resumes_from_its_last_trainer_checkpoint_and_ends_as_an_unstopped_one(cache, monkeypatch,
                                                                                               capsys):
    """The whole SVAMP epoch takes hours on one thread: a build stopped by Ctrl-C, a kill or the end of a session
    continues from its last trainer checkpoint instead of starting over."""
    from safetensors.torch import load_file
    from transformers import Trainer

    monkeypatch.setattr(ws, "SAVE_STEPS", 1)
    cfg = ws.make_warmstart_config({**TINY, "seed": 21, "lr": 9e-3})  # its own cache entry, otherwise the same
    real, calls = Trainer.training_step, []

    def stopped_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", stopped_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ws.build_warm_start(cfg, progress=False)
    assert not ws.is_complete(ws.cache_path(cfg))
    assert [p.name for p in ws.progress_dir(cfg).glob("checkpoint-*")] == ["checkpoint-2"]  # the last one only
    resumed_steps = []
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **k: resumed_steps.append(1) or real(self, *a, **k))
    path = ws.build_warm_start(cfg, progress=True)
    assert len(resumed_steps) == 2  # steps 3 and 4 only: 1 and 2 came from the checkpoint
    info = json.loads((path / "warmstart.json").read_text())
    assert info["resumed_from"] == "checkpoint-2" and info["optimizer_steps"] == 4
    assert "resuming the warm start from" in capsys.readouterr().out
    assert not ws.progress_dir(cfg).exists()  # done: the checkpoints are gone
    # and it ends where an unstopped build of the same recipe ends
    monkeypatch.setattr(ws, "progress_dir", lambda c: ws.cache_path(cfg).parent / ".again.progress")
    monkeypatch.setattr(Trainer, "training_step", real)
    again = ws._train_and_save  # build the same recipe afresh into a folder of its own
    fresh = ws.cache_path(cfg).parent / "fresh"
    fresh.mkdir()
    again(cfg, fresh, False)
    a, b = load_file(path / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
