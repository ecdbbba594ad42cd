"""H.264 output that browsers play, written atomically; probes; contact sheets; atomic writes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lvstudio.atomic import atomic_write_bytes, atomic_write_text
from lvstudio.errors import LvError, OutputExistsError
from lvstudio.video import VideoSink, probe_video, write_contact_sheet

ROOT = Path(__file__).resolve().parents[1]
W, H = 64, 48


def _frames(n: int, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients (compress like video, unlike noise): uint8 [n, H, W, 3]."""
    y, x = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W, 3), dtype=np.uint8)
    for t in range(n):
        out[t, ..., 0] = (x * 4 + t * 8 + seed) % 256
        out[t, ..., 1] = (y * 5 + t * 3) % 256
        out[t, ..., 2] = 128
    return out


def _solid(n: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (n, H, W, 3)).copy()


def _decode_first(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")  # [H, W, 3]


def test_writes_browser_playable_h264(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    with VideoSink(out, 8, W, H) as sink:
        sink.write(_frames(12))
        sink.write(_frames(8, seed=3)[0])  # a single [H, W, 3] frame is accepted too
        sink.write(_frames(7, seed=5))
    assert sink.frames_written == 20
    info = probe_video(out)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert info.profile is not None and "4:4:4" not in info.profile
    assert (info.width, info.height) == (W, H) and info.width % 2 == 0 and info.height % 2 == 0
    assert info.num_frames == 20 and info.fps == 8.0 and info.duration == pytest.approx(2.5, abs=1e-6)
    assert info.faststart
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_colours_survive_encoding(tmp_path: Path) -> None:
    out = tmp_path / "red.mp4"
    with VideoSink(out, 16, W, H, crf=10) as sink:
        sink.write(_solid(4, (220, 30, 40)))
    first = _decode_first(out).astype(int)
    assert np.abs(first - np.array([220, 30, 40])).max() <= 6  # RGB order kept, small codec error


def test_partial_file_until_close(tmp_path: Path) -> None:
    out = tmp_path / "long.mp4"
    sink = VideoSink(out, 16, W, H)
    sink.write(_frames(80))  # enough to get past the encoder's look-ahead
    assert sink.partial_path == tmp_path / ".long.mp4.partial.mp4"
    assert sink.partial_path.exists() and not out.exists()
    assert sink.close() == out
    assert out.exists() and not sink.partial_path.exists()
    assert probe_video(out).num_frames == 80


def test_abort_and_exception_leave_nothing(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path / "a.mp4", 16, W, H)
    sink.write(_frames(60))
    sink.abort()
    sink.abort()  # idempotent
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="closed or aborted"):
        sink.write(_frames(1))
    with pytest.raises(KeyError), VideoSink(tmp_path / "b.mp4", 16, W, H) as sink:
        sink.write(_frames(60))
        raise KeyError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), VideoSink(tmp_path / "c.mp4", 16, W, H) as sink:
        sink.write(_frames(5))
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_no_frames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"), VideoSink(tmp_path / "empty.mp4", 16, W, H):
        pass
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError) as info:
        VideoSink(out, 16, W, H)
    assert "--force" in str(info.value) and isinstance(info.value, LvError) and info.value.exit_code == 2
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.mp4"]
    with pytest.raises(OutputExistsError, match="is a folder"):
        VideoSink(tmp_path, 16, W, H, force=True)
    with VideoSink(out, 16, W, H, force=True) as sink:
        sink.write(_frames(3))
    assert probe_video(out).num_frames == 3


def test_output_appearing_during_render_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "race.mp4"
    sink = VideoSink(out, 16, W, H)
    sink.write(_frames(3))
    out.write_bytes(b"someone else's")
    with pytest.raises(OutputExistsError, match="kept as"):
        sink.close()
    assert out.read_bytes() == b"someone else's"
    assert probe_video(sink.partial_path).num_frames == 3  # the finished video is kept, not lost


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 65}, "width must be an even"), ({"height": 49}, "height must be an even"),
        ({"width": 0}, "width"), ({"crf": 0}, "crf"), ({"crf": 52}, "crf"), ({"fps": 0}, "fps"),
        ({"fps": "16"}, "fps"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"fps": 16, "width": W, "height": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        VideoSink(tmp_path / "x.mp4", **args)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_bad_frames(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path / "x.mp4", 16, W, H)
    for bad in (_frames(2).astype(np.float32), _frames(2)[:, :, :32], _frames(2)[..., :1], [[0]]):
        with pytest.raises(ValueError, match="uint8"):
            sink.write(bad)  # type: ignore[arg-type]
    sink.abort()


def test_fractional_fps(tmp_path: Path) -> None:
    out = tmp_path / "ntsc.mp4"
    with VideoSink(out, 29.97, W, H) as sink:
        sink.write(_frames(6))
    assert probe_video(out).fps == pytest.approx(29.97, abs=1e-3)


@pytest.mark.slow
def test_killed_writer_leaves_no_final_file(tmp_path: Path) -> None:
    """A process that dies mid-encode (no close, no abort) must not leave anything at the final path."""
    script = textwrap.dedent(f"""
        import os, numpy as np
        from lvstudio.video import VideoSink
        sink = VideoSink({str(tmp_path / 'out.mp4')!r}, 16, 64, 48)
        sink.write(np.zeros((60, 48, 64, 3), np.uint8))
        os._exit(1)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert not (tmp_path / "out.mp4").exists()
    assert all(name.startswith(".") for name in os.listdir(tmp_path))  # at most a hidden stale partial


def test_contact_sheet(tmp_path: Path) -> None:
    import cv2

    items = [(f"shot {i}: a red ball bouncing over the sea é", _frames(1, seed=i * 40)[0]) for i in range(7)]
    items.append(("tall", np.full((96, 32, 3), 200, np.uint8)))
    out = write_contact_sheet(tmp_path / "sheet.png", items, columns=3, thumb_width=64)
    assert out == tmp_path / "sheet.png" and os.listdir(tmp_path) == ["sheet.png"]
    sheet = cv2.imread(str(out))
    assert sheet is not None
    thumb_h = 192  # the tallest item (the 1:3 one) sets the cell height: 64 * 96 / 32
    assert sheet.shape == (3 * (thumb_h + 18 + 8), 3 * (64 + 8), 3)
    label_band = sheet[4 + thumb_h : 4 + thumb_h + 18, 4 : 4 + 64]
    assert label_band.max() > 150  # a label was drawn
    with pytest.raises(ValueError):
        write_contact_sheet(tmp_path / "none.png", [])
    with pytest.raises(ValueError):
        write_contact_sheet(tmp_path / "bad.png", [("x", np.zeros((4, 4), np.uint8))])


def test_atomic_writes(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    target.chmod(0o600)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["manifest.json"]
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"x")
