"""Greedy pass@1 accuracy on held-out problems, with every problem's completion kept for inspection."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checks import _safetensors_problem, check_context, check_model_path, check_precision
from .config import make_config
from .errors import TokeneffError, clip, show
from .models import load_model
from .rollout import build_prompt, decode, encode_prompts, sample
from .rundir import check_out_file, write_failure
from .tasks import Problem, Task, extract_answer, is_correct, make_task
from .utils import set_threads, write_json
from .warmstart import model_folder


def evaluate_model(model, tokenizer, task: Task, problems: list[Problem], batch_size: int,
                   max_new_tokens: int, progress: bool = True, **rollout) -> dict[str, Any]:
    """Greedy completions of `problems` in batches; `rollout`: `sample`'s backend keywords (cfg.rollout_options())."""
    records = []  # `sample` runs the model in eval mode and restores its mode
    bar = tqdm(range(0, len(problems), batch_size), desc=f"eval {task.name}", disable=not progress,
               leave=False)
    for start in bar:
        batch = problems[start: start + batch_size]
        prompts = [build_prompt(tokenizer, task.messages(p)) for p in batch]
        roll = sample(model, tokenizer, encode_prompts(tokenizer, prompts), 1, max_new_tokens, greedy=True, **rollout)
        for p, prompt, comp, cut in zip(batch, prompts, roll.completions, roll.truncated, strict=True):
            text = decode(tokenizer, comp)
            records.append(dict(id=p.id, prompt=prompt, completion=text, extracted=extract_answer(text),
                                reference=p.answer, correct=is_correct(text, p.answer), truncated=cut))
    n = len(records)
    return dict(task=task.name, n=n, accuracy=sum(r["correct"] for r in records) / max(n, 1), records=records)


def evaluate(task: str = "svamp", model: str = "smollm2-135m", adapter: str | None = None,
             split: str = "test", limit: int = 0, out: str | None = None, profile: str = "embedded",
             progress: bool = True, **overrides) -> dict[str, Any]:
    """Accuracy of `model` (optionally with a LoRA adapter: a run's adapter/ folder, or the run folder) on a task
    split; JSON to `out`. Every input and the output path are checked before the model is loaded."""
    cfg = make_config(profile, overrides=dict(task=task, model=model, **overrides))
    check_precision(cfg.mixed_precision)
    if limit < 0:
        raise TokeneffError(f"limit={limit}: must not be negative")
    if out:
        out = str(check_out_file(out, "out"))
    t = make_task(cfg)
    problems = t.problems(split)
    if not problems:
        raise TokeneffError(f"task {cfg.task!r}: its {split} split is empty")
    problems = problems[:limit] if limit else problems
    adapter_dir = _adapter_dir(adapter, cfg.model) if adapter else None
    folder = model_folder(cfg.model)  # a warm start: built before (loading never trains)
    check_model_path(folder)
    if not torch.cuda.is_available():
        set_threads(cfg.threads)
    lm, tok = load_model(folder)
    check_context(lm, tok, t, problems, cfg)  # as train does: a cap past the context would decode until killed
    torch.manual_seed(cfg.seed)  # after loading: a first load's conversion consumes the RNG (loop.py)
    if adapter_dir:
        from peft import PeftModel

        try:
            lm = PeftModel.from_pretrained(lm, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as e:
            base = _adapter_base(adapter_dir)
            size = r"torch\.Size\(\[([^\]]*)\]\)"
            m = re.search(rf"size mismatch for (\S+): copying a param with shape {size} .*? current model is {size}",
                          str(e))
            why = (f"{m.group(1)} has shape [{m.group(2)}] in the adapter, [{m.group(3)}] in the model" if m
                   else str(e).strip().splitlines()[-1][:160])
            raise TokeneffError(f"adapter={adapter!r} does not fit model={cfg.model!r}"
                                f"{f' (it was trained on {base!r})' if base else ' (another base model?)'}: "
                                f"{why}") from None
        except (TypeError, AttributeError) as e:  # a value of the wrong type in adapter_config.json (say r: "16")
            raise TokeneffError(f"adapter={adapter!r}: its adapter_config.json is damaged "
                                f"({clip(' '.join(str(e).split()), 200)})") from None
        bad = next((n for n, w in lm.named_parameters() if "lora_" in n and not torch.isfinite(w).all()), None)
        if bad:  # NaN weights give empty completions and a plausible-looking accuracy of 0
            raise TokeneffError(f"adapter={adapter!r}: its weights are not finite ({bad} holds NaN or inf): "
                                "a diverged or damaged adapter")
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    result = evaluate_model(lm, tok, t, problems, cfg.eval_batch_size, cfg.eval_max_new_tokens or cfg.max_new_tokens,
                            progress, **cfg.rollout_options(evaluation=True))
    result.update(model=cfg.model, adapter=adapter, split=split, profile=cfg.profile, num_shots=cfg.num_shots,
                  max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens)
    if out:
        _keep(result, out)
    return result


def _keep(result: dict[str, Any], out: str) -> None:
    """Write the result to `out`; if that fails (a full disk, say), keep it beside in the temp folder or, failing
    that, print it to stdout, and say so in one line: an evaluation's result is never lost to a failed write."""
    try:
        write_json(out, result)
        return
    except Exception as e:  # noqa: BLE001 - write failures only, see write_failure
        why = write_failure(e)
        if why is None:
            raise
    alt = Path(tempfile.gettempdir()) / f"tokeneff-eval-{os.getpid()}-{Path(out).name}"
    try:
        write_json(alt, result)
        where = f"it was written to {str(alt)!r} instead"
    except Exception:  # noqa: BLE001 - the last resort below cannot fail for lack of space
        print(json.dumps(result, default=str), flush=True)
        where = "it was printed to stdout instead"
    raise TokeneffError(f"{result['task']}: accuracy {result['accuracy']:.3f} on {result['n']} problems, but "
                        f"out={show(out)} could not be written ({why}); {where}")


def _adapter_dir(adapter: str, model: str) -> Path:
    """The adapter folder (a run folder is accepted for its adapter/), checked against the run's base model."""
    p = Path(adapter).expanduser()
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    if (p / "adapter_config.json").exists() and not (p / "adapter_config.json").is_file():
        raise TokeneffError(f"adapter={adapter!r}: its adapter_config.json is not a regular file (a folder or FIFO?)")
    if not (p / "adapter_config.json").is_file():
        raise TokeneffError(f"adapter={adapter!r}: no adapter_config.json there (a run's adapter/ folder)")
    run_cfg = _read_json(p.parent / "config.json")
    if isinstance(run_cfg, dict) and isinstance(run_cfg.get("model"), str) and "algo" in run_cfg \
            and run_cfg["model"] != model:
        raise TokeneffError(f"adapter={adapter!r} was trained on model={run_cfg['model']!r} "
                            f"({p.parent / 'config.json'}), not {model!r}: pass --model {run_cfg['model']}")
    if not isinstance(_read_json(p / "adapter_config.json"), dict):
        raise TokeneffError(f"adapter={adapter!r}: adapter_config.json is damaged (not a JSON object)")
    weights = p / "adapter_model.safetensors"
    if weights.exists() and not weights.is_file():
        raise TokeneffError(f"adapter={adapter!r}: adapter_model.safetensors is not a regular file (a folder or FIFO?)")
    if not weights.is_file():
        other = sorted(x.name for x in p.glob("adapter_model*.bin"))
        hint = f" ({other[0]} is a pickle and never loaded: save the adapter with safetensors)" if other else ""
        raise TokeneffError(f"adapter={adapter!r}: no adapter_model.safetensors there{hint}")

    why = _safetensors_problem(weights)
    if why:
        raise TokeneffError(f"adapter={adapter!r}: {why}")
    return p


def _adapter_base(p: Path) -> str | None:
    cfg = _read_json(p / "adapter_config.json")
    return cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
