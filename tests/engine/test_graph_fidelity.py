"""Our graphs are llama.cpp's graphs: the real llama.cpp master (peer, in a subprocess) runs a model on our
RPC worker, which records every GRAPH_COMPUTE it receives; the graphs our engine builds for the same
ubatches must have the same computed nodes, in the same order, with the same op, type, ne, nb, op_params
and names (auto-generated "node_N" names aside).

The only expected difference: llama.cpp looks token embeddings up on its own CPU (the input layer is
never offloaded), so its worker graph starts from the `embd` rows where ours starts with GET_ROWS.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.engine.runner import load
from hybridllm.models.blocks import GraphContext
from hybridllm.rpc import worker as rpc_worker
from hybridllm.rpc.server import ServerThread
from hybridllm.testing.peer_master import run_master
from hybridllm.testing.synth import ARCHS, model_path

PROMPT = [1, 5, 9, 33]


def _sig(t) -> tuple:  # type: ignore[no-untyped-def]
    return (t.op.name, t.type.name, t.ne, t.nb, t.op_params, t.name)


def _same(a: tuple, b: tuple) -> bool:
    return a[:5] == b[:5] and (a[5] == b[5] or (a[5].startswith("node_") and b[5].startswith("node_")))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fidelity")


def capture(path: Path, out: Path, flash_attn: str, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple]]:
    graphs: list[list[tuple]] = []
    orig = rpc_worker.Session.build_graph

    def record(self, req):  # type: ignore[no-untyped-def]
        nodes = orig(self, req)
        graphs.append([_sig(n) for n in nodes if n.computes])
        return nodes

    monkeypatch.setattr(rpc_worker.Session, "build_graph", record)
    with ServerThread([NumpyBackend()], port=0) as srv:
        run_master(path, out, rpc=[f"127.0.0.1:{srv.port}"], prompt_ids=PROMPT, n_predict=2,
                   flash_attn=flash_attn, n_ctx=512)
    return graphs


@pytest.mark.parametrize("flash_attn", ["on", "off"])
@pytest.mark.parametrize("arch", ARCHS)
def test_graphs_equal_llama_cpp(root: Path, tmp_path: Path, arch: str, flash_attn: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_path(root, arch, "q8_0")
    theirs = capture(path, tmp_path, flash_attn, monkeypatch)
    assert len(theirs) == 2, "expected a prompt graph and a decode graph"
    runner = load(path, n_ctx=512, flash_attn=flash_attn == "on")
    for graph, n_tokens in zip(theirs, (len(PROMPT), 1)):
        ctx = GraphContext(runner.model, runner.kv, n_tokens, 1, tuple(256 for _ in runner.kv.caches),
                           flash_attn=flash_attn == "on")
        runner.model.build(ctx)
        ours = [_sig(n) for n in ctx.graph.nodes if n.computes]
        assert ours[0][0] == "GET_ROWS"
        ours = ours[1:]  # the embedding lookup llama.cpp keeps on its CPU
        assert len(ours) == len(graph), f"{arch}: {len(ours)} nodes vs llama.cpp's {len(graph)}"
        for i, (a, b) in enumerate(zip(ours, graph)):
            assert _same(a, b), f"{arch} fa={flash_attn} node {i}:\n ours  {a}\n llama {b}"
    runner.close()
