"""The web studio behind `lvstudio preview`: a gradio Blocks page over RenderSession.

One `WebStudio` per process holds the configuration, the loaded model bundles (loaded once, reused) and the render
slots (one render at a time by default; a second request gets a clear "busy" message instead of waiting). Each
browser tab has its own `TabState` in a `gr.State`: the job it is rendering, which the Stop and live-prompt handlers
reach. Nothing about sessions lives at module level.

A render is a generator: it steps the session one chunk at a time and yields, after every chunk, the chunk as a
short H.264 segment for the streaming video (lvstudio/web/stream.py; the first decoded frame goes out as an image
before the first segment), a status line, per-shot progress and the timeline (lvstudio/web/page.py); at the end the
finished mp4 (the segments joined) replaces the stream, with the contact sheet and the files to download. Stop sets
a flag that the loop checks between chunks, so generation ends within one chunk and what was made is finished into
a playable mp4. Outputs go to `<outputs>/<job id>/<job id>.*`; names never come from prompts.
"""

from __future__ import annotations

import html
import json
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lvstudio.errors import LvError, StoryboardError
from lvstudio.storyboard.schema import MAX_PROMPT_CHARS
from lvstudio.transitions import LIVE_CHOICES, LIVE_DEFAULT
from lvstudio.web.page import CSS, PAGE_JS, TRANSITION_KEY, timeline_html

if TYPE_CHECKING:
    import gradio as gr

    from lvstudio.backends.base import Chunk
    from lvstudio.presets.load import ModelBundle
    from lvstudio.session import RenderSession
    from lvstudio.storyboard import Storyboard
    from lvstudio.video import ContactFrames
    from lvstudio.web.stream import LiveVideo

log = logging.getLogger("lvstudio.web")

FROM_STORYBOARD = "(storyboard)"
MAX_LIVE_PROMPT_CHARS = MAX_PROMPT_CHARS  # a storyboard's: the rendered storyboard re-renders every prompt
BUSY_MESSAGE = ("Busy: another render is running in this studio ({n} at a time). "
                "Wait for it to finish (or stop it in its tab), then press Render again.")
FALLBACK_STORY = """title = "A red ball"
preset = "tiny"
fps = 16
duration = "8s"
seed = 7

[[shots]]
at = 0
prompt = "a red ball bouncing over the sea at dusk"

[[shots]]
at = "4s"
prompt = "a red ball resting on the snow"
"""


def demo_story_path() -> Path:
    """`storyboards/demo.toml` next to the package (a source checkout)."""
    return Path(__file__).resolve().parents[2] / "storyboards" / "demo.toml"


@dataclass(frozen=True)
class StudioConfig:
    """What the studio serves. `outputs` is the only folder the page may read files from."""

    outputs: Path
    story_text: str = FALLBACK_STORY
    story_name: str = "storyboard.toml"  # shown in validation messages (file:line:col)
    story_dir: Path | None = None  # relative image paths resolve here; images must lie inside it
    preset: str | None = None  # default of the preset picker (a name or a preset.toml path)
    max_renders: int = 1  # renders at once in this process
    min_chunk_seconds: float = 0.0  # pace the render (0 = as fast as possible; > 0 gives time to steer)
    contact_every_s: float = 4.0
    oracle_stride: int = 2  # the oracle reads every 2nd frame for the manifest's adherence scores (0 = off)

    def __post_init__(self) -> None:
        if self.max_renders < 1:
            raise ValueError(f"max_renders must be at least 1, got {self.max_renders}")
        if self.min_chunk_seconds < 0:
            raise ValueError(f"min_chunk_seconds must be >= 0, got {self.min_chunk_seconds}")


class RenderJob:
    """One render started from a tab: the session, its mp4 sink, and where its files go."""

    def __init__(self, job_id: str, folder: Path, session: RenderSession, story_file: Path, sink: LiveVideo,
                 contact: ContactFrames) -> None:
        self.job_id = job_id
        self.folder = folder
        self.session = session
        self.story_file = story_file
        self.sink = sink  # the live video's segments, joined into the mp4 at the end
        self.contact = contact
        self.stop_event = threading.Event()
        self.running = True
        self.finished = False  # the mp4 was closed (or deliberately dropped)
        self.abandoned = False  # the studio is shutting down: keep the job folder for `lvstudio render --resume`
        self.started = time.perf_counter()
        session.add_sink(self._on_chunk)

    def _on_chunk(self, chunk: Chunk) -> None:
        self.sink.write(chunk.frames)
        self.contact.offer(chunk.frames, chunk.frame_start)

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.job_id}{suffix}"

    @property
    def resume_command(self) -> str:
        """The command that finishes this render from its job folder (after a crash or a shutdown)."""
        return f"lvstudio render {self.story_file} --out {self.path('.mp4')} --resume"

    def keep_for_resume(self, *, snapshot: bool) -> str:
        """Leave the render resumable (partial mp4 dropped; a snapshot saved when stopped between chunks); returns a
        sentence saying how."""
        self.finished = True
        self.sink.abort()
        if self.session.job is None or not self.session.job.info_path.exists():
            return "Nothing was kept."
        if snapshot:
            try:
                self.session.write_snapshot()
            except Exception:  # noqa: BLE001 - the job stays resumable from its older snapshots
                log.warning("could not save a snapshot of %s", self.job_id)
        return f"The job is kept in {self.session.job.root}; finish it with: {self.resume_command}"

    def stop(self) -> int:
        """Ask for the end after the current chunk; returns the frames done so far."""
        self.session.stop()
        self.stop_event.set()
        return self.session.frames_done

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set() or self.session.stopped


class TabState:
    """Per browser tab (`gr.State`, deep-copied for each tab): the job this tab started, if any."""

    def __init__(self) -> None:
        self.job: RenderJob | None = None
        self.loading = False  # a render was accepted and is loading its models (no job yet)
        self.stop_early = False  # Stop was pressed while loading

    def stop(self) -> None:
        if self.job is not None and self.job.running:
            self.job.stop()
        elif self.loading:
            self.stop_early = True


def new_job_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _validation_ok(sb: Storyboard) -> str:
    from lvstudio.storyboard import format_time

    return (f"OK: {len(sb.shots)} shot(s), {format_time(sb.duration)} at {sb.fps} fps = {sb.num_frames()} frames, "
            f"preset {sb.preset}, seed {sb.seed}")


SKIP: Any = object()  # "leave this output as it is" (gradio's skip) in `_outputs_tuple`


def _outputs_tuple(preview: Any, status: str, progress: Any, video: Any = None, sheet: Any = None,
                   files: Any = None, live: Any = SKIP, timeline: Any = SKIP) -> tuple[Any, ...]:
    """The render's outputs: (first frame, status, progress, result mp4, contact sheet, files, live segment,
    timeline); SKIP leaves an output unchanged (the live video is only ever given segments or updates)."""
    import gradio as gr

    values = (preview, status, progress, video, sheet, files, live, timeline)
    return tuple(gr.skip() if v is SKIP else v for v in values)


def _player(*, live: bool) -> tuple[Any, Any]:
    """(live video, result video) updates: the stream shown while rendering, the finished mp4 after."""
    import gradio as gr

    return gr.update(visible=live), gr.update(visible=not live)


class WebStudio:
    """The studio of one process: config, cached model bundles, render slots, and the page's handlers."""

    def __init__(self, config: StudioConfig) -> None:
        self.config = config
        self._slots = threading.BoundedSemaphore(config.max_renders)
        self._bundles: dict[str, ModelBundle] = {}
        self._bundle_lock = threading.Lock()
        self._jobs: set[RenderJob] = set()  # renders in progress (for shutdown)
        self._jobs_lock = threading.Lock()
        self.closing = False

    def shutdown(self, timeout: float = 60.0) -> list[str]:
        """Stop every render after its chunk in flight and keep it resumable (the studio is going away: SIGINT,
        SIGTERM, SIGHUP); returns one line per render kept, with its resume command."""
        self.closing = True
        with self._jobs_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.abandoned = True
            job.stop()
        deadline = time.monotonic() + timeout
        while any(job.running for job in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.resume_commands(jobs)

    def resume_commands(self, jobs: list[RenderJob] | None = None) -> list[str]:
        """"<job id>: <command>" for each render (default: those in progress) whose job folder can be resumed."""
        if jobs is None:
            with self._jobs_lock:
                jobs = list(self._jobs)
        return [f"{job.job_id}: {job.resume_command}" for job in jobs
                if job.session.job is not None and job.session.job.info_path.exists()]

    # -- storyboard --------------------------------------------------------------------------------------------------
    def parse(self, text: str) -> Storyboard:
        """Parse the editor text exactly as the CLI would (raises StoryboardError)."""
        from lvstudio.storyboard import parse_storyboard

        return parse_storyboard(text if isinstance(text, str) else "", source=self.config.story_name,
                                base_dir=self.config.story_dir or Path.cwd(), confine_images=True)

    def validate(self, text: str) -> str:
        """The validation panel: "OK: ..." or the message `lvstudio check` gives (the storyboard's, or its preset's)."""
        from lvstudio.presets import load_preset

        try:
            sb = self.parse(text)
        except StoryboardError as err:
            return str(err)
        try:
            load_preset(sb.preset)
        except LvError as err:
            return f"{self.config.story_name}: preset = {sb.preset!r}: {err}"
        return _validation_ok(sb)

    # -- models ------------------------------------------------------------------------------------------------------
    def bundle(self, preset: Any) -> ModelBundle:
        """Load a preset's models once per studio and reuse them."""
        from lvstudio.presets.load import load_bundle

        key = f"{preset.folder}::{preset.name}"
        with self._bundle_lock:
            if key not in self._bundles:
                self._bundles[key] = load_bundle(preset)
            return self._bundles[key]

    # -- handlers ----------------------------------------------------------------------------------------------------
    def render(self, text: str, preset: str | None, backend: str | None, seed: str | int | None,
               tab: TabState) -> Iterator[tuple[Any, ...]]:
        """Render the editor's storyboard; yields (preview, status, progress, video, contact sheet, files)."""
        try:
            sb = self.parse(text)
            seed_value = self._seed(seed)
        except StoryboardError as err:
            yield _outputs_tuple(None, f"Storyboard error, nothing rendered:\n{err}", "")
            return
        except LvError as err:
            yield _outputs_tuple(None, f"Cannot render: {err}", "")
            return
        if self.closing:
            yield _outputs_tuple(None, "The studio is shutting down: no new renders.", "")
            return
        if not self._slots.acquire(blocking=False):
            yield _outputs_tuple(None, BUSY_MESSAGE.format(n=self.config.max_renders), "")
            return
        final: tuple[Any, ...] | None = None
        job: RenderJob | None = None
        try:
            tab.loading, tab.stop_early = True, False
            live, result = _player(live=True)
            yield _outputs_tuple(None, "Loading the preset...", "", video=result, live=live, timeline="")
            job = self._start(sb, text, preset, backend, seed_value)
            tab.job, tab.loading = job, False
            with self._jobs_lock:
                self._jobs.add(job)
            if self.closing:
                job.abandoned = True
                job.stop()
            if tab.stop_early:
                job.stop()
            final = yield from self._run(job)
        except GeneratorExit:  # the tab was closed (gradio closes the generator): keep what was made, as Stop does
            if job is not None and not job.finished:
                job.stop()
                try:
                    self._finish(job, None)
                except Exception:  # noqa: BLE001 - nobody is listening; log it
                    log.exception("could not finish the render of a closed tab")
            raise
        except LvError as err:
            final = _outputs_tuple(None, f"Cannot render: {err}", "")
        except Exception as err:  # noqa: BLE001 - the page gets a message, the log gets the traceback
            final = _outputs_tuple(None, self._failed(err, job), "")
        finally:
            tab.loading = False
            if job is not None:
                job.running = False
                if not job.finished:  # cut short by an error or a closed tab: drop the partial mp4
                    job.sink.abort()
                with self._jobs_lock:
                    self._jobs.discard(job)
            self._slots.release()
        if final is not None:
            yield final

    @staticmethod
    def _failed(err: Exception, job: RenderJob | None) -> str:
        """The status line of a render that failed: an I/O error explained (and the job kept for --resume)."""
        from lvstudio.io_errors import io_failure, is_io_error

        if is_io_error(err):
            log.warning("render failed: %s", err)
            kept = job.keep_for_resume(snapshot=False) if job is not None else None
            failure = io_failure(err, action="rendering", kept=kept,
                                 elsewhere="start the studio with another --outputs folder")
            return f"Render failed: {failure}"
        log.exception("render failed")
        return f"Render failed ({type(err).__name__}: {str(err)[:200]}); see the server log for details"

    def stop(self, tab: TabState) -> str:
        job = tab.job
        if (job is None or not job.running) and tab.loading:
            tab.stop()
            return "Stopping: the render ends before its first chunk."
        if job is None or not job.running:
            return "Nothing to stop: this tab is not rendering."
        done = job.stop()
        return f"Stopping after the current chunk (frame {done} done)."

    def push(self, prompt: str, transition: str, tab: TabState) -> str:
        """Live prompt into this tab's running render; it lands on the next block not yet generated."""
        from lvstudio.storyboard import format_time

        job = tab.job
        if job is None or not job.running or job.stop_requested:
            return "No render is running in this tab: press Render first."
        prompt = (prompt or "").strip()
        if not prompt:
            return "The live prompt is empty."
        if len(prompt) > MAX_LIVE_PROMPT_CHARS:
            return f"The live prompt is longer than {MAX_LIVE_PROMPT_CHARS} characters."
        if any(ord(c) < 32 and c not in "\t\n" for c in prompt):
            return "The live prompt contains control characters."
        if transition not in LIVE_CHOICES:
            return f"Unknown transition {transition!r}: use {', '.join(LIVE_CHOICES)}."
        session = job.session
        try:
            event = session.push(prompt, transition=transition)
        except (ValueError, LvError) as err:
            return f"Live prompt refused: {err}"
        frame = session.block_frame(event.block)
        fps = session.settings.fps
        if frame >= session.settings.num_frames:
            return f"Live prompt queued for block {event.block}, but the render ends before it (frame {frame})."
        return f"Live prompt ({transition}) lands at block {event.block}: frame {frame}, {format_time(frame / fps)}."

    # -- rendering ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _seed(seed: str | int | None) -> int | None:
        """The seed picker: blank = the storyboard's seed, else a whole number 0..2^63-1."""
        text = "" if seed is None else str(seed).strip()
        if not text:
            return None
        if not (text.isascii() and text.isdigit()) or int(text) >= 2**63:
            raise LvError(f"seed {text[:24]!r} must be a whole number from 0 to 2^63-1",
                          hint="or leave it blank for the storyboard's seed")
        return int(text)

    def _start(self, sb: Storyboard, text: str, preset: str | None, backend: str | None,
               seed: int | None) -> RenderJob:
        import torch

        from lvstudio.atomic import atomic_write_text
        from lvstudio.job_folder import preset_reference
        from lvstudio.session import RenderSession, resolve_settings
        from lvstudio.video import ContactFrames
        from lvstudio.web.stream import LiveVideo

        job_id = new_job_id()
        folder = self.config.outputs / job_id
        story_file = folder / f"{job_id}.storyboard.toml"
        preset_obj, settings = resolve_settings(
            sb, preset=None if preset in (None, "", FROM_STORYBOARD) else preset,
            backend=None if backend in (None, "", FROM_STORYBOARD) else backend, seed=seed)
        bundle = self.bundle(preset_obj)
        with torch.no_grad():
            session = RenderSession(sb, bundle, settings, score_stride=self.config.oracle_stride,
                                    job_dir=folder / f"{job_id}.job")
        folder.mkdir(parents=True, exist_ok=False)
        atomic_write_text(story_file, text)
        sink = LiveVideo(folder / f"{job_id}.mp4", settings.fps, settings.width, settings.height)
        contact = ContactFrames(settings.fps, self.config.contact_every_s)
        contact.want((r["frame_start"] + r["frame_end"]) // 2 for r in session.shot_ranges())
        job = RenderJob(job_id, folder, session, story_file, sink, contact)
        # The job folder `lvstudio render --resume` continues from if this process dies mid-render.
        chosen = None if preset in (None, "", FROM_STORYBOARD) else str(preset)
        session.write_job_info(preset_ref=preset_reference(chosen or sb.preset), resume=job.resume_command)
        return job

    def _run(self, job: RenderJob) -> Iterator[tuple[Any, ...]]:
        """Step the session, yielding each chunk's segment (and first the first decoded frame); returns the final
        outputs."""
        import torch

        session = job.session
        first: np.ndarray | None = None
        pace = self.config.min_chunk_seconds
        # Step 1: one chunk per iteration; Stop is checked between chunks (and wakes the pacing wait).
        while not session.done and not job.stop_requested:
            t0 = time.perf_counter()
            with torch.no_grad():
                chunk = session.step()  # sinks: the live video's frame queue, contact frames
            if first is None and chunk.frames.shape[0]:  # on screen before the first segment is even encoded
                first = chunk.frames[0]  # [H, W, 3]
                yield _outputs_tuple(first, self._status(job), SKIP, SKIP, SKIP, SKIP, timeline=self._timeline(job))
            segment = job.sink.segment()
            yield _outputs_tuple(SKIP, self._status(job), progress_html(session), SKIP, SKIP, SKIP,
                                 live=str(segment) if segment is not None else SKIP, timeline=self._timeline(job))
            wait = pace - (time.perf_counter() - t0)
            if wait > 0:
                job.stop_event.wait(wait)
        # Step 2: finish what was made (the whole video, or up to the chunk where Stop was pressed); when the studio
        # is shutting down, keep the job for `lvstudio render --resume` instead.
        if job.abandoned and not session.done:
            kept = job.keep_for_resume(snapshot=True)
            return _outputs_tuple(first, f"The studio is shutting down: stopped at frame {session.frames_done}. "
                                         f"{kept}", progress_html(session))
        last = job.sink.segment(final=True)  # frames too few for a segment of their own: the stream's last one
        if last is not None:
            yield _outputs_tuple(SKIP, self._status(job), SKIP, SKIP, SKIP, SKIP, live=str(last))
        return self._finish(job, first)

    @staticmethod
    def _timeline(job: RenderJob) -> str:
        s = job.session
        return timeline_html(s.shot_ranges(), s.settings.num_frames, s.settings.fps, s.frames_done)

    def _status(self, job: RenderJob) -> str:
        """Frame, chunk, speed; and whether the video is made slower than it plays (then playback waits)."""
        s = job.session
        total = s.settings.num_frames
        rate = s.frames_done / max(time.perf_counter() - job.started, 1e-9)
        speed = rate / s.settings.fps
        line = (f"Rendering {job.job_id}: frame {s.frames_done}/{total} ({100 * s.frames_done // max(total, 1)}%), "
                f"chunk {s.stats.chunks}, {rate:.1f} frames/s (x{speed:.2f} real time)")
        if speed < 1.0:
            line += "\nSlower than real time: the video pauses at the end of each segment until the next one is made."
        return line

    def _finish(self, job: RenderJob, preview: np.ndarray | None) -> tuple[Any, ...]:
        from lvstudio.atomic import atomic_write_text
        from lvstudio.session import build_manifest
        from lvstudio.storyboard import dump_storyboard
        from lvstudio.video import write_contact_sheet

        session = job.session
        stopped = not session.done
        job.finished = True
        if session.frames_done == 0:  # nothing to keep: drop the job folder (it holds only the storyboard)
            job.sink.abort()
            shutil.rmtree(job.folder, ignore_errors=True)
            return _outputs_tuple(None, "Stopped before the first chunk: nothing was rendered.", "")
        video = job.sink.close()
        manifest = build_manifest(session, job.story_file, video)
        done = session.frames_done
        for r in manifest["shots"]:  # a stopped render ends early: clip the ranges to what exists
            r["frame_start"], r["frame_end"] = min(r["frame_start"], done), min(r["frame_end"], done)
        manifest.update({"job_id": job.job_id, "app": "lvstudio preview", "stopped": stopped,
                         "frames_requested": session.settings.num_frames})
        files = [video]
        manifest_path = atomic_write_text(job.path(".manifest.json"), json.dumps(manifest, indent=2))
        files.append(manifest_path)
        files.append(job.story_file)
        missing = ""
        try:
            files.append(atomic_write_text(job.path(".rendered.toml"), dump_storyboard(session.rendered_storyboard())))
        except LvError as err:  # the "what was rendered" storyboard is a convenience; never fail the job for it
            log.warning("could not write the rendered storyboard: %s", err)
            missing = f" The rendered storyboard (.rendered.toml) could not be written: {err}"
        sheet = write_contact_sheet(job.path(".contact.png"), job.contact.items(manifest["shots"]))
        files.append(sheet)
        if session.job is not None:
            session.job.remove()  # the mp4 is made: nothing to resume
        wall = time.perf_counter() - job.started
        how = f"stopped at frame {done} of {session.settings.num_frames}" if stopped else "complete"
        status = (f"Done ({how}): {job.job_id}, {done} frames = {done / session.settings.fps:.2f} s of video "
                  f"in {wall:.1f} s. Files are in {job.job_id}/ in the outputs folder.{missing}")
        live, result = _player(live=False)  # the finished mp4 replaces the stream
        result["value"] = str(video)
        return _outputs_tuple(preview, status, progress_html(session, done=done), result, str(sheet),
                              [str(f) for f in files], live=live, timeline=self._timeline(job))

    # -- page --------------------------------------------------------------------------------------------------------
    def preset_choices(self) -> list[str]:
        from lvstudio.presets import available_presets

        choices = [FROM_STORYBOARD, *sorted(available_presets())]
        if self.config.preset and self.config.preset not in choices:
            choices.append(self.config.preset)
        return choices

    def build(self) -> gr.Blocks:
        """The page (launch it with `launch_studio`)."""
        import gradio as gr

        from lvstudio.backends.registry import BACKENDS

        # delete_cache: gradio's copies of served files (previews, mp4s) older than a day go, checked hourly.
        with gr.Blocks(title="lvstudio preview", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
            tab = gr.State(TabState(), delete_callback=lambda t: t.stop() if isinstance(t, TabState) else None)
            gr.Markdown("## lvstudio preview\nEdit the storyboard, press **Render**, steer it with live prompts.")
            with gr.Row():
                with gr.Column(scale=3):
                    story = gr.Code(self.config.story_text, language=None, lines=18, max_lines=40,
                                    label=f"Storyboard ({self.config.story_name})", elem_id="story")
                with gr.Column(scale=2):
                    validation = gr.Textbox(self.validate(self.config.story_text), label="Validation", lines=4,
                                            max_lines=8, interactive=False, elem_id="validation")
                    with gr.Row():
                        preset = gr.Dropdown(self.preset_choices(), value=self.config.preset or FROM_STORYBOARD,
                                             label="Preset", elem_id="preset")
                        backend = gr.Dropdown([FROM_STORYBOARD, *BACKENDS], value=FROM_STORYBOARD,
                                              label="Backend", elem_id="backend")
                        seed = gr.Textbox("", label="Seed", placeholder="storyboard's", max_length=20,
                                          elem_id="seed")
                    with gr.Row():
                        go = gr.Button("Render", variant="primary", elem_id="render")
                        halt = gr.Button("Stop", variant="stop", elem_id="stop")
                    status = gr.Textbox("", label="Status", lines=3, max_lines=8, interactive=False,
                                        elem_id="status")
            with gr.Row():
                with gr.Column(scale=3, elem_id="player"):
                    # Before the first segment plays: the first decoded frame (the page's script hides it then).
                    first_img = gr.Image(None, format="png", label="First frame", interactive=False, height=320,
                                         buttons=[], elem_id="first-frame")
                    live_video = gr.Video(None, label="Live video (plays while it renders)", streaming=True,
                                          autoplay=True, interactive=False, height=320, buttons=[], elem_id="live")
                    video = gr.Video(None, label="Result (H.264 mp4)", format=None, interactive=False, height=320,
                                     buttons=["download"], visible=False, elem_id="result")
                    timeline = gr.HTML("", label="Timeline", elem_id="timeline")
                with gr.Column(scale=2):
                    live = gr.Textbox("", label="Live prompt (Enter pushes it into the running render)", lines=1,
                                      max_lines=1, max_length=MAX_LIVE_PROMPT_CHARS, elem_id="live-prompt")
                    with gr.Row():
                        transition = gr.Radio(list(LIVE_CHOICES), value=LIVE_DEFAULT,
                                              label=f"Transition ({TRANSITION_KEY}: next)",
                                              info="switch: the shot continues · cut: a new shot · blend: a fade",
                                              elem_id="live-transition")
                        push = gr.Button("Push prompt", elem_id="push")
                    pushed = gr.Textbox("", label="Live prompt status", interactive=False, elem_id="push-status")
                    progress = gr.HTML("", label="Shots", elem_id="progress")
            with gr.Row():
                sheet = gr.Image(None, type="filepath", format="png", label="Contact sheet", interactive=False,
                                 height=320, buttons=["download"], elem_id="contact")
                files = gr.File(None, file_count="multiple", label="Downloads (mp4, manifest, storyboards, sheet)",
                                interactive=False, elem_id="files")

            light = {"concurrency_limit": None, "show_progress": "hidden"}
            story.change(self.validate, [story], [validation], api_name="validate", trigger_mode="always_last",
                         **light)
            go.click(self.render, [story, preset, backend, seed, tab],
                     [first_img, status, progress, video, sheet, files, live_video, timeline], api_name="render",
                     concurrency_limit=None, show_progress="hidden")
            halt.click(self.stop, [tab], [status], api_name="stop", **light)
            push.click(self.push, [live, transition, tab], [pushed], api_name="push", **light)
            live.submit(self.push, [live, transition, tab], [pushed], api_name="push_submit", **light)
        return demo


def progress_html(session: RenderSession, done: int | None = None) -> str:
    """Per-shot progress: one row per prompt event (storyboard shots and live prompts), escaped."""
    from lvstudio.storyboard import format_time

    done = session.frames_done if done is None else done
    fps = session.settings.fps
    rows = []
    for r in session.shot_ranges():
        start, end = r["frame_start"], r["frame_end"]
        if end <= start and start >= session.settings.num_frames:
            continue
        total = max(end - start, 0)
        made = min(max(done - start, 0), total)
        label = f"shot {r['shot'] + 1}" if r["shot"] is not None else "live"
        prompt = r["prompt"] if len(r["prompt"]) <= 80 else r["prompt"][:77] + "..."
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{format_time(start / fps)}</td>"
                    f"<td>{html.escape(prompt)}</td><td>{made}/{total}</td>"
                    f"<td><progress value='{made}' max='{max(total, 1)}'></progress></td></tr>")
    return ("<table><tr><th>shot</th><th>at</th><th>prompt</th><th>frames</th><th>progress</th></tr>"
            + "".join(rows) + "</table>")


def studio_theme() -> Any:
    """gradio's default theme with system fonts only (nothing is fetched from font CDNs)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch_studio(studio: WebStudio, policy: Any, *, block: bool = True, quiet: bool = True) -> tuple[gr.Blocks, str]:
    """Build and launch the page under a `LaunchPolicy`; returns (blocks, local url).

    With `block=False` the server runs in the background (tests); call `blocks.close()` to stop it.
    """
    import os

    from lvstudio.web.security import gradio_env, launch_kwargs, prepare_outputs

    prepare_outputs(policy)
    for key, value in gradio_env(policy).items():  # read by gradio when the Blocks are built
        os.environ[key] = value
    demo = studio.build()
    demo.queue(max_size=16, default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=not block, theme=studio_theme(), css=CSS, js=PAGE_JS,
                            **launch_kwargs(policy, quiet=quiet))
    return demo, url
