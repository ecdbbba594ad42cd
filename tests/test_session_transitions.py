"""Transitions through the session API (tiny random weights): live prompts default to a switch, rendered
storyboards write cut / switch / blend back so they re-render the session, and a resumed job re-decodes a cut's
chunks with the decoder restarted exactly as the render did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lvstudio.session import RenderSession, RenderSettings
from lvstudio.storyboard import parse_storyboard
from tests.helpers.random_bundle import random_bundle

STORY = """title = "transitions"
fps = 16
duration = "4s"
seed = 3

[[shots]]
at = 0
prompt = "a red ball bouncing over the sea"

[[shots]]
at = "1s"
prompt = "a blue cube on the grass"
"""


def _session(backend: str, job_dir: Path | None = None) -> RenderSession:
    bundle = random_bundle()
    settings = RenderSettings("random-test", backend, 3, 16, 32, 32, 64)
    return RenderSession(parse_storyboard(STORY), bundle, settings, job_dir=job_dir, snapshot_every=2)


def test_live_prompts_default_to_switch_and_the_rendered_storyboard_keeps_every_transition() -> None:
    session = _session("causal-kv")
    session.step()
    switch = session.push("a blue ball in the sky")  # block 1
    session.step()
    cut = session.push("a red cube on the grass", transition="cut")  # block 2; the storyboard cuts at block 3
    for _ in range(3):
        session.step()
    blend = session.push("a red ball over the sea", transition="blend")  # block 5
    for _ in range(2):
        session.step()
    reroll = session.reroll(seed=5)  # block 7
    assert [e.block for e in (switch, cut, blend, reroll)] == [1, 2, 5, 7]
    assert [e.transition for e in (switch, cut, blend, reroll)] == ["switch", "cut", "blend", "switch"]
    with pytest.raises(ValueError, match="cut, switch, blend"):
        session.push("a red ball", transition="fade")
    session.run()
    saved = session.rendered_storyboard()  # (a blend is cut short to fit before the next shot)
    assert [(s.prompt, str(s.transition), s.seed) for s in saved.shots] == [
        ("a red ball bouncing over the sea", "cut", None), ("a blue ball in the sky", "switch", None),
        ("a red cube on the grass", "cut", None), ("a blue cube on the grass", "cut", None),
        ("a red ball over the sea", "blend 0.9375s", None), ("a red ball over the sea", "switch", 5)]


@pytest.mark.parametrize("backend", ["causal-kv", "streaming-dit", "erft-crossclip"])
def test_resume_redecodes_a_cut_with_the_decoder_restarted(backend: str, tmp_path: Path) -> None:
    ref = _session(backend)
    frames = []
    while not ref.done:
        frames.append(ref.step().frames)
    video = np.concatenate(frames)
    job = tmp_path / "job"
    first = _session(backend, job)
    first.write_job_info()
    cut_chunk = None
    while cut_chunk is None or first.backend.next_index % 2:  # past the cut, to the next snapshot
        chunk = first.step()
        cut_chunk = chunk.index if chunk.new_shot else cut_chunk
    again = _session(backend, job)
    done = np.concatenate(again.resume())
    assert done.shape[0] == again.frames_done and np.array_equal(done, video[: done.shape[0]])
    rest = [again.step().frames for _ in iter(lambda: again.done, True)]
    assert np.array_equal(np.concatenate([done, *rest]), video)


def test_a_resume_keeps_the_live_prompts_of_the_chunks_it_makes_again(tmp_path: Path) -> None:
    """A live prompt pushed after the last snapshot lands on a chunk that a crash then cuts off from any snapshot:
    the resumed job makes that chunk again from the snapshot with the prompt (recorded in the chunk's metadata), so
    the video is the uninterrupted one."""
    ref = _session("causal-kv")
    frames = [ref.step().frames, ref.step().frames]
    ref.push("a green star in the sky")  # block 2, after the snapshot at 2 chunks
    video = np.concatenate(frames + [ref.step().frames for _ in iter(lambda: ref.done, True)])
    job = tmp_path / "job"
    first = _session("causal-kv", job)
    first.write_job_info()
    first.step()
    first.step()
    first.push("a green star in the sky")
    first.step()  # chunk 2 (with the live prompt) is saved; the next snapshot would come after chunk 3: a crash here
    for crash in range(2):  # a second crash, after the resumed job made chunk 2 again, loses nothing either
        again = _session("causal-kv", job)
        done = np.concatenate(again.resume())
        assert [e.prompt for e in again.buffer.events if e.source == "live"] == ["a green star in the sky"]
        if crash == 0:
            again.step()
    rest = [again.step().frames for _ in iter(lambda: again.done, True)]
    assert np.array_equal(np.concatenate([done, *rest]), video)
    assert not np.array_equal(video, np.concatenate([s.frames for s in _unsteered()]))


def _unsteered() -> list:
    session = _session("causal-kv")
    return [session.step() for _ in iter(lambda: session.done, True)]


def _uninterrupted_with_push(at_chunk: int, prompt: str) -> np.ndarray:
    ref = _session("causal-kv")
    frames = [ref.step().frames for _ in range(at_chunk)]
    ref.push(prompt)
    return np.concatenate(frames + [ref.step().frames for _ in iter(lambda: ref.done, True)])


def _pushed_after_three_chunks(tmp_path: Path, chunks_after: int) -> Path:
    """A job that made 3 chunks, had "a green star in the sky" pushed (it lands on the next block), made
    `chunks_after` more and then crashed: its folder."""
    job = tmp_path / "job"
    first = _session("causal-kv", job)
    first.write_job_info()
    for _ in range(3):
        first.step()
    first.push("a green star in the sky")
    for _ in range(chunks_after):
        first.step()
    return job


def test_a_prompt_pushed_after_the_last_chunk_saved_is_in_the_resumed_video(tmp_path: Path) -> None:
    """A crash after a push and before any chunk it steers is saved: the prompt was written to live.safetensors at
    the push, so the resumed job lands it on the same block and the video is the uninterrupted one."""
    video = _uninterrupted_with_push(3, "a green star in the sky")
    job = _pushed_after_three_chunks(tmp_path, chunks_after=0)  # nothing saved records it but live.safetensors
    assert (job / "live.safetensors").is_file()
    again = _session("causal-kv", job)
    done = np.concatenate(again.resume())
    assert [e.prompt for e in again.buffer.events if e.source == "live"] == ["a green star in the sky"]
    rest = [again.step().frames for _ in iter(lambda: again.done, True)]
    assert np.array_equal(np.concatenate([done, *rest]), video)


def test_a_damaged_chunk_does_not_lose_the_live_prompts_recorded_after_it(tmp_path: Path) -> None:
    """Chunks after a damaged one are made again from an older snapshot: the prompts recorded in them come back from
    live.safetensors. A damaged live.safetensors is named, and the resume goes on with what the chunks record."""
    video = _uninterrupted_with_push(3, "a green star in the sky")
    job = _pushed_after_three_chunks(tmp_path, chunks_after=2)  # chunk 3 records the prompt (snapshots every 2)
    chunk = job / "chunks" / "000002.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # chunk 2 damaged: the resume starts at the snapshot after chunk 1
    notes: list[str] = []
    again = _session("causal-kv", job)
    done = np.concatenate(again.resume(notes.append))
    assert any("chunk 2 is damaged" in n for n in notes)
    rest = [again.step().frames for _ in iter(lambda: again.done, True)]
    assert np.array_equal(np.concatenate([done, *rest]), video)

    live = job / "live.safetensors"
    live.write_bytes(live.read_bytes()[:40])  # a damaged live.safetensors: named, not fatal
    notes.clear()
    third = _session("causal-kv", job)
    third.resume(notes.append)
    assert any("live.safetensors cannot be used" in n for n in notes)


def test_the_rendered_storyboard_keeps_any_prompt_a_storyboard_takes() -> None:
    """An emoji was written as a JSON surrogate pair (invalid TOML): the terminal studio's storyboard could not be
    saved, and its kept copy stopped generation. A live prompt longer than a storyboard takes is refused at the push."""
    session = _session("causal-kv")
    session.step()
    session.push('a red ball 🎈 "bouncing" \\ over the sea')
    for _ in range(2):
        session.step()
    shots = session.rendered_storyboard().shots
    assert shots[-1].prompt == 'a red ball 🎈 "bouncing" \\ over the sea'
    with pytest.raises(ValueError, match="at most 1000 characters"):
        session.push("a red ball " * 100)
    assert session.push("a" * 1000).prompt == "a" * 1000
