"""Paired bootstrap and verdicts: known answers on hand-made outcomes."""

import numpy as np
import pytest

from tokeneff.analysis.stats import Interval, paired_bootstrap, percentile_ranks, verdict


def test_one_seed_matches_the_exact_bootstrap_distribution():
    # gain per problem: [1, 0, 0, 0]. A resample of 4 problems holds Binomial(4, 1/4) copies of the first, so
    # the resampled mean gain is k/4 with P(k=0) = 0.316 and P(k <= 2) = 0.949 < 0.975 <= P(k <= 3) = 0.996:
    # the exact 95% percentile interval is [0, 0.75].
    iv = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], n_boot=20_000)
    assert (iv.mean, iv.lo, iv.hi) == (0.25, 0.0, 0.75)


def test_identical_arms_have_a_zero_width_interval_because_problems_are_paired():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=50)
    iv = paired_bootstrap(a, a.copy())
    assert (iv.mean, iv.lo, iv.hi) == (0.0, 0.0, 0.0)
    # the same outcomes, unpaired (problems shuffled in one arm), give a wide interval
    assert paired_bootstrap(a, a[rng.permutation(50)]).half_width > 0.05


def test_seeds_are_resampled():
    # two seeds that disagree on every problem: resampling 2 of 2 seeds gives means 0, 1/2, 1 with
    # probabilities 1/4, 1/2, 1/4, so the interval is [0, 1]; resampling problems alone would give [1/2, 1/2].
    iv = paired_bootstrap([[1, 1, 1, 1], [0, 0, 0, 0]])
    assert (iv.mean, iv.lo, iv.hi) == (0.5, 0.0, 1.0)
    assert (iv.seeds, iv.problems) == (2, 4)


def test_intervals_stay_in_range():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 40)) < 0.97).astype(float)  # near the ceiling, where a t-interval would leave [0, 1]
    b = (rng.random(40) < 0.03).astype(float)
    acc, gain = paired_bootstrap(a), paired_bootstrap(a, b)
    assert 0 <= acc.lo <= acc.mean <= acc.hi <= 1
    assert -1 <= gain.lo <= gain.mean <= gain.hi <= 1


def test_arms_must_share_problems():
    with pytest.raises(ValueError, match="share their problems"):
        paired_bootstrap(np.ones((2, 5)), np.ones(4))


@pytest.mark.parametrize("lo,hi,claim,expected", [
    (0.01, 0.10, "gain", "holds"),
    (-0.05, 0.015, "gain", "contradicted"),          # no gain of 2 points or more is compatible
    (-0.03, 0.04, "gain", "unresolved (± 3.5 points)"),
    (-0.03, 0.015, "no gain", "holds"),
    (0.005, 0.08, "no gain", "contradicted"),
    (-0.02, 0.06, "no gain", "unresolved (± 4.0 points)"),
])
def test_verdict_follows_the_interval(lo, hi, claim, expected):
    assert verdict(Interval((lo + hi) / 2, lo, hi, 1, 100), claim) == expected


def test_verdict_rejects_unknown_claims():
    with pytest.raises(ValueError, match="claim='better'"):
        verdict(Interval(0, 0, 0, 1, 1), "better")


def test_bounds_exactly_on_the_thresholds_do_not_decide():
    # 6 of 300 problems = 0.02, which floating point may land a hair either side of
    on_delta = Interval(0.0, -0.02, 6 / 300, 1, 300)
    assert verdict(on_delta, "gain").startswith("unresolved")
    assert verdict(Interval(0.01, 0.0, 0.05, 1, 300), "gain").startswith("unresolved")
    assert verdict(Interval(0.01, 0.0, 0.05, 1, 300), "no gain").startswith("unresolved")


def test_percentile_ranks_are_exact_integers():
    # 95% of 10,000 draws: 2.5% = 250 draws below the lower bound's tail, so the 250th and the 9,750th.
    # Computed from the float (1 - 0.95) / 2 = 0.025000000000000022 the lower rank was ceil(250.0000000002) = 251.
    assert percentile_ranks(10_000, 0.95) == (250, 9750)
    assert percentile_ranks(40, 0.95) == (1, 39)  # 40 * 1/40 = 1 exactly: the smallest draw
    assert percentile_ranks(10, 0.8) == (1, 9)
    assert percentile_ranks(7, 0.5) == (2, 6)  # ceil(7/4) = 2, ceil(21/4) = 6
    with pytest.raises(ValueError, match="level"):
        percentile_ranks(100, 1.0)


def test_the_lower_bound_of_40_draws_is_the_smallest():
    # 95% of 40 draws: tail 1/40, so the bounds are the 1st and the 39th smallest draw (the float rule took the
    # 2nd). The draws are recomputed with the same generator calls (one seed: only problems are resampled).
    a = np.random.default_rng(3).integers(0, 2, size=50).astype(float)
    w = np.random.default_rng(0).multinomial(50, np.full(50, 1 / 50), size=40).astype(float)
    draws = np.sort(w @ a / 50)
    assert draws[0] < draws[1]  # so the 1st and the 2nd are told apart
    iv = paired_bootstrap(a, n_boot=40)
    assert (iv.lo, iv.hi) == (draws[0], draws[38])


def test_a_metric_plot_draws_the_same_bands_from_the_same_runs():
    """Its bands are bootstrap intervals over seeds: unseeded, each `make reproduce` redrew a committed figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from tokeneff.analysis.report import plot_metric

    rng = np.random.default_rng(0)
    df = pd.DataFrame([dict(variant=v, seed=s, step=t, reward_mean=rng.random()) for v in ("grpo", "sgrpo")
                       for s in range(4) for t in range(1, 9)])
    bands = []
    for _ in range(2):
        ax = plot_metric(df, "reward_mean", "reward", "t")
        bands.append([np.asarray(p.get_paths()[0].vertices) for p in ax.collections])
        plt.close(ax.figure)
    assert bands[0] and all(np.array_equal(a, b) for a, b in zip(*bands, strict=True))
