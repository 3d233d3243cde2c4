"""Full-token GRPO, the paper's baseline. Relative to textbook GRPO (Shao et al., 2024):
1. One on-policy update per batch, so the ratio is pi/sg(pi) (its value is 1; the gradient is A * grad log pi)
   and there is no clipping.
2. Every completion token carries loss, length-normalised per completion: weight 1 / (G * |y_i|).
3. Groups whose rewards are all equal carry no signal and are skipped.
"""

from __future__ import annotations

from .base import Credits, per_completion_credits


def select(completions: list[list[int]], rewards: list[float], cfg, rng=None) -> Credits:
    return per_completion_credits(completions, rewards, cfg.adv_eps, keep=lambda n: list(range(n)))
