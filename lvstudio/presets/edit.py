"""Writing preset files: the sha256 and size of an embedded preset's files, and pin files of Hub presets.

    write_file_hashes  `lvstudio presets hash PATH --write`: sets `[files.<role>] sha256 / size` in a preset file
                       (a maintainer re-runs it after retraining the weights an embedded preset ships).
    write_pin_file     `lvstudio presets pin NAME`: a small preset file in the user's preset folder that says
                       `base = "NAME"` and holds only the commits of NAME's last pull (and the sha256 and size of
                       its single-file entries); loading NAME then reads those commits whatever the cache holds.

tomlkit edits a file in place: comments, order and layout stay as they were.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from lvstudio.atomic import atomic_write_text
from lvstudio.errors import PresetError

PIN_MARK = "lvstudio presets pin"  # the first comment line of every pin file


def write_file_hashes(toml_path: Path, hashes: Mapping[str, tuple[str, int]]) -> list[str]:
    """Set `[files.<role>] sha256` and `size` in a preset file; returns the roles whose values changed."""
    import tomlkit

    doc = tomlkit.parse(toml_path.read_text(encoding="utf-8"))
    files = doc.get("files")
    changed = []
    for role, (sha, size) in hashes.items():
        if files is None or role not in files:
            raise PresetError(f"{toml_path}: no [files.{role}] table to write the hash into",
                              hint="hash --write edits the file that defines the preset's files")
        table = files[role]
        if table.get("sha256") != sha or table.get("size") != size:
            changed.append(role)
        table["sha256"] = sha
        table["size"] = size
    if changed:
        atomic_write_text(toml_path, tomlkit.dumps(doc))
    return changed


def is_pin_file(path: Path) -> bool:
    """True for a file `write_pin_file` wrote (it may be replaced without --force)."""
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        return False
    return bool(first) and first[0].startswith(f"# {PIN_MARK}")


def write_pin_file(target: Path, name: str, main_repo: str | None, commits: Mapping[str, str],
                   files: Mapping[str, tuple[str, int]], *, source: str, force: bool = False) -> Path:
    """Write `target` (NAME.toml): base = NAME, the commits, and the sha256/size of single-file entries.

    An existing file is replaced only when it is a pin file itself, or with `force`.
    """
    import tomlkit

    if target.exists() and not (force or is_pin_file(target)):
        raise PresetError(f"{target} exists and is not a pin file written by lvstudio",
                          hint="move it away, pass --to DIR to write the pin elsewhere, or --force to replace it")
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"{PIN_MARK} {name} on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, from "
                            f"{source}."))
    doc.add(tomlkit.comment("Only pins: every other setting comes from the preset it is based on. Delete this file "
                            "to unpin."))
    doc["base"] = name
    doc["name"] = name
    if main_repo is not None and main_repo in commits:
        doc["revision"] = commits[main_repo]
    others = {repo: commit for repo, commit in commits.items() if repo != main_repo}
    if others:
        doc["revisions"] = others
    if files:
        table = tomlkit.table(is_super_table=True)
        for role, (sha, size) in files.items():
            entry = tomlkit.table()
            entry["sha256"] = sha
            entry["size"] = size
            table[role] = entry
        doc["files"] = table
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, tomlkit.dumps(doc))
    return target
