"""Batch rendering (`lvstudio render A.toml B.toml DIR --out-dir D`, lvstudio.batch): planning and the skip/resume
rules in one process, an interrupted job resumed by the batch, and under torchrun (2 CPU processes) the work shared
so that every storyboard is rendered once, bit-identical to a one-process render, a bad storyboard reported and a
rerun that renders nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lvstudio.batch import BatchRequest, JobResult, collect_stories, exit_code, job_action, plan_jobs, run_batch
from lvstudio.errors import LvError, OutputExistsError
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]
BAD = 'title = "bad"\nduration = "1s"\n[[shots]]\nat = "0:99"\nprompt = "a red ball"\n'


def _story(folder: Path, name: str, seconds: float, seed: int = 1, preset: str = "random-test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f'title = "{name}"\npreset = "{preset}"\nduration = {seconds}\nseed = {seed}\n'
                    '[[shots]]\nat = 0\nprompt = "a red ball bouncing over the sea"\n'
                    '[[shots]]\nat = 0.5\nprompt = "a blue cube on the grass"\n')
    return path


@pytest.fixture(scope="module")
def preset_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for LVSTUDIO_PRESET_PATH holding `random-test` (tiny random weights, 64x64)."""
    root = tmp_path_factory.mktemp("presets")
    write_random_preset(root / "random-test")
    return root


@pytest.fixture
def presets(preset_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", str(preset_path))
    return preset_path


@pytest.fixture(autouse=True)
def _grad_mode_kept() -> Iterator[None]:
    """`render()` turns autograd off for its process (a CLI command); here it runs inside the test process."""
    import torch

    before = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(before)


def _frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _render_one(story: Path, out: Path) -> Path:
    from lvstudio.render import RenderRequest, render

    return render(RenderRequest(story, out, progress=False), echo=lambda m: None).video


def test_plan_orders_dearest_first_and_refuses_clashing_names(presets: Path, tmp_path: Path) -> None:
    sb = tmp_path / "sb"
    short, long_, mid = _story(sb, "a", 1.0), _story(sb, "b", 3.0), _story(sb, "c", 2.0)
    (sb / "bad.toml").write_text(BAD)
    assert collect_stories([sb, short]) == [sb / "a.toml", sb / "b.toml", sb / "bad.toml", sb / "c.toml"]
    jobs = plan_jobs(BatchRequest([sb], tmp_path / "out"))
    assert [Path(j.story).name for j in jobs] == ["b.toml", "c.toml", "a.toml", "bad.toml"]
    assert jobs[-1].cost == 0 and jobs[0].cost == 3 * jobs[2].cost
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.mp4").write_bytes(b"finished")  # a finished output costs nothing
    assert Path(plan_jobs(BatchRequest([sb], tmp_path / "out"))[0].story).name == "c.toml"
    _story(tmp_path / "other", "a", 1.0)
    with pytest.raises(LvError, match="would both render to"):
        plan_jobs(BatchRequest([short, tmp_path / "other" / "a.toml"], tmp_path / "out"))
    with pytest.raises(LvError, match="no \\*.toml"):
        collect_stories([tmp_path / "out"])
    del long_, mid


def test_job_actions_never_overwrite_without_force(presets: Path, tmp_path: Path) -> None:
    story, out = _story(tmp_path, "a", 1.0), tmp_path / "out" / "a.mp4"
    req = BatchRequest([story], out.parent)
    assert job_action(story, out, req) == "render"
    out.parent.mkdir()
    (out.parent / "a.job").mkdir()  # not a job (no job.json): left alone; render() refuses it without --force
    assert job_action(story, out, req) == "render" and (out.parent / "a.job").exists()
    (out.parent / "a.job" / "job.json").write_text("{}")  # a job folder (render() checks it when it resumes)
    assert job_action(story, out, req) == "resume"
    shutil.rmtree(out.parent / "a.job")
    out.write_bytes(b"someone's video")
    with pytest.raises(OutputExistsError, match="without its manifest"):
        job_action(story, out, req)
    assert job_action(story, out, BatchRequest([story], out.parent, force=True)) == "render"


def test_exit_codes_are_those_of_render() -> None:
    def result(status: str, code: int, internal: bool = False) -> JobResult:
        return JobResult(0, "a.toml", "a.mp4", status, 0, "h", "cpu", 0, 0.0, 0.0, internal=internal, exit_code=code)

    assert exit_code([]) == 0 and exit_code([result("rendered", 0), result("skipped", 0)]) == 0
    assert exit_code([result("failed", 2), result("rendered", 0)]) == 2  # a storyboard or the options
    assert exit_code([result("failed", 2), result("failed", 74)]) == 74  # a disk refused a write (io_errors)
    assert exit_code([result("failed", 74), result("failed", 1, internal=True)]) == 1  # a bug
    assert exit_code([result("failed", 2), result("interrupted", 143)]) == 143  # SIGTERM (128 + 15)


def test_a_disk_error_fails_its_job_with_exit_74_and_the_batch_goes_on(presets: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lvstudio.render

    sb, out = tmp_path / "sb", tmp_path / "out"
    _story(sb, "a", 0.5)
    (sb / "bad.toml").write_text(BAD)

    real = lvstudio.render.render

    def full_disk(req: lvstudio.render.RenderRequest, *a, **k):  # a.toml's render meets a full disk
        if req.story.name != "a.toml":
            return real(req, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "a.mp4"))

    monkeypatch.setattr(lvstudio.render, "render", full_disk)
    done = run_batch(BatchRequest([sb], out, progress=False), echo=lambda m: None)
    rows = {Path(r.story).name: r for r in done.results}
    assert rows["a.toml"].status == "failed" and rows["a.toml"].exit_code == 74
    assert "no space left on the device" in rows["a.toml"].error and "another --out-dir" in rows["a.toml"].error
    assert rows["bad.toml"].exit_code == 2 and done.exit_code == 74
    index = json.loads((out / "batch.json").read_text())
    assert [j["exit_code"] for j in index["jobs"]] == [74, 2]


@pytest.mark.slow
def test_a_stop_signal_stops_a_batch_which_then_resumes_to_the_uninterrupted_frames(presets: Path,
                                                                                    tmp_path: Path) -> None:
    from lvstudio.session import RenderSession

    sb, out = tmp_path / "sb", tmp_path / "out"
    a, b = _story(sb, "a", 2.0), _story(sb, "b", 1.0, seed=2)
    ref = _render_one(a, tmp_path / "ref" / "a.mp4")
    # Step 1: SIGTERM after the second chunk of the first job (lvstudio.stop_signals, as Ctrl-C and SIGHUP): it keeps
    # its job folder, no job starts after it, the index says so and the batch exits 143.
    step = RenderSession.step

    def step_then_interrupt(self: RenderSession):
        chunk = step(self)
        if chunk.index == 1:
            signal.raise_signal(signal.SIGTERM)
        return chunk

    RenderSession.step = step_then_interrupt
    try:
        stopped = run_batch(BatchRequest([sb], out, progress=False), echo=lambda m: None)
    finally:
        RenderSession.step = step
    assert stopped.exit_code == 143 and [r.status for r in stopped.results] == ["interrupted"]
    index = json.loads((out / "batch.json").read_text())
    assert [j["status"] for j in index["jobs"]] == ["interrupted", "pending"]
    assert (out / "a.job" / "job.json").exists() and not (out / "a.mp4").exists()
    assert list((out / "a.job" / "chunks").glob("*.safetensors"))
    # Step 2: the same command resumes `a` (to the uninterrupted frames) and renders `b`; a rerun skips both.
    first = run_batch(BatchRequest([sb], out, progress=False), echo=lambda m: None)
    assert first.exit_code == 0
    assert {r.story: r.status for r in first.results} == {str(a): "resumed", str(b): "rendered"}
    assert np.array_equal(_frames(out / "a.mp4"), _frames(ref))
    assert 0 < first.results[0].video_s < 2.0  # what was left of `a`
    again = run_batch(BatchRequest([sb], out, progress=False), echo=lambda m: None)
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    index = json.loads((out / "batch.json").read_text())
    assert index["counts"]["skipped"] == 2 and index["video_s"] == 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("LVSTUDIO_SKIP_DISTRIBUTED") == "1", reason="LVSTUDIO_SKIP_DISTRIBUTED=1")
def test_two_processes_share_a_batch_bit_identical_to_one_process(presets: Path, tmp_path: Path) -> None:
    sb, out = tmp_path / "sb", tmp_path / "out"
    stories = [_story(sb, "a", 1.0, seed=1), _story(sb, "b", 1.5, seed=2), _story(sb, "c", 1.0, seed=3)]
    (sb / "bad.toml").write_text(BAD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), LVSTUDIO_PRESET_PATH=str(presets))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lvstudio",
           "render", str(sb), "--out-dir", str(out), "--no-progress"]

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    # Step 1: one launch, two ranks: the bad storyboard fails (exit 2 on every rank) and the others are made.
    proc = launch()
    assert proc.returncode != 0 and "bad.toml:4:6" in proc.stderr and "failed: " in proc.stdout
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr  # exit 2, no crash
    index = json.loads((out / "batch.json").read_text())
    assert index["world_size"] == 2 and index["counts"] == {
        "rendered": 3, "resumed": 0, "skipped": 0, "failed": 1, "interrupted": 0, "pending": 0}
    rows = {Path(j["story"]).name: j for j in index["jobs"]}
    assert rows["bad.toml"]["status"] == "failed" and "0:99" in rows["bad.toml"]["error"]
    assert rows["b.toml"]["order"] == 0  # the longest first
    assert {rows[s.name]["rank"] for s in stories} == {0, 1}  # both ranks rendered
    assert sorted(p.name for p in out.glob("*.mp4")) == ["a.mp4", "b.mp4", "c.mp4"]
    assert not list(out.glob("*.job")) and not list(out.glob(".*partial*"))
    # Step 2: every output is bit-identical (decoded frames) to a render of the storyboard in one process.
    for story in stories:
        ref = _render_one(story, tmp_path / "ref" / f"{story.stem}.mp4")
        assert np.array_equal(_frames(out / f"{story.stem}.mp4"), _frames(ref)), story.name
    # Step 3: a rerun renders nothing new.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "batch.json"}
    launch()
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "batch.json"}
    assert after == before
    rerun = json.loads((out / "batch.json").read_text())
    assert rerun["counts"]["skipped"] == 3 and rerun["counts"]["failed"] == 1 and rerun["counts"]["rendered"] == 0


def test_the_summary_names_a_failed_storyboard_once(tmp_path: Path) -> None:
    from lvstudio.batch import summary_lines

    index = tmp_path / "batch.json"
    index.write_text(json.dumps({
        "counts": {"rendered": 1, "failed": 2}, "world_size": 1, "wall_s": 2.0, "video_s": 1.0,
        "video_s_per_wall_s": 0.5, "jobs": [
            {"story": "sb/a.toml", "status": "rendered", "error": None},
            {"story": "sb/bad.toml", "status": "failed", "error": "sb/bad.toml:4:6: shots[0].at: not a time"},
            {"story": "sb/gone.toml", "status": "failed", "error": "writing the video failed: disk full"},
        ]}))
    failed = [line for line in summary_lines(index) if "failed: " in line]
    assert failed == ["  failed: sb/bad.toml:4:6: shots[0].at: not a time",
                      "  failed: sb/gone.toml: writing the video failed: disk full"]
