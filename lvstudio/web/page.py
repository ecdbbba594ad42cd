"""What the web studio's page looks like and does in the browser: its CSS, its one script, and the timeline.

The timeline is HTML made on the server after every chunk (shots, live prompts, the generated part); the script
moves its playhead with the video that is playing, hides the first-frame image once the live video shows frames,
lets the finished mp4 carry on from where the live video was, and gives the page its keys (F2: the next transition;
Enter in the live-prompt box pushes it, which gradio's one-line textbox does itself).
"""

from __future__ import annotations

import html
from typing import Any

from lvstudio.storyboard import format_time
from lvstudio.timeline_palette import LIVE_COLOURS, SHOT_COLOURS

TRANSITION_KEY = "F2"

CSS = """
#validation textarea, #status textarea { font-family: ui-monospace, monospace; }
#first-frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#live video, #result video { image-rendering: pixelated; }
#progress table { width: 100%; border-collapse: collapse; font-size: 0.9em; }
#progress td, #progress th { padding: 2px 6px; text-align: left; }
#progress progress { width: 100%; }
.lv-timeline { font: 12px ui-monospace, monospace; user-select: none; }
.lv-bar { position: relative; height: 26px; border-radius: 4px; overflow: hidden; background: #1f2937; }
.lv-range { position: absolute; top: 0; bottom: 0; opacity: 0.45; border-left: 1px solid #111827; }
.lv-range.lv-made { opacity: 1; }
.lv-range span { position: absolute; z-index: 1; left: 3px; top: 5px; color: #fff; font-weight: bold; }
.lv-live { position: absolute; z-index: 1; top: 0; bottom: 0; width: 0; border-left: 2px dashed #fff; }
.lv-live span { position: absolute; left: -6px; top: -2px; color: #fff; font-size: 14px; }
.lv-todo { position: absolute; top: 0; bottom: 0; right: 0;
           background: repeating-linear-gradient(45deg, #0008 0 4px, #0003 4px 8px); }
.lv-playhead { position: absolute; z-index: 2; top: -2px; bottom: -2px; width: 3px; margin-left: -1px;
               background: #facc15; box-shadow: 0 0 3px #000; }
.lv-ruler { display: flex; justify-content: space-between; color: #9ca3af; margin-top: 2px; }
.lv-ruler .lv-head { color: #facc15; }
"""

# One script for the whole page (gradio runs it once on load). It polls the page a few times per frame's worth of
# time rather than hooking gradio's components, whose elements are replaced on every update.
PAGE_JS = """
() => {
  const FIRST = '#first-frame', LIVE = '#live video', RESULT = '#result video';
  const visible = (el) => !!el && el.offsetParent !== null;
  const state = {live: {t: 0, playing: false}, synced: null};
  window.__lvstudio = state;
  // Media time of the first frame of the video element (hls.js places a stream's first segment at its own time).
  const start = (v) => (v.buffered && v.buffered.length ? v.buffered.start(0) : 0);
  const tick = () => {
    const live = document.querySelector(LIVE), result = document.querySelector(RESULT);
    const first = document.querySelector(FIRST);
    const liveShowing = visible(live) && live.readyState >= 2 && live.currentTime > start(live);
    if (first) first.style.display = liveShowing ? 'none' : '';
    if (visible(live)) state.live = {t: Math.max(live.currentTime - start(live), 0), playing: !live.paused};
    // The finished mp4 takes over from the live video at the same place.
    if (visible(result) && result.currentSrc && state.synced !== result.currentSrc && result.readyState >= 1) {
      state.synced = result.currentSrc;
      result.currentTime = Math.min(state.live.t, result.duration || state.live.t);
      if (state.live.playing) result.play().catch(() => {});
    }
    const playing = visible(result) ? result : (visible(live) ? live : null);
    const bar = document.querySelector('.lv-timeline');
    const head = bar && bar.querySelector('.lv-playhead');
    if (head && playing) {
      const fps = +bar.dataset.fps, total = +bar.dataset.total;
      const frame = Math.floor((playing.currentTime - (playing === live ? start(live) : 0)) * fps + 1e-3);
      const f = Math.min(Math.max(frame, 0), total);
      head.style.left = (100 * f / Math.max(total, 1)) + '%';
      const label = bar.querySelector('.lv-head');
      if (label) label.textContent = '\\u25b2 ' + (f / fps).toFixed(2) + ' s f' + f;
    }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'KEY' || e.repeat) return;
    const radios = [...document.querySelectorAll('#live-transition input[type=radio]')];
    if (!radios.length) return;
    e.preventDefault();
    const at = radios.findIndex((r) => r.checked);
    radios[(at + 1) % radios.length].click();
  });
}
""".replace("KEY", TRANSITION_KEY)


def timeline_html(ranges: list[dict[str, Any]], total: int, fps: int, done: int) -> str:
    """The whole video as a bar: one coloured range per prompt event (storyboard shots numbered, live prompts as ◆
    markers at the frame they landed on), the part not generated yet hatched, and a playhead the page's script
    moves. `ranges`: `RenderSession.shot_ranges()`; `total`: frames in the video; `done`: frames generated."""
    total = max(total, 1)
    done = min(max(done, 0), total)
    pct = lambda frame: f"{100 * min(max(frame, 0), total) / total:.3f}%"  # noqa: E731
    parts = []
    for r in ranges:
        start, end = r["frame_start"], r["frame_end"]
        if end <= start:
            continue
        live = r["source"] == "live"
        palette = LIVE_COLOURS if live else SHOT_COLOURS
        colour = palette[r["event"] % len(palette)]
        label = "live" if live else f"shot {(r['shot'] or 0) + 1}"
        tip = html.escape(f"{label} at {format_time(start / fps)} (f{start}), {r['transition']}: {r['prompt']}")
        made = " lv-made" if done > start else ""
        mark = "" if live else f"<span>{(r['shot'] or 0) + 1}</span>"
        parts.append(f"<div class='lv-range{made}' style='left:{pct(start)};width:{pct(end - start)};"
                     f"background:{colour}' title='{tip}'>{mark}</div>")
        if live:
            parts.append(f"<div class='lv-live' style='left:{pct(start)}' title='{tip}'><span>◆</span></div>")
    parts.append(f"<div class='lv-todo' style='left:{pct(done)}'></div>")
    parts.append("<div class='lv-playhead' style='left:0%'></div>")
    ruler = (f"<div class='lv-ruler'><span>0:00</span><span class='lv-head'>▲ 0.00 s f0</span>"
             f"<span>generated {format_time(round(done / fps, 2))} (f{done})</span>"
             f"<span>{format_time(total / fps)}</span></div>")
    return (f"<div class='lv-timeline' data-fps='{fps}' data-total='{total}' data-done='{done}'>"
            f"<div class='lv-bar'>{''.join(parts)}</div>{ruler}</div>")
