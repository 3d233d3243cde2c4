"""Mechanism diagnostics on hand-made steps: the numbers a reader uses to judge whether replay and selection acted."""

import pandas as pd

from tokeneff.algorithms import StepCredits
from tokeneff.analysis.mechanisms import mechanism_table
from tokeneff.mechanisms import step_mechanisms


def test_step_mechanisms_by_hand():
    # G = 2; group 0 fresh (rewards 1, 0: a comparison), group 1 replayed from a 5-token prefix (1, 1: none),
    # group 2 replayed from 3 tokens (0, 1).
    credits = StepCredits(rows=[0, 1, 1, 4, 5], cols=[0, 3, 9, 0, 2], adv=[0.0] * 5, weight=[0.0] * 5)
    m = step_mechanisms([0, 5, 3], [1.0, 0.0, 1.0, 1.0, 0.0, 1.0], credits, group_size=2, max_new_tokens=12)
    # answer positions: 0, 3, 9 (fresh group), 3 + 0 = 3 and 3 + 2 = 5 (row 4 and 5 are group 2): bins of 4 tokens
    assert m["credit_pos_hist"] == [3, 1, 1]
    assert (m["groups_fresh"], m["groups_fresh_signal"]) == (1, 1)
    assert (m["groups_replayed"], m["groups_replayed_signal"]) == (2, 1)
    assert m["replay_cut_tokens"] == [5, 3]


def test_positions_past_the_budget_land_in_the_last_bin():
    credits = StepCredits(rows=[0, 1], cols=[1, 7], adv=[0.0, 0.0], weight=[0.0, 0.0])
    m = step_mechanisms([6], [1.0, 0.0], credits, group_size=2, max_new_tokens=8)  # positions 7 and 13
    assert m["credit_pos_hist"] == [0, 2]


def test_mechanism_table_pools_seeds_and_steps():
    rows = [dict(variant="tspmo", seed=s, step=k, credit_pos_hist=[3, 1] if k else None, completion_len_mean=8.0,
                 replay_cut_tokens=[4] if k == 2 else [], tokens_in_signal_groups=40, tokens_in_loss=4,
                 groups_fresh=2, groups_fresh_signal=1, groups_replayed=1 if k == 2 else 0,
                 groups_replayed_signal=1 if k == 2 else 0) for s in (0, 1) for k in (0, 1, 2)]
    t = mechanism_table(pd.DataFrame(rows)).iloc[0]
    assert t.token_share == "10.0%" and t.seeds == 2
    # answers: 8 new tokens, plus the replayed prefix (4 tokens in one of step 2's three groups): 8.67 on average
    assert t.answer_tokens == "8.7" and t.credit_in_answer_second_half == "25%"  # bin [4, 8): centre 6 >= 4.33
    assert t.fresh_groups_with_signal == "50% of 8" and t.replayed_groups_with_signal == "100% of 2"
    assert t.replay_cut_tokens == "4.0 (median 4)"
