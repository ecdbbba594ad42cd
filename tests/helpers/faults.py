"""Fault injection for the fault suite (tests/test_faults.py, tests/test_faults_studios.py).

- `FailingWrites`: every way lvstudio writes while it renders (safetensors files, atomic text/bytes files, the mp4
  encoder) counted; from the `at`-th call on, each raises the OSError a full, read-only or forbidden disk raises,
  after part of the bytes reached the temporary file (a full disk stays full until the block ends);
- `damage`: truncate a file, flip one of its bytes; `flip_in_tensor`: flip a bit inside one tensor of a
  safetensors file (the header still parses: only a checksum finds it);
- `tree_state` / `lost_bytes`: what the user had in a folder, and how many of those bytes are gone or changed;
- `LEDGER`: every fault a test injects is counted, and counted again as survived once all its checks passed;
  tests/conftest.py prints the totals at the end of the run.

Positions (the Nth write, the chunk a signal lands after, the byte flipped) come from `rng(name)`: seeded by the
test's name, so a failure reproduces exactly.
"""

from __future__ import annotations

import errno as errnos
import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SUITE_SEED = 17


def rng(name: str) -> random.Random:
    """The random source of one scenario (reproducible: seeded by the suite seed and the scenario's name)."""
    return random.Random(f"{SUITE_SEED}:{name}")


@dataclass
class Ledger:
    injected: Counter[str] = field(default_factory=Counter)
    survived: Counter[str] = field(default_factory=Counter)
    lost_bytes: int = 0

    def lines(self) -> list[str]:
        n, ok = sum(self.injected.values()), sum(self.survived.values())
        groups: dict[str, list[int]] = {}
        for kind, count in self.injected.items():  # kinds are "group: detail"
            g = groups.setdefault(kind.split(":")[0], [0, 0])
            g[0] += self.survived[kind]
            g[1] += count
        by_group = ", ".join(f"{name} {ok_}/{all_}" for name, (ok_, all_) in groups.items())
        return [f"fault injection: {n} faults injected, {ok} survived, lost bytes = {self.lost_bytes}",
                f"  survived/injected: {by_group}",
                "  survived = the expected exit code, a clear message, no traceback, nothing the user had lost, and "
                "the resumed (or re-run) job equal to the uninterrupted output"]


LEDGER = Ledger()


class Fault:
    """One injected fault: counted when made, and as survived when `survived(lost)` is called with 0 lost bytes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        LEDGER.injected[kind] += 1

    def survived(self, lost: int = 0) -> None:
        LEDGER.lost_bytes += lost
        assert lost == 0, f"{lost} bytes the user had were lost"
        LEDGER.survived[self.kind] += 1


def tree_state(folder: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every file under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[str(p.relative_to(folder))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def lost_bytes(before: dict[str, tuple[int, str]], folder: Path) -> int:
    """Bytes of the files in `before` that are now missing or different under `folder`."""
    after = tree_state(folder) if folder.exists() else {}
    return sum(size for name, (size, digest) in before.items() if after.get(name, (0, ""))[1] != digest)


def damage(path: Path, how: str, r: random.Random) -> str:
    """Truncate `path` ("truncate") or flip one bit of one byte ("flip"); returns what was done."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        keep = r.randrange(0, len(data))
        path.write_bytes(bytes(data[:keep]))
        return f"{path.name} truncated to {keep} of {len(data)} bytes"
    i = r.randrange(len(data))
    data[i] ^= 1 << r.randrange(8)
    path.write_bytes(bytes(data))
    return f"{path.name}: one bit of byte {i} of {len(data)} flipped"


def flip_in_tensor(path: Path, r: random.Random, name: str | None = None) -> str:
    """Flip one bit of one byte inside the data of tensor `name` (default: the largest) of a safetensors file, so
    that the header still parses and only the checksum can tell; returns what was done."""
    import json
    import struct

    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = {k: v for k, v in json.loads(data[8 : 8 + n]).items() if k != "__metadata__"}
    name = name or max(header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    start, end = header[name]["data_offsets"]
    i = 8 + n + r.randrange(start, end)
    data[i] ^= 1 << r.randrange(8)
    path.write_bytes(bytes(data))
    return f"{path.name}: one bit of byte {i} (tensor {name}) flipped"


ERRNO_WORDS = {
    errnos.ENOSPC: "no space left on the device",
    errnos.EACCES: "permission denied",
    errnos.EROFS: "read-only file system",
    errnos.EIO: "I/O error",
}


class FailingWrites:
    """Count lvstudio's writes; from the `at`-th (1-based) on, raise OSError(code) (None: only count).

    Patched: safetensors.torch.save_file (it raises safetensors' own error, "... (os error N)", as its Rust writer
    does), pathlib.Path.write_bytes (atomic text, JSON and PNG files) and lvstudio.video.VideoSink.write (the encoder;
    PyAV raises an OSError naming the file). Each failing call first writes part of its bytes, as a disk filling up
    does."""

    def __init__(self, at: int | None = None, code: int = errnos.ENOSPC) -> None:
        self.at, self.code = at, code
        self.calls = 0
        self.failed: list[str] = []
        self._mp = pytest.MonkeyPatch()

    def _fails(self, what: str) -> bool:
        self.calls += 1
        if self.at is not None and self.calls >= self.at:
            self.failed.append(what)
            return True
        return False

    def __enter__(self) -> FailingWrites:
        import safetensors.torch
        from safetensors import SafetensorError

        from lvstudio.video import VideoSink

        real_save, real_write_bytes, real_sink_write = safetensors.torch.save_file, Path.write_bytes, VideoSink.write
        fault = self

        def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            if fault._fails(str(filename)):
                real_write_bytes(Path(filename), b"\x00" * 13)  # a header cut short
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(fault.code)} "
                                      f"(os error {fault.code})")
            real_save(tensors, filename, metadata=metadata)

        def write_bytes(self: Path, data: bytes) -> int:
            if fault._fails(str(self)):
                real_write_bytes(self, bytes(data[: len(data) // 2]))
                raise OSError(fault.code, os.strerror(fault.code), str(self))
            return real_write_bytes(self, data)

        def sink_write(self: VideoSink, frames: Any) -> None:
            if fault._fails(str(self.partial_path)):
                raise OSError(fault.code, os.strerror(fault.code), str(self.partial_path))
            real_sink_write(self, frames)

        self._mp.setattr(safetensors.torch, "save_file", save_file)
        self._mp.setattr(Path, "write_bytes", write_bytes)
        self._mp.setattr(VideoSink, "write", sink_write)
        return self

    def __exit__(self, *exc: object) -> None:
        self._mp.undo()
