"""Shared test settings: one torch thread for the whole run, and an empty user preset folder.

On a shared 2-core machine, torch's default of several OpenMP threads spins while it waits for a busy core and made
the tiny models up to 10x slower (README, "Threads"); the CLI and the benchmarks default to one thread for the same
reason. A test that wants more sets it and restores it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's figures (tests/helpers/faults.py), when any fault was injected in this run."""
    from tests.helpers.faults import LEDGER

    if sum(LEDGER.injected.values()):
        terminalreporter.section("fault injection")
        for line in LEDGER.lines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def _own_user_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point LVSTUDIO_CONFIG at an empty folder: the developer's own preset folder (pins written by `lvstudio presets
    pin`, searched before every other) must not change what the tests load. Subprocesses inherit it."""
    before = os.environ.get("LVSTUDIO_CONFIG")
    os.environ["LVSTUDIO_CONFIG"] = str(Path(tmp_path_factory.mktemp("lvstudio-config")))
    yield
    if before is None:
        os.environ.pop("LVSTUDIO_CONFIG", None)
    else:
        os.environ["LVSTUDIO_CONFIG"] = before
