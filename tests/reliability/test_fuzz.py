"""Property-based fuzzing of what an adapter directory holds: adapter_config.json (random JSON,
mutations of a real PEFT config, random bytes) and adapter_model.safetensors (header length, header
JSON, offsets, dtypes, shapes, truncation, trailing bytes, flipped data).

The property: every input either loads, and then agrees with an independent reference (the config's
own values; the safetensors package's reading of the same bytes), or raises a LoraplexError with a
message. Any other exception, a hang (per-example deadline) or a large allocation fails the test.
Inputs go through real files and the package's real readers: parse_config_bytes and Catalog for
configs; read_tensors, Catalog.load_adapter and the runtime's AdapterReader for weights.
"""

from __future__ import annotations

import collections
import json
import math
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loraplex.catalog import Catalog
from loraplex.catalog.peft import AdapterSpec, parse_config_bytes
from loraplex.catalog.reader import open_adapter
from loraplex.catalog.weights import FLOAT_DTYPES, layout, read_tensors

from .common import (
    CONFIG,
    WEIGHTS,
    join_safetensors,
    outcome,
    peak_rss_bytes,
    reference_load,
    same_tensors,
    split_safetensors,
    write_adapter,
)

# Deterministic (reproducible in CI), bounded, and a deadline per example: a hang is a failure.
EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "200"))  # bench/reliability.py runs more
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=3000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
INPUTS = collections.Counter()  # inputs tried per kind (bench/reliability.py reports them)
# The fuzzed readers' allocations are bounded by the files they read (a few KB here).
RSS_SLACK = 256 << 20

json_scalars = (st.none() | st.booleans() | st.integers(-(10 ** 30), 10 ** 30)
                | st.integers(-(10 ** 400), 10 ** 400) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=12)
                | st.sampled_from(["LORA", "lora", "none", "all", "q_proj", ".*", "(", "all-linear"]))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def alpha(adapter_source):
    """(config dict, weights bytes) of a real PEFT adapter (rank 4, a rank_pattern)."""
    d = adapter_source / "alpha-r4"
    return json.loads((d / CONFIG).read_bytes()), (d / WEIGHTS).read_bytes()


def _check_spec(data, spec: AdapterSpec) -> None:
    """An accepted config means what it says (the JSON's own values are the reference)."""
    assert isinstance(data, dict)
    assert type(spec.r) is int and spec.r == data["r"] >= 1
    assert spec.lora_alpha == float(data.get("lora_alpha", 8)) and math.isfinite(spec.lora_alpha)
    tm = data["target_modules"]
    assert spec.target_modules == (tuple(tm) if isinstance(tm, list) else tm)
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        got = getattr(spec, key)
        assert got == {k: kind(v) for k, v in (data.get(key) or {}).items()}
    assert math.isfinite(spec.scaling)


def _parse(raw: bytes):
    kind, res = outcome(parse_config_bytes, "fuzz", raw)
    if kind == "error":
        assert res.name == "fuzz"
    event(f"config {kind}" + (f": {res.reason.split()[0]}" if kind == "error" else ""))
    return kind, res


@FUZZ
@given(value=json_values)
def test_config_random_json(value):
    INPUTS["config: random JSON"] += 1
    raw = json.dumps(value).encode()
    kind, spec = _parse(raw)
    if kind == "ok":
        _check_spec(json.loads(raw), spec)


@FUZZ
@given(raw=st.binary(max_size=600))
def test_config_random_bytes(raw):
    INPUTS["config: random bytes"] += 1
    kind, spec = _parse(raw)
    if kind == "ok":
        _check_spec(json.loads(raw), spec)


PEFT_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type", "use_dora",
             "bias", "modules_to_save", "use_rslora", "layers_to_transform", "fan_in_fan_out",
             "layer_replication", "base_model_name_or_path", "task_type"]


@st.composite
def mutated_configs(draw, base: dict):
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "del", "pattern", "targets"]))
        key = draw(st.sampled_from(PEFT_KEYS) | st.text(max_size=6))
        if op == "set":
            data[key] = draw(json_values)
        elif op == "del":
            data.pop(key, None)
        elif op == "pattern":
            which = draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))
            pat = data.get(which) if isinstance(data.get(which), dict) else {}
            pat[draw(st.sampled_from(["q_proj", "model.layers.0.self_attn.q_proj", "(", ".*", "x[", ""])
                     | st.text(max_size=6))] = draw(st.integers(-3, 40) | json_values)
            data[which] = pat
        else:
            data["target_modules"] = draw(st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", ""])
                                                   | st.text(max_size=5), max_size=4)
                                          | st.sampled_from([".*", "all-linear", ".*q_proj", "(", ""]))
    return data


@FUZZ
@given(data=st.data())
def test_config_mutations_through_catalog(data, alpha, tmp_path):
    """Mutated real configs, read by a Catalog from a real directory next to the real weights; an
    accepted one then loads the weights only if every tensor agrees with the rank it claims."""
    cfg = data.draw(mutated_configs(alpha[0]))
    INPUTS["config: PEFT config mutations"] += 1
    raw = json.dumps(cfg).encode()
    root = tempfile.mkdtemp(dir=tmp_path)
    write_adapter(root, "m", raw, alpha[1])
    cat = Catalog(root)
    kind, spec = _parse(raw)
    if kind == "error":
        assert "m" not in cat and cat.invalid()["m"] == spec.reason
        return
    _check_spec(cfg, spec)
    kind, res = outcome(cat.load_adapter, "m")
    if kind == "ok":
        entry, lay, tensors = res
        for module, mw in lay.items():
            r = spec.rank_for(module)
            assert tensors[mw.a_key].shape[0] == r == tensors[mw.b_key].shape[1]


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 10 ** 6))
def test_config_byte_mutations(flips, cut, alpha):
    INPUTS["config: byte mutations"] += 1
    raw = bytearray(json.dumps(alpha[0], indent=1).encode())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    raw = bytes(raw[:cut % (len(raw) + 1)] if cut is not None else raw)
    kind, spec = _parse(raw)
    if kind == "ok":
        _check_spec(json.loads(raw), spec)


# ---- safetensors ---------------------------------------------------------------------------------

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F4",
             "U16", "f32", "", "F32 "]
HUGE = [-1, -(2 ** 63), 2 ** 31, 2 ** 32 - 1, 2 ** 40, 2 ** 63 - 1, 2 ** 64, 2 ** 64 + 7, 2 ** 100]
NEW_KEYS = ["base_model.model.model.embed_tokens.base_layer.weight", "__metadata__",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "x"]


@st.composite
def mutated_safetensors(draw, raw: bytes) -> bytes:
    header, data = split_safetensors(raw)
    keys = [k for k in header if k != "__metadata__"]
    length, tail, cut, hb = None, b"", None, None
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "meta", "length", "truncate",
                                   "trail", "json_bytes", "data", "overlap", "empty"]))
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__") or keys))  # added ones too
        entry = header.get(key) if isinstance(header.get(key), dict) else {}
        if op == "dtype":
            entry["dtype"] = draw(st.sampled_from(ST_DTYPES) | json_values)
        elif op == "shape":
            entry["shape"] = draw(st.lists(st.integers(0, 70) | st.sampled_from(HUGE), max_size=4) | json_values)
        elif op == "offsets":
            n = len(data)
            entry["data_offsets"] = draw(st.lists(st.integers(-2, n + 2) | st.sampled_from(HUGE), min_size=0,
                                                  max_size=3) | json_values)
        elif op == "drop":
            header.pop(key, None)
        elif op == "add":
            header[draw(st.sampled_from(NEW_KEYS) | st.text(max_size=6))] = draw(json_values | st.just(dict(entry)))
        elif op == "meta":
            header["__metadata__"] = draw(json_values)
        elif op == "empty":  # a zero-size tensor (legal anywhere in the offsets) with wild dims
            dims = draw(st.lists(st.integers(0, 8) | st.sampled_from(HUGE[2:]), max_size=5))
            header[draw(st.sampled_from(NEW_KEYS[:1]) | st.text(max_size=4))] = {
                "dtype": draw(st.sampled_from(ST_DTYPES[:8])), "shape": [*dims, 0], "data_offsets": [0, 0]}
        elif op == "overlap":  # another key's bytes claimed twice
            other = header.get(draw(st.sampled_from(keys)))
            if isinstance(other, dict):
                entry["data_offsets"] = other.get("data_offsets")
        elif op == "length":
            length = draw(st.sampled_from([0, 1, 7, 8, 2 ** 63, 2 ** 64 - 1]) | st.integers(0, 2 ** 64 - 1)
                          | st.integers(-64, 64).map(lambda d: ("delta", d)))
        elif op == "truncate":
            cut = draw(st.integers(0, 8 + len(raw)))
        elif op == "trail":
            tail = draw(st.binary(min_size=1, max_size=40))
        elif op == "json_bytes":
            hb = bytearray(json.dumps(header).encode())
            for pos, byte in draw(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=4)):
                hb[pos % len(hb)] = byte
            hb = bytes(hb)
        elif op == "data" and data:
            d = bytearray(data)
            for pos, byte in draw(st.lists(st.tuples(st.integers(0, 10 ** 7), st.integers(0, 255)), max_size=6)):
                d[pos % len(d)] = byte
            data = bytes(d)
        if entry and key in header:
            header[key] = entry
    body = hb if hb is not None else json.dumps(header).encode()
    if isinstance(length, tuple):
        length = max(0, len(body) + length[1])
    out = join_safetensors(body, data, length=length) + tail
    return out if cut is None else out[:cut]


def _reference(name, spec, raw: bytes):
    """What a correct reader must return for these bytes: the safetensors package's tensors if it
    accepts them and they form a valid, finite adapter for `spec`, else None (a refusal)."""
    import torch

    ref = reference_load(raw)
    if ref is None or any(math.prod(max(d, 1) for d in t.shape) >= 1 << 63 for t in ref.values()):
        return None  # refused, or zero-size with dims whose product passes int64: ours refuses those
    shapes = {}
    for k, t in ref.items():
        dt = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}.get(t.dtype)
        shapes[k] = (tuple(t.shape), dt or str(t.dtype))
    kind, lay = outcome(layout, name, spec, shapes)
    if kind == "error":
        return None
    lora = [k for mw in lay.values() for k in (mw.a_key, mw.b_key)]
    if not all(shapes[k][1] in FLOAT_DTYPES and bool(torch.isfinite(ref[k]).all()) for k in lora):
        return None
    return ref


@FUZZ
@given(data=st.data())
def test_safetensors_mutations(data, alpha, tmp_path):
    """Each mutated file through three readers: read_tensors, Catalog.load_adapter, AdapterReader.
    Accepted bytes must read exactly as safetensors reads them; bytes safetensors accepts as a valid
    adapter must not be refused; allocations stay bounded by the (small) file."""
    raw = data.draw(mutated_safetensors(alpha[1]))
    INPUTS["safetensors: header/data mutations"] += 1
    root = tempfile.mkdtemp(dir=tmp_path)
    write_adapter(root, "w", json.dumps(alpha[0]).encode(), raw)
    cat = Catalog(root)
    spec = parse_config_bytes("w", json.dumps(alpha[0]).encode())
    ref = _reference("w", spec, raw)
    before = peak_rss_bytes()

    kind, res = outcome(read_tensors, "w", os.path.join(root, "w", WEIGHTS), "safetensors", spec)
    event(f"weights {kind}" + (f": {res.reason[:40]}" if kind == "error" else ""))
    assert (kind == "ok") == (ref is not None), f"read_tensors {kind}: {res}; safetensors: {ref is not None}"
    if kind == "ok":
        assert same_tensors(res[1], ref)
    # The catalog's cheap check (header and layout, no data) refuses a subset of what the full read
    # refuses, for the same first reason: never a file safetensors reads as a valid adapter.
    if "w" not in cat.names():
        assert kind == "error" and cat.invalid()["w"] == res.reason, (cat.invalid(), res)
    kind2, res2 = outcome(cat.load_adapter, "w")
    assert kind2 == kind, f"Catalog.load_adapter {kind2}: {res2}"
    if kind2 == "ok":
        assert same_tensors(res2[2], ref)

    def read_all():
        with open_adapter(cat, "w") as r:
            return {k: r.tensor(k).clone() for k in r.shapes}

    kind3, res3 = outcome(read_all)
    if kind == "ok":
        assert kind3 == "ok" and same_tensors(res3, ref), f"AdapterReader {kind3}: {res3}"
    elif kind3 == "ok":  # the reader leaves the finiteness check to the runtime's pack(): only that may differ
        assert "NaN or infinite" in res.reason and not all(bool(torch.isfinite(t).all()) for t in res3.values())
    assert peak_rss_bytes() - before < RSS_SLACK


@FUZZ
@given(raw=st.binary(max_size=300))
def test_safetensors_random_bytes(raw, alpha, tmp_path):
    INPUTS["safetensors: random bytes"] += 1
    root = tempfile.mkdtemp(dir=tmp_path)
    write_adapter(root, "w", json.dumps(alpha[0]).encode(), raw)
    cat = Catalog(root)
    spec = parse_config_bytes("w", json.dumps(alpha[0]).encode())
    kind, res = outcome(read_tensors, "w", os.path.join(root, "w", WEIGHTS), "safetensors", spec)
    assert kind == "error" or _reference("w", spec, raw) is not None
    assert "w" in cat.names() or (kind == "error" and cat.invalid()["w"] == res.reason)


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(raw=st.binary(max_size=400), zipped=st.booleans())
def test_bin_random_bytes_never_unpickle_code(raw, zipped, alpha, tmp_path):
    """adapter_model.bin is a pickle container: random or damaged ones are refused with our error."""
    INPUTS["bin: random bytes"] += 1
    import io
    import zipfile

    if zipped:  # torch's zip layout with a garbage data.pkl
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", raw)
            z.writestr("archive/version", "3\n")
        raw = buf.getvalue()
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), "adapter_model.bin")
    with open(path, "wb") as f:
        f.write(raw)
    spec = parse_config_bytes("b", json.dumps(alpha[0]).encode())
    kind, _ = outcome(read_tensors, "b", path, "bin", spec)
    assert kind == "error"
