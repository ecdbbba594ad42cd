"""`lvstudio preview`: launch the web studio (registered in lvstudio/cli.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from lvstudio.errors import Interrupted, LvError
from lvstudio.stop_signals import StopNow, graceful_stop

MAX_STORY_BYTES = 1 << 20


def _read_story(story: Path) -> str:
    """The storyboard file's text for the editor (an invalid storyboard still opens, with its error shown)."""
    if not story.is_file():
        raise LvError(f"{story}: no such storyboard file", hint="check the path, or leave it out for the demo")
    if story.stat().st_size > MAX_STORY_BYTES:
        raise LvError(f"{story} is larger than 1 MiB", hint="storyboards are small TOML files")
    try:
        return story.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LvError(f"cannot read {story} ({type(err).__name__})", hint="save it as UTF-8 text") from None


def _require_ffmpeg() -> None:
    """gradio's streaming video re-muxes every live segment with ffmpeg and probes it with ffprobe: without them the
    first render would fail in the browser, so the studio refuses to start instead."""
    missing = [name for name in ("ffmpeg", "ffprobe") if shutil.which(name) is None]
    if missing:
        raise LvError(f"the web studio's live video needs {' and '.join(missing)}, not found on the PATH",
                      hint="install FFmpeg (it provides both ffmpeg and ffprobe), e.g. `apt install ffmpeg`, "
                           "`brew install ffmpeg` or `conda install ffmpeg`, then start `lvstudio preview` again")


def preview_command(story: Path | None, port: int | None, host: str, share: bool, auth: str | None,
                    preset: str | None, outputs: Path | None) -> None:
    """Open the studio on http://HOST:PORT (default 127.0.0.1) and serve until Ctrl-C."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise LvError("the web studio needs gradio, which is not installed", hint="pip install 'lvstudio[web]'")
    _require_ffmpeg()
    from lvstudio.web.app import FALLBACK_STORY, StudioConfig, WebStudio, demo_story_path, launch_studio
    from lvstudio.web.security import check_listen, make_policy

    policy = make_policy(host=host, port=port, share=share, auth=auth, outputs=outputs)
    check_listen(policy)
    if preset is not None:  # the picker's default: a preset that cannot load is refused now, not at the first render
        from lvstudio.presets import load_preset

        load_preset(preset)
    if story is None and demo_story_path().is_file():
        story = demo_story_path()
    if story is not None:
        text, name, folder = _read_story(story), str(story), story.resolve().parent
    else:
        text, name, folder = FALLBACK_STORY, "storyboard.toml", Path.cwd()
    config = StudioConfig(outputs=policy.outputs, story_text=text, story_name=name, story_dir=folder, preset=preset)
    studio = WebStudio(config)
    # SIGINT, SIGTERM and SIGHUP: every render stops after its chunk in flight and keeps its job folder (finish it
    # with `lvstudio render --resume`), then the server closes; a second signal leaves at once.
    with graceful_stop(what="the renders' chunks in flight") as stop:
        demo, _ = launch_studio(studio, policy, block=False, quiet=False)
        try:
            while not stop.wait(0.5):
                pass
            kept = studio.shutdown()
        except StopNow as now:  # a second signal: leave at once; the job folders stay resumable
            for line in studio.resume_commands():
                typer.echo(f"render {line}", err=True)
            raise Interrupted(f"{now.args[0]} again: the studio stopped at once", exit_code=now.exit_code,
                              hint="finish the renders listed above with their commands") from None
        finally:
            demo.close()
    for line in kept:
        typer.echo(f"render {line}", err=True)
    raise typer.Exit(stop.exit_code)
