"""Oracle scores for a render's manifest: how well each shot of a world-preset video follows its prompt.

The render session creates an `OracleEvaluator` when its preset was trained on the procedural world (its output is
what the oracle can read) and the video is short enough to keep in memory; it offers every finished chunk's frames,
and the manifest asks it to score the shots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lvstudio.world.grammar import parse_caption
from lvstudio.world.oracle import adherence


class OracleEvaluator:
    """Keeps the frames of a render in order and adds `oracle_adherence` (scene, colour, shape) to each shot."""

    key = "oracle_adherence"

    def __init__(self) -> None:
        self._frames: list[np.ndarray] = []  # [n, H, W, 3] uint8 per chunk, in video order

    def offer(self, frames: np.ndarray, start: int) -> None:
        """The frames [n, H, W, 3] of the video from frame `start` on (chunks arrive in order)."""
        done = sum(f.shape[0] for f in self._frames)
        if start != done:
            raise ValueError(f"frames must arrive in order: got frame {start}, expected {done}")
        if frames.shape[0]:
            self._frames.append(frames)

    def score(self, shots: list[dict[str, Any]]) -> None:
        """Add `oracle_adherence` to every shot row (frame_start, frame_end, resolved prompt) that has frames."""
        if not self._frames:
            return
        video = np.concatenate(self._frames)  # [F, H, W, 3]
        for row in shots:
            clip = video[row["frame_start"] : row["frame_end"]]
            if clip.shape[0]:
                score = adherence(clip, parse_caption(row["resolved"]))
                row[self.key] = {k: round(v, 3) for k, v in score.items()}
