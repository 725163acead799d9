"""Sum pytest's closing lines ("12 passed, 3 skipped in 4.5s") found in CI logs into one closing line."""

import re
import sys
from pathlib import Path

CLOSING = re.compile(r"^(?:=+ )?((?:\d+ [a-z]+(?:, )?)+) in [0-9.]+s")


def main() -> None:
    total = {"passed": 0, "failed": 0, "skipped": 0}
    runs = 0
    for path in sys.argv[1:]:
        for line in Path(path).read_text(errors="replace").splitlines():
            m = CLOSING.match(line.strip())
            if not m:
                continue
            runs += 1
            for count, what in re.findall(r"(\d+) ([a-z]+)", m.group(1)):
                key = {"error": "failed", "errors": "failed"}.get(what, what)
                if key in total:
                    total[key] += int(count)
    print(f"pytest runs: {runs}")
    print(f"tests: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")


if __name__ == "__main__":
    main()
