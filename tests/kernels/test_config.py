"""Block-size configs: CPU heuristic without any device query, per-GPU JSON overrides by shape class."""

import json

import pytest

from loraplex.kernels import config


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


def test_shipped_default_config_is_valid_json():
    data = json.loads((config.CONFIG_DIR / "default.json").read_text())
    assert isinstance(data.get("fused_max_tokens"), int)
    assert set(data) - {"_comment", "fused_max_tokens"} <= set(config.OPS)
