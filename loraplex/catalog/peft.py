"""adapter_config.json (as PEFT writes it) -> AdapterSpec, rejecting what the runtime cannot serve."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import InvalidAdapter

MAX_CONFIG_BYTES = 1 << 20  # a PEFT config is a few KB; refuse anything absurd before parsing it

# Keys that PEFT writes and that change nothing for serving, or that we check below.
_SUPPORTED_FALSE = ("use_dora", "fan_in_fan_out")


@dataclass(frozen=True)
class AdapterSpec:
    """What the runtime needs from adapter_config.json."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # names (suffix match) or one regex (full match), as PEFT
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    layers_to_transform: tuple[int, ...] | None = None

    @property
    def scaling(self) -> float:
        return _scaling(self.lora_alpha, self.r, self.use_rslora)

    def rank_for(self, module: str) -> int:
        """Rank of one module (dotted PEFT module path), honouring rank_pattern."""
        key = match_pattern(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = match_pattern(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        return _scaling(self.alpha_for(module), self.rank_for(module), self.use_rslora)

    def targets(self, module: str) -> bool:
        """Does target_modules select this module path (PEFT's matching rules)?"""
        tm = self.target_modules
        if isinstance(tm, str):
            if tm == "all-linear":
                return True
            return re.fullmatch(tm, module) is not None
        return any(module == t or module.endswith("." + t) for t in tm)


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def match_pattern(patterns: dict, module: str):
    """The pattern key that applies to `module`, as PEFT resolves rank_pattern/alpha_pattern."""
    if not patterns:
        return None
    if module in patterns:
        return module
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def parse_config_bytes(name: str, raw: bytes) -> AdapterSpec:
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(name, f"adapter_config.json is {len(raw)} bytes (limit {MAX_CONFIG_BYTES})")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(name, f"adapter_config.json is not valid JSON ({e})") from None
    return parse_config(name, data)


def parse_config(name: str, data) -> AdapterSpec:
    if not isinstance(data, dict):
        raise InvalidAdapter(name, "adapter_config.json must hold a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise InvalidAdapter(name, f"peft_type {peft_type!r} is not supported (only LORA)")
    for key in _SUPPORTED_FALSE:
        if data.get(key):
            what = "DoRA (use_dora=true)" if key == "use_dora" else f"{key}=true"
            raise InvalidAdapter(name, f"{what} is not supported")
    bias = data.get("bias", "none")
    if bias != "none":
        raise InvalidAdapter(name, f"bias={bias!r} is not supported (only 'none')")
    if data.get("modules_to_save"):
        raise InvalidAdapter(name, f"modules_to_save={data['modules_to_save']!r} is not supported")
    if data.get("layer_replication"):
        raise InvalidAdapter(name, "layer_replication is not supported")
    if "r" not in data:
        raise InvalidAdapter(name, "adapter_config.json has no 'r'")
    r = _positive_int(name, "r", data["r"])
    alpha = data.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidAdapter(name, f"lora_alpha must be a number, got {alpha!r}")
    targets = data.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise InvalidAdapter(name, "adapter_config.json has no 'target_modules'")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise InvalidAdapter(name, f"target_modules regex {targets!r} does not compile ({e})") from None
    elif isinstance(targets, list) and all(isinstance(t, str) and t for t in targets):
        targets = tuple(targets)
    else:
        raise InvalidAdapter(name, f"target_modules must be a list of names or a regex, got {targets!r}")
    rank_pattern = _pattern(name, "rank_pattern", data.get("rank_pattern"), int)
    alpha_pattern = _pattern(name, "alpha_pattern", data.get("alpha_pattern"), float)
    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise InvalidAdapter(name, f"layers_to_transform must be a list of layer indices, got {layers!r}")
        layers = tuple(layers)
    base = data.get("base_model_name_or_path")
    return AdapterSpec(
        r=r,
        lora_alpha=float(alpha),
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=bool(data.get("use_rslora", False)),
        base_model_name_or_path=base if isinstance(base, str) else None,
        layers_to_transform=layers,
    )


def _positive_int(name, key, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidAdapter(name, f"{key} must be a positive integer, got {value!r}")
    if value > 65536:
        raise InvalidAdapter(name, f"{key}={value} is larger than any supported rank (65536)")
    return value


def _pattern(name, key, value, kind) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidAdapter(name, f"{key} must be an object, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if kind is int:
            out[k] = _positive_int(name, f"{key}[{k!r}]", v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidAdapter(name, f"{key}[{k!r}] must be a number, got {v!r}")
        else:
            out[k] = float(v)
    return out
