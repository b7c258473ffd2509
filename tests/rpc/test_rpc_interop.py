"""Interop: llama.cpp's own master (the peer's `Llama`, in a subprocess) runs Gemma 3 270M with every layer on
our worker (`python -m hybridllm.cli worker`, a subprocess). The master aborts on any protocol deviation, so a
clean run is the protocol check; greedy tokens must equal those the peer produced with its own rpc-server when
the golden frames were captured (protocol/golden/index.json). Logit accuracy is the conformance suite's job."""
from __future__ import annotations

import json

import numpy as np
from rpc_helpers import GOLDEN

from hybridllm.testing.peer_master import run_master
from hybridllm.testing.procs import start_worker

PROMPT = "The capital of France is"   # the prompt protocol/capture.py used


def test_llama_cpp_master_runs_gemma_on_our_worker(gemma_path, tmp_path, peer):
    golden = json.loads((GOLDEN / "index.json").read_text())["sources"]["g"]
    with start_worker(log_dir=tmp_path) as worker:
        res = run_master(gemma_path, tmp_path / "master", rpc=[worker.endpoint], prompt=PROMPT,
                         n_predict=len(golden["tokens"]), timeout=300)
        log = worker.log()
    assert res.prompt_tokens == golden["prompt_tokens"]
    assert res.tokens == golden["tokens"], (res.tokens, golden["tokens"])
    assert np.isfinite(res.logits).all() and res.logits.shape == (len(golden["tokens"]), 262144)
    assert "closed:" not in log, log   # no connection was refused or dropped by the worker
    print(f"\ngemma on our worker: {res.timings}")
