"""Oracle scores for a render's manifest: how well each shot of a world-preset video follows its prompt.

The render session creates an `OracleEvaluator` when its preset was trained on the procedural world (its output is
what the oracle can read) and offers it every finished chunk's frames as they stream. The evaluator reads every
`stride`-th frame at once and keeps only the readings (scene and objects: a few bytes per frame, never the frames),
so renders of any length are scored; at the end the manifest asks it to score the shots against their prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lvstudio.world.grammar import parse_caption
from lvstudio.world.oracle import FrameReading, adherence_of_readings, read_frame


class OracleEvaluator:
    """Reads the frames of a render as they arrive and adds `oracle_adherence` (scene, colour, shape, objects) to
    each shot row of the manifest."""

    key = "oracle_adherence"

    def __init__(self, stride: int = 1) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = stride
        self._next = 0  # the next video frame expected
        self._readings: dict[int, FrameReading] = {}  # video frame index -> what the oracle read there

    def offer(self, frames: np.ndarray, start: int) -> None:
        """The frames [n, H, W, 3] of the video from frame `start` on (chunks arrive in order)."""
        if start != self._next:
            raise ValueError(f"frames must arrive in order: got frame {start}, expected {self._next}")
        for i in range(frames.shape[0]):
            if (start + i) % self.stride == 0:
                self._readings[start + i] = read_frame(frames[i])
        self._next = start + frames.shape[0]

    @property
    def frames_read(self) -> int:
        return len(self._readings)

    def score(self, shots: list[dict[str, Any]]) -> None:
        """Add `oracle_adherence` to every shot row (frame_start, frame_end, resolved prompt) with frames read."""
        for row in shots:
            readings = [self._readings[f] for f in range(row["frame_start"], row["frame_end"]) if f in self._readings]
            if readings:
                spec = parse_caption(row["resolved"])
                score = adherence_of_readings(readings, [spec] * len(readings))
                row[self.key] = {k: round(v, 3) for k, v in score.items()}
