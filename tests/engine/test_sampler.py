"""Sampler: token-for-token agreement with llama.cpp's sampler chain (the real peer, same seed), plus
independent checks of the distribution, the truncations, the penalty formula, seeds and stop strings."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import pytest

from hybridllm.engine.sampler import MT19937, Sampler, SamplerParams, StopChecker


class PeerChain:
    """penalties -> top-k -> top-p -> min-p -> temp -> dist, built from llama.cpp's own samplers."""

    def __init__(self, lcp: Any, n_vocab: int, p: SamplerParams) -> None:
        self.lib, self.ffi = lcp._cffi_bindings.get_lib(), lcp._cffi_bindings.get_ffi()
        lib = self.lib
        self.n = n_vocab
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for smpl in (lib.llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty,
                                                      p.frequency_penalty, p.presence_penalty),
                     lib.llama_sampler_init_top_k(p.top_k), lib.llama_sampler_init_top_p(p.top_p, p.min_keep),
                     lib.llama_sampler_init_min_p(p.min_p, p.min_keep),
                     lib.llama_sampler_init_temp_ext(p.temperature, 0.0, 1.0), lib.llama_sampler_init_dist(p.seed)):
            lib.llama_sampler_chain_add(self.chain, smpl)
        self.data = self.ffi.new(f"llama_token_data[{n_vocab}]")
        self.arr = self.ffi.new("llama_token_data_array *")
        self.view = np.frombuffer(self.ffi.buffer(self.data), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])

    def sample(self, logits: np.ndarray) -> int:
        self.view["id"] = np.arange(self.n)
        self.view["logit"] = logits
        self.arr.data, self.arr.size, self.arr.selected, self.arr.sorted = self.data, self.n, -1, False
        self.lib.llama_sampler_apply(self.chain, self.arr)
        token = self.arr.data[self.arr.selected].id
        self.lib.llama_sampler_accept(self.chain, token)
        return token

    def close(self) -> None:
        self.lib.llama_sampler_free(self.chain)


PEER_CASES = [
    SamplerParams(seed=42),
    SamplerParams(seed=7, temperature=1.5, top_k=100, top_p=0.9, min_p=0.01, repeat_penalty=1.3,
                  frequency_penalty=0.2, presence_penalty=0.5, repeat_last_n=16),
    SamplerParams(seed=3, temperature=0.0),
    SamplerParams(seed=5, top_k=0, top_p=0.8, min_p=0.0),
    SamplerParams(seed=9, top_k=0, top_p=1.0, min_p=0.1, min_keep=3),
    SamplerParams(seed=11, top_k=0, top_p=1.0, min_p=0.0, temperature=0.7),
    SamplerParams(seed=13, top_k=5, top_p=0.5, min_p=0.2, temperature=2.0, repeat_penalty=0.8, repeat_last_n=4),
]


@pytest.mark.parametrize("case", range(len(PEER_CASES)))
@pytest.mark.parametrize("n_vocab,steps,scale", [(1000, 200, 1.0), (262144, 12, 3.0)])
def test_same_tokens_as_llama_cpp(peer: Any, case: int, n_vocab: int, steps: int, scale: float) -> None:
    params = PEER_CASES[case]
    rng = np.random.default_rng(case)
    ours, theirs = Sampler(params, n_vocab), PeerChain(peer, n_vocab, params)
    try:
        got, want = [], []
        for _ in range(steps):
            logits = (rng.standard_normal(n_vocab) * scale).astype(np.float32)
            got.append(ours.sample(logits))
            want.append(theirs.sample(logits))
        assert got == want
    finally:
        theirs.close()


def test_mt19937_matches_the_standard() -> None:
    # std::mt19937 with the default seed 5489: the 10000th output is 4123659995 (C++11 [rand.predef])
    gen = MT19937(5489)
    raw = gen._gen.random_raw(10000)
    assert int(raw[-1]) == 4123659995
    u = MT19937(1).uniform()
    assert 0.0 <= u < 1.0


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_pure_temperature_sampling_follows_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2], dtype=np.float32)
    temp = 0.7
    s = Sampler(SamplerParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0, seed=123), len(logits))
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=len(logits))
    expected = _softmax(logits / temp) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (counts, expected)  # 7 dof, p = 0.001


def test_truncations_keep_the_right_support() -> None:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(200) * 2).astype(np.float32)
    probs = _softmax(logits)
    order = np.argsort(-logits)

    def support(**kw: Any) -> set[int]:
        s = Sampler(SamplerParams(temperature=1.0, seed=1, **kw), len(logits))
        return {s.sample(logits) for _ in range(3000)}

    assert support(top_k=5, top_p=1.0, min_p=0.0) == set(order[:5].tolist())
    need = int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1  # smallest prefix with mass >= 0.5
    nucleus = support(top_k=0, top_p=0.5, min_p=0.0)
    assert set(order[:min(need - 1, 5)].tolist()) <= nucleus <= set(order[:need + 1].tolist())  # float32 edge
    allowed = set(np.flatnonzero(probs >= 0.3 * probs.max()).tolist())
    assert support(top_k=0, top_p=1.0, min_p=0.3) == allowed


def test_greedy_is_argmax_and_ignores_seed() -> None:
    rng = np.random.default_rng(0)
    for seed in (1, 2, 3):
        s = Sampler(SamplerParams(temperature=0.0, seed=seed), 5000)
        for _ in range(5):
            logits = rng.standard_normal(5000).astype(np.float32)
            assert s.sample(logits) == int(np.argmax(logits))


def test_penalties_formula_over_last_n_window() -> None:
    params = SamplerParams(repeat_penalty=1.5, frequency_penalty=0.25, presence_penalty=0.5, repeat_last_n=3)
    s = Sampler(params, 10)
    s.accept_many([1, 2, 3, 1, 4, 4])            # window keeps the last 3: [1, 4, 4]
    logits = np.array([0.5, 2.0, -1.0, 3.0, 1.0, 0.0, -2.0, 0.0, 0.0, 0.0], dtype=np.float32)
    got = s._penalized(logits)
    want = logits.astype(np.float64).copy()
    for tok, count in ((1, 1), (4, 2)):
        x = want[tok]
        x = x * 1.5 if x <= 0 else x / 1.5
        want[tok] = x - (count * 0.25 + 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert logits[1] == 2.0  # the caller's array is untouched


def test_logit_bias_and_disabled_penalties() -> None:
    s = Sampler(SamplerParams(temperature=0.0, logit_bias={3: 100.0, 0: -math.inf}), 5)
    assert s.sample(np.array([9, 1, 1, 1, 1], dtype=np.float32)) == 3
    s = Sampler(SamplerParams(repeat_penalty=1.0), 5)
    s.accept_many([0, 1])
    logits = np.ones(5, dtype=np.float32)
    assert s._penalized(logits) is logits


def test_seeds_reproduce_and_differ() -> None:
    rng = np.random.default_rng(9)
    rows = [(rng.standard_normal(3000) * 2).astype(np.float32) for _ in range(40)]

    def run(seed: int) -> list[int]:
        s = Sampler(SamplerParams(seed=seed, repeat_penalty=1.1), 3000)
        return [s.sample(r) for r in rows]

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)
    s = Sampler(SamplerParams(seed=77), 3000)
    first = [s.sample(r) for r in rows]
    s.reset()
    assert [s.sample(r) for r in rows] == first


def test_bad_params_and_logits_are_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler(SamplerParams(top_p=1.5), 10)
    with pytest.raises(ValueError):
        Sampler(SamplerParams(seed=-1), 10)
    with pytest.raises(ValueError):
        Sampler(SamplerParams(), 10).sample(np.zeros(11, dtype=np.float32))


def test_sampling_a_full_gemma_vocab_is_fast() -> None:
    rng = np.random.default_rng(1)
    s = Sampler(SamplerParams(seed=1, repeat_penalty=1.1), 262144)
    s.accept_many(rng.integers(0, 262144, 64).tolist())
    rows = [(rng.standard_normal(262144) * 3).astype(np.float32) for _ in range(8)]
    times = []
    for i in range(40):
        start = time.perf_counter()
        s.sample(rows[i % 8])
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 2e-3, statistics.median(times)


def test_stop_strings_hold_back_partial_matches() -> None:
    stop = StopChecker(eog_ids=[1, 106], stop_strings=["</answer>", "\n\n"])
    assert stop.is_eog(106) and not stop.is_eog(2)
    assert stop.feed_text("Hello <") == ("Hello ", False)        # '<' may start '</answer>'
    assert stop.feed_text("/ans") == ("", False)
    assert stop.feed_text("x") == ("</ansx", False)              # ruled out: released
    assert stop.feed_text(" done\n") == (" done", False)
    assert stop.feed_text("\nmore") == ("", True) and stop.stopped_by == "\n\n"
    other = StopChecker(stop_strings=["ab"])
    assert other.feed_text("xxa") == ("xx", False)
    assert other.flush() == "a"
    both = StopChecker(stop_strings=["bc", "abcd"])
    assert both.feed_text("zabc") == ("za", True) and both.stopped_by == "bc"  # earliest match wins
