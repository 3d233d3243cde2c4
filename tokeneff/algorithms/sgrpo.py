"""S-GRPO (stochastic-subset GRPO), Lee & Tong 2025. Differs from full-token GRPO only in which tokens
carry loss:
1. Walking a completion's positions t = 0, 1, ...: t < alpha is always kept; later positions are kept with
   probability P each, independently, until the subset holds k tokens; then nothing more is kept.
2. Weight 1 / (G * |T_i|): the mean over the kept tokens, then over the group.
Only kept positions go through the LM head, and nothing after the last kept position is forwarded at all.
"""

from __future__ import annotations

import random

from .base import Credits, group_advantages


def keep_positions(length: int, alpha: int, p: float, k: int, rng: random.Random) -> list[int]:
    kept: list[int] = []
    for t in range(length):
        if len(kept) >= k:
            break
        if t < alpha or rng.random() < p:
            kept.append(t)
    return kept


def select(completions: list[list[int]], rewards: list[float], cfg, rng: random.Random) -> Credits:
    credits = Credits()
    adv = group_advantages(rewards, cfg.adv_eps)
    if adv is None:
        return credits
    g = len(completions)
    for i, tokens in enumerate(completions):
        kept = keep_positions(len(tokens), cfg.sgrpo_alpha, cfg.sgrpo_p, cfg.sgrpo_k, rng)
        for t in kept:
            credits.add(i, t, adv[i], 1.0 / (g * len(kept)))
    return credits
