"""`lvstudio render` end to end on tiny random weights: H.264 output, manifest, refusal to overwrite, Ctrl-C +
resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvstudio.video import probe_video
from tests.helpers.random_preset import write_random_preset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "storyboards" / "demo.toml"


def _cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lvstudio", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_preset(tmp_path_factory.mktemp("preset"))


@pytest.mark.slow
def test_render_writes_h264_manifest_and_contact_sheet(preset: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    r = _cli("render", str(DEMO), "--preset", str(preset), "--out", str(out), "--duration", "3s", "--no-progress",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = probe_video(out)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert info.width % 2 == 0 and info.height % 2 == 0 and info.faststart
    assert info.num_frames == 3 * 16
    manifest = json.loads((tmp_path / "demo.manifest.json").read_text())
    assert manifest["frames"] == 48 and manifest["seed"] == 7
    assert manifest["shots"][0]["frame_start"] == 0 and "oracle_adherence" in manifest["shots"][0]
    assert manifest["caches"]["identities"][0]["name"] == "hero"
    assert (tmp_path / "demo.contact.png").exists()
    assert not (tmp_path / "demo.job").exists()
    assert not list(tmp_path.glob(".*partial*"))
    # An existing output is never overwritten without --force.
    before = out.read_bytes()
    r = _cli("render", str(DEMO), "--preset", str(preset), "--out", str(out), "--duration", "1s", "--no-progress",
             cwd=tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == before


@pytest.mark.slow
def test_bad_storyboard_exits_2_and_writes_nothing(preset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "x"\nduration = "5s"\n[[shots]]\nat = "0:99"\nprompt = "a red ball"\n')
    r = _cli("render", str(bad), "--preset", str(preset), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "bad.toml:4" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


@pytest.mark.slow
def test_interrupt_then_resume_equals_uninterrupted(preset: Path, tmp_path: Path) -> None:
    args = ["--preset", str(preset), "--duration", "8s", "--no-progress", "--keep-job"]
    ref = tmp_path / "ref.mp4"
    assert _cli("render", str(DEMO), "--out", str(ref), *args, cwd=tmp_path).returncode == 0
    out = tmp_path / "cut.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lvstudio", "render", str(DEMO), "--out", str(out), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = tmp_path / "cut.job" / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(chunks.glob("*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err and not out.exists() and list((tmp_path / "cut.job" / "snapshots").glob("*.safetensors"))
    r = _cli("render", str(DEMO), "--out", str(out), *args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref_chunks = sorted((tmp_path / "ref.job" / "chunks").glob("*.safetensors"))
    cut_chunks = sorted(chunks.glob("*.safetensors"))
    assert [p.name for p in ref_chunks] == [p.name for p in cut_chunks]
    for a, b in zip(ref_chunks, cut_chunks, strict=True):
        assert torch.equal(load_file(str(a))["latents"], load_file(str(b))["latents"])
    assert probe_video(out).num_frames == probe_video(ref).num_frames == 128
    # The resumed render's manifest scores the same frames as the uninterrupted one (re-decoded frames included).
    scores = [json.loads((tmp_path / f"{n}.manifest.json").read_text())["shots"] for n in ("ref", "cut")]
    assert [r.get("oracle_adherence") for r in scores[0]] == [r.get("oracle_adherence") for r in scores[1]]
    assert "oracle_adherence" in scores[1][0]


@pytest.mark.slow
def test_live_pushes_and_reroll_are_saved_as_a_storyboard_that_rerenders(preset: Path, tmp_path: Path) -> None:
    from lvstudio.presets.load import load_bundle
    from lvstudio.session import RenderSession, resolve_settings
    from lvstudio.storyboard import dump_storyboard, load_storyboard

    sb = load_storyboard(DEMO)
    pre, settings = resolve_settings(sb, preset=str(preset), duration=3.0)
    session = RenderSession(sb, load_bundle(pre), settings)
    session.step()
    session.step()
    ev = session.push("{hero} spinning in the night sky", transition="blend")
    assert ev.block == 2
    session.step()
    rr = session.reroll(seed=5)
    assert rr.block == 3 and rr.seed == 5 and rr.prompt == ev.prompt
    session.run()
    saved = session.rendered_storyboard()
    prompts = [s.prompt for s in saved.shots]
    assert prompts[-1] == "{hero} spinning in the night sky" and saved.shots[-1].seed == 5
    assert saved.duration == pytest.approx(3.0)
    path = tmp_path / "session.toml"
    path.write_text(dump_storyboard(saved))
    r = _cli("render", str(path), "--preset", str(preset), "--out", str(tmp_path / "again.mp4"), "--no-progress",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert probe_video(tmp_path / "again.mp4").num_frames == 48
