"""Where in the TOML text a problem is, and what to say about it: a best-effort key locator (normal files, not every
TOML construct) and the conversion of tomli syntax errors and pydantic validation errors into one located
`StoryboardError` each (`file:line:col: key.path: message — fix`)."""

from __future__ import annotations

import math
import re
from typing import Any

import tomli
from pydantic import BaseModel, ValidationError

from lvstudio.errors import StoryboardError
from lvstudio.storyboard.messages import suggest, type_name
from lvstudio.storyboard.schema import MAX_FILE_BYTES, Anchor, Identity, Shot, Storyboard, Transition

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)



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


class KeyIndex:
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
        close = suggest(str(last), allowed) if allowed else None
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
        return f"expected a table, got {type_name(err.get('input'))}", f"write it as a {what} table", loc
    if kind == "list_type":
        return f"expected an array, got {type_name(err.get('input'))}", f"write [[{last}]] tables", loc
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg"))), None, loc
    return str(err.get("msg")), None, loc


def from_validation_error(exc: ValidationError, index: KeyIndex, source: str) -> StoryboardError:
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


def syntax_error(err: tomli.TOMLDecodeError, text: str, source: str) -> StoryboardError:
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


def size_error(size: int, source: str) -> StoryboardError:
    return StoryboardError(
        f"the file is {size} bytes, more than the {MAX_FILE_BYTES // 1024} KiB limit",
        file=source,
        fix="split it into several storyboards",
    )
