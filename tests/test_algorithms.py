import math
import random
from types import SimpleNamespace

import pytest

from tokeneff.algorithms import ALGORITHMS, group_advantages, step_credits
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


class FixedInts:
    """An rng whose randint/randrange return given values and record the ranges asked for."""

    def __init__(self, floats=(), ints=()):
        self.floats, self.ints, self.asked = list(floats), list(ints), []

    def random(self):
        self.asked.append("random")
        return self.floats.pop(0)

    def randint(self, lo, hi):
        self.asked.append(("randint", lo, hi))
        return self.ints.pop(0)

    def randrange(self, n):
        self.asked.append(("randrange", n))
        return self.ints.pop(0)


def test_replay_cut_is_past_the_last_branch_point():
    from tokeneff.algorithms.tspmo import replay_cut

    tokens = [10, 11, 12, 13, 14, 15]
    rng = FixedInts(ints=[3])
    # the group parted at position 2: the cut lies in [3, 5], so the replayed group must choose position 3 onwards
    # itself and at least one token (15) is left to generate
    assert replay_cut(tokens, 2, rng) == [10, 11, 12]
    assert rng.asked == [("randint", 3, 5)]
    rng = FixedInts(ints=[5])
    assert replay_cut(tokens, 2, rng) == [10, 11, 12, 13, 14]
    # a branch at the last token (or none past it) still leaves one token to generate
    rng = FixedInts(ints=[5])
    assert replay_cut(tokens, 5, rng) == tokens[:5] and rng.asked == [("randint", 5, 5)]
    rng = FixedInts(ints=[0])
    assert replay_cut(tokens, -1, rng) == [] and rng.asked == [("randint", 0, 5)]  # no branch: anywhere


def _sampler(**over):
    from tokeneff.algorithms.tspmo import ReplaySampler

    cfg = SimpleNamespace(**dict(dict(algo="tspmo", replay="on", task="svamp", replay_fraction=0.5,
                                      replay_buffer_size=3, seed=0), **over))
    return ReplaySampler(cfg)


def test_replay_sampler_records_successes_with_shifted_branch_points_and_replays_them():
    s = _sampler()
    assert s.pick() is None  # empty buffer: no draw at all
    # a group of problem 7 that started from prefix [1, 2]: c0 and c2 succeed
    comps, rewards = [[3, 4, 5, 6], [3, 4, 9], [3, 8], [7]], [1.0, 0.0, 0.5, 0.0]
    s.record(7, [1, 2], comps, rewards)
    # last branch points within the group: c0 -> 2 (parts from c1 at 2), c2 -> 1; shifted by the prefix's 2
    assert s.buffer == [(7, [1, 2, 3, 4, 5, 6], 4), (7, [1, 2, 3, 8], 3)]
    assert s.metrics() == {"replay_buffer": 2}
    s.rng = FixedInts(floats=[0.4], ints=[0, 5])  # 0.4 < fraction 0.5: replay entry 0, cut at 5 (in [5, 5])
    assert s.pick() == (7, [1, 2, 3, 4, 5])
    assert s.rng.asked == ["random", ("randrange", 2), ("randint", 5, 5)]
    s.rng = FixedInts(floats=[0.5])  # not below the fraction: a fresh problem
    assert s.pick() is None
    s.record(8, [], [[1], [2]], [1.0, 1.0])  # the buffer keeps the last replay_buffer_size = 3
    assert [(p, t) for p, t, _ in s.buffer] == [(7, [1, 2, 3, 8]), (8, [1]), (8, [2])]


def test_replay_sampler_switched_off_never_draws_or_keeps_anything():
    for over in (dict(replay="off"), dict(algo="grpo"), dict(replay="auto", task="svamp")):
        s = _sampler(**over)
        s.rng = FixedInts()  # any draw would fail
        s.record(0, [], [[1, 2], [1, 3]], [1.0, 0.0])
        assert s.pick() is None and s.buffer == [] and s.metrics() == {"replay_buffer": 0}
    assert _sampler(replay="auto", task="multiplication").active


def test_replay_sampler_state_round_trip_including_old_json_form():
    import json

    s = _sampler(replay_fraction=1.0)
    s.record(2, [], [[1, 2, 3], [1, 4]], [1.0, 0.0])
    s.rng.random()
    state = s.state_dict()
    assert set(state) == {"replay_buf", "replay_rng"}  # the keys of a rank's checkpoint
    for form in (state, json.loads(json.dumps(state))):  # as torch saves it, and as old JSON checkpoints hold it
        t = _sampler(replay_fraction=1.0)
        t.load_state_dict(form)
        assert t.buffer == s.buffer and t.pick() == _copy(s).pick()


def _copy(s):
    c = _sampler(replay_fraction=1.0)
    c.load_state_dict(s.state_dict())
    return c


def test_step_credits_of_a_hand_made_three_group_step():
    """G = 2, three groups: rewards [1, 0] (lengths 2 and 3), [0, 0] (no signal), [0, 1] (lengths 3 and 1).
    GRPO's A = +-0.5 / std, std = sqrt(0.5) (sample std); per-token weight 1 / (G |y_i|), divided by the 2 groups
    that carry credit, so each informative group's weights sum to 1/2 and the step's to 1."""
    comps = [[1, 2], [1, 3, 4], [5], [6], [7, 8, 9], [7]]
    c = step_credits(ALGORITHMS["grpo"], comps, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 2, CFG, random.Random(0))
    a = 0.5 / math.sqrt(0.5)
    assert (c.zero_std_groups, c.signal_groups, c.signal_tokens, len(c)) == (1, 2, 9, 9)
    assert c.rows == [0, 0, 1, 1, 1, 4, 4, 4, 5]
    assert c.cols == [0, 1, 0, 1, 2, 0, 1, 2, 0]
    assert c.adv == pytest.approx([a, a, -a, -a, -a, -a, -a, -a, a])
    assert c.weight == pytest.approx([1 / 8, 1 / 8, 1 / 12, 1 / 12, 1 / 12, 1 / 12, 1 / 12, 1 / 12, 1 / 4])
    assert sum(c.weight) == pytest.approx(1.0)


def test_step_credits_tspmo_pairs_per_group_and_a_step_without_signal():
    """T-SPMO's weights are 1 / #pairs within a group, then / groups with credit; a step where every group has
    equal rewards credits nothing (the loop then backpropagates one zero-weight token)."""
    comps = [[1, 2], [1, 3], [4], [5]]  # group 0: pairs (1), (1,2), (1,3) -> the first token ties (A = 0)
    c = step_credits(ALGORITHMS["tspmo"], comps, [1.0, 0.0, 1.0, 0.0], 2, CFG, None)
    assert c.signal_groups == 2 and c.rows == [0, 1, 2, 3] and c.cols == [1, 1, 0, 0]
    assert c.weight == pytest.approx([1 / 4] * 4)
    assert [x > 0 for x in c.adv] == [True, False, True, False]
    none = step_credits(ALGORITHMS["tspmo"], comps, [1.0, 1.0, 0.0, 0.0], 2, CFG, None)
    assert (len(none), none.zero_std_groups, none.signal_groups, none.signal_tokens) == (0, 2, 0, 0)


def test_group_advantages_epsilon_is_added_to_the_std():
    # rewards 1, 0: mean 0.5, sample std sqrt(0.5); eps 0.5 shrinks |A| to 0.5 / (sqrt(0.5) + 0.5)
    a = 0.5 / (math.sqrt(0.5) + 0.5)
    assert group_advantages([1, 0], eps=0.5) == pytest.approx([a, -a])


def test_sgrpo_draw_equal_to_p_is_not_kept():
    """A token is kept when its uniform draw is below P (probability P exactly), so a draw equal to P is not."""
    assert keep_positions(3, alpha=0, p=0.5, k=3, rng=FixedDraws([0.5, 0.49, 0.5])) == [1]


def test_tspmo_refuses_rewards_that_do_not_match_the_completions():
    with pytest.raises(ValueError):
        prefix_advantages([[1, 2], [1, 3]], [1.0])


def test_replay_sampler_explicit_switch_and_seeded_stream():
    """`active` given explicitly wins over the config (the TRL trainer and tests use it), and the sampler's own
    RNG stream is set by the seed: two samplers of one config replay the same cuts, in the same order."""
    from tokeneff.algorithms.tspmo import ReplaySampler

    cfg = SimpleNamespace(algo="grpo", task="svamp", replay="off", replay_fraction=1.0, replay_buffer_size=8, seed=3)
    runs = []
    for _ in range(2):
        s = ReplaySampler(cfg, active=True)
        s.record(0, [], [[1, 2, 3, 4, 5], [1, 9]], [1.0, 0.0])
        runs.append([s.pick() for _ in range(6)])
    assert runs[0] == runs[1] and all(p is not None and p[0] == 0 for p in runs[0])
    assert len({len(p[1]) for p in runs[0]}) > 1  # cuts vary: drawn, not fixed
    assert ReplaySampler(cfg).pick() is None  # from the config: grpo never replays


def test_step_credits_one_credited_token_in_one_group_carries_the_whole_step():
    """T-SPMO, G = 2: [1, 2] (reward 1) and [1] (reward 0) share their first token, so the only pair is (1) -> 2,
    with A = 1 - 0.5; the other group has equal rewards. One group carries credit: its one weight is 1."""
    c = step_credits(ALGORITHMS["tspmo"], [[1, 2], [1], [3], [3]], [1.0, 0.0, 0.0, 0.0], 2, CFG, None)
    assert (c.rows, c.cols, c.signal_groups, c.zero_std_groups) == ([0], [1], 1, 1)
    assert c.adv == pytest.approx([0.5]) and c.weight == pytest.approx([1.0])
