"""Are pyproject.toml's dependency floors the versions installed here? (run by .ci/floors inside a floor venv)

    python .ci/check_floors.py EXTRA[,EXTRA...] [--only EXTRA[,EXTRA...]]

Expands the core dependencies plus the given extras (an extra may name `lvstudio[...]`), and for each requirement
with a `>=` floor compares it with the installed version. The venv was installed with uv's lowest-direct resolution,
so an installed version above the floor means the floor cannot be installed together with the rest: the floor is not
true, raise it. `--only` limits the check to the requirements those extras add (the core's are checked elsewhere).
torch is skipped: CI installs the local CPU wheel, so its floor rests on API review.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SKIP = {"torch"}


def requirements(project: dict, extras: list[str]) -> list[Requirement]:
    name = canonicalize_name(project["name"])
    out: list[Requirement] = []
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"].get(extra, []) if extra != "core" else project["dependencies"]:
            req = Requirement(line)
            if canonicalize_name(req.name) == name:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    extras = ["core", *argv[0].split(",")]
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else None
    reqs = requirements(project, extras)
    if only is not None:
        base = {canonicalize_name(r.name) for r in requirements(project, ["core"])}
        reqs = [r for r in requirements(project, only) if canonicalize_name(r.name) not in base]
    bad = 0
    for req in sorted(reqs, key=lambda r: canonicalize_name(r.name)):
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if not floors or canonicalize_name(req.name) in SKIP:
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = "missing"
        ok = have != "missing" and Version(have) == Version(floors[0])
        bad += not ok
        print(f"  {'ok ' if ok else 'BAD'} {req.name:<26} floor {floors[0]:<10} installed {have}")
    if bad:
        print(f"{bad} floor(s) not installable as written: raise them in pyproject.toml to the installed version "
              "(and say which API or co-dependency sets them)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
