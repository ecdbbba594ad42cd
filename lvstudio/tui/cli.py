"""`lvstudio tui [story.toml] [--prompt ...]`: load everything first (errors print as usual), then run the studio."""

from __future__ import annotations

from pathlib import Path

import typer

from lvstudio.errors import LvError


def parse_duration(duration: str | None) -> float | None:
    """`--duration` text (seconds or m:ss) to seconds; LvError with the accepted forms otherwise."""
    from lvstudio.storyboard import parse_time

    if duration is None:
        return None
    try:
        seconds = parse_time(duration)
    except ValueError as err:
        raise LvError(f"--duration: {err}", hint='use seconds ("90s", 90) or m:ss ("1:30")') from None
    if seconds <= 0:
        raise LvError(f"--duration must be positive (got {duration!r})")
    return seconds


def tui_command(story: Path | None, prompt: str | None, preset: str | None, seed: int | None,
                duration: str | None, record: Path | None) -> None:
    """Open the terminal studio on a storyboard, or on one prompt that keeps generating until stopped.

    `record` (a folder, or an .mp4 path) starts recording with the first frame; F7 records on demand into `out/`.
    On quit the storyboard of what was rendered is written next to the recording (or into `out/`).
    """
    import torch

    from lvstudio.tui.app import StudioApp
    from lvstudio.tui.studio import StudioOptions, open_studio

    if seed is not None and seed < 0:
        raise LvError(f"--seed must be 0 or more (got {seed})")
    options = StudioOptions(story=story, prompt=prompt, preset=preset, seed=seed, duration=parse_duration(duration),
                            record=record)
    torch.set_grad_enabled(False)
    studio = open_studio(options, echo=lambda m: typer.echo(m, err=True))
    app = StudioApp(studio)
    try:
        app.run()
    finally:
        summary = studio.close()  # idempotent: Ctrl-Q already did it; covers any other way out
    for rec in summary.recordings:
        typer.echo(f"recorded {rec.path} ({rec.frames} frames)")
    if summary.storyboard is not None:
        typer.echo(f"wrote {summary.storyboard}; re-render it with: {summary.rerender}")
    if studio.error is not None:
        raise LvError(f"generation failed: {studio.error}")
