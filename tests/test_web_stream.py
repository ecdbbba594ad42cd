"""The web studio's live video (segments per chunk, joined into the final mp4) and its timeline, without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lvstudio.video import VideoSink, join_mp4s, probe_video
from lvstudio.web.page import timeline_html
from lvstudio.web.stream import LiveVideo


def decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [n, H, W, 3]


def moving_frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """[n, size, size, 3] uint8: smooth colour blobs drifting right, so H.264 has motion to code (and B-frames)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 6.28, 3)
    return np.stack([np.stack([127 + 100 * np.sin(6 * (x - k / 40) + 3 * y + p) for p in phase], -1)
                     for k in range(n)]).astype(np.uint8)


def test_segments_joined_are_the_final_mp4_frame_for_frame(tmp_path: Path) -> None:
    frames = moving_frames(61)
    live = LiveVideo(tmp_path / "job.mp4", 16, 32, 32)
    chunks = [5, 8, 3, 3, 8, 1, 12, 8, 10, 3]  # a first chunk of 5 frames goes alone; 3 + 3 wait for 8 (0.5 s)
    assert sum(chunks) == 61
    segments, made, start = [], [], 0
    for n in chunks:
        live.write(frames[start:start + n])
        start += n
        seg = live.segment()
        if seg is not None:
            segments.append(seg)
            made.append(decode(seg))
    last = live.segment(final=True)
    assert last is not None
    made.append(decode(last))
    assert [m.shape[0] for m in made] == [5, 8, 14, 13, 8, 10, 3]  # 3 + 3 + 8 joined, 1 + 12; the last 3 alone
    assert all(p.parent == tmp_path / "job.stream" for p in [*segments, last])
    video = live.close()
    assert not (tmp_path / "job.stream").exists()  # segments go when the render ends
    info = probe_video(video)
    assert (info.codec, info.pix_fmt, info.num_frames, info.faststart) == ("h264", "yuv420p", 61, True)
    joined = np.concatenate(made)
    np.testing.assert_array_equal(decode(video), joined)  # exactly what the stream showed
    # As close to what was rendered as one encode of the whole video (`lvstudio render`'s sink) is.
    whole = VideoSink(tmp_path / "whole.mp4", 16, 32, 32)
    whole.write(frames)
    err = np.abs(joined.astype(int) - frames.astype(int)).mean()
    ref = np.abs(decode(whole.close()).astype(int) - frames.astype(int)).mean()
    assert err < 1.2 * ref + 0.5, (err, ref)


def test_abort_leaves_no_segments_and_no_video(tmp_path: Path) -> None:
    live = LiveVideo(tmp_path / "job.mp4", 16, 32, 32)
    live.write(moving_frames(12))
    assert live.segment() is not None
    live.abort()
    assert not (tmp_path / "job.stream").exists() and not (tmp_path / "job.mp4").exists()
    with pytest.raises(RuntimeError):
        live.write(moving_frames(1))
    empty = LiveVideo(tmp_path / "empty.mp4", 16, 32, 32)
    with pytest.raises(ValueError, match="no frames"):
        empty.close()
    assert list(tmp_path.iterdir()) == []


def test_join_refuses_parts_encoded_differently(tmp_path: Path) -> None:
    parts = []
    for i, size in enumerate((32, 48)):
        sink = VideoSink(tmp_path / f"{i}.mp4", 16, size, size)
        sink.write(moving_frames(4, size))
        parts.append(sink.close())
    with pytest.raises(ValueError, match="not encoded like"):
        join_mp4s(parts, tmp_path / "joined.mp4")
    assert not (tmp_path / "joined.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


def test_timeline_shows_numbered_shots_live_markers_and_the_generated_part() -> None:
    ranges = [
        {"event": 0, "source": "storyboard", "shot": 0, "prompt": "a red ball", "transition": "cut",
         "frame_start": 0, "frame_end": 64},
        {"event": 1, "source": "live", "shot": None, "prompt": "<b>snow</b>", "transition": "blend",
         "frame_start": 64, "frame_end": 96},
        {"event": 2, "source": "storyboard", "shot": 1, "prompt": "grass", "transition": "cut",
         "frame_start": 96, "frame_end": 192},
    ]
    page = timeline_html(ranges, 192, 16, 80)
    assert "<span>1</span>" in page and "<span>2</span>" in page  # shots numbered from 1
    assert page.count("class='lv-live'") == 1 and "left:33.333%" in page  # the live prompt at frame 64 of 192
    assert "&lt;b&gt;snow&lt;/b&gt;" in page and "<b>" not in page  # prompts are escaped
    assert "class='lv-todo' style='left:41.667%'" in page  # 80 of 192 frames generated
    assert "generated 0:05 (f80)" in page and "data-fps='16'" in page and "lv-playhead" in page
    assert page.count("lv-made") == 2  # the ranges begun so far are drawn solid
