"""Task registry: `make_task(config)` builds the task a run asks for."""

from __future__ import annotations

from ..errors import ConfigError
from .answer import exact_match_reward, extract_answer, is_correct
from .base import Problem, Task
from .multiplication import Multiplication
from .svamp import SVAMP

__all__ = ["Problem", "Task", "SVAMP", "Multiplication", "make_task", "extract_answer", "is_correct",
           "exact_match_reward"]


def make_task(cfg) -> Task:
    if cfg.task == "svamp":
        return SVAMP(cfg.num_shots, cfg.svamp_dir, cfg.extra_train)
    if cfg.task == "multiplication":
        return Multiplication(cfg.num_shots, cfg.digits_a, cfg.digits_b, answer_format=cfg.answer_format)

    raise ConfigError(f"task={cfg.task!r}: must be one of svamp, multiplication")
