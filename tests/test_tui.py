"""`lvstudio tui`: the half-block renderer, and the Textual studio driven by a Pilot at 40x12, 80x24 and 160x48.

Everything runs on tiny random weights (`tests/helpers/random_preset.py`). Nothing here depends on timing: a `Gate`
sink holds the generating thread after each chunk until the test lets it go, and waits only have a deadline so that
a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.segment import Segment
from textual import events
from textual.widgets import Input

from lvstudio.backends.base import Chunk
from lvstudio.errors import LvError
from lvstudio.presets import load_preset
from lvstudio.presets.load import ModelBundle, load_bundle
from lvstudio.prompt_stream import block_start_frame
from lvstudio.render import RenderRequest, render
from lvstudio.storyboard import load_storyboard, parse_duration
from lvstudio.tui.app import StudioApp, screen_text
from lvstudio.tui.preview import UPPER_HALF, HalfBlockRenderer, fit_preview
from lvstudio.tui.studio import Studio, StudioOptions, open_studio
from lvstudio.tui.widgets import PreviewPane
from lvstudio.video import probe_video
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "storyboards" / "demo.toml"
SIZES = [(40, 12), (80, 24), (160, 48)]
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_preset(tmp_path_factory.mktemp("preset"))


@pytest.fixture(scope="module")
def bundle(preset: Path) -> ModelBundle:
    return load_bundle(load_preset(preset))


class Gate:
    """A session sink that holds the generating thread after each chunk until the test lets it go."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._sem = threading.Semaphore(0)
        self._open = False

    def __call__(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        if not self._open:
            self._sem.acquire(timeout=DEADLINE_S)  # the timeout only keeps a failing test from hanging

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()

    def open(self) -> None:
        self._open = True
        self._sem.release(1000)


def studio_for(preset: Path, bundle: ModelBundle, tmp_path: Path, **kw) -> tuple[Studio, Gate]:
    opts = {"story": DEMO, "duration": 3.0, **kw}
    studio = open_studio(StudioOptions(preset=str(preset), out_dir=tmp_path / "out", **opts), bundle=bundle)
    gate = Gate()
    studio.session.add_sink(gate)
    return studio, gate


async def wait_for(cond, what: str) -> None:  # noqa: ANN001
    """Poll `cond()` on the event loop (a deadline turns a hang into a failure; no time is asserted)."""
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def quit_app(app: StudioApp, gate: Gate | None = None) -> None:
    """Ctrl-Q through the app's key handling (pilot.press would wait on a screen that is closing).

    With a closed `gate`, the chunk it holds is the one in flight: it is let go once the stop has been requested.
    """
    app.post_message(events.Key("ctrl+q", None))
    if gate is not None:
        await wait_for(lambda: app.studio.session.stopped, "the stop request")
        gate.open()
    await wait_for(lambda: app.summary is not None, "the studio to close")


# -- the half-block renderer ----------------------------------------------------------------------------------------


def _colours(seg: Segment) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return seg.style.color.triplet, seg.style.bgcolor.triplet  # type: ignore[union-attr]


def test_half_block_cell_is_two_pixels_upper_fg_lower_bg() -> None:
    frame = np.zeros((4, 2, 3), np.uint8)  # [H=4, W=2, 3]
    frame[0, 0], frame[1, 0] = (255, 0, 0), (0, 0, 255)  # cell (0, 0): red over blue
    frame[0, 1], frame[1, 1] = (0, 255, 0), (9, 9, 9)
    frame[2:] = (7, 8, 9)  # the second cell row is one colour: merged into one segment
    lines = HalfBlockRenderer(bits=8).render(frame, 2, 2)
    assert len(lines) == 2
    assert [seg.text for seg in lines[0]] == [UPPER_HALF, UPPER_HALF]
    assert _colours(lines[0][0]) == ((255, 0, 0), (0, 0, 255))
    assert _colours(lines[0][1]) == ((0, 255, 0), (9, 9, 9))
    assert [seg.text for seg in lines[1]] == [UPPER_HALF * 2] and _colours(lines[1][0]) == ((7, 8, 9), (7, 8, 9))
    # The default renderer snaps channels to 5 bits (bucket centres), which merges near-equal neighbours.
    assert _colours(HalfBlockRenderer().render(frame, 2, 2)[0][0]) == ((252, 4, 4), (4, 4, 252))


@pytest.mark.parametrize(("frame_wh", "pane", "cells"), [
    ((64, 64), (40, 12), (24, 12)), ((64, 64), (160, 48), (96, 48)), ((64, 32), (80, 24), (80, 20)),
    ((64, 64), (1, 1), (1, 1)),
])
def test_preview_fits_the_pane_keeps_aspect_and_is_deterministic(frame_wh, pane, cells) -> None:  # noqa: ANN001
    w, h = frame_wh
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert (fit_preview(w, h, *pane).cells_w, fit_preview(w, h, *pane).cells_h) == cells
    a, b = HalfBlockRenderer().render(frame, *pane), HalfBlockRenderer().render(frame, *pane)
    assert a == b  # same frame + pane -> same segments and colours
    assert len(a) == cells[1] and all(sum(len(s.text) for s in line) == cells[0] for line in a)
    assert fit_preview(w, h, 0, 5).cells_w == 0 and HalfBlockRenderer().render(frame, 0, 5) == []


# -- the studio -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preview_updates_as_chunks_arrive_and_survives_resizes(preset: Path, bundle: ModelBundle, tmp_path: Path,
                                                              size: tuple[int, int]) -> None:
    studio, gate = studio_for(preset, bundle, tmp_path)

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=size) as pilot:
            pane = app.query_one(PreviewPane)
            # Each chunk let through shows up in the preview (a frame of that chunk, drawn in half blocks).
            for k in range(3):
                gate.step() if k else None
                await wait_for(lambda k=k: len(gate.chunks) > k, f"chunk {k}")
                c = gate.chunks[k]
                await wait_for(lambda c=c: pane.frame_index is not None and pane.frame_index >= c.frame_start,
                               f"the preview to show chunk {k}")
                await pilot.pause()
                assert UPPER_HALF in screen_text(app)
            # Resize mid-run (smaller, larger, back): the image is re-fitted, nothing raises.
            for w, h in [(max(size[0] // 2, 20), max(size[1] // 2, 8)), (size[0] + 37, size[1] + 11), size]:
                await pilot.resize_terminal(w, h)
                gate.step()
                await pilot.pause()
                assert pane.pane_size[0] <= w and pane.pane_size[1] <= h
                assert len(pane._lines) <= pane.pane_size[1]  # noqa: SLF001
            gate.open()
            await wait_for(studio.finished.is_set, "generation to finish")
            app.refresh_status()
            await pilot.pause()
            text = screen_text(app)
            assert "48/48" in text  # status: frames done of the 3 s video
            assert ("random-test" in text) == (size[0] >= 72)  # the full status panel only where it fits
            await quit_app(app)
        assert app.return_value is not None and app.return_value.storyboard is not None

    asyncio.run(scenario())
    assert studio.error is None and studio.summary is not None


def test_typed_prompt_lands_on_the_next_block_and_conditions_the_following_blocks(
        preset: Path, bundle: ModelBundle, tmp_path: Path) -> None:
    studio, gate = studio_for(preset, bundle, tmp_path, duration=4.0)  # ends before the demo's shot at 4 s
    session = studio.session
    n = bundle.preset.attention.block_frames
    typed = "a blue cube on the grass"

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(lambda: len(gate.chunks) >= 1, "the first chunk")
            gate.step(2)
            await wait_for(lambda: len(gate.chunks) >= 3, "three chunks")
            await pilot.press("f5")  # pause: F5 is not swallowed by the focused prompt field
            gate.step()
            await wait_for(studio.pause_waiting.is_set, "the worker to idle in the pause")
            next_block, done = session.buffer.next_block, session.frames_done
            assert str(app.query_one("#mode").render()) == "switch ▸"  # type: ignore[attr-defined]  # live default
            await pilot.press(*typed, "enter")
            assert app.query_one("#prompt").value == ""  # type: ignore[attr-defined]
            rec = studio.live[-1]
            assert (rec.event.prompt, rec.event.source, rec.event.transition) == (typed, "live", "switch")
            assert rec.event.block == next_block and rec.frame == block_start_frame(next_block, n)
            assert rec.typed_at_frame == done and rec.seconds == rec.frame / session.settings.fps
            await pilot.press("f5")  # resume
            gate.open()
            await wait_for(studio.finished.is_set, "generation to finish")
            app.refresh_status()
            await pilot.pause()
            assert "◆" in screen_text(app) and typed in screen_text(app)  # the timeline shows the live prompt
            await quit_app(app)
        # The chunks before the block kept the storyboard prompt; from the block on, the typed prompt conditions them.
        block = studio.live[-1].event.block
        prompts = {c.index: c.prompt for c in gate.chunks}
        assert all(prompts[b] != typed for b in prompts if b < block)
        assert all(prompts[b] == typed for b in prompts if b >= block) and max(prompts) > block
        for b in range(block, max(prompts) + 1):
            cond = session.buffer.conditioning(b)
            assert cond.prompt == typed and torch.equal(cond.context, session.buffer.embedding(typed))
        assert session.buffer.conditioning(block).switched  # a switch re-caches at its first block (causal-kv)

    asyncio.run(scenario())
    assert studio.error is None


def test_stop_cancels_the_worker_within_one_block(preset: Path, bundle: ModelBundle, tmp_path: Path) -> None:
    studio, gate = studio_for(preset, bundle, tmp_path, story=None, prompt="a red ball over the sea", duration=None)
    assert studio.unbounded  # a --prompt session keeps generating until stopped

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(lambda: len(gate.chunks) >= 1, "the first chunk")
            gate.open()  # full speed
            await wait_for(lambda: len(gate.chunks) >= 4, "a few chunks")
            await pilot.press("f6")
            await wait_for(studio.finished.is_set, "the worker to stop")
            assert app.generator is not None and app.generator.is_cancelled
            assert studio.stop_requested_at is not None
            assert session_chunks() - studio.stop_requested_at <= 1  # at most the chunk in flight
            assert studio.status().state == "stopped"
            live = len(studio.live)
            await pilot.press(*"more", "enter")  # nothing is pushed after a stop
            assert len(studio.live) == live
            await quit_app(app)

    def session_chunks() -> int:
        return studio.session.stats.chunks

    asyncio.run(scenario())
    assert not studio.session.done and studio.error is None


def test_record_toggle_writes_a_timestamped_mp4(preset: Path, bundle: ModelBundle, tmp_path: Path) -> None:
    studio, gate = studio_for(preset, bundle, tmp_path, duration=6.0)

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(lambda: len(gate.chunks) >= 1, "the first chunk")
            await pilot.press("f7")
            await wait_for(lambda: studio.recorder.active, "the recording to start")
            gate.step(3)
            await wait_for(lambda: len(gate.chunks) >= 4, "three recorded chunks")
            await pilot.press("f7")
            await wait_for(lambda: len(studio.recorder.done) == 1, "the recording to close")
            gate.open()
            await quit_app(app)

    asyncio.run(scenario())
    rec = studio.recorder.done[0]
    assert re.fullmatch(r"lvstudio-\d{8}-\d{6}(-\d+)?\.mp4", rec.path.name) and rec.path.parent == tmp_path / "out"
    assert rec.first_frame == gate.chunks[1].frame_start
    assert probe_video(rec.path).num_frames == rec.frames == sum(c.num_frames for c in gate.chunks[1:4])
    assert studio.summary is not None and studio.summary.storyboard == rec.path.with_name(
        rec.path.stem + ".storyboard.toml")


def test_quit_finalises_the_recording_and_the_saved_storyboard_rerenders(preset: Path, bundle: ModelBundle,
                                                                          tmp_path: Path) -> None:
    studio, gate = studio_for(preset, bundle, tmp_path, duration=8.0, record=tmp_path / "rec")
    fps = studio.session.settings.fps

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for(lambda: len(gate.chunks) >= 1, "the first chunk")
            gate.step(2)
            await wait_for(lambda: len(gate.chunks) >= 3, "three chunks")
            modes = []
            for _ in range(3):  # F2 cycles switch -> cut -> blend -> switch
                await pilot.press("f2")
                modes.append(str(app.query_one("#mode").render()))  # type: ignore[attr-defined]
            assert modes == ["cut ▸", "blend ▸", "switch ▸"]
            await pilot.press("f2", "f2")  # blend the next prompt in
            await pilot.press(*"a blue cube on the grass", "enter")
            gate.step(3)
            await wait_for(lambda: len(gate.chunks) >= 6, "six chunks")
            await pilot.press("f8")  # re-roll the current shot with a new seed
            gate.step(2)
            await wait_for(lambda: len(gate.chunks) >= 8, "eight chunks")
            # Quit before the storyboard's 4 s shot: stops after the chunk in flight, closes the mp4, writes the
            # storyboard.
            await quit_app(app, gate)

    asyncio.run(scenario())
    summary = studio.summary
    assert summary is not None and len(summary.recordings) == 1
    video = summary.recordings[0].path
    assert video.parent == tmp_path / "rec" and summary.storyboard == video.with_name(video.stem + ".storyboard.toml")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # the kept copy went with close
    frames = studio.session.frames_done
    assert probe_video(video).num_frames == frames
    sb = load_storyboard(summary.storyboard)
    kinds = [(s.prompt, s.transition.kind, s.seed is not None) for s in sb.shots]
    assert kinds[0][0] == "{hero} bouncing over the sea at dusk"
    assert ("a blue cube on the grass", "blend", False) in kinds  # the live prompt
    assert kinds[-1][1:] == ("switch", True)  # then a re-roll: the shot continues with a new seed
    live = [r for r in studio.live if r.kind == "prompt"][0]
    assert any(s.prompt == "a blue cube on the grass" and s.at == live.frame / fps for s in sb.shots)
    assert sb.duration == frames / fps and sb.seed == studio.session.settings.seed
    # Re-render offline: the same frames as the live session recorded. Almost always bit-exact; MKL kernels are not
    # bit-reproducible across allocations, so a few last-bit differences (seen: 0.07% of values, by <= 5) are allowed.
    # A wrong seed changes ~100% of the values, a wrong prompt or transition ~1% even with random weights.
    out = render(RenderRequest(summary.storyboard, out=tmp_path / "re.mp4", preset=str(preset), progress=False),
                 echo=lambda _m: None)
    assert out.video is not None and probe_video(out.video).num_frames == frames
    diff = np.abs(_decode(out.video).astype(np.int16) - _decode(video).astype(np.int16))
    assert (diff > 0).mean() < 0.002 and diff.max() <= 16, ((diff > 0).mean(), diff.max())


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # [N, H, W, 3]


def test_a_failing_generation_is_reported_and_the_studio_still_quits_cleanly(preset: Path, bundle: ModelBundle,
                                                                            tmp_path: Path) -> None:
    studio, gate = studio_for(preset, bundle, tmp_path)
    gate.open()
    step = studio.session.backend.step
    calls = {"n": 0}

    def flaky_step():  # noqa: ANN202 - the second chunk fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return step()

    studio.session.backend.step = flaky_step  # type: ignore[method-assign]

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(studio.finished.is_set, "the failure")
            app.refresh_status()
            await pilot.pause()
            assert studio.status().state == "error" and "out of memory" in screen_text(app)
            await quit_app(app)

    asyncio.run(scenario())
    assert isinstance(studio.error, RuntimeError) and studio.summary is not None
    assert studio.summary.storyboard is not None and load_storyboard(studio.summary.storyboard).duration == 5 / 16


def test_a_studio_killed_without_ctrl_q_leaves_the_rendered_storyboard(preset: Path, bundle: ModelBundle,
                                                                     tmp_path: Path) -> None:
    """Once a prompt is typed, the rendered storyboard is kept up to date after every chunk where Ctrl-Q writes it,
    so a studio killed without closing (kill -9, a power cut) loses none of its steering: the file re-renders the
    frames it made. Closing writes the same file."""
    import dataclasses

    from lvstudio.session import RenderSession

    out = tmp_path / "out"
    studio = open_studio(StudioOptions(story=DEMO, preset=str(preset), duration=3.0, out_dir=out), bundle=bundle)
    made: list[np.ndarray] = []
    studio.session.add_sink(lambda chunk: made.append(chunk.frames))
    studio.run(cancelled=lambda: len(made) >= 2)
    assert not out.exists()  # nothing typed yet: the storyboard alone re-renders this
    studio.push("a blue cube on the grass", "cut")
    studio.run(cancelled=lambda: len(made) >= 5)  # ... and the process dies here, without close()
    [kept] = out.glob("*.storyboard.toml")
    sb = load_storyboard(kept)
    frames = studio.session.frames_done
    assert sb.duration == frames / 16 and [s.prompt for s in sb.shots][-1] == "a blue cube on the grass"
    settings = dataclasses.replace(studio.session.settings, num_frames=frames)
    again = RenderSession(sb, bundle, settings)
    video = np.concatenate([again.step().frames for _ in iter(lambda: again.done, True)])
    diff = np.abs(video.astype(np.int16) - np.concatenate(made).astype(np.int16))
    assert (diff > 0).mean() < 0.002 and diff.max() <= 16, ((diff > 0).mean(), diff.max())  # see the test above
    unsteered = RenderSession(sb.model_copy(update={"shots": sb.shots[:-1]}), bundle, settings)
    control = np.concatenate([unsteered.step().frames for _ in iter(lambda: unsteered.done, True)])
    assert (control != video).mean() > 0.1  # the typed prompt (a cut) is in what the kept storyboard re-renders
    assert studio.close().storyboard == kept and list(out.iterdir()) == [kept]


def test_a_storyboard_the_disk_refuses_still_closes_the_studio_and_keeps_the_text(preset: Path, bundle: ModelBundle,
                                                                                 tmp_path: Path) -> None:
    """Ctrl-Q once repeated 'could not save: [Errno 30] ...' forever: the studio could not be left."""
    (tmp_path / "file").write_text("in the way")
    studio = open_studio(StudioOptions(story=DEMO, preset=str(preset), duration=1.0, out_dir=tmp_path / "file" / "out"),
                         bundle=bundle)
    studio.push("a blue cube on the grass 🎈")
    studio.run()
    summary = studio.close()
    assert summary.storyboard is None and summary.save_error is not None and summary.save_error.exit_code == 74
    assert "saving the rendered storyboard" in str(summary.save_error)
    assert "a blue cube on the grass 🎈" in (summary.unsaved or "")
    assert load_storyboard_text(summary.unsaved or "").duration == 1.0


def load_storyboard_text(text: str):  # noqa: ANN201 - a Storyboard
    from lvstudio.storyboard import parse_storyboard

    return parse_storyboard(text)


def test_a_recording_the_disk_refuses_ends_and_generation_goes_on(preset: Path, bundle: ModelBundle, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A full or read-only disk under a recording used to end the whole session (exit 74, 'generating failed: .')."""
    import errno
    import os

    studio = open_studio(StudioOptions(story=DEMO, preset=str(preset), duration=1.0, out_dir=tmp_path / "out",
                                       record=tmp_path / "rec"), bundle=bundle)

    def full(*_a, **_k) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(studio.recorder._sink, "write", full)  # noqa: SLF001 - the open recording's encoder
    studio.run()
    assert studio.error is None and studio.session.done  # every frame was made
    [err] = studio.recording_errors
    assert "recording" in str(err) and "no space left" in str(err) and str(tmp_path / "rec") in str(err)
    assert not studio.recorder.active and not list((tmp_path / "rec").iterdir())  # no partial file left
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)  # a read-only folder: refused before anything loads
    with pytest.raises(LvError, match="cannot be written to"):
        open_studio(StudioOptions(story=DEMO, preset=str(preset), record=tmp_path / "rec"), bundle=bundle)


def test_record_option_takes_a_folder_or_an_mp4_path(preset: Path, bundle: ModelBundle, tmp_path: Path) -> None:
    named = open_studio(StudioOptions(story=DEMO, preset=str(preset), duration=1.0, out_dir=tmp_path / "out",
                                      record=tmp_path / "clips" / "take1.mp4"), bundle=bundle)
    named.run()
    summary = named.close()
    assert [r.path for r in summary.recordings] == [tmp_path / "clips" / "take1.mp4"]
    assert summary.storyboard == tmp_path / "clips" / "take1.storyboard.toml" and summary.frames == 16
    empty = open_studio(StudioOptions(story=DEMO, preset=str(preset), duration=1.0, out_dir=tmp_path / "out",
                                      record=tmp_path / "folder"), bundle=bundle)
    summary = empty.close()  # nothing generated: no video, no storyboard, no partial file left
    assert summary.recordings == [] and summary.storyboard is None
    assert not any((tmp_path / "folder").iterdir())


# -- command line -----------------------------------------------------------------------------------------------------


def test_tui_options_are_checked_before_anything_starts(preset: Path, bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(LvError, match="not both"):
        open_studio(StudioOptions(story=DEMO, prompt="a red ball", preset=str(preset)), bundle=bundle)
    with pytest.raises(LvError, match="nothing to render"):
        open_studio(StudioOptions(preset=str(preset)), bundle=bundle)
    with pytest.raises(LvError, match="--prompt is empty"):
        open_studio(StudioOptions(prompt="  ", preset=str(preset)), bundle=bundle)
    with pytest.raises(LvError, match="--duration"):
        parse_duration("soon")
    assert parse_duration("1:30") == 90.0 and parse_duration(None) is None
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "x"\nduration = "5s"\n[[shots]]\nat = "0:99"\nprompt = "a red ball"\n')
    with pytest.raises(LvError, match="bad.toml:4"):
        open_studio(StudioOptions(story=bad, preset=str(preset)), bundle=bundle)


@pytest.mark.slow
def test_importing_the_tui_command_is_light() -> None:
    code = "import sys, lvstudio.tui.cli; print(sorted(m for m in ('torch', 'textual') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_preview_budget_stretches_the_interval_to_keep_the_cpu_share() -> None:
    from lvstudio.tui.budget import PreviewBudget, thread_cpu_seconds

    def burn(seconds: float) -> None:  # CPU time of this thread, not wall time
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            sum(range(1000))

    me = threading.get_ident()
    if thread_cpu_seconds(me) is None:
        pytest.skip("per-thread CPU clocks are not available here")
    budget = PreviewBudget(share=0.1, min_interval=0.01, max_interval=5.0)
    budget.watch(me)
    assert budget.next_interval() == 0.01  # nothing measured yet: full rate
    budget.restart()  # measure from here
    burn(0.05)
    assert budget.next_interval() >= 0.5 - 1e-9  # >= 50 ms of CPU per frame / 10% share
    tight = PreviewBudget(share=0.001, min_interval=0.01, max_interval=1.5)
    tight.watch(me)
    tight.restart()
    burn(0.01)
    assert tight.next_interval() == 1.5  # never slower than max_interval
    with pytest.raises(ValueError):
        PreviewBudget(share=0.0, min_interval=0.1)


@pytest.mark.slow
def test_tui_command_in_a_real_terminal_quits_with_ctrl_q(preset: Path, tmp_path: Path) -> None:
    """The whole command under a pseudo-terminal: it draws, finishes, and Ctrl-Q writes the storyboard and exits 0."""
    import fcntl
    import os
    import select
    import struct
    import termios

    code = ("from pathlib import Path; from lvstudio.tui.cli import tui_command; "
            f"tui_command(Path({str(DEMO)!r}), None, {str(preset)!r}, 3, '1s', Path('rec'))")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    screen = b""

    def read_until(done) -> bytes:  # noqa: ANN001 - reads the terminal until done() or the deadline
        nonlocal screen
        deadline = time.monotonic() + DEADLINE_S
        while not done() and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # the child closed the terminal
                    break
                screen += chunk
        return screen

    try:
        read_until(lambda: b"finished" in screen or proc.poll() is not None)
        assert b"finished" in screen, screen[-2000:]
        os.write(master, b"\x11")  # Ctrl-Q
        read_until(lambda: proc.poll() is not None)
        assert proc.wait(timeout=30) == 0, screen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    videos = list((tmp_path / "rec").glob("lvstudio-*.mp4"))
    assert len(videos) == 1 and probe_video(videos[0]).num_frames == 16
    saved = videos[0].with_name(videos[0].stem + ".storyboard.toml")
    assert load_storyboard(saved).seed == 3 and b"re-render it with" in screen


def test_frame_player_plays_the_newest_chunk_at_the_video_rate_and_jumps_to_new_chunks() -> None:
    from lvstudio.tui.player import FramePlayer

    player = FramePlayer(fps=10)
    assert player.next_frame(0.0) is None and player.exhausted()
    a = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 2, 2, 3), np.uint8)  # [4, 2, 2, 3]
    player.offer(a, frame_start=0)
    t0 = player._t0  # noqa: SLF001 - the arrival time is the playback clock's origin
    assert player.next_frame(t0)[0] == 0 and player.next_frame(t0) is None  # each frame is handed out once
    assert player.next_frame(t0 + 0.25)[0] == 2  # 10 fps: frame 2 is due after 0.2 s (frame 1 was skipped)
    assert player.next_frame(t0 + 5.0)[0] == 3 and player.exhausted()  # holds on the last frame
    player.offer(a[:2], frame_start=4)
    assert player.next_frame(player._t0)[0] == 4 and not player.exhausted()  # noqa: SLF001 - a new chunk: at once
    assert player.chunks_offered == 2 and player.latest()[0] == 5


@pytest.mark.slow
def test_studio_with_the_shipped_tiny_preset(tmp_path: Path) -> None:
    """The same studio on the trained tiny preset (80x24, a short demo): the preview shows real frames, a typed
    prompt lands on the next block and conditions the blocks after it."""
    tiny = load_bundle("tiny")
    studio, gate = studio_for(Path("tiny"), tiny, tmp_path, duration=2.0)

    async def scenario() -> None:
        app = StudioApp(studio, preview_fps=200, preview_budget=1.0)
        async with app.run_test(size=(80, 24)) as pilot:
            pane = app.query_one(PreviewPane)
            await wait_for(lambda: len(gate.chunks) >= 1, "the first chunk")
            await wait_for(lambda: pane.frame_index is not None, "the preview")
            inp = app.query_one("#prompt", Input)
            inp.value = "a green cube resting on the snow"
            await pilot.press("enter")
            await wait_for(lambda: any(e.source == "live" for e in studio.session.buffer.events), "the live prompt")
            live = next(e for e in studio.session.buffer.events if e.source == "live")
            gate.open()
            await wait_for(studio.finished.is_set, "generation to finish")
            later = [c for c in gate.chunks if c.index >= live.block]
            assert later and all(c.prompt == "a green cube resting on the snow" for c in later)
            assert UPPER_HALF in screen_text(app)
            await quit_app(app)

    asyncio.run(scenario())
    assert studio.error is None
