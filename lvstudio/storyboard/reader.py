"""Reading storyboards: `parse_storyboard` (text) and `load_storyboard` (a file).

Reading goes text → `tomli` (syntax errors carry line/column) → pydantic models (`extra="forbid"`, strict types,
field checks) → cross-field checks → `Storyboard`. Every failure becomes one `StoryboardError` with the file,
line/column when we can find it, the key path (`shots[2].at`, 0-based indices) and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomli
from pydantic import ValidationError

from lvstudio.errors import StoryboardError
from lvstudio.storyboard.locator import KeyIndex, from_validation_error, size_error, syntax_error
from lvstudio.storyboard.schema import MAX_FILE_BYTES, Storyboard

_INTERNAL_BUG = "unexpected internal error while reading the storyboard"




def parse_storyboard(text: str, source: str = "<storyboard>", base_dir: Path | None = None, *,
                     confine_images: bool = False) -> Storyboard:
    """Parse and validate storyboard TOML text; image paths are relative to `base_dir` (default: the cwd), and with
    `confine_images` must lie inside it (refused before the file is opened: a web page may not probe the machine).

    Raises StoryboardError, and nothing else, for any input.
    """
    try:
        return _parse(text, source, base_dir, confine_images)
    except StoryboardError:
        raise
    except Exception as err:  # last resort: the contract is "only StoryboardError escapes"
        raise StoryboardError(
            f"{_INTERNAL_BUG} ({type(err).__name__}: {str(err)[:200]})",
            file=source,
            fix="please report this as a bug and attach the storyboard",
        ) from err


def _parse(text: str, source: str, base_dir: Path | None, confine_images: bool = False) -> Storyboard:
    """parse_storyboard without the last-resort guard."""
    if not isinstance(text, str):
        raise StoryboardError(f"expected text, got {type(text).__name__}", file=source, fix="pass a str")
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise size_error(len(text.encode("utf-8", "surrogatepass")), source)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as err:
        raise syntax_error(err, text, source) from None
    except RecursionError:
        raise StoryboardError("TOML syntax error: values are nested too deeply", file=source,
                              fix="storyboards need no nested arrays or tables beyond [[shots]]") from None
    except ValueError as err:  # e.g. an integer with thousands of digits (Python's int parsing limit)
        raise StoryboardError(f"a value could not be read ({str(err)[:60]}...)", file=source,
                              fix="look for a number with thousands of digits") from None
    context = {"base_dir": Path(base_dir) if base_dir is not None else None, "confine_images": confine_images}
    try:
        return Storyboard.model_validate(data, context=context)
    except ValidationError as err:
        raise from_validation_error(err, KeyIndex(text), source) from None


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
            raise size_error(size, source)
        with open(file, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise size_error(len(data), source)
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
