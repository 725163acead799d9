"""Read an adapter's tensors safely (safetensors memory-mapped; .bin without pickled code) and check
them against its config: every PEFT key parsed, A/B paired, shapes agreeing with the rank."""

from __future__ import annotations

import json
import os
import re
import stat as st
from dataclasses import dataclass

from ..errors import InvalidAdapter
from .peft import AdapterSpec, PatternTimeout

_LINEAR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBED = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")
_BASE_COPY = re.compile(r"^base_model\.model\..+\.base_layer\.weight$")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_TENSORS = 1 << 16  # a 200-layer model with every module targeted has ~3k LoRA tensors
MAX_TOTAL_BYTES = 64 << 30
MAX_HEADER_BYTES = 16 << 20  # ~200 bytes per tensor entry: room for MAX_TENSORS (safetensors allows 100 MB)


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
        try:
            selected = spec.targets(module)
            r = spec.rank_for(module)
            spec.alpha_for(module)  # the slab packer asks later; a slow pattern is refused here, once
        except PatternTimeout as e:
            raise InvalidAdapter(name, str(e)) from None
        if not selected:
            raise InvalidAdapter(name, f"weights for module {module} but target_modules does not select it")
        (ra, k), (n, rb) = shapes[ab["A"]][0], shapes[ab["B"]][0]
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
        with SafetensorsFile(name, weights_path) as f:
            lay = layout(name, spec, f.shapes)
            tensors = {k: f.tensor(k) for k in f.shapes}  # fresh buffers: nothing maps the file
    elif weight_format == "bin":
        _check_bin_container(name, weights_path)
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
    for mw in lay.values():  # LoRA tensors only: base-layer copies are ignored (and may be float8,
        for k in (mw.a_key, mw.b_key):  # where isfinite is not implemented)
            if not bool(torch.isfinite(tensors[k]).all()):
                raise InvalidAdapter(name, f"tensor {k!r} holds NaN or infinite values")
    return lay, tensors


def _check_bin_container(name: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            problem = bin_container_problem(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return  # torch.load reports it in its own words
    if problem is not None:
        raise InvalidAdapter(name, problem)


_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch.save's zip format; the legacy one (a pickle)
_ZIP_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def bin_container_problem(f, size: int) -> str | None:
    """What is wrong with a .bin's container (an open binary file of `size` bytes), read without
    unpickling anything: the zip directory and its offsets. None if nothing is found.

    torch.save writes an uncompressed zip, so what torch.load allocates is bounded by the file size.
    torch.load also inflates compressed entries: a 200 KB .bin can declare a 200 MB storage (a zip
    bomb), so those are refused before loading. A zip cut short loses its directory (at the end).
    The legacy format is one pickle stream: nothing in it can be checked without unpickling, so it
    passes here and is checked by the full (weights_only) load."""
    import zipfile

    head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        return None
    if head != _ZIP_MAGIC:
        return "adapter_model.bin is neither a zip archive (torch.save) nor a legacy torch file"
    try:
        z = zipfile.ZipFile(f)
        infos, start_dir = z.infolist(), z.start_dir
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        return f"adapter_model.bin is a damaged zip archive (truncated?): {str(e)[:200]}"
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        return (f"adapter_model.bin refused: compressed zip entry {packed[0]!r} (torch.save stores entries "
                "uncompressed; a compressed one can inflate without bound)")
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL_BYTES:
        return f"adapter_model.bin holds {total} bytes (limit {MAX_TOTAL_BYTES})"
    pos = 0
    for i in sorted(infos, key=lambda i: i.header_offset):  # entries in order, none overlapping the next
        if i.header_offset < pos:
            return f"adapter_model.bin is a damaged zip archive: entry {i.filename!r} overlaps the one before it"
        pos = i.header_offset + _ZIP_LOCAL_HEADER + len(i.filename.encode()) + i.compress_size
    if pos > min(start_dir, size):
        return "adapter_model.bin is a damaged zip archive: its entries run past the zip directory"
    return None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# safetensors dtype -> (torch dtype name, bytes per element). Others (F4, F6_*, C64, ...) are refused:
# no LoRA weight uses them, and refusing is safer than guessing a size.
_ST_DTYPES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2),
              "U16": ("uint16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8),
              "U64": ("uint64", 8), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4),
              "F64": ("float64", 8), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
_WHAT = "adapter_model.safetensors"


class SafetensorsFile:
    """A safetensors file read with plain reads into fresh buffers, never memory-mapped.

    Why not safetensors.safe_open: it maps the file, and a file truncated in place while a mapped
    page is read kills the whole process with SIGBUS. Here a truncation is a short read, which fails
    that adapter only. The header is checked as strictly as safetensors does (contiguous offsets that
    cover the data exactly, sizes agreeing with shape x dtype), plus our limits, before any tensor
    byte is read or any buffer allocated. shapes: {key: (shape tuple, dtype string)}.
    """

    def __init__(self, name: str, path: str):
        self.name = name
        self._fd = None
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            self.stat = os.fstat(self._fd)  # of the file read, whatever the path names by now
            if not st.S_ISREG(self.stat.st_mode):
                raise InvalidAdapter(name, f"{_WHAT} is not a regular file")
            self._parse(self.stat.st_size)
        except OSError as e:  # InvalidAdapter, as before: callers check it for a change under the read
            self.close()
            raise InvalidAdapter(name, f"{_WHAT} cannot be read: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    def _parse(self, file_size: int) -> None:
        n = header_length(self.name, self._read(0, min(8, file_size)), file_size)
        self.shapes, self._where = parse_header(self.name, self._read(8, n), file_size)
        self._data_start = 8 + n

    def _read(self, offset: int, n: int, into=None) -> bytes | None:
        """n bytes at offset (into `into`, a writable buffer, if given); a short read is an error."""
        buf = memoryview(bytearray(n) if into is None else into)
        got = 0
        while got < n:
            k = os.preadv(self._fd, [buf[got:]], offset + got)
            if k == 0:
                raise _corrupt(self.name, f"file ends at byte {offset + got}, expected {offset + n} "
                                          "(truncated under the read?)")
            got += k
        return buf.tobytes() if into is None else None

    def tensor(self, key: str):
        """A fresh CPU tensor of the stored bytes (little-endian, as safetensors stores them)."""
        import torch

        (shape, dtype), (begin, end) = self.shapes[key], self._where[key]
        out = torch.empty(end - begin, dtype=torch.uint8)
        try:
            if end > begin:
                self._read(self._data_start + begin, end - begin, out.numpy())
        except OSError as e:
            raise InvalidAdapter(self.name, f"{_WHAT} cannot be read: {e.strerror or e}") from None
        return out.view(getattr(torch, _ST_DTYPES[dtype][0])).view(shape)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _corrupt(name: str, why: str) -> InvalidAdapter:
    return InvalidAdapter(name, f"{_WHAT} is corrupt: {why}")


def header_length(name: str, first: bytes, file_size: int) -> int:
    """The header length stored in the file's first 8 bytes (`first`), checked against the file size."""
    if file_size < 8:
        raise _corrupt(name, f"{file_size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(first[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise _corrupt(name, f"header of {n} bytes (limit {MAX_HEADER_BYTES})")
    if 8 + n > file_size:
        raise _corrupt(name, f"header length {n} runs past the end of the {file_size}-byte file")
    return n


def parse_header(name: str, raw: bytes, file_size: int) -> tuple[dict, dict]:
    """({key: (shape, dtype)}, {key: (begin, end)}) of the header's JSON bytes, checked as strictly as
    safetensors does (contiguous offsets covering exactly the file_size - 8 - len(raw) data bytes,
    sizes agreeing with shape x dtype) plus our limits. Reads nothing: works on a ranged read too."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, 5000-digit ints, deep nesting
        raise _corrupt(name, f"header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _corrupt(name, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _corrupt(name, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise InvalidAdapter(name, f"weight file holds {len(header)} tensors (limit {MAX_TENSORS})")
    data_len = file_size - 8 - len(raw)
    shapes, where, spans = {}, {}, []
    for key, info in header.items():
        dtype, shape, begin, end = _entry(name, key, info)
        need = _numel(shape) * _ST_DTYPES[dtype][1]
        if need != end - begin:
            raise _corrupt(name, f"tensor {key!r}: {dtype}{shape} needs {need} bytes but data_offsets span "
                                 f"{end - begin}")
        shapes[key] = (tuple(shape), dtype)
        where[key] = (begin, end)
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):  # no gap, no overlap, nothing past the data
        if begin != pos:
            raise _corrupt(name, f"tensor {key!r} data_offsets {[begin, end]} overlap or leave a gap (expected "
                                 f"to start at {pos})")
        pos = end
    if pos != data_len:
        raise _corrupt(name, f"tensors cover {pos} bytes but the file holds {data_len} data bytes "
                             "(truncated, or trailing bytes)")
    if sum(_numel(s) for s, _ in shapes.values()) * 4 > MAX_TOTAL_BYTES:
        raise InvalidAdapter(name, f"{data_len} bytes of weights exceed the per-adapter limit "
                                   f"({MAX_TOTAL_BYTES} bytes as fp32)")
    return shapes, where


def _entry(name, key, info):
    if not isinstance(info, dict):
        raise _corrupt(name, f"header entry {key!r} is not an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise _corrupt(name, f"tensor {key!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_uint(d) for d in shape):
        raise _corrupt(name, f"tensor {key!r} has shape {shape!r}; expected a list of non-negative integers")
    # A zero-size tensor may list huge dims; torch multiplies them all (and fails past int64).
    if _numel([max(d, 1) for d in shape]) >= 1 << 63:
        raise _corrupt(name, f"tensor {key!r} has shape {shape!r}; dimensions beyond int64")
    if not (isinstance(offs, list) and len(offs) == 2 and _uint(offs[0]) and _uint(offs[1])
            and offs[0] <= offs[1]):
        raise _corrupt(name, f"tensor {key!r} has data_offsets {offs!r}; expected [begin, end], 0 <= begin <= end")
    return dtype, shape, offs[0], offs[1]


def _uint(v) -> bool:
    return type(v) is int and v >= 0
