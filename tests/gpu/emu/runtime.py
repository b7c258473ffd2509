"""A host stand-in for CupyRuntime: the kernels of kernels/ compiled with g++ against emu.h and run on
the CPU, one coroutine per GPU thread. Device memory is host memory; "pointers" are host addresses.

It runs the very launch lists CupyBackend prepares, so the backend, the builders and the kernels are
tested end to end without a GPU (slowly: keep shapes small). Each kernel's C signature is read from the
compiled library and every launch's argument widths are checked against it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hybridllm.backends.kernel_loader import kernel_names, read_source

EMU_DIR = Path(__file__).resolve().parent
_WRAPPER = """
extern "C" int emu_sig_{n}(int* out, int cap) {{ return emu::arg_sizes(&{n}, out, cap); }}
extern "C" void emu_launch_{n}(const unsigned* dims, size_t smem, void** argv) {{
    emu::launch(dims, smem, [argv]() {{ emu::invoke(&{n}, argv); }});
}}
"""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build_module(module: str, warp: int) -> Path:
    """Compile kernels/<module>.cu for the emulator (cached by content) and return the library path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) for the kernel emulator")
    source = read_source(module)
    flags = ["-std=c++17", "-DHL_EMU", f"-DHL_WARP={warp}"]
    pre = subprocess.run([cxx, "-E", "-P", *flags, "-x", "c++", "-"], input=source, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    names = kernel_names(pre)
    unit = '#include "emu.h"\n' + source + "".join(_WRAPPER.format(n=n) for n in names)
    key = hashlib.sha256((unit + (EMU_DIR / "emu.h").read_text() + " ".join(flags)).encode()).hexdigest()[:24]
    out_dir = Path(tempfile.gettempdir()) / "hybridllm-emu"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"{module}-w{warp}-{key}.so"
    if not lib.exists():
        cpp = out_dir / f"{module}-w{warp}-{key}.cpp"
        cpp.write_text(unit)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, *flags, "-O1", "-shared", "-fPIC", f"-I{EMU_DIR}", "-o", str(tmp), str(cpp)],
                       check=True, timeout=600)
        os.replace(tmp, lib)
    return lib


class EmuKernel:
    """Callable like a CuPy RawKernel: (grid, block, args, shared_mem=0, stream=None)."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._launch = getattr(lib, f"emu_launch_{name}")
        self._launch.restype = None
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
        sig = getattr(lib, f"emu_sig_{name}")
        sig.restype = ctypes.c_int
        sizes = (ctypes.c_int * 64)()
        n = sig(sizes, 64)
        self.sizes = list(sizes[:n])

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, stream: Any = None) -> None:
        if len(args) != len(self.sizes):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.sizes)} parameters")
        keep = []
        for i, (a, size) in enumerate(zip(args, self.sizes)):
            arr = np.asarray(a)
            if not isinstance(a, np.generic) or arr.itemsize != size:
                raise TypeError(f"{self.name}: argument {i} is {type(a).__name__}, parameter needs {size} bytes")
            keep.append(np.array(arr))  # own, aligned copy
        argv = (ctypes.c_void_p * max(1, len(keep)))(*[k.ctypes.data for k in keep])
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        dims = (ctypes.c_uint * 6)(*g, *b)
        self._launch(dims, shared_mem, argv)


class EmuRuntime:
    """Same surface as hybridllm.backends.cupy_backend.CupyRuntime, on the host."""

    def __init__(self, warp: int = 32) -> None:
        self.warp = warp
        self.name = f"EMU{warp}"
        self._libs: dict[str, ctypes.CDLL] = {}
        self._fns: dict[tuple[str, str], EmuKernel] = {}
        self.launch_count = 0

    def alloc(self, size: int) -> np.ndarray | None:
        raw = np.zeros(size + 256, dtype=np.uint8)
        off = (-raw.ctypes.data) % 256
        return raw[off:off + size]

    def pointer(self, mem: np.ndarray) -> int:
        return int(mem.ctypes.data)

    def memory(self) -> tuple[int, int]:
        return 1 << 34, 1 << 34

    def upload(self, ptr: int, data: np.ndarray) -> None:
        ctypes.memmove(ptr, data.ctypes.data, data.nbytes)

    def download(self, ptr: int, size: int) -> bytes:
        return ctypes.string_at(ptr, size)

    def memset(self, ptr: int, value: int, size: int) -> None:
        ctypes.memset(ptr, value, size)

    def copy(self, dst: int, src: int, size: int) -> None:
        ctypes.memmove(dst, src, size)

    def function(self, module: str, name: str) -> EmuKernel:
        fn = self._fns.get((module, name))
        if fn is None:
            lib = self._libs.get(module)
            if lib is None:
                lib = self._libs[module] = ctypes.CDLL(str(build_module(module, self.warp)))
            fn = self._fns[(module, name)] = EmuKernel(lib, name)
        return fn

    def run(self, launches: Sequence[Any]) -> None:
        for fn, grid, block, args, smem in launches:
            fn(grid, block, args, shared_mem=smem)
            self.launch_count += 1

    def capture(self, launches: Sequence[Any]) -> Callable[[], None]:
        frozen = list(launches)
        return lambda: self.run(frozen)

    def synchronize(self) -> None:
        pass
