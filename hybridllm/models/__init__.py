"""Model architectures: one module each, registered by GGUF `general.architecture`."""
from __future__ import annotations

from .blocks import Model, ModelError
from .gemma3 import Gemma3
from .llama import Llama
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .qwen3moe import Qwen3Moe

ARCHITECTURES: dict[str, type[Model]] = {cls.arch: cls for cls in (Llama, Qwen2, Qwen3, Qwen3Moe, Gemma3)}

__all__ = ["ARCHITECTURES", "Model", "ModelError", "model_class"]


def model_class(arch: str, path: str = "") -> type[Model]:
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        where = f"{path}: " if path else ""
        raise ModelError(f"{where}unknown architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return cls
