"""Checks shared by options of several commands: `--threads`, `--seed` and the name options (`--preset`,
`--backend`) as typer callbacks, and output paths (an eval's report, a render's or a batch's folder).

Each raises `LvError` (one line, exit 2) naming the option, the value and what it takes, before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lvstudio.errors import LvError


def check_threads(value: int | None) -> int | None:
    """--threads: 0 (torch's default) up to this machine's CPU count; more threads than CPUs only slow torch down
    (and tens of thousands crash OpenMP)."""
    cpus = os.cpu_count() or 1
    if value is not None and not 0 <= value <= cpus:
        raise LvError(f"--threads {value} is out of range",
                      hint=f"use 1 to {cpus}, this machine's CPU count (0 = torch's default where the option takes it)")
    return value


def check_seed(value: int | None) -> int | None:
    """--seed: a whole number from 0 to 2**63 - 1, as a storyboard's `seed`."""
    if value is None:
        return value
    from lvstudio.storyboard.schema import MAX_SEED

    if not 0 <= value <= MAX_SEED:
        raise LvError(f"--seed {value} is out of range", hint=f"use a whole number from 0 to {MAX_SEED}")
    return value


def check_new_file(path: Path | None, option: str, suffix: str, *, force: bool) -> Path | None:
    """An output file an eval writes at its end, checked at its start (so a long run never ends in a refusal): it
    must end in `suffix`, must not be a folder or under a file, and is not overwritten without --force."""
    if path is None:
        return None
    if path.is_dir():
        raise LvError(f"{option} {path} is a folder", hint=f"name a file in it, e.g. {path / ('report' + suffix)}")
    if path.suffix.lower() != suffix:
        raise LvError(f"{option} {path}: this writes a {suffix} file", hint=f"name it {path.with_suffix(suffix)}")
    check_folders_above(path, option)
    if path.exists() and not force:
        raise LvError(f"{path} already exists", hint=f"pass --force to overwrite it, or choose another {option} path")
    return path


def check_folders_above(path: Path, option: str) -> None:
    """The nearest existing folder above `path` must be a folder (a file there means the path cannot be made)."""
    from lvstudio.io_errors import nearest_existing

    above = nearest_existing(path.parent)
    if not above.is_dir():
        raise LvError(f"{option} {path}: {above} is a file, not a folder", hint=f"choose another {option}")


def check_folder_path(path: Path, option: str) -> None:
    """An output folder: one that exists, or one that can be made (no file in the way)."""
    if path.exists() and not path.is_dir():
        raise LvError(f"{option} {path} is a file, not a folder", hint=f"give {option} a folder (it is made if needed)")
    check_folders_above(path, option)


def check_given(param: typer.CallbackParam, value: str | None) -> str | None:
    """A name option (--preset, --backend): given empty it would silently mean the default."""
    if value is not None and not value.strip():
        name = param.opts[0] if param.opts else "the option"
        raise LvError(f"{name} is empty", hint=f"name one, or leave {name} out for the storyboard's or the default")
    return value
