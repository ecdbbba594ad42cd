"""Video output: an atomic H.264 mp4 sink that browsers play, a probe to check files, contact sheets.

The mp4 is written to a partial file next to its final path and renamed into place when complete (`lvstudio.atomic`),
so a crash or Ctrl-C leaves either the old file or the new one, never a truncated one. PyAV and OpenCV are imported
lazily.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lvstudio.atomic import atomic_write_bytes, fsync_file, replace_durably
from lvstudio.errors import OutputExistsError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ContactFrames",
    "VideoInfo",
    "VideoSink",
    "join_mp4s",
    "probe_video",
    "write_contact_sheet",
]


# --------------------------------------------------------------------------------------------------------------
# H.264 sink
# --------------------------------------------------------------------------------------------------------------


def _check_fps(fps: int | float | Fraction) -> Fraction:
    """A positive frame rate as an exact Fraction (29.97 → 2997/100)."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise ValueError(f"fps must be a number, got {type(fps).__name__}")
    rate = Fraction(str(fps)) if isinstance(fps, float) else Fraction(fps)
    if not 0 < rate <= 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps}")
    return rate


class VideoSink:
    """Streams RGB frames into an H.264 (libx264, yuv420p, +faststart) mp4, atomically.

    Frames go to `.<name>.partial.mp4` next to `path`; `close()` finishes it and renames it into place, `abort()`
    deletes it. As a context manager it closes on success and aborts on an exception. An existing `path` is
    refused at construction unless `force=True`.
    """

    def __init__(
        self,
        path: str | Path,
        fps: int | float | Fraction,
        width: int,
        height: int,
        *,
        crf: int = 18,
        force: bool = False,
    ) -> None:
        for name, side in (("width", width), ("height", height)):
            if isinstance(side, bool) or not isinstance(side, int) or side < 2 or side % 2:
                raise ValueError(f"{name} must be an even number of pixels >= 2 (H.264 yuv420p), got {side!r}")
        if isinstance(crf, bool) or not isinstance(crf, int) or not 1 <= crf <= 51:
            raise ValueError(f"crf must be a whole number from 1 to 51 (0 makes a profile browsers reject), got {crf}")
        self.rate = _check_fps(fps)
        self.path = Path(path)
        self.width, self.height, self.crf, self.force = width, height, crf, force
        if self.path.is_dir():
            raise OutputExistsError(self.path, f"{self.path} is a folder", hint="give a file name ending in .mp4")
        if self.path.exists() and not force:
            raise OutputExistsError(self.path)
        self.partial_path = self.path.with_name(f".{self.path.name}.partial.mp4")
        self.frames_written = 0
        self._container: Any = None
        self._stream: Any = None
        self._done = False

    # --- writing ---------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Create the partial file and the encoder (on the first write)."""
        import av  # noqa: PLC0415

        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(self.partial_path), mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            stream = container.add_stream("libx264", rate=self.rate)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.codec_context.time_base = 1 / self.rate
            stream.options = {"crf": str(self.crf), "preset": "medium"}
        except BaseException:
            container.close()
            raise
        self._container, self._stream = container, stream

    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 RGB `[N, H, W, 3]` (a single `[H, W, 3]` frame is accepted too)."""
        import av  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        if self._done:
            raise RuntimeError("this VideoSink is already closed or aborted")
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"frames must be a uint8 numpy array [N, H, W, 3], got {type(frames).__name__}")
        if frames.ndim == 3:
            frames = frames[None]
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or frames.shape[1:] != expected or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [N, {self.height}, {self.width}, 3] RGB, got {frames.dtype} {list(frames.shape)}"
            )
        if self._container is None:
            self._open()
        for frame in frames:  # [H, W, 3]
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = self.frames_written
            self._container.mux(self._stream.encode(video_frame))
            self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder, finish the mp4 and move it to `path`; returns `path`."""
        self.finish()
        return self.commit()

    def finish(self) -> Path:
        """Flush the encoder and finish the mp4 at `partial_path` (fsynced), without moving it yet; returns that
        path, so side files can be made from the finished video before it appears under its name (`commit`)."""
        if self._done:
            raise RuntimeError("this VideoSink is already closed or aborted")
        if self._container is None and self.frames_written:
            return self.partial_path  # already finished
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}; nothing to save")
        try:
            self._container.mux(self._stream.encode())  # flush delayed frames
            self._container.close()
            self._container = None
            fsync_file(self.partial_path)
        except BaseException:
            self.abort()
            raise
        return self.partial_path

    def commit(self) -> Path:
        """Move the finished mp4 (`finish`) to `path`; returns `path`."""
        if self._done or self._container is not None or not self.partial_path.exists():
            raise RuntimeError("this VideoSink is not finished (call finish() first) or already closed")
        if self.path.exists() and not self.force:
            self._done = True
            raise OutputExistsError(
                self.path,
                f"{self.path} appeared while rendering; the new video was kept as {self.partial_path}",
                hint="rename it, or rerun with --force",
            )
        replace_durably(self.partial_path, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Stop and delete the partial file (idempotent; the final path is never touched)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is deleted anyway
                pass
            self._container = None
        try:
            self.partial_path.unlink()
        except FileNotFoundError:
            pass
        self._done = True

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._done:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _decode_delay(part: Path) -> int:
    """How many frames the first decode time of an mp4 part lies before its first presentation time."""
    import av  # noqa: PLC0415

    with av.open(str(part)) as src:
        s = src.streams.video[0]
        first = next((p for p in src.demux(s) if p.dts is not None), None)
        if first is None:
            raise ValueError(f"{part} holds no video packets")
        return round(float((first.pts - first.dts) * s.time_base * s.average_rate))


def join_mp4s(parts: list[Path], path: str | Path) -> Path:
    """Join H.264 mp4 parts (each from its own `VideoSink`, same size and settings, each starting on a keyframe)
    into one mp4 at `path` (+faststart, atomic) without re-encoding: the joined file holds the parts' very packets,
    so it decodes to exactly the frames the parts decode to. Returns `path`.

    Each part's presentation times are shifted by the frames before it. Decode times are laid out evenly with one
    delay for the whole file, the largest of the parts' B-frame delays (x264 gives a part of one frame none), so
    they keep rising across the joins. Parts whose codec headers differ (another size or encoder setting) are
    refused with ValueError.
    """
    import av  # noqa: PLC0415

    from lvstudio.atomic import atomic_path  # noqa: PLC0415

    if not parts:
        raise ValueError("join_mp4s needs at least one part")
    delay = max(_decode_delay(part) for part in parts)  # frames
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4",
                                           options={"movflags": "+faststart"}) as out:
        stream: Any = None
        header: bytes | None = None
        offset = 0  # frames of the parts before this one
        for part in parts:
            with av.open(str(part)) as src:
                s = src.streams.video[0]
                if stream is None:
                    stream, header = out.add_stream_from_template(s), bytes(s.codec_context.extradata or b"")
                    stream.time_base = s.time_base
                elif bytes(s.codec_context.extradata or b"") != header or s.time_base != stream.time_base:
                    raise ValueError(f"{part} was not encoded like {parts[0]} (codec header or time base differ)")
                ticks = round(1 / (s.average_rate * s.time_base))  # one frame, in ticks
                frames = 0
                for packet in src.demux(s):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.pts += offset * ticks
                    packet.dts = (offset + frames - delay) * ticks
                    packet.stream = stream
                    out.mux(packet)
                    frames += 1
                offset += frames
    return Path(path)


# --------------------------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` reads back from a file."""

    codec: str
    pix_fmt: str
    profile: str | None
    width: int
    height: int
    num_frames: int
    fps: float
    duration: float
    faststart: bool


def _top_level_atoms(path: Path) -> list[str]:
    """Types of the top-level MP4 boxes, in file order (`ftyp`, `moov`, `mdat`, …)."""
    atoms: list[str] = []
    size_total = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= size_total and len(atoms) < 1000:
            handle.seek(offset)
            size, kind = struct.unpack(">I4s", handle.read(8))
            if size == 1:  # 64-bit size follows
                (size,) = struct.unpack(">Q", handle.read(8))
            elif size == 0:  # box runs to the end of the file
                size = size_total - offset
            if size < 8:
                break
            atoms.append(kind.decode("latin-1"))
            offset += size
    return atoms


def probe_video(path: str | Path) -> VideoInfo:
    """Codec, pixel format, profile, size, frame count, fps, duration and faststart of a video file."""
    import av  # noqa: PLC0415

    file = Path(path)
    with av.open(str(file)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        num_frames = stream.frames
        if not num_frames:  # container does not store a count: decode and count
            num_frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or 0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = num_frames / float(rate) if rate else 0.0
        info = VideoInfo(
            codec=ctx.name,
            pix_fmt=ctx.pix_fmt or "",
            profile=ctx.profile,
            width=ctx.width,
            height=ctx.height,
            num_frames=int(num_frames),
            fps=float(rate),
            duration=duration,
            faststart=False,
        )
    atoms = _top_level_atoms(file)
    faststart = "moov" in atoms and "mdat" in atoms and atoms.index("moov") < atoms.index("mdat")
    return VideoInfo(**{**info.__dict__, "faststart": faststart})


def iter_video_frames(path: str | Path, width: int, height: int) -> Iterator[np.ndarray]:
    """The frames of a video file, decoded one by one as uint8 RGB [height, width, 3] (resized with area averaging
    when the file has another size). The file is opened now: LvError naming it when it is missing or not a video."""
    import av  # noqa: PLC0415

    from lvstudio.errors import LvError  # noqa: PLC0415

    file = Path(path)
    if not file.is_file():
        raise LvError(f"video not found: {file}", hint="give the path of an mp4 made by lvstudio render (or any video)")
    try:
        container = av.open(str(file))
    except av.error.FFmpegError as err:
        raise LvError(f"{file} is not a video ({err})", hint="give an mp4 file") from None
    if not container.streams.video:
        container.close()
        raise LvError(f"{file} has no video stream", hint="give an mp4 file")
    return _decoded(container, width, height)


def _decoded(container: Any, width: int, height: int) -> Iterator[np.ndarray]:
    import cv2  # noqa: PLC0415

    with container:
        for frame in container.decode(container.streams.video[0]):
            rgb = frame.to_ndarray(format="rgb24")  # [h, w, 3]
            if rgb.shape[:2] != (height, width):
                rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
            yield rgb


# --------------------------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------------------------


class ContactFrames:
    """Collects the frames of a contact sheet while a video is made (the CLI render and the web studio use it).

    Keeps one frame every `every_s` seconds, plus the frames asked for with `want` (e.g. the middle frame of every
    storyboard shot). `items(shots)` gives the labelled thumbnails: one per shot with frames (the kept frame nearest
    to its middle), then the periodic ones.
    """

    def __init__(self, fps: int, every_s: float = 4.0) -> None:
        self.fps = fps
        self.every = max(1, round(every_s * fps))
        self.wanted: set[int] = set()
        self.frames: dict[int, np.ndarray] = {}  # periodic frames by index
        self.extra: dict[int, np.ndarray] = {}  # wanted frames off the period

    def want(self, indices: Iterable[int]) -> None:
        """Also keep these frame indices (those not yet made)."""
        self.wanted.update(indices)

    def offer(self, frames: np.ndarray, start: int) -> None:
        """Frames [n, H, W, 3] uint8 of the video from frame `start` on."""
        for i in range(frames.shape[0]):
            if (start + i) % self.every == 0:
                self.frames[start + i] = frames[i].copy()
            elif start + i in self.wanted:
                self.extra[start + i] = frames[i].copy()

    def items(self, shots: list[dict[str, Any]]) -> list[tuple[str, np.ndarray]]:
        """(label, frame) thumbnails: per shot row (frame_start, frame_end, shot) with frames, then every period."""
        from lvstudio.storyboard import format_time  # noqa: PLC0415

        pool = {**self.frames, **self.extra}
        keys = sorted(pool)
        out: list[tuple[str, np.ndarray]] = []
        for r in shots:
            if not keys or r["frame_end"] <= r["frame_start"]:
                continue
            mid = (r["frame_start"] + r["frame_end"]) // 2
            near = min(keys, key=lambda k: abs(k - mid))
            label = f"shot {r['shot'] + 1}" if r["shot"] is not None else "live"
            out.append((f"{label} {format_time(near / self.fps)}", pool[near]))
        out += [(format_time(k / self.fps), self.frames[k]) for k in sorted(self.frames)]
        return out


def write_contact_sheet(
    path: str | Path,
    items: list[tuple[str, np.ndarray]],
    columns: int = 6,
    *,
    thumb_width: int = 192,
) -> Path:
    """A PNG grid of labelled thumbnails (uint8 RGB `[H, W, 3]` frames), written atomically; returns `path`."""
    import cv2  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if not items:
        raise ValueError("write_contact_sheet needs at least one (label, frame) item")
    if columns < 1 or thumb_width < 16:
        raise ValueError(f"columns must be >= 1 and thumb_width >= 16, got {columns}, {thumb_width}")
    for label, frame in items:
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame {label!r} must be uint8 [H, W, 3] RGB")
        if frame.shape[0] < 1 or frame.shape[1] < 1:
            raise ValueError(f"frame {label!r} is empty")

    # Step 1: one cell size for all: thumb_width wide, height from the tallest aspect ratio.
    thumb_h = max(max(1, round(thumb_width * f.shape[0] / f.shape[1])) for _, f in items)
    label_h, pad = 18, 4
    cell_w, cell_h = thumb_width + 2 * pad, thumb_h + label_h + 2 * pad
    rows = -(-len(items) // columns)
    ncols = min(columns, len(items))
    sheet = np.full((rows * cell_h, ncols * cell_w, 3), 24, dtype=np.uint8)  # [H, W, 3] RGB
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1

    for k, (label, frame) in enumerate(items):
        # Step 2: fit the frame in the cell, keeping its aspect ratio.
        h = max(1, round(thumb_width * frame.shape[0] / frame.shape[1]))
        interp = cv2.INTER_AREA if frame.shape[1] > thumb_width else cv2.INTER_LINEAR
        thumb = cv2.resize(frame, (thumb_width, h), interpolation=interp)  # [h, thumb_width, 3]
        top, left = (k // columns) * cell_h + pad, (k % columns) * cell_w + pad
        sheet[top : top + h, left : left + thumb_width] = thumb
        # Step 3: the label, ASCII only (Hershey fonts), shortened to fit the cell.
        text = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(label))
        while text and cv2.getTextSize(text, font, scale, thickness)[0][0] > thumb_width:
            text = text[:-2] + "~" if len(text) > 1 else ""
        cv2.putText(sheet, text, (left, top + thumb_h + label_h - 5), font, scale, (235, 235, 235), thickness,
                    cv2.LINE_AA)

    # Step 4: encode (OpenCV wants BGR) and write atomically.
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the contact sheet as PNG")
    return atomic_write_bytes(path, png.tobytes())
