"""Find, assemble and compile the CUDA/HIP kernels in `kernels/`, with an on-disk cache.

Each `kernels/<module>.cu` becomes one device module. Its `#include "..."` lines are inlined here, so the
compiler (NVRTC / hipRTC through CuPy) gets one self-contained source, and the cache key covers every
header it uses. The compiled cubin/code object is stored under the cache directory keyed by a hash of
(source, options, target, compiler and CuPy versions): a second start loads it instead of compiling.

The kernel directory is `kernels/` of a source checkout, or `hybridllm/_kernels/` inside an installed
wheel (see the package-data mapping in pyproject), or $HYBRIDLLM_KERNEL_DIR.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)
_KERNEL_NAME = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)\s+)?(\w+)\s*\(')


class KernelError(RuntimeError):
    """A kernel source that cannot be found or compiled; the message names the module."""


def kernel_dir() -> Path:
    """The directory holding common.cuh and the .cu modules."""
    env = os.environ.get("HYBRIDLLM_KERNEL_DIR")
    here = Path(__file__).resolve()
    candidates = [Path(env)] if env else []
    candidates += [here.parent.parent / "_kernels", here.parents[2] / "kernels"]
    for c in candidates:
        if (c / "common.cuh").is_file():
            return c
    raise KernelError(f"kernel sources not found (looked in {', '.join(map(str, candidates))})")


def module_names() -> list[str]:
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


def read_source(module: str, root: Path | None = None) -> str:
    """`kernels/<module>.cu` with its quoted includes inlined once each (#pragma once honoured)."""
    root = root or kernel_dir()
    path = root / f"{module}.cu"
    if not path.is_file():
        raise KernelError(f"no kernel module {module!r} in {root}")
    seen: set[Path] = set()
    return _inline(path, seen)


def _inline(path: Path, seen: set[Path]) -> str:
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    text = _PRAGMA_ONCE.sub("", path.read_text())

    def repl(m: re.Match[str]) -> str:
        inc = path.parent / m.group(1)
        if not inc.is_file():
            raise KernelError(f"{path.name}: include {m.group(1)!r} not found")
        return _inline(inc, seen)

    return _INCLUDE.sub(repl, text)


def kernel_names(source: str) -> list[str]:
    """Names of the extern "C" __global__ functions a (preprocessed or not) source defines literally."""
    return _KERNEL_NAME.findall(source)


def cache_dir() -> Path:
    env = os.environ.get("HYBRIDLLM_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybridllm"
    return base / "kernels"


def cache_key(source: str, options: tuple[str, ...], target: str, toolchain: str) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(options), target, toolchain):
        h.update(part.encode())
        h.update(b"\x01")
    return h.hexdigest()[:40]


def cached_binary(key: str, suffix: str, build: Callable[[], bytes]) -> Path:
    """Path of the cached binary for `key`, building and storing it atomically on a miss."""
    d = cache_dir()
    path = d / f"{key}{suffix}"
    if path.is_file() and path.stat().st_size > 0:
        return path
    binary = build()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(binary)
    os.replace(tmp, path)  # concurrent starts may race; either complete file wins
    return path


class CupyKernels:
    """Compiled modules of one CuPy device, loaded once per process; `function(module, name)` returns a
    `cupy.cuda.function.Function`, callable as fn(grid, block, args, shared_mem=0, stream=None)."""

    def __init__(self, warp: int) -> None:
        import cupy  # noqa: F401  (fail early with ImportError when CuPy is absent)

        self.warp = warp
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}
        self.names: dict[int, str] = {}  # id(function) -> kernel name, for profiles

    def options(self) -> tuple[str, ...]:
        return ("-std=c++17", f"-DHL_WARP={self.warp}")

    def preload(self, modules: list[str] | None = None) -> None:
        """Compile (or load from the cache) modules now rather than at first use."""
        for m in modules if modules is not None else module_names():
            if m not in self._modules:
                self._modules[m] = self._load(m)

    def function(self, module: str, name: str) -> Any:
        key = (module, name)
        fn = self._functions.get(key)
        if fn is None:
            mod = self._modules.get(module)
            if mod is None:
                mod = self._modules[module] = self._load(module)
            try:
                fn = self._functions[key] = mod.get_function(name)
            except Exception as exc:  # CuPy raises its driver error type
                raise KernelError(f"kernel {name!r} not found in module {module!r}: {exc}") from exc
            self.names[id(fn)] = name
        return fn

    def _load(self, module: str) -> Any:
        import cupy
        from cupy.cuda import function

        source = read_source(module)
        opts = self.options()
        target, toolchain, suffix = _cupy_target()
        key = cache_key(source, opts, target, toolchain)
        try:
            path = cached_binary(key, suffix, lambda: _compile(source, opts, target, module))
        except KernelError:
            raise
        except Exception:  # a CuPy without these entry points: let CuPy compile and cache it
            return _RawModuleFunctions(cupy.RawModule(code=source, options=opts))
        mod = function.Module()
        mod.load_file(str(path))
        return mod


class _RawModuleFunctions:
    """Adapts cupy.RawModule so that get_function gives the stream-taking Function, like Module."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def get_function(self, name: str) -> Any:
        return self.raw.get_function(name).kernel


def _cupy_target() -> tuple[str, str, str]:
    """(target arch, toolchain id, binary suffix) of the current CuPy device."""
    import cupy
    from cupy.cuda import runtime

    dev = cupy.cuda.Device()
    if runtime.is_hip:
        props = runtime.getDeviceProperties(dev.id)
        arch = props.get("gcnArchName", b"")
        arch = arch.decode() if isinstance(arch, bytes) else str(arch)
        return arch or str(dev.compute_capability), f"hip{runtime.runtimeGetVersion()}-cupy{cupy.__version__}", ".hsaco"
    from cupy_backends.cuda.libs import nvrtc

    return str(dev.compute_capability), f"nvrtc{nvrtc.getVersion()}-cupy{cupy.__version__}", ".cubin"


def _compile(source: str, options: tuple[str, ...], target: str, module: str) -> bytes:
    """Source -> device binary. CUDA: NVRTC straight to a cubin for this GPU; HIP: CuPy's hipRTC path."""
    from cupy.cuda import runtime

    if runtime.is_hip:
        from cupy.cuda import compiler

        try:
            out = compiler.compile_using_nvrtc(source, options, None, f"{module}.cu")
        except compiler.CompileException as exc:
            raise KernelError(f"compiling kernels/{module}.cu failed:\n{exc.get_message()}") from exc
        binary = out[0] if isinstance(out, tuple) else out
        return binary.encode() if isinstance(binary, str) else bytes(binary)
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, f"{module}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, (*options, f"-arch=sm_{target}"))
        except nvrtc.NVRTCError as exc:
            raise KernelError(f"compiling kernels/{module}.cu failed: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
