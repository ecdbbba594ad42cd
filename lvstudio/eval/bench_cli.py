"""`lvstudio bench ...`: the speed and memory benchmarks' commands (a typer group the root CLI adds).

Each command imports its benchmark lazily, so `lvstudio --help` stays instant.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from lvstudio.backends.registry import BACKENDS
from lvstudio.cli_options import check_threads
from lvstudio.errors import LvError

bench_app = typer.Typer(help="Speed and memory benchmarks.", no_args_is_help=True)


@bench_app.command("model")
def bench_model_cmd(
    threads: Annotated[int, typer.Option(min=1, help="torch threads.", callback=check_threads)] = 2,
) -> None:
    """KV cache vs recompute, and per-block cost at block 10 vs 200 with a rolling window."""
    from lvstudio.eval.bench_model import run_model_bench

    typer.echo("\n".join(run_model_bench(threads=threads).lines()))


@bench_app.command("train")
def bench_train_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="A diffusion-forcing config (its model, batch "
                                           "and VAE's latent shape).")],
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per precision.")] = 6,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.", callback=check_threads)] = 1,
) -> None:
    """A diffusion-forcing step (forward, backward, AdamW) in float32 vs bfloat16 (`precision`), side by side."""
    from lvstudio.eval.bench_train import run_train_bench
    from lvstudio.train.common import check_inputs, load_config
    from lvstudio.train.diffusion_forcing import DFConfig

    cfg = load_config(config, DFConfig)
    check_inputs(cfg, ("vae", "init_dit", "init_text"))  # a missing file named by its key, as `train` names it
    typer.echo("\n".join(run_train_bench(cfg, str(config), steps=steps, threads=threads).lines()))


@bench_app.command("render")
def bench_render_cmd(
    preset: Annotated[list[str] | None, typer.Option(
        help="Preset name or path to a preset.toml (repeat to compare presets, e.g. tiny and an older tiny's "
             "preset.toml).")] = None,
    minutes: Annotated[float, typer.Option(help="Minutes of video to render.")] = 10.0,
    threads: Annotated[int, typer.Option(help="torch threads.", callback=check_threads)] = 1,
    backend: Annotated[list[str] | None, typer.Option(
        help="Backend(s) to measure (repeat the option); default: the preset's.")] = None,
    batch: Annotated[int, typer.Option(
        min=0, help="Instead: a batch of this many storyboards (the longest --minutes long), aggregate video-s per "
                    "wall-s under each --procs.")] = 0,
    procs: Annotated[list[int] | None, typer.Option(
        help="Process counts for --batch (repeat the option; default 1 and 2; more than 1 runs under torchrun).")
    ] = None,
) -> None:
    """Real-time factor with decode + H.264, first frame, chunk time and memory at minute 1 vs the end, re-cache stall.

    Every preset x backend combination runs one after the other in this process; with several, the ratios against
    the first are printed. With --batch: the same batch rendered by 1 and 2 (--procs) processes, side by side."""
    if not (math.isfinite(minutes) and minutes > 0):
        raise LvError(f"--minutes must be a positive number, got {minutes:g}", hint="e.g. --minutes 0.25")
    if threads < 1:
        raise LvError(f"--threads must be at least 1, got {threads}")
    if batch > 0:
        from lvstudio.eval.bench_batch import batch_bench_lines, run_batch_bench

        name = (preset or ["tiny"])[0]
        counts = tuple(procs or [1, 2])
        if min(counts) < 1:
            raise LvError("--procs must be at least 1")
        results = run_batch_bench(name, batch, minutes, counts, threads)
        typer.echo("\n".join(batch_bench_lines(results, batch, minutes, name, threads)))
        return
    from lvstudio.eval.bench_render import comparison_lines, run_render_bench

    for name in backend or []:
        if name not in BACKENDS:
            raise LvError(f"--backend {name!r} is not a backend", hint=f"choose one of: {', '.join(BACKENDS)}")
    results, sources = [], []
    for p in preset or ["tiny"]:
        for name in backend or [None]:
            results.append(run_render_bench(p, minutes, threads, backend=name))
            sources.append(p)
            typer.echo("\n".join(results[-1].lines()))
    if len(results) > 1:
        # Two presets of one name (tiny and an older tiny's preset.toml): label each by what was asked for.
        if len({r.preset for r in results}) < len(set(sources)):
            results = [replace(r, preset=_source_label(src))
                       for r, src in zip(results, sources, strict=True)]
        typer.echo("\n".join(comparison_lines(results)))


def _source_label(source: str) -> str:
    """A --preset as given: a name as it is, a preset.toml by its folder's name."""
    path = Path(source)
    return path.parent.name if path.suffix == ".toml" else source
