"""Test and benchmark support: loading the real llama.cpp peer, synthetic GGUF writers."""
