import pytest

from tokeneff.tasks import exact_match_reward, extract_answer


@pytest.mark.parametrize("text, expected", [
    ("24 - 9 = 15. The answer is 15.", 15.0),
    ("The answer is 1,234!", 1234.0),
    ("so 3 + 4 = 7", 7.0),
    ("The answer is 51.0", 51.0),
    ("The answer is: $12.", 12.0),
    ("answer is -3, not 5", -3.0),  # "answer is" wins over the last number
    ("first 2 then 0.5.", 0.5),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_reward_is_exact_match_with_trl_signature():
    comps = ["The answer is 51.", "The answer is 52.", [{"role": "assistant", "content": "51.0"}], "none"]
    assert exact_match_reward(prompts=[None] * 4, completions=comps, answer=[51.0] * 4) == [1.0, 0.0, 1.0, 0.0]
