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
from typing import Any

import numpy as np

from lvstudio.errors import LvError, OutputExistsError
from lvstudio.storyboard import Storyboard

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


def resolve_settings(sb: Storyboard, req: RenderRequest):  # noqa: ANN201 - RenderSettings
    from lvstudio.presets import load_preset
    from lvstudio.session import RenderSettings

    preset = load_preset(req.preset or sb.preset)
    backend = req.backend or sb.backend or preset.backend
    width, height = sb.resolution or (preset.width, preset.height)
    if width % 16 or height % 16:
        raise LvError(f"resolution {width}x{height} is not a multiple of 16 (8x VAE x 2x2 patches)",
                      hint=f"use e.g. {width // 16 * 16}x{height // 16 * 16}")
    duration = req.duration if req.duration is not None else sb.duration
    if duration <= 0:
        raise LvError(f"--duration must be positive (got {duration})")
    num_frames = max(1, round(duration * sb.fps))
    seed = req.seed if req.seed is not None else sb.seed
    return preset, RenderSettings(preset.name, backend, seed, sb.fps, width, height, num_frames)


def render(req: RenderRequest, echo: Callable[[str], None] = print) -> RenderOutcome:
    """Render a storyboard (see module docstring). Raises LvError for user problems."""
    import torch

    from lvstudio.presets.load import load_bundle
    from lvstudio.session import RenderSession, storyboard_hash
    from lvstudio.storyboard import load_storyboard
    from lvstudio.video import VideoSink

    sb = load_storyboard(req.story)
    out = req.out or default_out(req.story)
    job_dir = out.with_name(out.stem + ".job")
    # Step 1: refuse to clobber anything before any work.
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
    preset, settings = resolve_settings(sb, req)
    if req.resume:
        saved = json.loads((job_dir / "job.json").read_text())["settings"]
        if saved != settings.__dict__:
            raise LvError(f"the options differ from the interrupted render ({saved})",
                          hint="resume with the same --preset/--backend/--seed/--duration, or start over with --force")
    torch.set_grad_enabled(False)
    if req.threads > 0:
        torch.set_num_threads(req.threads)
    bundle = load_bundle(preset, req.device)
    session = RenderSession(sb, bundle, settings, job_dir=job_dir)
    sink = VideoSink(out, settings.fps, settings.width, settings.height, force=True)
    mids = {(r["frame_start"] + r["frame_end"]) // 2 for r in session.shot_ranges()}
    thumbs = _Thumbnails(settings.fps, req.contact_every_s, mids)
    all_frames: list[np.ndarray] = []  # kept only for the oracle summary of short renders
    keep_frames = settings.num_frames <= 16 * 120

    def write(frames: np.ndarray, start: int) -> None:
        sink.write(frames)
        thumbs.offer(frames, start)
        if keep_frames:
            all_frames.append(frames)

    # Step 2: start or resume.
    if req.resume:
        done = session.resume()
        start = 0
        for f in done:
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
        echo(f"interrupted at frame {session.frames_done}; the job is kept in {job_dir}. Continue with:\n  {resume_cmd}")
        return RenderOutcome(None, None, None, True, resume_cmd, {})
    video = sink.close()
    # Step 4: manifest and contact sheet, then the job folder goes.
    manifest = out.with_name(out.stem + ".manifest.json")
    sheet = out.with_name(out.stem + ".contact.png")
    frames = np.concatenate(all_frames) if keep_frames and all_frames else None
    data = build_manifest(session, sb, req.story, video, frames)
    from lvstudio.atomic import atomic_write_text
    from lvstudio.video import write_contact_sheet

    atomic_write_text(manifest, json.dumps(data, indent=2))
    write_contact_sheet(sheet, thumbs.items(session))
    if not req.keep_job:
        _remove_job(job_dir)
    return RenderOutcome(video, manifest, sheet, False, None, data["timings"])


def _remove_job(job_dir: Path) -> None:
    import shutil

    if job_dir.exists():
        shutil.rmtree(job_dir)


def _run_with_interrupt(session, progress: bool, label: str) -> bool:  # noqa: ANN001
    """Run the session in this thread; SIGINT asks it to stop after the current chunk. Returns True if interrupted."""
    interrupted = {"flag": False}

    def on_sigint(signum, frame):  # noqa: ANN001, ARG001
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


def _run_with_progress(session, label: str) -> None:  # noqa: ANN001
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = session.settings.num_frames
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[fps]:.1f} fps  x{task.fields[rt]:.2f} real time  shot {task.fields[shot]}"),
                  TimeRemainingColumn(), transient=False) as prog:
        task = prog.add_task(label, total=total, completed=session.frames_done, fps=0.0, rt=0.0, shot="-")
        t0, f0 = time.perf_counter(), session.frames_done

        def update(chunk) -> None:  # noqa: ANN001
            done = chunk.frame_start + chunk.num_frames  # sinks run before the session counts the chunk
            rate = (done - f0) / max(time.perf_counter() - t0, 1e-9)
            ev = session.buffer.events[chunk.event_id]
            shot = f"{ev.shot + 1}" if ev.shot is not None else "live"
            prog.update(task, completed=done, fps=rate, rt=rate / session.settings.fps, shot=shot)

        session.add_sink(update)
        session.run()


class _Thumbnails:
    """Keeps one frame every N seconds and the first frame of every chunk index (to pick shot thumbnails)."""

    def __init__(self, fps: int, every_s: float, wanted: set[int] | None = None) -> None:
        self.fps = fps
        self.every = max(1, round(every_s * fps))
        self.wanted = wanted or set()  # e.g. the middle frame of every storyboard shot
        self.frames: dict[int, np.ndarray] = {}
        self.extra: dict[int, np.ndarray] = {}

    def offer(self, frames: np.ndarray, start: int) -> None:
        for i in range(frames.shape[0]):
            if (start + i) % self.every == 0:
                self.frames[start + i] = frames[i].copy()
            elif start + i in self.wanted:
                self.extra[start + i] = frames[i].copy()

    def items(self, session) -> list[tuple[str, np.ndarray]]:  # noqa: ANN001
        from lvstudio.storyboard import format_time

        out: list[tuple[str, np.ndarray]] = []
        pool = {**self.frames, **self.extra}
        keys = sorted(pool)
        for r in session.shot_ranges():
            mid = (r["frame_start"] + r["frame_end"]) // 2
            near = min(keys, key=lambda k: abs(k - mid)) if keys else None
            if near is not None:
                label = f"shot {r['shot'] + 1}" if r["shot"] is not None else "live"
                out.append((f"{label} {format_time(near / self.fps)}", pool[near]))
        keys = sorted(self.frames)
        out += [(format_time(k / self.fps), self.frames[k]) for k in keys]
        return out


def build_manifest(session, sb: Storyboard, story: Path, video: Path, frames: np.ndarray | None) -> dict[str, Any]:  # noqa: ANN001
    from lvstudio.session import storyboard_hash
    from lvstudio.video import probe_video

    st = session.stats
    s = session.settings
    shots = session.shot_ranges()
    if frames is not None and session.bundle.preset.text_encoder == "tiny":
        from lvstudio.eval.oracle import adherence
        from lvstudio.train.world import parse_caption

        for r in shots:
            clip = frames[r["frame_start"] : r["frame_end"]]
            if clip.shape[0]:
                r["oracle_adherence"] = {k: round(v, 3) for k, v in adherence(clip, parse_caption(r["resolved"])).items()}
    info = probe_video(video)
    chunk_s = st.chunk_seconds
    return {
        "format": "lvstudio.manifest/1",
        "storyboard": str(story),
        "storyboard_sha256": storyboard_hash(sb),
        "title": sb.title,
        "preset": s.preset,
        "backend": s.backend,
        "seed": s.seed,
        "fps": s.fps,
        "width": s.width,
        "height": s.height,
        "frames": info.num_frames,
        "video": {"path": str(video), "codec": info.codec, "pix_fmt": info.pix_fmt, "faststart": info.faststart},
        "shots": shots,
        "timings": {
            "chunks": st.chunks,
            "seconds_total": round(sum(chunk_s), 3),
            "seconds_per_chunk_mean": round(float(np.mean(chunk_s)), 4) if chunk_s else None,
            "first_frame_s": round(st.first_frame_s, 4) if st.first_frame_s is not None else None,
            "realtime_factor": round(st.realtime_factor(s.fps), 3),
            "recache_stall_ms": [round(x, 2) for x in st.recache_ms],
        },
        "caches": session.cache_summary(),
    }
