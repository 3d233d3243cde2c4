"""What an algorithm returns: the (completion, position) pairs that carry loss, each with its advantage.

All three algorithms share rollout, loss and training loop; they differ in `select`, which maps one sampled group
(completion token ids and rewards) to `Credits`, and T-SPMO also in how groups are sampled (`tspmo.ReplaySampler`,
a group sampler). The loss of a group is
    L = - sum_j weight_j * A_j * ratio_j  (+ beta * sum_j weight_j * KL_j)
where ratio_j = pi(y | ctx) / sg(pi(y | ctx)) for the token at (seq_j, pos_j); so `weight` carries each
algorithm's normalisation (1 / (G |T_i|) for (S-)GRPO, 1 / #pairs for T-SPMO). `step_credits` gathers a step's
groups and applies the one normalisation across groups (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Credits:
    seq: list[int] = field(default_factory=list)
    """index of the completion within its group"""
    pos: list[int] = field(default_factory=list)
    """position of the credited token within that completion (0 = first generated token)"""
    adv: list[float] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)

    def add(self, seq: int, pos: int, adv: float, weight: float) -> None:
        self.seq.append(seq)
        self.pos.append(pos)
        self.adv.append(adv)
        self.weight.append(weight)

    def __len__(self) -> int:
        return len(self.seq)


class GroupSampler(Protocol):
    """An algorithm's optional say in which groups a step samples (T-SPMO: `tspmo.ReplaySampler`). The loop calls
    `pick()` before each group and `record(...)` after scoring it, logs `metrics()` with the step, and saves
    `state_dict()` in each rank's checkpoint."""

    def pick(self) -> tuple[int, list[int]] | None:
        """(index of a training problem, completion prefix to start from), or None: the next problem, no prefix."""

    def record(self, problem: int, prefix: list[int], completions: list[list[int]], rewards: list[float]) -> None:
        """One scored group: its problem's index, the prefix it started from, its completions and rewards."""

    def metrics(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepCredits:
    """One step's credits over all its groups, flattened: `rows` index completions (group * G + completion),
    `cols` positions within them; `weight` already includes the normalisation across groups."""
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    adv: list[float] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    zero_std_groups: int = 0
    """groups whose G rewards are all equal (no comparison, no GRPO advantage)"""
    signal_groups: int = 0
    """groups with at least one credited token"""
    signal_tokens: int = 0
    """completion tokens in groups with unequal rewards: the denominator of the token share"""

    def __len__(self) -> int:
        return len(self.rows)


def step_credits(select: Callable[..., Credits], completions: list[list[int]], rewards: list[float],
                 group_size: int, cfg, rng) -> StepCredits:
    """Run the algorithm's `select` on each group of G consecutive completions and flatten the credits.

    The loss normalisation, in one place: within a group, `select`'s weights sum to 1 (1 / (G |T_i|) over the
    kept tokens of G completions, or 1 / #pairs); across groups, each weight is divided by the number of groups
    that carry credit. The step's loss is therefore the mean over informative groups of each group's loss, so a
    step whose other groups all had equal rewards (no signal) is not scaled down, as in GRPO's mean over the
    groups of a batch with zero-advantage groups left out.
    """
    out = StepCredits()
    per_group = []
    for start in range(0, len(completions), group_size):
        comp, r = completions[start: start + group_size], rewards[start: start + group_size]
        if max(r) == min(r):
            out.zero_std_groups += 1
        else:
            out.signal_tokens += sum(len(c) for c in comp)
        credits = select(comp, r, cfg, rng)
        out.signal_groups += len(credits) > 0
        per_group.append((start, credits))
    n = max(out.signal_groups, 1)
    for start, credits in per_group:
        for i, t, a, w in zip(credits.seq, credits.pos, credits.adv, credits.weight, strict=True):
            out.rows.append(start + i)
            out.cols.append(t)
            out.adv.append(a)
            out.weight.append(w / n)
    return out


def group_advantages(rewards: list[float], eps: float) -> list[float] | None:
    """GRPO's A_i = (r_i - mean) / (std + eps), sample std as in TRL; None when all rewards are equal."""
    g = len(rewards)
    mean = sum(rewards) / g
    var = sum((r - mean) ** 2 for r in rewards) / max(g - 1, 1)
    if var == 0.0:
        return None
    std = math.sqrt(var)
    return [(r - mean) / (std + eps) for r in rewards]


def per_completion_credits(completions: list[list[int]], rewards: list[float], eps: float,
                           keep: Callable[[int], list[int]]) -> Credits:
    """(S-)GRPO: completion i's kept positions keep(len) share A_i, weighted 1 / (G * |T_i|)."""
    credits = Credits()
    adv = group_advantages(rewards, eps)
    if adv is None:
        return credits
    g = len(completions)
    for i, tokens in enumerate(completions):
        kept = keep(len(tokens))
        for t in kept:
            credits.add(i, t, adv[i], 1.0 / (g * len(kept)))
    return credits
