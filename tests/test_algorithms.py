import math
import random
from types import SimpleNamespace

import pytest

from tokeneff.algorithms import ALGORITHMS, group_advantages
from tokeneff.algorithms.sgrpo import keep_positions
from tokeneff.algorithms.tspmo import prefix_advantages

CFG = SimpleNamespace(adv_eps=0.0, sgrpo_alpha=2, sgrpo_p=0.5, sgrpo_k=4)


class FixedDraws:
    """An rng whose random() returns a given list, so the selection rule can be checked by hand."""

    def __init__(self, values):
        self.values, self.used = list(values), 0

    def random(self):
        self.used += 1
        return self.values.pop(0)


def test_sgrpo_keeps_first_alpha_then_coin_flips_until_k():
    rng = FixedDraws([0.9, 0.1, 0.7, 0.3, 0.2])
    # t=0,1 kept without a draw (alpha=2); t=2: 0.9 >= P no; t=3: 0.1 yes; t=4: 0.7 no; t=5: 0.3 yes -> k=4 reached
    assert keep_positions(10, alpha=2, p=0.5, k=4, rng=rng) == [0, 1, 3, 5]
    assert rng.used == 4  # nothing is drawn once k tokens are kept


def test_sgrpo_edge_cases():
    assert keep_positions(3, alpha=5, p=0.0, k=10, rng=FixedDraws([])) == [0, 1, 2]  # shorter than alpha
    assert keep_positions(6, alpha=0, p=1.0, k=3, rng=random.Random(0)) == [0, 1, 2]
    assert keep_positions(6, alpha=0, p=0.0, k=3, rng=random.Random(0)) == []


def test_sgrpo_keep_rate_matches_p():
    rng = random.Random(0)
    kept = sum(len(keep_positions(1000, 0, 0.3, 10_000, rng)) for _ in range(20))
    assert kept / 20_000 == pytest.approx(0.3, abs=0.02)


def test_group_advantages_by_hand():
    # rewards 1,0,0,0: mean 0.25, sample std sqrt(0.25) = 0.5
    assert group_advantages([1, 0, 0, 0], eps=0.0) == pytest.approx([1.5, -0.5, -0.5, -0.5])
    assert group_advantages([1, 1, 1], eps=0.0) is None


def test_grpo_credits_every_token_with_length_normalisation():
    comps = [[5, 6, 7], [5, 8]]
    c = ALGORITHMS["grpo"](comps, [1.0, 0.0], CFG)
    a = 0.5 / math.sqrt(0.5)  # mean 0.5, sample std sqrt(0.5)
    assert list(zip(c.seq, c.pos)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert c.adv == pytest.approx([a, a, a, -a, -a])
    assert c.weight == pytest.approx([1 / 6] * 3 + [1 / 4] * 2)  # 1 / (G * |y_i|)
    assert len(ALGORITHMS["grpo"](comps, [0.0, 0.0], CFG)) == 0  # no variance, no signal


def test_sgrpo_weights_normalise_over_kept_tokens():
    comps = [list(range(10)), list(range(3))]
    c = ALGORITHMS["sgrpo"](comps, [0.0, 1.0], CFG, random.Random(0))
    for i in (0, 1):
        w = [wt for s, wt in zip(c.seq, c.weight) if s == i]
        assert sum(w) == pytest.approx(0.5) and len(w) <= CFG.sgrpo_k
    assert {0, 1} <= {p for s, p in zip(c.seq, c.pos) if s == 1}  # the first alpha=2 are always kept


def test_tspmo_hand_made_group():
    # c0 = 1 2 3 (r=1), c1 = 1 2 4 (r=0), c2 = 1 5 (r=1), c3 = 6 (r=0)
    comps, rewards = [[1, 2, 3], [1, 2, 4], [1, 5], [6]], [1.0, 0.0, 1.0, 0.0]
    # V(root) = 1/2; Q(root,1) = 2/3, Q(root,6) = 0; V(1) = 2/3: Q(1,2) = 1/2, Q(1,5) = 1;
    # V(1 2) = 1/2: Q(1 2,3) = 1, Q(1 2,4) = 0.  Each edge is evaluated on the first completion through it.
    expected = {(0, 0): 2 / 3 - 1 / 2, (3, 0): -1 / 2, (0, 1): 1 / 2 - 2 / 3, (2, 1): 1 - 2 / 3,
                (0, 2): 1 / 2, (1, 2): -1 / 2}
    got = {(i, t): a for i, t, a in prefix_advantages(comps, rewards)}
    assert got.keys() == expected.keys()
    for key, a in expected.items():
        assert got[key] == pytest.approx(a)
    c = ALGORITHMS["tspmo"](comps, rewards, CFG)
    assert len(c) == 6 and c.weight == pytest.approx([1 / 6] * 6)  # each distinct pair counted once


def test_tspmo_shared_prefix_counts_once_and_ties_carry_nothing():
    comps = [[1, 2, 3]] * 3 + [[1, 2, 4]]
    c = ALGORITHMS["tspmo"](comps, [1.0, 1.0, 1.0, 0.0], CFG)
    # only the branch after [1, 2] differs: Q(12,3) - V(12) = 1 - 3/4, Q(12,4) - V(12) = -3/4
    assert sorted(zip(c.seq, c.pos, c.adv)) == [(0, 2, pytest.approx(0.25)), (3, 2, pytest.approx(-0.75))]
    assert len(ALGORITHMS["tspmo"]([[1, 2], [3]], [1.0, 1.0], CFG)) == 0


def test_last_branch_points_for_replay():
    from tokeneff.algorithms.tspmo import last_branch_points

    # c0 parts from c1 at position 2 and from c2 at 1; c3 shares nothing (parts at 0); c4 is a copy of c0
    comps = [[1, 2, 3, 9], [1, 2, 4], [1, 5], [6], [1, 2, 3, 9]]
    assert last_branch_points(comps) == [2, 2, 1, 0, 2]
    assert last_branch_points([[1, 2], [1, 2]]) == [-1, -1]
