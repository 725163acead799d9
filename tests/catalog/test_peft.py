"""adapter_config.json parsing against PEFT itself: ranks, alphas and scalings of every LoRA layer of
a PeftModel built from the same files, and the exact reason for every config the runtime refuses."""

import json
import math

import pytest

from loraplex.catalog import Catalog, parse_config
from loraplex.catalog.peft import parse_config_bytes
from loraplex.errors import InvalidAdapter

from .helpers import DROP, peft_config


def _peft_layers(model_dir, adapter_dir):
    """{module path: (r, lora_alpha, scaling)} of every LoRA layer PEFT builds from adapter_dir."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            path = name.removeprefix("base_model.model.")
            out[path] = (mod.r["default"], mod.lora_alpha["default"], mod.scaling["default"])
    return out


@pytest.mark.parametrize("adapter", ["alpha-r4", "beta-r8", "gamma-r16"])
def test_rank_alpha_scaling_match_peft_for_every_layer(adapter, adapter_source, tiny_model_dir):
    entry = Catalog(adapter_source).get(adapter)
    layers = _peft_layers(tiny_model_dir, adapter_source / adapter)
    assert layers, "PEFT built no LoRA layer"
    for module, (r, alpha, scaling) in layers.items():
        assert entry.spec.targets(module), module
        assert entry.spec.rank_for(module) == r, module
        assert entry.spec.alpha_for(module) == pytest.approx(alpha), module
        assert entry.spec.scaling_for(module) == pytest.approx(scaling, rel=1e-12), module


def test_fixture_features_are_exercised(adapter_source):
    # The comparison above means something only if the fixtures use the features: rank_pattern
    # lowers one module's rank, alpha_pattern one module's alpha, rsLoRA scales by sqrt(r).
    cat = Catalog(adapter_source)
    a, b, g = cat.get("alpha-r4"), cat.get("beta-r8"), cat.get("gamma-r16")
    assert a.spec.rank_for("model.layers.0.self_attn.q_proj") == 2 != a.spec.rank_for("model.layers.1.self_attn.q_proj")
    assert b.use_rslora and b.scaling == pytest.approx(16 / math.sqrt(8))
    assert g.spec.scaling_for("model.layers.1.mlp.down_proj") == pytest.approx(8 / 16)
    assert g.scaling == pytest.approx(32 / 16)


def test_entry_fields_match_the_file(adapter_source):
    for name in ("alpha-r4", "beta-r8", "gamma-r16"):
        with open(adapter_source / name / "adapter_config.json") as f:
            cfg = json.load(f)
        e = Catalog(adapter_source).get(name)
        assert (e.r, e.lora_alpha, e.use_rslora) == (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"])
        assert set(e.target_modules) == set(cfg["target_modules"])
        assert e.rank_pattern == cfg["rank_pattern"] and e.alpha_pattern == cfg["alpha_pattern"]
        assert e.base_model_name_or_path == cfg["base_model_name_or_path"]
        assert e.weight_format == "safetensors"
        assert e.size_bytes == (adapter_source / name / "adapter_model.safetensors").stat().st_size


def test_pattern_order_and_regex_targets_follow_peft(tiny_model_dir):
    # Overlapping rank_pattern keys: PEFT takes the first key (in config order) that matches, even when
    # a later key names the module exactly. A regex target_modules is a full match.
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.layers\.1\..*_proj",
                     rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 3, "layers.1.mlp.up_proj": 5},
                     alpha_pattern={"model.layers.1.self_attn.k_proj": 7, "k_proj": 5})
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32), cfg)
    spec = parse_config("x", json.loads(json.dumps(cfg.to_dict(), default=list)))
    seen = 0
    for name, mod in model.named_modules():
        path = name.removeprefix("base_model.model.")
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            seen += 1
            assert spec.targets(path)
            assert (spec.rank_for(path), spec.alpha_for(path)) == (mod.r["default"], mod.lora_alpha["default"]), path
            assert spec.scaling_for(path) == pytest.approx(mod.scaling["default"])
        elif path.startswith("model.layers.0.") and path.endswith("_proj"):
            assert not spec.targets(path), path
    assert seen == 7


def test_exclude_modules_follows_peft(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32), cfg)
    spec = parse_config("x", json.loads(json.dumps(cfg.to_dict(), default=list)))
    verdicts = {}
    for name, mod in model.named_modules():
        path = name.removeprefix("base_model.model.")
        if path.endswith(("q_proj", "v_proj", "up_proj")):
            verdicts[path] = isinstance(mod, LoraLayer)
            assert spec.targets(path) == verdicts[path], path
    assert verdicts["model.layers.0.self_attn.q_proj"] is False and sum(verdicts.values()) == 5


REFUSED = [
    (dict(peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING' is not supported (only LORA)"),
    (dict(peft_type=None), "peft_type None is not supported (only LORA)"),
    (dict(use_dora=True), "DoRA (use_dora=true) is not supported"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=true is not supported"),
    (dict(bias="all"), "bias='all' is not supported (only 'none')"),
    (dict(bias="lora_only"), "bias='lora_only' is not supported (only 'none')"),
    (dict(lora_bias=True), "lora_bias=true (a bias on lora_B) is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head'] is not supported"),
    (dict(target_parameters=["experts.w1"]), "target_parameters (LoRA on raw parameters, e.g. MoE experts) is "
                                             "not supported"),
    (dict(r=DROP), "adapter_config.json has no 'r'"),
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(r="8"), "r must be a positive integer, got '8'"),
    (dict(r=True), "r must be a positive integer, got True"),
    (dict(r=1 << 20), "r=1048576 is larger than any supported rank (65536)"),
    (dict(lora_alpha="16"), "lora_alpha must be a number, got '16'"),
    (dict(target_modules=DROP), "adapter_config.json has no 'target_modules'"),
    (dict(target_modules=[]), "adapter_config.json has no 'target_modules'"),
    (dict(target_modules=[1]), "target_modules must be a list of names or a regex, got [1]"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj'] must be a positive integer, got 0"),
    (dict(rank_pattern=[1]), "rank_pattern must be an object, got list"),
    (dict(alpha_pattern={"q_proj": "x"}), "alpha_pattern['q_proj'] must be a number, got 'x'"),
]


@pytest.mark.parametrize("overrides,reason", REFUSED, ids=[r for _, r in REFUSED])
def test_refused_configs_name_the_reason(overrides, reason):
    with pytest.raises(InvalidAdapter) as ei:
        parse_config("my-adapter", peft_config(**overrides))
    assert ei.value.reason == reason
    assert str(ei.value) == f"LoRA adapter 'my-adapter' is invalid: {reason}"
    assert ei.value.name == "my-adapter"


def test_regex_errors_are_reported():
    with pytest.raises(InvalidAdapter, match=r"target_modules regex '\(q' does not compile"):
        parse_config("a", peft_config(target_modules="(q"))


@pytest.mark.parametrize("raw,reason", [
    (b"{", "adapter_config.json is not valid JSON (Expecting property name enclosed in double quotes: "
           "line 1 column 2 (char 1))"),
    (b"\xff\xfe\x00", None),
    (b"[1, 2]", "adapter_config.json must hold a JSON object"),
    (b" " * (1 << 20) + b"{}", f"adapter_config.json is {(1 << 20) + 2} bytes (limit {1 << 20})"),
])
def test_malformed_bytes(raw, reason):
    with pytest.raises(InvalidAdapter) as ei:
        parse_config_bytes("m", raw)
    if reason is None:
        assert ei.value.reason.startswith("adapter_config.json is not valid JSON")
    else:
        assert ei.value.reason == reason


def test_the_parse_cache_never_mixes_names():
    # Identical bytes share one parse; the error still names each adapter, and a spec is reused.
    raw = json.dumps(peft_config(use_dora=True)).encode()
    for name in ("one", "two"):
        with pytest.raises(InvalidAdapter, match=f"LoRA adapter '{name}' is invalid: DoRA"):
            parse_config_bytes(name, raw)
    good = json.dumps(peft_config(r=16)).encode()
    assert parse_config_bytes("a", good) is parse_config_bytes("b", good)
    assert parse_config_bytes("c", good).r == 16


class _Reads(dict):
    """A config dict that records every key parse_config looks up."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def test_spec_keys_are_every_key_parse_config_reads():
    # Configs are shared by the raw text of SPEC_KEYS: a key read but not listed would let two configs
    # that differ in it share one spec. Every optional path is taken: each key present and valid.
    from loraplex.catalog.peft import SPEC_KEYS

    full = peft_config(exclude_modules=["k_proj"], layers_to_transform=[0, 1], rank_pattern={"q_proj": 2},
                       alpha_pattern={"q_proj": 3}, layer_replication=None, lora_bias=False, use_qalora=False,
                       use_bdlora=None, target_parameters=None, trainable_token_indices=None,
                       alora_invocation_tokens=None, revision="r1", lora_dropout=0.1)
    data = _Reads(full)
    parse_config("x", data)
    assert data.read <= set(SPEC_KEYS), data.read - set(SPEC_KEYS)
    assert {"r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "layers_to_transform"} <= data.read


# (a config's raw JSON, with one variation each): parse_config_bytes must give exactly what
# parse_config(json.loads(raw)) gives, whatever was parsed before it.
_BASE = json.dumps(peft_config(r=8, rank_pattern={"q_proj": 4}), indent=2)
_VARIANTS = [
    _BASE,
    _BASE.replace('"lora_dropout": 0.0', '"lora_dropout": 0.5'),  # unread key: same spec
    _BASE.replace('"task_type": "CAUSAL_LM"', '"task_type": "SEQ_2_SEQ_LM", "revision": "abc"'),
    _BASE.replace('"r": 8', '"r": 8.0'),  # read key, same value in Python (8 == 8.0): refused
    _BASE.replace('"r": 8', '"r": true'),
    _BASE.replace('"q_proj": 4', '"q_proj": 4.0'),
    _BASE.replace('"q_proj": 4', '"q_proj": true'),
    _BASE.replace('"lora_alpha": 8', '"lora_alpha": 8.0'),
    _BASE.replace('"lora_alpha": 8', '"lora_alpha": -0.0'),
    _BASE.replace('"use_rslora": false', '"use_rslora": 0'),
    _BASE.replace('"bias": "none"', '"bias": "none", "bias": "all"'),  # duplicate keys: the last wins
    _BASE.replace('"bias": "none"', '"bias": "all", "bias": "none"'),
    _BASE.replace('"task_type": "CAUSAL_LM"', '"task_type": NaN'),  # json accepts NaN, msgspec does not
    _BASE.replace('"task_type": "CAUSAL_LM"', '"task_type": "\\ud800"'),  # a lone surrogate escape
    _BASE.replace('"task_type": "CAUSAL_LM"', '"task_type": "caf\u00e9"'),  # non-ASCII, valid UTF-8
    _BASE.replace('"task_type": "CAUSAL_LM"', '"task_type": ' + "9" * 5000),  # json refuses >4300 digits
    _BASE.replace('"base_model_name_or_path": "tiny-llama"', '"base_model_name_or_path": "other"'),
    _BASE.replace('["q_proj", "v_proj"]', '["q_proj","v_proj"]'),
    _BASE.replace('"q_proj",\n', '"q_proj", "q_proj",\n', 1),
]
_RAW_VARIANTS = [v.encode() for v in _VARIANTS] + [
    _BASE.replace('"task_type": "CAUSAL_LM"', '"task_type": "X"').encode().replace(b'"X"', b'"\xff"'),  # bad UTF-8
    _BASE.encode() + b" x",  # trailing garbage
    b"[" + _BASE.encode() + b"]",
]


def _json_verdict(raw):
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return "not JSON"
    try:
        return parse_config("v", data)
    except InvalidAdapter as e:
        return e.reason


def test_parse_is_exactly_json_then_parse_config_in_any_order():
    from loraplex.catalog import peft

    for order in (_RAW_VARIANTS, _RAW_VARIANTS[::-1]):
        peft.clear_caches()
        for raw in order:
            want = _json_verdict(raw)
            try:
                got = parse_config_bytes("v", raw)
            except InvalidAdapter as e:
                got = e.reason
            if want == "not JSON":
                assert isinstance(got, str) and got.startswith("adapter_config.json is not valid JSON"), (raw[:60], got)
            else:
                assert got == want, raw[:200]


def test_configs_differing_only_in_unread_keys_share_one_spec():
    from loraplex.catalog import peft

    peft.clear_caches()
    a, b, c = (parse_config_bytes(n, v.encode()) for n, v in zip("abc", _VARIANTS[:3], strict=True))
    assert a is b is c
    assert parse_config_bytes("d", _VARIANTS[16].encode()) is not a  # base_model_name_or_path is read
