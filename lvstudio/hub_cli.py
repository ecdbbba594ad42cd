"""`lvstudio presets pull | verify | convert`: the command-line face of lvstudio.hub and lvstudio.convert.

The `presets_*` functions do the work and report through `echo` (one line per step); the `*_cmd` functions are
typer commands with the documented options. `register(presets_app)` adds all three to a typer group. Heavy imports
(torch, huggingface_hub) happen inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lvstudio.errors import PresetError

if TYPE_CHECKING:
    from lvstudio.convert import Converted
    from lvstudio.hub import FileCheck, PullResult
    from lvstudio.presets import Preset

Echo = Callable[[str], None]


def _hub_preset(name: str) -> Preset:
    from lvstudio.presets import load_preset

    preset = load_preset(name)
    if not preset.is_hub:
        raise PresetError(f"preset {preset.name!r} has no Hub files; nothing to pull, verify or convert",
                          hint="its weights live next to its preset.toml")
    return preset


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def preset_status(preset: Preset) -> str:
    """One word for `presets list`: local | ready | not converted | not pulled | unpinned."""
    from lvstudio import hub

    if not preset.is_hub:
        return "local"
    try:
        hub.resolve(preset)
    except PresetError as err:
        text = str(err)
        if "pins no revision" in text:
            return "unpinned"
        if "converted" in text:
            return "not converted"
        return "not pulled"
    return "ready"


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
    from lvstudio import hub

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
    from lvstudio import hub

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
    from lvstudio import convert

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
# typer commands (register with `register(presets_app)`)
# ---------------------------------------------------------------------------------------------------------------


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def pull_cmd(
    name: Annotated[str, typer.Argument(help="Preset name (or unique prefix), e.g. self-forcing-1.3b.")],
    revision: Annotated[Optional[list[str]], typer.Option(
        "--revision", "-r", metavar="[REPO=]REV",
        help="Commit to pull: OWNER/NAME=COMMIT, a bare COMMIT for the preset's main repo, or a branch such as "
             "'main' to pin today's commit of every unpinned repo. Repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and convert again even if cached.")] = False,
    no_convert: Annotated[bool, typer.Option("--no-convert", help="Do not convert .pt checkpoints now.")] = False,
) -> None:
    """Download a Hub preset (weights and JSON only), verify sha256, pin the commits, convert .pt to safetensors."""
    presets_pull(name, revision, force=force, convert=not no_convert, echo=_echo)


def verify_cmd(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Re-hash every file of a pulled preset against its pinned or Hub checksums."""
    presets_verify(name, echo=_echo)


def convert_cmd(
    target: Annotated[str, typer.Argument(metavar="PRESET|FILE.pt", help="A pulled preset, or one .pt checkpoint.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output .safetensors (single file).")] = None,
    kind: Annotated[str, typer.Option(help="Single file: dit | lora | tensors.")] = "dit",
    state_key: Annotated[Optional[str], typer.Option(help="Single file: dict inside the checkpoint, e.g. generator_ema.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if up to date.")] = False,
) -> None:
    """Convert upstream .pt checkpoints to safetensors once (torch.load(weights_only=True), official Wan keys)."""
    presets_convert(target, output, kind=kind, state_key=state_key, force=force, echo=_echo)


def register(presets_app: typer.Typer) -> None:
    """Add `pull`, `verify` and `convert` to the `lvstudio presets` group."""
    presets_app.command("pull")(pull_cmd)
    presets_app.command("verify")(verify_cmd)
    presets_app.command("convert")(convert_cmd)
