"""Load the real llama.cpp peer (`llama-cpp-py-sync`) on glibc older than 2.38.

The wheel's native libraries reference the C23 `__isoc23_strtol/strtoul/strtoull/sscanf` symbols, versioned
GLIBC_2.38. On an older glibc we copy the package once into a cache directory, mark those version needs
"weak" in the copies (so the dynamic linker does not refuse them), and preload a tiny shim library that
defines the symbols by forwarding to the classic functions (they differ only in accepting a 0b prefix).
Nothing is patched in site-packages; on glibc >= 2.38 the wheel is imported as it is.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

PEER_PACKAGE = "llama_cpp_py_sync"
PEER_VERSION = "0.11739"
_NEW_VERSIONS = (b"GLIBC_2.38", b"GLIBC_2.39", b"GLIBC_2.40", b"GLIBC_2.41")
_VER_FLG_WEAK = 0x2
_SHIM_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list ap; va_start(ap, f); int r = vsscanf(s, f, ap); va_end(ap); return r;
}
"""


class PeerMissing(RuntimeError):
    """The real llama.cpp peer cannot be imported: conformance tests must fail, not skip."""


def glibc_version() -> tuple[int, int]:
    name, ver = platform.libc_ver()
    if name != "glibc" or not ver:
        return (0, 0)
    major, minor = ver.split(".")[:2]
    return int(major), int(minor)


def weaken_version_needs(path: Path, versions: tuple[bytes, ...] = _NEW_VERSIONS) -> int:
    """Set VER_FLG_WEAK on the ELF64 version needs named in `versions`; returns how many were changed."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a little-endian ELF64 file")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    changed = 0
    for sh in sections:
        if sh[1] != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        strtab_off = sections[sh[6]][4]
        off = sh[4]
        for _ in range(sh[8]):  # sh_info = number of verneed entries
            _, cnt, _, aux, nxt = struct.unpack_from("<HHIII", data, off)
            aoff = off + aux
            for _ in range(cnt):
                _, flags, _, name, anext = struct.unpack_from("<IHHII", data, aoff)
                start = strtab_off + name
                vname = bytes(data[start:data.index(0, start)])
                if vname in versions and not flags & _VER_FLG_WEAK:
                    struct.pack_into("<H", data, aoff + 4, flags | _VER_FLG_WEAK)
                    changed += 1
                aoff += anext
            off += nxt
    if changed:
        path.write_bytes(bytes(data))
    return changed


def _cache_root() -> Path:
    base = os.environ.get("HYBRIDLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybridllm")
    return Path(base)


def _build_shim(dest: Path) -> Path:
    shim = dest / "libhybridllm_c23shim.so"
    if shim.exists():
        return shim
    src = dest / "c23shim.c"
    src.write_text(_SHIM_C)
    cc = os.environ.get("CC", "cc")
    tmp = shim.with_suffix(".tmp")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src)], check=True)
    tmp.rename(shim)
    return shim


def _patched_copy(origin: Path) -> Path:
    """Copy the installed package into the cache (once per installed content) with weakened version needs."""
    digest = hashlib.sha256()
    for lib in sorted(origin.glob("*.so*")):
        digest.update(lib.name.encode())
        digest.update(str(lib.stat().st_size).encode())
    root = _cache_root() / f"peer-{PEER_VERSION}-{digest.hexdigest()[:12]}"
    pkg = root / PEER_PACKAGE
    if not (root / "READY").exists():
        root.mkdir(parents=True, exist_ok=True)
        if pkg.exists():
            shutil.rmtree(pkg)
        shutil.copytree(origin, pkg, ignore=shutil.ignore_patterns("__pycache__"))
        for lib in pkg.glob("*.so*"):
            weaken_version_needs(lib)
        _build_shim(root)
        (root / "READY").write_text("ok\n")
    return root


def load_peer() -> ModuleType:
    """Import `llama_cpp_py_sync`, making it load on this glibc; raise PeerMissing if it cannot."""
    if PEER_PACKAGE in sys.modules:
        return sys.modules[PEER_PACKAGE]
    spec = importlib.util.find_spec(PEER_PACKAGE)
    if spec is None or spec.origin is None:
        raise PeerMissing(f"{PEER_PACKAGE}=={PEER_VERSION} is not installed (pip install '.[test]')")
    if glibc_version() < (2, 38):
        root = _patched_copy(Path(spec.origin).parent)
        ctypes.CDLL(str(root / "libhybridllm_c23shim.so"), mode=ctypes.RTLD_GLOBAL)
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(PEER_PACKAGE)
        module._cffi_bindings.get_lib()
    except Exception as exc:  # the native load is the part that fails on old glibc
        raise PeerMissing(f"cannot load {PEER_PACKAGE}: {exc}") from exc
    return module
