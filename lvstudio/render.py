"""`lvstudio render`: storyboard -> RenderSession -> H.264 mp4 + manifest + contact sheet, resumable.

Outputs for `--out out/demo.mp4`:
    out/demo.mp4                 the video (written to .demo.mp4.partial.mp4 and renamed into place when complete)
    out/demo.manifest.json       storyboard hash, preset, seed, per-shot frame ranges, timings, caches, adherence
    out/demo.contact.png         one thumbnail per shot and per N seconds
    out/demo.job/                while rendering: per-chunk latents + snapshots (deleted after success)
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lvstudio.errors import LvError, OutputExistsError

if TYPE_CHECKING:
    from lvstudio.backends.base import Chunk
    from lvstudio.session import RenderSession
    from lvstudio.storyboard import Storyboard
    from lvstudio.video import ContactFrames

EXIT_INTERRUPTED = 130


@dataclass
class RenderRequest:
    story: Path
    out: Path | None = None
    preset: str | None = None
    backend: str | None = None
    seed: int | None = None
    duration: float | None = None
    resume: bool = False
    force: bool = False
    progress: bool = True
    keep_job: bool = False  # keep the job folder (per-chunk latents) after success
    device: str | None = None  # None: $LVSTUDIO_DEVICE or cpu
    threads: int = 1  # torch CPU threads (1 avoids OpenMP oversubscription; 0 = torch default)
    contact_every_s: float = 4.0


@dataclass
class RenderOutcome:
    video: Path | None
    manifest: Path | None
    contact_sheet: Path | None
    interrupted: bool
    resume_command: str | None
    stats: dict[str, Any]


def default_out(story: Path) -> Path:
    return Path("out") / f"{story.stem}.mp4"


def render(req: RenderRequest, echo: Callable[[str], None] = print) -> RenderOutcome:
    """Render a storyboard (see module docstring). Raises LvError for user problems."""
    import torch

    from lvstudio.presets.load import load_bundle
    from lvstudio.session import RenderSession, resolve_settings
    from lvstudio.storyboard import load_storyboard
    from lvstudio.video import ContactFrames, VideoSink

    sb = load_storyboard(req.story)
    out = req.out or default_out(req.story)
    job_dir = out.with_name(out.stem + ".job")
    # Step 1: refuse to clobber anything before any work.
    _check_outputs(req, sb, out, job_dir)
    preset, settings = resolve_settings(sb, preset=req.preset, backend=req.backend, seed=req.seed,
                                        duration=req.duration)
    if req.resume:
        saved = json.loads((job_dir / "job.json").read_text())["settings"]
        if saved != settings.__dict__:
            raise LvError(f"the options differ from the interrupted render ({saved})",
                          hint="resume with the same --preset/--backend/--seed/--duration, or start over with --force")
    torch.set_grad_enabled(False)
    if req.threads > 0:
        torch.set_num_threads(req.threads)
    session = RenderSession(sb, load_bundle(preset, req.device), settings, job_dir=job_dir)
    sink = VideoSink(out, settings.fps, settings.width, settings.height, force=True)
    thumbs = ContactFrames(settings.fps, req.contact_every_s)
    thumbs.want((r["frame_start"] + r["frame_end"]) // 2 for r in session.shot_ranges())

    def write(frames: np.ndarray, start: int) -> None:  # frames [n, H, W, 3] uint8
        sink.write(frames)
        thumbs.offer(frames, start)

    # Step 2: start or resume.
    if req.resume:
        start = 0
        for f in session.resume():
            write(f, start)
            start += f.shape[0]
        echo(f"resuming {out} at frame {session.frames_done} of {settings.num_frames}")
    else:
        session.write_job_info()
    session.add_sink(lambda c: write(c.frames, c.frame_start))
    # Step 3: run with a progress bar; Ctrl-C finishes the current chunk, keeps the job folder, exits 130.
    interrupted = _run_with_interrupt(session, req.progress, str(req.story))
    resume_cmd = f"lvstudio render {req.story} --out {out} --resume"
    if interrupted:
        session.write_snapshot()
        sink.abort()
        echo(f"interrupted at frame {session.frames_done}; the job is kept in {job_dir}. "
             f"Continue with:\n  {resume_cmd}")
        return RenderOutcome(None, None, None, True, resume_cmd, {})
    # Step 4: the video, manifest and contact sheet, then the job folder goes.
    video = sink.close()
    manifest, sheet, data = _write_side_files(session, req.story, out, video, thumbs)
    if not req.keep_job:
        _remove_job(job_dir)
    return RenderOutcome(video, manifest, sheet, False, None, data["timings"])


def _check_outputs(req: RenderRequest, sb: Storyboard, out: Path, job_dir: Path) -> None:
    """Refuse to overwrite an output or drop an interrupted job unless asked; a resume needs its unchanged job."""
    from lvstudio.session import storyboard_hash

    if out.exists() and not req.force and not req.resume:
        raise OutputExistsError(out)
    if req.resume:
        if not (job_dir / "snapshot.safetensors").exists():
            raise LvError(f"nothing to resume: {job_dir} has no snapshot", hint="run without --resume to start")
        info = json.loads((job_dir / "job.json").read_text())
        if info["storyboard_sha256"] != storyboard_hash(sb):
            raise LvError(f"{req.story} changed since the interrupted render in {job_dir}",
                          hint="undo the change, or start over with --force")
    elif job_dir.exists():
        if not req.force:
            raise LvError(f"an interrupted render of this output exists in {job_dir}",
                          hint="continue it with --resume, or start over with --force")
        _remove_job(job_dir)


def _write_side_files(session: RenderSession, story: Path, out: Path, video: Path,
                      thumbs: ContactFrames) -> tuple[Path, Path, dict[str, Any]]:
    """`<out>.manifest.json` and `<out>.contact.png` of a finished render; returns their paths and the manifest."""
    from lvstudio.atomic import atomic_write_text
    from lvstudio.session import build_manifest
    from lvstudio.video import write_contact_sheet

    manifest = out.with_name(out.stem + ".manifest.json")
    sheet = out.with_name(out.stem + ".contact.png")
    data = build_manifest(session, story, video)
    atomic_write_text(manifest, json.dumps(data, indent=2))
    write_contact_sheet(sheet, thumbs.items(session.shot_ranges()))
    return manifest, sheet, data


def _remove_job(job_dir: Path) -> None:
    import shutil

    if job_dir.exists():
        shutil.rmtree(job_dir)


def _run_with_interrupt(session: RenderSession, progress: bool, label: str) -> bool:
    """Run the session in this thread; SIGINT asks it to stop after the current chunk. Returns True if interrupted."""
    interrupted = {"flag": False}

    def on_sigint(signum: int, frame: object) -> None:  # noqa: ARG001 - the signal handler signature
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        session.stop()

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        if progress:
            _run_with_progress(session, label)
        else:
            session.run()
    finally:
        signal.signal(signal.SIGINT, old)
    return interrupted["flag"] and not session.done


def _run_with_progress(session: RenderSession, label: str) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = session.settings.num_frames
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[fps]:.1f} fps  x{task.fields[rt]:.2f} real time  shot {task.fields[shot]}"),
                  TimeRemainingColumn(), transient=False) as prog:
        task = prog.add_task(label, total=total, completed=session.frames_done, fps=0.0, rt=0.0, shot="-")
        t0, f0 = time.perf_counter(), session.frames_done

        def update(chunk: Chunk) -> None:
            done = chunk.frame_start + chunk.num_frames  # sinks run before the session counts the chunk
            rate = (done - f0) / max(time.perf_counter() - t0, 1e-9)
            ev = session.buffer.events[chunk.event_id]
            shot = f"{ev.shot + 1}" if ev.shot is not None else "live"
            prog.update(task, completed=done, fps=rate, rt=rate / session.settings.fps, shot=shot)

        session.add_sink(update)
        session.run()
