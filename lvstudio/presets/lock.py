"""The lock of a pulled Hub preset: the commit of every repository, and the sha256 and size of every file there.

`lvstudio presets pull NAME` writes `<LVSTUDIO_CACHE>/locks/NAME.json` after it has hashed every file; every later
load of the preset reads the commits from it (when the preset pins none) and checks each file against it. Format 2:

    {"format": 2, "preset": "longlive-1.3b", "pulled_at": "2026-01-31T12:00:00Z",
     "repos": {"Efficient-Large-Model/LongLive-1.3B": {
         "requested": "main",                     # what pull was asked for: a branch, or the commit itself
         "commit": "<40 hex>",
         "files": {"models/longlive_base.pt": {"sha256": "<64 hex>", "size": 5676334208}, ...}}, ...}}

Format 1 (commits only, `{"revisions": {repo: commit}}`) is still read: its files are checked against the Hub's
content address until the next pull rewrites the lock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lvstudio.presets.integrity import lvstudio_cache_dir, read_json, write_json
from lvstudio.presets.schema import is_commit

LOCK_FORMAT = 2


@dataclass(frozen=True)
class LockedFile:
    sha256: str
    size: int


@dataclass
class LockedRepo:
    commit: str
    requested: str = ""
    files: dict[str, LockedFile] = field(default_factory=dict)  # path in the repository -> hash and size


def lock_path(preset_name: str) -> Path:
    return lvstudio_cache_dir() / "locks" / f"{preset_name}.json"


def read_lock(preset_name: str) -> dict[str, LockedRepo]:
    """repo_id -> what the last successful pull of this preset recorded ({} if never pulled)."""
    data = read_json(lock_path(preset_name))
    out: dict[str, LockedRepo] = {}
    for repo, commit in (data.get("revisions") or {}).items():  # format 1
        if isinstance(commit, str) and is_commit(commit):
            out[repo] = LockedRepo(commit)
    for repo, rec in (data.get("repos") or {}).items():
        if not (isinstance(rec, dict) and isinstance(rec.get("commit"), str) and is_commit(rec["commit"])):
            continue
        files = {}
        for path, f in (rec.get("files") or {}).items():
            if isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("size"), int):
                files[path] = LockedFile(f["sha256"], f["size"])
        out[repo] = LockedRepo(rec["commit"], str(rec.get("requested", "")), files)
    return out


def locked_commits(preset_name: str) -> dict[str, str]:
    return {repo: rec.commit for repo, rec in read_lock(preset_name).items()}


def write_lock(preset_name: str, repos: Mapping[str, LockedRepo]) -> Path:
    path = lock_path(preset_name)
    write_json(path, {
        "format": LOCK_FORMAT,
        "preset": preset_name,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repos": {repo: {"commit": rec.commit, "requested": rec.requested,
                         "files": {p: {"sha256": f.sha256, "size": f.size} for p, f in sorted(rec.files.items())}}
                  for repo, rec in repos.items()},
    })
    return path
