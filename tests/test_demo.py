"""The demo end to end at its smallest setting: build the tiny model and catalog, serve a mixed
workload with cold misses through the Runtime, and check against transformers + PEFT (PASS)."""

from loraplex import demo


def test_demo_smallest_passes(tmp_path, capsys, monkeypatch):
    # the reference ops: the check is about serving, and the Triton interpreter is too slow here
    monkeypatch.setenv("LORAPLEX_BACKEND", "torch")
    code = demo.main(["--data", str(tmp_path / "demo_data"), "--setting", "smallest"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out.splitlines()[-1]
    # misses happened in both tiers: the workload is bigger than the GPU slots and the host cache
    assert "evictions" in out and " 0 evictions" not in out
