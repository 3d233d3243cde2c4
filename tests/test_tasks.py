import json

import pytest

from tokeneff.errors import ConfigError
from tokeneff.tasks import SVAMP, Multiplication
from tokeneff.tasks.svamp import load_svamp, make_test_ids, make_val_ids, shipped_ids, shipped_test_ids


def test_svamp_split_is_fixed_550_150_300_and_matches_its_seed():
    task = SVAMP()
    train, val, test = task.problems("train"), task.problems("val"), task.problems("test")
    assert len(train) == 550 and len(val) == 150 and len(test) == 300
    assert not {p.id for p in train} & {p.id for p in test}
    all_ids = [p.id for p in train + val + test]
    assert shipped_test_ids() == make_test_ids(all_ids)  # the committed lists are the seeded ones
    assert shipped_ids("val") == make_val_ids(all_ids, shipped_test_ids())
    assert all(float(p.answer).is_integer() for p in test)


def test_svamp_extra_train_adds_mawps_asdiv_with_numbers_filled_in():
    probs = SVAMP(extra_train=True).problems("train")
    extra = [p for p in probs if p.id.startswith("mawps")]
    assert len(extra) == 3138
    assert "number0" not in extra[0].question and "56" in extra[0].question and extra[0].answer == 504.0


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    (json.dumps([{"ID": "chal-1", "Body": "b", "Answer": 3}]), "lacks field 'Question'"),
    (json.dumps([{"ID": "chal-1", "Body": "b", "Question": "q", "Answer": "three"}]), "non-numeric Answer"),
])
def test_svamp_bad_files_give_one_line_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "SVAMP.json").write_text(content)
    load_svamp.cache_clear()
    with pytest.raises(ConfigError, match=message):
        SVAMP(svamp_dir=str(tmp_path)).problems("test")


def test_multiplication_is_seeded_and_test_set_held_out():
    t = Multiplication(digits_a=3, digits_b=3)
    test, train = t.problems("test"), t.problems("train")
    assert [p.question for p in test] == [p.question for p in Multiplication(3, 3, 3).problems("test")]
    assert len(test) == 200 and not {p.question for p in test} & {p.question for p in train}
    for p in test[:20]:
        a, b = (int(x) for x in p.question.removeprefix("What is ").rstrip("?").split(" * "))
        assert 100 <= a <= 999 and 100 <= b <= 999 and p.answer == a * b
    small = Multiplication(digits_a=1, digits_b=1)
    sizes = [len(small.problems(s)) for s in ("test", "val", "train")]
    assert sizes == [20, 20, 41]  # 81 pairs in all


def test_splits_are_disjoint_and_val_ids_are_the_committed_ones():
    t = Multiplication(digits_a=2, digits_b=2)
    test, val, train = (set(t.pairs(s)) for s in ("test", "val", "train"))
    assert len(val) == 200 and not val & test and not train & (val | test)
    shots = {q for q, _ in Multiplication(1, 2, 2, answer_format="worked").shots}
    assert not shots & {f"What is {a} * {b}?" for a, b in val | test}
    s = SVAMP()
    ids = {sp: {p.id for p in s.problems(sp)} for sp in ("train", "val", "test")}
    assert [len(ids[k]) for k in ("train", "val", "test")] == [550, 150, 300]
    assert not ids["val"] & ids["test"] and not ids["train"] & (ids["val"] | ids["test"])


@pytest.mark.parametrize("digits", [(2, 1), (2, 2)])
def test_multiplication_val_pairs_are_the_committed_ones(digits):
    from importlib import resources

    name = f"multiplication_{digits[0]}x{digits[1]}_val.txt"
    text = (resources.files("tokeneff.tasks") / "splits" / name).read_text()
    committed = [tuple(int(x) for x in line.split(" * ")) for line in text.splitlines()]
    assert Multiplication(digits_a=digits[0], digits_b=digits[1]).pairs("val") == committed


def test_worked_answer_is_long_multiplication_with_a_running_sum():
    from tokeneff.tasks.multiplication import worked_answer

    assert worked_answer(47, 38) == "47 * 38: 47 * 8 = 376. 47 * 30 = 1410. 376 + 1410 = 1786. The answer is 1786."
    # a zero digit has no partial product; one partial product needs no sum
    assert worked_answer(47, 40) == "47 * 40 = 1880. The answer is 1880."
    assert worked_answer(123, 405) == ("123 * 405: 123 * 5 = 615. 123 * 400 = 49200. 615 + 49200 = 49815. "
                                       "The answer is 49815.")
    assert worked_answer(12, 111).endswith("12 + 120 = 132. 132 + 1200 = 1332. The answer is 1332.")


def test_messages_put_instruction_first_and_shots_before_problem():
    task = SVAMP(num_shots=2)
    msgs = task.messages(task.problems("test")[0])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"].endswith("The answer is 15.")
