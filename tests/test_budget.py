"""The token-budget table: what a smaller cap would have cut off and scored, read from one evaluation at a large cap."""

from tokeneff.analysis.budget import budget_table

WORDS = ["3", " +", " 4", " =", " 7", ".", " The", " answer", " is", " 7", "."]


def test_a_smaller_cap_cuts_long_answers_and_scores_what_their_first_tokens_say():
    decode = lambda t: "".join(WORDS[i] for i in t)  # noqa: E731 - token i is WORDS[i]
    full = list(range(len(WORDS)))  # "3 + 4 = 7. The answer is 7." (11 tokens, then the end-of-turn token)
    short = [9, 10]  # " 7." (2 tokens)
    records = [dict(reference=7.0, correct=True, truncated=False), dict(reference=7.0, correct=True, truncated=False),
               dict(reference=4.0, correct=False, truncated=False)]
    table = budget_table(records, [full, short, full], decode, cap=12, caps=(2, 3, 5, 11)).set_index("new_tokens")
    # cap 2: all cut, the short one too (2 tokens and its end-of-turn need 3), though it already reads 7; "3 +"
    # reads 3, right for neither long answer
    assert table.loc[2, "truncated"] == 3 and table.loc[2, "correct"] == 1
    # cap 3: the short answer ends; "3 + 4" reads as 4: right for the third record, by luck, as an evaluation would
    assert table.loc[3, "truncated"] == 2 and table.loc[3, "correct"] == 2
    # cap 5: "3 + 4 =" reads as 4 still; cap 11: "... The answer is 7" is right for the first, wrong for the third
    assert table.loc[5, "correct"] == 2 and table.loc[11, "correct"] == 2 and table.loc[11, "truncated"] == 2
    # the evaluation's own cap: its flags as recorded
    assert table.loc[12, "truncated"] == 0 and table.loc[12, "correct"] == 2
    assert list(table.index) == [2, 3, 5, 11, 12]


def test_the_budget_tool_refuses_what_is_not_an_evaluation_in_one_line(tmp_path, capsys):
    import json
    import os

    from tokeneff.analysis.budget import main

    os.mkfifo(tmp_path / "fifo.json")  # a read would block forever
    good = dict(completion="7.", reference=7.0, correct=True, truncated=False)
    cases = [(tmp_path / "fifo.json", [], "not a regular file"),
             (dict(records=[]), [], "non-empty list of evaluated completions"),
             (dict(records=[{**good, "completion": 5}]), [], "non-empty list"),
             (dict(records=[{k: v for k, v in good.items() if k != "completion"}]), [], "non-empty list"),
             (dict(records=[good], model="tiny-random", max_new_tokens="NaN"), [], "cap='NaN': must be"),
             (dict(records=[good], model="tiny-random"), ["--cap", "-1"], "cap=-1: must be"),
             (dict(records=[good], model="tiny-random", max_new_tokens=8), ["--cap", "99"], "leave --cap out")]
    for i, (content, flags, needle) in enumerate(cases):
        f = content if isinstance(content, os.PathLike) else tmp_path / f"e{i}.json"
        if not isinstance(content, os.PathLike):
            f.write_text(json.dumps(content))
        assert main([str(f), *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
