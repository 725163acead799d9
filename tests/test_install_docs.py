"""README's Install section and version table agree with pyproject.toml (extras, floors, vLLM minors),
and the version is written in one place."""

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (the floors job): pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def table() -> dict[str, list[str]]:
    rows = [ln for ln in section("Install").splitlines() if ln.startswith("|")]
    assert rows[0].split("|")[1:-1] == [" component ", " supported ", " floor tested ", " CI's main job "]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.split("|")[1:-1]] for r in rows[2:])}


def floor(reqs: list[str], name: str) -> str:
    for r in reqs:
        m = re.match(rf"{re.escape(name)}\s*>=\s*([0-9.]+)", r, re.I)
        if m:
            return m.group(1)
    raise AssertionError(f"no '{name}>=' floor in {reqs}")


def release(v: str) -> tuple[int, ...]:
    parts = [int(p) for p in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def test_install_section_names_every_user_extra():
    extras = set(PROJECT["project"]["optional-dependencies"])
    shown = set(re.findall(r"loraplex\[(\w+)\]", section("Install")))
    assert shown == extras - {"dev", "bench"}, "pip install lines of README's Install section vs pyproject extras"
    assert "pip install -e '.[dev]'" in section("Install")


def test_version_table_matches_the_floors():
    deps = PROJECT["project"]["dependencies"]
    dev = PROJECT["project"]["optional-dependencies"]["dev"]
    rows = table()
    py = PROJECT["project"]["requires-python"]
    assert rows["Python"][:2] == [py, py.removeprefix(">=")]
    for name, row in (("torch", "torch"), ("triton", "Triton")):
        f = floor(deps, name)
        assert rows[row][0] == f">={f}"
        assert release(rows[row][1]) == release(f), f"{row}: table floor {rows[row][1]} vs pyproject {f}"
    tf, pf = floor(dev, "transformers"), floor(dev, "peft")
    assert rows["transformers / PEFT"][:2] == [f">={tf} / >={pf}", f"{tf} / {pf}"]


def test_vllm_row_lists_the_extras_minors():
    (spec,) = PROJECT["project"]["optional-dependencies"]["vllm"]
    lo = re.search(r">=\s*0\.(\d+)", spec)
    hi = re.search(r"<\s*0\.(\d+)", spec)
    minors = [f"0.{m}" for m in range(int(lo.group(1)), int(hi.group(1)))]
    supported, tested = table()["vLLM"][:2]
    assert supported == ", ".join(minors)
    assert re.findall(r"\b0\.\d+\b(?= \()", tested) == minors, "every supported minor has a CI job in the table"


def test_floors_job_runs_on_the_python_floor():
    py = PROJECT["project"]["requires-python"].removeprefix(">=")
    assert f"versions/{py}.*/bin/python{py}" in (REPO / "Makefile").read_text()


def test_one_version():
    import loraplex

    assert "version" not in PROJECT["project"] and PROJECT["project"]["dynamic"] == ["version"]
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "loraplex.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", loraplex.__version__)
