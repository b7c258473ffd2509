"""The harness makes the real peer load on this machine's glibc (2.36 lacks the C23 strto* symbols)."""
from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from hybridllm.testing.peer import weaken_version_needs


def test_peer_loads(peer):
    lib = peer._cffi_bindings.get_rpc_lib()
    assert lib is not None
    assert peer.__version__ == "0.11739"


def test_weaken_only_touches_new_glibc_versions(peer, tmp_path: Path):
    # the wheel as installed (not the cache's patched copy) needs GLIBC_2.38 exactly once
    origin = Path(str(metadata.distribution("llama-cpp-py-sync").locate_file(
        "llama_cpp_py_sync/libggml-rpc.so.0")))
    copy = tmp_path / "lib.so"
    shutil.copy(origin, copy)
    before = copy.read_bytes()
    assert weaken_version_needs(copy) == 1
    after = copy.read_bytes()
    assert len(before) == len(after)
    diff = [i for i in range(len(before)) if before[i] != after[i]]
    assert len(diff) == 1 and after[diff[0]] == before[diff[0]] | 0x2  # only the VER_FLG_WEAK bit
    assert weaken_version_needs(copy) == 0  # idempotent
