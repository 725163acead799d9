"""Print the versions a CI job really installed, and fail if they are not the ones the job is about.

    python .ci/versions.py FLOORS.txt   every `name==X` of the floors file is installed at X
    python .ci/versions.py --newest     torch, transformers and PEFT are the newest releases on the index
                                        (Triton is the one torch pins; it is printed)
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

SHOWN = ("torch", "triton", "transformers", "peft", "safetensors", "numpy", "fsspec", "s3fs", "prometheus_client",
         "regex", "tqdm", "watchdog", "tokenizers")
NEWEST = ("torch", "transformers", "peft")


def release(v: str) -> tuple[int, ...]:
    """'2.11' and '2.11.0+cu130' -> (2, 11, 0): the numeric release, padded to three parts."""
    parts = [int(p) for p in re.match(r"[0-9.]*[0-9]", v).group(0).split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def newest_on_index(name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True,
                         timeout=120).stdout
    m = re.search(rf"^{re.escape(name)} \(([^)]+)\)", out, re.M | re.I)
    if not m:
        sys.exit(f"versions: cannot read the newest {name} from the index: {out[-300:]!r}")
    return m.group(1)


def main() -> None:
    installed = {}
    for name in SHOWN:
        try:
            installed[name] = md.version(name)
        except md.PackageNotFoundError:
            installed[name] = "-"
    print(f"versions: python {sys.version.split()[0]}, " + ", ".join(f"{n} {v}" for n, v in installed.items()))
    bad = []
    if sys.argv[1:] == ["--newest"]:
        for name in NEWEST:
            latest = newest_on_index(name)
            if release(installed[name]) != release(latest):
                bad.append(f"{name} {installed[name]} is installed, the newest release is {latest}")
    elif len(sys.argv) == 2:
        for line in Path(sys.argv[1]).read_text().splitlines():
            name, _, floor = line.strip().partition("==")
            if floor and release(md.version(name)) != release(floor):
                bad.append(f"{name} {md.version(name)} is installed, its floor is {floor}")
    else:
        sys.exit(__doc__)
    if bad:
        sys.exit("versions: FAILED:\n  " + "\n  ".join(bad))
    print("versions: ok")


if __name__ == "__main__":
    main()
