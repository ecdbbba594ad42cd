"""The fault suite, whole processes: signals and kills sent from outside, as `kill`, systemd, Docker, CI runners and a
closing terminal send them, to `lvstudio render`, `lvstudio tui` (in a pseudo-terminal) and `lvstudio preview`.

Each scenario waits for a seeded number of chunks, sends the signal, and checks the exit code, the message (the
resume command), no traceback, and that the job then resumes to exactly the uninterrupted video. All slow: each
starts Python processes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.fault_render import Env, Output, assert_clean_exit, assert_same, cli, reference_render
from tests.helpers.faults import Fault, damage, rng
from tests.helpers.random_preset import write_random_preset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("faults-processes")
    story = root / "story.toml"
    story.write_text((ROOT / "storyboards" / "demo.toml").read_text())
    return Env(root, write_random_preset(root / "preset"), story)


@pytest.fixture(scope="module")
def ref8(env: Env) -> Output:
    """The uninterrupted render, in this process: one torch thread as in the subprocesses, so they agree."""
    return reference_render(env, "8s")


def _env_vars() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _start_render(env: Env, out: Path, duration: str = "8s") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lvstudio", "render", str(env.story), "--preset", str(env.preset),
                             "--out", str(out), "--duration", duration, "--no-progress"], cwd=out.parent,
                            env=_env_vars(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_chunks(chunks: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while len(list(chunks.glob("*.safetensors"))) < n:
        assert proc.poll() is None, f"the process ended before chunk {n}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no chunk {n} in {chunks}"
        time.sleep(0.01)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_a_signal_from_outside_keeps_a_job_that_resumes_to_the_same_video(env: Env, ref8: Output, tmp_path: Path,
                                                                          name: str) -> None:
    if name == "SIGHUP" and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        pytest.skip("SIGHUP is ignored in this process (nohup?), so the render inherits that and lvstudio leaves it")
    r = rng(f"process-{name}")
    k = r.randint(2, 14)
    out = tmp_path / "cut.mp4"
    job = tmp_path / "cut.job"
    fault = Fault(f"signal from outside: {name}")
    proc = _start_render(env, out)
    _wait_for_chunks(job / "chunks", k, proc)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=DEADLINE_S)
    if name == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        # A crash during a write can leave a file cut short (our writes are atomic; a disk or an older tool is not):
        newest = sorted((job / "chunks").glob("*.safetensors"))[-1]
        damage(newest, "truncate", r)
    else:
        signum = getattr(signal, name)
        assert proc.returncode == 128 + signum, err
        assert f"{name}: stopped at frame" in err and f"--out {out} --resume" in err and "Traceback" not in err
    resumed = cli("render", str(env.story), "--out", str(out), "--no-progress", "--resume")
    assert_clean_exit(resumed, 0, "resuming")
    assert_same(out, ref8)
    fault.survived()


def test_a_second_signal_from_outside_stops_at_once(env: Env, ref8: Output, tmp_path: Path) -> None:
    k = rng("process-twice").randint(2, 10)
    out = tmp_path / "cut.mp4"
    fault = Fault("signal from outside: SIGTERM twice")
    proc = _start_render(env, out, "8s")
    _wait_for_chunks(tmp_path / "cut.job" / "chunks", k, proc)
    proc.send_signal(signal.SIGTERM)
    first = proc.stderr.readline()  # the note the first signal prints
    assert "SIGTERM: stopping after the chunk in flight (send it again to stop at once)" in first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "--resume" in err  # "stopped at once", or "stopped at frame" when the chunk finished before the second
    assert_clean_exit(cli("render", str(env.story), "--out", str(out), "--no-progress", "--resume"), 0)
    assert_same(out, ref8)
    fault.survived()


# ---------------------------------------------------------------------------------------------------------------
# The terminal studio


def test_the_tui_quits_as_with_ctrl_q_on_sigterm(env: Env, tmp_path: Path) -> None:
    """SIGTERM stops generating, finishes the recording and writes the storyboard, as Ctrl-Q does; exit 143."""
    import fcntl
    import select
    import struct
    import termios

    import numpy as np

    from lvstudio.video import probe_video

    code = ("from pathlib import Path; from lvstudio.cli import main; import sys; sys.argv = ['lvstudio', 'tui', "
            f"{str(env.story)!r}, '--preset', {str(env.preset)!r}, '--duration', '2:00', '--record', 'rec']; main()")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env_vars = dict(_env_vars(), TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env_vars, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    screen = b""
    fault = Fault("terminal studio: SIGTERM")

    def pump(until) -> None:  # noqa: ANN001 - drain the terminal until until() or the deadline
        nonlocal screen
        deadline = time.monotonic() + DEADLINE_S
        while not until() and time.monotonic() < deadline:
            if select.select([master], [], [], 0.05)[0]:
                try:
                    screen += os.read(master, 1 << 16)
                except OSError:
                    break

    try:
        recording = tmp_path / "rec"
        pump(lambda: any(p.stat().st_size > 4096 for p in recording.glob(".*partial*")) or proc.poll() is not None)
        assert proc.poll() is None, screen[-2000:]
        proc.send_signal(signal.SIGTERM)
        pump(lambda: proc.poll() is not None)
        assert proc.wait(timeout=60) == 143, screen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"Traceback" not in screen and b"SIGTERM: the studio stopped" in screen
    [video] = list((tmp_path / "rec").glob("lvstudio-*.mp4"))
    saved = video.with_name(video.stem + ".storyboard.toml")
    frames = probe_video(video).num_frames
    assert 0 < frames < 120 * 16 and saved.exists()
    # The saved storyboard re-renders the recorded frames (the tolerance of test_tui's re-render check).
    again = tmp_path / "again.mp4"
    assert_clean_exit(cli("render", str(saved), "--preset", str(env.preset), "--out", str(again), "--no-progress"), 0)
    a, b = _decode(video), _decode(again)
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert (diff > 0).mean() < 0.002 and diff.max() <= 16
    fault.survived()


def _decode(path: Path):  # noqa: ANN202 - [N, H, W, 3] uint8
    import av
    import numpy as np

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ---------------------------------------------------------------------------------------------------------------
# The web studio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_preview(env: Env, outputs: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lvstudio", "preview", str(env.story), "--port", str(port),
                             "--outputs", str(outputs), "--preset", str(env.preset)], cwd=outputs.parent,
                            env=_env_vars(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the studio did not start"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}/"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def web_ref(env: Env) -> str:
    """sha256 of the demo storyboard rendered by the CLI (what a web render of it must resume to)."""
    out = env.root / "web-ref" / "ref.mp4"
    assert_clean_exit(cli("render", str(env.story), "--preset", str(env.preset), "--out", str(out),
                          "--no-progress"), 0)
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM"])
def test_a_web_render_cut_short_by_the_process_dying_resumes_from_the_cli(env: Env, web_ref: str, tmp_path: Path,
                                                                          name: str) -> None:
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    story = env.story.read_text()
    k = rng(f"web-{name}").randint(2, 12)
    outputs = tmp_path / "outputs"
    fault = Fault(f"web studio process: {name}")
    proc, url = _start_preview(env, outputs)
    client = Client(url, verbose=False)
    try:
        client.submit(story, str(env.preset), "(storyboard)", None, api_name="/render")
        deadline = time.monotonic() + DEADLINE_S
        while not (jobs := list(outputs.glob("*/*.job/chunks"))) or len(list(jobs[0].iterdir())) < k:
            assert time.monotonic() < deadline and proc.poll() is None, "the web render did not start"
            time.sleep(0.01)
        proc.send_signal(getattr(signal, name))
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    [folder] = [p for p in outputs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    video = folder / f"{folder.name}.mp4"
    command = f"lvstudio render {folder / folder.name}.storyboard.toml --out {video} --resume"
    if name == "SIGTERM":
        assert proc.returncode == 143 and command in err and "Traceback" not in err, err[-3000:]
    resumed = cli(*command.split()[1:], "--no-progress")
    assert_clean_exit(resumed, 0, "resuming")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == web_ref
    assert not (folder / f"{folder.name}.job").exists()
    fault.survived()
