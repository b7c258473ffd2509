"""The differential tool on a real master's graphs: llama.cpp's master runs a synthetic llama (Q8_0, flash
attention on) against its rpc-server through the recording proxy; the recording is replayed into a second
rpc-server and into our worker and compared node by node."""
from __future__ import annotations

import pytest

from hybridllm.rpc.client import RpcClient
from hybridllm.testing import synth
from hybridllm.testing.diffgraph import Recording, analyse, cut_plan, diff_steps, record
from hybridllm.testing.procs import start_peer_server, start_worker

PROMPT = [1, 500, 301, 400, 310, 320, 330, 340, 350, 360, 370, 380]


@pytest.fixture(scope="module")
def recording(peer, tmp_path_factory: pytest.TempPathFactory) -> Recording:
    root = tmp_path_factory.mktemp("diffgraph")
    model = synth.model_path(root, "llama", "q8_0", n_layer=2)
    path = root / "frames.bin"
    res = record(model, path, flash_attn="on", prompt_ids=PROMPT, n_predict=3, timeout=120)
    assert len(res.tokens) == 3
    return Recording(path)


def _diff(rec: Recording, kind: str, **kwargs):
    start = start_worker if kind == "ours" else start_peer_server
    with start_peer_server(threads=2) as ref_srv, start(threads=2) as cand_srv, \
            RpcClient(ref_srv.host, ref_srv.port, timeout=120) as ref, \
            RpcClient(cand_srv.host, cand_srv.port, timeout=120) as cand:
        return diff_steps(rec, ref, cand, [0, 1], **kwargs)


def test_cut_plan_reads_every_node_while_intact(recording: Recording):
    graph = next(m for m, _ in recording.exchanges(recording.main_conn) if type(m).__name__ == "GraphComputeReq")
    nodes, _ = analyse(graph)
    plan = cut_plan(nodes)
    read = {n.index: cut for cut, ns in plan.items() for n in ns}
    assert {n.index for n in nodes if n.has_value} == set(read)
    assert all(n.index <= read[n.index] <= n.readable_until for n in nodes if n.index in read)
    assert len(plan) < len(read)              # reads share prefixes


def test_reference_against_itself_is_exact(recording: Recording):
    """Two llama.cpp rpc-servers fed the same recording agree on every node: the replay (handle and
    address translation, re-sent inputs, intact reads) adds nothing."""
    diffs, outputs = _diff(recording, "peer")
    assert len(diffs) == 2 and len(outputs) == 3
    assert all(d.output_check == 0 for d in diffs)
    assert all(n.err == 0 for d in diffs for n in d.nodes)
    assert all(e == 0 for _, e in outputs)


def test_worker_matches_rpc_server_node_by_node(recording: Recording):
    """Our worker reproduces llama.cpp's rpc-server on every node of a prompt and a decode graph (flash
    attention, F16 cache, Q8_0 matmuls), both propagated through the graph and op by op on the
    reference's inputs (in-place writes into the KV cache excepted from the op-by-op check: their bytes
    include earlier steps' cache rows), and the logits it returns after every step are identical."""
    diffs, outputs = _diff(recording, "ours", local=True)
    assert any(n.info.op == "FLASH_ATTN_EXT" for n in diffs[0].nodes)
    for d in diffs:
        assert d.output_check == 0
        assert [n.info.describe(d.by_id) for n in d.nodes if n.err] == [], d.report()
        inexact = [n.info.describe(d.by_id) for n in d.nodes if n.local and not n.info.t.view_src]
        assert not inexact, inexact
    assert len(outputs) == 3 and all(e == 0 for _, e in outputs), outputs
