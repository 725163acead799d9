"""`loraplex catalog ls|validate` as a user runs them: a subprocess, its output and exit code."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from loraplex.catalog import Catalog

from .helpers import edit_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "loraplex.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_ls_table(catalog_dir):
    r = run_cli("catalog", "ls", catalog_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "id", "rank", "alpha", "targets", "size", "version"]
    assert set(lines[1]) <= {"-", " "}
    rows = {ln.split()[0]: ln.split() for ln in lines[2:5]}
    cat = Catalog(catalog_dir)
    for e in cat.entries():
        row = rows[e.name]
        assert row[1:4] == [str(e.id), str(e.r), str(int(e.lora_alpha))]
        assert row[4].split(",") == sorted(e.target_modules)  # sorted: diffs between catalogs stay readable
    # aligned: every column starts at the same offset on every line
    starts = [lines[0].index(h) for h in ("id", "rank", "alpha", "targets")]
    for ln in lines[1:5]:
        assert all(ln[s - 1] == " " for s in starts[1:])
    assert lines[-1] == f"3 adapters in {cat.root}"


def test_ls_json_and_invalid_count(catalog_dir):
    edit_config(catalog_dir / "beta-r8", bias="all")
    r = run_cli("catalog", "ls", "--json", catalog_dir)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cat = Catalog(catalog_dir)
    assert [a["name"] for a in out["adapters"]] == cat.names() == ["alpha-r4", "gamma-r16"]
    for a in out["adapters"]:
        e = cat.get(a["name"])
        assert (a["id"], a["version"], a["rank"], a["size_bytes"]) == (e.id, e.version, e.r, e.size_bytes)
    assert out["invalid"] == {"beta-r8": "bias='all' is not supported (only 'none')"}
    plain = run_cli("catalog", "ls", catalog_dir)
    assert plain.stdout.splitlines()[-1].endswith("; 1 invalid (see `loraplex catalog validate`)")
    assert "skipping LoRA adapter 'beta-r8'" in plain.stderr


def test_ls_does_not_import_torch(catalog_dir):
    code = ("import sys; from loraplex.cli import main; rc = main(['catalog', 'ls', sys.argv[1]]); "
            "assert rc == 0; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(catalog_dir)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False"


def test_validate(catalog_dir, adapter_source, capsys):
    from loraplex.cli import main

    assert main(["catalog", "validate", str(catalog_dir)]) == 0  # in-process: one torch import saved
    assert capsys.readouterr().out.splitlines()[-1] == f"3 valid, 0 invalid in {catalog_dir} (3 with weights read)"
    # a bad config (found by the scan) and bad weights (found only by reading them)
    shutil.copytree(adapter_source / "alpha-r4", catalog_dir / "dora")
    edit_config(catalog_dir / "dora", use_dora=True)
    w = catalog_dir / "gamma-r16" / "adapter_model.safetensors"
    os.truncate(w, os.path.getsize(w) - 10)
    bad = run_cli("catalog", "validate", catalog_dir)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert lines[0] == "INVALID  dora: DoRA (use_dora=true) is not supported"
    assert lines[1].startswith("INVALID  gamma-r16: adapter_model.safetensors is corrupt: ")
    assert lines[-1] == f"2 valid, 2 invalid in {catalog_dir} (2 with weights read)"
    assert "skipping" not in bad.stderr  # each problem reported once, on stdout
    quick = run_cli("catalog", "validate", "--quick", catalog_dir)
    assert quick.returncode == 1 and quick.stdout.splitlines()[-1] == \
        f"2 valid, 2 invalid in {catalog_dir} (configs and weight headers (--quick))"


@pytest.mark.parametrize("cmd", ["ls", "validate"])
def test_unusable_root_exits_2(tmp_path, cmd):
    r = run_cli("catalog", cmd, tmp_path / "missing")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: catalog path ({tmp_path / 'missing'}) does not exist"


def test_usage_errors():
    r = run_cli("catalog")
    assert r.returncode == 2 and "usage: loraplex catalog" in r.stderr


def test_validate_progress_on_a_terminal_only(catalog_dir):
    """A progress bar on stderr when it is a terminal (a pty here); nothing extra when piped."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "catalog", "validate", str(catalog_dir)],
                            stdout=subprocess.PIPE, stderr=slave, cwd=REPO, text=True)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "reading weights:" in shown.decode() and "/3 [" in shown.decode()
    assert out.splitlines()[-1] == f"3 valid, 0 invalid in {catalog_dir} (3 with weights read)"
    piped = run_cli("catalog", "validate", catalog_dir)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout == out


def test_version():
    import loraplex

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout == f"loraplex {loraplex.__version__}\n"
