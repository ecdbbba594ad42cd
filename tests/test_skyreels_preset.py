"""The `skyreels-v2-df-1.3b-540p` preset: the shipped file's settings, pulled, locked and verified offline from a Hub
cache of tiny random weights in the real repository layout, rendered through the CLI with shots, cuts and negative
prompts, and `lvstudio render --extend` continuing the video it made. No network (HF_HUB_OFFLINE=1, caches in
tmp_path)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.helpers.skyreels_hub import NAME, REPO, SHIPPED, build_skyreels_cache, write_skyreels_test_preset

pytest.importorskip("diffusers")

STORY = """title = "SkyReels"
preset = "{preset}"
fps = 24
duration = "2s"
seed = 5
negative_prompt = "static"

[[shots]]
at = 0
prompt = "a red ball bouncing over the sea"

[[shots]]
at = "1.2s"
prompt = "a blue cube on the grass"
negative_prompt = "a red ball"
"""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):  # noqa: ANN002, ANN003
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def skyenv(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from lvstudio.presets.cli import presets_pull

    root = tmp_path_factory.mktemp("skyhub")
    commit = build_skyreels_cache(root / "hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("LVSTUDIO_CACHE", str(root / "lv"))
        mp.setenv("LVSTUDIO_CONFIG", str(root / "config"))
        mp.setenv("LVSTUDIO_PRESET_PATH", str(root / "presets"))
        mp.setenv("LVSTUDIO_DEVICE", "cpu")
        write_skyreels_test_preset(root / "presets")
        lines: list[str] = []
        presets_pull(NAME, None, echo=lines.append)
        yield root, commit, lines


def test_the_shipped_preset_says_what_upstream_recommends() -> None:
    from lvstudio.presets import load_preset
    from lvstudio.presets.hub import allow_patterns

    p = load_preset(SHIPPED)
    assert (p.backend, p.width, p.height, p.fps, p.repo_id) == ("streaming-dit", 960, 544, 24, REPO)
    sk = p.skyreels
    assert (sk.num_steps, sk.shift, sk.base_num_frames, sk.guidance_scale) == (30, 8.0, 97, 6.0)
    assert (sk.ar_step, sk.causal_block_size, sk.overlap_history, sk.addnoise_condition) == (5, 5, 17, 20.0)
    assert p.attention.block_frames == 5 and p.dit_config["inject_sample_info"] is True
    assert p.negative_prompt.startswith("色调艳丽") and "Skywork Community License" in p.licence
    patterns = allow_patterns(p, REPO)
    assert all(pat.endswith((".safetensors", ".json")) for pat in patterns), patterns


def test_a_preset_whose_blocks_do_not_divide_is_refused(tmp_path: Path) -> None:
    from lvstudio.errors import PresetError
    from lvstudio.presets import load_preset

    text = (Path(__file__).resolve().parents[1] / "presets" / f"{SHIPPED}.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("overlap_history = 17 ", "overlap_history = 13 "))
    with pytest.raises(PresetError, match="whole blocks of causal_block_size 5"):
        load_preset(bad)
    bad.write_text(text.replace("block_frames = 5 ", "block_frames = 3 "))
    with pytest.raises(PresetError, match="must equal skyreels.causal_block_size"):
        load_preset(bad)


def test_pulled_locked_verified_and_listed(skyenv) -> None:  # noqa: ANN001
    from lvstudio.presets.cli import presets_list, presets_verify
    from lvstudio.presets.lock import read_lock

    _, commit, lines = skyenv
    assert "ready:" in lines[-1], lines
    lock = read_lock(NAME)
    assert lock[REPO].commit == commit
    assert any(f.startswith("transformer/") for f in lock[REPO].files)
    assert {c.status for c in presets_verify(NAME, echo=lambda _m: None)} == {"ok"}
    status = dict(presets_list(echo=lambda _m: None))
    assert status[NAME] == "verified" and status[SHIPPED] == "not pulled"


@pytest.mark.slow
def test_render_then_extend_through_the_cli(skyenv, tmp_path: Path) -> None:  # noqa: ANN001
    import torch

    from lvstudio.cli import app
    from lvstudio.video import iter_video_frames, probe_video

    story = tmp_path / "story.toml"
    story.write_text(STORY.format(preset=NAME))
    first = tmp_path / "first.mp4"
    grad = torch.is_grad_enabled()
    try:
        result = CliRunner().invoke(app, ["render", str(story), "--out", str(first), "--no-progress"])
        assert result.exit_code == 0, result.output
        info = probe_video(first)
        assert (info.codec, info.width, info.height, info.num_frames) == ("h264", 64, 64, 48)
        manifest = json.loads(first.with_name("first.manifest.json").read_text())
        assert manifest["backend"] == "streaming-dit" and [s["transition"] for s in manifest["shots"]] == ["cut"] * 2
        # --extend: the previous video, then 2 s more.
        second = tmp_path / "second.mp4"
        result = CliRunner().invoke(app, ["render", str(story), "--out", str(second), "--extend", str(first),
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
    finally:
        torch.set_grad_enabled(grad)
    assert probe_video(second).num_frames == 96
    manifest = json.loads(second.with_name("second.manifest.json").read_text())
    assert manifest["extends"].startswith("first.mp4 sha256:") and manifest["frames"] == 96
    old = np.stack(list(iter_video_frames(first, 64, 64))).astype(float)
    new = np.stack(list(iter_video_frames(second, 64, 64))).astype(float)
    assert np.abs(new[:48] - old).mean() < 4.0  # the same frames, encoded once more


def test_extend_errors_exit_2(skyenv, tmp_path: Path) -> None:  # noqa: ANN001
    from lvstudio.cli import app
    from lvstudio.video import VideoSink

    story = tmp_path / "story.toml"
    story.write_text(STORY.format(preset=NAME))
    clip = tmp_path / "clip16.mp4"
    with VideoSink(clip, 16, 64, 64) as sink:
        sink.write(np.zeros((20, 64, 64, 3), np.uint8))
    short = tmp_path / "short.mp4"
    with VideoSink(short, 24, 64, 64) as sink:
        sink.write(np.zeros((5, 64, 64, 3), np.uint8))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(STORY.format(preset="tiny").replace("fps = 24", "fps = 16"))
    cases = [
        (story, tmp_path / "missing.mp4", "video not found"),
        (story, text, "notes.mp4 is not a video"),
        (story, clip, "runs at 16 fps, this render at 24 fps"),
        (story, short, "has 5 frames; --extend needs at least overlap_history = 17"),
        (tiny, clip, "--extend continues a video with a SkyReels-V2 Diffusion Forcing preset"),
    ]
    for path, video, words in cases:
        out = tmp_path / "x.mp4"
        result = CliRunner().invoke(app, ["render", str(path), "--out", str(out), "--extend", str(video),
                                          "--no-progress"])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
        assert not out.exists() and not os.path.exists(tmp_path / "x.job" / "job.json")


@pytest.mark.slow
def test_an_interrupted_extend_resumes_to_the_same_video(skyenv, tmp_path: Path,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM after the second chunk of an `--extend` render, then `--resume --extend`: the encoder gets exactly the
    frames of the uninterrupted render (the previous video's, then the same new ones); `--resume` with another video
    is refused (exit 2). Frames, not mp4 bytes: on this content x264 did not always give the same bytes for the same
    frames from one run to the next (seen on the loaded 2-core machine, uninterrupted renders included)."""
    import signal

    from lvstudio.video import VideoSink
    from tests.helpers.fault_render import SignalAt, assert_clean_exit, cli
    from tests.helpers.skyreels_hub import NAME as preset

    fed: dict[str, list[np.ndarray]] = {}
    real_write = VideoSink.write

    def write(sink: VideoSink, frames: np.ndarray) -> None:
        fed.setdefault(sink.path.name, []).append(frames.reshape(-1, *frames.shape[-3:]).copy())
        real_write(sink, frames)

    story = tmp_path / "story.toml"
    story.write_text(STORY.format(preset=preset))
    previous, other = tmp_path / "previous.mp4", tmp_path / "other.mp4"
    rng = np.random.default_rng(0)
    for path in (previous, other):
        with VideoSink(path, 24, 64, 64) as sink:
            sink.write(rng.integers(0, 256, (21, 64, 64, 3), dtype=np.uint8))
    monkeypatch.setattr(VideoSink, "write", write)
    ref, out = tmp_path / "ref.mp4", tmp_path / "out.mp4"
    assert_clean_exit(cli("render", str(story), "--out", str(ref), "--extend", str(previous), "--no-progress"), 0)
    with SignalAt(2, [signal.SIGTERM]):
        r = cli("render", str(story), "--out", str(out), "--extend", str(previous), "--no-progress")
    assert_clean_exit(r, 143, f"--extend {previous} --resume")
    refused = cli("render", str(story), "--out", str(out), "--extend", str(other), "--no-progress", "--resume")
    assert_clean_exit(refused, 2, "extend: the job has")
    fed.pop("out.mp4")
    done = cli("render", str(story), "--out", str(out), "--extend", str(previous), "--no-progress", "--resume")
    assert_clean_exit(done, 0)
    want, got = np.concatenate(fed["ref.mp4"]), np.concatenate(fed["out.mp4"])
    assert want.shape == got.shape == (21 + 48, 64, 64, 3) and np.array_equal(want, got)
    assert out.exists() and not out.with_name("out.job").exists()
