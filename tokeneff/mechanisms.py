"""Per-step mechanism diagnostics: did token selection and replay do what the paper says they do?

Logged in every metrics.jsonl row (all algorithms, so that they compare), computed from the step's groups and
credits only (no extra forward, no RNG):
- `credit_pos_hist`: credited tokens counted by their position in the whole answer (replayed prefix included), in
  bins of POS_BIN tokens; the last bin also holds everything beyond. Where the paper expects T-SPMO to credit the
  pivotal tokens of a long answer, and replay to move credit to late positions.
- `groups_fresh`, `groups_fresh_signal`, `groups_replayed`, `groups_replayed_signal`: groups started from a problem
  or from a replayed prefix, and how many of each had unequal rewards (a comparison to learn from). Replay is meant
  to give late positions comparisons of their own: its groups should have reward variance.
- `replay_cut_tokens`: the length of each replayed prefix (how deep replay cuts into an answer).
"""

from __future__ import annotations

from typing import Any

from .algorithms import StepCredits

POS_BIN = 4
"""tokens per bin of `credit_pos_hist`"""


def step_mechanisms(prefix_lens: list[int], rewards: list[float], credits: StepCredits, group_size: int,
                    max_new_tokens: int) -> dict[str, Any]:
    """prefix_lens: per group, the replayed prefix's length (0: a fresh group); rewards: per completion, group by
    group; credits: the step's credits (rows index completions, cols positions after the prefix)."""
    G = group_size
    n_bins = -(-max_new_tokens // POS_BIN)
    hist = [0] * n_bins
    for row, col in zip(credits.rows, credits.cols, strict=True):
        hist[min((prefix_lens[row // G] + col) // POS_BIN, n_bins - 1)] += 1
    signal = [len(set(rewards[g * G: (g + 1) * G])) > 1 for g in range(len(prefix_lens))]
    replayed = [n > 0 for n in prefix_lens]
    return dict(credit_pos_hist=hist,
                groups_fresh=sum(not r for r in replayed),
                groups_fresh_signal=sum(s and not r for s, r in zip(signal, replayed, strict=True)),
                groups_replayed=sum(replayed),
                groups_replayed_signal=sum(s and r for s, r in zip(signal, replayed, strict=True)),
                replay_cut_tokens=[n for n in prefix_lens if n > 0])
