"""Split placement: some layers on llama.cpp's own CPU and the rest on the candidate; the layers spread
over two candidate servers; one candidate next to one llama.cpp rpc-server."""
from __future__ import annotations

from pathlib import Path

import pytest

from conformance_harness import check, model, prompt_ids, run_pair


@pytest.mark.parametrize("arch,wtype,n_gpu_layers", [("llama", "q8_0", 2), ("gemma3", "q4_k", 3)])
def test_master_cpu_and_worker(arch: str, wtype: str, n_gpu_layers: int, synth_root: Path, reference,
                               candidate, tmp_path: Path):
    path = model(synth_root, arch, wtype, n_layer=4)
    first = {"llama": 1, "gemma3": 2}[arch]
    ref, cand = run_pair(path, tmp_path, reference, candidate, prompt_ids=prompt_ids(12, first=first),
                         n_predict=5, force_tokens=prompt_ids(4, seed=2), n_gpu_layers=n_gpu_layers)
    check(f"{arch}/{wtype} n_gpu_layers={n_gpu_layers} of 4", ref, cand)


@pytest.mark.parametrize("arch,wtype", [("qwen3", "q4_k"), ("qwen3moe", "q8_0")])
def test_two_workers(arch: str, wtype: str, synth_root: Path, reference, candidate, tmp_path: Path):
    path = model(synth_root, arch, wtype, n_layer=4)
    ref, cand = run_pair(path, tmp_path, reference, candidate, n_servers=2, tensor_split=(1, 1),
                         prompt_ids=prompt_ids(12), n_predict=5, force_tokens=prompt_ids(4, seed=2))
    check(f"{arch}/{wtype} on two servers", ref, cand)


def test_worker_next_to_rpc_server(synth_root: Path, reference, candidate, tmp_path: Path):
    path = model(synth_root, "qwen2", "q8_0", n_layer=4)
    mixed = [candidate.endpoints(1)[0], reference.endpoints(2)[1]]
    ref, cand = run_pair(path, tmp_path, reference, candidate, n_servers=2, cand_endpoints=mixed,
                         tensor_split=(1, 1), prompt_ids=prompt_ids(12), n_predict=5,
                         force_tokens=prompt_ids(4, seed=2))
    check("qwen2/q8_0 candidate + rpc-server", ref, cand)
