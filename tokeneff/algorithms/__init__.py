"""The three algorithms: each is a `select(completions, rewards, cfg, rng) -> Credits` function; T-SPMO also
has a group sampler (replay-based resampling, `tspmo.ReplaySampler`), which the loop gets from `group_sampler`.

`ALGORITHMS` is the one list of algorithm names (config.ALGOS, the CLI's choices and the benchmarks use it).
"""

from . import grpo, sgrpo, tspmo
from .base import Credits, GroupSampler, StepCredits, group_advantages, step_credits

ALGORITHMS = {"grpo": grpo.select, "sgrpo": sgrpo.select, "tspmo": tspmo.select}


def group_sampler(cfg) -> GroupSampler:
    """Which groups a step samples, beyond the data order: T-SPMO's replay when it is on (`tspmo.replay_on`);
    for every other run the same sampler switched off (it never replays), so that every run's metrics.jsonl and
    checkpoints have the same keys."""
    return tspmo.ReplaySampler(cfg)


__all__ = ["ALGORITHMS", "Credits", "GroupSampler", "StepCredits", "group_advantages", "group_sampler", "step_credits"]
