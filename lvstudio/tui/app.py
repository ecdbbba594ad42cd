"""`lvstudio tui`: the Textual studio — live half-block preview, timeline, prompt input, status and controls.

Threads: generation runs in a thread worker (`Studio.run`, checks cancellation between chunks); a second thread
worker (the preview pump) takes frames from the studio's FramePlayer, renders them to half-block segments and hands
them to the preview with `call_from_thread`. The generating thread never waits on the UI; the UI never runs model
code and never blocks (closing a recording or waiting for the chunk in flight happens in `asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from rich.segment import Segment
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.events import Resize
from textual.widgets import Footer, Input, Label
from textual.worker import Worker, WorkerState, get_current_worker

from lvstudio.errors import LvError
from lvstudio.transitions import LIVE_CHOICES, LIVE_DEFAULT
from lvstudio.tui.budget import PreviewBudget
from lvstudio.tui.preview import HalfBlockRenderer
from lvstudio.tui.recorder import Recording
from lvstudio.tui.studio import Studio, StudioSummary, explained
from lvstudio.tui.widgets import PreviewPane, StatusLine, StatusPanel, Timeline, TimelineView

STATUS_EVERY_S = 1.0  # the status timer; a preview frame also refreshes a status older than half of this
NARROW_WIDTH, SHORT_HEIGHT = 72, 18
IDLE_WAIT_S = 0.25  # the preview pump's longest sleep when no frame is due (it checks for cancellation between)


class StudioApp(App[StudioSummary | None]):
    """The terminal studio over one Studio (a RenderSession with preview, recorder and live prompts)."""

    TITLE = "lvstudio"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #main { height: 1fr; }
    #preview { width: 1fr; height: 1fr; }
    #status { width: 38; height: 1fr; border-left: vkey $primary 40%; }
    #statusline { display: none; background: $boost; }
    #timeline { height: 5; }
    #prompt-row { height: 1; }
    #mode { width: auto; padding: 0 1; background: $primary 40%; }
    #prompt { width: 1fr; height: 1; border: none; padding: 0 1; }
    Screen.-narrow #status { display: none; }
    Screen.-narrow #statusline { display: block; }
    Screen.-short #timeline { height: 2; }
    """
    BINDINGS = [
        Binding("f5,ctrl+p", "toggle_pause", "Pause/Resume", priority=True),
        Binding("f6", "stop", "Stop", priority=True),
        Binding("f7,ctrl+r", "toggle_record", "Record", priority=True),
        Binding("f8,ctrl+n", "reroll", "Re-roll", priority=True),
        Binding("f2,ctrl+t", "toggle_transition", "Transition", priority=True),
        Binding("escape", "clear_prompt", "Clear", show=False, priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, studio: Studio, *, preview_fps: float | None = None, preview_budget: float = 0.04,
                 blend_blocks: int = 2, exit_when_done: bool = False) -> None:
        super().__init__()
        if preview_fps is not None and preview_fps <= 0:
            raise ValueError(f"preview_fps must be positive, got {preview_fps}")
        if not 0 < preview_budget <= 1:
            raise ValueError(f"preview_budget must be in (0, 1], got {preview_budget}")
        if blend_blocks < 1:
            raise ValueError(f"blend_blocks must be at least 1, got {blend_blocks}")
        self.studio = studio
        self.preview_fps = preview_fps or float(studio.session.settings.fps)
        # The preview's CPU share (UI thread + pump) is kept under preview_budget of one core (see budget.py).
        self.budget = PreviewBudget(preview_budget, 1.0 / self.preview_fps, max_interval=3.0)
        self.blend_blocks = blend_blocks
        self.exit_when_done = exit_when_done
        self.transition = LIVE_DEFAULT  # the next prompt's transition; F2 cycles through LIVE_CHOICES
        self.summary: StudioSummary | None = None
        self.generator: Worker[None] | None = None  # the generation thread worker (started when ready)
        self.pump: Worker[None] | None = None  # the preview pump thread worker
        self._pump_done = threading.Event()
        self._preview_mark = (time.perf_counter(), 0)  # (when, frames shown) when the rate was last measured
        self._preview_rate = 0.0
        self._status_at = 0.0  # when the status was last refreshed (perf_counter)
        self._quitting = False
        self.quit_when_ready = False  # a stop signal came before the app ran its loop

    # -- layout ---------------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        """Preview + status on top, then the one-line status (small terminals), timeline, prompt and key bar."""
        with Horizontal(id="main"):
            yield PreviewPane(id="preview")
            yield StatusPanel(id="status")
        yield StatusLine(id="statusline")
        yield Timeline(id="timeline")
        with Horizontal(id="prompt-row"):
            yield Label(self._mode_text(), id="mode")
            yield Input(placeholder="type a prompt, Enter = push at the next block", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        """Lay out for the terminal size and focus the prompt field."""
        self.title = f"lvstudio · {self.studio.session.storyboard.title}"
        self._fit_layout(self.size.width, self.size.height)
        prompt = self.query_one("#prompt", Input)
        prompt.cursor_blink = False  # a blinking cursor repaints (and wakes the UI thread) twice a second
        prompt.focus()
        self.refresh_status()

    def on_ready(self) -> None:
        """First frame on screen: start generation and the preview pump; poll the status twice a second."""
        self.budget.watch(threading.get_ident())  # the UI thread
        self.generator = self.generate()
        self.pump = self.pump_preview(self.query_one(PreviewPane))
        self.set_interval(STATUS_EVERY_S, self._status_tick)
        if self.quit_when_ready:
            self.call_later(self.action_quit)

    def on_resize(self, event: Resize) -> None:
        """Switch between the full and the compact layout."""
        self._fit_layout(event.size.width, event.size.height)

    def _fit_layout(self, width: int, height: int) -> None:
        """Narrow terminals get a one-line status; short ones a two-line timeline."""
        self.screen.set_class(width < NARROW_WIDTH, "-narrow")
        self.screen.set_class(height < SHORT_HEIGHT, "-short")

    def _mode_text(self) -> str:
        """The transition the next prompt will use."""
        return f"{self.transition} ▸"

    # -- workers --------------------------------------------------------------------------------------------------
    @work(thread=True, group="generate", exclusive=True, exit_on_error=False)
    def generate(self) -> None:
        """Thread worker: run the session until done, stopped or cancelled."""
        worker = get_current_worker()
        self.studio.run(lambda: worker.is_cancelled)

    @work(thread=True, group="preview", exclusive=True, exit_on_error=False)
    def pump_preview(self, preview: PreviewPane) -> None:
        """Thread worker: render due frames off the UI thread and hand them over with call_from_thread."""
        worker = get_current_worker()
        renderer = HalfBlockRenderer()
        self.budget.watch(threading.get_ident())
        self.budget.restart()
        try:
            while not worker.is_cancelled:
                item = self.studio.player.next_frame()
                if item is None:  # nothing due: wait (idle time is not charged to the next frame)
                    self.budget.restart()
                    player = self.studio.player  # a new chunk wakes the wait at once
                    player.wait(IDLE_WAIT_S if player.exhausted() else self.budget.min_interval)
                    continue
                index, frame = item
                size = preview.pane_size
                lines = renderer.render(frame, *size)
                if worker.is_cancelled:
                    break
                self.call_from_thread(self._show_frame, preview, index, frame, lines, size)
                worker.cancelled_event.wait(self.budget.next_interval())
        except RuntimeError:  # the app stopped while a frame was on its way
            pass
        finally:
            self._pump_done.set()

    def _show_frame(self, preview: PreviewPane, index: int, frame: np.ndarray, lines: list[list[Segment]],
                    size: tuple[int, int]) -> None:
        """UI thread: show a preview frame, and refresh a stale status in the same repaint."""
        preview.show(index, frame, lines, size)
        if time.perf_counter() - self._status_at >= STATUS_EVERY_S / 2:
            self.refresh_status()

    def _status_tick(self) -> None:
        """Timer: refresh the status unless a preview frame did it recently."""
        if time.perf_counter() - self._status_at >= STATUS_EVERY_S * 0.9:
            self.refresh_status()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Report the end of generation (finished, stopped or failed)."""
        if event.worker.group != "generate" or not event.worker.is_finished:
            return
        self.refresh_status()
        if self.studio.error is not None:
            self.notify(f"generation failed: {self.studio.error}", severity="error", timeout=10)
        elif event.state == WorkerState.SUCCESS and self.studio.session.done:
            self.notify("finished: F7 saves a recording, Ctrl-Q quits and writes the storyboard")
        if self.exit_when_done and not self._quitting:
            self.call_later(self.action_quit)

    # -- status ---------------------------------------------------------------------------------------------------
    def refresh_status(self) -> None:
        """Push a status snapshot and the timeline data to the widgets."""
        st = self.studio.status()
        self._status_at = time.perf_counter()
        while self.studio.recording_errors:  # a recording the disk refused ended; generation went on
            self.notify(f"recording stopped: {self.studio.recording_errors.pop(0)}", severity="error", timeout=10)
        now, shown = time.perf_counter(), self.query_one(PreviewPane).frames_shown
        last_t, last_shown = self._preview_mark
        if now - last_t >= 1.0:  # the preview's frame rate, over at least a second
            self._preview_rate = (shown - last_shown) / (now - last_t)
            self._preview_mark = (now, shown)
        self.query_one(StatusPanel).update_status(st, self._preview_rate)
        self.query_one(StatusLine).update_status(st)
        self.query_one(Timeline).update_view(TimelineView(self.studio.shot_ranges(), st.frames_done, st.num_frames,
                                                          st.fps, self.studio.live_prompts()))

    # -- prompt input ---------------------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def push_prompt(self, event: Input.Submitted) -> None:
        """Enter: push the prompt into the Prompt Stream Buffer at the next block."""
        text = event.value.strip()
        if not text:
            event.input.value = ""
            self.notify("the prompt is empty: type one, then Enter", severity="warning")
            return
        if not self.studio.generating:
            self.notify("generation has ended; nothing more will be rendered", severity="warning")
            return
        try:
            rec = self.studio.push(text, self.transition, self.blend_blocks)
        except ValueError as err:
            self.notify(str(err), severity="error")
            return
        event.input.value = ""
        self.notify(f"{rec.event.transition} at block {rec.event.block} (frame {rec.frame}, {rec.seconds:.2f}s)")
        unknown = self.studio.unknown_words(text)
        if unknown:
            self.notify(f"unknown words ignored: {', '.join(unknown)}", severity="warning")
        self.refresh_status()

    def action_clear_prompt(self) -> None:
        """Escape: clear the prompt field."""
        self.query_one("#prompt", Input).value = ""

    def action_toggle_transition(self) -> None:
        """Cycle the next prompt's transition: switch (continue the shot) -> cut (a new shot) -> blend -> switch."""
        self.transition = LIVE_CHOICES[(LIVE_CHOICES.index(self.transition) + 1) % len(LIVE_CHOICES)]
        self.query_one("#mode", Label).update(self._mode_text())

    # -- controls -------------------------------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        """Pause or resume generation (between chunks)."""
        if not self.studio.generating:
            self.notify("generation has ended", severity="warning")
            return
        paused = self.studio.toggle_pause()
        self.notify("paused" if paused else "resumed")
        self.refresh_status()

    def action_stop(self) -> None:
        """Stop generation after the chunk in flight and cancel the worker (final)."""
        self.studio.stop()
        self.workers.cancel_group(self, "generate")
        self.notify("stopping after the current chunk")
        self.refresh_status()

    def action_reroll(self) -> None:
        """Re-roll the current shot from the next block with a new seed."""
        if not self.studio.generating:
            self.notify("generation has ended", severity="warning")
            return
        rec = self.studio.reroll()
        self.notify(f"re-roll: seed {rec.event.seed} from frame {rec.frame}")
        self.refresh_status()

    def action_toggle_record(self) -> None:
        """Start recording to a timestamped mp4, or finish the recording (in a worker: closing flushes the encoder)."""
        self.toggle_record()

    @work(group="record", exclusive=True, exit_on_error=False)
    async def toggle_record(self) -> None:
        """Async worker: toggle the recorder off the UI thread and report the result."""
        try:
            started, result = await asyncio.to_thread(self.studio.toggle_recording)
        except (LvError, ValueError, OSError) as err:
            self.notify(f"recording: {explained(err, 'recording')}", severity="error", timeout=10)
            return
        if started:
            self.notify(f"recording to {result}")
        elif isinstance(result, Recording):
            self.notify(f"saved {result.path} ({result.frames} frames)")
        else:
            self.notify("nothing was recorded", severity="warning")
        self.refresh_status()

    async def action_quit(self) -> None:
        """Ctrl-Q: stop, wait for the chunk in flight, finalise the recording, write the storyboard, exit."""
        if not self._quitting:
            self._quitting = True
            self.notify("stopping and saving…")
            self.shutdown()

    @work(group="quit", exclusive=True, exit_on_error=False)
    async def shutdown(self) -> None:
        """Async worker (the UI keeps running): wind the threads down, close the studio, then exit."""
        self.studio.stop()
        self.workers.cancel_group(self, "generate")
        self.workers.cancel_group(self, "preview")
        if self.pump is not None:
            await asyncio.to_thread(self._pump_done.wait, 10.0)
        try:
            self.summary = await asyncio.to_thread(self.studio.close)
        except (LvError, ValueError, OSError) as err:
            self.notify(f"could not save: {err}", severity="error", timeout=10)
            self._quitting = False
            return
        self.exit(self.summary)


def screen_text(app: App) -> str:
    """The current screen as plain text (a text screenshot for docs and tests; the app must be running)."""
    strips = app.screen._compositor.render_strips()  # noqa: SLF001 - the source export_screenshot renders from
    return "\n".join("".join(seg.text for seg in strip).rstrip() for strip in strips)
