"""bench/tune.py's search on CPU with a stand-in for the timing: it keeps a value only when it is
clearly faster, refuses configs that fail the reference check, and writes a table that the launchers'
config lookup reads back (kernels/config.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from loraplex.kernels import config

TUNE = Path(__file__).resolve().parents[2] / "bench" / "tune.py"


@pytest.fixture
def tune(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_BENCH_OUT", str(tmp_path))
    spec = importlib.util.spec_from_file_location("tune_under_test", TUNE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_search_keeps_clear_wins_and_skips_failed_checks(tune, monkeypatch, tmp_path):
    def fake_time(self, T, D, reps):
        cfg = config.get("sgmv_fused", "cpu", T, K=64, N=96, R=16)
        t = {512: 10.0, 256: 1.0}[cfg["BLOCK_K"]] * (0.5 if cfg["BLOCK_N"] == 64 else 1.0)
        return t * (0.99 if cfg["TARGET_PROGRAMS"] == 264 else 1.0)

    def fake_check(self, T, D):  # BLOCK_K 256 would be the fastest, but it is wrong: it must not be picked
        return 1.0 if config.get("sgmv_fused", "cpu", T, K=64, N=96, R=16)["BLOCK_K"] == 256 else 0.0

    monkeypatch.setattr(tune.Bench, "time_ms", fake_time)
    monkeypatch.setattr(tune.Bench, "check", fake_check)
    out = tmp_path / "table.json"
    tune.main(["--smoke", "--classes", "decode", "--out", str(out), "--budget-s", "60"])
    table = json.loads(out.read_text())
    # BLOCK_N 64 halves the time: kept; TARGET_PROGRAMS 264 saves 1 %: noise, not kept
    assert table["sgmv_fused"] == {"decode@r16": {"BLOCK_N": 64}}
    log = json.loads((tmp_path / "tune_smoke.json").read_text())["log"]
    assert any(e.get("field") == "BLOCK_K" and e.get("value") == 256 and e["ms"] is None for e in log)
    monkeypatch.setattr(config, "load", lambda name: table)
    assert config.pick("sgmv_fused", "any", 1, K=4096, N=4096, R=16)["BLOCK_N"] == 64
