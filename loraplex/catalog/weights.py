"""Read an adapter's tensors safely (safetensors memory-mapped; .bin without pickled code) and check
them against its config: every PEFT key parsed, A/B paired, shapes agreeing with the rank."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidAdapter
from .peft import AdapterSpec

_LINEAR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBED = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")
_BASE_COPY = re.compile(r"^base_model\.model\..+\.base_layer\.weight$")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_TENSORS = 1 << 16  # a 200-layer model with every module targeted has ~3k LoRA tensors
MAX_TOTAL_BYTES = 64 << 30


@dataclass(frozen=True)
class ModuleWeights:
    """The two LoRA tensors of one module, by their keys in the weight file."""

    module: str  # PEFT module path without the "base_model.model." prefix
    a_key: str
    b_key: str
    rank: int
    in_features: int  # embeddings: vocabulary size
    out_features: int  # embeddings: embedding dim
    embedding: bool


def layout(name: str, spec: AdapterSpec, shapes: dict) -> dict[str, ModuleWeights]:
    """Check tensor names and shapes {key: (shape, dtype_str)} against the spec; module -> weights."""
    if not shapes:
        raise InvalidAdapter(name, "weight file holds no tensors")
    if len(shapes) > MAX_TENSORS:
        raise InvalidAdapter(name, f"weight file holds {len(shapes)} tensors (limit {MAX_TENSORS})")
    halves: dict[tuple[str, bool], dict[str, str]] = {}
    for key, (shape, dtype) in shapes.items():
        if _BASE_COPY.match(key):
            continue  # PEFT saves a copy of targeted embedding/lm_head base weights; the base model's own serve
        m = _LINEAR.match(key)
        emb = False
        if m is None:
            m = _EMBED.match(key)
            emb = True
        if m is None:
            raise InvalidAdapter(name, f"unexpected tensor {key!r} (not a PEFT LoRA weight)")
        if dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(name, f"tensor {key!r} has dtype {dtype}; LoRA weights must be float")
        if len(shape) != 2 or min(shape) < 1:
            raise InvalidAdapter(name, f"tensor {key!r} has shape {list(shape)}; expected a 2-D matrix")
        halves.setdefault((m["module"], emb), {})[m["ab"]] = key
    if not halves:
        raise InvalidAdapter(name, "weight file holds no LoRA tensors")
    out = {}
    for (module, emb), ab in sorted(halves.items()):
        what = "lora_embedding" if emb else "lora"
        if "A" not in ab or "B" not in ab:
            have, miss = ("A", "B") if "A" in ab else ("B", "A")
            raise InvalidAdapter(name, f"module {module} has {what}_{have} but no {what}_{miss}")
        if module in out:
            raise InvalidAdapter(name, f"module {module} has both linear and embedding LoRA weights")
        if not spec.targets(module):
            raise InvalidAdapter(name, f"weights for module {module} but target_modules does not select it")
        (ra, k), (n, rb) = shapes[ab["A"]][0], shapes[ab["B"]][0]
        r = spec.rank_for(module)
        if ra != r or rb != r:
            raise InvalidAdapter(
                name,
                f"module {module}: {what}_A is {[ra, k]} and {what}_B is {[n, rb]}, but the config says rank {r}",
            )
        out[module] = ModuleWeights(module, ab["A"], ab["B"], r, k, n, emb)
    return out


_TORCH_DTYPE_NAMES = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32",
                      "torch.float64": "F64"}


def read_tensors(name: str, weights_path: str, weight_format: str, spec: AdapterSpec):
    """(layout, tensors): tensors are copied out of the file, so later changes cannot tear them."""
    import torch

    if weight_format == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(weights_path, framework="pt") as f:
                shapes = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
                lay = layout(name, spec, shapes)
                total = sum(_numel(s) for s, _ in shapes.values())
                if total * 4 > MAX_TOTAL_BYTES:
                    raise InvalidAdapter(name, f"{total} weight elements exceed the per-adapter limit")
                tensors = {k: f.get_tensor(k).clone() for k in shapes}
        except (SafetensorError, ValueError, RuntimeError) as e:
            if isinstance(e, InvalidAdapter):
                raise
            raise InvalidAdapter(name, f"adapter_model.safetensors is corrupt: {e}") from None
        except OSError as e:
            raise InvalidAdapter(name, f"adapter_model.safetensors cannot be read: {e}") from None
    elif weight_format == "bin":
        try:
            obj = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "refused", never "ran"
            raise InvalidAdapter(name, f"adapter_model.bin refused (weights_only load failed): {e}") from None
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise InvalidAdapter(name, "adapter_model.bin must hold a dict of name -> tensor")
        shapes = {k: (tuple(v.shape), _TORCH_DTYPE_NAMES.get(str(v.dtype), str(v.dtype))) for k, v in obj.items()}
        lay = layout(name, spec, shapes)
        tensors = {k: v.contiguous() for k, v in obj.items()}
    else:
        raise InvalidAdapter(name, f"unknown weight format {weight_format!r}")
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise InvalidAdapter(name, f"tensor {k!r} holds NaN or infinite values")
    return lay, tensors


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
