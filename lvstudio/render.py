"""`lvstudio render`: storyboard -> RenderSession -> H.264 mp4 + manifest + contact sheet, resumable.

Outputs for `--out out/demo.mp4`:
    out/demo.mp4                 the video (written to .demo.mp4.partial.mp4 and renamed into place when complete)
    out/demo.manifest.json       storyboard hash, preset, seed, per-shot frame ranges, timings, caches, adherence
    out/demo.contact.png         one thumbnail per shot and per N seconds
    out/demo.job/                while rendering: job.json, per-chunk latents, snapshots (lvstudio.job_folder);
                                 deleted after success, kept after a stop signal or an I/O error for --resume

Failures: bad input raises LvError (exit 2); a disk that refuses a read or write raises IOFailure (exit 74) saying
what is kept and the resume command; SIGINT, SIGTERM and SIGHUP finish the chunk in flight, keep the job and return an
interrupted outcome (exit 128 + the signal number); a second signal stops at once (the job stays resumable).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lvstudio.cli_options import check_folders_above
from lvstudio.errors import Interrupted, IOFailure, LvError, OutputExistsError
from lvstudio.job_folder import JobFolder, JobIdentity, preset_fingerprint, preset_reference
from lvstudio.stop_signals import StopNow, StopRequest

if TYPE_CHECKING:
    from lvstudio.backends.base import Chunk
    from lvstudio.session import RenderSession
    from lvstudio.video import ContactFrames, VideoSink

EXIT_INTERRUPTED = 130  # SIGINT; SIGTERM gives 143, SIGHUP 129 (128 + the signal number)


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
    extend: Path | None = None  # a video to continue (SkyReels-V2 DF presets): the output is it + the new frames


@dataclass
class RenderOutcome:
    video: Path | None
    manifest: Path | None
    contact_sheet: Path | None
    interrupted: bool
    resume_command: str | None
    stats: dict[str, Any]
    exit_code: int = 0  # 128 + the signal number when interrupted


OUT_ELSEWHERE = "write somewhere else (--out)"  # how a render that a disk refused can go elsewhere


def default_out(story: Path) -> Path:
    return Path("out") / f"{story.stem}.mp4"


def output_path(story: Path, out: Path | None) -> Path:
    """Where a render goes: --out as given, `<folder>/<story>.mp4` when --out is a folder that exists, else
    out/<story>.mp4. LvError for a name that is not an .mp4 (the file is H.264 in an MP4 container)."""
    if out is None:
        return default_out(story)
    if out.is_dir():
        return out / f"{story.stem}.mp4"
    if out.suffix.lower() != ".mp4":  # (an empty --out is ".", a folder)
        raise LvError(f"--out {str(out)!r}: lvstudio writes H.264 in an MP4 container, so the output is an .mp4 file",
                      hint=f"name it {out.with_suffix('.mp4')}, or give a folder that exists for <story>.mp4")
    check_folders_above(out, "--out")
    return out


def render(req: RenderRequest, echo: Callable[[str], None] = print) -> RenderOutcome:
    """Render a storyboard (see module docstring). Raises LvError for user problems, IOFailure (exit 74) when the
    machine refuses a read or write, and returns an interrupted outcome when a stop signal came (SIGINT, SIGTERM,
    SIGHUP: the chunk in flight is finished, the job kept); a second signal raises StopNow."""
    import torch

    from lvstudio.stop_signals import graceful_stop

    holder: dict[str, RenderSession] = {}

    def on_first(signum: int) -> None:  # noqa: ARG001 - the session stops after its chunk in flight
        if "session" in holder:
            holder["session"].stop()

    with graceful_stop(on_first, what="the chunk in flight") as stop, torch.no_grad():
        return _render(req, echo, holder, stop)


def _render(req: RenderRequest, echo: Callable[[str], None], holder: dict[str, RenderSession],
            stop: StopRequest) -> RenderOutcome:
    import torch

    from lvstudio.io_errors import translated_io
    from lvstudio.presets.load import load_bundle
    from lvstudio.session import RenderSession, resolve_settings, storyboard_hash
    from lvstudio.storyboard import load_storyboard
    from lvstudio.video import ContactFrames, VideoSink

    sb = load_storyboard(req.story)
    out = output_path(req.story, req.out)
    job = JobFolder(out.with_name(out.stem + ".job"))
    resume_cmd = f"lvstudio render {req.story} --out {out} --resume"
    # Step 1: refuse to clobber anything, or to resume another job, before any work (a resume keeps the job's
    # settings unless the command gives others, which are then refused).
    saved = _check_outputs(req, out, job)
    preset, settings = resolve_settings(sb, **_overrides(req, saved))
    tail = None
    if req.extend is not None:
        tail, settings.extend = _previous_video(req.extend, preset.skyreels, settings.fps, settings.width,
                                                settings.height)
        resume_cmd = resume_cmd.replace(" --resume", f" --extend {req.extend} --resume")
    if saved is not None:
        job.check_identity(JobIdentity(storyboard_hash(sb), dict(settings.__dict__), preset_fingerprint(preset)))
    if req.threads > 0:
        torch.set_num_threads(req.threads)
    bundle = load_bundle(preset, req.device)  # a preset or --device that cannot load refuses before any folder is made
    with translated_io("creating the output folder", path=out.parent, elsewhere=OUT_ELSEWHERE):
        out.parent.mkdir(parents=True, exist_ok=True)
    session = RenderSession(sb, bundle, settings, job_dir=job.root, extend=tail)
    holder["session"] = session
    sink = VideoSink(out, settings.fps, settings.width, settings.height, force=True)
    thumbs = ContactFrames(settings.fps, req.contact_every_s)
    thumbs.want((r["frame_start"] + r["frame_end"]) // 2 for r in session.shot_ranges())
    if stop.requested:  # a signal came while the models loaded
        session.stop()
    for note in session.bundle.notes:  # what loading chose (GPU placement of a 14B model)
        echo(note)
    if not stop.requested and (estimate := session.estimate()) is not None:
        echo(estimate)
    try:
        if req.extend is not None:  # the output starts with the video it continues (decoded again, frame by frame)
            from lvstudio.video import iter_video_frames

            for frame in iter_video_frames(req.extend, settings.width, settings.height):
                sink.write(frame)
        _start_or_resume(req, session, sink, thumbs, resume_cmd, echo)
        # Step 3: run with a progress bar; a stop signal finishes the current chunk and keeps the job folder.
        if req.progress:
            _run_with_progress(session, str(req.story))
        else:
            session.run()
        if stop.requested and not session.done:  # run() saved a snapshot after the last chunk
            sink.abort()
            echo(f"{stop.name}: stopped at frame {session.frames_done}; the job is kept in {job.root}. "
                 f"Continue with:\n  {resume_cmd}")
            return RenderOutcome(None, None, None, True, resume_cmd, {}, stop.exit_code)
        # Step 4: the manifest and contact sheet of the finished video, then the video under its name (so it only
        # appears once everything else is written), then the job folder goes.
        finished = sink.finish()
        manifest, sheet, data = _write_side_files(session, req.story, out, finished, thumbs)
        video = sink.commit()
    except StopNow as now:
        sink.abort()
        raise _stopped_at_once(now, job, resume_cmd) from None
    except Exception as err:
        sink.abort()
        failure = _failure(err, job, resume_cmd)
        if failure is err:
            raise
        raise failure from err
    if not req.keep_job:
        job.remove()
    return RenderOutcome(video, manifest, sheet, False, None, data["timings"])


def _previous_video(path: Path, skyreels: Any, fps: int, width: int, height: int) -> tuple[Any, str]:
    """`--extend`: the last `overlap_history` frames of `path` as a tensor [1, 3, F, H, W] in [-1, 1] (resized to the
    render's size) and the video's identity for the job folder. LvError for a preset without the DF mode, a video at
    another frame rate or one too short."""
    import hashlib
    from collections import deque

    import numpy as np
    import torch

    from lvstudio.io_errors import translated_io
    from lvstudio.video import iter_video_frames, probe_video

    if skyreels is None:
        raise LvError("--extend continues a video with a SkyReels-V2 Diffusion Forcing preset; this preset has none",
                      hint='use preset = "skyreels-v2-df-1.3b-540p" (or a preset with a [skyreels] table)')
    frames = iter_video_frames(path, width, height)  # checks the file first
    info = probe_video(path)
    if round(info.fps) != fps:
        raise LvError(f"{path} runs at {info.fps:g} fps, this render at {fps} fps",
                      hint=f"set fps = {round(info.fps)} in the storyboard so the continuation keeps the video's pace")
    need = skyreels.overlap_history
    tail = deque(frames, maxlen=need)  # [H, W, 3] uint8 each
    if len(tail) < need:
        raise LvError(f"{path} has {len(tail)} frames; --extend needs at least overlap_history = {need}",
                      hint="extend a longer video")
    digest = hashlib.sha256()
    with translated_io("reading the video to extend", path=path), open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    x = torch.from_numpy(np.stack(tail)).float().div(127.5).sub(1)  # [F, H, W, 3]
    return x.permute(3, 0, 1, 2)[None], f"{path.name} sha256:{digest.hexdigest()}"


def _overrides(req: RenderRequest, saved: dict[str, Any] | None) -> dict[str, Any]:
    """resolve_settings() keywords: the command's options, and on a resume the job's for those not given."""
    ask = {"preset": req.preset, "backend": req.backend, "seed": req.seed, "duration": req.duration}
    if saved is None:
        return ask
    old = saved.get("settings") or {}
    defaults = {"preset": saved.get("preset_ref") or old.get("preset"), "backend": old.get("backend"),
                "seed": old.get("seed"),
                "duration": old["num_frames"] / old["fps"] if old.get("num_frames") and old.get("fps") else None}
    return {k: v if v is not None else defaults[k] for k, v in ask.items()}


def _start_or_resume(req: RenderRequest, session: RenderSession, sink: VideoSink, thumbs: ContactFrames,
                     resume_cmd: str, echo: Callable[[str], None]) -> None:
    """Step 2: a new job folder, or the checked one of an interrupted render with its frames re-made."""

    def write(frames: np.ndarray, start: int) -> None:  # frames [n, H, W, 3] uint8
        sink.write(frames)
        thumbs.offer(frames, start)

    if req.resume:
        start = 0
        for f in session.resume(echo):
            write(f, start)
            start += f.shape[0]
        echo(f"resuming {sink.path} at frame {session.frames_done} of {session.settings.num_frames}")
    else:
        try:
            session.write_job_info(preset_ref=preset_reference(req.preset or session.storyboard.preset),
                                   resume=resume_cmd, force=req.force)
        except BaseException:
            if session.job is not None and not session.job.info_path.exists():
                session.job.remove()  # nothing to resume from: leave no empty job folder behind
            raise
    session.add_sink(lambda c: write(c.frames, c.frame_start))


def _stopped_at_once(now: StopNow, job: JobFolder, resume_cmd: str) -> LvError:
    """The error of a second stop signal: what is kept and how to continue."""
    if job.info_path.exists():
        text = f"{now.args[0]} again: stopped at once; the job is kept in {job.root}. Continue with:\n  {resume_cmd}"
    else:
        text = f"{now.args[0]} again: stopped at once, before the first chunk; nothing to resume"
    return Interrupted(text, exit_code=now.exit_code)


def _failure(err: Exception, job: JobFolder, resume_cmd: str) -> Exception:
    """An error in the middle of a render: I/O errors become an IOFailure that says what is kept and how to go on;
    anything else is returned unchanged. (No snapshot is written here: the chunk in flight may be half saved, and
    `--resume` finds the newest consistent point by itself.)"""
    from lvstudio.io_errors import io_failure, is_io_error

    if isinstance(err, LvError) and not isinstance(err, IOFailure) or not is_io_error(err):
        return err
    resumable = job.info_path.exists()
    path = getattr(err, "path", None) or getattr(err, "filename", None)
    action = "rendering"
    if path is not None and Path(path).is_relative_to(job.root):
        action = "saving the render's progress to"
    elif path is not None and Path(path).name.endswith(".partial.mp4"):
        action, path = "writing the video", Path(path).with_name(Path(path).name[1:-len(".partial.mp4")])
    kept = f"The job is kept in {job.root}." if resumable else "Nothing was kept."
    return io_failure(err, action=action, path=path, resume=resume_cmd if resumable else None, kept=kept,
                      elsewhere=OUT_ELSEWHERE)


def _check_outputs(req: RenderRequest, out: Path, job: JobFolder) -> dict[str, Any] | None:
    """Refuse to overwrite an output or drop an interrupted job unless asked; on a resume, return job.json."""
    if out.exists() and not req.force and not req.resume:
        raise OutputExistsError(out)
    if req.resume:
        info = job.read_info()
        if out.exists() and not req.force and not info.get("force"):
            raise OutputExistsError(out, f"{out} exists (it appeared after this render started)",
                                    hint="move it away, or resume with --force to replace it")
        return info
    if job.exists():
        if not req.force:
            raise LvError(f"an interrupted render of this output exists in {job.root}",
                          hint="continue it with --resume, or start over with --force")
        job.remove()
    return None


def _write_side_files(session: RenderSession, story: Path, out: Path, finished: Path,
                      thumbs: ContactFrames) -> tuple[Path, Path, dict[str, Any]]:
    """`<out>.manifest.json` and `<out>.contact.png` of a render whose video is finished at `finished` (and goes to
    `out`); returns their paths and the manifest."""
    from lvstudio.atomic import atomic_write_text
    from lvstudio.session import build_manifest
    from lvstudio.video import write_contact_sheet

    manifest = out.with_name(out.stem + ".manifest.json")
    sheet = out.with_name(out.stem + ".contact.png")
    data = build_manifest(session, story, out, probe=finished)
    atomic_write_text(manifest, json.dumps(data, indent=2))
    write_contact_sheet(sheet, thumbs.items(session.shot_ranges()))
    return manifest, sheet, data


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
