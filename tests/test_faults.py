"""The fault suite: failures that are not about the storyboard, made on purpose.

Every scenario injects one fault into `lvstudio render` (or a training run, or a Hub pull) and checks: the exit code,
a clear message (what failed, which path, what to do), no traceback, nothing the user had lost, and that after the
fault is removed `--resume` (or a re-run) gives exactly the uninterrupted output: the same mp4 bytes, the same
contact sheet, the same manifest (timings aside). Faults: writes that fail with ENOSPC / EACCES / EROFS at the Nth
call; a real full tmpfs and a read-only one (root only); the output folder deleted mid-run; job files truncated,
bit-flipped, deleted, swapped or left half-written between runs; jobs that belong to another storyboard, preset,
seed, duration or lvstudio version; SIGINT / SIGTERM / SIGHUP after a chunk, twice in a row, and SIGKILL (in a
subprocess). Positions come from seeded RNGs (tests/helpers/faults.py). Renders use tiny random weights, 64x64.
"""

from __future__ import annotations

import errno as errnos
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from lvstudio.session import RenderSession
from tests.helpers.fault_render import (
    Env,
    Output,
    SignalAt,
    assert_clean_exit,
    assert_same,
    cli,
    reference_render,
    user_files,
)
from tests.helpers.faults import ERRNO_WORDS, FailingWrites, Fault, damage, lost_bytes, rng, tree_state
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "storyboards" / "demo.toml"
WRITE_FAULTS = 10  # failing-write scenarios (positions and errors drawn from the seeded RNG)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("faults")
    story = root / "story.toml"
    story.write_text(DEMO.read_text())
    return Env(root, write_random_preset(root / "preset"), story)


@pytest.fixture(scope="module")
def ref3(env: Env) -> Output:
    return reference_render(env, "3s")


@pytest.fixture(scope="module")
def ref8(env: Env) -> Output:
    return reference_render(env, "8s")


# ---------------------------------------------------------------------------------------------------------------
# Disks that refuse a write


@pytest.mark.parametrize("case", range(WRITE_FAULTS))
def test_a_write_failing_at_the_nth_call_is_explained_and_resumes_to_the_same_video(
        env: Env, ref3: Output, tmp_path: Path, case: int) -> None:
    r = rng(f"write-{case}")
    at = r.randint(1, ref3.writes)
    code = r.choice([errnos.ENOSPC, errnos.EACCES, errnos.EROFS])
    out = tmp_path / "out" / "cut.mp4"
    before = user_files(out.parent)
    fault = Fault(f"failing write: {errnos.errorcode[code]}")
    with FailingWrites(at, code) as writes:
        failed = env.render(out, "3s")
    assert writes.failed, "the fault was not hit"
    kept = out.with_name("cut.job").joinpath("job.json").exists()
    then = "--resume" if kept else "run the command again"
    assert_clean_exit(failed, 74, ERRNO_WORDS[code], str(out.parent), then)
    assert not out.exists() and not [p for p in out.parent.rglob("*") if "partial" in p.name]
    # The fault is gone: the job continues (or the command runs again) to exactly the uninterrupted output.
    again = env.resume(out) if kept else env.render(out, "3s")
    assert_clean_exit(again, 0)
    assert_same(out, ref3)
    fault.survived(lost_bytes(before, out.parent))


def test_an_existing_output_survives_a_failed_forced_render(env: Env, ref3: Output, tmp_path: Path) -> None:
    out = tmp_path / "cut.mp4"
    out.write_bytes(os.urandom(10_000))  # the user's previous video: --force replaces it only with a complete one
    before = user_files(tmp_path)
    fault = Fault("failing write: ENOSPC, forced over an existing output")
    with FailingWrites(ref3.writes - 2):  # the manifest: the last writes before the video would be moved into place
        failed = env.render(out, "3s", "--force")
    assert_clean_exit(failed, 74, "no space left", "--resume")
    assert lost_bytes(before, tmp_path) == 0
    assert_clean_exit(env.resume(out), 0)
    assert_same(out, ref3)
    fault.survived(lost_bytes({k: v for k, v in before.items() if k != "cut.mp4"}, tmp_path))


def test_the_output_folder_deleted_mid_run_is_explained(env: Env, ref3: Output, tmp_path: Path) -> None:
    out = tmp_path / "gone" / "cut.mp4"
    real_step = RenderSession.step
    fault = Fault("folder deleted mid-run: the output folder")

    def step(session: RenderSession):  # noqa: ANN202
        chunk = real_step(session)
        if session.stats.chunks == 3:
            shutil.rmtree(out.parent)  # someone deletes the folder while it renders
        return chunk

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RenderSession, "step", step)
        failed = env.render(out, "3s")
    assert_clean_exit(failed, 74, "does not exist", str(out.parent))
    assert_clean_exit(env.render(out, "3s"), 0)  # the job went with the folder: the command runs again
    assert_same(out, ref3)
    fault.survived()


def _mount_tmpfs(folder: Path, size: str, *options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a real tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")


def _remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True)


def test_a_really_full_disk_keeps_the_job_and_resumes_when_there_is_room(env: Env, ref8: Output,
                                                                           tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "200k")
    try:
        out = disk / "cut.mp4"
        (disk / "notes.txt").write_text("my notes\n")
        before = tree_state(disk)
        fault = Fault("real disk: full tmpfs")
        failed = env.render(out, "8s")
        assert_clean_exit(failed, 74, "no space left on the device", "free some space", "--resume", str(disk))
        assert lost_bytes(before, disk) == 0 and not out.exists()
        _remount(disk, "size=20m")  # the user makes room
        assert_clean_exit(env.resume(out), 0)
        assert_same(out, ref8)
        fault.survived(lost_bytes(before, disk))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_read_only_output_folder_is_refused_before_any_work(env: Env, ref3: Output, tmp_path: Path) -> None:
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "20m")
    try:
        (disk / "notes.txt").write_text("my notes\n")
        before = tree_state(disk)
        _remount(disk, "ro")
        fault = Fault("real disk: read-only tmpfs")
        out = disk / "cut.mp4"
        failed = env.render(out, "3s")
        assert_clean_exit(failed, 74, "read-only file system", str(disk))
        assert tree_state(disk) == before
        _remount(disk, "rw")
        assert_clean_exit(env.render(out, "3s"), 0)
        assert_same(out, ref3)
        fault.survived(lost_bytes(before, disk))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# Damaged job folders: detected on --resume, the damaged tail dropped and made again


@pytest.fixture(scope="module")
def interrupted8(env: Env, ref8: Output) -> Path:
    """A job folder of the 8 s render stopped (SIGINT) after chunk 13: chunks 0-12, snapshots after 8 and 13."""
    out = env.root / "interrupted" / "cut.mp4"
    with SignalAt(13, [signal.SIGINT]):
        r = env.render(out, "8s")
    assert_clean_exit(r, 130, "--resume")
    job = out.with_name("cut.job")
    assert sorted(p.name for p in (job / "snapshots").iterdir()) == ["000008.safetensors", "000013.safetensors"]
    assert len(list((job / "chunks").iterdir())) == 13
    return job


def _copy_job(job: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out" / "cut.mp4"
    out.parent.mkdir()
    shutil.copytree(job, out.with_name("cut.job"))
    return out, out.with_name("cut.job")


def _other_job(path: Path) -> None:
    """Rewrite a chunk as an intact file of another job (what copying files between job folders gives)."""
    from lvstudio.checked_files import load_checked, save_checked

    tensors, meta = load_checked(path)
    meta.pop("lvstudio.sha256")
    save_checked(tensors, path, {**meta, "job_id": "0" * 16})


DAMAGE = ["chunk truncated", "chunk bit flipped", "chunk deleted", "chunk of another job", "chunk renumbered",
          "newest snapshot truncated", "newest snapshot bit flipped", "both snapshots damaged",
          "half-written temp files", "kill -9 tail"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_job_is_detected_and_resumes_to_the_same_video(env: Env, ref8: Output, interrupted8: Path,
                                                                 tmp_path: Path, kind: str) -> None:
    r = rng(f"damage-{kind}")
    out, job = _copy_job(interrupted8, tmp_path)
    chunk = job / "chunks" / f"{(j := r.randrange(13)):06d}.safetensors"
    newest, older = job / "snapshots" / "000013.safetensors", job / "snapshots" / "000008.safetensors"
    fault = Fault(f"damaged job: {kind}")
    expect = {"chunk truncated": f"chunk {j} is damaged", "chunk bit flipped": f"chunk {j} is damaged",
              "chunk deleted": f"chunk {j} is missing", "chunk of another job": "belongs to another job",
              "chunk renumbered": f"chunk {j} is damaged: it says it is number",
              "newest snapshot truncated": "snapshot 13 is damaged", "newest snapshot bit flipped":
              "snapshot 13 is damaged", "both snapshots damaged": "resuming from the first chunk",
              "half-written temp files": "", "kill -9 tail": "chunk 12 is damaged"}[kind]
    if kind == "chunk truncated":
        damage(chunk, "truncate", r)
    elif kind == "chunk bit flipped":
        damage(chunk, "flip", r)
    elif kind == "chunk deleted":
        chunk.unlink()
    elif kind == "chunk of another job":
        _other_job(chunk)
    elif kind == "chunk renumbered":
        shutil.copyfile(job / "chunks" / f"{(j + 1) % 13:06d}.safetensors", chunk)
    elif kind.startswith("newest snapshot"):
        damage(newest, "truncate" if "truncated" in kind else "flip", r)
    elif kind == "both snapshots damaged":
        damage(newest, "flip", r)
        damage(older, "truncate", r)
    else:  # a crash in the middle of atomic writes: temp files next to the real ones; kill -9 tail: the last too
        for folder in (job, job / "chunks", job / "snapshots"):
            (folder / f".x.{r.randrange(10**6)}.partial").write_bytes(os.urandom(r.randrange(1, 5000)))
        if kind == "kill -9 tail":
            damage(job / "chunks" / "000012.safetensors", "truncate", r)
    resumed = env.resume(out)
    assert_clean_exit(resumed, 0, expect)
    assert_same(out, ref8)
    fault.survived()


REFUSALS = ["storyboard changed", "another seed", "another duration", "preset weights changed",
            "another lvstudio version", "job.json damaged", "an output appeared since"]


@pytest.mark.parametrize("kind", REFUSALS)
def test_a_job_for_something_else_is_refused_with_the_reason_and_kept(env: Env, ref8: Output, interrupted8: Path,
                                                                      tmp_path: Path, kind: str) -> None:
    out, job = _copy_job(interrupted8, tmp_path)
    before = tree_state(out.parent)
    story, extra, undo = env.story, [], lambda: None
    info_path = job / "job.json"
    info = info_path.read_text()
    weights = env.preset.parent / "dit.safetensors"
    fault = Fault(f"refused job: {kind}")
    if kind == "storyboard changed":
        story = tmp_path / "story.toml"
        story.write_text(env.story.read_text().replace("resting on the snow", "resting on the sand"))
        words = ["the storyboard changed"]
    elif kind == "another seed":
        extra, words = ["--seed", "3"], ["seed: the job has 7, this command asks for 3"]
    elif kind == "another duration":
        extra, words = ["--duration", "5s"], ["num_frames: the job has 128, this command asks for 80"]
    elif kind == "preset weights changed":
        original = weights.read_bytes()
        damage(weights, "flip", rng("refused-weights"))  # e.g. retrained, or damaged
        words = ["the preset's configuration or weight files changed"]

        def undo() -> None:
            weights.write_bytes(original)
    elif kind == "another lvstudio version":
        info_path.write_text(info.replace('"lvstudio": "', '"lvstudio": "0.0.1-'))
        words = ["it was made by lvstudio 0.0.1-"]
    elif kind == "job.json damaged":
        info_path.write_text(info[: len(info) // 2])
        words = ["job.json is damaged", "--force"]
    else:
        out.write_bytes(b"a video the user put there")
        words = ["appeared after this render started", "--force"]
    before = tree_state(out.parent)
    try:
        refused = cli("render", str(story), "--out", str(out), "--no-progress", "--resume", *extra)
        assert_clean_exit(refused, 2, *words)
        lost = lost_bytes(before, out.parent)
    finally:
        undo()
    assert lost == 0 and tree_state(out.parent) == before  # the job is kept as it was
    info_path.write_text(info)
    if out.exists():
        out.rename(tmp_path / "moved-away.mp4")
    assert_clean_exit(env.resume(out), 0)
    assert_same(out, ref8)
    fault.survived(lost)


# ---------------------------------------------------------------------------------------------------------------
# Stop signals (in this process: the render's own handlers, raised at seeded chunk boundaries)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_finishes_the_chunk_keeps_the_job_and_resumes_to_the_same_video(
        env: Env, ref3: Output, tmp_path: Path, name: str) -> None:
    signum = getattr(signal, name)
    if signum != signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
        pytest.skip(f"{name} is ignored in this process (nohup?), as lvstudio then leaves it")
    k = rng(f"signal-{name}").randint(1, 6)
    out = tmp_path / "out" / "cut.mp4"
    before = user_files(out.parent)
    fault = Fault(f"stop signal: {name}")
    with SignalAt(k, [signum]):
        stopped = env.render(out, "3s")
    assert_clean_exit(stopped, 128 + signum, f"{name}: stopped at frame", f"--out {out} --resume")
    assert len(list(out.with_name("cut.job").joinpath("chunks").iterdir())) == k  # the chunk in flight finished
    assert_clean_exit(env.resume(out), 0, "resuming")
    assert_same(out, ref3)
    fault.survived(lost_bytes(before, out.parent))


def test_a_second_signal_stops_at_once_and_the_job_still_resumes(env: Env, ref3: Output, tmp_path: Path) -> None:
    k = rng("signal-twice").randint(1, 6)
    out = tmp_path / "out" / "cut.mp4"
    before = user_files(out.parent)
    fault = Fault("stop signal: SIGTERM twice, then SIGINT while resuming")
    with SignalAt(k, [signal.SIGTERM, signal.SIGTERM], where="inside"):
        stopped = env.render(out, "3s")
    assert_clean_exit(stopped, 143, "SIGTERM again: stopped at once", "--resume")
    assert len(list(out.with_name("cut.job").joinpath("chunks").iterdir())) == k - 1  # the chunk in flight dropped
    # Interrupted again while resuming, then resumed to the end.
    with SignalAt(2, [signal.SIGINT]):
        assert_clean_exit(env.resume(out), 130, "SIGINT: stopped at frame")
    assert_clean_exit(env.resume(out), 0)
    assert_same(out, ref3)
    fault.survived(lost_bytes(before, out.parent))
