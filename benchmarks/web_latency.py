"""How soon does each studio show the video, and how soon does a pushed prompt reach the screen? Web vs terminal.

    python benchmarks/web_latency.py                     # tiny preset, the demo storyboard stretched to 40 s, 5 pushes
    python benchmarks/web_latency.py --pushes 7 --seconds 60

Two figures per studio, in one run, same storyboard, preset and seed, models loaded beforehand in both:
  first frame   from Render (web: the click; terminal: the app ready, when it starts generating) to the first
                frame on screen (web: the first-frame image, and separately the live video's first frame);
  push          from pushing a live prompt (web: Enter in the live-prompt box; terminal: Studio.push, what Enter
                does) to the first frame on screen generated under it (the frame the reply names, or later);
                the median of --pushes pushes, one every --every seconds of wall time.
The web studio runs in this process and is driven by Debian's /usr/bin/chromium through playwright (frames on
screen from requestVideoFrameCallback); the terminal studio runs in a child process in a pseudo-terminal (frames on
screen when its preview pane draws them).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "storyboards" / "demo.toml"
PROMPTS = ("{hero} moving left on the snow", "{hero} bouncing over the sea at dusk", "{hero} resting on the grass")
CHROMIUM = "/usr/bin/chromium"
INSTRUMENT = """
window.__lv = {frames: [], firstImg: null, clickAt: null, pushAt: []};
document.addEventListener('click', (e) => {
  if (e.target.closest && e.target.closest('#render')) window.__lv.clickAt = performance.now();
}, true);
document.addEventListener('keydown', (e) => {
  const box = e.target.closest && e.target.closest('#live-prompt');
  if (e.key === 'Enter' && box) window.__lv.pushAt.push(performance.now());
}, true);
const watch = () => {
  const img = document.querySelector('#first-frame img');
  if (img && img.getAttribute('src') && window.__lv.firstImg === null && img.complete && img.naturalWidth)
    window.__lv.firstImg = performance.now();
  const v = document.querySelector('#live video');
  if (v && !v.__lvHooked) {
    v.__lvHooked = true;
    const cb = (now, meta) => {
      const start = v.buffered.length ? v.buffered.start(0) : 0;
      window.__lv.frames.push([now, meta.mediaTime - start]);
      v.requestVideoFrameCallback(cb);
    };
    v.requestVideoFrameCallback(cb);
  }
  requestAnimationFrame(watch);
};
requestAnimationFrame(watch);
"""


def story_text(seconds: float) -> str:
    return re.sub(r'(?m)^duration = .*$', f'duration = "{seconds:g}s"', DEMO.read_text())


# -- terminal studio (child process) ---------------------------------------------------------------------------------
def tui_child(preset: str, seconds: float, pushes: int, every: float, result: Path) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from lvstudio.tui.app import StudioApp
    from lvstudio.tui.studio import StudioOptions, open_studio

    story = result.parent / "story.toml"
    story.write_text(story_text(seconds))
    studio = open_studio(StudioOptions(story=story, preset=preset, out_dir=result.parent))
    out: dict = {"first": None, "push": []}

    class TimedApp(StudioApp):
        waiting: list = []  # [t_push, frame] not on screen yet

        def on_ready(self) -> None:
            self._t0 = time.perf_counter()
            super().on_ready()

        def _show_frame(self, preview, index, frame, lines, size) -> None:  # noqa: ANN001
            super()._show_frame(preview, index, frame, lines, size)
            now = time.perf_counter()
            if out["first"] is None:
                out["first"] = now - self._t0
                self.set_interval(every, self._push)
            for item in [w for w in self.waiting if index >= w[1]]:
                out["push"].append(now - item[0])
                self.waiting.remove(item)
            if len(out["push"]) >= pushes:
                self.exit()

        def _push(self) -> None:
            n = len(out["push"]) + len(self.waiting)
            if n < pushes:
                t = time.perf_counter()
                rec = self.studio.push(PROMPTS[n % len(PROMPTS)])
                self.waiting.append([t, rec.frame])

    TimedApp(studio, exit_when_done=True).run()
    result.write_text(json.dumps(out))


def run_tui(preset: str, seconds: float, pushes: int, every: float, tmp: Path) -> dict:
    result = tmp / "tui.json"
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--seconds", str(seconds), "--pushes",
           str(pushes), "--every", str(every), "--result", str(result)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TERM="xterm-256color", COLORTERM="truecolor")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)

    def drain() -> None:
        while True:
            try:
                if not os.read(master, 1 << 16):
                    return
            except OSError:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code = proc.wait()
    os.close(master)
    if code != 0 or not result.exists():
        raise RuntimeError(f"the terminal studio run failed (exit code {code})")
    return json.loads(result.read_text())


# -- web studio (this process + chromium) ----------------------------------------------------------------------------
def run_web(preset: str, seconds: float, pushes: int, every: float, tmp: Path) -> dict:
    import torch
    from playwright import sync_api

    torch.set_num_threads(1)
    from lvstudio.session import resolve_settings
    from lvstudio.web.app import StudioConfig, WebStudio, launch_studio
    from lvstudio.web.security import gradio_env, make_policy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = make_policy(port=port, outputs=tmp / "web")
    os.environ.update(gradio_env(policy))
    text = story_text(seconds)
    studio = WebStudio(StudioConfig(outputs=policy.outputs, story_text=text, story_dir=DEMO.parent, preset=preset))
    studio.bundle(resolve_settings(studio.parse(text), preset=preset)[0])  # models loaded, as in the terminal run
    demo, url = launch_studio(studio, policy, block=False)
    out: dict = {"first_image": None, "first_video": None, "push": []}
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.add_init_script(INSTRUMENT)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#render", timeout=60_000)
            page.locator("#render").click()
            page.wait_for_function("() => window.__lv.frames.length > 0 && window.__lv.firstImg !== null",
                                   timeout=120_000, polling=20)
            lv = page.evaluate("() => window.__lv")
            out["first_image"] = (lv["firstImg"] - lv["clickAt"]) / 1000
            out["first_video"] = (lv["frames"][0][0] - lv["clickAt"]) / 1000
            fps = int(re.search(r"(?m)^fps = (\d+)", text).group(1))
            box = page.locator("#live-prompt input, #live-prompt textarea").first
            for k in range(pushes):
                time.sleep(every)
                before = page.locator("#push-status textarea").input_value()
                box.fill(PROMPTS[k % len(PROMPTS)])
                box.press("Enter")
                page.wait_for_function(f"() => document.querySelector('#push-status textarea').value !== "
                                       f"{json.dumps(before)}", timeout=30_000, polling=20)
                reply = page.locator("#push-status textarea").input_value()
                frame = int(re.search(r"frame (\d+)", reply).group(1))
                at = page.evaluate("() => window.__lv.pushAt[window.__lv.pushAt.length - 1]")
                shown = (f"() => window.__lv.frames.find(([t, m]) => t > {at} && Math.round(m * {fps}) >= {frame})"
                         f"?.[0] ?? null")
                page.wait_for_function(shown, timeout=120_000, polling=20)
                out["push"].append((page.evaluate(shown) - at) / 1000)
            browser.close()
    finally:
        for job in list(studio._jobs):
            job.stop()
        demo.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="preset name or preset.toml")
    ap.add_argument("--seconds", type=float, default=40.0, help="seconds of video (the demo storyboard stretched)")
    ap.add_argument("--pushes", type=int, default=5, help="live prompts pushed in each studio")
    ap.add_argument("--every", type=float, default=2.5, help="seconds between pushes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tui_child(args.preset, args.seconds, args.pushes, args.every, args.result)
        return
    with tempfile.TemporaryDirectory(prefix="lvstudio-web-latency-") as name:
        tmp = Path(name)
        web = run_web(args.preset, args.seconds, args.pushes, args.every, tmp)
        tui = run_tui(args.preset, args.seconds, args.pushes, args.every, tmp)
    print(f"preset {args.preset}, demo storyboard stretched to {args.seconds:g} s, {args.pushes} pushes "
          f"{args.every:g} s apart (seconds; push = median)")
    print(f"  {'studio':<10} {'first frame':>12} {'first video frame':>18} {'push -> new frame':>18}  pushes")
    print(f"  {'web':<10} {web['first_image']:>12.2f} {web['first_video']:>18.2f} "
          f"{statistics.median(web['push']):>18.2f}  {', '.join(f'{x:.2f}' for x in web['push'])}")
    print(f"  {'terminal':<10} {tui['first']:>12.2f} {tui['first']:>18.2f} "
          f"{statistics.median(tui['push']):>18.2f}  {', '.join(f'{x:.2f}' for x in tui['push'])}")


if __name__ == "__main__":
    main()
