"""Storyboard: the user's TOML file of timed prompts, identities and anchors, parsed and validated.

    title = "Harbour at dusk"
    duration = "40s"
    [identities.hero]            # referenced as {hero} in prompts
    prompt = "a red ball"
    [[shots]]
    at = 0
    prompt = "{hero} bouncing over the sea"
    [[shots]]
    at = "0:12"
    prompt = "{hero} moving right on the grass"
    transition = "blend 2s"      # or "cut" (default)

Reading goes text → `tomli` (syntax errors carry line/column) → pydantic models (`extra="forbid"`, strict types,
field checks) → cross-field checks → `Storyboard`. Every failure becomes one `StoryboardError` with the file,
line/column when we can find it, the key path (`shots[2].at`, 0-based indices) and the fix.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import difflib
import math
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NoReturn

import tomli
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lvstudio.backends.registry import BACKENDS
from lvstudio.errors import StoryboardError

__all__ = [
    "Anchor",
    "Identity",
    "Shot",
    "Storyboard",
    "Transition",
    "dump_storyboard",
    "format_time",
    "load_storyboard",
    "parse_storyboard",
    "parse_time",
]

MAX_FILE_BYTES = 256 * 1024
MAX_SHOTS = 1000
MAX_PROMPT_CHARS = 1000
MAX_IDENTITIES = 64
MAX_ANCHORS = 64
MAX_TITLE_CHARS = 200
MAX_DURATION_S = 24 * 3600.0
MAX_SEED = 2**63 - 1
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 1920, 8
MIN_FPS, MAX_FPS = 1, 60
TIME_FIX = 'use seconds ("90s", 90) or m:ss ("1:30")'

_SECONDS_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*s?", re.ASCII)
_MSS_RE = re.compile(r"([0-9]+):([0-9]{1,2}(?:\.[0-9]+)?)", re.ASCII)
_HMMSS_RE = re.compile(r"([0-9]+):([0-9]{1,2}):([0-9]{1,2}(?:\.[0-9]+)?)", re.ASCII)
_BLEND_RE = re.compile(r"blend(?:\s+(.*))?", re.ASCII | re.DOTALL)
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
_PRESET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_RESOLUTION_RE = re.compile(r"\s*([0-9]{1,6})\s*[xX×]\s*([0-9]{1,6})\s*")
_REF_RE = re.compile(r"\{([^{}]*)\}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LINE_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")  # PNG, JPEG, BMP (WebP: RIFF....WEBP)
_INTERNAL_BUG = "unexpected internal error while reading the storyboard"


# --------------------------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------------------------


class _TimeError(ValueError):
    """A time that could not be parsed: `problem` and `fix` are kept apart for StoryboardError."""

    def __init__(self, problem: str, fix: str = TIME_FIX) -> None:
        super().__init__(f"{problem} — {fix}")
        self.problem = problem
        self.fix = fix


def parse_time(value: str | int | float) -> float:
    """Seconds from `90`, `1.5`, `"12s"`, `"1.5s"`, `"1:30"`, `"0:05.5"` or `"1:02:03"`; ValueError otherwise."""
    if isinstance(value, bool):
        raise _TimeError(f"{_show(value)} is not a time")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise _TimeError(f"{_show(value)} is far too large to be a time") from None
    elif isinstance(value, str):
        seconds = _parse_time_text(value)
    else:
        raise _TimeError(f"expected a time, got {_type_name(value)}")
    if not math.isfinite(seconds):
        raise _TimeError(f"{_show(value)} is not a finite time")
    if seconds < 0:
        raise _TimeError(f"{_show(value)} is negative", "times count from the start of the video: use 0 or more")
    return seconds


def _parse_time_text(value: str) -> float:
    """Parse the string forms of a time (see `parse_time`)."""
    text = value.strip()
    if match := _SECONDS_RE.fullmatch(text):
        return float(match.group(1))
    if match := _MSS_RE.fullmatch(text):
        minutes, seconds = float(match.group(1)), float(match.group(2))
        if seconds >= 60:
            raise _TimeError(f"{_show(value)} is not a time (the seconds in m:ss must be below 60)")
        return minutes * 60 + seconds
    if match := _HMMSS_RE.fullmatch(text):
        hours, minutes, seconds = (float(g) for g in match.groups())
        if minutes >= 60 or seconds >= 60:
            raise _TimeError(f"{_show(value)} is not a time (minutes and seconds in h:mm:ss must be below 60)")
        return (hours * 3600 + minutes * 60) + seconds
    if text.startswith("-"):
        raise _TimeError(f"{_show(value)} is negative", "times count from the start of the video: use 0 or more")
    raise _TimeError(f"{_show(value)} is not a time")


def format_time(seconds: float) -> str:
    """`65.5` → `"1:05.5"`, `3723` → `"1:02:03"`; exact: `parse_time(format_time(x)) == x` (for x < 2**53)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"format_time expects a number of seconds, got {_type_name(seconds)}")
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


def _seconds_text(x: float) -> str:
    """`2.0` → `"2s"`, `1.5` → `"1.5s"` (exact round trip through `parse_time`)."""
    return _decimal_text(x) + "s"


# --------------------------------------------------------------------------------------------------------------
# Small helpers for messages
# --------------------------------------------------------------------------------------------------------------


def _type_name(value: object) -> str:
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


def _show(value: object, limit: int = 40) -> str:
    """A short, safe rendering of a user value for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= limit else value[: limit - 3] + "..."
        text = _LINE_CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
        return '"' + text.replace('"', '\\"') + '"'
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 128 else f"{'-' if value < 0 else ''}{value.bit_length()}-bit integer"
        return text
    if isinstance(value, float):
        return repr(value)
    return _type_name(value)


def _fail(message: str, fix: str | None = None, path: tuple[str | int, ...] = ()) -> NoReturn:
    """Raise a validation error that keeps our own message, fix and (relative) key path."""
    raise PydanticCustomError("lv", "{message}", {"message": message, "fix": fix, "path": path})


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest choice to a misspelt word, if any is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _time_field(value: Any, what: str) -> float:
    """Validate a time field; TOML local times (`at = 00:01:30`) are accepted as well."""
    if isinstance(value, _dt.time) and not isinstance(value, _dt.datetime) and value.tzinfo is None:
        return value.hour * 3600 + value.minute * 60 + value.second + value.microsecond / 1e6
    if isinstance(value, (_dt.date, _dt.datetime)):
        _fail(f"{what} is {_type_name(value)}, not a time", TIME_FIX)
    try:
        return parse_time(value)
    except _TimeError as err:
        _fail(err.problem, err.fix)


def _text_field(value: Any, what: str, *, limit: int, multiline: bool, example: str) -> str:
    """Validate a non-empty, bounded text field without control characters; returns it stripped."""
    if not isinstance(value, str):
        _fail(f"{what} must be text, got {_type_name(value)}", f"put it in double quotes: {example}")
    text = value.strip()
    if not text:
        _fail(f"{what} is empty", f"write something, e.g. {example}")
    if len(text) > limit:
        _fail(f"{what} is {len(text)} characters long, more than the limit of {limit}", "shorten it")
    bad = (_CONTROL_RE if multiline else _LINE_CONTROL_RE).search(text)
    if bad:
        _fail(
            f"{what} contains the control character {ord(bad.group()):#04x}",
            "remove it" + ("" if multiline else "; keep it on one line"),
        )
    return text


def _int_field(value: Any, what: str, low: int, high: int, example: str) -> int:
    """Validate a whole number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float):
            if math.isfinite(value) and value.is_integer():
                _fail(f"expected a whole number, got {_show(value)}", f"write {int(value)} without the decimal point")
            _fail(f"expected a whole number, got {_show(value)}", f"e.g. {example}")
        if isinstance(value, str):
            _fail(f"expected a number, got text {_show(value)}", f"remove the quotes, e.g. {example}")
        _fail(f"expected a whole number, got {_type_name(value)}", f"e.g. {example}")
    if value < low or value > high:
        _fail(f"{_show(value)} is out of range", f"use a whole number from {low} to {high} for {what}")
    return value


def _image_field(value: Any, info: ValidationInfo, what: str) -> Path:
    """Resolve an image path against the storyboard's folder and check that it is a readable image."""
    if isinstance(value, Path):
        raw = value
    elif isinstance(value, str):
        if not value.strip():
            _fail(f"{what} is empty", 'give a path to a PNG or JPEG file, e.g. image = "anchors/start.png"')
        if "\x00" in value:
            _fail(f"{what} contains a NUL character", "fix the path")
        raw = Path(value)
    else:
        _fail(f"{what} must be a path in quotes, got {_type_name(value)}", 'e.g. image = "anchors/start.png"')
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    full = Path(os.path.abspath(raw if raw.is_absolute() else base / raw))
    data, problem, fix = _read_image_file(full, base)
    if problem is not None:
        _fail(problem, fix)
    if not (any(data.startswith(magic) for magic in _IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        _fail(f"{full} is not a PNG, JPEG, WebP or BMP image", "convert it to PNG")
    dims = _image_dims(data)
    if dims is not None and max(dims) > MAX_IMAGE_SIDE:
        _fail(f"image {full} is {dims[0]}x{dims[1]} pixels, larger than {MAX_IMAGE_SIDE} on a side",
              "use a smaller image (anchors are resized to the video size anyway)")
    if not _decodes(data):
        _fail(f"image {full} could not be decoded (corrupt or truncated?)", "re-export it as PNG")
    return full


def _read_image_file(full: Path, base: Path) -> tuple[bytes, str | None, str | None]:
    """The bytes of an image file, or (b"", problem, fix) when it is missing, not a file, too big or unreadable."""
    try:
        if not full.exists():
            fix = f"check the spelling; paths are relative to the storyboard's folder ({base})"
            return b"", f"image not found: {full}", fix
        if not full.is_file():
            return b"", f"{full} is not a file", "give the path of a PNG or JPEG image"
        size = full.stat().st_size
        if size > MAX_IMAGE_BYTES:
            return b"", f"image {full} is {size} bytes, more than {MAX_IMAGE_BYTES // 2**20} MiB", "use a smaller image"
        with open(full, "rb") as handle:
            return handle.read(), None, None
    except PermissionError:
        return b"", f"image {full} cannot be read (permission denied)", "fix the file's permissions"
    except (OSError, ValueError) as err:
        return b"", f"image {full} cannot be read ({type(err).__name__}: {err})", "check the path"


def _image_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, BMP or baseline/progressive JPEG header, without decoding; None if unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = (int.from_bytes(data[k : k + 4], "little", signed=True) for k in (18, 22))
        return abs(width), abs(height)
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 9 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                return int.from_bytes(data[pos + 7 : pos + 9], "big"), int.from_bytes(data[pos + 5 : pos + 7], "big")
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _decodes(data: bytes) -> bool:
    """Whether OpenCV can decode the image bytes (imported lazily: only storyboards with images pay for it)."""
    import cv2  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return False
    return image is not None and image.size > 0


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

_CONFIG = ConfigDict(extra="forbid", strict=True, frozen=True)


class Transition(BaseModel):
    """How a shot starts: a hard `cut`, or a `blend` of `seconds` from the previous shot's prompt."""

    model_config = _CONFIG

    kind: Literal["cut", "blend"] = "cut"
    seconds: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> Transition:
        if self.kind == "cut" and self.seconds != 0:
            _fail("a cut has no duration", 'write "cut", or "blend 2s" for a soft transition')
        if self.kind == "blend" and not (math.isfinite(self.seconds) and self.seconds > 0):
            _fail("a blend needs a duration above 0", 'e.g. transition = "blend 2s"')
        return self

    def __str__(self) -> str:
        return "cut" if self.kind == "cut" else f"blend {_seconds_text(self.seconds)}"


def _parse_transition(value: Any) -> Any:
    """`"cut"` / `"blend 2s"` → Transition; Transition instances and dicts pass through to pydantic."""
    if isinstance(value, (Transition, dict)):
        return value
    if not isinstance(value, str):
        _fail(f"transition must be text, got {_type_name(value)}", 'use "cut" or "blend 2s"')
    text = value.strip().lower()
    if text == "cut":
        return Transition()
    match = _BLEND_RE.fullmatch(text)
    if match is None:
        close = _suggest(text.split(" ")[0], ["cut", "blend"]) if text else None
        hint = f'did you mean "{close}"? ' if close else ""
        _fail(f"{_show(value)} is not a transition", hint + 'use "cut" or "blend <time>", e.g. "blend 2s"')
    if not match.group(1) or not match.group(1).strip():
        _fail("a blend needs a duration", 'e.g. transition = "blend 2s"')
    try:
        seconds = parse_time(match.group(1))
    except _TimeError as err:
        _fail(f"{_show(value)}: the blend time {err.problem}", 'write e.g. "blend 2s" or "blend 1.5s"')
    if seconds <= 0:
        _fail(f"{_show(value)}: a blend needs a duration above 0", 'e.g. "blend 2s", or use "cut"')
    return Transition(kind="blend", seconds=seconds)


def _check_prompt_refs(prompt: str) -> None:
    """Check the `{identity}` reference syntax of a shot prompt (names are checked by the Storyboard)."""
    open_at = -1
    for i, char in enumerate(prompt):
        if char == "{":
            if open_at >= 0:
                _fail("a '{' inside another '{...}'", "write identity references as {name}, without nesting")
            open_at = i
        elif char == "}":
            if open_at < 0:
                _fail("a '}' without a matching '{'", "write identity references as {name}, or remove the brace")
            name = prompt[open_at + 1 : i]
            if not name.strip():
                _fail("an empty {} reference", "write {name} with the name of an [identities.name] table")
            if not _NAME_RE.fullmatch(name):
                _fail(
                    f"{_show('{' + name + '}')} is not a valid identity reference",
                    "identity names are lowercase letters, digits and _, starting with a letter, e.g. {hero}",
                )
            open_at = -1
    if open_at >= 0:
        _fail("a '{' without a matching '}'", "close it: {name}")


class Shot(BaseModel):
    """One `[[shots]]` entry: from `at` (seconds) until the next shot, generate `prompt`."""

    model_config = _CONFIG

    at: float
    prompt: str
    transition: Transition = Field(default_factory=Transition)
    seed: int | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> float:
        return _time_field(value, "at")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        text = _text_field(
            value, "prompt", limit=MAX_PROMPT_CHARS, multiline=True, example='prompt = "a red ball bouncing"'
        )
        _check_prompt_refs(text)
        return text

    @field_validator("transition", mode="before")
    @classmethod
    def _transition(cls, value: Any) -> Any:
        return _parse_transition(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int | None:
        return None if value is None else _int_field(value, "seed", 0, MAX_SEED, "seed = 7")


class Identity(BaseModel):
    """One `[identities.NAME]` entry: the text `{NAME}` stands for, and an optional reference image."""

    model_config = _CONFIG

    prompt: str
    image: Path | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        text = _text_field(value, "prompt", limit=MAX_PROMPT_CHARS, multiline=True, example='prompt = "a red ball"')
        if "{" in text or "}" in text:
            _fail("an identity prompt cannot contain { or }", "identities cannot reference other identities")
        return text

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else _image_field(value, info, "image")


class Anchor(BaseModel):
    """One `[[anchors]]` entry: at `at`, pin the look to `image` or to the first frame of shot `shot` (1-based)."""

    model_config = _CONFIG

    at: float
    image: Path | None = None
    shot: int | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> float:
        return _time_field(value, "at")

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else _image_field(value, info, "image")

    @field_validator("shot", mode="before")
    @classmethod
    def _shot(cls, value: Any) -> int | None:
        return None if value is None else _int_field(value, "shot", 1, MAX_SHOTS, "shot = 1")

    @model_validator(mode="after")
    def _one_source(self) -> Anchor:
        if self.image is None and self.shot is None:
            _fail(
                "an anchor needs an image or a shot",
                'add image = "anchors/start.png" or shot = 1 (the first frame of shot 1)',
            )
        if self.image is not None and self.shot is not None:
            _fail("an anchor takes either image or shot, not both", "remove one of them", ("shot",))
        return self


def _parse_resolution(value: Any) -> tuple[int, int]:
    """`"512x320"` or `[512, 320]` → (width, height), each a multiple of 8 in [64, 1920]."""
    fix = 'write resolution = "512x320" (width x height) or [512, 320]'
    if isinstance(value, str):
        match = _RESOLUTION_RE.fullmatch(value)
        if match is None:
            _fail(f"{_show(value)} is not a resolution", fix)
        sides = (int(match.group(1)), int(match.group(2)))
    elif isinstance(value, (list, tuple)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            _fail("resolution must be two whole numbers [width, height]", fix)
        sides = (int(value[0]), int(value[1]))
    else:
        _fail(f"resolution must be text or an array, got {_type_name(value)}", fix)
    for name, side in zip(("width", "height"), sides):
        if side < MIN_SIDE or side > MAX_SIDE:
            _fail(f"{name} {side} is out of range",
                  f"use {MIN_SIDE} to {MAX_SIDE} pixels, a multiple of {SIDE_MULTIPLE}")
        if side % SIDE_MULTIPLE:
            low = side - side % SIDE_MULTIPLE
            near = [s for s in (low, low + SIDE_MULTIPLE) if MIN_SIDE <= s <= MAX_SIDE]
            odd = "is odd" if side % 2 else f"is not a multiple of {SIDE_MULTIPLE}"
            _fail(f"{name} {side} {odd}", f"use a multiple of {SIDE_MULTIPLE}, e.g. " + " or ".join(map(str, near)))
    return sides


class Storyboard(BaseModel):
    """A validated storyboard. Times are seconds (float); shot indices in methods are 0-based."""

    model_config = _CONFIG

    title: str
    preset: str = "tiny"
    backend: str | None = None  # a name in lvstudio.backends.registry (checked by _backend)
    fps: int = 16
    resolution: tuple[int, int] | None = None
    duration: float
    seed: int = 0
    identities: dict[str, Identity] = Field(default_factory=dict)
    anchors: list[Anchor] = Field(default_factory=list)
    shots: list[Shot]

    # --- field checks ------------------------------------------------------------------------------------------

    @field_validator("title", mode="before")
    @classmethod
    def _title(cls, value: Any) -> str:
        return _text_field(value, "title", limit=MAX_TITLE_CHARS, multiline=False, example='title = "My video"')

    @field_validator("preset", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> str:
        if not isinstance(value, str):
            _fail(f"preset must be a name in quotes, got {_type_name(value)}", 'e.g. preset = "tiny"')
        if not _PRESET_RE.fullmatch(value):
            _fail(
                f"{_show(value)} is not a preset name",
                'preset names use letters, digits, ".", "_" and "-" (see `lvstudio presets`), e.g. preset = "tiny"',
            )
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> str | None:
        if value is None:
            return None
        choices = ", ".join(f'"{b}"' for b in BACKENDS)
        if not isinstance(value, str):
            _fail(f"backend must be text, got {_type_name(value)}", f"use one of {choices}")
        if value not in BACKENDS:
            close = _suggest(value, BACKENDS)
            hint = f'did you mean "{close}"? ' if close else ""
            _fail(
                f"unknown backend {_show(value)}",
                f"{hint}use one of {choices}, or leave backend out to use the preset's default",
            )
        return value

    @field_validator("fps", mode="before")
    @classmethod
    def _fps(cls, value: Any) -> int:
        return _int_field(value, "fps", MIN_FPS, MAX_FPS, "fps = 16")

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> tuple[int, int] | None:
        return None if value is None else _parse_resolution(value)

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        seconds = _time_field(value, "duration")
        if seconds <= 0:
            _fail("duration must be more than 0", 'e.g. duration = "60s" or "1:00"')
        if seconds > MAX_DURATION_S:
            _fail(f"{_show(value)} is longer than the 24-hour maximum", "split it into several storyboards")
        return seconds

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int:
        return _int_field(value, "seed", 0, MAX_SEED, "seed = 7")

    @field_validator("identities", mode="before")
    @classmethod
    def _identities(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            _fail(
                f"identities must be a table of named identities, got {_type_name(value)}",
                'write one [identities.hero] table per identity, with prompt = "a red ball"',
            )
        if len(value) > MAX_IDENTITIES:
            _fail(f"{len(value)} identities, more than the limit of {MAX_IDENTITIES}", "remove some")
        for name in value:
            if not _NAME_RE.fullmatch(name):
                _fail(
                    f"{_show(name)} is not a valid identity name",
                    "use lowercase letters, digits and _ (up to 32), starting with a letter, e.g. [identities.hero]",
                    (name,),
                )
        return value

    @field_validator("anchors", mode="before")
    @classmethod
    def _anchors(cls, value: Any) -> Any:
        if not isinstance(value, list):
            _fail(f"anchors must be a list of [[anchors]] tables, got {_type_name(value)}", "write [[anchors]]")
        if len(value) > MAX_ANCHORS:
            _fail(f"{len(value)} anchors, more than the limit of {MAX_ANCHORS}", "remove some")
        return value

    @field_validator("shots", mode="before")
    @classmethod
    def _shots(cls, value: Any) -> Any:
        if not isinstance(value, list):
            _fail(
                f"shots must be a list of [[shots]] tables, got {_type_name(value)}",
                "write each shot as a [[shots]] table (double brackets)",
            )
        if not value:
            _fail("there are no shots", 'add a [[shots]] table with at = 0 and prompt = "..."')
        if len(value) > MAX_SHOTS:
            _fail(f"{len(value)} shots, more than the limit of {MAX_SHOTS}", "split the storyboard into several files")
        return value

    # --- cross-field checks ------------------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_story(self) -> Storyboard:
        if self.num_frames() < 1:
            _fail(f"{format_time(self.duration)} is shorter than one frame at {self.fps} fps",
                  "make the video longer", ("duration",))
        self._check_shot_times()
        self._check_references()
        self._check_anchors()
        return self

    def _check_shot_times(self) -> None:
        """Shots start at 0, strictly increase (≥ 1 frame apart), end before `duration`; blends fit their gap."""
        end = format_time(self.duration)
        for i, shot in enumerate(self.shots):
            at = format_time(shot.at)
            if i == 0 and shot.at != 0:
                _fail(f"the first shot starts at {at}, but the video starts at 0:00",
                      "set at = 0 on the first shot", ("shots", 0, "at"))
            if shot.at >= self.duration:
                _fail(f"{at} is at or after the end of the video (duration {end})",
                      "move the shot earlier or raise duration", ("shots", i, "at"))
            if i == 0:
                if shot.transition.kind == "blend":
                    _fail("the first shot cannot blend: there is nothing before it",
                          'use "cut" or remove transition', ("shots", 0, "transition"))
                continue
            prev = self.shots[i - 1].at
            gap = shot.at - prev
            if gap <= 0:
                same = "the same time as" if gap == 0 else "before"
                _fail(f"{at} is {same} the previous shot ({format_time(prev)})",
                      "list shots in time order, each starting later than the one before", ("shots", i, "at"))
            if gap * self.fps < 1 - 1e-9:
                _fail(f"{at} is less than one frame (1/{self.fps} s) after the previous shot ({format_time(prev)})",
                      "space shots at least one frame apart", ("shots", i, "at"))
            if shot.transition.kind == "blend" and shot.transition.seconds >= gap:
                _fail(f"{shot.transition} is not shorter than the gap to the previous shot ({_seconds_text(gap)})",
                      f"use a blend shorter than {_seconds_text(gap)}, or move the shot later",
                      ("shots", i, "transition"))

    def _check_references(self) -> None:
        """Every `{name}` in a shot prompt names a defined identity."""
        known = sorted(self.identities)
        for i, shot in enumerate(self.shots):
            for name in _REF_RE.findall(shot.prompt):
                if name in self.identities:
                    continue
                close = _suggest(name, known)
                listed = ", ".join(f"{{{k}}}" for k in known) if known else "none are defined"
                fix = (f"did you mean {{{close}}}? " if close else "") + f"define it with [identities.{name}]"
                _fail(f"unknown identity {{{name}}} (known identities: {listed})", fix, ("shots", i, "prompt"))

    def _check_anchors(self) -> None:
        """Anchors lie inside the video; `shot = N` names an existing shot that starts no later than the anchor."""
        for j, anchor in enumerate(self.anchors):
            if anchor.at >= self.duration:
                _fail(f"{format_time(anchor.at)} is at or after the end of the video ({format_time(self.duration)})",
                      "move the anchor earlier or raise duration", ("anchors", j, "at"))
            if anchor.shot is None:
                continue
            if anchor.shot > len(self.shots):
                _fail(f"shot {anchor.shot} does not exist (this storyboard has {len(self.shots)} shots, numbered "
                      "from 1)", f"use shot = 1 to {len(self.shots)}", ("anchors", j, "shot"))
            start = self.shots[anchor.shot - 1].at
            if start > anchor.at:
                _fail(f"the anchor at {format_time(anchor.at)} uses the first frame of shot {anchor.shot}, which "
                      f"starts later ({format_time(start)})", "anchor to an earlier shot or move the anchor later",
                      ("anchors", j, "shot"))

    # --- queries -----------------------------------------------------------------------------------------------

    def num_frames(self) -> int:
        """Frames in the whole video: round(duration * fps)."""
        return round(self.duration * self.fps)

    def shot_at(self, seconds: float) -> int:
        """0-based index of the shot active at `seconds` (the last shot for times past the end)."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"shot_at expects a time >= 0, got {seconds!r}")
        starts = [shot.at for shot in self.shots]
        return max(bisect.bisect_right(starts, seconds) - 1, 0)

    def shot_end(self, shot_index: int) -> float:
        """When shot `shot_index` ends: the next shot's start, or `duration` for the last one."""
        index = range(len(self.shots))[shot_index]
        return self.shots[index + 1].at if index + 1 < len(self.shots) else self.duration

    def shot_identities(self, shot_index: int) -> list[str]:
        """Names of the identities a shot's prompt references, in order of first use."""
        names = _REF_RE.findall(self.shots[shot_index].prompt)
        return list(dict.fromkeys(names))

    def resolved_prompt(self, shot_index: int) -> str:
        """The shot's prompt with every `{name}` replaced by that identity's prompt."""
        prompt = self.shots[shot_index].prompt
        return _REF_RE.sub(lambda m: self.identities[m.group(1)].prompt, prompt)


# --------------------------------------------------------------------------------------------------------------
# Locating keys in the TOML text (best effort: normal files, not every TOML construct)
# --------------------------------------------------------------------------------------------------------------

Loc = tuple[str | int, ...]


def _read_key(text: str, pos: int) -> tuple[list[str], int] | None:
    """Parse a (dotted) TOML key at `pos`; return its parts and the position after it."""
    parts: list[str] = []
    while True:
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos >= len(text):
            return None
        char = text[pos]
        if char in "\"'":
            end = text.find(char, pos + 1)
            if end < 0:
                return None
            raw = text[pos + 1 : end]
            parts.append(raw.encode("utf-8", "surrogatepass").decode("unicode_escape", "replace")
                         if char == '"' and "\\" in raw else raw)
            pos = end + 1
        else:
            match = _BARE_KEY_RE.match(text, pos)
            if match is None:
                return None
            parts.append(match.group())
            pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return parts, pos


class _KeyIndex:
    """Maps key paths (`("shots", 2, "at")`) to (line, column) by walking the TOML text line by line."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        self.where: dict[Loc, tuple[int, int]] = {}
        arrays: dict[Loc, int] = {}
        table: Loc = ()
        closing: str | None = None
        for number, line in enumerate(self.lines, start=1):
            # Step 1: skip the inside of multi-line strings.
            if closing is not None:
                if closing in line:
                    closing = None
                continue
            stripped = line.lstrip(" \t")
            indent = len(line) - len(stripped)
            if not stripped or stripped.startswith("#"):
                continue
            # Step 2: table headers `[a.b]` and array-of-table headers `[[a]]`.
            if stripped.startswith("["):
                is_array = stripped.startswith("[[")
                found = _read_key(stripped, 2 if is_array else 1)
                if found is None or not stripped.startswith("]]" if is_array else "]", found[1]):
                    continue  # not a header (e.g. a line inside a multi-line array)
                path: Loc = ()
                for k, part in enumerate(found[0]):
                    path = (*path, part)
                    self.where.setdefault(path, (number, indent + 1))  # `[a.b]` also locates `a`
                    if path in arrays and k < len(found[0]) - 1:
                        path = (*path, arrays[path] - 1)
                if is_array:
                    arrays[path] = arrays.get(path, 0) + 1
                    path = (*path, arrays[path] - 1)
                table = path
                self.where.setdefault(table, (number, indent + 1))
                continue
            # Step 3: `key = value` lines, relative to the current table.
            found = _read_key(stripped, 0)
            if found is None or found[1] >= len(stripped) or stripped[found[1]] != "=":
                continue
            value_pos = found[1] + 1
            while value_pos < len(stripped) and stripped[value_pos] in " \t":
                value_pos += 1
            key_path = (*table, *found[0])
            self.where.setdefault(key_path, (number, indent + value_pos + 1))
            for delim in ('"""', "'''"):
                if stripped.startswith(delim, value_pos) and stripped.count(delim, value_pos) == 1:
                    closing = delim

    def locate(self, loc: Loc) -> tuple[int, int, str] | None:
        """(line, column, source line) of the longest known prefix of `loc`, or None."""
        for end in range(len(loc), 0, -1):
            hit = self.where.get(tuple(loc[:end]))
            if hit is not None:
                return hit[0], hit[1], self.lines[hit[0] - 1]
        return None


def _key_path(loc: Loc) -> str:
    """`("shots", 2, "at")` → `shots[2].at`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE_KEY_RE.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{name}" if out else name
    return out


# --------------------------------------------------------------------------------------------------------------
# Turning parse and validation failures into StoryboardError
# --------------------------------------------------------------------------------------------------------------

_MISSING_EXAMPLES = {
    "title": 'add title = "My video"',
    "duration": 'add duration = "60s" (or "1:00")',
    "shots": 'add at least one [[shots]] table with at = 0 and prompt = "..."',
    "prompt": 'add prompt = "a red ball bouncing over the sea"',
    "at": 'add at = "0s" (seconds from the start, or m:ss)',
}


def _table_model(loc: Loc) -> type[BaseModel] | None:
    """The model that describes the table at `loc`."""
    if not loc:
        return Storyboard
    if len(loc) == 2 and isinstance(loc[1], int):
        return {"shots": Shot, "anchors": Anchor}.get(str(loc[0]))
    if len(loc) == 2 and loc[0] == "identities":
        return Identity
    if len(loc) == 3 and loc[0] == "shots" and loc[2] == "transition":
        return Transition
    return None


def _describe(err: dict[str, Any], loc: Loc) -> tuple[str, str | None, Loc]:
    """(message, fix, loc) for one pydantic error."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    last = loc[-1] if loc else ""
    if kind == "lv":
        return str(ctx.get("message")), ctx.get("fix"), loc
    if kind == "extra_forbidden":
        model = _table_model(loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        close = _suggest(str(last), allowed) if allowed else None
        fix = (f'did you mean "{close}"? ' if close else "") + (
            "allowed keys here: " + ", ".join(allowed) if allowed else "remove it"
        )
        return f'unknown key "{last}"', fix, loc
    if kind == "missing":
        return f'missing required key "{last}"', _MISSING_EXAMPLES.get(str(last), f"add {last} = ..."), loc
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        what = {"shots": "[[shots]]", "anchors": "[[anchors]]", "identities": "[identities.NAME]"}.get(
            str(loc[0]) if loc else "", "a table"
        )
        return f"expected a table, got {_type_name(err.get('input'))}", f"write it as a {what} table", loc
    if kind == "list_type":
        return f"expected an array, got {_type_name(err.get('input'))}", f"write [[{last}]] tables", loc
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg"))), None, loc
    return str(err.get("msg")), None, loc


def _from_validation_error(exc: ValidationError, index: _KeyIndex, source: str) -> StoryboardError:
    """The first problem (in file order) of a pydantic ValidationError, as a located StoryboardError."""
    errors = exc.errors(include_url=False)
    # An unknown key next to a missing one is usually a typo of it: report the unknown key (it says "did you mean").
    unknown_in = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "extra_forbidden"}
    errors = [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"][:-1]) in unknown_in)]
    found: list[tuple[float, int, StoryboardError]] = []
    for order, err in enumerate(errors):
        ctx = err.get("ctx") or {}
        loc = tuple(err["loc"]) + tuple(ctx.get("path") or ())
        message, fix, loc = _describe(err, loc)
        hit = index.locate(loc)
        error = StoryboardError(
            message,
            file=source,
            line=hit[0] if hit else None,
            column=hit[1] if hit else None,
            key_path=_key_path(loc) or None,
            fix=fix,
            source_line=hit[2] if hit else None,
        )
        found.append((hit[0] if hit else math.inf, order, error))
    found.sort(key=lambda item: (item[0], item[1]))
    return found[0][2]


_SYNTAX_FIXES = (
    ("Cannot overwrite a value", "this key is already set above; each key may appear only once per table"),
    ("[shots] is declared twice", "[shots] is already declared above; for several shots write [[shots]]"),
    ("[anchors] is declared twice", "[anchors] is already declared above; for several anchors write [[anchors]]"),
    ("twice", "this table is already declared above; merge the two"),
    ("nterminated string", 'close the quotes on the same line (use """ for text over several lines)'),
    ("Unclosed array", "close the array with ]"),
    ("Unclosed inline table", "close the inline table with } on the same line"),
    ("Illegal character", "remove the control character (only tabs and newlines are allowed)"),
    ("Expected '=' after a key", "write key = value"),
    ("Expected ']]'", "close the header: [[shots]]"),
    ("Expected ']'", "close the header: [identities.hero]"),
    ("Unescaped '\\'", "write \\\\ for a backslash, or use single quotes for paths: 'C:\\images\\a.png'"),
    ("Invalid statement", "each line is a comment (#), a [table] header or key = value with an ASCII key"),
)


def _syntax_fix(message: str, line_text: str, column: int) -> str:
    """A fix for a tomli syntax error, guessed from its message and the text around it."""
    rest = line_text[column - 1 :] if column >= 1 else ""
    before = line_text[: column - 1]
    if message.startswith("Invalid value"):
        if not rest.strip() or rest.lstrip().startswith("#"):
            return "give a value after the ="
        if rest[:1].isalpha():
            return 'put text in double quotes, e.g. prompt = "a red ball"; booleans are true/false'
        return 'check the value: text goes in double quotes, numbers are plain digits (16, 1.5)'
    if message.startswith("Expected newline or end of document"):
        if rest.startswith(":") and before.rstrip()[-1:].isdigit():
            return 'put times in quotes: at = "1:30"'
        if before.rstrip()[-1:].isdigit() and rest[:1].isalpha():
            return 'put times in quotes: at = "12s"'
        return "put each key = value on its own line; quote text and times"
    for needle, fix in _SYNTAX_FIXES:
        if needle in message:
            return fix
    return "check the TOML syntax at this point"


def _syntax_error(err: tomli.TOMLDecodeError, text: str, source: str) -> StoryboardError:
    """A located StoryboardError for a tomli syntax error."""
    lines = text.split("\n")
    line, column = getattr(err, "lineno", None), getattr(err, "colno", None)
    message = getattr(err, "msg", None) or str(err)
    line_text = lines[line - 1] if line is not None and 1 <= line <= len(lines) else ""
    if message == "Illegal character '\\n'":  # tomli's wording for a string left open at the end of a line
        message = "unterminated string (the line ends before the closing quote)"
    twice = re.fullmatch(r"Cannot declare \((.*)\) twice", message)
    if twice:  # tomli shows a Python tuple: ('identities', 'hero')
        name = ".".join(re.findall(r"'([^']*)'", twice.group(1)))
        message = f"table [{name}] is declared twice"
    return StoryboardError(
        f"TOML syntax error: {message}",
        file=source,
        line=line,
        column=column,
        fix=_syntax_fix(message, line_text, column or 0),
        source_line=line_text or None,
    )


def _size_error(size: int, source: str) -> StoryboardError:
    return StoryboardError(
        f"the file is {size} bytes, more than the {MAX_FILE_BYTES // 1024} KiB limit",
        file=source,
        fix="split it into several storyboards",
    )


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def parse_storyboard(text: str, source: str = "<storyboard>", base_dir: Path | None = None) -> Storyboard:
    """Parse and validate storyboard TOML text; image paths are relative to `base_dir` (default: the cwd).

    Raises StoryboardError, and nothing else, for any input.
    """
    try:
        return _parse(text, source, base_dir)
    except StoryboardError:
        raise
    except Exception as err:  # last resort: the contract is "only StoryboardError escapes"
        raise StoryboardError(
            f"{_INTERNAL_BUG} ({type(err).__name__}: {str(err)[:200]})",
            file=source,
            fix="please report this as a bug and attach the storyboard",
        ) from err


def _parse(text: str, source: str, base_dir: Path | None) -> Storyboard:
    """parse_storyboard without the last-resort guard."""
    if not isinstance(text, str):
        raise StoryboardError(f"expected text, got {type(text).__name__}", file=source, fix="pass a str")
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _size_error(len(text.encode("utf-8", "surrogatepass")), source)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as err:
        raise _syntax_error(err, text, source) from None
    except RecursionError:
        raise StoryboardError("TOML syntax error: values are nested too deeply", file=source,
                              fix="storyboards need no nested arrays or tables beyond [[shots]]") from None
    except ValueError as err:  # e.g. an integer with thousands of digits (Python's int parsing limit)
        raise StoryboardError(f"a value could not be read ({str(err)[:60]}...)", file=source,
                              fix="look for a number with thousands of digits") from None
    context = {"base_dir": Path(base_dir) if base_dir is not None else None}
    try:
        return Storyboard.model_validate(data, context=context)
    except ValidationError as err:
        raise _from_validation_error(err, _KeyIndex(text), source) from None


def load_storyboard(path: str | Path) -> Storyboard:
    """Read, parse and validate a storyboard file. Raises StoryboardError, and nothing else, for any input."""
    source = str(path)
    try:
        file = Path(path)
        if not file.exists():
            raise StoryboardError("file not found", file=source, fix="check the path")
        if file.is_dir():
            raise StoryboardError("is a folder, not a storyboard file", file=source,
                                  fix="give the path of a .toml file")
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _size_error(size, source)
        with open(file, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise _size_error(len(data), source)
        text = _decode(data, source)
        base_dir = Path(os.path.abspath(file.parent))
    except StoryboardError:
        raise
    except PermissionError:
        raise StoryboardError("cannot be read (permission denied)", file=source,
                              fix="fix the file's permissions") from None
    except (OSError, ValueError) as err:
        raise StoryboardError(f"cannot be read ({type(err).__name__}: {str(err)[:120]})", file=source,
                              fix="check the path") from None
    return parse_storyboard(text, source, base_dir)


def _decode(data: bytes, source: str) -> str:
    """UTF-8 text of the file (a BOM is allowed); invalid bytes become a located StoryboardError."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        column = len(data[line_start : err.start].decode("utf-8", "replace")) + 1
        raise StoryboardError(
            f"invalid UTF-8 byte 0x{data[err.start]:02x}",
            file=source,
            line=line,
            column=column,
            fix="save the file as UTF-8 text",
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _toml_str(text: str) -> str:
    """A TOML basic string literal for `text`."""
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def dump_storyboard(sb: Storyboard) -> str:
    """TOML text that parses back to a Storyboard equal to `sb` (image paths are written absolute)."""
    lines = [f"title = {_toml_str(sb.title)}", f"preset = {_toml_str(sb.preset)}"]
    if sb.backend is not None:
        lines.append(f"backend = {_toml_str(sb.backend)}")
    lines.append(f"fps = {sb.fps}")
    if sb.resolution is not None:
        lines.append(f'resolution = "{sb.resolution[0]}x{sb.resolution[1]}"')
    lines += [f'duration = "{format_time(sb.duration)}"', f"seed = {sb.seed}"]
    for name, identity in sb.identities.items():
        lines += ["", f"[identities.{name}]", f"prompt = {_toml_str(identity.prompt)}"]
        if identity.image is not None:
            lines.append(f"image = {_toml_str(str(identity.image))}")
    for anchor in sb.anchors:
        lines += ["", "[[anchors]]", f'at = "{format_time(anchor.at)}"']
        if anchor.image is not None:
            lines.append(f"image = {_toml_str(str(anchor.image))}")
        if anchor.shot is not None:
            lines.append(f"shot = {anchor.shot}")
    for shot in sb.shots:
        lines += ["", "[[shots]]", f'at = "{format_time(shot.at)}"', f"prompt = {_toml_str(shot.prompt)}"]
        if shot.transition.kind != "cut":
            lines.append(f'transition = "{shot.transition}"')
        if shot.seed is not None:
            lines.append(f"seed = {shot.seed}")
    return "\n".join(lines) + "\n"
