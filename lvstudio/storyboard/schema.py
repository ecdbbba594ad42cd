"""The storyboard schema: pydantic models (`Storyboard`, `Shot`, `Identity`, `Anchor`, `Transition`) with strict
types, field checks that give our own messages and fixes, and the cross-field checks of a whole storyboard."""

from __future__ import annotations

import bisect
import datetime as _dt
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from lvstudio.backends.registry import BACKENDS
from lvstudio.storyboard.messages import CONTROL_RE, LINE_CONTROL_RE, fail, show, suggest, type_name
from lvstudio.storyboard.times import MAX_DURATION_S, TIME_FIX, TimeParseError, format_time, parse_time, seconds_text
from lvstudio.transitions import TRANSITIONS

MAX_FILE_BYTES = 256 * 1024
MAX_SHOTS = 1000
MAX_PROMPT_CHARS = 1000
MAX_IDENTITIES = 64
MAX_ANCHORS = 64
MAX_TITLE_CHARS = 200
MAX_SEED = 2**63 - 1
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 1920, 8
MIN_FPS, MAX_FPS = 1, 60

_BLEND_RE = re.compile(r"blend(?:\s+(.*))?", re.ASCII | re.DOTALL)
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
_PRESET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_RESOLUTION_RE = re.compile(r"\s*([0-9]{1,6})\s*[xX×]\s*([0-9]{1,6})\s*")
_REF_RE = re.compile(r"\{([^{}]*)\}")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")  # PNG, JPEG, BMP (WebP: RIFF....WEBP)


# --------------------------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------------------------


def time_field(value: Any, what: str) -> float:
    """Validate a time field; TOML local times (`at = 00:01:30`) are accepted as well."""
    if isinstance(value, _dt.time) and not isinstance(value, _dt.datetime) and value.tzinfo is None:
        return value.hour * 3600 + value.minute * 60 + value.second + value.microsecond / 1e6
    if isinstance(value, (_dt.date, _dt.datetime)):
        fail(f"{what} is {type_name(value)}, not a time", TIME_FIX)
    try:
        return parse_time(value)
    except TimeParseError as err:
        fail(err.problem, err.fix)


def text_field(value: Any, what: str, *, limit: int, multiline: bool, example: str) -> str:
    """Validate a non-empty, bounded text field without control characters; returns it stripped."""
    if not isinstance(value, str):
        fail(f"{what} must be text, got {type_name(value)}", f"put it in double quotes: {example}")
    text = value.strip()
    if not text:
        fail(f"{what} is empty", f"write something, e.g. {example}")
    if len(text) > limit:
        fail(f"{what} is {len(text)} characters long, more than the limit of {limit}", "shorten it")
    bad = (CONTROL_RE if multiline else LINE_CONTROL_RE).search(text)
    if bad:
        fail(
            f"{what} contains the control character {ord(bad.group()):#04x}",
            "remove it" + ("" if multiline else "; keep it on one line"),
        )
    return text


def negative_field(value: Any) -> str:
    """A negative prompt: like a prompt, but it may be empty ("" = the unconditional row is the empty prompt)."""
    example = 'negative_prompt = "blurry, static, low quality"'
    if not isinstance(value, str):
        fail(f"negative_prompt must be text, got {type_name(value)}", f"put it in double quotes: {example}")
    text = value.strip()
    if not text:
        return ""
    text = text_field(text, "negative_prompt", limit=MAX_PROMPT_CHARS, multiline=True, example=example)
    _check_prompt_refs(text)
    return text


def int_field(value: Any, what: str, low: int, high: int, example: str) -> int:
    """Validate a whole number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float):
            if math.isfinite(value) and value.is_integer():
                fail(f"expected a whole number, got {show(value)}", f"write {int(value)} without the decimal point")
            fail(f"expected a whole number, got {show(value)}", f"e.g. {example}")
        if isinstance(value, str):
            fail(f"expected a number, got text {show(value)}", f"remove the quotes, e.g. {example}")
        fail(f"expected a whole number, got {type_name(value)}", f"e.g. {example}")
    if value < low or value > high:
        fail(f"{show(value)} is out of range", f"use a whole number from {low} to {high} for {what}")
    return value


def image_field(value: Any, info: ValidationInfo, what: str) -> Path:
    """Resolve an image path against the storyboard's folder and check that it is a readable image."""
    if isinstance(value, Path):
        raw = value
    elif isinstance(value, str):
        if not value.strip():
            fail(f"{what} is empty", 'give a path to a PNG or JPEG file, e.g. image = "anchors/start.png"')
        if "\x00" in value:
            fail(f"{what} contains a NUL character", "fix the path")
        raw = Path(value)
    else:
        fail(f"{what} must be a path in quotes, got {type_name(value)}", 'e.g. image = "anchors/start.png"')
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    full = Path(os.path.abspath(raw if raw.is_absolute() else base / raw))
    if (info.context or {}).get("confine_images") and not Path(os.path.realpath(full)).is_relative_to(
            os.path.realpath(base)):  # the web studio: never open (or say anything of) a file outside the folder
        fail(f"image {raw} is outside the storyboard folder {base}", "copy it into that folder and use a relative path")
    data, problem, fix = _read_image_file(full, base)
    if problem is not None:
        fail(problem, fix)
    if not (any(data.startswith(magic) for magic in _IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        fail(f"{full} is not a PNG, JPEG, WebP or BMP image", "convert it to PNG")
    dims = _image_dims(data)
    if dims is not None and max(dims) > MAX_IMAGE_SIDE:
        fail(f"image {full} is {dims[0]}x{dims[1]} pixels, larger than {MAX_IMAGE_SIDE} on a side",
              "use a smaller image (anchors are resized to the video size anyway)")
    if not _decodes(data):
        fail(f"image {full} could not be decoded (corrupt or truncated?)", "re-export it as PNG")
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
    """How a shot starts (`lvstudio.transitions`): a `cut` to a new shot (the default), a `switch` that continues the
    previous shot under this prompt, or a `blend` of `seconds` from the previous shot's prompt."""

    model_config = _CONFIG

    kind: Literal["cut", "switch", "blend"] = "cut"
    seconds: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> Transition:
        if self.kind != "blend" and self.seconds != 0:
            fail(f"a {self.kind} has no duration", f'write "{self.kind}", or "blend 2s" for a soft transition')
        if self.kind == "blend" and not (math.isfinite(self.seconds) and self.seconds > 0):
            fail("a blend needs a duration above 0", 'e.g. transition = "blend 2s"')
        return self

    def __str__(self) -> str:
        return self.kind if self.kind != "blend" else f"blend {seconds_text(self.seconds)}"


_TRANSITION_FIX = 'use "cut" (a new shot), "switch" (the shot continues) or "blend <time>", e.g. "blend 2s"'


def _parse_transition(value: Any) -> Any:
    """`"cut"` / `"switch"` / `"blend 2s"` → Transition; Transition instances and dicts pass through to pydantic."""
    if isinstance(value, (Transition, dict)):
        return value
    if not isinstance(value, str):
        fail(f"transition must be text, got {type_name(value)}", _TRANSITION_FIX)
    text = value.strip().lower()
    if text in ("cut", "switch"):
        return Transition(kind=text)
    match = _BLEND_RE.fullmatch(text)
    if match is None:
        close = suggest(text.split(" ")[0], list(TRANSITIONS)) if text else None
        hint = f'did you mean "{close}"? ' if close else ""
        fail(f"{show(value)} is not a transition", hint + _TRANSITION_FIX)
    if not match.group(1) or not match.group(1).strip():
        fail("a blend needs a duration", 'e.g. transition = "blend 2s"')
    try:
        seconds = parse_time(match.group(1))
    except TimeParseError as err:
        fail(f"{show(value)}: the blend time {err.problem}", 'write e.g. "blend 2s" or "blend 1.5s"')
    if seconds <= 0:
        fail(f"{show(value)}: a blend needs a duration above 0", 'e.g. "blend 2s", or use "cut"')
    return Transition(kind="blend", seconds=seconds)


def _check_prompt_refs(prompt: str) -> None:
    """Check the `{identity}` reference syntax of a shot prompt (names are checked by the Storyboard)."""
    open_at = -1
    for i, char in enumerate(prompt):
        if char == "{":
            if open_at >= 0:
                fail("a '{' inside another '{...}'", "write identity references as {name}, without nesting")
            open_at = i
        elif char == "}":
            if open_at < 0:
                fail("a '}' without a matching '{'", "write identity references as {name}, or remove the brace")
            name = prompt[open_at + 1 : i]
            if not name.strip():
                fail("an empty {} reference", "write {name} with the name of an [identities.name] table")
            if not _NAME_RE.fullmatch(name):
                fail(
                    f"{show('{' + name + '}')} is not a valid identity reference",
                    "identity names are lowercase letters, digits and _, starting with a letter, e.g. {hero}",
                )
            open_at = -1
    if open_at >= 0:
        fail("a '{' without a matching '}'", "close it: {name}")


class Shot(BaseModel):
    """One `[[shots]]` entry: from `at` (seconds) until the next shot, generate `prompt`."""

    model_config = _CONFIG

    at: float
    prompt: str
    transition: Transition = Field(default_factory=Transition)
    seed: int | None = None
    negative_prompt: str | None = None  # None = the storyboard's (CFG's unconditional row)

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> float:
        return time_field(value, "at")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        text = text_field(
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
        return None if value is None else int_field(value, "seed", 0, MAX_SEED, "seed = 7")

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _negative(cls, value: Any) -> str | None:
        return None if value is None else negative_field(value)


class Identity(BaseModel):
    """One `[identities.NAME]` entry: the text `{NAME}` stands for, and an optional reference image."""

    model_config = _CONFIG

    prompt: str
    image: Path | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        text = text_field(value, "prompt", limit=MAX_PROMPT_CHARS, multiline=True, example='prompt = "a red ball"')
        if "{" in text or "}" in text:
            fail("an identity prompt cannot contain { or }", "identities cannot reference other identities")
        return text

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else image_field(value, info, "image")


class Anchor(BaseModel):
    """One `[[anchors]]` entry: at `at`, pin the look to `image` or to the first frame of shot `shot` (1-based)."""

    model_config = _CONFIG

    at: float
    image: Path | None = None
    shot: int | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> float:
        return time_field(value, "at")

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else image_field(value, info, "image")

    @field_validator("shot", mode="before")
    @classmethod
    def _shot(cls, value: Any) -> int | None:
        return None if value is None else int_field(value, "shot", 1, MAX_SHOTS, "shot = 1")

    @model_validator(mode="after")
    def _one_source(self) -> Anchor:
        if self.image is None and self.shot is None:
            fail(
                "an anchor needs an image or a shot",
                'add image = "anchors/start.png" or shot = 1 (the first frame of shot 1)',
            )
        if self.image is not None and self.shot is not None:
            fail("an anchor takes either image or shot, not both", "remove one of them", ("shot",))
        return self


def _parse_resolution(value: Any) -> tuple[int, int]:
    """`"512x320"` or `[512, 320]` → (width, height), each a multiple of 8 in [64, 1920]."""
    fix = 'write resolution = "512x320" (width x height) or [512, 320]'
    if isinstance(value, str):
        match = _RESOLUTION_RE.fullmatch(value)
        if match is None:
            fail(f"{show(value)} is not a resolution", fix)
        sides = (int(match.group(1)), int(match.group(2)))
    elif isinstance(value, (list, tuple)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            fail("resolution must be two whole numbers [width, height]", fix)
        sides = (int(value[0]), int(value[1]))
    else:
        fail(f"resolution must be text or an array, got {type_name(value)}", fix)
    for name, side in zip(("width", "height"), sides, strict=True):
        if side < MIN_SIDE or side > MAX_SIDE:
            fail(f"{name} {side} is out of range",
                  f"use {MIN_SIDE} to {MAX_SIDE} pixels, a multiple of {SIDE_MULTIPLE}")
        if side % SIDE_MULTIPLE:
            low = side - side % SIDE_MULTIPLE
            near = [s for s in (low, low + SIDE_MULTIPLE) if MIN_SIDE <= s <= MAX_SIDE]
            odd = "is odd" if side % 2 else f"is not a multiple of {SIDE_MULTIPLE}"
            fail(f"{name} {side} {odd}", f"use a multiple of {SIDE_MULTIPLE}, e.g. " + " or ".join(map(str, near)))
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
    negative_prompt: str | None = None  # CFG's unconditional row for shots without their own; None = the preset's
    identities: dict[str, Identity] = Field(default_factory=dict)
    anchors: list[Anchor] = Field(default_factory=list)
    shots: list[Shot]

    # --- field checks ------------------------------------------------------------------------------------------

    @field_validator("title", mode="before")
    @classmethod
    def _title(cls, value: Any) -> str:
        return text_field(value, "title", limit=MAX_TITLE_CHARS, multiline=False, example='title = "My video"')

    @field_validator("preset", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> str:
        if not isinstance(value, str):
            fail(f"preset must be a name in quotes, got {type_name(value)}", 'e.g. preset = "tiny"')
        if not _PRESET_RE.fullmatch(value):
            fail(
                f"{show(value)} is not a preset name",
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
            fail(f"backend must be text, got {type_name(value)}", f"use one of {choices}")
        if value not in BACKENDS:
            close = suggest(value, BACKENDS)
            hint = f'did you mean "{close}"? ' if close else ""
            fail(
                f"unknown backend {show(value)}",
                f"{hint}use one of {choices}, or leave backend out to use the preset's default",
            )
        return value

    @field_validator("fps", mode="before")
    @classmethod
    def _fps(cls, value: Any) -> int:
        return int_field(value, "fps", MIN_FPS, MAX_FPS, "fps = 16")

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> tuple[int, int] | None:
        return None if value is None else _parse_resolution(value)

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        seconds = time_field(value, "duration")
        if seconds <= 0:
            fail("duration must be more than 0", 'e.g. duration = "60s" or "1:00"')
        if seconds > MAX_DURATION_S:
            fail(f"{show(value)} is longer than the 24-hour maximum", "split it into several storyboards")
        return seconds

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int:
        return int_field(value, "seed", 0, MAX_SEED, "seed = 7")

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _negative(cls, value: Any) -> str | None:
        return None if value is None else negative_field(value)

    @field_validator("identities", mode="before")
    @classmethod
    def _identities(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            fail(
                f"identities must be a table of named identities, got {type_name(value)}",
                'write one [identities.hero] table per identity, with prompt = "a red ball"',
            )
        if len(value) > MAX_IDENTITIES:
            fail(f"{len(value)} identities, more than the limit of {MAX_IDENTITIES}", "remove some")
        for name in value:
            if not _NAME_RE.fullmatch(name):
                fail(
                    f"{show(name)} is not a valid identity name",
                    "use lowercase letters, digits and _ (up to 32), starting with a letter, e.g. [identities.hero]",
                    (name,),
                )
        return value

    @field_validator("anchors", mode="before")
    @classmethod
    def _anchors(cls, value: Any) -> Any:
        if not isinstance(value, list):
            fail(f"anchors must be a list of [[anchors]] tables, got {type_name(value)}", "write [[anchors]]")
        if len(value) > MAX_ANCHORS:
            fail(f"{len(value)} anchors, more than the limit of {MAX_ANCHORS}", "remove some")
        return value

    @field_validator("shots", mode="before")
    @classmethod
    def _shots(cls, value: Any) -> Any:
        if not isinstance(value, list):
            fail(
                f"shots must be a list of [[shots]] tables, got {type_name(value)}",
                "write each shot as a [[shots]] table (double brackets)",
            )
        if not value:
            fail("there are no shots", 'add a [[shots]] table with at = 0 and prompt = "..."')
        if len(value) > MAX_SHOTS:
            fail(f"{len(value)} shots, more than the limit of {MAX_SHOTS}", "split the storyboard into several files")
        return value

    # --- cross-field checks ------------------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_story(self) -> Storyboard:
        if self.num_frames() < 1:
            fail(f"{format_time(self.duration)} is shorter than one frame at {self.fps} fps",
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
                fail(f"the first shot starts at {at}, but the video starts at 0:00",
                      "set at = 0 on the first shot", ("shots", 0, "at"))
            if shot.at >= self.duration:
                fail(f"{at} is at or after the end of the video (duration {end})",
                      "move the shot earlier or raise duration", ("shots", i, "at"))
            if i == 0:
                if shot.transition.kind != "cut":
                    fail(f"the first shot cannot {shot.transition.kind}: there is nothing before it",
                          'use "cut" or remove transition', ("shots", 0, "transition"))
                continue
            prev = self.shots[i - 1].at
            gap = shot.at - prev
            if gap <= 0:
                same = "the same time as" if gap == 0 else "before"
                fail(f"{at} is {same} the previous shot ({format_time(prev)})",
                      "list shots in time order, each starting later than the one before", ("shots", i, "at"))
            if gap * self.fps < 1 - 1e-9:
                fail(f"{at} is less than one frame (1/{self.fps} s) after the previous shot ({format_time(prev)})",
                      "space shots at least one frame apart", ("shots", i, "at"))
            if shot.transition.kind == "blend" and shot.transition.seconds >= gap:
                fail(f"{shot.transition} is not shorter than the gap to the previous shot ({seconds_text(gap)})",
                      f"use a blend shorter than {seconds_text(gap)}, or move the shot later",
                      ("shots", i, "transition"))

    def _check_references(self) -> None:
        """Every `{name}` in a prompt or a negative prompt names a defined identity."""
        texts: list[tuple[str, tuple[str | int, ...]]] = [(self.negative_prompt or "", ("negative_prompt",))]
        for i, shot in enumerate(self.shots):
            texts.append((shot.prompt, ("shots", i, "prompt")))
            if shot.negative_prompt:
                texts.append((shot.negative_prompt, ("shots", i, "negative_prompt")))
        known = sorted(self.identities)
        for text, path in texts:
            for name in _REF_RE.findall(text):
                if name in self.identities:
                    continue
                close = suggest(name, known)
                listed = ", ".join(f"{{{k}}}" for k in known) if known else "none are defined"
                fix = (f"did you mean {{{close}}}? " if close else "") + f"define it with [identities.{name}]"
                fail(f"unknown identity {{{name}}} (known identities: {listed})", fix, path)

    def _check_anchors(self) -> None:
        """Anchors lie inside the video; `shot = N` names an existing shot that starts no later than the anchor."""
        for j, anchor in enumerate(self.anchors):
            if anchor.at >= self.duration:
                fail(f"{format_time(anchor.at)} is at or after the end of the video ({format_time(self.duration)})",
                      "move the anchor earlier or raise duration", ("anchors", j, "at"))
            if anchor.shot is None:
                continue
            if anchor.shot > len(self.shots):
                fail(f"shot {anchor.shot} does not exist (this storyboard has {len(self.shots)} shots, numbered "
                      "from 1)", f"use shot = 1 to {len(self.shots)}", ("anchors", j, "shot"))
            start = self.shots[anchor.shot - 1].at
            if start > anchor.at:
                fail(f"the anchor at {format_time(anchor.at)} uses the first frame of shot {anchor.shot}, which "
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

    def negative_for(self, shot_index: int, default: str = "") -> str:
        """The negative prompt (as written) of a shot: its own, else the storyboard's, else `default` (the preset's;
        "" = the empty prompt)."""
        own = self.shots[shot_index].negative_prompt
        for text in (own, self.negative_prompt):
            if text is not None:
                return text
        return default
