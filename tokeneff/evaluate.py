"""Greedy pass@1 accuracy on held-out problems, with every problem's completion kept for inspection."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from .config import TokeneffError, make_config
from .rollout import build_prompt, decode, encode_prompts, sample
from .tasks import Problem, Task, extract_answer, is_correct, make_task
from .utils import set_threads, write_json


def evaluate_model(model, tokenizer, task: Task, problems: list[Problem], batch_size: int,
                   max_new_tokens: int, progress: bool = True, backend: str = "tokeneff") -> dict[str, Any]:
    records = []  # `sample` runs the model in eval mode and restores its mode
    bar = tqdm(range(0, len(problems), batch_size), desc=f"eval {task.name}", disable=not progress,
               leave=False)
    for start in bar:
        batch = problems[start: start + batch_size]
        prompts = [build_prompt(tokenizer, task.messages(p)) for p in batch]
        roll = sample(model, tokenizer, encode_prompts(tokenizer, prompts), 1, max_new_tokens, greedy=True,
                      backend=backend)
        for p, prompt, comp, cut in zip(batch, prompts, roll.completions, roll.truncated, strict=True):
            text = decode(tokenizer, comp)
            records.append(dict(id=p.id, prompt=prompt, completion=text, extracted=extract_answer(text),
                                reference=p.answer, correct=is_correct(text, p.answer), truncated=cut))
    n = len(records)
    return dict(task=task.name, n=n, accuracy=sum(r["correct"] for r in records) / max(n, 1), records=records)


def evaluate(task: str = "svamp", model: str = "smollm2-135m", adapter: str | None = None,
             split: str = "test", limit: int = 0, out: str | None = None, profile: str = "embedded",
             progress: bool = True, **overrides) -> dict[str, Any]:
    """Accuracy of `model` (optionally with a LoRA adapter directory) on a task split; JSON to `out`."""
    from .models import load_model

    cfg = make_config(profile, overrides=dict(task=task, model=model, **overrides))
    if limit < 0:
        raise TokeneffError(f"limit={limit}: must not be negative")
    t = make_task(cfg)
    problems = t.problems(split)
    problems = problems[:limit] if limit else problems
    torch.manual_seed(cfg.seed)
    if not torch.cuda.is_available():
        set_threads(cfg.threads)
    lm, tok = load_model(cfg.model)
    if adapter:
        from pathlib import Path

        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise TokeneffError(f"adapter={adapter!r}: no adapter_config.json there (a run's adapter/ folder)")
        lm = PeftModel.from_pretrained(lm, adapter)
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    result = evaluate_model(lm, tok, t, problems, cfg.eval_batch_size,
                            cfg.eval_max_new_tokens or cfg.max_new_tokens, progress, cfg.rollout_backend)
    result.update(model=cfg.model, adapter=adapter, split=split, profile=cfg.profile, num_shots=cfg.num_shots)
    if out:
        write_json(out, result)
    return result
