"""The web studio's live video: the render as short H.264 segments that the page plays back to back, joined into the
finished mp4 at the end.

One segment per chunk: a segment leaves as soon as its chunk is decoded (no waiting for frames of the next chunk),
and a live prompt lands at a block start, which is a chunk start, so the first segment made under a new prompt
begins with it. Chunks shorter than `min_segment_s` (the streaming backend's are a few frames) are joined with the
next one (except the first chunk, which goes out alone: it sets the time to the first frame), so the browser and
gradio (which re-muxes every segment with ffmpeg) do not pay per-segment costs many times a second.

Each segment is an mp4 written by its own `VideoSink` (libx264, yuv420p, crf 18, preset medium: the settings of
`lvstudio render`), so it starts on a keyframe and plays on its own. The finished mp4 is the segments joined without
re-encoding (`join_mp4s`): what was watched is, frame for frame, what is downloaded. Segments live in the job's
folder (`<job>/<job>.stream/`) and are deleted when the render ends, whatever way it ends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lvstudio.video import VideoSink, join_mp4s

MIN_SEGMENT_S = 0.5


class LiveVideo:
    """Frames in, segments out (`write`, `segment`), the joined mp4 at the end (`close`) or nothing (`abort`)."""

    def __init__(self, path: Path, fps: int, width: int, height: int, *, min_segment_s: float = MIN_SEGMENT_S) -> None:
        self.path = Path(path)
        self.fps, self.width, self.height = fps, width, height
        self.folder = self.path.with_name(self.path.stem + ".stream")  # <job>/<job>.stream/
        self.min_frames = max(1, round(min_segment_s * fps))
        self.segments: list[Path] = []
        self.frames_written = 0  # frames in segments so far
        self._pending: list[np.ndarray] = []  # [n, H, W, 3] uint8 arrays not in a segment yet
        self._done = False

    @property
    def pending_frames(self) -> int:
        return sum(f.shape[0] for f in self._pending)

    def write(self, frames: np.ndarray) -> None:
        """Queue a chunk's frames ([n, H, W, 3] uint8 RGB) for the next segment."""
        if self._done:
            raise RuntimeError("this LiveVideo is already closed or aborted")
        if frames.shape[0]:
            self._pending.append(frames)

    def segment(self, *, final: bool = False) -> Path | None:
        """Encode the queued frames into the next segment if they last `min_segment_s` (any length when `final`);
        returns its path, or None when nothing is due."""
        count = self.pending_frames
        if count == 0 or (count < self.min_frames and self.segments and not final):
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.segments):06d}.mp4"
        sink = VideoSink(path, self.fps, self.width, self.height, force=True)
        try:
            sink.write(np.concatenate(self._pending))
            sink.close()
        except BaseException:
            sink.abort()
            raise
        self._pending = []
        self.segments.append(path)
        self.frames_written += count
        return path

    def close(self) -> Path:
        """Encode what is queued, join every segment into the mp4 at `path` (atomically), delete the segments;
        returns `path`. ValueError when no frame was written."""
        if self._done:
            raise RuntimeError("this LiveVideo is already closed or aborted")
        try:
            self.segment(final=True)
            if not self.segments:
                raise ValueError(f"no frames were written to {self.path}; nothing to save")
            join_mp4s(self.segments, self.path)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Delete the segments (idempotent); the mp4's path is never touched."""
        self._done = True
        self._pending = []
        shutil.rmtree(self.folder, ignore_errors=True)
