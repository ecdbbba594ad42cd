"""Hugging Face Hub presets: pull (download), resolve (offline), verify (sha256) — every byte checked.

A Hub preset names files in one or more repositories (the DiT checkpoint in its own repo, umT5 + VAE in
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`). Each repository is read at one 40-hex commit:

  * pinned in the preset (`revision`, `[revisions]`; `lvstudio presets pin NAME` writes them for you), else
  * locked by the first `lvstudio presets pull NAME`: a repository the preset leaves unpinned has its branch
    (`main`) resolved once, the pull says so, and the commit goes into the lock with the sha256 and size of every
    file (`lvstudio.presets.lock`). Later pulls and every load use the locked commit; `--revision main` moves it on.

    pull     snapshot_download with allow_patterns = exactly the preset's files (weights + JSON, never code) at the
             commit; cache reuse first (no network when everything is cached), HF_HUB_OFFLINE respected, free disk
             checked first; then every file is hashed and checked, and the lock written.
    resolve  local only: role -> path in the Hub cache snapshot (or the converted safetensors for `.pt` files);
             clear errors when something was never pulled or converted.
    verify   every file against the preset's sha256, else the lock's sha256 and size, else the Hub's own content
             address (the blob name), before anything is loaded (`lvstudio.presets.integrity`).

Where things live: the Hub cache is HF_HUB_CACHE (or HF_HOME/hub, else huggingface_hub's default); lvstudio's own
cache (locks, converted safetensors, verification stamps) is LVSTUDIO_CACHE (default ~/.cache/lvstudio). Both are
read when a function is called, not at import.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lvstudio.errors import LvError, PresetError
from lvstudio.io_errors import nearest_existing
from lvstudio.presets.edit import is_pin_file
from lvstudio.presets.integrity import (
    FileCheck,
    Stamps,
    check_file,
    lvstudio_cache_dir,
    read_json,
)
from lvstudio.presets.integrity import require_ok as _require_ok
from lvstudio.presets.lock import LockedFile, LockedRepo, lock_path, locked_commits, read_lock, write_lock
from lvstudio.presets.schema import REVISION_PLACEHOLDER, FileEntry, Preset, is_commit

DISK_MARGIN = 2 << 30  # keep 2 GiB free after a download (bytes)
DEFAULT_BRANCH = "main"  # what an unpinned, never pulled repository is resolved from (once)
LOCKED = "locked by an earlier pull"
WEIGHT_SUFFIXES = (".safetensors",)
TEXT_SUFFIXES = (".json",)


# ---------------------------------------------------------------------------------------------------------------
# Locations and modes (read at call time)
# ---------------------------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """`models--owner--name` inside the Hub cache."""
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def converted_path(repo_id: str, commit: str, path: str) -> Path:
    """Where `lvstudio presets convert` writes the safetensors for an upstream `.pt` file."""
    stem = PurePosixPath(path).with_suffix(".safetensors")
    return lvstudio_cache_dir() / "converted" / ("models--" + repo_id.replace("/", "--")) / commit / stem


def sidecar_path(converted: Path) -> Path:
    """The JSON record next to a converted file (its sha256, source and source sha256)."""
    return converted.with_name(converted.name + ".lvstudio.json")


# ---------------------------------------------------------------------------------------------------------------
# Revisions
# ---------------------------------------------------------------------------------------------------------------


def parse_revision_args(values: Iterable[str], preset: Preset) -> dict[str, str]:
    """`--revision` values -> {repo_id: revision}.

    `REPO=REV` applies to that repository. A bare 40-hex commit applies to the preset's main repository. A bare
    branch or tag (e.g. `main`) applies to every repository the preset does not pin: pull resolves it again (also
    where a lock exists) and locks the commits it resolved to.
    """
    repos = preset.hub_repos()
    out: dict[str, str] = {}
    for raw in values:
        value = raw.strip()
        if not value:
            continue
        if "=" in value:
            repo, rev = (s.strip() for s in value.split("=", 1))
            if repo not in repos:
                raise PresetError(f"--revision {value!r}: preset {preset.name!r} does not use repository {repo!r}",
                                  hint=f"its repositories are: {', '.join(repos)}")
            out[repo] = rev
        elif is_commit(value.lower()):
            if preset.repo_id is None:
                raise PresetError(f"--revision {value}: preset {preset.name!r} has no main repo_id",
                                  hint="write --revision OWNER/NAME=COMMIT")
            out[preset.repo_id] = value.lower()
        else:
            unpinned = [repo for repo in repos if preset.pinned_revision(repo) is None]
            if not unpinned:
                raise PresetError(f"preset {preset.name!r} pins every repository it reads; --revision {value!r} "
                                  "would be ignored", hint=_pinned_hint(preset))
            for repo in unpinned:
                out.setdefault(repo, value)
    for repo, rev in out.items():
        if not rev or rev == REVISION_PLACEHOLDER:
            raise PresetError(f"--revision for {repo} is empty or {REVISION_PLACEHOLDER!r}",
                              hint="give a 40-hex commit id, or a branch such as main")
    return out


def _pinned_hint(preset: Preset) -> str:
    """How to move a pinned preset to another commit."""
    pin_file = next((f for f in preset.sources if is_pin_file(f)), None)
    if pin_file is not None:
        return (f"drop --revision; to move the pin, delete the pin file {pin_file}, pull with --revision, then "
                f"`lvstudio presets pin {preset.name}` again")
    return "drop --revision for this repository, or copy the preset under a new name without the pin"


def resolve_revisions(preset: Preset) -> dict[str, str]:
    """repo_id -> commit a load uses: the preset's pin, else the lock's commit. PresetError when neither exists."""
    lock = locked_commits(preset.name)
    out: dict[str, str] = {}
    missing: list[str] = []
    for repo in preset.hub_repos():
        rev = preset.pinned_revision(repo) or lock.get(repo)
        if rev is None:
            missing.append(repo)
        else:
            out[repo] = rev
    if missing:
        raise PresetError(
            f"preset {preset.name!r} is not pulled yet: no commit of {', '.join(missing)} is pinned in the preset "
            f"or locked by a pull (lock: {lock_path(preset.name)})",
            hint=_pull_hint(preset),
        )
    return out


def _pull_revision(preset: Preset, repo: str, overrides: Mapping[str, str],
                   lock: Mapping[str, LockedRepo]) -> tuple[str, str]:
    """(revision, why) a pull reads a repository at: --revision, the preset's pin, the lock, else the branch."""
    if repo in overrides:
        return overrides[repo], "--revision"
    if (pinned := preset.pinned_revision(repo)) is not None:
        return pinned, "pinned by the preset"
    if repo in lock:
        return lock[repo].commit, LOCKED
    return DEFAULT_BRANCH, "not pinned"


# ---------------------------------------------------------------------------------------------------------------
# Which files a preset needs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubEntry:
    """One preset file on the Hub."""

    role: str
    repo_id: str
    entry: FileEntry

    @property
    def path(self) -> str:
        return self.entry.path

    @property
    def kind(self) -> str:
        return self.entry.kind

    def patterns(self) -> list[str]:
        """allow_patterns for this entry: the exact file, or a diffusers folder's *.safetensors and *.json."""
        if self.kind == "diffusers":
            return [f"{self.path}/*.safetensors", f"{self.path}/*.json"]
        return [self.path]


def hub_entries(preset: Preset, repo_id: str | None = None) -> list[HubEntry]:
    out = []
    for role, entry in preset.files.items():
        if preset.is_hub_file(role):
            repo = preset.file_repo(role)
            if repo_id is None or repo == repo_id:
                out.append(HubEntry(role, repo, entry))
    return out


def allow_patterns(preset: Preset, repo_id: str) -> list[str]:
    """The allow_patterns passed to snapshot_download for one repository (weights and JSON only)."""
    patterns: list[str] = []
    for e in hub_entries(preset, repo_id):
        for p in e.patterns():
            if p not in patterns:
                patterns.append(p)
    return patterns


def _entry_files(snapshot: Path, e: HubEntry) -> list[Path]:
    """Files of an entry present in a snapshot folder (a diffusers folder lists its weights and JSON)."""
    target = snapshot / e.path
    if e.kind != "diffusers":
        return [target] if target.is_file() else []
    if not target.is_dir():
        return []
    return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + TEXT_SUFFIXES)


def _entry_missing(snapshot: Path, e: HubEntry) -> str | None:
    """Why an entry is incomplete in a snapshot (None when complete)."""
    files = _entry_files(snapshot, e)
    if e.kind != "diffusers":
        return None if files else e.path
    names = {p.name for p in files}
    if names & {"tokenizer.json", "tokenizer_config.json"}:  # a tokenizer folder: JSON only
        return None if "tokenizer.json" in names else f"{e.path}/tokenizer.json"
    if "config.json" not in names:
        return f"{e.path}/config.json"
    if not any(n.endswith(".safetensors") for n in names):
        return f"{e.path}/*.safetensors"
    for index in (p for p in files if p.name.endswith(".safetensors.index.json")):
        shards = set(read_json(index).get("weight_map", {}).values())
        absent = sorted(s for s in shards if not (index.parent / s).is_file())
        if absent:
            return f"{e.path}/{absent[0]}"
    return None


def _snapshot(repo_id: str, revision: str, cache: Path) -> tuple[str | None, Path | None]:
    """(commit, snapshot folder) for a revision in the local cache, or (None, None)."""
    folder = repo_folder(repo_id, cache)
    commit = revision if is_commit(revision) else None
    if commit is None:
        ref = folder / "refs" / revision
        if ref.is_file():
            commit = ref.read_text(encoding="utf-8").strip()
    if commit is None:
        return None, None
    snap = folder / "snapshots" / commit
    return commit, (snap if snap.is_dir() else None)


# ---------------------------------------------------------------------------------------------------------------
# Resolve (local only)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """Where a pulled preset's files are: role -> local path, repo -> commit."""

    preset: Preset
    commits: dict[str, str]
    paths: dict[str, Path]  # role -> file, diffusers folder, or (pt) the converted safetensors
    sources: dict[str, Path] = field(default_factory=dict)  # role -> the upstream file in the Hub cache
    snapshots: dict[str, Path] = field(default_factory=dict)  # repo -> its snapshot folder in the Hub cache

    def files(self, role: str) -> list[Path]:
        """Every loadable file of a role (a diffusers folder expands to its weights and JSON)."""
        p = self.paths[role]
        if p.is_dir():
            return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in WEIGHT_SUFFIXES + TEXT_SUFFIXES)
        return [p]

    def repo_path(self, repo: str, path: Path) -> str:
        """A snapshot file's path inside its repository (the key of the lock's `files`)."""
        return path.relative_to(self.snapshots[repo]).as_posix()


def _pull_hint(preset: Preset) -> str:
    hint = f"run `lvstudio presets pull {preset.name}`"
    if is_offline():
        hint += " on a machine with network (HF_HUB_OFFLINE is set here), or copy its Hub cache into " + str(
            hub_cache_dir())
    return hint


def resolve(preset: Preset, *, require_converted: bool = True,
            revisions: Mapping[str, str] | None = None) -> Resolved:
    """Find every Hub file of a preset in the local cache (never touches the network).

    revisions: {repo_id: revision}; default: the preset's pins, else the lock written by `presets pull`.
    """
    cache = hub_cache_dir()
    revisions = dict(revisions) if revisions is not None else resolve_revisions(preset)
    commits: dict[str, str] = {}
    paths: dict[str, Path] = {}
    sources: dict[str, Path] = {}
    snapshots: dict[str, Path] = {}
    for repo, rev in revisions.items():
        commit, snap = _snapshot(repo, rev, cache)
        if snap is None or commit is None:
            raise PresetError(
                f"preset {preset.name!r} is not pulled yet: {repo} at {rev[:12]} is not in the Hub cache {cache}",
                hint=_pull_hint(preset),
            )
        commits[repo], snapshots[repo] = commit, snap
        for e in hub_entries(preset, repo):
            missing = _entry_missing(snap, e)
            if missing is not None:
                raise PresetError(
                    f"preset {preset.name!r} is not fully pulled: {repo}/{missing} (commit {commit[:12]}) is missing "
                    f"from the Hub cache {cache}",
                    hint=_pull_hint(preset),
                )
            src = snap / e.path
            sources[e.role] = src
            if e.kind == "pt":
                conv = converted_path(repo, commit, e.path)
                if require_converted and not (conv.is_file() and sidecar_path(conv).is_file()):
                    raise PresetError(
                        f"preset {preset.name!r}: {repo}/{e.path} is an upstream pickle checkpoint that has not been "
                        "converted to safetensors yet",
                        hint=f"run `lvstudio presets convert {preset.name}` (once; it uses "
                             "torch.load(weights_only=True))",
                    )
                paths[e.role] = conv
            else:
                paths[e.role] = src
    return Resolved(preset, commits, paths, sources, snapshots)


# ---------------------------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------------------------


def require_ok(preset: Preset, checks: Iterable[FileCheck]) -> None:
    """Raise PresetError naming every missing or changed file (nothing is loaded after this fails)."""
    _require_ok(preset.name, checks, hint=(
        f"the files are damaged or were changed; download them again with `lvstudio presets pull {preset.name} "
        f"--force` (converted files: `lvstudio presets convert {preset.name} --force`)"))


def _locked(resolved: Resolved, lock: Mapping[str, LockedRepo], repo: str) -> LockedRepo | None:
    """The lock's record of a repository, if it is for the commit being read."""
    rec = lock.get(repo)
    return rec if rec is not None and rec.commit == resolved.commits.get(repo) else None


def _check_hub_file(resolved: Resolved, lock: Mapping[str, LockedRepo], role: str, path: Path, stamps: Stamps,
                    compute: bool) -> FileCheck:
    """One Hub file against the preset's sha256/size (single files), else the lock's, else the Hub's blob name."""
    entry = resolved.preset.files[role]
    repo = resolved.preset.file_repo(role)
    rec = _locked(resolved, lock, repo)
    locked = rec.files.get(resolved.repo_path(repo, path)) if rec is not None else None
    single = entry.kind != "diffusers"
    sha = (entry.sha256 if single else None) or (locked.sha256 if locked else None)
    size = (entry.size if single else None) or (locked.size if locked else None)
    reference = "preset" if single and entry.sha256 else "lock" if locked else "hub-etag"
    return check_file(path, stamps, sha256=sha, size=size, reference=reference, etag=sha is None, compute=compute)


def _lock_gaps(resolved: Resolved, lock: Mapping[str, LockedRepo], role: str) -> list[FileCheck]:
    """Files the lock lists in a diffusers folder that are gone from the snapshot."""
    entry = resolved.preset.files[role]
    repo = resolved.preset.file_repo(role)
    rec = _locked(resolved, lock, repo)
    if entry.kind != "diffusers" or rec is None:
        return []
    prefix = entry.path.rstrip("/") + "/"
    gone = [p for p in rec.files if p.startswith(prefix) and not (resolved.snapshots[repo] / p).is_file()]
    return [FileCheck(resolved.snapshots[repo] / p, "missing", "", rec.files[p].sha256, "lock",
                      "listed in the lock, missing from the Hub cache") for p in gone]


def verify_resolved(resolved: Resolved, *, use_stamps: bool, include_sources: bool = False,
                    roles: Iterable[str] | None = None, cached_only: bool = False) -> list[FileCheck]:
    """Check the files of a resolved preset (converted files against their record, others as `_check_hub_file`).

    use_stamps: trust remembered hashes of unchanged files (loads); False hashes every byte (pull, verify).
    cached_only: hash nothing large, use only remembered hashes (files never checked come back "unchecked");
    `presets list` uses this to say whether a preset is verified without reading gigabytes.
    """
    stamps = Stamps(trust=use_stamps or cached_only)
    compute = not cached_only
    lock = read_lock(resolved.preset.name)
    wanted = set(roles) if roles is not None else set(resolved.paths)
    checks: list[FileCheck] = []
    try:
        for role, path in resolved.paths.items():
            if role not in wanted:
                continue
            if resolved.preset.files[role].kind == "pt":
                if include_sources and role in resolved.sources:
                    checks.append(_check_hub_file(resolved, lock, role, resolved.sources[role], stamps, compute))
                if path.is_file():
                    expected = read_json(sidecar_path(path)).get("sha256")
                    if not isinstance(expected, str):
                        checks.append(FileCheck(path, "mismatch", "", None, "converted-record",
                                                "its conversion record is missing or damaged"))
                    else:
                        checks.append(check_file(path, stamps, sha256=expected, reference="converted-record",
                                                 compute=compute))
                continue
            checks += [_check_hub_file(resolved, lock, role, f, stamps, compute) for f in resolved.files(role)]
            checks += _lock_gaps(resolved, lock, role)
    finally:
        stamps.save()
    return checks


def verify(preset: Preset, *, full: bool = True) -> list[FileCheck]:
    """Hash every file of a pulled preset (upstream `.pt` sources included); see require_ok for the verdict."""
    resolved = resolve(preset, require_converted=False)
    return verify_resolved(resolved, use_stamps=not full, include_sources=True)


# ---------------------------------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoPull:
    """What pull did for one repository."""

    repo_id: str
    revision: str  # as read: a commit, or the branch that was resolved
    commit: str  # the 40-hex commit pulled
    cached: bool  # True: everything was already in the cache (no download)
    bytes_downloaded: int
    snapshot: Path
    why: str = ""  # where the revision came from: --revision, pinned by the preset, locked, not pinned


@dataclass(frozen=True)
class PullResult:
    preset: str
    repos: list[RepoPull]
    checks: list[FileCheck]
    lock: Path


def _map_hub_error(err: BaseException, preset: Preset, repo_id: str, revision: str) -> LvError:
    """huggingface_hub errors -> one clear PresetError each."""
    from huggingface_hub import errors as hf

    name = preset.name
    if isinstance(err, hf.DryRunError) and err.__cause__ is not None:  # the dry run wraps the real Hub error
        err = err.__cause__
    if isinstance(err, hf.GatedRepoError):
        return PresetError(
            f"{repo_id} is a gated repository and this machine has no access to it",
            hint=f"accept its terms on https://huggingface.co/{repo_id}, then log in (`hf auth login` or HF_TOKEN) "
                 f"and run `lvstudio presets pull {name}` again")
    if isinstance(err, hf.RepositoryNotFoundError):
        return PresetError(
            f"repository {repo_id} was not found on the Hub (or is private)",
            hint="check repo_id in the preset; for a private repository log in with `hf auth login` or set HF_TOKEN")
    if isinstance(err, hf.RevisionNotFoundError):
        return PresetError(
            f"revision {revision!r} does not exist in {repo_id}",
            hint=f"take a commit id from https://huggingface.co/{repo_id}/commits/main and pass it with "
                 f"`lvstudio presets pull {name} --revision {repo_id}=<commit>`")
    if isinstance(err, hf.LocalEntryNotFoundError):
        if is_offline():
            return PresetError(
                f"offline (HF_HUB_OFFLINE=1) and {repo_id} at {revision[:12]} is not in the Hub cache "
                f"{hub_cache_dir()}",
                hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {name}`, or copy a Hub cache holding it "
                     "there")
        return PresetError(
            f"could not reach the Hub for {repo_id} and it is not in the Hub cache {hub_cache_dir()}",
            hint="check the network connection (or HF_ENDPOINT) and try again")
    if isinstance(err, _transport_errors()):
        from huggingface_hub import constants

        why = str(err) or type(err).__name__
        return PresetError(f"cannot reach the Hub ({constants.ENDPOINT}) for {repo_id}: {why}",
                           hint="check the network connection (or a proxy, or HF_ENDPOINT), then run `lvstudio presets "
                                f"pull {name}` again; HF_HUB_OFFLINE=1 uses only what the Hub cache holds")
    if isinstance(err, hf.EntryNotFoundError):
        return PresetError(
            f"a file of preset {name!r} is not in {repo_id} at {revision[:12]}: {err}",
            hint="check files.*.path in the preset against the repository's file list")
    if isinstance(err, hf.OfflineModeIsEnabled):
        return PresetError(f"HF_HUB_OFFLINE is set and {repo_id} must be downloaded",
                           hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {name}`")
    if isinstance(err, hf.HfHubHTTPError):
        return PresetError(f"the Hub refused or failed a request for {repo_id}: {str(err).splitlines()[0]}",
                           hint="try again later; if it persists, check HF_TOKEN and the repository page")
    if isinstance(err, OSError) and not isinstance(err, ConnectionError | TimeoutError):
        from lvstudio.io_errors import io_failure, is_io_error

        if is_io_error(err):  # a full disk, a permission, a cache folder that vanished: one message everywhere
            return io_failure(err, action=f"downloading {repo_id}: reading or writing",
                              resume=f"lvstudio presets pull {name}",
                              elsewhere="set HF_HUB_CACHE (and LVSTUDIO_CACHE) to another disk")
    return PresetError(f"downloading {repo_id} failed: {type(err).__name__}: {err}",
                       hint="check the network connection and try again")


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors as hf

    return (hf.HfHubHTTPError, hf.EntryNotFoundError, hf.OfflineModeIsEnabled, hf.DryRunError, ConnectionError,
            TimeoutError, OSError, *_transport_errors())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "the request never got an answer" errors (no DNS, refused, timed out): huggingface_hub 1.x
    talks through httpx, 2.x through httpx2; neither's TransportError is an OSError."""
    import importlib.util

    return tuple(importlib.import_module(m).TransportError for m in ("httpx", "httpx2") if importlib.util.find_spec(m))


def download_plan(repo_id: str, revision: str, patterns: list[str], cache: Path) -> list[tuple[str, int, bool]]:
    """(file, size in bytes, already cached) for what snapshot_download would fetch (a dry run: metadata only)."""
    from huggingface_hub import snapshot_download

    infos = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns, dry_run=True)
    return [(i.filename, int(i.file_size or 0), bool(i.is_cached)) for i in infos]


def free_bytes(path: Path) -> int:
    """Free space on the disk holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_disk(preset: Preset, download: int, convert: int, margin: int = DISK_MARGIN) -> None:
    """Refuse to start when the Hub cache (downloads) or the lvstudio cache (converted copies) lacks room."""
    hub_dir, lv_dir = hub_cache_dir(), lvstudio_cache_dir()
    same = nearest_existing(hub_dir).stat().st_dev == nearest_existing(lv_dir).stat().st_dev
    needs = [(hub_dir, download + (convert if same else 0))] + ([] if same else [(lv_dir, convert)])
    for where, need in needs:
        free = free_bytes(where)
        if need and need + margin > free:
            raise PresetError(
                f"not enough disk space to pull preset {preset.name!r}: {download / 2**30:.1f} GiB to download"
                + (f" + {convert / 2**30:.1f} GiB for the converted safetensors" if convert else "")
                + f" (+{margin / 2**30:.0f} GiB margin) but {free / 2**30:.1f} GiB free at {where}",
                hint="free some space, or point HF_HUB_CACHE (and LVSTUDIO_CACHE) at a bigger disk, then pull again",
            )


def resolve_commit(preset: Preset, repo_id: str, revision: str) -> str:
    """The commit a branch or tag points to on the Hub now (one API call)."""
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo_id, revision=revision).sha
    except _hub_errors() as err:
        raise _map_hub_error(err, preset, repo_id, revision) from None
    if not is_commit(sha):
        raise PresetError(f"the Hub gave no commit id for {repo_id} at {revision!r} (got {sha!r})",
                          hint=f"pass one: `lvstudio presets pull {preset.name} --revision {repo_id}=<40-hex commit>`")
    return str(sha)


def pull(
    preset: Preset,
    revisions: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    tqdm_class: Any = None,
    log: Callable[[str], None] | None = None,
) -> PullResult:
    """Download (or find in the cache) every Hub file of a preset at one commit per repository, check every byte,
    and lock the commits with the sha256 and size of every file.

    revisions: {repo_id: revision} overrides (from `--revision`). Without them each repository is read at the
    preset's pin, else the locked commit, else its `main` branch resolved once (and said so through `log`).
    Raises PresetError for every user-fixable problem (offline and not cached, gated/missing repo, unknown revision,
    missing file, not enough disk, checksum mismatch).
    """
    say = log or (lambda _m: None)
    overrides = dict(revisions or {})
    for repo, rev in overrides.items():
        pinned = preset.pinned_revision(repo)
        if pinned is not None and rev != pinned:
            raise PresetError(f"preset {preset.name!r} pins {repo} at {pinned[:12]}; --revision {rev!r} would be "
                              "ignored when loading", hint=_pinned_hint(preset))
    lock = read_lock(preset.name)
    results = []
    for repo in preset.hub_repos():
        rev, why = _pull_revision(preset, repo, overrides, lock)
        results.append(_pull_repo(preset, repo, rev, why, force=force, tqdm_class=tqdm_class, say=say))
    # Step 4: hash every file (upstream sources included) and check it before anyone loads it; then lock.
    resolved = resolve(preset, require_converted=False, revisions={r.repo_id: r.commit for r in results})
    checks = verify_resolved(resolved, use_stamps=False, include_sources=True)
    require_ok(preset, checks)
    records = {}
    for r in results:
        files = {}
        for c in checks:
            if c.sha256 and c.path.is_relative_to(resolved.snapshots[r.repo_id]):
                files[resolved.repo_path(r.repo_id, c.path)] = LockedFile(c.sha256, os.path.getsize(c.path))
        earlier = lock.get(r.repo_id)
        requested = earlier.requested if earlier is not None and r.why == LOCKED else r.revision  # kept across pulls
        records[r.repo_id] = LockedRepo(r.commit, requested or r.revision, files)
    return PullResult(preset.name, results, checks, write_lock(preset.name, records))


def _branch_commit(preset: Preset, repo: str, branch: str, why: str, say: Callable[[str], None]) -> str:
    """Resolve a branch to a commit once: on the Hub, or (offline) from the Hub cache's ref."""
    if is_offline():
        commit, _ = _snapshot(repo, branch, hub_cache_dir())
        if commit is None:
            raise PresetError(
                f"offline (HF_HUB_OFFLINE=1) and {repo} at {branch!r} is not in the Hub cache {hub_cache_dir()}",
                hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {preset.name}`, or copy a Hub cache "
                     "holding it there")
        say(f"{repo}: {why}; offline, so {branch!r} is read from the Hub cache: {commit} (locked from now on)")
        return commit
    commit = resolve_commit(preset, repo, branch)
    say(f"{repo}: {why}; {branch!r} resolved once to {commit} (locked from now on; "
        f"`lvstudio presets pin {preset.name}` pins it in a preset file)")
    return commit


def _pull_repo(preset: Preset, repo: str, rev: str, why: str, *, force: bool, tqdm_class: Any,
               say: Callable[[str], None]) -> RepoPull:
    """One repository of a pull: from the cache when complete there, else a checked download of exactly the
    preset's files at one commit."""
    cache = hub_cache_dir()
    entries = hub_entries(preset, repo)
    patterns = allow_patterns(preset, repo)
    commit = rev if is_commit(rev) else _branch_commit(preset, repo, rev, why, say)
    # Step 1: cache reuse — a complete local snapshot needs no network at all.
    _, snap = _snapshot(repo, commit, cache)
    missing = [e.path for e in entries]
    if snap is not None and not force:
        missing = [m for e in entries if (m := _entry_missing(snap, e)) is not None]
        if not missing:
            say(f"{repo}@{commit[:12]}: cached ({len(entries)} entries)")
            return RepoPull(repo, rev, commit, True, 0, snap, why)
    if is_offline():
        raise PresetError(
            f"offline (HF_HUB_OFFLINE=1) and preset {preset.name!r} is not in the Hub cache {cache}: "
            f"{repo} at {commit[:12]} lacks {', '.join(missing[:4])}",
            hint=f"unset HF_HUB_OFFLINE and run `lvstudio presets pull {preset.name}`, or copy a Hub cache "
                 "holding these files there",
        )
    from huggingface_hub import snapshot_download

    try:
        # Step 2: what would be downloaded, and is there room for it (plus the converted copies of .pt files)?
        plan = download_plan(repo, commit, patterns, cache)
        need = sum(size for _, size, cached in plan if not cached or force)
        check_disk(preset, need, sum(size for name, size, _ in plan if name.endswith((".pt", ".pth"))))
        if not plan:
            raise PresetError(f"none of {patterns} exist in {repo} at {commit[:12]}",
                              hint="check files.*.path in the preset against the repository's file list")
        say(f"{repo}@{commit[:12]}: downloading {need / 2**30:.2f} GiB ({len(plan)} files)")
        # Step 3: download exactly the preset's files (never code) at the commit.
        folder = snapshot_download(repo, revision=commit, cache_dir=str(cache), allow_patterns=patterns,
                                   force_download=force, tqdm_class=tqdm_class)
    except PresetError:
        raise
    except _hub_errors() as err:
        raise _map_hub_error(err, preset, repo, commit) from None
    snap = Path(folder)
    missing = [m for e in entries if (m := _entry_missing(snap, e)) is not None]
    if missing:
        raise PresetError(f"{repo} at {commit[:12]} has no {', '.join(missing)}",
                          hint="check files.*.path in the preset against the repository's file list")
    return RepoPull(repo, rev, snap.name, False, sum(s for _, s, c in plan if not c or force), snap, why)
