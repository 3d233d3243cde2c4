"""Which tokens does T-SPMO credit? Sample real groups from the base model and colour tokens by advantage."""

from __future__ import annotations

import random
from typing import Any

import torch

from ..algorithms.tspmo import prefix_advantages
from ..config import make_config
from ..models import load_model
from ..rollout import build_prompt, decode, encode_prompts, sample
from ..tasks import make_task
from ..utils import set_threads
from ..warmstart import model_folder


def credited_tokens(task: str = "multiplication", profile: str = "embedded", num_groups: int = 3,
                    max_tries: int = 12, **overrides) -> list[dict[str, Any]]:
    """Groups (with reward variance) of the base model, each completion's tokens with their T-SPMO advantage."""
    cfg = make_config(profile, overrides=dict(overrides, task=task))
    t = make_task(cfg)
    if not torch.cuda.is_available():
        set_threads(cfg.threads)  # runs in the notebook's process: 2 spinning threads collapse beside other work
    model, tok = load_model(model_folder(cfg.model))
    torch.manual_seed(cfg.seed)
    problems = t.problems("train")
    random.Random(cfg.seed).shuffle(problems)
    found = []
    for p in problems[:max_tries]:
        ctx = encode_prompts(tok, [build_prompt(tok, t.messages(p))])
        roll = sample(model, tok, ctx, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                      **cfg.rollout_options())
        rewards = t.reward(prompts=[None] * cfg.group_size, completions=[decode(tok, c) for c in roll.completions],
                           answer=[p.answer] * cfg.group_size)
        if max(rewards) == min(rewards):
            continue
        adv = {(i, pos): a for i, pos, a in prefix_advantages(roll.completions, rewards)}
        rows = [dict(reward=r, tokens=[tok.decode([x]) for x in c], adv=[adv.get((i, k), 0.0) for k in range(len(c))])
                for i, (c, r) in enumerate(zip(roll.completions, rewards, strict=True))]
        found.append(dict(question=p.question, answer=p.answer, completions=rows))
        if len(found) == num_groups:
            break
    return found


def plot_credited(examples: list[dict[str, Any]], title: str = ""):
    """Each completion as a row of tokens; credited tokens shaded green (A > 0) or red (A < 0)."""
    import matplotlib.pyplot as plt

    n_rows = sum(len(e["completions"]) + 1 for e in examples) or 1
    fig, ax = plt.subplots(figsize=(12, 0.28 * n_rows + 0.8))
    ax.axis("off")
    y = n_rows
    for e in examples:
        ax.text(0, y, f"Q: {e['question'][:110]}  (answer {e['answer']:g})", fontsize=8, weight="bold", va="center")
        y -= 1
        for c in e["completions"]:
            x = 0.0
            ax.text(x, y, f"r={c['reward']:.0f}", fontsize=7, va="center", family="monospace")
            x += 4
            for token, a in zip(c["tokens"], c["adv"], strict=True):
                text = token.replace("\n", "⏎") or "∅"
                color = (0.2, 0.7, 0.2, min(1, abs(a) * 2)) if a > 0 else (0.85, 0.2, 0.2, min(1, abs(a) * 2))
                ax.text(x, y, text, fontsize=7, va="center", family="monospace",
                        bbox=dict(boxstyle="square,pad=0.1", fc=color if a else "none", ec="none"))
                x += max(1, len(text)) * 0.9 + 0.4
            y -= 1
    if not examples:
        ax.text(0.5, 0.5, "no sampled group had reward variance: nothing to credit", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
    ax.set_xlim(0, 110)
    ax.set_ylim(0, n_rows + 1)
    ax.set_title(title, fontsize=9)
    return fig
