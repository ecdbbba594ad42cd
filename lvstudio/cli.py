"""The `lvstudio` command line: a thin typer shell over the library.

Each command is a small function that imports its implementation lazily, so `lvstudio --help` stays instant
(no torch, gradio or textual at import time). User errors (`LvError`) print one short message to stderr and exit
2; a disk that refuses a read or a write exits 74 with what failed and what to do (`lvstudio.io_errors`); a stop
signal exits 128 + its number (Ctrl-C 130, SIGTERM 143, SIGHUP 129). Sub-command groups: `presets` lives with the
presets (`lvstudio.presets.cli.presets_app`), `bench` with the benchmarks (`lvstudio.eval.bench_cli.bench_app`);
`train` and `eval` are here. Keep the heavy imports inside the command functions.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from lvstudio import __version__
from lvstudio.backends.registry import BACKENDS, DEFAULT_BACKEND
from lvstudio.cli_options import check_given, check_new_file, check_seed, check_threads
from lvstudio.errors import Interrupted, LvError
from lvstudio.eval.bench_cli import bench_app
from lvstudio.presets.cli import presets_app

if TYPE_CHECKING:
    import click

    from lvstudio.storyboard import Storyboard

EXIT_INTERRUPTED = 130


class _LvGroup(TyperGroup):
    """The root command group: turns `LvError`, I/O errors and stop signals from any sub-command into a message and an
    exit code (README, "Exit codes")."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as err:  # noqa: BLE001 - anything else is re-raised unchanged
            raise _exit_for(err) from None
        except KeyboardInterrupt as err:
            _say(f"interrupted ({err.args[0]})" if err.args else "interrupted")
            raise typer.Exit(getattr(err, "exit_code", EXIT_INTERRUPTED)) from None


def _say(text: str) -> None:
    """Print to stderr; a terminal that went away (SIGHUP) must not turn a clean exit into a traceback."""
    try:
        typer.echo(text, err=True)
    except OSError:
        pass


def _exit_for(err: Exception) -> BaseException:
    """The message and exit code of an error leaving a command: LvError as it is, OSErrors through
    `lvstudio.io_errors` (exit 74); anything else is a bug and keeps its traceback."""
    if not isinstance(err, LvError):
        from lvstudio.io_errors import io_failure, is_io_error

        if not is_io_error(err):
            return err
        err = io_failure(err, action="reading or writing")
    _say(str(err))
    return typer.Exit(err.exit_code)


app = typer.Typer(
    name="lvstudio",
    cls=_LvGroup,
    help="Interactive long videos from TOML storyboards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
train_app = typer.Typer(help="Training recipes (diffusion forcing, self forcing, error recycling, streaming).",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Long-horizon quality metrics on the procedural world.", no_args_is_help=True)
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
    import warnings

    warnings.formatwarning = _warning_line  # our warnings are messages to the user, not Python source locations


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """How a warning prints on the command line: `warning: <message>`, one line (no file, line number or source)."""
    return f"warning: {message}\n"


@app.command()
def check(
    story: Annotated[Path, typer.Argument(metavar="STORY.toml", help="The storyboard to validate.")],
) -> None:
    """Validate a storyboard and print its shots with resolved prompts and times."""
    from lvstudio.presets import load_preset
    from lvstudio.storyboard import load_storyboard  # lazy: keeps --help fast

    storyboard = load_storyboard(story)
    try:  # a preset `render` would refuse (its weights are not needed here: a Hub preset not pulled yet is fine)
        load_preset(storyboard.preset)
    except LvError as err:
        raise LvError(f"{story}: preset = {storyboard.preset!r}: {err.message}", hint=err.hint) from None
    typer.echo(_summary(storyboard, str(story)))
    for line in _vocabulary_warnings(storyboard):
        typer.echo(line, err=True)


def _vocabulary_warnings(sb: Storyboard) -> list[str]:
    """Per shot, the words the storyboard's preset cannot read (a tiny word-level text encoder drops them).

    Presets whose encoder reads any text (umT5) or that cannot be found here give no warnings: `check` validates the
    storyboard, it does not require the preset."""
    from lvstudio.errors import LvError
    from lvstudio.models.tiny_vocab import read_vocabulary, unknown_words
    from lvstudio.presets import load_preset

    try:
        preset = load_preset(sb.preset)
        if preset.text_encoder != "tiny" or "text_encoder" not in preset.files:
            return []
        vocabulary = read_vocabulary(preset.file_path("text_encoder"))
    except (LvError, OSError, ValueError):
        return []
    lines = []
    for i in range(len(sb.shots)):
        words = unknown_words(sb.resolved_prompt(i), vocabulary)
        if words:
            lines.append(f"warning: shot {i + 1}: preset {preset.name!r} does not know "
                         + ", ".join(repr(w) for w in words)
                         + " — these words are ignored; README 'The embedded tiny preset' lists its vocabulary")
    return lines


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


@app.command()
def render(
    story: Annotated[list[Path], typer.Argument(
        metavar="STORY.toml|DIR...", help="The storyboard to render; several, or folders of them, make a batch.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output .mp4, or a folder to write <story>.mp4 in (default out/<story>.mp4).")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", help="Render a batch into this folder (<stem>.mp4 each, batch.json; default out/).")] = None,
    preset: Annotated[str | None, typer.Option(help="Override the storyboard's preset.", callback=check_given)] = None,
    backend: Annotated[str | None, typer.Option(help=" | ".join(BACKENDS) + ".", callback=check_given)] = None,
    seed: Annotated[int | None, typer.Option(help="Override the storyboard's seed.", callback=check_seed)] = None,
    duration: Annotated[str | None, typer.Option(
        help="Render this long (seconds or m:ss, up to 24 h): shorter than the storyboard cuts it, "
             "longer holds its last shot.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted render of this output.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output / discard an old job.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    keep_job: Annotated[bool, typer.Option("--keep-job", help="Keep the job folder (per-chunk latents).")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: $LVSTUDIO_DEVICE or cpu).")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default).", callback=check_threads)] = 1,
    extend: Annotated[Path | None, typer.Option(
        "--extend", metavar="VIDEO.mp4", help="Continue this video (SkyReels-V2 DF presets): the output is the video "
                                              "followed by the storyboard's frames.")] = None,
) -> None:
    """Render a storyboard to an H.264 mp4 (+ manifest.json and a contact sheet), or a batch of them.

    A batch (several storyboards, a folder, --out-dir, or any torchrun launch) resumes interrupted jobs and skips
    finished ones by itself; under `torchrun --nproc_per_node=N` the processes share its storyboards."""
    from lvstudio.render import EXIT_INTERRUPTED as INTERRUPTED
    from lvstudio.render import RenderRequest
    from lvstudio.render import render as run_render
    from lvstudio.storyboard import parse_duration

    secs = parse_duration(duration)
    if out_dir is not None or len(story) > 1 or story[0].is_dir() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if out is not None:
            raise LvError("--out names the output of one storyboard", hint="give a batch an --out-dir")
        if extend is not None:
            raise LvError("--extend continues one video with one storyboard", hint="render that storyboard alone")
        _render_batch(story, out_dir or Path("out"), preset, backend, seed, secs, force, not no_progress, keep_job,
                      device, threads)
        return
    req = RenderRequest(story[0], out, preset, backend, seed, secs, resume, force, progress=not no_progress,
                        keep_job=keep_job, threads=threads, device=device, extend=extend)
    result = run_render(req, echo=_say)
    if result.interrupted:
        raise typer.Exit(result.exit_code or INTERRUPTED)
    rt = result.stats.get("realtime_factor")
    typer.echo(f"wrote {result.video} ({rt}x real time), {result.manifest}, {result.contact_sheet}")


def _render_batch(stories: list[Path], out_dir: Path, preset: str | None, backend: str | None, seed: int | None,
                  duration: float | None, force: bool, progress: bool, keep_job: bool, device: str | None,
                  threads: int) -> None:
    """`lvstudio render` of a batch (lvstudio.batch): per-job lines from every rank, the summary from rank 0."""
    from lvstudio.batch import BatchRequest, run_batch, summary_lines

    req = BatchRequest(stories, out_dir, preset, backend, seed, duration, force, progress, keep_job, device, threads)
    outcome = run_batch(req, echo=lambda m: typer.echo(m, err=True))
    if outcome.index is not None:
        typer.echo("\n".join(summary_lines(outcome.index)))
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@app.command()
def tui(
    story: Annotated[Path | None, typer.Argument(
        metavar="[STORY.toml]", help="Storyboard to render live (or use --prompt).")] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="Start from one prompt; runs until stopped.")] = None,
    preset: Annotated[str | None, typer.Option(help="Preset name or preset.toml (overrides the storyboard's).",
                                                   callback=check_given)] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.", callback=check_seed)] = None,
    duration: Annotated[str | None, typer.Option(help="Stop after this long (seconds or m:ss).")] = None,
    record: Annotated[Path | None, typer.Option(help="Record from the first frame: a folder or an .mp4 path.")] = None,
) -> None:
    """Terminal studio: live preview, timeline, live prompts, recording."""
    from lvstudio.tui.cli import tui_command

    tui_command(story, prompt, preset, seed, duration, record)


@app.command()
def preview(
    story: Annotated[Path | None, typer.Argument(
        metavar="[STORY.toml]", help="Storyboard to open (default: the demo).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: first free from 7860).")] = None,
    host: Annotated[str, typer.Option(help="Interface; anything but loopback needs --auth.")] = "127.0.0.1",
    share: Annotated[bool, typer.Option("--share", help="Public gradio.live link (needs --auth).")] = False,
    auth: Annotated[str | None, typer.Option(
        metavar="USER:PASSWORD_FILE", help="Password = first line of the file (chmod 600).")] = None,
    preset: Annotated[str | None, typer.Option(help="Default preset in the picker (name or preset.toml path).",
                                                   callback=check_given)] = None,
    outputs: Annotated[Path | None, typer.Option(
        help="Folder for renders (default out/web); the only folder the page can read.")] = None,
) -> None:
    """Open the web studio: edit a storyboard, render with live preview, steer with prompts, download."""
    from lvstudio.web.cli import preview_command

    preview_command(story, port, host, share, auth, preset, outputs)


_FSDP = typer.Option("--fsdp", help="Shard the model(s) across torchrun's processes (torch fully_shard); "
                                     "checkpoints are sharded (torch.distributed.checkpoint).")


@train_app.command("diffusion-forcing")
def train_diffusion_forcing_cmd(
    config: Annotated[Path, typer.Argument(
        metavar="CONFIG.toml", help="Training config (see presets/tiny/train_df.toml).")],
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (logs still written).")] = False,
    fsdp: Annotated[bool, _FSDP] = False,
) -> None:
    """Diffusion Forcing: per-block noise levels, block-causal attention (resumes from out_dir)."""
    _train(config, "diffusion_forcing", "DFConfig", "train_diffusion_forcing", not no_progress, fsdp)


@train_app.command("streaming")
def train_streaming_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="Streaming-buffer training config.")],
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (logs still written).")] = False,
    fsdp: Annotated[bool, _FSDP] = False,
) -> None:
    """StreamDiT-style buffer training: staggered partition levels + boundary consistency (resumes from out_dir)."""
    _train(config, "streaming", "StreamConfig", "train_streaming", not no_progress, fsdp)


def _train(config: Path, module: str, config_class: str, function: str, progress: bool, fsdp: bool = False) -> None:
    """Load CONFIG.toml into the recipe's config class and run the recipe (imports stay lazy); `--fsdp` sets the
    config's `fsdp`."""
    import importlib

    from lvstudio.train.common import load_config

    mod = importlib.import_module(f"lvstudio.train.{module}")
    cfg = load_config(config, getattr(mod, config_class))
    if fsdp:
        cfg = cfg.model_copy(update={"fsdp": True})
    command = f"lvstudio train {module.replace('_', '-')} {config}" + (" --fsdp" if fsdp else "")
    with training_guard(command, config, cfg.out_dir):
        result = getattr(mod, function)(cfg, progress=progress)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("loss") and isinstance(v, float))
    typer.echo(f"done: step {result['step']}, {losses or 'no loss logged'}, weights in {cfg.out_dir}")


@contextmanager
def training_guard(command: str, config: Path, out_dir: str | None) -> Iterator[None]:
    """A training run under a stop-signal handler (stop after the step in flight, checkpoint, exit 128 + signal)
    with its I/O errors explained (the last checkpoint stays intact; `command` continues the run)."""
    from lvstudio.io_errors import translated_io
    from lvstudio.stop_signals import StopNow, graceful_stop
    from lvstudio.train.loop import TrainingStopped

    kept = "The last checkpoint is intact (checkpoints are written atomically)."
    elsewhere = f"set out_dir in {config} to another disk" if out_dir else f"point {config} at another disk"
    try:
        with graceful_stop(what="the step in flight"), translated_io("training", resume=command, kept=kept,
                                                                      elsewhere=elsewhere):
            yield
    except TrainingStopped as stopped:
        stopped.hint = f"continue with: {command}"
        raise
    except StopNow as now:
        raise Interrupted(f"{now.args[0]} again: training stopped at once. {kept}", exit_code=now.exit_code,
                          hint=f"continue with: {command}") from None


_NO_PROGRESS = typer.Option("--no-progress", help="No progress bar (logs still written).")


@train_app.command("erft")
def train_erft_cmd(
    config: Annotated[Path, typer.Argument(
        metavar="CONFIG.toml", help="ERFT config (see presets/tiny/train_erft.toml).")],
    no_progress: Annotated[bool, _NO_PROGRESS] = False,
) -> None:
    """Error-Recycling Fine-Tuning: a LoRA taught to steer back from its own recorded errors (resumes from out_dir)."""
    _train(config, "erft", "ERFTConfig", "train_erft", not no_progress)


@train_app.command("self-forcing")
def train_self_forcing_cmd(
    config: Annotated[Path, typer.Argument(
        metavar="CONFIG.toml", help="Self-Forcing config (see presets/tiny/train_sf.toml).")],
    no_progress: Annotated[bool, _NO_PROGRESS] = False,
    fsdp: Annotated[bool, _FSDP] = False,
) -> None:
    """Self-Forcing: autoregressive KV rollouts in training, DMD against the base model (resumes from out_dir)."""
    _train(config, "self_forcing", "SelfForcingConfig", "train_self_forcing", not no_progress, fsdp)


@train_app.command("causal-distill")
def train_causal_distill_cmd(
    config: Annotated[Path, typer.Argument(
        metavar="CONFIG.toml", help="CausVid config (see presets/tiny/train_ode.toml).")],
    no_progress: Annotated[bool, _NO_PROGRESS] = False,
) -> None:
    """CausVid: ODE-pair regression from the teacher as the causal student's init, then DMD (resumes from out_dir)."""
    _train(config, "causal_distill", "CausalDistillConfig", "train_causal_distill", not no_progress)


@train_app.command("export")
def train_export_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="The config of the run.")],
    to: Annotated[Path | None, typer.Option(
        "--to", help="Also copy the weights into this preset folder (DiT and text encoder; a self-forcing or "
                     "causal-distill run: its generator's DiT).")] = None,
    storage: Annotated[str, typer.Option(
        help="How --to stores them: float16, int8 (a scale per output channel: a quarter of float32) or "
             "float32.")] = "float16",
    recipe: Annotated[str, typer.Option(
        help="The run's recipe: diffusion-forcing, streaming, self-forcing or causal-distill.")] = "diffusion-forcing",
) -> None:
    """Export the EMA weights of a run's latest checkpoint (an unfinished run's too): dit/text safetensors.

    A sharded (--fsdp) checkpoint is first gathered into one file, out_dir/consolidated.safetensors."""
    from lvstudio.models.weight_storage import STORAGES
    from lvstudio.train.common import load_config
    from lvstudio.train.diffusion_forcing import ship_weights

    if recipe not in ("diffusion-forcing", "streaming", "self-forcing", "causal-distill"):
        raise LvError(f"--recipe {recipe!r} has no export",
                      hint="choose diffusion-forcing, streaming, self-forcing or causal-distill")
    if storage not in STORAGES:
        raise LvError(f"--storage {storage!r} is not a weight storage", hint=f"choose {', '.join(STORAGES)}")
    if recipe in ("self-forcing", "causal-distill"):
        from lvstudio.train.causal_distill import CausalDistillConfig
        from lvstudio.train.self_forcing import SelfForcingConfig, export_run

        dit = export_run(load_config(config, SelfForcingConfig if recipe == "self-forcing" else CausalDistillConfig))
        typer.echo(f"exported the generator's EMA weights to {dit}")
        run, names = dit.parent, (dit.name,)
    else:
        from lvstudio.train.diffusion_forcing import DFConfig, export_checkpoint
        from lvstudio.train.streaming import StreamConfig

        run = export_checkpoint(load_config(config, StreamConfig if recipe == "streaming" else DFConfig))
        typer.echo(f"exported EMA weights into {run}")
        names = ("dit.safetensors", "text.safetensors")
    if to is not None:
        for path in ship_weights(run, to, storage, names):  # type: ignore[arg-type]  # checked against STORAGES
            typer.echo(f"  -> {path}")


@train_app.command("vae")
def train_vae_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="VAE training config.")],
) -> None:
    """Train the tiny causal VAE on the procedural world (resumes from out_dir)."""
    from lvstudio.train.vae_config import run_vae_config

    with training_guard(f"lvstudio train vae {config}", config, None):
        summary = run_vae_config(config)
    typer.echo(summary)


@train_app.command("vae-decoder")
def train_vae_decoder_cmd(
    config: Annotated[Path, typer.Argument(
        metavar="CONFIG.toml", help="Decoder-tuning config (see presets/tiny/train_vae_decoder.toml).")],
    no_progress: Annotated[bool, _NO_PROGRESS] = False,
) -> None:
    """Tune a VAE's decoder to draw frames from the DiT's last-step estimates; encoder and latents stay (resumes
    from out_dir)."""
    _train(config, "vae_decoder", "VaeDecoderConfig", "train_vae_decoder", not no_progress)


@eval_app.command("adherence")
def eval_adherence_cmd(
    preset: Annotated[str, typer.Option(help="Preset name or path to a preset.toml.")] = "tiny",
    prompts: Annotated[int, typer.Option(help="Number of prompts sampled from the world grammar.")] = 100,
    seconds: Annotated[float, typer.Option(help="Seconds rendered per prompt.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample and the renders.", callback=check_seed)] = 0,
    backend: Annotated[str, typer.Option(help="Backend to evaluate: " + " | ".join(BACKENDS) + ".")] = DEFAULT_BACKEND,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default).", callback=check_threads)] = 1,
) -> None:
    """Oracle prompt adherence (scene, object colour, shape) of generated video."""
    import torch

    from lvstudio.presets import load_bundle

    if threads > 0:
        torch.set_num_threads(threads)
    from lvstudio.eval.adherence import check_run, evaluate_adherence

    if backend not in BACKENDS:
        raise LvError(f"--backend {backend!r} is not a backend", hint=f"choose one of: {', '.join(BACKENDS)}")
    bundle = load_bundle(preset)
    try:
        check_run(prompts, seconds, bundle.preset.fps)
    except ValueError as err:
        raise LvError(str(err)) from None
    report = evaluate_adherence(bundle, prompts, seconds, seed, backend)
    typer.echo("\n".join(report.lines()))


@eval_app.command("transitions")
def eval_transitions_cmd(
    preset: Annotated[str, typer.Option(help="Preset name or path to a preset.toml (a world preset).")] = "tiny",
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", help="Backend to evaluate, repeatable (default: every registered backend).")] = None,
    prompts: Annotated[int, typer.Option(help="Shots (unrelated prompts) in the cut and switch storyboards.")] = 12,
    seconds: Annotated[float, typer.Option(help="Seconds per shot.")] = 2.0,
    identity_shots: Annotated[int, typer.Option(help="Shots naming {hero} (identities across cuts).")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample and of every render.", callback=check_seed)] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the reports as JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default).", callback=check_threads)] = 1,
) -> None:
    """Cut, switch and blend on the procedural world: a cut's shot against from scratch, a switch's continuity and
    response, identities across cuts, the latency and the decoder restart at a cut."""
    import torch

    from lvstudio.eval.transitions import TransitionsConfig, evaluate_backend, save_reports
    from lvstudio.presets import load_bundle

    chosen = backend or list(BACKENDS)
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        raise LvError(f"unknown backend {unknown[0]!r}", hint=f"use one of: {', '.join(BACKENDS)}")
    try:
        cfg = TransitionsConfig(prompts, seconds, identity_shots, seed)
    except ValueError as err:
        raise LvError(str(err)) from None
    check_new_file(json_out, "--json", ".json", force=force)
    if threads > 0:
        torch.set_num_threads(threads)
    bundle = load_bundle(preset)
    if not bundle.preset.is_world:
        raise LvError(f"preset {bundle.preset.name!r} was not trained on the procedural world: the oracle cannot "
                      "read its frames", hint="use a world preset such as tiny")
    try:
        cfg.check_blocks(bundle.preset.attention.block_frames, bundle.preset.fps)
    except ValueError as err:
        raise LvError(str(err)) from None
    reports = []
    for name in chosen:
        reports.append(evaluate_backend(bundle, name, cfg, log=lambda m: typer.echo(m, err=True)))
        typer.echo("\n".join(reports[-1].lines()))
    if json_out is not None:
        typer.echo(f"wrote {save_reports(reports, json_out)}")


@eval_app.command("vae")
def eval_vae_cmd(
    vae: Annotated[Path, typer.Argument(metavar="VAE.safetensors", help="A tiny VAE file.")],
    clips: Annotated[int, typer.Option(help="Held-out world clips (seeds 20000 on).")] = 60,
    frames: Annotated[int, typer.Option(help="Frames per clip (1 + 4k).")] = 17,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default).", callback=check_threads)] = 1,
) -> None:
    """What the VAE keeps: world clips through encode -> decode, read back by the oracle; PSNR; decode time."""
    import torch

    from lvstudio.eval.vae_readback import vae_readback

    if threads:
        torch.set_num_threads(threads)
    if not vae.is_file():
        raise LvError(f"{vae}: no such file", hint="pass a tiny VAE file, e.g. presets/tiny/vae.safetensors")
    from lvstudio.presets.load import ROLE_NAMES, file_holds

    holds, evidence = file_holds(vae)
    if vae.suffix.lower() != ".safetensors" or holds not in (None, "vae"):
        what = f"holds a {ROLE_NAMES[holds]}'s weights ({evidence})" if holds else "is not a safetensors weight file"
        raise LvError(f"{vae} {what}, not a VAE's", hint="pass a tiny VAE file, e.g. presets/tiny/vae.safetensors")
    try:
        result = vae_readback(vae, clips=clips, frames=frames)
    except ValueError as err:
        raise LvError(f"{vae}: {err}") from None
    for line in result.lines():
        typer.echo(line)


@eval_app.command("denoise")
def eval_denoise_cmd(
    preset: Annotated[str, typer.Option(help="Preset name or path to a preset.toml (a world preset).")] = "tiny",
    clips: Annotated[int, typer.Option(help="Held-out world clips (seeds 20000 on, one caption each).")] = 40,
    sigmas: Annotated[str, typer.Option(help="Noise levels in (0, 1], comma-separated (0, the VAE alone, is always "
                                             "shown).")] = "0.3,0.5,0.7,0.8,0.9",
    seed: Annotated[int, typer.Option(help="Seed of the noise and of the swapped words.", callback=check_seed)] = 0,
    cfg_scale: Annotated[float | None, typer.Option(
        help="Classifier-free guidance (default: the preset's sampler's).")] = None,
    upright: Annotated[bool, typer.Option("--upright", help="Held-out clips' objects start upright (as a DiT "
                                                            "trained with upright_objects = true saw them).")] = False,
    centred: Annotated[bool, typer.Option("--centred", help="... and near the centre (centred_objects = true).")
                       ] = False,
    grid: Annotated[int, typer.Option(help="... and at the centre of a cell of this many px (object_grid; 0 = off).")
                    ] = 0,
    slots: Annotated[bool, typer.Option("--slots", help="... and at fixed places (object_slots = true).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default).", callback=check_threads)] = 1,
) -> None:
    """What the DiT knows at each noise level: world clips noised to sigma, denoised in one step under the true
    caption and under captions with one word swapped (colour, shape, scene), read by the oracle."""
    from lvstudio.eval.denoise_probe import DenoiseConfig, parse_sigmas

    try:
        from lvstudio.world import Pose

        pose = Pose(upright=upright, centred=centred, grid=grid, slots=slots)
        cfg = DenoiseConfig(clips, parse_sigmas(sigmas), seed, cfg_scale, pose)
    except ValueError as err:
        raise LvError(str(err)) from None
    check_new_file(json_out, "--json", ".json", force=force)
    import torch

    from lvstudio.eval.denoise_probe import check_preset, evaluate_denoise
    from lvstudio.presets import load_bundle

    if threads > 0:
        torch.set_num_threads(threads)
    bundle = load_bundle(preset)
    try:
        check_preset(bundle.preset)
    except ValueError as err:
        raise LvError(str(err)) from None
    report = evaluate_denoise(bundle, cfg, on_clip=lambda i, c: typer.echo(f"  clip {i + 1}/{clips}: {c}", err=True))
    typer.echo("\n".join(report.lines()))
    if json_out is not None:
        typer.echo(f"wrote {report.save(json_out)}")


@eval_app.command("drift")
def eval_drift_cmd(
    minutes: Annotated[float, typer.Option(help="Minutes of video per variant.")] = 5.0,
    window: Annotated[float, typer.Option(help="Seconds of video per measured window.")] = 10.0,
    variant: Annotated[list[str] | None, typer.Option(
        "--variant", help="NAME=PRESET:BACKEND[:lora=off|on|PATH], repeatable (default: base, crossclip)."
    )] = None,
    prompts: Annotated[int, typer.Option(help="Distinct prompts in the cycle.")] = 8,
    seconds_per_prompt: Annotated[float, typer.Option(help="Seconds each prompt is held.")] = 15.0,
    seed: Annotated[int, typer.Option(help="Seed of the storyboard and of every render.", callback=check_seed)] = 0,
    transition: Annotated[str, typer.Option(
        help="switch: one long shot whose prompt changes; cut: every prompt a new shot.")] = "switch",
    out: Annotated[Path, typer.Option(
        help="The PNG plot (its data goes next to it as .json).")] = Path("docs/drift.png"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing plot (and its .json).")] = False,
    json_dir: Annotated[Path, typer.Option(help="Folder for one JSON report per variant.")] = Path("runs/drift"),
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default).", callback=check_threads)] = 1,
    replot: Annotated[list[Path] | None, typer.Option(
        "--replot", help="Redraw the plot from these JSON reports instead of rendering (repeatable)."
    )] = None,
) -> None:
    """Long-horizon drift: adherence and image statistics per window over a long cycled storyboard, per variant."""
    from lvstudio.eval.drift import (
        DEFAULT_VARIANTS,
        DriftConfig,
        check_variant,
        evaluate_drift,
        load_reports,
        parse_variant,
        plot_drift,
        summary_lines,
        variant_problem,
    )

    check_new_file(out, "--out", ".png", force=force)
    check_new_file(out.with_suffix(".json"), "--out", ".json", force=force)  # the plot's data, next to it
    if replot:
        reports = [r for path in replot for r in load_reports(path)]
    else:
        try:
            cfg = DriftConfig(minutes, window, prompts, seconds_per_prompt, seed, threads, transition)
        except ValueError as err:
            raise LvError(str(err)) from None
        chosen = []
        for text in variant or DEFAULT_VARIANTS:
            v = parse_variant(text)
            if variant:
                check_variant(v)
            elif (problem := variant_problem(v)) is not None:
                typer.echo(f"skipping variant {v.name} ({v.text}): {problem}", err=True)
                continue
            chosen.append(v)
        if not chosen:
            raise LvError("no variant can run", hint="pass --variant NAME=PRESET:BACKEND, e.g. base=tiny:causal-kv")
        if len({v.name for v in chosen}) != len(chosen):
            raise LvError("variant names must be unique", hint="give each --variant its own NAME=")
        reports = []
        for v in chosen:
            typer.echo(f"{v.name}: rendering {minutes:g} min with {v.text}", err=True)

            def show(row: dict, name: str = v.name) -> None:
                typer.echo(f"  {name} {row['start_s']:6.0f}-{row['end_s']:4.0f} s  scene {row['scene']:.2f} "
                           f"colour {row['colour']:.2f} shape {row['shape']:.2f}  contrast {row['contrast']:.3f} "
                           f"sat {row['saturation']:.3f} sharp {row['sharpness']:.0f} "
                           f"hist {row['hist_distance']:.3f}", err=True)

            report = evaluate_drift(v, cfg, on_window=show)
            typer.echo(f"  -> {report.save(json_dir / f'{v.name}.json')}", err=True)
            reports.append(report)
    typer.echo("\n".join(summary_lines(reports)))
    typer.echo(f"wrote {plot_drift(reports, out)} (+ {out.with_suffix('.json')})")


def main() -> None:
    """Console entry point (`lvstudio`)."""
    try:
        app(prog_name="lvstudio")
    except LvError as err:  # raised outside a command, e.g. in a callback
        _say(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        _say("interrupted")
        sys.exit(getattr(err, "exit_code", EXIT_INTERRUPTED))


if __name__ == "__main__":
    main()
