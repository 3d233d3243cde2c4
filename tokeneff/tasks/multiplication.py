"""Multi-digit multiplication: a seeded generator with a fixed held-out test set."""

from __future__ import annotations

import random

from .base import Problem, Task, check_split

TEST_SEED = 1234
N_TEST = 200


class Multiplication(Task):
    name = "multiplication"
    instruction = "Multiply the numbers. End with 'The answer is N.'"
    shots = (("What is 12 * 3?", "12 * 3 = 36. The answer is 36."),
             ("What is 45 * 6?", "45 * 6 = 270. The answer is 270."),
             ("What is 7 * 8?", "7 * 8 = 56. The answer is 56."))

    def __init__(self, num_shots: int = 2, digits_a: int = 3, digits_b: int = 3, seed: int = 0,
                 n_train: int = 5000):
        super().__init__(num_shots)
        self.digits_a, self.digits_b, self.seed, self.n_train = digits_a, digits_b, seed, n_train

    def _pairs(self, rng: random.Random, n: int, exclude: set) -> list[tuple[int, int]]:
        lo_a, hi_a = 10 ** (self.digits_a - 1), 10**self.digits_a - 1
        lo_b, hi_b = 10 ** (self.digits_b - 1), 10**self.digits_b - 1
        space = (hi_a - lo_a + 1) * (hi_b - lo_b + 1)
        n = min(n, space - len(exclude))
        seen, out = set(exclude), []
        while len(out) < n:
            pair = (rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b))
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
        return out

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        space = 9 * 10 ** (self.digits_a - 1) * 9 * 10 ** (self.digits_b - 1)
        n_test = min(N_TEST, space // 4)  # tiny digit counts keep 3/4 of all pairs for training
        test = self._pairs(random.Random(TEST_SEED), n_test, set())
        pairs = test if split == "test" else self._pairs(random.Random(self.seed), self.n_train, set(test))
        tag = f"mul{self.digits_a}x{self.digits_b}-{split}"
        return [Problem(id=f"{tag}-{i}", question=f"What is {a} * {b}?", answer=float(a * b))
                for i, (a, b) in enumerate(pairs)]
