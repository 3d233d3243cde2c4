"""S-GRPO (stochastic-subset GRPO), Lee & Tong 2025. Differs from full-token GRPO only in which tokens
carry loss:
1. Walking a completion's positions t = 0, 1, ...: t < alpha is always kept; later positions are kept with
   probability P each, independently, until the subset holds k tokens; then nothing more is kept.
2. Weight 1 / (G * |T_i|): the mean over the kept tokens, then over the group.
Only kept positions go through the LM head, and nothing after the last kept position is forwarded at all.
"""

from __future__ import annotations

import random

from .base import Credits, per_completion_credits


def keep_positions(length: int, alpha: int, p: float, k: int, rng: random.Random) -> list[int]:
    kept: list[int] = []
    for t in range(length):
        if len(kept) >= k:
            break
        if t < alpha or rng.random() < p:
            kept.append(t)
    return kept


def select(completions: list[list[int]], rewards: list[float], cfg, rng: random.Random) -> Credits:
    return per_completion_credits(completions, rewards, cfg.adv_eps, keep=lambda n: keep_positions(
        n, cfg.sgrpo_alpha, cfg.sgrpo_p, cfg.sgrpo_k, rng))
