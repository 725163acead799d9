"""inject(): wrap a transformers Llama/Mistral/Qwen2-family model in place with LoRA layers whose
stacked weights are registered with a Runtime's slot pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from torch import nn

from ..runtime.merged import BaseWeight
from ..runtime.targets import SliceSpec
from .context import LoraContext
from .embedding import LoraEmbedding
from .linear import LoraLinear, LoraSliceLinear, SliceGroup

if TYPE_CHECKING:
    from ..runtime.runtime import Runtime, RuntimePlan
    from ..runtime.targets import LoraTarget

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "embed_tokens", "lm_head")
# Siblings that read the same input: one launch computes all their deltas.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraModel:
    """What inject() returns: the model (wrapped in place), its targets and its step context."""

    def __init__(self, model: nn.Module, runtime: Runtime, context: LoraContext, targets: list[LoraTarget]) -> None:
        self.model = model
        self.runtime = runtime
        self.context = context
        self.targets = targets

    @contextlib.contextmanager
    def step(self, names: Sequence[str | None], tokens_per_request: Sequence[int]) -> Iterator[RuntimePlan]:
        """Run one forward with request i using adapter names[i] (None: base model) over
        tokens_per_request[i] consecutive rows of the flattened batch."""
        with self.runtime.step(names, tokens_per_request) as plan, self.context.use(plan, tokens_per_request):
            yield plan


def inject(model: nn.Module, runtime: Runtime, target_modules: Iterable[str] = DEFAULT_TARGETS,
           max_tokens: int | None = None, overlap: bool | None = None) -> LoraModel:
    """Wrap every module of `model` whose name ends in one of `target_modules` (nn.Linear or
    nn.Embedding). Module paths are the ones PEFT uses, so adapters' weights map onto them directly;
    an adapter that targets fewer modules leaves the others at zero. overlap: run each LoRA shrink on
    a second CUDA stream under the base GEMM (layers/overlap.py; None: $LORAPLEX_OVERLAP).

    The base weights of every wrapped module are bound to the runtime (Runtime.bind_base), and if the
    runtime's configuration pins a merged adapter (RuntimeConfig.merge_adapter or $LORAPLEX_MERGE) it is
    merged here (merged mode: runtime/merging.py)."""
    cfg = runtime.config
    max_tokens = max_tokens or cfg.max_num_tokens
    wanted = set(target_modules)
    found: dict[str, nn.Linear | nn.Embedding] = {}
    for path, mod in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in wanted and isinstance(mod, (nn.Linear, nn.Embedding)):
            found[path] = mod
    if not found:
        raise ValueError(f"inject: no module of the model matches target_modules={sorted(wanted)}")
    device = next(iter(found.values())).weight.device
    tied = _tied_weights(model)
    ctx = LoraContext(max_tokens, cfg.max_loras, cfg.max_rank, device, overlap=overlap)
    linears = {p: m for p, m in found.items() if isinstance(m, nn.Linear)}
    targets = []
    done = set()
    for path, mod in found.items():
        if path in done:
            continue
        parent, leaf = path.rsplit(".", 1) if "." in path else ("", path)
        group = _group_of(parent, leaf, linears)
        if isinstance(mod, nn.Embedding):
            t = runtime.new_target(path, [SliceSpec(path, mod.num_embeddings, mod.embedding_dim)], "embedding")
            _replace(model, path, LoraEmbedding(mod, t, ctx))
            members = [path]
        elif len(group) > 1:
            slices = [SliceSpec(p, linears[p].in_features, linears[p].out_features) for p in group]
            t = runtime.new_target(f"{parent}.{'+'.join(p.rsplit('.', 1)[-1] for p in group)}", slices, "linear")
            g = SliceGroup(t, ctx)
            for i, p in enumerate(group):
                _replace(model, p, LoraSliceLinear(linears[p], g, i))
            done.update(group)
            members = group
        else:
            t = runtime.new_target(path, [SliceSpec(path, mod.in_features, mod.out_features)], "linear")
            _replace(model, path, LoraLinear(mod, t, ctx))
            members = [path]
        runtime.bind_base(t, [BaseWeight(found[p], p, None, tied.get(f"{p}.weight", ())) for p in members])
        done.add(path)
        targets.append(t)
    if runtime.configured_merge:
        runtime.merge(runtime.configured_merge)
    return LoraModel(model, runtime, ctx, targets)


def _tied_weights(model: nn.Module) -> dict:
    """{parameter name: other names of the very same tensor} for tied parameters (embed/lm_head)."""
    owners: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {n: tuple(o for o in names if o != n) for names in owners.values() if len(names) > 1 for n in names}


def _group_of(parent: str, leaf: str, found: dict[str, nn.Linear]) -> list[str]:
    for names in GROUPS:
        if leaf in names:
            paths = [f"{parent}.{n}" if parent else n for n in names]
            present = [p for p in paths if p in found]
            if len(present) > 1 and len({found[p].in_features for p in present}) == 1:
                return present
    return [f"{parent}.{leaf}" if parent else leaf]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, leaf = path.rsplit(".", 1) if "." in path else ("", path)
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)
