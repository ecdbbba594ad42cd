"""Studio: everything the TUI does with a RenderSession, without Textual (so tests and benchmarks use it directly).

It builds the session (from a storyboard file or a single `--prompt`), runs it chunk by chunk in the caller's thread
(the TUI's thread worker) with pause/stop/cancel, fans chunks out to the preview mailbox and the recorder, records
live prompts with the frame they land on, snapshots the status for the UI, and on close finalises the recording and
writes the storyboard of what was rendered next to it. No model code here: only the session API.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lvstudio.errors import LvError, OutputExistsError, StoryboardError
from lvstudio.transitions import LIVE_DEFAULT, check_transition
from lvstudio.tui.player import FramePlayer
from lvstudio.tui.recorder import Recorder, Recording, timestamp_name

if TYPE_CHECKING:
    from lvstudio.backends.base import Chunk
    from lvstudio.presets.load import ModelBundle
    from lvstudio.prompt_stream import PromptEvent
    from lvstudio.session import RenderSession
    from lvstudio.storyboard import Storyboard

LIVE_DURATION = "24:00:00"  # a --prompt session runs until stopped (RenderSettings.num_frames bounds it)
RATE_WINDOW_S = 2.0  # the generation rate shown is measured over this many recent seconds
CACHE_EVERY_S = 0.25  # how often the generating thread snapshots the backend's cache summary
_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class StudioOptions:
    """What `lvstudio tui` was asked for (times already in seconds)."""

    story: Path | None = None
    prompt: str | None = None
    preset: str | None = None  # name or path to a preset.toml
    seed: int | None = None
    duration: float | None = None  # None: the storyboard's duration, or until stopped with --prompt
    out_dir: Path = Path("out")
    record: Path | None = None  # start recording at once: a folder, or an .mp4 file


@dataclass(frozen=True)
class LivePrompt:
    """A prompt steered in live: the event, the frame and time it lands on, and the frame when it was typed."""

    event: PromptEvent
    frame: int
    seconds: float
    typed_at_frame: int
    kind: str = "prompt"  # "prompt" | "reroll"


@dataclass(frozen=True)
class StudioStatus:
    """A snapshot for the status panel (read by the UI a few times per second)."""

    title: str
    preset: str
    backend: str
    seed: int
    shot_seed: int | None
    state: str  # "starting" | "generating" | "paused" | "stopped" | "finished" | "error"
    frames_done: int
    num_frames: int | None  # None: until stopped
    fps: int
    gen_fps: float  # frames generated per second, recently
    prompt: str  # resolved prompt of the newest chunk
    source: str  # "storyboard" | "live"
    caches: dict[str, Any]
    recording: tuple[Path, int] | None
    live_prompts: int
    error: str | None

    @property
    def realtime(self) -> float:
        """Generation speed as a multiple of real time."""
        return self.gen_fps / self.fps if self.fps else 0.0


@dataclass(frozen=True)
class StudioSummary:
    """What a closed studio left on disk."""

    recordings: list[Recording]
    storyboard: Path | None
    frames: int
    rerender: str | None
    unsaved: str | None = None  # the rendered storyboard's text when it could not be written (`save_error` says why)
    save_error: LvError | None = None


def prompt_storyboard(prompt: str, preset: str, fps: int, seed: int) -> Storyboard:
    """A one-shot storyboard for a `--prompt` session (24 h long; the session stops it)."""
    from lvstudio.storyboard import parse_storyboard, toml_string

    if not prompt.strip():
        raise LvError("--prompt is empty", hint='e.g. --prompt "a red ball bouncing over the sea"')
    text = "\n".join([
        'title = "live session"',
        f"preset = {toml_string(preset)}",
        f"fps = {fps}",
        f'duration = "{LIVE_DURATION}"',
        f"seed = {seed}",
        "",
        "[[shots]]",
        "at = 0",
        f"prompt = {toml_string(prompt)}",
        "",
    ])
    try:
        return parse_storyboard(text, source="--prompt")
    except StoryboardError as err:  # the storyboard is built here: its line and column mean nothing to the user
        raise LvError(f"--prompt: {err.message}", hint=err.fix) from None


def explained(err: Exception, action: str) -> Exception:
    """An I/O error as the CLI would explain it (`lvstudio.io_errors`); anything else unchanged."""
    from lvstudio.io_errors import io_failure, is_io_error

    if not is_io_error(err):
        return err
    return io_failure(err, action=action, elsewhere="record into another folder (--record)")


def preset_label(ref: str, name: str) -> str:
    """The preset name to write into a storyboard: the reference itself if it is a name, else the preset's name."""
    if not ref.endswith(".toml") and _PRESET_NAME.fullmatch(ref):
        return ref
    return name if _PRESET_NAME.fullmatch(name) else "tiny"


def open_studio(options: StudioOptions, *, bundle: ModelBundle | None = None,
                echo: Callable[[str], None] | None = None) -> Studio:
    """Load the storyboard (or build one from the prompt), the preset and the models; raises LvError for user input.

    Pass `bundle` to reuse models already loaded (tests, benchmarks).
    """
    from lvstudio.presets import load_preset
    from lvstudio.presets.load import load_bundle
    from lvstudio.session import RenderSession, resolve_settings
    from lvstudio.storyboard import load_storyboard

    # Step 1: the storyboard.
    if options.story is not None and options.prompt is not None:
        raise LvError("give a storyboard or --prompt, not both", hint="live prompts can be typed in the studio")
    if options.story is None and options.prompt is None:
        raise LvError("nothing to render", hint='pass a storyboard (lvstudio tui story.toml) or --prompt "..."')
    if options.story is not None:
        sb = load_storyboard(options.story)
    else:
        ref = options.preset or "tiny"
        live_preset = load_preset(ref)
        sb = prompt_storyboard(options.prompt or "", preset_label(ref, live_preset.name), live_preset.fps,
                               options.seed or 0)
    if options.record is not None:
        check_record_path(options.record)  # before the models load
    # Step 2: settings (overrides applied the way `lvstudio render` applies them) and models.
    preset, settings = resolve_settings(sb, preset=options.preset, seed=options.seed, duration=options.duration)
    label = preset_label(options.preset or sb.preset, preset.name)
    sb = sb.model_copy(update={"seed": settings.seed, "preset": label})  # so the saved storyboard re-renders alike
    if bundle is None:
        if echo is not None:
            echo(f"loading preset {preset.name} ...")
        bundle = load_bundle(preset)
    session = RenderSession(sb, bundle, settings)
    unbounded = options.story is None and options.duration is None
    rerender_preset = options.preset if options.preset and options.preset != label else None
    return Studio(session, out_dir=options.out_dir, unbounded=unbounded, rerender_preset=rerender_preset,
                  record=options.record)


def check_record_path(record: Path) -> None:
    """`--record`: an .mp4 that does not exist yet, or a folder (one that exists, or a name without a suffix)."""
    if record.suffix.lower() == ".mp4":
        if record.exists():
            raise OutputExistsError(record, hint="choose another --record path, or a folder for a timestamped name "
                                                 "(the studio never overwrites a recording)")
    elif record.suffix and not record.is_dir():
        raise LvError(f"--record {record}: recordings are H.264 in an MP4 container",
                      hint=f"name it {record.with_suffix('.mp4')}, or give a folder (timestamped names inside)")
    from lvstudio.io_errors import nearest_existing

    folder = nearest_existing(record.parent if record.suffix.lower() == ".mp4" else record)
    if folder.is_dir() and not os.access(folder, os.W_OK):  # a read-only disk, or no permission
        raise LvError(f"--record {record}: {folder} cannot be written to (a read-only disk, or no permission)",
                      hint="record into a folder you can write to")


@dataclass
class _Live:
    """Mutable state the generating thread updates (read by the UI through `Studio.status`)."""

    prompt: str = ""
    event_id: int = 0
    rates: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    caches: dict[str, Any] = field(default_factory=dict)
    caches_at: float = 0.0


class Studio:
    """A RenderSession plus the preview mailbox, the recorder and the log of live prompts."""

    def __init__(self, session: RenderSession, *, out_dir: Path = Path("out"), unbounded: bool = False,
                 rerender_preset: str | None = None, record: Path | None = None) -> None:
        s = session.settings
        self.session = session
        self.out_dir = out_dir
        self.unbounded = unbounded
        self.rerender_preset = rerender_preset
        self.started = datetime.now()
        self.player = FramePlayer(s.fps)
        self.recorder = Recorder(out_dir, s.fps, s.width, s.height)
        self.live: list[LivePrompt] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()  # set when run() returns
        self.pause_waiting = threading.Event()  # set while run() idles in a pause (no chunk in flight)
        self.run_seconds = 0.0  # wall time of run() (for benchmarks)
        self.run_frames = 0
        self.stop_requested_at: int | None = None  # session.stats.chunks when stop() was called
        self.summary: StudioSummary | None = None
        self._live = _Live()
        self._running = False
        self._lock = threading.Lock()
        self.recording_errors: list[Exception] = []  # recordings the disk refused (the UI shows and clears them)
        self._journal: Path | None = None  # the rendered storyboard so far, kept once a prompt is typed (crash-safe)
        self._journal_lock = threading.Lock()  # the generating thread keeps it; close() writes the last one
        self._journal_done = False
        session.add_sink(self._on_chunk)
        if record is not None:
            self._start_initial_recording(record)

    # -- generating thread -------------------------------------------------------------------------------------
    def _on_chunk(self, chunk: Chunk) -> None:
        """Session sink (generating thread): mailbox, recorder, rate and cache snapshots. Cheap; never waits on UI."""
        self.player.offer(chunk.frames, chunk.frame_start)
        try:
            self.recorder.write(chunk.frames, chunk.frame_start)
        except Exception as err:  # noqa: BLE001 - a recording the disk refuses ends; generation goes on
            from lvstudio.io_errors import io_failure, is_io_error

            path = self.recorder.current[0] if self.recorder.current else None
            self.recorder.abort()
            self.recording_errors.append(io_failure(err, action="recording", path=path,
                                                    elsewhere="record into another folder (F7 records into out/)")
                                         if is_io_error(err) else err)
        now = time.perf_counter()
        live = self._live
        live.prompt, live.event_id = chunk.prompt, chunk.event_id
        live.rates.append((now, chunk.frame_start + chunk.num_frames))
        if now - live.caches_at >= CACHE_EVERY_S:
            live.caches = dict(self.session.backend.cache_summary())
            live.caches_at = now

    def _keep_journal(self) -> None:
        """After each chunk once a prompt was typed: the rendered storyboard so far, where close() writes it, so that a
        studio killed without its Ctrl-Q (kill -9, a power cut) loses none of the steering: `lvstudio render` of it
        makes the video it made. A disk that refuses this write is reported by close()'s own write."""
        from lvstudio.atomic import atomic_write_text

        with self._journal_lock:
            if self._journal_done:
                return
            try:
                if self._journal is None:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                    self._journal = timestamp_name(self.out_dir, self.started, ".storyboard.toml")
                atomic_write_text(self._journal, self.rendered_storyboard_text())
            except (OSError, LvError):  # never stops generating: close() writes it again and reports what failed
                pass

    def run(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Generate until done, stopped or `cancelled()` (checked between chunks); errors land in `self.error`."""
        s = self.session
        self._running = True
        t0, f0 = time.perf_counter(), s.frames_done
        try:
            while not s.done and not s.stopped and not cancelled():
                if s.paused:
                    self.pause_waiting.set()
                    time.sleep(0.02)
                    continue
                self.pause_waiting.clear()
                s.step()
                if self.live:
                    self._keep_journal()
        except Exception as err:  # noqa: BLE001 - shown in the UI, the studio stays open
            self.error = explained(err, "generating")
        finally:
            self.pause_waiting.clear()
            self.run_seconds = time.perf_counter() - t0
            self.run_frames = s.frames_done - f0
            self._running = False
            self.finished.set()

    # -- controls (any thread) -----------------------------------------------------------------------------------
    @property
    def generating(self) -> bool:
        """True while chunks can still come (not finished, stopped or failed)."""
        s = self.session
        return not (self.finished.is_set() or s.done or s.stopped or self.error is not None)

    def push(self, prompt: str, transition: str = LIVE_DEFAULT, blend_blocks: int = 2) -> LivePrompt:
        """Push a live prompt at the next block; ValueError for an empty prompt, an unknown {identity} or a
        transition other than switch, cut or blend."""
        check_transition(transition)
        typed_at = self.session.frames_done
        event = self.session.push(prompt.strip(), transition=transition, blend_blocks=blend_blocks)
        return self._log(event, typed_at, "prompt")

    def reroll(self, seed: int | None = None) -> LivePrompt:
        """Re-roll the current shot from the next block with a new seed."""
        typed_at = self.session.frames_done
        return self._log(self.session.reroll(seed), typed_at, "reroll")

    def _log(self, event: PromptEvent, typed_at: int, kind: str) -> LivePrompt:
        """Record a live event with the frame it lands on."""
        frame = self.session.block_frame(event.block)
        rec = LivePrompt(event, frame, frame / self.session.settings.fps, typed_at, kind)
        with self._lock:
            self.live.append(rec)
        return rec

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` the text encoder does not know (they are ignored)."""
        try:
            return list(self.session.bundle.text.unknown_words(self.session.identities.resolve(prompt)))
        except (ValueError, AttributeError):
            return []

    def toggle_pause(self) -> bool:
        """Pause or resume; returns True if now paused."""
        paused = not self.session.paused
        self.session.pause(paused)
        return paused

    def stop(self) -> None:
        """Stop generating after the chunk in flight (final: the session cannot restart)."""
        if self.stop_requested_at is None:
            self.stop_requested_at = self.session.stats.chunks
        self.session.stop()

    def toggle_recording(self) -> tuple[bool, Path | Recording | None]:
        """Start or stop recording: (True, path) when started, (False, Recording or None) when stopped."""
        if self.recorder.active:
            return False, self.recorder.stop()
        return True, self.recorder.start()

    def _start_initial_recording(self, record: Path) -> None:
        """`--record`: a folder (timestamped file inside) or an .mp4 path; recording starts with the first frame."""
        check_record_path(record)
        if record.suffix.lower() == ".mp4":
            self.recorder.folder = record.parent if str(record.parent) else Path(".")
            self.recorder.start(record)
        else:
            self.recorder.folder = record
            self.recorder.start()

    # -- views for the UI ------------------------------------------------------------------------------------------
    def status(self) -> StudioStatus:
        """A consistent-enough snapshot of the session for the status panel."""
        s = self.session
        st = s.settings
        live = self._live
        events = s.buffer.events
        ev = events[live.event_id] if live.rates and live.event_id < len(events) else (events[0] if events else None)
        return StudioStatus(
            title=s.storyboard.title, preset=st.preset, backend=st.backend, seed=st.seed,
            shot_seed=ev.seed if ev is not None else None, state=self._state(), frames_done=s.frames_done,
            num_frames=None if self.unbounded else st.num_frames, fps=st.fps, gen_fps=self._rate(),
            prompt=live.prompt or (ev.resolved if ev is not None else ""),
            source=ev.source if ev is not None else "storyboard", caches=dict(live.caches),
            recording=self.recorder.current, live_prompts=len(self.live),
            error=None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        )

    def _state(self) -> str:
        """One word for what the session is doing."""
        s = self.session
        if self.error is not None:
            return "error"
        if s.done:
            return "finished"
        if s.stopped:
            return "stopped"
        if s.paused:
            return "paused"
        return "generating" if self._running else "starting"

    def _rate(self) -> float:
        """Frames per second over the last RATE_WINDOW_S seconds of chunks (0 when idle)."""
        rates = list(self._live.rates)
        if len(rates) < 2 or self.session.paused or time.perf_counter() - rates[-1][0] > RATE_WINDOW_S:
            return 0.0
        recent = [r for r in rates if rates[-1][0] - r[0] <= RATE_WINDOW_S]
        if len(recent) < 2:
            recent = rates[-2:]
        (t0, f0), (t1, f1) = recent[0], recent[-1]
        return (f1 - f0) / (t1 - t0) if t1 > t0 else 0.0

    def shot_ranges(self) -> list[dict[str, Any]]:
        """Per prompt event (storyboard and live): its frame range (see RenderSession.shot_ranges)."""
        return self.session.shot_ranges()

    def live_prompts(self) -> list[LivePrompt]:
        """The live prompts so far (a copy)."""
        with self._lock:
            return list(self.live)

    # -- closing -----------------------------------------------------------------------------------------------
    def close(self, timeout: float = 60.0) -> StudioSummary:
        """Stop, wait for the chunk in flight, finalise any recording and write the rendered storyboard (idempotent;
        a storyboard the disk refuses is kept in the summary as text, with why)."""
        from lvstudio.io_errors import io_failure

        if self.summary is not None:
            return self.summary
        self.stop()
        if self._running:
            self.finished.wait(timeout)
        try:
            self.recorder.stop()
        except Exception as err:  # noqa: BLE001 - a recording the disk refused: keep the storyboard, report it
            self.recorder.abort()
            self.error = self.error or explained(err, "finishing the recording")
        unsaved, save_error = None, None
        try:
            path = self.write_storyboard()
        except (OSError, LvError) as err:  # the studio still closes: the CLI prints the text and why it is not saved
            path = None
            try:
                unsaved = self.rendered_storyboard_text()
            except LvError:  # the error below is what the user needs; the text is a bonus
                unsaved = None
            save_error = err if isinstance(err, LvError) else io_failure(
                err, action="saving the rendered storyboard",
                elsewhere="start the studio from a writable folder (it saves into out/ there) or --record into one")
        rerender = None
        if path is not None:
            rerender = f"lvstudio render {path}" + (f" --preset {self.rerender_preset}" if self.rerender_preset else "")
        self.summary = StudioSummary(list(self.recorder.done), path, self.session.frames_done, rerender, unsaved,
                                     save_error)
        return self.summary

    def storyboard_path(self) -> Path:
        """Where the rendered storyboard goes: next to the last recording, else a timestamped file in out_dir."""
        if self.recorder.done:
            rec = self.recorder.done[-1].path
            return rec.with_name(rec.stem + ".storyboard.toml")
        return self._journal or timestamp_name(self.out_dir, self.started, ".storyboard.toml")

    def rendered_storyboard_text(self) -> str:
        """The storyboard of what was rendered (shots + live prompts at their times), with a comment header."""
        from lvstudio.storyboard import dump_storyboard, format_time

        fps = self.session.settings.fps
        head = [f"# Rendered live by `lvstudio tui` ({self.started:%Y-%m-%d %H:%M:%S}): the storyboard's shots plus "
                "the prompts typed in, at the frames they landed on.",
                f"# {self.session.frames_done} frames; {len(self.live)} live prompt(s)."]
        for rec in self.recorder.done:
            end = rec.first_frame + rec.frames
            head.append(f"# {rec.path.name} holds frames {rec.first_frame}-{end - 1} "
                        f"({format_time(rec.first_frame / fps)} to {format_time(end / fps)}).")
        if self.rerender_preset:
            head.append(f"# Re-render with: lvstudio render <this file> --preset {self.rerender_preset}")
        return "\n".join(head) + "\n" + dump_storyboard(self.session.rendered_storyboard())

    def write_storyboard(self) -> Path | None:
        """Write the rendered storyboard (atomic); None when nothing was rendered."""
        from lvstudio.atomic import atomic_write_text

        if self.session.frames_done == 0:
            return None
        with self._journal_lock:
            self._journal_done = True
            path = self.storyboard_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, self.rendered_storyboard_text())
            if self._journal is not None and self._journal != path:  # the kept copy, replaced by the one next to
                self._journal.unlink(missing_ok=True)  # the recording
        return path
