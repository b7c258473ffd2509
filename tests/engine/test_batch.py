"""Continuous batching in the engine: several sequences share one KV cache and one ubatch.

Each sequence's logits from `decode_batch()` (its prompt chunks and decode tokens mixed in ubatches with
the other sequences', their cells interleaved) are compared with the same sequence run alone through
`decode()` on a fresh runner (relative to the largest logit; printed with -s). Observed:
* flash attention, Q8_0 / Q4_K weights (synthetic llama and gemma3, gemma-3-270m): bit-identical (0.0):
  activations are quantized per row, attention visits a sequence's cells in position order either way;
  asserted < 1e-4;
* F32 weights: ~1e-7 after one ubatch (BLAS sums a wider batch in another order), which flips F16
  roundings of the cached K/V and grows to 3e-4 (no flash attention) / 1e-3 (a 300-token prompt
  wrapping the sliding-window ring at other cells than when alone) over the steps on these random
  models; asserted < 2e-3 / 5e-3. For scale: one cell of another sequence leaking into the
  sliding-window mask gives 0.5.
* without flash attention Q8_0 differs by ~1e-2: the softmax row sums over all n_kv cells, so where a
  sequence's cells sit changes the summation grouping, and 8-bit re-quantization of the activations
  amplifies an ulp; that case is run on F32 weights instead.

Also: a lone sequence still gets llama.cpp's cells (position p in cell p, ring cell p mod size), a
sequence may take more than its share of cells while the others are idle, a full cache refuses a ubatch
without changing anything, and rewinding one sequence leaves the others intact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.engine.kv_cache import ContextOverflow, KVCache, LayerKV
from hybridllm.engine.runner import ModelRunner, load
from hybridllm.testing.synth import model_path

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth-batch")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def solo(path: Path, prompt: list[int], fed: list[int], **kw: object) -> list[np.ndarray]:
    """Logits of the prompt's last token and after each fed token, the sequence alone."""
    r = load(path, **kw)  # type: ignore[arg-type]
    rows = [r.decode(prompt)[0].copy()] + [r.decode([t])[0].copy() for t in fed]
    r.close()
    return rows


def batched(r: ModelRunner, prompts: list[list[int]], fed: list[list[int]], starts: list[int],
            chunk: int) -> list[list[np.ndarray]]:
    """Run the sequences together like the server does: each step, every started sequence adds its next
    decode token or a prompt chunk of up to `chunk` tokens (sequence i starts at step starts[i])."""
    n = len(prompts)
    done_prompt = [0] * n
    n_fed = [0] * n
    out: list[list[np.ndarray]] = [[] for _ in range(n)]
    step = 0
    while any(n_fed[i] < len(fed[i]) for i in range(n)):
        seqs, toks, want = [], [], []
        for i in range(n):
            if step < starts[i] or n_fed[i] >= len(fed[i]):
                continue
            if done_prompt[i] < len(prompts[i]):
                part = prompts[i][done_prompt[i]:done_prompt[i] + chunk]
                done_prompt[i] += len(part)
                seqs.append(i)
                toks.append(part)
                want.append(done_prompt[i] == len(prompts[i]))
            else:
                seqs.append(i)
                toks.append([fed[i][n_fed[i]]])
                want.append(True)
                n_fed[i] += 1
        if seqs:
            for i, row in zip(seqs, r.decode_batch(seqs, toks, want)):
                if row is not None:
                    out[i].append(row.copy())
        step += 1
    return out


def compare(path: Path, prompts: list[list[int]], fed: list[list[int]], starts: list[int], chunk: int,
            tol: float = REL_TOL, **kw: object) -> float:
    r = load(path, n_seq_max=len(prompts), **kw)  # type: ignore[arg-type]
    got = batched(r, prompts, fed, starts, chunk)
    assert r.stats.ubatches_multi_seq > 0, "nothing was batched"
    r.close()
    worst = 0.0
    for i, (p, f) in enumerate(zip(prompts, fed)):
        ref = solo(path, p, f, **kw)
        assert len(got[i]) == len(ref)
        for a, b in zip(got[i], ref):
            worst = max(worst, rel_err(a, b))
    print(f"{path.name}: worst relative difference batched vs alone {worst:.2e}")
    assert worst < tol, worst
    return worst


PROMPTS = [[1, 5, 9, 33, 100, 7, 200, 301, 44, 45, 46],
           [1, 17, 18, 19, 20, 21],
           [1, 400, 3, 3, 3, 90, 91, 92, 93, 94, 95, 96, 97, 98]]
FED = [[10, 11, 12, 13, 14, 15], [30, 31, 32, 33, 34, 35, 36], [50, 51, 52, 53, 54]]


@pytest.mark.parametrize("weights,flash_attn,tol", [("q8_0", True, REL_TOL), ("f32", False, 2e-3)],
                         ids=["q8_0-fa", "f32-nofa"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_equals_alone_synth(root: Path, arch: str, weights: str, flash_attn: bool, tol: float) -> None:
    # sequence 2 arrives while 0 and 1 decode: its prompt chunks share ubatches with their tokens
    compare(model_path(root, arch, weights), PROMPTS, FED, [0, 0, 3], chunk=4, tol=tol, n_ctx=256,
            flash_attn=flash_attn)


def test_batched_equals_alone_swa_wraps(root: Path) -> None:
    """Synthetic gemma3 (window 8): three 300-token prompts overflow the shared 256-cell ring, which only
    works if each sequence's cells that its window left behind are reused (by any sequence)."""
    path = model_path(root, "gemma3", "f32")
    rng = np.random.default_rng(1)
    prompts = [[1] + rng.integers(3, 500, 299).tolist() for _ in range(3)]
    fed = [rng.integers(3, 500, 4).tolist() for _ in range(3)]
    r = load(path, n_ctx=1024, n_ubatch=64, n_seq_max=3)
    assert r.kv.caches[1].size == 256   # pad(8 * 3 + 64)
    r.close()
    compare(path, prompts, fed, [0, 1, 2], chunk=20, tol=5e-3, n_ctx=1024, n_ubatch=64)


def test_batched_equals_alone_gemma(gemma_path: Path) -> None:
    prompts = [[2, 651, 6037, 529, 9405, 563], [2, 818, 5279, 529], [2, 9259, 236764, 1041, 1463, 563, 7777]]
    fed = [[236743, 236770, 236771], [107, 108], [1018, 1019, 1020]]
    compare(gemma_path, prompts, fed, [0, 0, 1], chunk=3, n_ctx=512)


def test_lone_sequence_keeps_its_cells(root: Path) -> None:
    """Sequence 0 alone (decode() or decode_batch()) writes position p to cell p, and in the ring to
    p mod size, as before batching existed."""
    r = load(model_path(root, "gemma3", "q8_0"), n_ctx=1024, n_ubatch=64, n_seq_max=2)
    base, ring = r.kv.caches
    r.decode(list(range(1, 200)))
    sizes = [1, 20, 40, 60, 64]
    for t, size in enumerate(sizes):
        r.decode_batch([0], [[7 + t] * size])
    n = r.n_past
    assert n == 199 + sum(sizes) and n > ring.size
    assert np.array_equal(base.pos[:n], np.arange(n)) and np.all(base.seq[:n] == 0)
    live = ring.pos >= 0
    assert np.array_equal(np.flatnonzero(live), ring.pos[live] % ring.size)
    assert ring.pos.max() == n - 1
    r.close()


def test_cells_taken_as_used(root: Path) -> None:
    """Two sequences share 256 cells: one may take 200 while the other is idle; a ubatch that needs more
    cells than are free fails with ContextOverflow and changes nothing; freeing a sequence gives its
    cells to the other."""
    r = load(model_path(root, "llama", "q8_0"), n_ctx=256, n_seq_max=2)
    r.decode_batch([0], [list(range(1, 201))])
    assert r.n_free_cells() == 56 and r.seq_n_past(0) == 200
    with pytest.raises(ContextOverflow, match="KV cache is full"):
        r.decode_batch([0, 1], [[5], list(range(1, 61))])
    assert r.n_free_cells() == 56 and r.seq_n_past(0) == 200 and r.seq_n_past(1) == 0
    r.decode_batch([1], [list(range(1, 51))])
    r.seq_clear(0)
    assert r.n_free_cells() == 206
    r.decode_batch([1], [list(range(51, 201))])
    assert r.seq_n_past(1) == 200
    with pytest.raises(ContextOverflow, match="context"):
        r.decode_batch([1], [[1] * 57])   # positions past n_ctx
    r.close()


def test_rewind_one_sequence_among_others(root: Path) -> None:
    """seq_rm on sequence 1 frees its later cells only; re-running its tail (into other cells now)
    gives the logits it had, and sequence 0 goes on as if nothing happened."""
    path = model_path(root, "gemma3", "q8_0")
    r = load(path, n_ctx=256, n_seq_max=2)
    a, b = PROMPTS[0], PROMPTS[2]
    r.decode_batch([0, 1], [a, b])
    tail = r.decode_batch([1], [[60, 61, 62]])[0]
    assert r.seq_rm(1, len(b))
    assert r.seq_n_past(1) == len(b) and r.seq_n_past(0) == len(a)
    r.decode_batch([0], [[70, 71]])          # sequence 0 takes the cells sequence 1 gave back
    again = r.decode_batch([1], [[60, 61, 62]])[0]
    assert again is not None and tail is not None and rel_err(again, tail) < REL_TOL
    got0 = r.decode_batch([0, 1], [[72], [63]])[0]
    r.close()
    assert got0 is not None and rel_err(got0, solo(path, a + [70, 71], [72], n_ctx=256)[-1]) < REL_TOL


def test_ring_shared_by_sequences() -> None:
    """Two sequences alternating tokens in a 256-cell ring with window 4 run for 300 positions each (600
    tokens): cells their windows left behind are reused, every window stays intact, and each token's
    mask shows exactly its own sequence's last 4 positions."""
    ring = KVCache(NumpyBackend(), [LayerKV(0, 1, 32, 32)], 256, n_swa=4)
    for p in range(300):
        for s in (0, 1):
            seq, pos = np.array([s]), np.array([p])
            ring.apply(pos, ring.find_cells(seq, pos), seq)
    for s in (0, 1):
        held = set(ring.pos[ring.seq == s].tolist())
        assert set(range(296, 300)) <= held
        mask = ring.kq_mask(ring.n_kv(), np.array([299]), np.array([s]))[0]
        seen = np.flatnonzero(mask == 0)
        assert sorted(ring.pos[seen].tolist()) == [296, 297, 298, 299] and np.all(ring.seq[seen] == s)
    assert ring.seq_rm(298, 1) and ring.max_pos(1) == 297 and ring.max_pos(0) == 299
    assert not ring.seq_rm(100, 0)   # positions 96..99 were reused long ago
    assert ring.max_pos(0) == 299    # a refused seq_rm changes nothing
