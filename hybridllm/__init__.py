"""hybridllm: llama.cpp's RPC system in Python — workers on CuPy/numpy, a master that serves GGUF models."""
__version__ = "0.1.0"
