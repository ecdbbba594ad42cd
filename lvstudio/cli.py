"""The `lvstudio` command line: a thin typer shell over the library.

Each command is a small function that imports its implementation lazily, so `lvstudio --help` stays instant
(no torch, gradio or textual at import time). User errors (`LvError`) print one short message to stderr and exit
2; Ctrl-C exits 130. Sub-command groups (`presets`, `train`, `eval`, `bench`) are created here, empty for now:
add commands to them with `@presets_app.command()` and keep the heavy imports inside the function.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from lvstudio import __version__
from lvstudio.errors import LvError

if TYPE_CHECKING:
    import click

    from lvstudio.storyboard import Storyboard

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _LvGroup(TyperGroup):
    """The root command group: turns `LvError` and Ctrl-C from any sub-command into a message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LvError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="lvstudio",
    cls=_LvGroup,
    help="Interactive long videos from TOML storyboards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
presets_app = typer.Typer(help="List, pull, verify and convert model presets.", no_args_is_help=True)
train_app = typer.Typer(help="Training recipes (diffusion forcing, self forcing, error recycling, streaming).",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Long-horizon quality metrics on the procedural world.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed and memory benchmarks.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    """Eager `--version` callback."""
    if value:
        typer.echo(f"lvstudio {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Interactive long videos from TOML storyboards."""


@app.command()
def check(
    story: Annotated[Path, typer.Argument(metavar="STORY.toml", help="The storyboard to validate.")],
) -> None:
    """Validate a storyboard and print its shots with resolved prompts and times."""
    from lvstudio.storyboard import load_storyboard  # lazy: keeps --help fast

    storyboard = load_storyboard(story)
    typer.echo(_summary(storyboard, str(story)))


def _summary(sb: Storyboard, source: str) -> str:
    """A short human-readable summary of a valid storyboard: header lines and a table of shots."""
    from lvstudio.storyboard import format_time  # noqa: PLC0415

    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    resolution = f"{sb.resolution[0]}x{sb.resolution[1]}" if sb.resolution else "preset native"
    anchors = ", ".join(
        f"{format_time(a.at)} <- " + (f"shot {a.shot}" if a.shot is not None else str(a.image)) for a in sb.anchors
    )
    lines = [
        f"{source}: OK",
        f"  title       {sb.title}",
        f"  preset      {sb.preset} (backend: {sb.backend or 'preset default'})",
        f"  video       {format_time(sb.duration)} at {sb.fps} fps = {sb.num_frames()} frames, {resolution}",
        f"  seed        {sb.seed}",
        f"  identities  {', '.join(sb.identities) or '-'}",
        f"  anchors     {anchors or '-'}",
        "",
        f"  {'shot':>4}  {'at':>9}  {'until':>9}  {'transition':<11} prompt",
    ]
    for i, shot in enumerate(sb.shots):
        prompt = " ".join(sb.resolved_prompt(i).split())
        head = (f"  {i + 1:>4}  {format_time(shot.at):>9}  {format_time(sb.shot_end(i)):>9}  "
                f"{str(shot.transition):<11} ")
        room = max(width - len(head) - 1, 20)
        lines.append(head + (prompt if len(prompt) <= room else prompt[: room - 3] + "..."))
    return "\n".join(lines)


def main() -> None:
    """Console entry point (`lvstudio`)."""
    try:
        app(prog_name="lvstudio")
    except LvError as err:  # raised outside a command, e.g. in a callback
        typer.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
