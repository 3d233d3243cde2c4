"""T-SPMO (token-specific prefix matching optimisation), Lee & Tong 2025 [reconstructed: docs/paper.md].
Differs from GRPO in what gets credit:
1. The G completions are merged into a prefix trie. For a prefix p, V(p) = mean reward of the completions
   that start with p; for a next token v, Q(p, v) = mean reward of those that start with p.v.
2. Each distinct (p, v) gets advantage A = Q(p, v) - V(p): non-zero only where the group branches and the
   branches end differently (the pivotal tokens). No std normalisation.
3. Loss: - mean over the distinct pairs with A != 0 of A * log pi(v | x, p). A pair shared by several
   completions counts once; it is evaluated on the first completion that passes through it.
4. Replay-based resampling (for long answers) lives in the training loop: it restarts groups from cut
   successful completions so that late positions get their own comparisons.
"""

from __future__ import annotations

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
