"""The studio's widgets: the half-block preview (Line API), the timeline, the status panel and its one-line form.

Widgets only draw what the app hands them (attributes down); they never touch the session or the models.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.events import Resize
from textual.strip import Strip
from textual.widget import Widget

from lvstudio.storyboard import format_time
from lvstudio.timeline_palette import LIVE_COLOURS, SHOT_COLOURS
from lvstudio.tui.preview import HalfBlockRenderer
from lvstudio.tui.studio import LivePrompt, StudioStatus

STATE_MARKS = {"starting": "…", "generating": "▶", "paused": "⏸", "stopped": "■", "finished": "✓", "error": "✗"}


class PreviewPane(Widget):
    """Live preview: the newest frame as half-block cells, centred and scaled to the pane."""

    DEFAULT_CSS = "PreviewPane { background: black; }"

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - textual's name
        super().__init__(id=id)
        self.renderer = HalfBlockRenderer()  # used on the UI thread only (on resize)
        self.pane_size: tuple[int, int] = (0, 0)  # read by the preview pump thread (a tuple: atomic)
        self.frame_index: int | None = None
        self.frames_shown = 0
        self._frame: np.ndarray | None = None
        self._lines: list[list[Segment]] = []
        self._row_width = 0  # cells per image row (all rows are equally wide)
        self._strips: dict[int, Strip] = {}
        self._blank: Style | None = None  # the pane's own style, looked up once per frame (it is not cheap)

    def on_resize(self, event: Resize) -> None:
        """Re-render the current frame at the new size."""
        self.pane_size = (event.size.width, event.size.height)
        self._strips, self._blank = {}, None
        if self._frame is not None:
            self._set_lines(self.renderer.render(self._frame, *self.pane_size))

    def show(self, index: int, frame: np.ndarray, lines: list[list[Segment]], size: tuple[int, int]) -> None:
        """Show frame `index`; `lines` were rendered (off the UI thread) for pane `size`."""
        self._frame = frame
        self.frame_index = index
        self.frames_shown += 1
        if size != self.pane_size:  # resized while it was being rendered
            lines = self.renderer.render(frame, *self.pane_size)
        self._set_lines(lines)

    def _set_lines(self, lines: list[list[Segment]]) -> None:
        """Swap in new image rows and repaint."""
        self._lines = lines
        self._row_width = sum(len(seg.text) for seg in lines[0]) if lines else 0
        self._strips = {}
        self._blank = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        """One terminal row: blank, or an image row centred horizontally."""
        width, height = self.size
        strip = self._strips.get(y)
        if strip is not None:
            return strip
        if self._blank is None:
            self._blank = self.rich_style
        blank = self._blank
        top = (height - len(self._lines)) // 2
        if not self._lines:
            strip = self._placeholder(y, width, height, blank)
        elif 0 <= y - top < len(self._lines):
            used = self._row_width
            left = max((width - used) // 2, 0)
            right = max(width - used - left, 0)
            strip = Strip([Segment(" " * left, blank), *self._lines[y - top], Segment(" " * right, blank)],
                          left + used + right)
            if left + used + right > width:
                strip = strip.crop(0, width)
        else:
            strip = Strip.blank(width, blank)
        self._strips[y] = strip
        return strip

    def _placeholder(self, y: int, width: int, height: int, style: Style) -> Strip:
        """The row of the 'waiting for the first frame' message."""
        if y != height // 2:
            return Strip.blank(width, style)
        text = "waiting for the first chunk…"[:width]
        left = (width - len(text)) // 2
        return Strip([Segment(" " * left, style), Segment(text, style + Style(dim=True)),
                      Segment(" " * (width - left - len(text)), style)], width)


class TextRows(Widget):
    """A widget drawn from rich Text rows with the Line API (cheaper than `render()` for a few changing lines).

    Subclasses build their rows in `rows(width, height)`; rows are rendered once per change and cached as Strips.
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - textual's name
        super().__init__(id=id)
        self._strips: list[Strip] | None = None

    def on_resize(self, event: Resize) -> None:
        """Re-render for the new width."""
        self._strips = None

    def changed(self) -> None:
        """The data changed: rebuild the rows on the next paint."""
        self._strips = None
        self.refresh()

    def rows(self, width: int, height: int) -> list[Text]:
        """The rows to show (no wrapping is done here: a row longer than the width is cut)."""
        raise NotImplementedError

    def render_line(self, y: int) -> Strip:
        """One row, cut or padded to the widget's width."""
        width, height = self.size
        if self._strips is None:
            console, base = self.app.console, self.rich_style
            self._strips = [Strip(list(row.render(console))).apply_style(base).adjust_cell_length(width, base)
                            for row in self.rows(width, height)[:height]]
        if y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width, self.rich_style)


def _wrap(text: Text, width: int, limit: int, console: Console) -> list[Text]:
    """Word-wrap `text` into at most `limit` rows of `width` cells (the last one ends in … if cut)."""
    rows = list(text.wrap(console, max(width, 1), overflow="fold"))
    if len(rows) > limit:
        rows = rows[:limit]
        rows[-1].truncate(max(width - 1, 0))
        rows[-1].append("…")
    return rows


@dataclass(frozen=True)
class TimelineView:
    """What the timeline draws: per-event frame ranges, the playhead and the live prompts."""

    ranges: list[dict[str, Any]]
    playhead: int
    total: int | None  # frames in the video; None: until stopped
    fps: int
    live: list[LivePrompt]


class Timeline(TextRows):
    """The shots (numbered) and live prompts (◆) on a bar, a playhead, and the newest live prompts."""

    DEFAULT_CSS = "Timeline { height: 5; }"

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - textual's name
        super().__init__(id=id)
        self.view: TimelineView | None = None

    def update_view(self, view: TimelineView) -> None:
        """New data; repaint if it changed."""
        if view != self.view:
            self.view = view
            self.changed()

    @staticmethod
    def window(v: TimelineView) -> tuple[int, int]:
        """(first frame, frames shown) across the bar: the whole video if short, else a minute around the playhead."""
        if v.total is not None and v.total <= 600 * v.fps:
            return 0, max(v.total, 1)
        span = 60 * v.fps
        start = max(0, v.playhead - (span * 3) // 4)
        return start, span

    def rows(self, width: int, height: int) -> list[Text]:
        """Bar, ruler and the newest live prompts (as many as fit)."""
        if self.view is None or width < 4:
            return []
        v = self.view
        start, span = self.window(v)
        lines = [self._bar(v, start, span, width), self._ruler(v, start, span, width)]
        for rec in reversed(v.live[max(len(v.live) - (height - 2), 0):] if height > 2 else []):
            kind = "re-roll" if rec.kind == "reroll" else rec.event.transition
            when = f"{format_time(round(rec.seconds, 2))} f{rec.frame} "
            lines.append(Text.assemble(("◆ ", "bold magenta"), (when, "bold"), (f"{kind}  ", "dim"), rec.event.prompt))
        for line in lines:
            line.truncate(width, overflow="ellipsis")
        return lines

    @staticmethod
    def _bar(v: TimelineView, start: int, span: int, width: int) -> Text:
        """Each column shows the event active at its frame: solid up to the playhead, shaded after it; an event's
        first column carries its shot number (storyboard) or ◆ (live)."""
        starts = [r["frame_start"] for r in v.ranges]  # sorted: events are ordered by block
        cols = [max(bisect.bisect_right(starts, start + (c + 0.5) * span / width) - 1, 0) for c in range(width)]
        head = (v.playhead - start) * width / span
        text = Text()
        run, run_style = "", None
        for c, idx in enumerate(cols):
            r = v.ranges[idx] if v.ranges else {"source": "storyboard", "shot": 0, "event": 0}
            live = r["source"] == "live"
            palette = LIVE_COLOURS if live else SHOT_COLOURS
            colour = palette[r.get("event", idx) % len(palette)]
            done = c < head
            if c == 0 or cols[c - 1] != idx:
                char, style = ("◆" if live else str((r["shot"] or 0) + 1)[-1]), (
                    f"bold black on {colour}" if done else f"bold {colour}")
            else:
                char, style = ("█" if done else "░"), colour
            if style != run_style and run:
                text.append(run, run_style)
                run = ""
            run, run_style = run + char, style
        if run:
            text.append(run, run_style)
        return text

    @staticmethod
    def _ruler(v: TimelineView, start: int, span: int, width: int) -> Text:
        """Start and end times, and the playhead (▲) with its time and frame."""
        line = [" "] * width
        left = format_time(start / v.fps)
        right = format_time((start + span) / v.fps) if v.total is not None else ""
        line[: len(left)] = left[:width]
        if right and len(left) + len(right) + 1 < width:
            line[width - len(right):] = right
        col = min(max(int((v.playhead - start) * width / span), 0), width - 1)
        label = f"▲ {format_time(round(v.playhead / v.fps, 1))} f{v.playhead}"
        if len(label) > width:
            label = "▲"
        at = min(col, width - len(label))
        line[at: at + len(label)] = label
        text = Text("".join(line), style="dim")
        text.stylize("bold yellow", at, at + len(label))
        return text


def _cache_text(caches: dict[str, Any]) -> str:
    """The backend's memory in a few characters: KV frames and sink (when it keeps a KV cache), then KV MB, or the
    whole state's MB (held latents) for a backend without a KV cache."""
    if not caches:
        return "-"
    if caches.get("kv_frames"):
        return f"{caches['kv_frames']:.0f} fr · sink {caches['kv_sink_frames']:.0f} · {caches['kv_mb']:.2f} MB"
    return f"{caches.get('latent_frames', 0):.0f} latents · {caches.get('state_mb', 0):.2f} MB"


def _frames_text(st: StudioStatus) -> str:
    """`85/192 0:05.3` or `85 0:05.3` (until stopped)."""
    t = format_time(round(st.frames_done / st.fps, 1))
    return f"{st.frames_done}/{st.num_frames} {t}" if st.num_frames is not None else f"{st.frames_done} {t}"


class StatusPanel(TextRows):
    """Preset, backend, seed, frame, speed against real time, caches, recording and the current prompt."""

    DEFAULT_CSS = "StatusPanel { width: 38; padding: 0 1; }"

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - textual's name
        super().__init__(id=id)
        self.status: StudioStatus | None = None
        self.preview_fps = 0.0

    def update_status(self, status: StudioStatus, preview_fps: float = 0.0) -> None:
        """New snapshot (and the preview's recent frame rate); repaint if anything changed."""
        if (status, preview_fps) != (self.status, self.preview_fps):
            self.status, self.preview_fps = status, preview_fps
            self.changed()

    def rows(self, width: int, height: int) -> list[Text]:
        """A few labelled lines."""
        st = self.status
        if st is None:
            return [Text("starting…", style="dim")]
        seed = f"{st.seed}" + (f" (shot {st.shot_seed})" if st.shot_seed is not None else "")
        speed = f"{st.realtime:.2f}× real time, {st.gen_fps:.0f} fps" if st.gen_fps else "-"
        rows = [
            ("preset", st.preset), ("backend", st.backend), ("seed", seed), ("frame", _frames_text(st)),
            ("speed", speed), ("kv", _cache_text(st.caches)), ("live", f"{st.live_prompts} prompt(s)"),
            ("preview", f"{self.preview_fps:.1f} fps"),
        ]
        if st.recording is not None:
            rows.append(("rec", f"{st.recording[1]} fr → {st.recording[0].name}"))
        head = Text.assemble((f"{STATE_MARKS.get(st.state, '?')} {st.state}", "bold cyan"))
        if st.recording is not None:
            head.append("  ● REC", "bold red")
        lines = [Text(st.title, "bold"), head]
        for key, value in rows:
            lines.append(Text.assemble((f"{key:<8}", "dim"), (value, "red" if key == "rec" else "")))
        for line in lines:
            line.truncate(width, overflow="ellipsis")
        if st.error:
            lines += _wrap(Text(st.error, "bold red"), width, 3, self.app.console)
        prompt = Text.assemble((f"{'prompt':<8}", "dim"), f"[{st.source}] {st.prompt}")
        return lines + _wrap(prompt, width, max(height - len(lines), 1), self.app.console)


class StatusLine(TextRows):
    """The status in one line, for small terminals."""

    DEFAULT_CSS = "StatusLine { height: 1; }"

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - textual's name
        super().__init__(id=id)
        self.status: StudioStatus | None = None

    def update_status(self, status: StudioStatus) -> None:
        """New snapshot; repaint if it changed (and only while shown)."""
        if status != self.status:
            self.status = status
            if self.display:
                self.changed()

    def on_show(self) -> None:
        """Shown again (the terminal became narrow): draw the latest status."""
        self.changed()

    def rows(self, width: int, height: int) -> list[Text]:
        """`▶ 85/192 0:05.3 · 1.5× rt 612fps · seed 7 ● REC`."""
        st = self.status
        if st is None:
            return [Text("starting…", style="dim")]
        parts = [f"{STATE_MARKS.get(st.state, '?')} {_frames_text(st)}"]
        if st.gen_fps:
            parts.append(f"{st.realtime:.1f}× rt {st.gen_fps:.0f}fps")
        parts.append(f"seed {st.shot_seed if st.shot_seed is not None else st.seed}")
        text = Text(" · ".join(parts))
        if st.recording is not None:
            text.append(" ● REC", "bold red")
        if st.error:
            text.append(f" {st.error}", "bold red")
        text.truncate(width, overflow="ellipsis")
        return [text]
