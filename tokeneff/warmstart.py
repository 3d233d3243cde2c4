"""Supervised warm start: LoRA SFT on a task's training problems with worked answers, merged into the base weights.

Two tasks have one (config `task`): SVAMP (below) and worked-answer multiplication (`task=multiplication`: the
multiplication training split, disjoint from validation and test, with its generated long-multiplication traces
as targets, in the exact prompt RL uses; model name `<base>+sftmul`).

SmolLM2-135M-Instruct answers too few SVAMP problems for RL to get a reward signal, so the experiments can start
from a warm-started base instead (labelled "SmolLM2-135M + SFT warm start"). The recipe:

- data: the SVAMP authors' MAWPS + ASDiv-A training fold shipped with SVAMP (3,138 problems, never a SVAMP
  problem; any whose text equals a SVAMP test problem's would be dropped). Each example is the exact chat prompt
  RL uses (`SVAMP.messages`: instruction, few-shot turns, question) and, as the assistant turn, a worked answer
  in the prompt's answer format built from the data's equation: "25000 - 1500 * 8 = 13000. The answer is 13000."
- training: TRL's `SFTTrainer` on a conversational prompt/completion dataset, so the loss is on the completion
  only (TRL's `completion_only_loss`, its default for that format; it works with any chat template, unlike
  `assistant_only_loss`, which needs `{% generation %}` markers). fp32, seeded, LoRA on q/k/v/o.
- result: the LoRA merged into the weights (peft `merge_and_unload`), saved as an ordinary checkpoint under
  `cache_dir()/warmstart/<model>-<recipe hash>/` with `warmstart.json` (recipe, hash, loss, wall time). The
  folder is written under a temporary name and renamed, so a half-written one is never used; a changed recipe
  (anything that changes the result, library versions included) gets a new folder.

A model name `<base>+sft` (e.g. `smollm2-135m+sft`) loads the warm start of `<base>` with the default recipe, once
built by `tokeneff warmstart --model <name>` (loading never trains: `resolve`); `<base>+sftepoch` is SVAMP's on the
whole epoch, `<base>+sftepochmlp` the same with LoRA on the MLPs too at lr 5e-4, and `<base>+sftmul` worked
multiplication's (config.WARM_STARTS). CLI: `tokeneff warmstart [--model M] [key=value ...]`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

from filelock import FileLock

from .checks import check_lora_targets, check_model_path
from .config import MAX_LR, MAX_SEED, WARM_STARTS, LoraSettings, coerce
from .errors import ConfigError, TokeneffError, clip, show
from .models import cache_dir, load_model
from .rundir import check_writable, write_failure, writing
from .tasks.answer import is_correct
from .tasks.base import format_number
from .tasks.multiplication import N_TEST, N_VAL, TEST_SEED, VAL_SEED, Multiplication
from .tasks.svamp import SVAMP, default_dir, load_mawps_asdiv

MUL_ONLY = ("digits_a", "digits_b", "answer_format")
SAVE_STEPS = 10
"""optimizer steps between a build's trainer checkpoints (LoRA weights, optimiser, scheduler, RNGs: a few MB)"""
ADAPTER = "adapter"
"""the cache entry's folder holding the trained LoRA adapter (peft format), kept beside the merged weights"""
BUILDER_VERSION = 1
"""bump when the way examples or training are built changes: it is part of the recipe hash"""


@dataclass
class WarmStartConfig(LoraSettings):
    model: str = "smollm2-135m"
    """base model: built-in name, hub id or local path"""
    task: str = "svamp"
    """svamp (MAWPS + ASDiv-A with equations as answers) | multiplication (generated worked answers)"""
    digits_a: int = 2
    """multiplication: digits of the factors (the RL runs must use the same)"""
    digits_b: int = 2
    answer_format: str = "worked"
    """multiplication: the answer format taught (tasks/multiplication.py)"""
    num_shots: int = 1
    """few-shot turns in each training prompt: the embedded profile's RL prompt format"""
    svamp_dir: str = ""
    """SVAMP folder holding mawps-asdiv-a_svamp/train.csv; empty: the shipped copy (its content is hashed)"""
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    # LoRA: lora_r, lora_alpha, lora_dropout, lora_targets (config.LoraSettings, the same as RL's)
    seed: int = 0
    max_examples: int = 1200
    """train on a seeded subset of this many problems (0: all 3,120). 1,200 (38% of an epoch) is the default so
    that the default tier fits its hour on a 2-core CPU (build times: results/embedded*/warmstart*.json). Pass
    max_examples=0 for the whole epoch (the full tier's +sftepoch; on a GPU, always)."""

    def validate(self) -> WarmStartConfig:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={show(getattr(self, name))}: {why}")

        if not isinstance(self.model, str) or not self.model.strip():
            raise bad("model", "must be a built-in name, a hub id or a local path")
        if self.task not in ("svamp", "multiplication"):
            raise bad("task", "must be one of svamp, multiplication")
        if self.answer_format not in ("short", "worked"):
            raise bad("answer_format", "must be one of short, worked")
        for name in ("digits_a", "digits_b"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 12:
                raise bad(name, "must be an integer between 1 and 12")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("num_shots", "seed", "max_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be a non-negative integer")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr)
                                                                                      and self.lr > 0):
            raise bad("lr", "must be a positive number")
        if self.lr > MAX_LR:  # as train's: past it the first update destroys the model
            raise bad("lr", f"must be at most {MAX_LR:g} (LoRA learning rates are around 1e-5 to 1e-3)")
        if self.seed > MAX_SEED:
            raise bad("seed", f"must be at most {MAX_SEED} (numpy's seed range)")
        self.check_lora()
        return self


FIELD_NAMES = tuple(f.name for f in fields(WarmStartConfig))


def make_warmstart_config(overrides: dict[str, Any] | None = None) -> WarmStartConfig:
    """Defaults <- overrides (strings from the CLI are converted to each field's type); validated. A warm-start
    name as the model (`model=smollm2-135m+sftmul`) starts from that name's recipe (config.WARM_STARTS)."""
    overrides = dict(overrides or {})
    parts = split_name(str(overrides.get("model", "")))
    values: dict[str, Any] = {}
    if parts:
        overrides["model"], suffix = parts
        values = dict(WARM_STARTS[suffix][0])
    for key, raw in (overrides or {}).items():
        key = key.strip().replace("-", "_")
        if key not in FIELD_NAMES:
            near = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            raise ConfigError(f"unknown warm-start key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        values[key] = coerce(key, raw, getattr(WarmStartConfig, key))
    return WarmStartConfig(**values).validate()


def default_config(base: str, suffix: str = "+sft") -> WarmStartConfig:
    """The recipe a model name `<base><suffix>` resolves to (config.WARM_STARTS)."""
    return WarmStartConfig(**{**WARM_STARTS[suffix][0], "model": base}).validate()


def split_name(name: str) -> tuple[str, str] | None:
    """`smollm2-135m+sftmul` -> ("smollm2-135m", "+sftmul"); None for a name with no warm-start suffix."""
    for suffix in WARM_STARTS:
        if name.endswith(suffix) and name[: -len(suffix)].strip():
            return name[: -len(suffix)], suffix
    return None


def is_warm_start_name(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in WARM_STARTS)


def name_for(cfg: WarmStartConfig) -> str | None:
    """The model name that loads this recipe (`<base><suffix>`), or None when no name does: load it by path."""
    return next((cfg.model + s for s in WARM_STARTS if cfg == default_config(cfg.model, s)), None)


# ----------------------------------------------------------------------------------------------- data


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def answer_text(x: float) -> str:
    """format_number, with more digits where its 6 significant digits would not pass the exact-match reward."""
    text = format_number(x)
    return text if is_correct(text, x) else f"{x:.12g}"


def worked_answer(equation: str, numbers: list[float]) -> tuple[str, float]:
    """A prefix equation ("- number0 * number1 number2") as the infix calculation with the numbers substituted
    and its result, in the prompts' answer format: "25000 - 1500 * 8 = 13000. The answer is 13000."

    Returns (text, value). Parentheses only where precedence needs them.
    """
    tokens = equation.split()
    pos = 0

    def parse() -> tuple[str, float, int]:  # (text, value, precedence; 3 for a number)
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"equation {equation!r} ends early")
        tok = tokens[pos]
        pos += 1
        if tok in _PREC:
            lt, lv, lp = parse()
            rt, rv, rp = parse()
            p = _PREC[tok]
            if lp < p:
                lt = f"({lt})"
            if rp < p or (rp == p and tok in "-/"):
                rt = f"({rt})"
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else math.nan}[tok]
            return f"{lt} {tok} {rt}", value, p
        m = re.fullmatch(r"number(\d+)", tok)
        value = numbers[int(m.group(1))] if m else float(tok)
        return format_number(value), value, 3

    text, value, _ = parse()
    if pos != len(tokens):
        raise ValueError(f"equation {equation!r} has tokens left over")
    result = answer_text(value)
    return f"{text} = {result}. The answer is {result}.", value


def _svamp_dir(cfg: WarmStartConfig) -> Path:
    return Path(cfg.svamp_dir) if cfg.svamp_dir else default_dir()


def _data_file(cfg: WarmStartConfig) -> Path:
    file = _svamp_dir(cfg) / "mawps-asdiv-a_svamp" / "train.csv"
    if not file.is_file():
        raise ConfigError(f"svamp_dir={cfg.svamp_dir!r}: the warm start needs {str(file)!r}, which was not found")
    return file


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9.]+", " ", text.lower()).split())


def make_task(cfg: WarmStartConfig):
    """The task whose RL prompt format the warm start is trained in."""
    if cfg.task == "multiplication":
        return Multiplication(num_shots=cfg.num_shots, digits_a=cfg.digits_a, digits_b=cfg.digits_b,
                              answer_format=cfg.answer_format)
    return SVAMP(num_shots=cfg.num_shots, svamp_dir=str(_svamp_dir(cfg)))


def training_examples(cfg: WarmStartConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The SFT dataset rows ({"prompt": messages, "completion": [assistant turn]}) and counts."""
    if cfg.task == "multiplication":
        return multiplication_examples(cfg)
    return svamp_examples(cfg)


def multiplication_examples(cfg: WarmStartConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Multiplication's training split (disjoint from validation and test by construction) with the generated
    answers; a seeded subset of max_examples."""
    task = make_task(cfg)
    items = list(zip(task.pairs("train"), task.problems("train"), strict=True))
    counts = {"problems": len(items)}
    if cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(items)), min(cfg.max_examples, len(items))))
        items = [items[i] for i in keep]
    return [{"prompt": task.messages(p), "completion": [{"role": "assistant", "content": task.answer_text(a, b)}]}
            for (a, b), p in items], counts


def svamp_examples(cfg: WarmStartConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SVAMP's warm-start rows: MAWPS + ASDiv-A problems with their equation as the worked answer.

    Problems whose equation does not give the dataset's answer, or whose text equals a SVAMP test problem's, are
    left out (none are, in the shipped data).
    """
    task = SVAMP(num_shots=cfg.num_shots, svamp_dir=str(_svamp_dir(cfg)))
    problems = load_mawps_asdiv(_svamp_dir(cfg))
    with _data_file(cfg).open(newline="") as f:
        rows = list(csv.DictReader(f))
    test_texts = {_normalise(p.question) for p in task.problems("test")}
    counts = {"problems": len(problems), "dropped_test_overlap": 0, "dropped_bad_equation": 0}
    items = []
    for problem, row in zip(problems, rows, strict=True):
        if _normalise(problem.question) in test_texts:
            counts["dropped_test_overlap"] += 1
            continue
        try:
            text, value = worked_answer(row["Equation"], [float(n) for n in row["Numbers"].split()])
        except (ValueError, IndexError):
            counts["dropped_bad_equation"] += 1
            continue
        if not is_correct(answer_text(value), problem.answer):
            counts["dropped_bad_equation"] += 1
            continue
        items.append((problem, text))
    if cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(items)), min(cfg.max_examples, len(items))))
        items = [items[i] for i in keep]
    return [{"prompt": task.messages(p), "completion": [{"role": "assistant", "content": text}]}
            for p, text in items], counts


# ----------------------------------------------------------------------------------------------- cache


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    out = {pkg: version(pkg) for pkg in ("trl", "transformers", "peft")}
    out["torch"] = version("torch").split("+")[0]
    return out


def recipe(cfg: WarmStartConfig) -> dict[str, Any]:
    """Everything that changes the result: the config (less the data's location), the data's content, the
    prompt format, the builder and the library versions."""
    cfg.validate()
    task = make_task(cfg)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "svamp_dir"}
    if cfg.task == "svamp":  # the fields added for multiplication leave SVAMP's recipe (and its hash) as it was
        config = {k: v for k, v in config.items() if k not in MUL_ONLY + ("task",)}
        data = {"data_sha256": _sha256(_data_file(cfg)),
                "svamp_sha256": _sha256(_svamp_dir(cfg) / "SVAMP.json")
                if (_svamp_dir(cfg) / "SVAMP.json").is_file() else None}  # the test split kept out
    else:  # generated data: the split seeds and the generator are the data
        data = {"generator": dict(test_seed=TEST_SEED, val_seed=VAL_SEED, n_test=N_TEST, n_val=N_VAL,
                                  train_seed=0, n_train=task.n_train)}
    return {
        "config": config,
        **data,
        "prompt": {"instruction": task.instruction, "shots": [list(s) for s in task.shots[: cfg.num_shots]]},
        "builder_version": BUILDER_VERSION,
        "versions": _versions(),
    }


def recipe_hash(cfg: WarmStartConfig) -> str:
    text = json.dumps(recipe(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def progress_dir(cfg: WarmStartConfig) -> Path:
    """Where a build keeps its trainer checkpoints until it is done (a stopped build resumes from them)."""
    target = cache_path(cfg)
    return target.parent / f".{target.name}.progress"


def cache_path(cfg: WarmStartConfig) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "--", cfg.model.strip().strip("/"))[-80:]
    return cache_dir() / "warmstart" / f"{name}-{recipe_hash(cfg)}"


def is_complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "warmstart.json").is_file()


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
ADAPTER_FILES = (*PEFT_FILES, "warmstart.json")
"""what a kept adapter's folder holds: peft's two files and the build's record (its recipe hash)"""


def check_adapters(adapters: str | Path | None, writable: bool = True) -> Path | None:
    """The --adapters folder, checked before any work: a folder (or, `writable`, one that can be created and
    written)."""
    if adapters is None:
        return None
    if not str(adapters).strip():
        raise ConfigError("adapters='': give a folder (e.g. results/embedded-full/warmstarts)")
    path = Path(adapters).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"adapters={str(adapters)!r}: not a folder (a folder of trained adapters, or one to create)")
    try:
        if writable:
            check_writable(path, "adapters", str(adapters))
    except TokeneffError as e:
        raise ConfigError(str(e)) from None
    return path


def shipped_adapter(cfg: WarmStartConfig, adapters: str | Path | None) -> Path | None:
    """`adapters/<cache entry name>/` where it holds this recipe's trained adapter (ADAPTER_FILES); the folder name
    carries the recipe hash, library versions included, so no other recipe's adapter matches. A folder of that
    name that is incomplete, unreadable or of another recipe is a one-line error, not silently trained around."""
    if adapters is None:
        return None
    src = Path(adapters).expanduser() / cache_path(cfg).name
    try:
        if not src.exists():
            return None
        missing = [n for n in ADAPTER_FILES if not (src / n).is_file()]
        if missing:
            raise ConfigError(f"adapters={str(adapters)!r}: {src.name}/ lacks {', '.join(missing)}: remove that "
                              "folder (a build then trains and writes it whole) or restore the files")
        info = json.loads((src / "warmstart.json").read_text())
        peft_cfg = json.loads((src / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapters={str(adapters)!r}: {src.name}/ is unreadable or damaged "
                          f"({getattr(e, 'strerror', None) or e}): remove it or point --adapters elsewhere") from None
    if not isinstance(info, dict) or not isinstance(peft_cfg, dict):
        raise ConfigError(f"adapters={str(adapters)!r}: {src.name}/ is damaged (a JSON file is not an object): "
                          "remove it or point --adapters elsewhere")
    if info.get("recipe_hash") != recipe_hash(cfg):
        raise ConfigError(f"adapters={str(adapters)!r}: {src.name}/warmstart.json is for recipe "
                          f"{show(info.get('recipe_hash'))}, not {recipe_hash(cfg)}: remove it or point --adapters "
                          "elsewhere")
    return src


def export_adapter(built: Path, adapters: str | Path) -> Path | None:
    """Copy a built entry's adapter and warmstart.json to `adapters/<entry name>/` (written whole under a
    temporary name, then renamed); an existing copy is left as it is. None: the entry has no adapter (built
    before adapters were kept)."""
    if not (built / ADAPTER / "adapter_model.safetensors").is_file():
        return None
    dest = Path(adapters).expanduser() / built.name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        for name in PEFT_FILES:
            shutil.copyfile(built / ADAPTER / name, tmp / name)
        shutil.copyfile(built / "warmstart.json", tmp / "warmstart.json")
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another process exported the same adapter first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_warm_start(cfg: WarmStartConfig | None = None, progress: bool = True,
                     adapters: str | Path | None = None, export: bool = True) -> Path:
    """The cached warm-started checkpoint for this recipe; trained, merged and saved first if missing.

    `adapters`: a folder of trained adapters (e.g. committed with the results). Where it holds this recipe's, the
    entry is built by merging it into the base weights (a minute) instead of training (hours on a CPU); with
    `export`, the entry's adapter is then copied there if it is not yet. Concurrent callers (e.g. data-parallel
    ranks) wait on a file lock and then reuse the first one's result.
    """
    cfg = (cfg or WarmStartConfig()).validate()
    adapters = check_adapters(adapters, writable=export)
    target = cache_path(cfg)
    if is_complete(target):
        return _exported(target, adapters if export else None)
    src = shipped_adapter(cfg, adapters)  # checked before anything is written
    check_model_path(cfg.model)  # a damaged local model: one line, before anything is written
    try:
        check_writable(target.parent, "cache")
    except TokeneffError as e:
        raise ConfigError(f"{e} (TOKENEFF_CACHE={os.environ.get('TOKENEFF_CACHE', '')!r}: the warm start is cached "
                          "there; point it to a writable folder)") from None

    def cache_error(e: BaseException, what: str) -> ConfigError:
        return ConfigError(f"could not write {what} ({write_failure(e)}): nothing was cached; free space or point "
                           "TOKENEFF_CACHE to a writable folder")

    with writing(f"the warm start in {str(target.parent)!r}", cache_error):
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{target.name}.lock")):
            if not is_complete(target):
                tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
                try:
                    if src is not None:
                        _merge_and_save(cfg, src, tmp)
                    else:
                        _train_and_save(cfg, tmp, progress)
                    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of the final name, if any
                    os.replace(tmp, target)  # atomic: a half-written warm start is never seen under its name
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return _exported(target, adapters if export else None)


def describe_adapter(built: Path, adapters: str | Path | None) -> str:
    """One line for the CLI: how the entry was built and where its adapter is kept."""
    info = json.loads((built / "warmstart.json").read_text())
    how = f"merged from the kept adapter {info['merged_from_adapter']}" if info.get("merged_from_adapter") else \
        "trained"
    if adapters is None:
        return f"built: {how}"
    kept = Path(adapters).expanduser() / built.name
    where = f"kept in {str(kept)!r}" if kept.is_dir() else "none (this entry was built before adapters were kept)"
    return f"built: {how}; adapter: {where}"


def _exported(built: Path, adapters: Path | None) -> Path:
    if adapters is not None:
        with writing(f"the adapter in {str(adapters)!r}"):
            export_adapter(built, adapters)
    return built


KEPT_ADAPTERS = Path("embedded-full") / "warmstarts"
"""where, under a results folder, the committed warm starts' adapters are kept (the Makefile's --adapters)"""


def resolve(name: str, build: bool = False, adapters: str | Path | None = None) -> Path:
    """`<base>+sft` (and the other config.WARM_STARTS suffixes) -> the warm start's folder. Loading never trains:
    without `build`, a warm start not built yet is a one-line error naming the command that builds it. With
    `build`, a kept adapter in `adapters` is merged rather than trained (nothing is written there)."""
    parts = split_name(name)
    if parts is None:
        raise ConfigError(f"model={name!r}: a warm-start name is <base> followed by one of "
                          f"{', '.join(WARM_STARTS)}, e.g. smollm2-135m+sft")
    cfg = default_config(*parts)
    if build:
        return build_warm_start(cfg, adapters=adapters, export=False)
    target = cache_path(cfg)
    if not is_complete(target):
        raise TokeneffError(f"model={name!r}: this warm start is not built yet (recipe {recipe_hash(cfg)} in "
                            f"{str(target.parent)!r}): build it once with `tokeneff warmstart --model {name}` "
                            "(tens of minutes on a CPU; README, \"Warm starts\")")
    return target


def model_folder(name: str) -> str:
    """What `models.load_model` takes: a warm-start name becomes its built folder; any other name passes through."""
    return str(resolve(name)) if is_warm_start_name(name) else name


# ----------------------------------------------------------------------------------------------- training


def _train_and_save(cfg: WarmStartConfig, out: Path, progress: bool) -> None:
    import datasets
    import torch
    from transformers import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    rows, counts = training_examples(cfg)
    if not rows:
        raise ConfigError(f"max_examples={cfg.max_examples!r}: no training examples left")
    model, tok = load_model(cfg.model, dtype=torch.float32)
    check_lora_targets(model, cfg.lora_target_list(), cfg.model, cfg.lora_r)
    tok.padding_side = "right"
    steps = math.ceil(len(rows) / cfg.batch_size) * cfg.epochs
    # Trainer checkpoints in a folder of their own beside the cache entry: a build stopped by Ctrl-C, a kill or the
    # end of a session resumes from its last one (the whole SVAMP epoch takes hours on one CPU thread).
    ckpts = progress_dir(cfg)
    last = get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None
    done_before = int(Path(last).name.rsplit("-", 1)[-1]) if last else 0  # checkpoint-<optimizer step>
    args = SFTConfig(
        output_dir=str(ckpts), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, seed=cfg.seed, data_seed=cfg.seed,
        bf16=False, fp16=False, activation_checkpointing=False,  # fp32 (TRL defaults: bf16, checkpointing)
        completion_only_loss=True,  # loss on the assistant's answer only (prompt/completion dataset)
        max_length=None,  # no truncation: the longest example is a few hundred tokens
        logging_steps=max(1, steps // 20), logging_first_step=True, save_strategy="steps", save_steps=SAVE_STEPS,
        save_total_limit=1, report_to="none",
        push_to_hub=False, disable_tqdm=not progress, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    peft_config = cfg.peft_config()
    with _quiet(not progress):
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=peft_config)
        if not progress:
            trainer.remove_callback(PrinterCallback)  # the per-log-step lines printed when tqdm is off
        if last and progress:
            print(f"resuming the warm start from {last}", flush=True)
        result = trainer.train(resume_from_checkpoint=last)
        # the LoRA adapter itself, beside the merged weights: a few MB that rebuild this entry in a minute
        # (`tokeneff warmstart --adapters DIR`), where training it again takes hours on a CPU
        trainer.model.save_pretrained(out / ADAPTER)
        merged = trainer.model.merge_and_unload()
        if not _all_finite(merged):  # never cached: later runs would reuse it
            shutil.rmtree(ckpts, ignore_errors=True)  # nor resumed
            raise ConfigError(f"the warm start's weights are not finite after training (lr={cfg.lr:g}: too large?): "
                              "nothing was cached")
        _save_merged(merged, tok, out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {
        "label": f"{cfg.model} + SFT warm start",
        "recipe_hash": recipe_hash(cfg),
        "recipe": recipe(cfg),
        "examples": len(rows),
        "data_counts": counts,
        "optimizer_steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "loss_log": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "resumed_from": Path(last).name if last else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "train_seconds": round(result.metrics["train_runtime"], 2),
        "train_seconds_per_example": round(result.metrics["train_runtime"] / max(1, min(
            len(rows) * cfg.epochs, (trainer.state.global_step - done_before) * cfg.batch_size)), 4),
    }
    (out / "warmstart.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(ckpts, ignore_errors=True)  # built: build_warm_start renames `out` into place next
    os.chmod(out, 0o755)  # mkdtemp made it private; the cache is an ordinary folder


def _merge_and_save(cfg: WarmStartConfig, src: Path, out: Path) -> None:
    """A cache entry from a trained adapter: the same merge `_train_and_save` ends with, so the same weights."""
    import torch
    from peft import PeftModel

    start = time.perf_counter()
    info = json.loads((src / "warmstart.json").read_text())  # checked by shipped_adapter
    model, tok = load_model(cfg.model, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - peft/safetensors raise many kinds for a damaged or mismatched adapter
        raise ConfigError(f"{str(src)!r}: the adapter does not load ({type(e).__name__}: {clip(str(e), 160)}): "
                          "remove that folder or point --adapters elsewhere") from None
    if not _all_finite(merged):
        raise ConfigError(f"{str(src)!r}: the adapter's weights are not finite: nothing was cached")
    _save_merged(merged, tok, out)
    (out / ADAPTER).mkdir()
    for name in PEFT_FILES:
        shutil.copyfile(src / name, out / ADAPTER / name)
    info.update(merged_from_adapter=str(src), merge_seconds=round(time.perf_counter() - start, 2))
    (out / "warmstart.json").write_text(json.dumps(info, indent=2) + "\n")
    os.chmod(out, 0o755)


def _all_finite(model) -> bool:
    import torch

    return all(torch.isfinite(p).all() for p in model.parameters())


def _save_merged(merged, tok, out: Path) -> None:
    """The cache entry's weights and tokenizer, as both ways of building it write them (the same bytes)."""
    merged.config.use_cache = True  # the trainer turned it off for training; an inference checkpoint has it on
    merged.save_pretrained(out, safe_serialization=True)
    tok.padding_side = "left"  # as rollouts and evaluation pad
    tok.save_pretrained(out)


@contextlib.contextmanager
def _quiet(on: bool):
    """Turn off the datasets and transformers progress bars (tokenising, saving) while `on`."""
    import datasets
    import transformers

    was = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    if on:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if on and was[0]:
            datasets.enable_progress_bars()
        if on and was[1]:
            transformers.utils.logging.enable_progress_bar()
