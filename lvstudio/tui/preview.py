"""Half-block preview: an RGB frame as terminal cells, two pixels per cell ("▀": fg = upper pixel, bg = lower).

Pure and deterministic (the same frame and pane size give the same segments), no Textual import: the TUI wraps the
lines in Strips, tests compare them as text and colours. The frame is scaled to fit the pane with its aspect ratio
kept (terminal cells are about twice as tall as wide, so a half-block pixel is roughly square).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style

UPPER_HALF = "\u2580"  # ▀
MAX_STYLES = 1 << 16  # style cache bound (cleared when full; the cache only saves time)


@dataclass(frozen=True)
class PreviewSize:
    """The image area inside a pane: `cells_w` x `cells_h` cells = `cells_w` x 2*`cells_h` pixels."""

    cells_w: int
    cells_h: int

    @property
    def pixels(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.cells_w, 2 * self.cells_h


def fit_preview(frame_w: int, frame_h: int, pane_w: int, pane_h: int) -> PreviewSize:
    """The largest image area (in cells) that shows a `frame_w` x `frame_h` frame in a pane, aspect kept."""
    if frame_w < 1 or frame_h < 1:
        raise ValueError(f"frame size must be positive, got {frame_w}x{frame_h}")
    if pane_w < 1 or pane_h < 1:
        return PreviewSize(0, 0)
    scale = min(pane_w / frame_w, 2 * pane_h / frame_h)
    cells_w = max(1, min(pane_w, int(frame_w * scale)))
    cells_h = max(1, min(pane_h, int(frame_h * scale) // 2))
    return PreviewSize(cells_w, cells_h)


def scale_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an RGB frame [H, W, 3] uint8 to [height, width, 3]: area average when shrinking, nearest otherwise."""
    import cv2

    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 [H, W, 3] RGB, got {frame.dtype} {list(frame.shape)}")
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return frame
    shrink = width <= w and height <= h
    mode = cv2.INTER_AREA if shrink else cv2.INTER_NEAREST
    return cv2.resize(np.ascontiguousarray(frame), (width, height), interpolation=mode)  # [height, width, 3]


class HalfBlockRenderer:
    """Turns frames into rows of rich Segments.

    Colours are quantised to `bits` per channel (default 5: steps of 8, invisible in a preview) so that neighbouring
    cells merge into one segment more often and styles repeat between frames: this renderer, rich and Textual all
    cache per style, and fewer distinct styles make a frame much cheaper to draw. `bits=8` keeps exact colours.
    """

    def __init__(self, bits: int = 5) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be 1..8, got {bits}")
        self.bits = bits
        self._styles: dict[int, Style] = {}
        self._colours: dict[int, Color] = {}

    def _colour(self, rgb: int) -> Color:
        """A rich Color for a packed 24-bit RGB value (cached)."""
        colour = self._colours.get(rgb)
        if colour is None:
            colour = Color.from_rgb(rgb >> 16, (rgb >> 8) & 255, rgb & 255)
            self._colours[rgb] = colour
        return colour

    def _style(self, key: int) -> Style:
        """The style of a cell whose upper pixel is key >> 24 and lower pixel key & 0xFFFFFF (packed RGB)."""
        style = self._styles.get(key)
        if style is None:
            if len(self._styles) >= MAX_STYLES:
                self._styles.clear()
                self._colours.clear()
            style = Style.from_color(self._colour(key >> 24), self._colour(key & 0xFFFFFF))
            self._styles[key] = style
        return style

    def quantise(self, img: np.ndarray) -> np.ndarray:
        """Snap uint8 channels to the centre of their `bits`-bit bucket (identity for 8 bits)."""
        if self.bits == 8:
            return img
        step = 1 << (8 - self.bits)
        return (img & (256 - step)) | (step >> 1)

    def render(self, frame: np.ndarray, pane_w: int, pane_h: int) -> list[list[Segment]]:
        """Segments of the frame scaled to fit a `pane_w` x `pane_h` cell pane (no padding; see `fit_preview`)."""
        size = fit_preview(frame.shape[1], frame.shape[0], pane_w, pane_h)
        if size.cells_w == 0:
            return []
        pw, ph = size.pixels
        img = self.quantise(scale_frame(frame, pw, ph)).astype(np.int64)  # [ph, pw, 3]
        packed = (img[..., 0] << 16) | (img[..., 1] << 8) | img[..., 2]  # [ph, pw] RGB as 24-bit ints
        keys = (packed[0::2] << 24) | packed[1::2]  # [ph/2, pw] one key per cell: upper << 24 | lower
        lines: list[list[Segment]] = []
        for row in keys.tolist():
            # Step 1: run-length merge of equal neighbouring cells (flat areas cost one segment).
            segments: list[Segment] = []
            start = 0
            for x in range(1, len(row) + 1):
                if x == len(row) or row[x] != row[start]:
                    segments.append(Segment(UPPER_HALF * (x - start), self._style(row[start])))
                    start = x
            lines.append(segments)
        return lines
