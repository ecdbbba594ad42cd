"""`lvstudio preview` in a real browser: Debian chromium driven by playwright (never `playwright install`).

Loads the page, presses Render on the demo storyboard (tiny random weights), sees preview frames arrive, and waits
for the finished mp4 to be decodable in the page's <video> element. Set LVSTUDIO_WEB_SCREENSHOT=path to also save
the screenshot there (docs/preview.png was made this way), and LVSTUDIO_WEB_PRESET=tiny to render with a real preset.
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
WATCH_PREVIEWS = """() => {
  window.__previews = [];
  const seen = () => {
    const img = document.querySelector('#preview img');
    const src = img && img.getAttribute('src');
    if (src && !window.__previews.includes(src)) window.__previews.push(src);
  };
  new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, attributes: true});
}"""
VIDEO_READY = """() => {
  const v = document.querySelector('#result video');
  return !!v && v.readyState >= 2 && v.videoWidth > 0;
}"""


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
                          story_dir=demo_story.parent, preset=str(preset), min_chunk_seconds=0.1)
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


def test_browser_renders_demo_with_live_preview_and_playable_video(studio: tuple[str, Path], tmp_path: Path) -> None:
    studio_url, _ = studio
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda r: outside.append(r.url)
                    if urlparse(r.url).hostname not in ("127.0.0.1", "localhost") and r.url.startswith("http")
                    else None)
            page.goto(studio_url, wait_until="domcontentloaded")
            page.wait_for_selector("#render", timeout=60_000)
            sync_api.expect(page.locator("#validation textarea")).to_have_value(
                "OK: 3 shot(s), 0:12 at 16 fps = 192 frames, preset tiny, seed 7", timeout=30_000)
            page.evaluate(WATCH_PREVIEWS)
            page.locator("#render").click()
            # Steer it while it runs: a live prompt typed into the page goes into the running session.
            page.wait_for_function("() => window.__previews.length >= 2", timeout=120_000, polling=50)
            page.locator("#live-prompt textarea").fill(LIVE)
            page.locator("#push").click()
            sync_api.expect(page.locator("#push-status textarea")).to_have_value(re.compile("lands at block"),
                                                                                  timeout=30_000)
            page.wait_for_function(VIDEO_READY, timeout=180_000, polling=100)
            previews = page.evaluate("() => window.__previews")
            status = page.locator("#status textarea").input_value()
            progress = page.locator("#progress").inner_text()
            width = page.evaluate("() => document.querySelector('#result video').videoWidth")
            page.locator("#result").scroll_into_view_if_needed()
            page.evaluate("() => window.scrollTo(0, 0)")
            time.sleep(0.3)
            shot = tmp_path / "preview.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(previews) >= 2, previews  # preview frames arrived while rendering
    assert status.startswith("Done (complete)"), status
    assert width > 0
    assert LIVE in progress  # the per-shot progress lists the live prompt as its own row
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
            page.evaluate(WATCH_PREVIEWS)
            page.locator("#render").click()
            page.wait_for_function("() => window.__previews.length >= 2", timeout=120_000, polling=50)
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
