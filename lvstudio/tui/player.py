"""FramePlayer: the mailbox between the generating thread and the preview.

The generating thread `offer`s each chunk (a reference, never a copy; O(1), never blocks on the UI). The preview
side plays the newest chunk's frames at the video's frame rate and jumps to the next chunk as soon as it arrives, so
the preview stays live when generation is faster than real time and shows every frame when it is slower.
"""

from __future__ import annotations

import threading
import time

import numpy as np


class FramePlayer:
    """Thread-safe latest-chunk slot with a playback clock (`fps` frames per second)."""

    def __init__(self, fps: float) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._frames: np.ndarray | None = None  # [n, H, W, 3] uint8 of the newest chunk
        self._start = 0  # video frame index of _frames[0]
        self._t0 = 0.0  # when the newest chunk arrived (perf_counter)
        self._serial = 0  # chunks offered so far
        self._shown: tuple[int, int] | None = None  # (serial, index in chunk) last handed out

    def offer(self, frames: np.ndarray, frame_start: int) -> None:
        """A new chunk ([n, H, W, 3] uint8, first frame index); called by the generating thread."""
        if frames.shape[0] == 0:
            return
        with self._lock:
            self._frames, self._start = frames, frame_start
            self._t0 = time.perf_counter()
            self._serial += 1
        self._arrived.set()

    @property
    def chunks_offered(self) -> int:
        """How many chunks arrived so far."""
        with self._lock:
            return self._serial

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a new chunk; True if one arrived (clears the signal)."""
        got = self._arrived.wait(timeout)
        self._arrived.clear()
        return got

    def next_frame(self, now: float | None = None) -> tuple[int, np.ndarray] | None:
        """The frame due at `now` as (video frame index, [H, W, 3]) if it was not handed out yet, else None."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            if self._frames is None:
                return None
            k = min(int((now - self._t0) * self.fps), self._frames.shape[0] - 1)
            k = max(k, 0)
            if self._shown == (self._serial, k):
                return None
            self._shown = (self._serial, k)
            return self._start + k, self._frames[k]

    def exhausted(self) -> bool:
        """True when every frame of the newest chunk has been handed out (nothing is due until a new chunk)."""
        with self._lock:
            return self._frames is None or self._shown == (self._serial, self._frames.shape[0] - 1)

    def latest(self) -> tuple[int, np.ndarray] | None:
        """The newest frame (index, [H, W, 3]) regardless of the clock, or None before the first chunk."""
        with self._lock:
            if self._frames is None:
                return None
            return self._start + self._frames.shape[0] - 1, self._frames[-1]
