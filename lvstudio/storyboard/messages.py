"""Small helpers for storyboard messages: how a value is shown, its TOML type name, a close match, and raising a
validation error that keeps our own message, fix and key path."""

from __future__ import annotations

import datetime as _dt
import difflib
import re
from typing import NoReturn

from pydantic_core import PydanticCustomError

CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters other than tab and newline
LINE_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")  # every control character (one-line text)




def type_name(value: object) -> str:
    """The TOML name of a parsed value's type, with an article."""
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, _dt.datetime):
        return "a date-time"
    if isinstance(value, _dt.date):
        return "a date"
    if isinstance(value, _dt.time):
        return "a time of day"
    return f"a {type(value).__name__}"


def show(value: object, limit: int = 40) -> str:
    """A short, safe rendering of a user value for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= limit else value[: limit - 3] + "..."
        text = LINE_CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
        return '"' + text.replace('"', '\\"') + '"'
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 128 else f"{'-' if value < 0 else ''}{value.bit_length()}-bit integer"
        return text
    if isinstance(value, float):
        return repr(value)
    return type_name(value)


def fail(message: str, fix: str | None = None, path: tuple[str | int, ...] = ()) -> NoReturn:
    """Raise a validation error that keeps our own message, fix and (relative) key path."""
    raise PydanticCustomError("lv", "{message}", {"message": message, "fix": fix, "path": path})


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest choice to a misspelt word, if any is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None
