"""`lvstudio preview` in a real browser: Debian chromium driven by playwright (never `playwright install`).

Presses Render on the demo storyboard (tiny random weights, paced slower than real time), checks that the first
frame shows, that the live <video> plays while the render runs (currentTime advances, readyState >= 3, frames
decode), steers it from the keyboard (F2, Enter), and that the H.264 segments the browser received, joined, are the
finished mp4 frame for frame. Set LVSTUDIO_WEB_SCREENSHOT=path to also save the mid-render screenshot there
(docs/preview.png was made this way), and LVSTUDIO_WEB_PRESET=tiny to render with a real preset.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")
pytest.importorskip("gradio")

import torch  # noqa: E402

from lvstudio.web.app import StudioConfig, WebStudio, demo_story_path, launch_studio  # noqa: E402
from lvstudio.web.security import gradio_env, make_policy  # noqa: E402
from tests.helpers.random_preset import write_random_preset  # noqa: E402

LIVE = "{hero} moving left on the snow"
FIRST_FRAME = "() => !!document.querySelector('#first-frame img')?.getAttribute('src')"
PLAYBACK = """() => {
  const v = document.querySelector('#live video');
  const status = document.querySelector('#status textarea').value;
  if (!v) return {status, t: 0, ready: 0, decoded: 0};
  return {status, t: v.currentTime, ready: v.readyState, decoded: v.getVideoPlaybackQuality().totalVideoFrames};
}"""
RESULT_READY = """() => {
  const v = document.querySelector('#result video');
  return !!v && v.offsetParent !== null && v.readyState >= 2 && v.videoWidth > 0;
}"""
PACE_S = 0.6  # per chunk of 8 frames (0.5 s of video): slower than real time, so playback waits for segments


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    # LVSTUDIO_WEB_PRESET=tiny renders with a real preset instead (for a nicer screenshot); the test runs on random.
    preset = os.environ.get("LVSTUDIO_WEB_PRESET") or write_random_preset(root / "preset")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = make_policy(port=port, outputs=root / "outputs")
    demo_story = demo_story_path()
    config = StudioConfig(outputs=policy.outputs, story_text=demo_story.read_text(), story_name="storyboards/demo.toml",
                          story_dir=demo_story.parent, preset=str(preset), min_chunk_seconds=PACE_S)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in gradio_env(policy).items():
            mp.setenv(key, value)
        demo, url = launch_studio(WebStudio(config), policy, block=False)
        try:
            yield url, policy.outputs
        finally:
            demo.close()


def launch_browser(p):  # noqa: ANN001, ANN201 - playwright objects
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [n, H, W, 3]


@pytest.mark.slow
def test_live_video_plays_while_rendering_and_its_segments_are_the_final_mp4(studio: tuple[str, Path],
                                                                              tmp_path: Path) -> None:
    studio_url, outputs = studio
    outside: list[str] = []
    streamed: list = []  # responses of the H.264 segments, in the order the browser fetched them
    samples: list[dict] = []
    with sync_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if urlparse(r.url).hostname not in ("127.0.0.1", "localhost") and r.url.startswith("http")
                    else None)
            page.on("response", lambda r: streamed.append(r)
                    if "/stream/" in r.url and urlparse(r.url).path.endswith(".ts") else None)
            page.goto(studio_url, wait_until="domcontentloaded")
            page.wait_for_selector("#render", timeout=60_000)
            sync_api.expect(page.locator("#validation textarea")).to_have_value(
                "OK: 3 shot(s), 0:12 at 16 fps = 192 frames, preset tiny, seed 7", timeout=30_000)
            page.locator("#render").click()
            page.wait_for_function(FIRST_FRAME, timeout=120_000, polling=50)  # before the first segment plays
            # Step 1: the live video plays while the render runs.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len([s for s in samples if s["ready"] >= 3]) < 3:
                samples.append(page.evaluate(PLAYBACK))
                time.sleep(0.2)
            # Step 2: steer from the keyboard: F2 picks the next transition, Enter pushes the prompt.
            page.keyboard.press("F2")  # switch (the default) -> cut
            sync_api.expect(page.locator("#live-transition input[value=cut]")).to_be_checked(timeout=10_000)
            page.keyboard.press("F2")  # cut -> blend
            sync_api.expect(page.locator("#live-transition input[value=blend]")).to_be_checked(timeout=10_000)
            page.locator("#live-prompt input, #live-prompt textarea").first.fill(LIVE)
            page.locator("#live-prompt input, #live-prompt textarea").first.press("Enter")
            sync_api.expect(page.locator("#push-status textarea")).to_have_value(
                re.compile(r"Live prompt \(blend\) lands at block \d+: frame \d+, \d"), timeout=30_000)
            reply = page.locator("#push-status textarea").input_value()
            marker = page.locator("#timeline .lv-live")
            sync_api.expect(marker).to_have_count(1, timeout=30_000)
            title = marker.get_attribute("title")
            samples.append(page.evaluate(PLAYBACK))
            shot = tmp_path / "preview.png"
            page.screenshot(path=str(shot), full_page=True)  # mid-render, with the live prompt on the timeline
            # Step 3: the finished mp4 replaces the stream.
            page.wait_for_function(RESULT_READY, timeout=300_000, polling=100)
            live_hidden = page.locator("#live").is_hidden()
            # It carries on from where the live video was (near its end: the render was slower than real time).
            taken_over = page.evaluate("() => document.querySelector('#result video').currentTime")
            status = page.locator("#status textarea").input_value()
            bodies = [r.body() for r in dict.fromkeys(streamed)]
        finally:
            browser.close()
    rendering = [s for s in samples if s["status"].startswith("Rendering")]
    assert len(rendering) >= 3, samples[-3:]
    assert any(s["ready"] >= 3 for s in rendering) and max(s["decoded"] for s in rendering) > 0, rendering[-3:]
    times = [s["t"] for s in rendering if s["t"] > 0]
    assert len(times) >= 2 and times[-1] > times[0], times  # currentTime advances during the render
    assert any("Slower than real time" in s["status"] for s in rendering)
    frame = int(re.search(r"frame (\d+)", reply).group(1))
    assert LIVE in title and f"(f{frame})" in title and "blend" in title
    assert status.startswith("Done (complete)") and live_hidden, status
    assert taken_over > 2.0, taken_over
    # The segments the browser played, joined, are the finished mp4, frame for frame.
    job = re.search(r"Done \(complete\): (\S+),", status).group(1)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(bodies))
    final = decode(outputs / job / f"{job}.mp4")
    assert final.shape[0] == 192
    np.testing.assert_array_equal(decode(joined), final)
    assert not (outputs / job / f"{job}.stream").exists()  # the segments went with the render
    assert shot.stat().st_size > 10_000
    assert not outside, f"the page fetched from outside loopback: {outside[:5]}"
    if os.environ.get("LVSTUDIO_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LVSTUDIO_WEB_SCREENSHOT"])


def test_closing_the_tab_stops_its_render_and_keeps_what_was_made(studio: tuple[str, Path]) -> None:
    import json

    from lvstudio.video import probe_video

    url, outputs = studio
    before = {p.name for p in outputs.iterdir()}
    with sync_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#render", timeout=60_000)
            page.locator("#render").click()
            page.wait_for_function(FIRST_FRAME, timeout=120_000, polling=50)
            page.wait_for_function("() => (document.querySelector('#live video')?.readyState || 0) >= 2",
                                   timeout=120_000, polling=50)
            page.close()
        finally:
            browser.close()
    deadline = time.monotonic() + 60
    manifest = None
    while time.monotonic() < deadline and manifest is None:
        new = [outputs / n for n in {p.name for p in outputs.iterdir()} - before]
        found = [d / f"{d.name}.manifest.json" for d in new if (d / f"{d.name}.manifest.json").exists()]
        manifest = json.loads(found[0].read_text()) if found else None
        time.sleep(0.1)
    assert manifest is not None, "no finished job after the tab closed"
    assert manifest["stopped"] and 0 < manifest["frames"] < 192
    info = probe_video(manifest["video"]["path"])
    assert (info.codec, info.num_frames) == ("h264", manifest["frames"])
