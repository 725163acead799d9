"""adapter_config.json (as PEFT writes it) -> AdapterSpec, rejecting what the runtime cannot serve."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field

import msgspec
import regex

from ..errors import InvalidAdapter

MAX_CONFIG_BYTES = 1 << 20  # a PEFT config is a few KB; refuse anything absurd before parsing it

# Keys that PEFT writes and that change nothing for serving, or that we check below.
_SUPPORTED_FALSE = ("use_dora", "fan_in_fan_out")
# Newer PEFT keys whose non-empty value changes the forward pass in a way the runtime does not
# implement: serving such an adapter as plain LoRA would silently compute something else.
_UNSUPPORTED = {
    "lora_bias": "lora_bias=true (a bias on lora_B)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "use_bdlora",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


@dataclass(frozen=True)
class AdapterSpec:
    """What the runtime needs from adapter_config.json. Read-only: one spec may serve many adapters."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # names (suffix match) or one regex (full match), as PEFT
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None  # as target_modules; wins over it

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
        ex = self.exclude_modules
        if ex and (_fullmatch(ex, module) if isinstance(ex, str)
                   else any(module == t or module.endswith("." + t) for t in ex)):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            if tm == "all-linear":
                return True
            return _fullmatch(tm, module)
        return any(module == t or module.endswith("." + t) for t in tm)


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def match_pattern(patterns: dict, module: str):
    """The pattern key that applies to `module`, as PEFT resolves rank_pattern/alpha_pattern: the
    first key, in the config's order, that matches the whole path or a dotted suffix of it (an exact
    path listed after a matching suffix does not win; PEFT's get_pattern_key behaves the same)."""
    if not patterns:
        return None
    for key in patterns:
        try:
            if _fullmatch(rf"(.*\.)?({key})", module):
                return key
        except re.error:
            continue
    return None


class PatternTimeout(ValueError):
    """A config's regex took too long on a module name (catastrophic backtracking)."""


REGEX_TIMEOUT_S = 0.05


@functools.lru_cache(maxsize=65536)
def _fullmatch(pattern: str, text: str) -> bool:
    """re.fullmatch with a time bound: patterns come from adapter configs, i.e. from other people, and
    a backtracking pattern like (a|aa)+$ would hold the GIL in `re` and stall every serving thread;
    the `regex` engine (same syntax) can abandon a match after a timeout. Results are cached, so a
    module that matched once answers the same way when the slab is packed."""
    try:
        return regex.fullmatch(pattern, text, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        raise PatternTimeout(f"regex {_show(pattern)} took over {REGEX_TIMEOUT_S}s on {text!r}") from None


# Parsed specs by config bytes. Adapters trained with one recipe have byte-identical configs, so a
# 100k-adapter catalog typically parses a handful; the result depends on the bytes alone (reasons
# never name the adapter), so this cannot weaken validation. Bounded: cleared when full.
_PARSED: dict[bytes, AdapterSpec | str] = {}
_PARSED_MAX_ENTRIES = 4096
_PARSED_MAX_BYTES = 16 << 10  # larger configs are parsed every time

# Configs that differ only in keys the spec does not read (a revision, a run name, a dropout) share a
# spec too, found by the raw JSON text of the keys it does read: SPEC_KEYS, every key parse_config
# looks at (tests/catalog/test_peft.py checks that). msgspec decodes just those as raw text, skipping
# the rest (still checking it is JSON) at a quarter of json.loads' cost.
SPEC_KEYS = ("peft_type", "use_dora", "fan_in_fan_out", "bias", "lora_bias", "use_qalora", "use_bdlora",
             "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "modules_to_save",
             "layer_replication", "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern",
             "alpha_pattern", "layers_to_transform", "base_model_name_or_path", "use_rslora")
_SpecFields = msgspec.defstruct("_SpecFields", [(k, msgspec.Raw, msgspec.Raw(b"")) for k in SPEC_KEYS])
_SPEC_FIELDS = msgspec.json.Decoder(_SpecFields)
_astuple = msgspec.structs.astuple
# json refuses ints of over 4300 digits, which msgspec skips unchecked: no such int fits in 4096 bytes.
_KEYED_MAX_BYTES = 4096
_BY_CONTENT: dict[bytes, AdapterSpec | str] = {}


def _content_key(raw: bytes) -> bytes | None:
    """The raw text of the SPEC_KEYS values (NUL-separated: no JSON text holds a NUL), or None where
    msgspec and json could disagree about the document: non-ASCII (msgspec does not check the UTF-8 of
    values it skips), longer than _KEYED_MAX_BYTES, or refused by msgspec (NaN, lone surrogates, a top
    level that is not an object...: json decides those). Otherwise both accept it, with equal values."""
    if len(raw) > _KEYED_MAX_BYTES or not raw.isascii():
        return None
    try:
        return b"\0".join(_astuple(_SPEC_FIELDS.decode(raw)))
    except (msgspec.MsgspecError, RecursionError):
        return None


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _PARSED_MAX_ENTRIES:
        cache.clear()
    cache[key] = value


def parse_config_bytes(name: str, raw: bytes) -> AdapterSpec:
    """The spec of adapter_config.json's bytes; InvalidAdapter naming `name` if it is not servable.
    Specs are shared between adapters with equal configs: treat them as read-only."""
    hit = _PARSED.get(raw)
    if hit is None:
        key = _content_key(raw)
        hit = None if key is None else _BY_CONTENT.get(key)
        if hit is None:
            try:
                hit = _parse_bytes(name, raw, keyed=key is not None)
            except InvalidAdapter as e:
                hit = e.reason
            if key is not None:
                _remember(_BY_CONTENT, key, hit)
            if len(raw) <= _PARSED_MAX_BYTES:  # not on a content hit: distinct bytes would only churn it
                _remember(_PARSED, raw, hit)
    if type(hit) is str:
        raise InvalidAdapter(name, hit)
    return hit


def clear_caches() -> None:
    """Forget every parsed config (what a fresh process starts with)."""
    _PARSED.clear()
    _BY_CONTENT.clear()


def _parse_bytes(name: str, raw: bytes, keyed: bool = False) -> AdapterSpec:
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(name, f"adapter_config.json is {len(raw)} bytes (limit {MAX_CONFIG_BYTES})")
    if keyed:  # msgspec accepted it, and then it decodes to what json.loads returns (see _content_key)
        return parse_config(name, msgspec.json.decode(raw))
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, >4300-digit ints, nesting past the stack
        raise InvalidAdapter(name, f"adapter_config.json is not valid JSON ({e})") from None
    return parse_config(name, data)


def parse_config(name: str, data) -> AdapterSpec:
    if not isinstance(data, dict):
        raise InvalidAdapter(name, "adapter_config.json must hold a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise InvalidAdapter(name, f"peft_type {_show(peft_type)} is not supported (only LORA)")
    for key in _SUPPORTED_FALSE:
        if data.get(key):
            what = "DoRA (use_dora=true)" if key == "use_dora" else f"{key}=true"
            raise InvalidAdapter(name, f"{what} is not supported")
    bias = data.get("bias", "none")
    if bias != "none":
        raise InvalidAdapter(name, f"bias={_show(bias)} is not supported (only 'none')")
    for key, what in _UNSUPPORTED.items():
        if data.get(key):
            raise InvalidAdapter(name, f"{what} is not supported")
    if data.get("modules_to_save"):
        raise InvalidAdapter(name, f"modules_to_save={_show(data['modules_to_save'])} is not supported")
    if data.get("layer_replication"):
        raise InvalidAdapter(name, "layer_replication is not supported")
    if "r" not in data:
        raise InvalidAdapter(name, "adapter_config.json has no 'r'")
    r = _positive_int(name, "r", data["r"])
    alpha = data.get("lora_alpha", 8)
    if not _finite_number(alpha):
        raise InvalidAdapter(name, f"lora_alpha must be a number, got {_show(alpha)}")
    targets = data.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise InvalidAdapter(name, "adapter_config.json has no 'target_modules'")
    targets = _modules(name, "target_modules", targets)
    exclude = _modules(name, "exclude_modules", data["exclude_modules"]) if data.get("exclude_modules") else None
    rank_pattern = _pattern(name, "rank_pattern", data.get("rank_pattern"), int)
    alpha_pattern = _pattern(name, "alpha_pattern", data.get("alpha_pattern"), float)
    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise InvalidAdapter(name, f"layers_to_transform must be a list of layer indices, got {_show(layers)}")
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
        exclude_modules=exclude,
    )


def _modules(name, key, value):
    """A list of module names (as a tuple) or one regex, as PEFT's target_modules/exclude_modules."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise InvalidAdapter(name, f"{key} regex {_show(value)} does not compile ({e})") from None
        return value
    if isinstance(value, list) and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise InvalidAdapter(name, f"{key} must be a list of names or a regex, got {_show(value)}")


def _positive_int(name, key, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidAdapter(name, f"{key} must be a positive integer, got {_show(value)}")
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
        try:  # PEFT matches keys as regexes: one that does not compile would be skipped silently by
            re.compile(rf"(.*\.)?({k})$")  # match_pattern, serving the default rank/alpha instead
        except re.error as e:
            raise InvalidAdapter(name, f"{key} key {_show(k)} is not a valid pattern ({e})") from None
        if kind is int:
            out[k] = _positive_int(name, f"{key}[{_show(k)}]", v)
        elif not _finite_number(v):
            raise InvalidAdapter(name, f"{key}[{_show(k)}] must be a number, got {_show(v)}")
        else:
            out[k] = float(v)
    return out


def _finite_number(v) -> bool:
    """A JSON number that is a finite float (ints beyond float range would overflow later)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _show(v, limit: int = 120) -> str:
    """repr() of a config value for an error message, cut short: configs may hold 1 MB values."""
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"
