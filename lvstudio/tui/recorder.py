"""Recorder: start/stop an mp4 of the live frames from the UI while the generating thread writes chunks.

File names come from a timestamp (`lvstudio-YYYYmmdd-HHMMSS.mp4`, then `-2`, `-3`, ... if taken), never from prompt
text. All media goes through `lvstudio.video.VideoSink` (H.264, atomic: a partial file is renamed into place on stop).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from lvstudio.video import VideoSink


def timestamp_name(folder: Path, when: datetime, suffix: str, prefix: str = "lvstudio") -> Path:
    """`folder/<prefix>-YYYYmmdd-HHMMSS<suffix>`, with `-2`, `-3`, ... appended before the suffix if it exists."""
    stem = f"{prefix}-{when:%Y%m%d-%H%M%S}"
    path = folder / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


@dataclass(frozen=True)
class Recording:
    """A finished recording: the mp4 and the video frame range it holds ([first_frame, first_frame + frames))."""

    path: Path
    first_frame: int
    frames: int


class Recorder:
    """One VideoSink at a time; `write` is called from the generating thread, the rest from the UI."""

    def __init__(self, folder: Path, fps: int, width: int, height: int) -> None:
        self.folder = folder
        self.fps, self.width, self.height = fps, width, height
        self._lock = threading.Lock()
        self._sink: VideoSink | None = None
        self._first: int | None = None
        self.done: list[Recording] = []

    @property
    def active(self) -> bool:
        """True while a recording is open."""
        with self._lock:
            return self._sink is not None

    @property
    def current(self) -> tuple[Path, int] | None:
        """(path, frames written) of the open recording, or None."""
        with self._lock:
            return None if self._sink is None else (self._sink.path, self._sink.frames_written)

    def start(self, path: Path | None = None, when: datetime | None = None) -> Path:
        """Open a new recording (a timestamped name in the folder unless `path` is given); returns its path."""
        with self._lock:
            if self._sink is not None:
                return self._sink.path
            self.folder.mkdir(parents=True, exist_ok=True)
            target = path if path is not None else timestamp_name(self.folder, when or datetime.now(), ".mp4")
            self._sink = VideoSink(target, self.fps, self.width, self.height)
            self._first = None
            return target

    def write(self, frames: np.ndarray, frame_start: int) -> None:
        """Append a chunk's frames ([n, H, W, 3] uint8) if recording (generating thread)."""
        with self._lock:
            if self._sink is None or frames.shape[0] == 0:
                return
            if self._first is None:
                self._first = frame_start
            self._sink.write(frames)

    def stop(self) -> Recording | None:
        """Finish the open recording (atomic rename into place); None if nothing was open or nothing recorded."""
        with self._lock:
            sink, first = self._sink, self._first
            self._sink, self._first = None, None
        if sink is None:
            return None
        if sink.frames_written == 0:
            sink.abort()
            return None
        path = sink.close()
        rec = Recording(path, first or 0, sink.frames_written)
        self.done.append(rec)
        return rec

    def abort(self) -> None:
        """Drop the open recording (its partial file is deleted)."""
        with self._lock:
            sink, self._sink = self._sink, None
        if sink is not None:
            sink.abort()
