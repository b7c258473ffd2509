"""Helpers of the conformance suite: server pools, paired master runs, checks (fixtures in conftest)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hybridllm.testing import synth
from hybridllm.testing.peer_master import Comparison, MasterFailed, MasterResult, compare_runs, run_master
from hybridllm.testing.procs import ServerFailed, ServerProc, start_server

CANDIDATE = os.environ.get("HYBRIDLLM_CONFORMANCE_CANDIDATE", "ours")
REL_TOL = 1e-3          # max|cand - ref| / max|ref| per step
# seconds per master run on a tiny synthetic model; the real model gets GEMMA_TIMEOUT
MASTER_TIMEOUT = float(os.environ.get("HYBRIDLLM_CONFORMANCE_TIMEOUT", "90"))
GEMMA_TIMEOUT = float(os.environ.get("HYBRIDLLM_CONFORMANCE_GEMMA_TIMEOUT", "400"))
REPORT: list[str] = []


class Servers:
    """`count` servers of one kind, started on first use and restarted if one died (so a crash in
    one test does not cascade into the next)."""

    def __init__(self, kind: str, log_dir: Path) -> None:
        self.kind, self.log_dir = kind, log_dir
        self._procs: list[ServerProc | None] = []

    def endpoints(self, count: int = 1) -> list[str]:
        while len(self._procs) < count:
            self._procs.append(None)
        out = []
        for i in range(count):
            proc = self._procs[i]
            if proc is None or not proc.alive:
                try:
                    proc = self._procs[i] = start_server(self.kind, log_dir=self.log_dir)
                except ServerFailed as exc:
                    pytest.fail(f"{self.kind} server did not start: {exc}", pytrace=False)
            out.append(proc.endpoint)
        return out

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.kind} {p.endpoint} (alive={p.alive})\n{p.log_tail(15)}"
                         for p in self._procs if p is not None)

    def close(self) -> None:
        for proc in self._procs:
            if proc is not None:
                proc.stop()

    def reset(self) -> None:
        """Stop every server (a hung or confused one must not fail the following tests too)."""
        self.close()
        self._procs = []


def run_pair(model: Path, out: Path, reference: Servers, candidate: Servers, *, n_servers: int = 1,
             cand_endpoints: list[str] | None = None, timeout: float = MASTER_TIMEOUT,
             **kwargs: object) -> tuple[MasterResult, MasterResult]:
    """The same master run against the reference servers, then against the candidate servers."""
    ref = run_master(model, out / "ref", rpc=reference.endpoints(n_servers), timeout=timeout, **kwargs)
    endpoints = cand_endpoints if cand_endpoints is not None else candidate.endpoints(n_servers)
    try:
        return ref, run_master(model, out / "cand", rpc=endpoints, timeout=timeout, **kwargs)
    except MasterFailed as exc:
        failure = f"{exc}\nserver logs:\n{candidate.log_tails()}"
    candidate.reset()
    pytest.fail(failure, pytrace=False)  # outside the except: no chained traceback


def check(label: str, ref: MasterResult, cand: MasterResult, *, strict_tokens: bool = False,
          tol: float = REL_TOL) -> Comparison:
    """Assert the candidate's logits match within `tol` and its greedy tokens agree (ties excepted
    unless `strict_tokens`); the measured worst error goes into the end-of-run report."""
    cmp = compare_runs(ref, cand)
    line = f"{label}: {cmp.summary()}"
    print(line)
    REPORT.append(line)
    assert np.isfinite(cmp.worst) and cmp.worst <= tol, line
    if strict_tokens or not cmp.tie_only:
        assert cmp.first_divergence is None, f"{line}\nref  {ref.tokens}\ncand {cand.tokens}"
    return cmp


def prompt_ids(n: int, n_vocab: int = 512, seed: int = 1, first: int | None = None) -> list[int]:
    """Deterministic pseudo-random token ids (skipping the low special/byte range)."""
    ids = np.random.default_rng(seed).integers(300, n_vocab - 8, size=n).tolist()
    return ([first] if first is not None else []) + ids


def model(root: Path, arch: str, weight_type: str, n_layer: int = 2) -> Path:
    return synth.model_path(root, arch, weight_type, n_layer=n_layer)
