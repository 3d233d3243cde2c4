"""The error classes and the two helpers that quote a value in a message. Every module that reports a user's
mistake imports from here, so the contract (one line, no traceback, exit 2 from the CLI) has one home and no
module needs `config` just to raise."""

from __future__ import annotations

import reprlib
from typing import Any


class TokeneffError(Exception):
    """A user-facing error: the message is shown alone, without a traceback."""


class ConfigError(TokeneffError):
    """A bad setting (a TrainConfig field, an option, a key=value override)."""


MAX_SHOWN = 300


def show(value: Any, limit: int = MAX_SHOWN) -> str:
    """A value quoted for a message, at most `limit` characters: reprlib never expands more than it shows, so
    even a YAML alias bomb (a few bytes that repr() would expand to gigabytes) costs nothing."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 8
    try:
        return clip(r.repr(value), limit)
    except ValueError:  # an int too long for str() (Python refuses more than 4300 digits)
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<unprintable value>"


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to at most `limit` characters (a library's message inside ours, say)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
