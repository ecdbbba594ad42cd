"""Does the TUI slow generation down? Frames/s of one session with and without the studio attached, in one run.

    python benchmarks/tui_overhead.py                      # random tiny weights, 240 s of video per run, 5 pairs
    python benchmarks/tui_overhead.py --preset tiny --seconds 60

Each measurement is a fresh child process on the same storyboard, preset and seed; "without" runs the session
(`Studio.run`, the code path the TUI's worker runs) alone, "with" runs the full studio in a real pseudo-terminal
(Textual's Linux driver writing ANSI to a pty that this process drains, like a terminal would) and exits when the
video is done. Runs alternate without/with to spread any drift. frames/s = frames generated / wall time of the run
loop (model loading and app start-up excluded). The target is a ratio of at least 0.90.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
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
TARGET = 0.90


def _measured_app_class() -> type:
    """StudioApp that also reports the CPU share of its UI and preview threads while generation ran."""
    from lvstudio.tui.app import StudioApp
    from lvstudio.tui.budget import thread_cpu_seconds
    from lvstudio.tui.widgets import PreviewPane

    class MeasuredApp(StudioApp):
        frames_shown, ui_share = 0, 0.0

        def on_ready(self) -> None:
            super().on_ready()  # starts the workers; the pump counts its own CPU from its start
            self._t0, self._cpu0 = time.perf_counter(), thread_cpu_seconds(threading.get_ident()) or 0.0

        def on_worker_state_changed(self, event) -> None:  # noqa: ANN001
            if event.worker.group == "generate" and event.worker.is_finished and not self.frames_shown:
                self.frames_shown = self.query_one(PreviewPane).frames_shown
                self.ui_share = ((self.budget.cpu() or 0.0) - self._cpu0) / (time.perf_counter() - self._t0)
            super().on_worker_state_changed(event)

    return MeasuredApp


def child(mode: str, preset: str, seconds: float, threads: int, result: Path) -> None:
    """One measured run (in a child process): `mode` is "bare" or "tui"."""
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    from lvstudio.tui.studio import StudioOptions, open_studio

    # A long storyboard: the demo's shots, stretched to `seconds` (the demo lasts 12 s; later frames keep shot 3).
    studio = open_studio(StudioOptions(story=DEMO, preset=preset, duration=seconds, out_dir=result.parent))
    shown, ui_share = 0, 0.0
    if mode == "bare":
        studio.run()
    else:
        app = _measured_app_class()(studio, exit_when_done=True)
        app.run()
        shown, ui_share = app.frames_shown, app.ui_share
    out = {"mode": mode, "frames": studio.run_frames, "seconds": studio.run_seconds,
           "fps": studio.run_frames / studio.run_seconds, "preview_frames": shown, "ui_share": ui_share,
           "error": repr(studio.error) if studio.error else None}
    result.write_text(json.dumps(out))


def _run_child(mode: str, preset: str, seconds: float, threads: int, size: tuple[int, int], tmp: Path) -> dict:
    """Start a child run; the "tui" one gets a pseudo-terminal of `size` whose output is drained here."""
    result = tmp / f"{mode}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--child", mode, "--preset", preset, "--seconds", str(seconds),
           "--threads", str(threads), "--result", str(result)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), TERM="xterm-256color",
               COLORTERM="truecolor")
    if mode == "bare":
        subprocess.run(cmd, env=env, check=True, cwd=tmp)
    else:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        drained = [0]

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:
                    return
                if not data:
                    return
                drained[0] += len(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        code = proc.wait()
        os.close(master)
        reader.join(timeout=5)
        if code != 0:
            raise RuntimeError(f"the TUI run failed with exit code {code}")
    data = json.loads(result.read_text())
    if data["error"]:
        raise RuntimeError(f"{mode} run failed: {data['error']}")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="preset name or preset.toml (default: tiny random weights)")
    ap.add_argument("--seconds", type=float, default=240.0,
                    help="seconds of video per run (random weights: at most 256, their RoPE table's length)")
    ap.add_argument("--repeats", type=int, default=5, help="pairs of runs (without, with), alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    ap.add_argument("--size", default="120x40", help="terminal size of the TUI runs (columns x rows)")
    ap.add_argument("--child", choices=["bare", "tui"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.preset, args.seconds, args.threads, args.result)
        return
    cols, rows = (int(x) for x in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="lvstudio-tui-bench-") as tmp_name:
        tmp = Path(tmp_name)
        preset = args.preset
        if preset is None:
            sys.path.insert(0, str(ROOT))
            from tests.helpers.random_preset import write_random_preset

            preset = str(write_random_preset(tmp / "preset"))
        runs: dict[str, list[dict]] = {"bare": [], "tui": []}
        for i in range(args.repeats):
            for mode in ("bare", "tui"):
                data = _run_child(mode, preset, args.seconds, args.threads, (cols, rows), tmp)
                runs[mode].append(data)
                extra = ""
                if mode == "tui":
                    extra = (f" (preview: {data['preview_frames']} frames drawn, "
                             f"{data['preview_frames'] / data['seconds']:.1f}/s; UI + preview threads used "
                             f"{100 * data['ui_share']:.1f}% of a core)")
                print(f"run {i + 1} {'without TUI' if mode == 'bare' else 'with TUI   '}: {data['frames']} frames "
                      f"in {data['seconds']:.2f} s = {data['fps']:.1f} frames/s{extra}", flush=True)
    bare = statistics.median(r["fps"] for r in runs["bare"])
    tui = statistics.median(r["fps"] for r in runs["tui"])
    ratio = tui / bare
    pairs = sorted(t["fps"] / b["fps"] for b, t in zip(runs["bare"], runs["tui"], strict=True))
    share = statistics.median(r["ui_share"] for r in runs["tui"])
    print(f"median frames/s: without TUI {bare:.1f}, with TUI ({cols}x{rows} pty) {tui:.1f}")
    print(f"per-pair ratios: {', '.join(f'{x:.3f}' for x in pairs)}; the UI and preview threads used "
          f"{100 * share:.1f}% of a core (median)")
    print(f"ratio with/without = {ratio:.3f} (slowdown {100 * (1 - ratio):.1f}%; target: ratio >= {TARGET:.2f}) "
          f"-> {'OK' if ratio >= TARGET else 'TOO SLOW'}")


if __name__ == "__main__":
    main()
