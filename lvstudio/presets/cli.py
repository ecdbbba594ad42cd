"""`lvstudio presets list | info | pull | verify | convert`: one typer sub-app over the presets package.

The `presets_*` functions do the work and report through `echo` (one line per step); the `*_cmd` functions are the
typer commands with the documented options, registered on `presets_app` (which `lvstudio.cli` mounts as
`lvstudio presets`). Heavy imports (pydantic, torch, huggingface_hub) happen inside the functions, so importing this
module keeps `lvstudio --help` instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lvstudio.errors import PresetError

if TYPE_CHECKING:
    from lvstudio.presets.convert import Converted
    from lvstudio.presets.hub import FileCheck, PullResult
    from lvstudio.presets.schema import Preset

Echo = Callable[[str], None]

presets_app = typer.Typer(help="List, pull, verify and convert model presets.", no_args_is_help=True)


def _hub_preset(name: str) -> Preset:
    from lvstudio.presets.schema import load_preset

    preset = load_preset(name)
    if not preset.is_hub:
        raise PresetError(f"preset {preset.name!r} has no Hub files; nothing to pull, verify or convert",
                          hint="its weights live next to its preset.toml")
    return preset


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def preset_status(preset: Preset) -> str:
    """Whether a preset's files are present and verified, in a few words (the status column of `presets list`).

    Local presets: "ready" (every file present; sha256 checked where the preset gives one), "missing <file>" or
    "checksum mismatch". Hub presets: "unpinned", "not pulled", "not converted", "verified" (every file matched its
    reference hash when last checked, and is unchanged since), "pulled, not verified" (some file was never hashed:
    `lvstudio presets verify NAME` does it) or "checksum mismatch". Nothing large is hashed here.
    """
    from lvstudio.presets import hub

    if not preset.is_hub:
        for role, entry in preset.files.items():
            path = preset.file_path(role)
            if not path.exists():
                return f"missing {entry.path}"
            if entry.sha256 is not None and hub.sha256_file(path) != entry.sha256:
                return "checksum mismatch"
        return "ready"
    try:
        resolved = hub.resolve(preset)
    except PresetError as err:
        text = str(err)
        if "pins no revision" in text:
            return "unpinned"
        if "converted" in text:
            return "not converted"
        return "not pulled"
    checks = hub.verify_resolved(resolved, use_stamps=True, cached_only=True)
    if any(c.status == "mismatch" for c in checks):
        return "checksum mismatch"
    if any(c.status == "unchecked" for c in checks):
        return "pulled, not verified"
    return "verified"


def presets_list(*, echo: Echo = print) -> list[tuple[str, str]]:
    """One line per preset found (name, backend, native size, status, description); returns (name, status)."""
    from lvstudio.presets.schema import available_presets, load_preset

    out = []
    for name in available_presets():
        p = load_preset(name)
        status = preset_status(p)
        size = f"{p.width}x{p.height}@{p.fps}"
        echo(f"{name:24s} {p.backend:14s} {size:12s} {status:20s} {p.description}")
        out.append((name, status))
    return out


def presets_info(name: str, *, echo: Echo = print) -> Preset:
    """A preset's settings and files as JSON, its status, and (tiny text encoder) its vocabulary."""
    from lvstudio.presets.schema import load_preset

    p = load_preset(name)
    echo(p.model_dump_json(indent=2, exclude={"folder"}))
    echo(f"status: {preset_status(p)}")
    if p.text_encoder == "tiny" and "text_encoder" in p.files and p.file_path("text_encoder").exists():
        from lvstudio.models.tiny_text import load_text_encoder

        vocab = [w for w in load_text_encoder(p.file_path("text_encoder")).cfg.vocab if not w.startswith("<")]
        echo(f"vocabulary ({len(vocab)} words): {' '.join(vocab)}")
    return p


def presets_pull(
    name: str,
    revision: list[str] | None = None,
    *,
    force: bool = False,
    convert: bool = True,
    echo: Echo = print,
) -> PullResult:
    """Download (or find in the Hub cache) a preset's files, verify their sha256, lock the commits, convert `.pt`.

    revision: `--revision` values — `OWNER/NAME=COMMIT`, a bare 40-hex commit (the main repo), or a branch such as
    `main` (an explicit, one-time opt-in for every unpinned repo; the resolved commits go into the lock).
    """
    from lvstudio.presets import hub

    preset = _hub_preset(name)
    overrides = hub.parse_revision_args(revision or [], preset)
    echo(f"preset {preset.name}: {len(hub.hub_entries(preset))} entries from {', '.join(preset.hub_repos())}"
         + (" (offline: Hub cache only)" if hub.is_offline() else ""))
    result = hub.pull(preset, overrides, force=force, log=echo)
    for r in result.repos:
        how = "from the cache" if r.cached else f"downloaded {_gib(r.bytes_downloaded)}"
        echo(f"  {r.repo_id} @ {r.commit} ({how})")
        if r.revision != r.commit:
            echo(f"    pinned from {r.revision!r} (lock); to pin it for everyone, write \"{r.commit}\" as this repo's "
                 "revision in the preset file (revision = ... or [revisions])")
    unref = [c for c in result.checks if c.status == "unreferenced"]
    echo(f"  sha256 verified: {sum(c.status == 'ok' for c in result.checks)} files"
         + (f", {len(unref)} without a reference hash" if unref else ""))
    echo(f"  lock: {result.lock}")
    if convert:
        presets_convert(preset.name, force=force, echo=echo)
    echo(f'ready: use preset = "{preset.name}" in a storyboard (needs a GPU for full-size models: --device cuda)')
    return result


def presets_verify(name: str, *, echo: Echo = print) -> list[FileCheck]:
    """Re-hash every file of a pulled preset (sources and converted files); PresetError on any mismatch."""
    from lvstudio.presets import hub

    preset = _hub_preset(name)
    checks = hub.verify(preset, full=True)
    for c in checks:
        ref = f" (vs {c.reference})" if c.reference != "none" else " (no reference hash: not checked)"
        echo(f"  {c.status:<12} {c.sha256[:16]}…  {c.path}{ref}")
    hub.require_ok(preset, checks)
    echo(f"{preset.name}: {len(checks)} files verified")
    return checks


def presets_convert(
    name_or_path: str,
    output: Path | None = None,
    *,
    kind: str = "dit",
    state_key: str | None = None,
    force: bool = False,
    echo: Echo = print,
) -> list[Converted]:
    """Convert a pulled preset's `.pt` files (by preset name), or one `.pt` file (by path) to safetensors."""
    from lvstudio.presets import convert

    src = Path(name_or_path)
    if src.suffix.lower() in (".pt", ".pth") and src.is_file():
        if kind not in ("dit", "lora", "tensors"):
            raise PresetError(f"--kind must be dit, lora or tensors (got {kind!r})")
        out = output or src.with_suffix(".safetensors")
        echo(f"converting {src} (torch.load(weights_only=True): tensors only, code is refused)")
        done = [convert.convert_checkpoint(src, out, kind=kind, state_key=state_key, force=force)]  # type: ignore[arg-type]
    else:
        if output is not None:
            raise PresetError("--output applies to a single .pt file, not to a preset",
                              hint="converted preset files go to the lvstudio cache (LVSTUDIO_CACHE)")
        done = convert.convert_preset(_hub_preset(name_or_path), force=force)
        if not done:
            echo(f"{name_or_path}: no .pt files to convert")
    for c in done:
        state = "up to date" if c.skipped else f"{c.num_tensors} tensors"
        echo(f"  {c.kind:<7} {c.output} ({state}, sha256 {c.sha256[:16]}…)")
    return done


# ---------------------------------------------------------------------------------------------------------------
# typer commands
# ---------------------------------------------------------------------------------------------------------------


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


@presets_app.command("list")
def list_cmd() -> None:
    """List the presets found (presets/ and $LVSTUDIO_PRESET_PATH): backend, size, whether the files are ready."""
    presets_list(echo=typer.echo)


@presets_app.command("info")
def info_cmd(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Show a preset's settings, files, status and (for tiny) its vocabulary."""
    presets_info(name, echo=typer.echo)


@presets_app.command("pull")
def pull_cmd(
    name: Annotated[str, typer.Argument(help="Preset name (or unique prefix), e.g. self-forcing-1.3b.")],
    revision: Annotated[list[str] | None, typer.Option(
        "--revision", "-r", metavar="[REPO=]REV",
        help="Commit to pull: OWNER/NAME=COMMIT, a bare COMMIT for the preset's main repo, or a branch such as "
             "'main' to pin today's commit of every unpinned repo. Repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and convert again even if cached.")] = False,
    no_convert: Annotated[bool, typer.Option("--no-convert", help="Do not convert .pt checkpoints now.")] = False,
) -> None:
    """Download a Hub preset (weights and JSON only), verify sha256, pin the commits, convert .pt to safetensors."""
    presets_pull(name, revision, force=force, convert=not no_convert, echo=_echo)


@presets_app.command("verify")
def verify_cmd(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Re-hash every file of a pulled preset against its pinned or Hub checksums."""
    presets_verify(name, echo=_echo)


@presets_app.command("convert")
def convert_cmd(
    target: Annotated[str, typer.Argument(metavar="PRESET|FILE.pt", help="A pulled preset, or one .pt checkpoint.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .safetensors (single file).")] = None,
    kind: Annotated[str, typer.Option(help="Single file: dit | lora | tensors.")] = "dit",
    state_key: Annotated[str | None, typer.Option(
        help="Single file: dict inside the checkpoint, e.g. generator_ema.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if up to date.")] = False,
) -> None:
    """Convert upstream .pt checkpoints to safetensors once (torch.load(weights_only=True), official Wan keys)."""
    presets_convert(target, output, kind=kind, state_key=state_key, force=force, echo=_echo)
