"""PreviewBudget: keeps the preview from slowing generation by stretching the time between preview frames.

Generation and the UI share one Python process (and its GIL). Drawing a frame costs the UI thread and the preview
pump CPU time, and a small model's generating thread is mostly Python, so that time comes straight out of
generation. After each frame the budget measures the CPU the watched threads (UI + pump) used since the previous
frame and waits long enough that their share of the wall clock stays under `share` (e.g. 0.05 = 5% of one core).
Cheap frames (small panes, flat pictures) play at the full rate; expensive ones (large panes, noisy pictures) play
slower, never faster than `min_interval` nor slower than `max_interval`.
"""

from __future__ import annotations

import threading
import time


def thread_cpu_seconds(ident: int) -> float | None:
    """CPU seconds used so far by the thread `ident` (threading.get_ident()), or None where the OS cannot say."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (AttributeError, OSError, OverflowError):
        return None


class PreviewBudget:
    """Interval controller: `next_interval()` after each preview frame gives the wait before the next one."""

    def __init__(self, share: float, min_interval: float, max_interval: float = 2.0, smoothing: float = 0.3) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        if not 0 < min_interval <= max_interval:
            raise ValueError(f"need 0 < min_interval <= max_interval, got {min_interval}, {max_interval}")
        self.share = share
        self.min_interval, self.max_interval = min_interval, max_interval
        self.smoothing = smoothing
        self._threads: list[int] = []
        self._lock = threading.Lock()
        self._last_cpu: float | None = None
        self.cost = 0.0  # smoothed CPU seconds per preview frame (UI + pump), 0 until measured
        self.interval = min_interval

    def watch(self, ident: int) -> None:
        """Count this thread's CPU time (call with threading.get_ident() from the thread, or pass its ident)."""
        with self._lock:
            if ident not in self._threads:
                self._threads.append(ident)
                self._last_cpu = None  # restart the measurement with the new set of threads

    def restart(self) -> None:
        """Measure from now: call before the first frame, and while idle (idle UI work is not charged to a frame)."""
        with self._lock:
            self._last_cpu = self._cpu()

    def cpu(self) -> float | None:
        """Total CPU seconds so far of the watched threads that are still alive (None where the OS cannot say)."""
        with self._lock:
            return self._cpu()

    def _cpu(self) -> float | None:
        """Total CPU seconds of the watched threads (None if unavailable for any of them)."""
        total = 0.0
        for ident in list(self._threads):
            cpu = thread_cpu_seconds(ident)
            if cpu is None:
                return None
            total += cpu
        return total

    def next_interval(self) -> float:
        """Seconds to wait before the next preview frame, from the CPU used since the previous call."""
        with self._lock:
            cpu = self._cpu()
            if cpu is None:  # cannot measure: a conservative fixed rate
                self.interval = max(self.min_interval, min(0.25, self.max_interval))
                return self.interval
            if self._last_cpu is not None:
                used = max(cpu - self._last_cpu, 0.0)
                self.cost = used if self.cost == 0 else (1 - self.smoothing) * self.cost + self.smoothing * used
            self._last_cpu = cpu
            self.interval = min(max(self.cost / self.share, self.min_interval), self.max_interval)
            return self.interval
