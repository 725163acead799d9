"""Block-size configs: CPU heuristic without any device query, per-GPU JSON overrides by shape class."""

import json

import pytest

from loraplex.kernels import budget, config, ops


def test_cpu_heuristic_needs_no_driver():
    cfg = config.get("sgmv_shrink", "cpu", num_tokens=5, K=129, R=8)
    assert cfg["BLOCK_M"] == 16 and cfg["BLOCK_K"] == 256 and cfg["BLOCK_R"] == 16
    assert config.get("sgmv_expand", "cpu", num_tokens=64, N=1000, R=64)["BLOCK_N"] == 256
    assert config.gpu_name("cpu") == "cpu"
    with pytest.raises(KeyError):
        config.get("sgmv_nope", "cpu", 1)


def test_shape_classes():
    assert [config.shape_class(t) for t in (1, 16, 17, 128, 129, 1024, 1025)] == [
        "decode", "decode", "small", "small", "medium", "medium", "large"]
    assert config.shape_class(4, n=128256) == "wide"


def test_gpu_json_overrides_heuristic(tmp_path, monkeypatch):
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps({
        "fused_max_tokens": 8,
        "sgmv_shrink": {"default": {"num_warps": 8}, "decode": {"BLOCK_K": 512}},
    }))
    (tmp_path / "default.json").write_text(json.dumps({"fused_max_tokens": 4}))
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(config, "gpu_name", lambda device: "NVIDIA H200")
    config.load.cache_clear()
    try:
        decode = config.get("sgmv_shrink", "cuda", num_tokens=4, K=4096, R=16)
        assert decode["BLOCK_K"] == 512 and decode["num_warps"] == 8 and decode["BLOCK_M"] == 16
        prefill = config.get("sgmv_shrink", "cuda", num_tokens=4096, K=4096, R=16)
        assert prefill["BLOCK_K"] == 64 and prefill["num_warps"] == 8
        assert config.fused_max_tokens("cuda") == 8
        monkeypatch.setattr(config, "gpu_name", lambda device: "Some Other GPU")
        assert config.fused_max_tokens("cuda") == 4  # falls back to default.json
    finally:
        config.load.cache_clear()


def test_shipped_configs_are_valid():
    """default.json and every per-GPU file (bench/tune.py writes them): known keys, and every op entry
    is a dict of shape-class (optionally @rank) keys."""
    classes = {"default", "decode", "small", "medium", "large", "wide"}
    for path in config.CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert isinstance(data.get("fused_max_tokens", 16), int), path
        assert set(data) - {"_comment", "_tuned", *config.GLOBAL_KEYS} <= set(config.OPS), path
        for op in config.OPS:
            for key, entry in data.get(op, {}).items():
                assert key.split("@")[0] in classes and isinstance(entry, dict), (path, op, key)


def test_rank_keys_override_the_class(tmp_path, monkeypatch):
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps({
        "sgmv_expand": {"small": {"BLOCK_N": 64}, "small@r64": {"BLOCK_N": 32, "num_warps": 8}},
        "fused_max_tokens": 16, "fused_max_rank": 64,
    }))
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(config, "gpu_name", lambda device: "NVIDIA H200")
    config.load.cache_clear()
    try:
        assert config.get("sgmv_expand", "cuda", 64, N=4096, R=16)["BLOCK_N"] == 64
        r64 = config.get("sgmv_expand", "cuda", 64, N=4096, R=48)  # padded rank 48: the r64 bucket
        assert r64["BLOCK_N"] == 32 and r64["num_warps"] == 8
        assert ops.use_fused(4, "cuda", 64) and not ops.use_fused(4, "cuda", 128) and not ops.use_fused(17, "cuda", 16)
        config.load.cache_clear()
        monkeypatch.setattr(config, "CONFIG_DIR", tmp_path / "none")  # no file at all: the GPU defaults
        assert config.fused_max_tokens("cuda") == config.DEFAULTS["fused_max_tokens"] == 0
    finally:
        config.load.cache_clear()


@pytest.mark.parametrize("R", [8, 16, 32, 64, 128, 256, 320, 512])
def test_every_pick_fits_the_sm90_budget(R):
    """The estimate behind the heuristic's choices; tests/kernels/test_aot_compile.py checks the
    compiler's real figures for the same picks."""
    for op in config.OPS:
        for T in (1, 16, 64, 256, 2048):
            for elem in (2, 4):
                if op == "sgmv_fused" and R > budget.FUSED_MAX_RANK:
                    continue  # never picked: add_lora_linear takes shrink + expand (test_fit_shrinks_...)
                cfg = config.pick(op, "some GPU", T, K=4096, N=14336, R=R, elem=elem)
                assert budget.fits(op, cfg, R, elem), (op, T, R, cfg)
                assert cfg["BLOCK_M"] in (16, 32, 64)
                if op in ("sgmv_expand", "lora_embedding") and cfg["BLOCK_M"] >= 64:
                    assert cfg["num_stages"] == 1, "wgmma with A in registers must not be pipelined on sm_90"
                if op == "sgmv_fused":
                    assert cfg["BLOCK_M"] <= 32 and cfg["BLOCK_R"] >= R


def test_fit_shrinks_what_does_not_fit():
    """The fused kernel at rank 128 with BLOCK_K 512 would ask for ~300 KB (over the 227 KB of sm_90);
    at rank 256 it does not fit at all (v1 compiled it to 279 KB and 184 B of spills: no launch)."""
    big = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=512, BLOCK_R=16, num_warps=4, num_stages=3)
    assert not budget.fits("sgmv_fused", dict(big, BLOCK_R=128), 128)
    cfg = budget.fit("sgmv_fused", big, 128)
    assert budget.fits("sgmv_fused", cfg, 128) and cfg["BLOCK_R"] == 128 and cfg["BLOCK_K"] < 512
    with pytest.raises(ValueError, match="shrink \\+ expand"):
        budget.fit("sgmv_fused", big, 256)
    assert not ops.use_fused(1, "cpu", 256)
    assert budget.fit("sgmv_expand", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, num_stages=2), 16)["num_stages"] == 1
    assert budget.fit("sgmv_expand", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, num_stages=2), 16, arch=80)[
        "num_stages"] == 2
