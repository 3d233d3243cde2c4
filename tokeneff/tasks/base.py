"""What every task provides: problems by split, chat messages for a problem, and the reward."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .answer import exact_match_reward


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: float


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class Task:
    """A task is a list of problems per split plus a prompt format; the reward is exact match."""

    name = "task"
    instruction = "Solve the problem. End with 'The answer is N.'"
    shots: tuple[tuple[str, str], ...] = ()  # (question, worked answer) pairs, none from the test set

    def __init__(self, num_shots: int = 2):
        if num_shots > len(self.shots):
            raise ConfigError(f"num_shots={num_shots}: the {self.name} task has {len(self.shots)} worked examples")
        self.num_shots = num_shots

    def problems(self, split: str) -> list[Problem]:
        raise NotImplementedError

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The instruction as the system turn (it also replaces long default system prompts), the worked
        examples as earlier user/assistant turns, then the problem."""
        turns = [{"role": "system", "content": self.instruction}]
        for q, a in self.shots[: self.num_shots]:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        turns.append({"role": "user", "content": problem.question})
        return turns

    @staticmethod
    def reward(prompts: list, completions: list, answer: list, **columns) -> list[float]:
        return exact_match_reward(prompts, completions, answer, **columns)


def check_split(split: str, allowed: tuple[str, ...] = ("train", "test")) -> None:
    if split not in allowed:
        raise ConfigError(f"split={split!r}: must be one of {', '.join(allowed)}")
