"""LoRA layers for plain PyTorch and transformers models; inject() wraps a model in place."""

from .context import LoraContext
from .embedding import LoraEmbedding
from .inject import DEFAULT_TARGETS, LoraModel, inject
from .linear import LoraLinear, LoraSliceLinear, SliceGroup

__all__ = ["DEFAULT_TARGETS", "LoraContext", "LoraEmbedding", "LoraLinear", "LoraModel", "LoraSliceLinear",
           "SliceGroup", "inject"]
