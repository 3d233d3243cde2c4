"""The three algorithms: each is a `select(completions, rewards, cfg, rng) -> Credits` function."""

from . import grpo, sgrpo, tspmo
from .base import Credits, group_advantages

ALGORITHMS = {"grpo": grpo.select, "sgrpo": sgrpo.select, "tspmo": tspmo.select}

__all__ = ["ALGORITHMS", "Credits", "group_advantages"]
