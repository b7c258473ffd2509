"""RMS_NORM/NORM/L2_NORM, GET_ROWS/SET_ROWS and CPY/DUP/CONT against real ggml."""
from __future__ import annotations

import numpy as np
import pytest

from hybridllm.backends.base import ComputeError
from hybridllm.ggml.types import GGMLType as T
from hybridllm.quants import DEQUANTIZE_TYPES, QUANTIZE_TYPES

# every block type hybridllm.quants can decode (all of them once that module is complete)
QTYPES = [t for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
                      T.IQ4_NL, T.IQ4_XS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S,
                      T.IQ1_M, T.TQ1_0, T.TQ2_0, T.MXFP4, T.NVFP4, T.Q1_0, T.Q2_0)
          if t in DEQUANTIZE_TYPES]
# destination types ggml's CPU backend can quantize into (from_float) and hybridllm.quants implements
TO_QTYPES = [t for t in QTYPES if t in QUANTIZE_TYPES and t not in (T.IQ2_XXS, T.IQ3_S)]


def test_norms(g, rng):
    x = g.new(T.F32, (96, 5, 3), rng.standard_normal(1440) * 2 + 0.5)
    xp = g.permute(x, 0, 2, 1, 3)                       # strided rows
    outs = []
    for src in (x, xp):
        outs += [g.rms_norm(src, 1e-6), g.norm(src, 1e-5), g.l2_norm(src, 1e-12)]
    outs.append(g.rms_norm_inplace(g.new(T.F32, (640, 2), rng.standard_normal(1280)), 1e-6))
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("table_type", [T.F32, T.F16, T.BF16, T.I32] + QTYPES)
def test_get_rows(g, rng, table_type):
    n0 = 256
    values = rng.integers(-1000, 1000, (12, n0)) if table_type == T.I32 else rng.standard_normal((12, n0))
    if table_type.name.startswith(("IQ1", "IQ2", "IQ3")):   # ggml's quantizers for these are very slow
        values = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    table = g.new(table_type, (n0, 12), values)
    ids = g.new(T.I32, (7,), rng.integers(0, 12, 7))
    outs = [g.get_rows(table, ids)]
    if table_type in (T.F32, T.F16, T.Q8_0):
        t3 = g.new(table_type, (n0, 5, 3, 2), rng.standard_normal(n0 * 30))
        outs.append(g.get_rows(t3, g.new(T.I32, (4, 3, 2), rng.integers(0, 5, 24))))
    # ggml's dequantizers are scalar code: our dequantization must agree to the last bit
    g.run(*outs).assert_close(rtol=0, atol=0)


def test_get_rows_out_of_range_raises(g, rng):
    table = g.new(T.F32, (8, 4), rng.standard_normal(32))
    ids = g.new(T.I32, (3,), np.array([0, 3, 1]))
    res = g.run(g.get_rows(table, ids))
    ids_node = res.node(ids)
    for bad in (4, -1):
        res.buf.array[ids_node.offset + 4:ids_node.offset + 8] = np.array([bad], np.int32).view(np.uint8)
        with pytest.raises(ComputeError, match="out of range"):
            res.plan.run()


@pytest.mark.parametrize("dst_type", [T.F32, T.F16, T.BF16] + TO_QTYPES)
@pytest.mark.parametrize("idx_type", [T.I64, T.I32])
def test_set_rows(g, rng, dst_type, idx_type):
    n0 = 256
    cache = g.new(dst_type, (n0, 16, 2), rng.standard_normal(n0 * 32))
    rows = g.new(T.F32, (n0, 5, 2), rng.standard_normal(n0 * 10))
    ids = g.new(idx_type, (5, 1), rng.permutation(16)[:5])          # broadcast over dim 2
    outs = [g.set_rows(cache, rows, ids)]
    if dst_type in (T.F16, T.F32):
        rows16 = g.new(T.F16, (n0, 3, 2), rng.standard_normal(n0 * 6))
        outs.append(g.set_rows(g.new(dst_type, (n0, 9, 2), rng.standard_normal(n0 * 18)), rows16,
                               g.new(idx_type, (3, 2), np.array([8, 0, 4, 1, 2, 3]))))
    res = g.run(*outs)
    res.assert_close(rtol=0, atol=0)
    for o in outs:   # exact bytes, including the rows that were not addressed
        node = res.node(o)
        assert bytes(res.buf.array[node.offset:node.offset + node.nbytes]) == \
            bytes(g.mem[node.offset:node.offset + node.nbytes])


def test_set_rows_transposed_v(g, rng):
    """The non-FA V cache: destination viewed as (1, n_elements), one element per index."""
    n_embd, n_ctx, n_tok = 8, 32, 3
    vcache = g.new(T.F16, (n_ctx, n_embd), rng.standard_normal(n_ctx * n_embd))
    v = g.new(T.F32, (n_embd, n_tok), rng.standard_normal(n_embd * n_tok))
    flat = g.reshape_4d(vcache, 1, n_ctx * n_embd, 1, 1)
    vt = g.reshape_4d(v, 1, n_embd * n_tok, 1, 1)          # value (e, t) is "row" t*n_embd + e
    pos = np.array([5, 6, 7])
    idx = (np.arange(n_embd)[None, :] * n_ctx + pos[:, None]).reshape(-1)   # cache element e*n_ctx + pos
    out = g.set_rows(flat, vt, g.new(T.I64, (n_embd * n_tok,), idx))
    g.run(out).assert_close(rtol=0, atol=0)


def test_set_rows_out_of_range_raises(g, rng):
    cache = g.new(T.F16, (8, 4), rng.standard_normal(32))
    ids = g.new(T.I64, (2,), np.array([0, 1]))
    res = g.run(g.set_rows(cache, g.new(T.F32, (8, 2), rng.standard_normal(16)), ids))
    node = res.node(ids)
    res.buf.array[node.offset + 8:node.offset + 16] = np.array([4], np.int64).view(np.uint8)
    with pytest.raises(ComputeError):
        res.plan.run()


@pytest.mark.parametrize("pair", [(T.F32, T.F16), (T.F16, T.F32), (T.F32, T.BF16), (T.BF16, T.F32),
                                  (T.F16, T.BF16), (T.BF16, T.F16), (T.F32, T.I32), (T.I32, T.F32),
                                  (T.F32, T.F32), (T.F16, T.F16), (T.BF16, T.BF16)])
def test_cpy_plain(g, rng, pair):
    st, dt = pair
    vals = rng.standard_normal(240) * 40
    if st == T.I32:
        vals = rng.integers(-70000, 70000, 240)
    a = g.new(st, (10, 4, 3, 2), vals)
    ap = g.permute(a, 2, 0, 1, 3)                         # a non-contiguous source
    dst = g.new(dt, (4, 10, 6), np.zeros(240))            # different shape, same element count
    outs = [g.cast(a, int(dt)), g.cpy(ap, g.new(dt, (3, 10, 4, 2), np.zeros(240))), g.cpy(a, dst),
            g.cont(g.transpose(a))]
    g.run(*outs).assert_close(rtol=0, atol=0)


def test_cpy_into_strided_view_writes_only_its_elements(g, rng):
    big = g.new(T.F16, (16, 8), rng.standard_normal(128))
    view = g.view_2d(big, 4, 8, 32, 6)                    # 4 of every 16 elements, offset 3 elements
    src = g.new(T.F32, (4, 8), rng.standard_normal(32))
    res = g.run(g.cpy(src, view))
    res.assert_close(rtol=0, atol=0)
    node = res.node(big)
    assert bytes(res.buf.array[node.offset:node.offset + node.nbytes]) == \
        bytes(g.mem[node.offset:node.offset + node.nbytes])


@pytest.mark.parametrize("qtype", QTYPES)
def test_cpy_quantize_dequantize(g, rng, qtype):
    x = g.new(T.F32, (256, 6), rng.standard_normal(1536))
    slow = qtype.name.startswith(("IQ1", "IQ2", "IQ3"))      # ggml quantizes these very slowly
    q = g.new(qtype, (256, 6), rng.integers(0, 256, 1 << 12, dtype=np.uint8) if slow else rng.standard_normal(1536))
    outs = [g.cpy(q, g.new(T.F32, (256, 6), np.zeros(1536))), g.cpy(g.cast(q, int(T.F32)), x)]
    if qtype in TO_QTYPES:
        outs.append(g.cpy(x, g.new(qtype, (256, 6), np.zeros(1536))))
        outs.append(g.cpy(g.new(T.F16, (256, 6), rng.standard_normal(1536)), g.new(qtype, (512, 3))))
    res = g.run(*outs)
    res.assert_close(rtol=0, atol=0)


def test_empty_nodes_are_skipped(g, rng):
    """A batch with no output rows: ggml skips nodes with a zero dimension, and so do we."""
    table = g.new(T.F32, (8, 4), rng.standard_normal(32))
    ids = g.new(T.I32, (0,))
    rows = g.get_rows(table, ids)
    res = g.run(g.rms_norm(rows, 1e-6), g.scale(table, 2.0))
    assert res.node(rows).nelements == 0
    res.assert_close(rtol=0, atol=0)
