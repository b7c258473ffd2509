"""The master engine (ModelRunner) with every layer on an RpcBackend gives the logits it gives locally, and a
decode step after the first costs one round trip: inputs and GRAPH_RECOMPUTE ride with the logits read."""
from __future__ import annotations

import numpy as np

from hybridllm.engine.runner import load
from hybridllm.rpc.client_backend import RpcBackend
from hybridllm.testing.peer_master import run_master
from hybridllm.testing.synth import model_path

PROMPT = [1, 5, 9, 33, 100, 7]
FED = [17, 3, 250, 41]


def _logits(runner) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    rows = [runner.decode(PROMPT)[0]] + [runner.decode([t])[0] for t in FED]
    runner.close()
    return rows


def test_runner_on_rpc_backend(server, tmp_path_factory, tmp_path) -> None:
    path = model_path(tmp_path_factory.getbasetemp() / "synth", "llama", "q8_0")
    if server.kind == "ours":   # the same kernels run locally: equal bits
        want = np.stack(_logits(load(path, n_ctx=256, flash_attn=False)))
    else:                       # ggml's kernels: llama.cpp's own master is the reference
        want = run_master(path, tmp_path / "m", prompt_ids=PROMPT, n_predict=len(FED) + 1, force_tokens=FED,
                          flash_attn="off", n_ctx=256, timeout=120).logits
    with RpcBackend(server.endpoint) as be:
        runner = load(path, device=be, n_ctx=256, flash_attn=False)
        steps = []
        got = [runner.decode(PROMPT)[0]]
        for t in FED:
            before = be.traffic.copy()
            got.append(runner.decode([t])[0])
            steps.append(be.traffic - before)
        runner.close()
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= (0 if server.kind == "ours" else 1e-5 * np.abs(w).max())
    for st in steps[1:]:   # the first 1-token step builds its graph; later ones reuse it
        assert st.round_trips == 1 and st.commands["GRAPH_RECOMPUTE"] == 1 and st.commands["GRAPH_COMPUTE"] == 0
        assert st.bytes_received == 8 + 4 * len(want[0])
    st = steps[-1]
    print(f"\n{server.kind}: per decode step {st.bytes_sent} B sent, {st.bytes_received} B received, "
          f"{st.round_trips} round trip, {st.messages} messages {dict(st.commands)}")


def test_gemma_on_llama_cpp_rpc_server_matches_llama_cpp(gemma_path, llama_server, tmp_path) -> None:
    """Our master's graphs run by llama.cpp's own rpc-server give llama.cpp's own master's logits (Gemma 3
    270M Q4_K_M: real weights, iSWA caches, 1 MiB of logits per step). Any wrong address, stride, view or
    flag in what the client serializes would show as a large error; the reference is independent code."""
    prompt = [2, 818, 5279, 529, 7001, 563]
    ref = run_master(gemma_path, tmp_path / "master", prompt_ids=prompt, n_predict=4, flash_attn="off",
                     n_ctx=512, timeout=120)
    with RpcBackend(llama_server.endpoint) as be:
        runner = load(gemma_path, device=be, n_ctx=512, flash_attn=False)
        got = [runner.decode(prompt)[-1]] + [runner.decode([t])[-1] for t in ref.fed]
        runner.close()
    for g, w in zip(got, ref.logits):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
    assert [int(g.argmax()) for g in got] == ref.tokens
