"""hybridllm: llama.cpp's RPC system in Python — workers on CuPy/numpy, a master that serves GGUF models."""
__version__ = "0.1.0"


def load(path, **kwargs):  # type: ignore[no-untyped-def]
    """Load a GGUF model for inference: see hybridllm.engine.runner.load (imported lazily)."""
    from .engine.runner import load as _load
    return _load(path, **kwargs)
