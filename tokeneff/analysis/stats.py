"""Statistics that fit the data: per-problem outcomes are 0/1, paired across arms, bounded.

Every arm (base model, an algorithm's runs) is evaluated greedily on the *same* held-out problems, so the
natural comparison is paired by problem. We bootstrap problems and seeds together:

    gain = mean over (seed, problem) of A  -  mean over (seed, problem) of B

with one shared resample of problems for both arms (the pairing) and an independent resample of each arm's
seeds (runs are independent across seeds). Percentile intervals of a mean of 0/1 outcomes stay in [0, 1]
(accuracy) and [-1, 1] (gains) by construction, unlike a t-interval over three seeds.

The interval's bounds are order statistics of the sorted draws, at ranks computed in integers
(`percentile_ranks`): in floating point (1 - 0.95) / 2 is 0.025000000000000022, and a rank taken from it picks
the 251st of 10,000 draws for the lower bound instead of the 250th.

Verdicts are computed from the interval and a practical margin `delta` (default 2 points, see `verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

N_BOOT = 10_000
DELTA = 0.02  # gains smaller than 2 points are "no practical gain" at our scale
TOL = 1e-9


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    seeds: int
    problems: int

    def points(self) -> str:
        """'+7.5 [+2.5, +12.5]' in percentage points."""
        return f"{100 * self.mean:+.1f} [{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]"

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def _as_matrix(x) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
        raise ValueError(f"expected outcomes shaped [seeds, problems], got {a.shape}")
    return a


def _seed_means(a: np.ndarray, rng: np.random.Generator, n_boot: int, weights_p: np.ndarray) -> np.ndarray:
    """Per bootstrap draw: mean over resampled seeds and resampled problems of a [seeds, problems] matrix."""
    s, p = a.shape
    if s == 1:
        weights_s = np.ones((n_boot, 1))
    else:
        weights_s = rng.multinomial(s, np.full(s, 1 / s), size=n_boot).astype(float)
    return np.einsum("bs,sp,bp->b", weights_s, a, weights_p) / (s * p)


def percentile_ranks(n_boot: int, level: float = 0.95) -> tuple[int, int]:
    """1-based ranks (k-th smallest of `n_boot` sorted draws) of the lower and upper bound of a `level` interval.

    The inverted-CDF percentile, computed exactly: tail = (1 - level) / 2 as a fraction (`level` is read from its
    shortest decimal form, 0.95 -> 19/20), lower rank ceil(n_boot * tail), upper rank ceil(n_boot * (1 - tail)).
    For 10,000 draws at 95%: the 250th and the 9,750th; for 40 draws: the 1st and the 39th.
    """
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: must be a positive integer")
    lv = Fraction(str(level))
    if not 0 < lv < 1:
        raise ValueError(f"level={level!r}: must lie strictly between 0 and 1")
    tail = (1 - lv) / 2

    def ceil_rank(q: Fraction) -> int:
        return max(1, -(-n_boot * q.numerator // q.denominator))

    return ceil_rank(tail), ceil_rank(1 - tail)


def paired_bootstrap(a, b=None, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of `a` minus mean of `b` (or of `a` alone) with a percentile interval.

    a, b: outcomes shaped [seeds, problems] (a 1-D array is one seed); columns are the same problems in the
    same order. Problems are resampled once per draw for both arms; seeds independently per arm.
    """
    a = _as_matrix(a)
    if b is not None:
        b = _as_matrix(b)
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"arms must share their problems: {a.shape[1]} vs {b.shape[1]} columns")
    rng = np.random.default_rng(seed)
    p = a.shape[1]
    weights_p = rng.multinomial(p, np.full(p, 1 / p), size=n_boot).astype(float)
    draws = _seed_means(a, rng, n_boot, weights_p)
    mean = a.mean()
    if b is not None:
        draws = draws - _seed_means(b, rng, n_boot, weights_p)
        mean = mean - b.mean()
    k_lo, k_hi = percentile_ranks(n_boot, level)
    draws = np.sort(draws)
    lo, hi = draws[k_lo - 1], draws[k_hi - 1]
    return Interval(float(mean), float(lo), float(hi), seeds=a.shape[0], problems=p)


def verdict(iv: Interval, claim: str, delta: float = DELTA) -> str:
    """The verdict the interval supports for a claim about a difference (ours - reference).

    claim="gain":    the paper says it improves. holds if lo > 0; contradicted if hi < delta (no gain of even
                     `delta`); otherwise unresolved.
    claim="no gain": the paper says it does not improve. holds if hi < delta; contradicted if lo > 0.
    """
    if claim not in ("gain", "no gain"):
        raise ValueError(f"claim={claim!r}: must be 'gain' or 'no gain'")
    unresolved = f"unresolved (± {100 * iv.half_width:.1f} points)"
    # bounds are means of 0/1 outcomes, so they can land exactly on 0 or delta: those count as not past them
    lo_above_0, hi_below_delta = iv.lo > TOL, iv.hi < delta - TOL
    if claim == "gain":
        return "holds" if lo_above_0 else ("contradicted" if hi_below_delta else unresolved)
    return "holds" if hi_below_delta else ("contradicted" if lo_above_0 else unresolved)
