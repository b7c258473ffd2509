"""Keep numba's on-disk cache of these kernels consistent with their sources.

numba keys a cached function on its own source file only: when decode.py changes, an entry compiled
from api.py would still load its stale machine code. So the cache directory of this package carries a
stamp of all its sources (and of the HYBRIDLLM_NO_* switches), and cached files are dropped when it differs.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_STAMP = "hybridllm_cpu_kernels.stamp"


def _sources_digest(pkg_dir: Path) -> str:
    h = hashlib.sha256()
    for var in ("HYBRIDLLM_NO_MADDUBS", "HYBRIDLLM_NO_VNNI"):  # they change the kernels too
        h.update(os.environ.get(var, "").encode() + b"\0")
    for src in sorted(pkg_dir.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()


def _cache_dir() -> Path | None:
    """Where numba caches functions defined in this package (None if caching is unavailable)."""
    try:
        from numba.core.caching import FunctionCache

        def probe() -> None:  # any function of this package's directory locates the same cache
            pass
        return Path(FunctionCache(probe)._cache_path)
    except Exception:  # noqa: BLE001 - a read-only or odd install: numba then compiles without cache
        return None


def invalidate_stale_cache() -> None:
    pkg_dir = Path(__file__).resolve().parent
    cache = _cache_dir()
    if cache is None:
        return
    digest = _sources_digest(pkg_dir)
    stamp = cache / _STAMP
    try:
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest + "\n")
    except OSError:
        pass
