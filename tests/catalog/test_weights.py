"""Reading weights: the tensors equal what an independent reader gets; every corrupt, lying or
inconsistent file is refused with its exact reason; pickles never run code."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loraplex.catalog import Catalog
from loraplex.errors import InvalidAdapter

from .helpers import PREFIX, lora_tensors, peft_config, read_header, write_adapter, write_with_header

Q = "model.layers.0.self_attn.q_proj"
QA, QB = f"{PREFIX}{Q}.lora_A.weight", f"{PREFIX}{Q}.lora_B.weight"


def _load_error(root, name) -> str:
    cat = Catalog(root)
    with pytest.raises(InvalidAdapter) as ei:
        cat.load_tensors(name)
    assert ei.value.name == name
    return ei.value.reason


@pytest.mark.parametrize("name", ["alpha-r4", "beta-r8", "gamma-r16"])
def test_tensors_equal_an_independent_reader(catalog_dir, name):
    cat = Catalog(catalog_dir)
    entry, layout, tensors = cat.load_adapter(name)
    ref = load_file(catalog_dir / name / "adapter_model.safetensors")
    assert tensors.keys() == ref.keys()
    for k in ref:
        assert tensors[k].dtype == ref[k].dtype and torch.equal(tensors[k], ref[k]), k
    a_keys = {k for k in ref if ".lora_A." in k or ".lora_embedding_A" in k}
    assert len(layout) == len(a_keys)
    for module, mw in layout.items():
        assert mw.rank == entry.spec.rank_for(module) == ref[mw.a_key].shape[0]
        assert (mw.in_features, mw.out_features) == (ref[mw.a_key].shape[1], ref[mw.b_key].shape[0])
    assert any(mw.embedding for mw in layout.values()) == (name == "beta-r8")


def test_truncated_data(tmp_path):
    d = write_adapter(tmp_path / "cut")
    path = os.path.join(d, "adapter_model.safetensors")
    size = os.path.getsize(path)
    header, data = read_header(path)
    n = size - 8 - len(data)
    os.truncate(path, size - 100)
    assert _load_error(tmp_path, "cut") == (
        f"adapter_model.safetensors is corrupt: tensors cover {len(data)} bytes but the file holds "
        f"{len(data) - 100} data bytes (truncated, or trailing bytes)")
    os.truncate(path, 8 + n // 2)  # cut inside the header
    assert _load_error(tmp_path, "cut") == (
        f"adapter_model.safetensors is corrupt: header length {n} runs past the end of the {8 + n // 2}-byte file")


def test_header_that_lies_about_sizes(tmp_path):
    d = write_adapter(tmp_path / "liar")
    path = os.path.join(d, "adapter_model.safetensors")
    header, data = read_header(path)
    header[QA]["shape"] = [8, 64]  # claims twice the elements its data_offsets span
    write_with_header(path, header, data)
    assert _load_error(tmp_path, "liar") == (
        f"adapter_model.safetensors is corrupt: tensor '{QA}': F32[8, 64] needs 2048 bytes but data_offsets span 1024")
    header, _ = read_header(path)
    header[QA]["shape"] = [4, 64]
    b, e = header[QB]["data_offsets"]
    header[QB]["data_offsets"] = [b + 4096, e + 4096]  # points past the end of the data
    write_with_header(path, header, data)
    reason = _load_error(tmp_path, "liar")
    assert reason.startswith("adapter_model.safetensors is corrupt: tensor ") and "overlap or leave a gap" in reason


@pytest.mark.parametrize("config,tensors,reason", [
    (dict(r=4), dict(a_rank=5), f"module {Q}: lora_A is [5, 64] and lora_B is [64, 4], but the config says rank 4"),
    (dict(r=4), dict(b_rank=3), f"module {Q}: lora_A is [4, 64] and lora_B is [64, 3], but the config says rank 4"),
    (dict(r=8), dict(r=4), f"module {Q}: lora_A is [4, 64] and lora_B is [64, 4], but the config says rank 8"),
    (dict(target_modules=["q_proj"]), dict(modules=("q_proj", "v_proj")),
     "weights for module model.layers.0.self_attn.v_proj but target_modules does not select it"),
])
def test_shapes_that_disagree_with_the_config(tmp_path, config, tensors, reason):
    write_adapter(tmp_path / "bad", config=peft_config(**config), tensors=lora_tensors(**tensors))
    assert _load_error(tmp_path, "bad") == reason


def test_rank_pattern_gives_the_expected_shape(tmp_path):
    t = lora_tensors(r=4)
    t.update({k: v for k, v in lora_tensors(r=2, modules=("q_proj",)).items()})  # q_proj at rank 2
    write_adapter(tmp_path / "patterned", config=peft_config(r=4, rank_pattern={"q_proj": 2}), tensors=t)
    write_adapter(tmp_path / "unpatterned", config=peft_config(r=4), tensors=t)
    cat = Catalog(tmp_path)
    assert cat.load_adapter("patterned")[1][Q].rank == 2
    assert _load_error(tmp_path, "unpatterned") == (
        f"module {Q}: lora_A is [2, 64] and lora_B is [64, 2], but the config says rank 4")


def test_tensor_names_and_values(tmp_path):
    t = lora_tensors()
    del t[QB]
    write_adapter(tmp_path / "half", tensors=t)
    write_adapter(tmp_path / "stranger", tensors={**lora_tensors(), "optimizer.state": torch.zeros(2, 2)})
    nan = lora_tensors()
    nan[QB][1, 2] = float("nan")
    write_adapter(tmp_path / "nan", tensors=nan)
    ints = lora_tensors()
    ints[QA] = ints[QA].to(torch.int32)
    write_adapter(tmp_path / "ints", tensors=ints)
    assert _load_error(tmp_path, "half") == f"module {Q} has lora_A but no lora_B"
    assert _load_error(tmp_path, "stranger") == "unexpected tensor 'optimizer.state' (not a PEFT LoRA weight)"
    assert _load_error(tmp_path, "nan") == f"tensor '{QB}' holds NaN or infinite values"
    assert _load_error(tmp_path, "ints") == f"tensor '{QA}' has dtype I32; LoRA weights must be float"


def test_bin_weights_load_the_same_tensors(tmp_path, adapter_source):
    src = adapter_source / "gamma-r16"
    d = tmp_path / "gamma-bin"
    d.mkdir()
    shutil.copy(src / "adapter_config.json", d)
    ref = load_file(src / "adapter_model.safetensors")
    torch.save(ref, d / "adapter_model.bin")
    tensors = Catalog(tmp_path).load_tensors("gamma-bin")
    assert tensors.keys() == ref.keys() and all(torch.equal(tensors[k], ref[k]) for k in ref)


class _Payload:
    """Unpickling this calls os.mkdir(marker): the classic code-execution pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    d = tmp_path / "cat" / "evil"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(peft_config()))
    payload = {**lora_tensors(), "x": _Payload(marker)}
    if container == "torch.save":
        torch.save(payload, d / "adapter_model.bin")
    else:
        (d / "adapter_model.bin").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(InvalidAdapter) as ei:
        Catalog(tmp_path / "cat").load_tensors("evil")
    assert ei.value.reason.startswith("adapter_model.bin refused (weights_only load failed): ")
    assert not marker.exists()
    # Control: the same file does run its payload when loaded unsafely, so the check above can fail.
    if container == "torch.save":
        torch.load(d / "adapter_model.bin", weights_only=False)
    else:
        pickle.loads((d / "adapter_model.bin").read_bytes())
    assert marker.is_dir()


def test_bin_that_is_not_a_dict_of_tensors(tmp_path):
    d = tmp_path / "cat" / "list"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(peft_config()))
    torch.save([torch.zeros(1)], d / "adapter_model.bin")
    assert _load_error(tmp_path / "cat", "list") == "adapter_model.bin must hold a dict of name -> tensor"
