"""Multi-digit multiplication: a seeded generator with fixed held-out test and validation sets.

Two answer formats (config `answer_format`):
- `short`: one line, "47 * 38 = 1786. The answer is 1786." (~19 tokens for 2x1 digits).
- `worked`: long multiplication written out, one partial product per non-zero digit of the second factor and
  their running sum, "47 * 38: 47 * 8 = 376. 47 * 30 = 1410. 376 + 1410 = 1786. The answer is 1786." (~59
  SmolLM2 tokens for 2x2 digits). Long answers are where T-SPMO's replay and S-GRPO's selection have something
  to act on; the paper's model writes up to 200 tokens. The traces are generated, so always correct.
The reward is exact match of the final number in both formats.

Splits are drawn without overlap: test first (TEST_SEED, unchanged since the first release), then validation
(VAL_SEED; settings are chosen on it, never on test), then train from the rest with the run's data seed.
"""

from __future__ import annotations

import random

from ..errors import ConfigError
from .base import Problem, Task, check_split

TEST_SEED, VAL_SEED, SHOT_SEED = 1234, 4321, 777
N_TEST, N_VAL = 200, 200
FORMATS = ("short", "worked")


def short_answer(a: int, b: int) -> str:
    return f"{a} * {b} = {a * b}. The answer is {a * b}."


def worked_answer(a: int, b: int) -> str:
    """Long multiplication as text: a partial product for each non-zero digit of `b` (least significant first,
    with its place value), then the running sum; a single partial product needs no sum."""
    partials = [(d * 10**i, a * d * 10**i) for i, d in enumerate(int(c) for c in reversed(str(b))) if d]
    if len(partials) <= 1:
        return short_answer(a, b)
    steps = [f"{a} * {m} = {p}." for m, p in partials]
    total = partials[0][1]
    for _, p in partials[1:]:
        steps.append(f"{total} + {p} = {total + p}.")
        total += p
    return f"{a} * {b}: " + " ".join(steps) + f" The answer is {a * b}."


class Multiplication(Task):
    name = "multiplication"
    instruction = "Multiply the numbers. End with 'The answer is N.'"
    shots = (("What is 12 * 3?", "12 * 3 = 36. The answer is 36."),
             ("What is 45 * 6?", "45 * 6 = 270. The answer is 270."),
             ("What is 7 * 8?", "7 * 8 = 56. The answer is 56."))
    worked_instruction = "Multiply step by step: partial products, then their sum. End with 'The answer is N.'"

    def __init__(self, num_shots: int = 2, digits_a: int = 3, digits_b: int = 3, seed: int = 0,
                 n_train: int = 5000, answer_format: str = "short"):
        if answer_format not in FORMATS:
            raise ConfigError(f"answer_format={answer_format!r}: must be one of {', '.join(FORMATS)}")
        self.digits_a, self.digits_b, self.seed, self.n_train = digits_a, digits_b, seed, n_train
        self.answer_format = answer_format
        if answer_format == "worked":
            # worked examples of the run's own digit counts, drawn outside the test and validation problems
            self.instruction = self.worked_instruction
            pairs = self._pairs(random.Random(SHOT_SEED), 3, self._held_out_pairs())
            self.shots = tuple((f"What is {a} * {b}?", worked_answer(a, b)) for a, b in pairs)
        super().__init__(num_shots)

    def _space(self) -> int:
        return 9 * 10 ** (self.digits_a - 1) * 9 * 10 ** (self.digits_b - 1)

    def _pairs(self, rng: random.Random, n: int, exclude: set) -> list[tuple[int, int]]:
        lo_a, hi_a = 10 ** (self.digits_a - 1), 10**self.digits_a - 1
        lo_b, hi_b = 10 ** (self.digits_b - 1), 10**self.digits_b - 1
        n = min(n, self._space() - len(exclude))
        seen, out = set(exclude), []
        while len(out) < n:
            pair = (rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b))
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
        return out

    def _split_pairs(self) -> dict[str, list[tuple[int, int]]]:
        n_held = self._space() // 4  # tiny digit counts keep half of all pairs for training
        test = self._pairs(random.Random(TEST_SEED), min(N_TEST, n_held), set())
        val = self._pairs(random.Random(VAL_SEED), min(N_VAL, n_held), set(test))
        return dict(test=test, val=val)

    def _held_out_pairs(self) -> set[tuple[int, int]]:
        return {p for pairs in self._split_pairs().values() for p in pairs}

    def answer_text(self, a: int, b: int) -> str:
        """The reference answer in this task's format (the warm start's training target)."""
        return worked_answer(a, b) if self.answer_format == "worked" else short_answer(a, b)

    def pairs(self, split: str) -> list[tuple[int, int]]:
        check_split(split, ("train", "val", "test"))
        held = self._split_pairs()
        if split in held:
            return held[split]
        return self._pairs(random.Random(self.seed), self.n_train, set(held["test"]) | set(held["val"]))

    def problems(self, split: str) -> list[Problem]:
        tag = f"mul{self.digits_a}x{self.digits_b}-{split}"
        return [Problem(id=f"{tag}-{i}", question=f"What is {a} * {b}?", answer=float(a * b))
                for i, (a, b) in enumerate(self.pairs(split))]
