"""`lvstudio tui [story.toml] [--prompt ...]`: load everything first (errors print as usual), then run the studio."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lvstudio.errors import LvError
from lvstudio.stop_signals import StopNow, graceful_stop

if TYPE_CHECKING:
    from lvstudio.tui.app import StudioApp


def tui_command(story: Path | None, prompt: str | None, preset: str | None, seed: int | None,
                duration: str | None, record: Path | None) -> None:
    """Open the terminal studio on a storyboard, or on one prompt that keeps generating until stopped.

    `record` (a folder, or an .mp4 path) starts recording with the first frame; F7 records on demand into `out/`.
    On quit the storyboard of what was rendered is written next to the recording (or into `out/`).
    """
    import torch

    from lvstudio.storyboard import parse_duration
    from lvstudio.tui.app import StudioApp
    from lvstudio.tui.studio import StudioOptions, open_studio

    options = StudioOptions(story=story, prompt=prompt, preset=preset, seed=seed, duration=parse_duration(duration),
                            record=record)
    holder: dict[str, StudioApp] = {}
    # SIGINT, SIGTERM and SIGHUP do what Ctrl-Q does (stop after the chunk in flight, finish the recording, save the
    # storyboard); a second one leaves at once, still finishing the recording of what was made. Inference only: no
    # autograd in this thread (scoped, so a caller's grad mode is left as it was).
    with torch.no_grad(), graceful_stop(lambda signum: _quit_soon(holder), quiet=True) as stop:
        studio = open_studio(options, echo=lambda m: typer.echo(m, err=True))
        app = holder["app"] = StudioApp(studio)
        try:
            if not stop.requested:
                app.run()
        except StopNow:
            studio.close(timeout=1.0)
        finally:
            summary = studio.close()  # idempotent: Ctrl-Q already did it; covers any other way out
    for rec in summary.recordings:
        typer.echo(f"recorded {rec.path} ({rec.frames} frames)")
    if summary.storyboard is not None:
        typer.echo(f"wrote {summary.storyboard}; re-render it with: {summary.rerender}")
    if summary.save_error is not None:  # nothing steered is lost: the storyboard goes to stderr instead
        typer.echo(summary.unsaved or "", err=True)
        typer.echo(f"the rendered storyboard is above (save it as a .toml file to re-render it): {summary.save_error}",
                   err=True)
        if studio.error is None:
            raise summary.save_error
    if studio.error is not None:
        if isinstance(studio.error, LvError):
            raise studio.error
        raise LvError(f"generation failed: {studio.error}")
    if stop.requested:
        typer.echo(f"{stop.name}: the studio stopped", err=True)
        raise typer.Exit(stop.exit_code)


def _quit_soon(holder: dict[str, StudioApp]) -> None:
    """From a signal handler (main thread, inside the app's event loop): stop generating and run Ctrl-Q's action
    from the loop (never from the handler itself)."""
    import asyncio

    app = holder.get("app")
    if app is None:  # still loading: the command checks the request before starting the app
        return
    app.studio.stop()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # the app is not running (yet, or any more)
        app.quit_when_ready = True
        return
    loop.call_soon_threadsafe(lambda: app.call_later(app.action_quit))
