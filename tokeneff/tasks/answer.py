"""Answer extraction and the exact-match reward (the paper's only reward signal)."""

from __future__ import annotations

import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_AFTER_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def _to_float(text: str) -> float | None:
    text = text.replace(",", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def extract_answer(completion: str) -> float | None:
    """The number after the last "answer is", else the last number; None when there is none.

    Thousands separators are dropped ("1,234" -> 1234), "51.0" equals 51, trailing punctuation is ignored.
    """
    hits = _AFTER_ANSWER_IS.findall(completion)
    if not hits:
        hits = _ANY_NUMBER.findall(completion)
    for text in reversed(hits):
        value = _to_float(text)
        if value is not None:
            return value
    return None


def is_correct(completion: str, reference: float) -> bool:
    value = extract_answer(completion)
    return value is not None and abs(value - float(reference)) < 1e-6 * max(1.0, abs(float(reference)))


def exact_match_reward(prompts: list, completions: list, answer: list, **columns) -> list[float]:
    """TRL-style reward function: 1.0 when the extracted final number equals `answer`, else 0.0.

    Completions may be strings or chat messages ([{"role": "assistant", "content": ...}]), as in TRL.
    """
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        if isinstance(completion, list):
            completion = completion[-1]["content"] if completion else ""
        out.append(1.0 if is_correct(completion, ref) else 0.0)
    return out
