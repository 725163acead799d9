"""Print pip constraints that pin every dependency floor pyproject.toml declares (`name>=X` -> `name==X`):
the core dependencies, the user-facing extras (s3, watch) and the libraries the tests check against
(transformers, PEFT). The floors job installs the wheel under these constraints and runs the CPU suite,
so a floor in pyproject.toml is a version that CI runs, not a guess.

    python .ci/floors.py > floors.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

EXTRAS = ("s3", "watch")
FROM_DEV = ("transformers", "peft")
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)\s*(,.*)?$")


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = list(project["dependencies"]) + [r for e in EXTRAS for r in extras[e]]
    reqs += [r for r in extras["dev"] if re.split(r"[<>=\[ ]", r)[0].lower() in FROM_DEV]
    out = {}
    for req in reqs:
        m = FLOOR.match(req)
        if not m:
            raise SystemExit(f"{pyproject}: {req!r} has no '>=' floor; every dependency needs one")
        out[m.group(1).lower()] = m.group(3)
    return out


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    for name, version in floors(root / "pyproject.toml").items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    sys.exit(main())
