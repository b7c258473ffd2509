"""Every kernel module compiles offline, without a GPU: with nvcc for sm_89 and sm_90 (NVIDIA Ada and
Hopper), and with hipcc for gfx906 (AMD MI50/MI60, 64-wide wavefronts, sdot4). The source compiled is
what the runtime loader hands NVRTC/hipRTC (includes inlined by hybridllm.backends.kernel_loader).

Needs both toolchains; a missing one FAILS with the install hint (CI: nvcc 13 from the image at
/usr/local/bin/nvcc, and Debian's `apt-get install -y hipcc`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hybridllm.backends.kernel_loader import kernel_dir, kernel_names, module_names, read_source

MODULES = module_names()
NV_ARCHS = ("89", "90")
AMD_ARCH = "gfx906"
JOBS = max(1, min(4, os.cpu_count() or 1))


def find_tool(name: str, extra: tuple[str, ...], hint: str) -> str:
    for cand in (shutil.which(name), *extra):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.fail(f"{name} not found: {hint}")


def nvcc_cmd(src: Path, out: Path) -> list[str]:
    nvcc = find_tool("nvcc", ("/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc"),
                     "install the CUDA toolkit (nvcc >= 12.x) or put it on PATH")
    arch = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in NV_ARCHS]
    return [nvcc, "-std=c++17", *arch, "--fatbin", "-Werror", "all-warnings", "-o", str(out), str(src)]


def hipcc_cmd(src: Path, out: Path) -> list[str]:
    hipcc = find_tool("hipcc", ("/opt/rocm/bin/hipcc",), "apt-get install -y hipcc (Debian) or install ROCm")
    return [hipcc, "-std=c++17", f"--offload-arch={AMD_ARCH}", "--cuda-device-only", "-Werror",
            "-Wno-unused-command-line-argument", "-c", "-o", str(out), str(src)]


def compile_all(tmp_path: Path, make_cmd, env: dict[str, str] | None = None) -> None:
    def one(module: str) -> str | None:
        src = tmp_path / f"{module}.cu"
        src.write_text(read_source(module))
        out = tmp_path / f"{module}.bin"
        r = subprocess.run(make_cmd(src, out), capture_output=True, text=True, timeout=600,
                           env={**os.environ, **(env or {})})
        if r.returncode != 0 or not out.exists() or out.stat().st_size == 0:
            return f"--- {module}.cu (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"
        return None

    with ThreadPoolExecutor(JOBS) as pool:
        errors = [e for e in pool.map(one, MODULES) if e]
    assert not errors, "kernel compilation failed:\n" + "\n".join(errors)


def test_modules_found():
    assert {"matmul", "norm", "rope", "attention", "elementwise", "rows"} <= set(MODULES)
    assert (kernel_dir() / "common.cuh").is_file()


def test_nvcc_sm89_sm90(tmp_path):
    compile_all(tmp_path, nvcc_cmd)


def test_hipcc_gfx906(tmp_path):
    # Debian's hipcc picks the NVIDIA platform when nvcc is on PATH; ask for AMD explicitly.
    compile_all(tmp_path, hipcc_cmd, env={"HIP_PLATFORM": "amd", "HIP_COMPILER": "clang"})


def test_every_weight_type_has_every_kernel():
    """The host names kernels by ggml type name; each weight type must instantiate all of them."""
    from hybridllm.backends.cupy_ops.matmul import WEIGHT_TYPES
    from hybridllm.ggml.types import TRAITS

    cxx = shutil.which("g++") or shutil.which("cpp")
    if cxx is None:
        pytest.fail("a C preprocessor (g++) is needed: apt-get install -y g++")
    pre = {}
    for m in ("matmul", "rows"):
        r = subprocess.run([cxx, "-E", "-P", "-x", "c++", "-std=c++17", "-"], input=read_source(m),
                           capture_output=True, text=True, check=True, timeout=120)
        pre[m] = set(kernel_names(r.stdout))
    for t in WEIGHT_TYPES:
        name = TRAITS[t].name
        for k in ("mul_mat_vec", "mul_mat_vec8", "mul_mat_tile", "mul_mat_id_vec"):
            assert f"{k}_{name}" in pre["matmul"], f"{k}_{name} missing"
        assert f"get_rows_{name}" in pre["rows"], f"get_rows_{name} missing"


# ---- host-side loader logic (no compiler needed) ----------------------------------------------------

def test_read_source_inlines_every_header_once():
    from hybridllm.backends.kernel_loader import read_source

    src = read_source("matmul")
    assert '#include "' not in src and "#pragma once" not in src
    assert src.count("typedef unsigned char u8;") == 1  # common.cuh, reached through several headers
    assert src.count("struct q4_K {") == 1


def test_missing_include_and_module_are_errors(tmp_path, monkeypatch):
    from hybridllm.backends.kernel_loader import KernelError, kernel_dir

    (tmp_path / "common.cuh").write_text("// empty\n")
    (tmp_path / "bad.cu").write_text('#include "nowhere.cuh"\n')
    monkeypatch.setenv("HYBRIDLLM_KERNEL_DIR", str(tmp_path))
    assert kernel_dir() == tmp_path
    with pytest.raises(KernelError, match="nowhere.cuh"):
        read_source("bad")
    with pytest.raises(KernelError, match="no kernel module 'absent'"):
        read_source("absent")


def test_compiled_binaries_are_cached_on_disk(tmp_path, monkeypatch):
    from hybridllm.backends.kernel_loader import cache_dir, cache_key, cached_binary

    monkeypatch.setenv("HYBRIDLLM_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "kernels"
    calls = []

    def build() -> bytes:
        calls.append(1)
        return b"\x7fELF-cubin"

    key = cache_key("source", ("-DHL_WARP=32",), "90", "nvrtc(13, 0)")
    p1 = cached_binary(key, ".cubin", build)
    p2 = cached_binary(key, ".cubin", build)  # a second start: no compile
    assert p1 == p2 and p1.read_bytes() == b"\x7fELF-cubin" and len(calls) == 1
    assert not list((tmp_path / "kernels").glob("*.part"))
    others = {cache_key("source", ("-DHL_WARP=64",), "90", "nvrtc(13, 0)"),
              cache_key("source", ("-DHL_WARP=32",), "89", "nvrtc(13, 0)"),
              cache_key("source", ("-DHL_WARP=32",), "90", "nvrtc(13, 1)"),
              cache_key("source2", ("-DHL_WARP=32",), "90", "nvrtc(13, 0)")}
    assert key not in others and len(others) == 4
