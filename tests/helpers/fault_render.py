"""Rendering under faults, for the fault suite: the CLI run in this process (so patches and signal handlers apply),
the checks every scenario makes (exit code, message, no traceback; the same outputs as the uninterrupted render),
and signals raised from inside a render at a chosen chunk."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvstudio.cli import app
from lvstudio.session import RenderSession
from lvstudio.stop_signals import current_stop
from tests.helpers.faults import FailingWrites, tree_state


@dataclass(frozen=True)
class Output:
    video: str  # sha256 of the mp4
    sheet: str  # sha256 of the contact sheet
    manifest: str  # the manifest without timings and paths, as JSON
    writes: int = 0  # how many writes the render made (FailingWrites counts them)


@dataclass(frozen=True)
class Env:
    root: Path
    preset: Path
    story: Path

    def render(self, out: Path, duration: str, *extra: str) -> Result:
        return cli("render", str(self.story), "--preset", str(self.preset), "--out", str(out), "--duration", duration,
                   "--no-progress", *extra)

    def resume(self, out: Path, *extra: str) -> Result:
        return cli("render", str(self.story), "--out", str(out), "--no-progress", "--resume", *extra)


@dataclass(frozen=True)
class Result:
    code: int
    stderr: str
    stdout: str
    escaped: BaseException | None  # an exception that left the CLI (a traceback for the user)


def cli(*args: str) -> Result:
    """`lvstudio ARGS` in this process (signals and patches apply), as the console script runs it."""
    result = CliRunner().invoke(app, list(args))
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    return Result(result.exit_code, result.stderr, result.stdout, escaped)


def assert_clean_exit(r: Result, code: int, *words: str) -> None:
    """The exit code, one clear message with these words, no traceback."""
    assert r.escaped is None, f"an exception escaped: {r.escaped!r}"
    assert r.code == code, (r.code, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def outputs_of(out: Path) -> Output:
    manifest = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
    manifest.pop("timings")
    manifest["video"].pop("path")
    sheet = out.with_name(out.stem + ".contact.png")
    return Output(hashlib.sha256(out.read_bytes()).hexdigest(), hashlib.sha256(sheet.read_bytes()).hexdigest(),
                  json.dumps(manifest, sort_keys=True))


def assert_same(out: Path, ref: Output) -> None:
    got = outputs_of(out)
    assert got.video == ref.video, "the mp4 differs from the uninterrupted render"
    assert got.sheet == ref.sheet, "the contact sheet differs"
    assert got.manifest == ref.manifest, "the manifest differs"
    assert not out.with_name(out.stem + ".job").exists(), "the job folder is left behind"
    assert not [p for p in out.parent.rglob("*") if "partial" in p.name], "a partial file is left behind"


def user_files(folder: Path) -> dict[str, tuple[int, str]]:
    """Files a user already had in the output folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "older.mp4").write_bytes(os.urandom(4096))
    return tree_state(folder)


class SignalAt:
    """Raise signals from inside a render in this process: after chunk `chunk` is done (`where="after"`), or while
    chunk `chunk` is in flight, before it is saved (`where="inside"`)."""

    def __init__(self, chunk: int, signums: list[int], where: str = "after") -> None:
        self.chunk, self.signums, self.where = chunk, signums, where
        self._mp = pytest.MonkeyPatch()

    def _raise(self) -> None:
        assert current_stop() is not None, "no stop handler installed: the signal would kill pytest"
        for s in self.signums:
            signal.raise_signal(s)

    def __enter__(self) -> SignalAt:
        real_step, real_save = RenderSession.step, RenderSession._save_chunk
        me = self

        def step(session: RenderSession):  # noqa: ANN202
            chunk = real_step(session)
            if me.where == "after" and session.stats.chunks == me.chunk:
                me._raise()
            return chunk

        def save(session: RenderSession, chunk) -> None:  # noqa: ANN001
            if me.where == "inside" and chunk.index == me.chunk - 1:
                me._raise()
            real_save(session, chunk)

        self._mp.setattr(RenderSession, "step", step)
        self._mp.setattr(RenderSession, "_save_chunk", save)
        return self

    def __exit__(self, *exc: object) -> None:
        self._mp.undo()


def reference_render(env: Env, duration: str) -> Output:
    out = env.root / f"ref-{duration}" / "ref.mp4"
    with FailingWrites() as counter:
        r = env.render(out, duration)
    assert_clean_exit(r, 0)
    ref = outputs_of(out)
    return Output(ref.video, ref.sheet, ref.manifest, counter.calls)
