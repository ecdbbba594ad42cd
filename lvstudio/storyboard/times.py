"""Times in storyboards: `90`, `"12s"`, `"1:30"`, `"1:02:03"` to seconds and back, exactly."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from lvstudio.errors import LvError
from lvstudio.storyboard.messages import show, type_name

TIME_FIX = 'use seconds ("90s", 90) or m:ss ("1:30")'
MAX_DURATION_S = 24 * 3600.0  # the longest storyboard or --duration

_SECONDS_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*s?", re.ASCII)
_MSS_RE = re.compile(r"([0-9]+):([0-9]{1,2}(?:\.[0-9]+)?)", re.ASCII)
_HMMSS_RE = re.compile(r"([0-9]+):([0-9]{1,2}):([0-9]{1,2}(?:\.[0-9]+)?)", re.ASCII)


class TimeParseError(ValueError):
    """A time that could not be parsed: `problem` and `fix` are kept apart for StoryboardError."""

    def __init__(self, problem: str, fix: str = TIME_FIX) -> None:
        super().__init__(f"{problem} — {fix}")
        self.problem = problem
        self.fix = fix


def parse_time(value: str | int | float) -> float:
    """Seconds from `90`, `1.5`, `"12s"`, `"1.5s"`, `"1:30"`, `"0:05.5"` or `"1:02:03"`; ValueError otherwise."""
    if isinstance(value, bool):
        raise TimeParseError(f"{show(value)} is not a time")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise TimeParseError(f"{show(value)} is far too large to be a time") from None
    elif isinstance(value, str):
        seconds = _parse_time_text(value)
    else:
        raise TimeParseError(f"expected a time, got {type_name(value)}")
    if not math.isfinite(seconds):
        raise TimeParseError(f"{show(value)} is not a finite time")
    if seconds < 0:
        raise TimeParseError(f"{show(value)} is negative", "times count from the start of the video: use 0 or more")
    return seconds


def _parse_time_text(value: str) -> float:
    """Parse the string forms of a time (see `parse_time`)."""
    text = value.strip()
    if match := _SECONDS_RE.fullmatch(text):
        return float(match.group(1))
    if match := _MSS_RE.fullmatch(text):
        minutes, seconds = float(match.group(1)), float(match.group(2))
        if seconds >= 60:
            raise TimeParseError(f"{show(value)} is not a time (the seconds in m:ss must be below 60)")
        return minutes * 60 + seconds
    if match := _HMMSS_RE.fullmatch(text):
        hours, minutes, seconds = (float(g) for g in match.groups())
        if minutes >= 60 or seconds >= 60:
            raise TimeParseError(f"{show(value)} is not a time (minutes and seconds in h:mm:ss must be below 60)")
        return (hours * 3600 + minutes * 60) + seconds
    if text.startswith("-"):
        raise TimeParseError(f"{show(value)} is negative", "times count from the start of the video: use 0 or more")
    raise TimeParseError(f"{show(value)} is not a time")


def format_time(seconds: float) -> str:
    """`65.5` → `"1:05.5"`, `3723` → `"1:02:03"`; exact: `parse_time(format_time(x)) == x` (for x < 2**53)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"format_time expects a number of seconds, got {type_name(seconds)}")
    x = float(seconds)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"format_time expects a finite time >= 0, got {seconds!r}")
    whole = int(x)
    frac = x - whole  # exact: removing the integer part of a float loses no bits
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = _decimal_text(float(secs) + frac)  # exact: the sum is representable (it is x minus an integer)
    head, _, tail = sec_text.partition(".")
    sec_text = head.zfill(2) + (f".{tail}" if tail else "")
    if hours:
        return f"{hours}:{minutes:02d}:{sec_text}"
    return f"{minutes}:{sec_text}"


def _decimal_text(x: float) -> str:
    """Shortest round-tripping decimal text of a finite float ≥ 0, without exponent and without a `.0` tail."""
    text = repr(float(x))
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    if text.endswith(".0"):
        text = text[:-2]
    return text


def seconds_text(x: float) -> str:
    """`2.0` → `"2s"`, `1.5` → `"1.5s"` (exact round trip through `parse_time`)."""
    return _decimal_text(x) + "s"


def parse_duration(duration: str | None, option: str = "--duration") -> float | None:
    """A command's duration option (seconds or m:ss; None: not given) to seconds; LvError naming the option, saying
    what is wrong and the accepted forms once."""
    if duration is None:
        return None
    try:
        seconds = parse_time(duration)
    except TimeParseError as err:
        raise LvError(f"{option}: {err.problem}", hint=err.fix) from None
    if seconds <= 0:
        raise LvError(f"{option} must be positive (got {duration!r})", hint=TIME_FIX)
    if seconds > MAX_DURATION_S:
        raise LvError(f"{option} {duration} is longer than the 24-hour maximum", hint="render it in several parts")
    return seconds
