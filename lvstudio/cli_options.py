"""Checks shared by options of several commands (typer callbacks): `--threads` and `--seed`.

Each raises `LvError` (one line, exit 2) naming the option, the value and what it takes, before any work starts.
"""

from __future__ import annotations

import os

from lvstudio.errors import LvError


def check_threads(value: int | None) -> int | None:
    """--threads: 0 (torch's default) up to this machine's CPU count; more threads than CPUs only slow torch down
    (and tens of thousands crash OpenMP)."""
    cpus = os.cpu_count() or 1
    if value is not None and not 0 <= value <= cpus:
        raise LvError(f"--threads {value} is out of range",
                      hint=f"use 1 to {cpus}, this machine's CPU count (0 = torch's default where the option takes it)")
    return value


def check_seed(value: int | None) -> int | None:
    """--seed: a whole number from 0 to 2**63 - 1, as a storyboard's `seed`."""
    if value is None:
        return value
    from lvstudio.storyboard.schema import MAX_SEED

    if not 0 <= value <= MAX_SEED:
        raise LvError(f"--seed {value} is out of range", hint=f"use a whole number from 0 to {MAX_SEED}")
    return value
