"""User-facing errors: each one says what went wrong, where, and what to do about it.

The CLI catches `LvError` at the top level, prints `str(error)` to stderr (no traceback) and exits with
`error.exit_code`: 2 for a problem with the user's input or files, 74 for a disk that refused a read or a write
(`IOFailure`), 128 + the signal number for a command stopped by a signal (`Interrupted`).
"""

from __future__ import annotations

from pathlib import Path


class LvError(Exception):
    """Base class for errors the user can fix; `hint` says how."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message


class StoryboardError(LvError):
    """A storyboard that cannot be read or is invalid.

    `str()` gives one line `file:line:col: key.path: message — fix`, followed, when the offending source line is
    known, by that line and a caret under the column (three lines at most).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        key_path: str | None = None,
        fix: str | None = None,
        source_line: str | None = None,
    ) -> None:
        super().__init__(message, hint=fix)
        self.file = file
        self.line = line
        self.column = column
        self.key_path = key_path
        self.fix = fix
        self.source_line = source_line

    @property
    def location(self) -> str:
        """`file:line:col`, `file:line`, `file` or "" (whatever is known)."""
        parts = [self.file or "<storyboard>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    @property
    def headline(self) -> str:
        """The first (and main) line of the message."""
        head = f"{self.location}: "
        if self.key_path:
            head += f"{self.key_path}: "
        head += self.message
        if self.fix:
            head += f" — {self.fix}"
        return head.replace("\r", "\\r").replace("\n", "\\n")

    def __str__(self) -> str:
        lines = [self.headline]
        if self.source_line is not None and self.line is not None and self.source_line.strip():
            text = self.source_line.rstrip("\r\n").replace("\t", " ")
            if len(text) > 120:
                text = text[:117] + "..."
            gutter = f"{self.line:>5} | "
            lines.append(gutter + text)
            if self.column is not None and 1 <= self.column <= len(text) + 1:
                lines.append(" " * (len(gutter) - 2) + "| " + " " * (self.column - 1) + "^")
        return "\n".join(lines)


class PresetError(LvError):
    """A preset that is unknown, malformed, or whose files are missing or fail verification."""


class OutputExistsError(LvError):
    """The output path already exists and `--force` was not given."""

    def __init__(self, path: str | Path, message: str | None = None, *, hint: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(
            message or f"{path} already exists",
            hint=hint or "pass --force to overwrite it, or choose another output path",
        )


class IOFailure(LvError):
    """The machine refused a read or a write: a full disk, a permission, a read-only or missing folder, a file that
    vanished. `lvstudio.io_errors` builds these from OSErrors (what failed, which path, what to do); exit code 74
    (EX_IOERR in sysexits.h)."""

    exit_code = 74

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = None if path is None else Path(path)
        self.errno = errno


class DamagedFileError(LvError):
    """A file lvstudio wrote earlier cannot be read back as written (truncated, flipped bytes, not ours)."""

    def __init__(self, path: str | Path, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path} is damaged: {reason}", hint=hint)
        self.path = Path(path)
        self.reason = reason


class Interrupted(LvError):
    """A command stopped by a signal (SIGINT, SIGTERM, SIGHUP): what was kept and how to continue; exit code 128 +
    the signal number, as shells report it."""

    def __init__(self, message: str, *, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code
