"""T-SPMO (token-specific prefix matching optimisation), Lee & Tong 2025 [reconstructed: docs/paper.md].
Differs from GRPO in what gets credit:
1. The G completions are merged into a prefix trie. For a prefix p, V(p) = mean reward of the completions
   that start with p; for a next token v, Q(p, v) = mean reward of those that start with p.v.
2. Each distinct (p, v) gets advantage A = Q(p, v) - V(p): non-zero only where the group branches and the
   branches end differently (the pivotal tokens). No std normalisation.
3. Loss: - mean over the distinct pairs with A != 0 of A * log pi(v | x, p). A pair shared by several
   completions counts once; it is evaluated on the first completion that passes through it.
4. Replay-based resampling (for long answers; config `replay`, on by default for multiplication):
   `ReplaySampler` restarts some of a step's groups from a successful completion cut past its last branch
   point, so that late positions get comparisons of their own. The loop calls it as a group sampler
   (`algorithms.group_sampler`) without knowing what it does.
"""

from __future__ import annotations

import random
from typing import Any

from .base import Credits


def prefix_advantages(completions: list[list[int]], rewards: list[float]) -> list[tuple[int, int, float]]:
    """(completion index, position, A) for every distinct (prefix, next token) edge of the group's trie."""
    children: dict[tuple[int, int], int] = {}  # (node, token) -> child node
    count, total = [0], [0.0]  # per node: completions through it and their summed reward
    first: dict[int, tuple[int, int]] = {}  # child node -> (completion, position) that first reached it
    parent: dict[int, int] = {}
    for i, (tokens, r) in enumerate(zip(completions, rewards, strict=True)):
        node = 0
        count[0] += 1
        total[0] += r
        for t, tok in enumerate(tokens):
            child = children.get((node, tok))
            if child is None:
                child = children[(node, tok)] = len(count)
                count.append(0)
                total.append(0.0)
                first[child] = (i, t)
                parent[child] = node
            count[child] += 1
            total[child] += r
            node = child
    out = []
    for child, (i, t) in first.items():
        p = parent[child]
        out.append((i, t, total[child] / count[child] - total[p] / count[p]))
    return out


def last_branch_points(completions: list[list[int]]) -> list[int]:
    """For each completion, the deepest position where another completion of the group parts from it
    (-1 if none does): replay cuts past it, where this group gave no comparisons."""
    out = []
    for i, a in enumerate(completions):
        deepest = -1
        for j, b in enumerate(completions):
            if i != j:
                n = 0
                while n < min(len(a), len(b)) and a[n] == b[n]:
                    n += 1
                if n < len(a):
                    deepest = max(deepest, n)
        out.append(deepest)
    return out


def select(completions: list[list[int]], rewards: list[float], cfg, rng=None) -> Credits:
    credits = Credits()
    pairs = [(i, t, a) for i, t, a in prefix_advantages(completions, rewards) if abs(a) > 1e-12]
    for i, t, a in pairs:
        credits.add(i, t, a, 1.0 / len(pairs))
    return credits


def replay_on(cfg) -> bool:
    """Replay-based resampling is used: T-SPMO with replay=on, or replay=auto on multiplication (long answers)."""
    if cfg.algo != "tspmo":
        return False
    return cfg.replay == "on" or (cfg.replay == "auto" and cfg.task == "multiplication")


def replay_cut(tokens: list[int], last_branch: int, rng: random.Random) -> list[int]:
    """A replayed prefix: `tokens` cut at a uniform point past `last_branch` (where the group that produced it
    stopped giving comparisons), keeping at least one token to generate."""
    lo = min(last_branch + 1, len(tokens) - 1)
    return tokens[: rng.randint(lo, len(tokens) - 1)]


class ReplaySampler:
    """T-SPMO's group sampler (replay-based resampling). The loop asks `pick()` before each group of a step:
    None samples a fresh problem from the data order; (problem index, prefix) restarts that problem from a cut
    success. After each group is scored, `record()` keeps its successful completions (prefix included) with their
    last branch point, in a buffer of the last `replay_buffer_size`. Switched off (`active` false: every algorithm
    but T-SPMO with replay on) it never replays and never draws from its RNG; every run has one so that
    metrics.jsonl (`replay_buffer`) and checkpoints (`replay_buf`, `replay_rng`) keep the same keys.
    State (buffer and RNG) is per data-parallel rank and checkpointed with the rank's state."""

    def __init__(self, cfg, active: bool | None = None):
        self.active = replay_on(cfg) if active is None else active
        self.fraction, self.size = cfg.replay_fraction, cfg.replay_buffer_size
        self.rng = random.Random(cfg.seed + 2)
        self.buffer: list[tuple[int, list[int], int]] = []  # (problem index, tokens, last branch point)

    def pick(self) -> tuple[int, list[int]] | None:
        """Before a group: (problem index, prefix) to replay, or None for a fresh problem."""
        if not (self.active and self.buffer and self.rng.random() < self.fraction):
            return None
        problem, tokens, last_branch = self.buffer[self.rng.randrange(len(self.buffer))]
        return problem, replay_cut(tokens, last_branch, self.rng)

    def record(self, problem: int, prefix: list[int], completions: list[list[int]], rewards: list[float]) -> None:
        """After a group is scored: keep its successes (reward > 0), prefix included, with their last branch point
        shifted by the prefix."""
        if not self.active:
            return
        branch = last_branch_points(completions)
        new = [(problem, prefix + c, len(prefix) + branch[i]) for i, c in enumerate(completions) if rewards[i] > 0]
        self.buffer = (self.buffer + new)[-self.size:]

    def metrics(self) -> dict[str, Any]:
        return dict(replay_buffer=len(self.buffer))

    def state_dict(self) -> dict[str, Any]:
        return dict(replay_buf=self.buffer, replay_rng=self.rng.getstate())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a rank's checkpoint (`replay_rng` as saved by torch, or as a JSON list in old checkpoints)."""
        self.buffer = [tuple(x) for x in state["replay_buf"]]
        s = state["replay_rng"]
        self.rng.setstate((s[0], tuple(s[1]), s[2]))
