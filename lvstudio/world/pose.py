"""How a world clip's objects start (`Pose`): the world's own (any angle, anywhere) or narrowed for a training set.

A pose acts only on where and at what angle each object *starts*, on how long the world runs before the first
recorded frame and (`through_edges`) on how a moving object passes the frame's edges; the random numbers drawn are the
same whatever the pose, so captions, motions and sizes do not change with it. numpy-free, torch-free.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_CENTRED_SPAN = 0.5  # a centred object starts in the middle half of the positions it could take, on each axis


@dataclass(frozen=True)
class Pose:
    """How objects start a clip. The default is the world's own: any angle, anywhere in the frame. A training set may
    narrow it so that a prompt has fewer equally good pictures (the model then learns one, not their blurred mean):
    `upright` starts every object at angle 0 — a square cube, a triangle and a star with a point up (`spinning` ones
    still turn); `centred` starts it in the middle half of the positions it could take on each axis (moving ones
    still start on their trailing side, and leave the centre as they move); `slots` (it takes over from `centred`)
    starts object j of n at a fixed place (`slot`: one object in the middle, two on a diagonal of the middle; moving
    ones on their trailing side as ever), so that a caption's first frame has one layout; `grid` (px, 0 = off) then
    moves each starting centre to the nearest centre of a `grid`-px cell, e.g. 16 for a DiT whose tokens cover 2 x 2
    latents of an 8x VAE, so that a shape starts at the same place inside its token.

    `late_prob` / `late_frames`: a share of clips starts late, the world having run 1..`late_frames` frames (uniform)
    from that start before the first recorded frame, so that a short clip shows what only a long shot reaches:
    `moving` objects wrapping to the opposite edge, `growing` ones restarting small, any phase of a bounce or a turn.
    Which clips and how late is drawn from the clip's seed by its own generator (`lead_in`).

    `moving_in_slots` (with `slots`): moving objects start at their slot too, not on their trailing side, so that
    object j of a caption starts at the same place whatever its motion (one layout per number of objects).

    `through_edges`: a moving object leaves the frame across the edge it moves to and comes back across the opposite
    one, at its speed (it is out of sight for a moment, and cut by the edge while it crosses), instead of the world's
    jump from one edge to the other in a frame: nothing in a clip jumps, so no 4-frame latent holds the object at two
    places."""

    upright: bool = False
    centred: bool = False
    grid: int = 0
    slots: bool = False
    moving_in_slots: bool = False
    through_edges: bool = False
    late_prob: float = 0.0
    late_frames: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 0:
            raise ValueError(f"grid must be a whole number of px >= 0 (0 = off), got {self.grid!r}")
        if isinstance(self.late_frames, bool) or not isinstance(self.late_frames, int) or self.late_frames < 0:
            raise ValueError(f"late_frames must be a whole number of frames >= 0, got {self.late_frames!r}")
        if not 0.0 <= self.late_prob <= 1.0:
            raise ValueError(f"late_prob must be in [0, 1], got {self.late_prob!r}")
        if self.moving_in_slots and not self.slots:
            raise ValueError("moving_in_slots starts moving objects at their slots: it needs slots = True")

    def lead_in(self, seed: int) -> int:
        """Frames the world runs before the first recorded frame of the clip of this seed (0: it starts at once)."""
        if not self.late_frames or not self.late_prob:
            return 0
        rng = random.Random(seed)  # its own stream: the clip's numpy draws are the same late or not
        return rng.randint(1, self.late_frames) if rng.random() < self.late_prob else 0

    def words(self) -> str:
        """"upright, centred, on a 16-px grid, 30% of clips up to 96 frames late"; "" for the world's own pose."""
        words = [w for w, on in (("upright", self.upright), ("centred", self.centred), ("in fixed slots", self.slots),
                                 ("moving ones too", self.moving_in_slots),
                                 ("moving through the edges", self.through_edges)) if on]
        words += [f"on a {self.grid}-px grid"] if self.grid else []
        if self.late_frames and self.late_prob:
            words.append(f"{self.late_prob:.0%} of clips up to {self.late_frames} frames late")
        return ", ".join(words)

    def fractions(self, u: float, w: float, j: int, n: int) -> tuple[float, float]:
        """Where object j of n starts, as fractions of its free positions on each axis, from the drawn (u, w)."""
        if self.slots:
            return slot(j, n)
        if self.centred:
            return 0.5 + _CENTRED_SPAN * (u - 0.5), 0.5 + _CENTRED_SPAN * (w - 0.5)
        return u, w

    def snap(self, v: float, lo: float, hi: float) -> float:
        """v (px) on the grid: the centre of the `grid`-px cell nearest to v that lies in [lo, hi] (v itself with no
        grid, or when no cell centre lies there). Pixel i is drawn centred on coordinate i (cv2), so the cell of
        pixels [k*grid, (k+1)*grid) is centred on k*grid + (grid - 1) / 2."""
        if not self.grid:
            return v
        half = (self.grid - 1) / 2
        p = self.grid * round((v - half) / self.grid) + half
        p = p + self.grid if p < lo else p - self.grid if p > hi else p
        return p if lo <= p <= hi else v


WORLD_POSE = Pose()  # the world's own: any angle, anywhere


def slot(j: int, n: int) -> tuple[float, float]:
    """Where object j of n starts under `Pose.slots`, as fractions of its free positions on each axis: one object in
    the middle; several on the diagonal of the middle half, first upper left (apart on both axes, so that two
    objects moving the same way do not start on top of each other)."""
    if n == 1:
        return 0.5, 0.5
    t = 0.25 + 0.5 * j / (n - 1)
    return t, t
