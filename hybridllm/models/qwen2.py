"""Qwen2 (Qwen2 / Qwen2.5 dense): src/models/qwen2.cpp.

LLaMA's block with biases on the Q/K/V projections, NEOX rotary pairing, attention scale
1/sqrt(head_dim), an optional bias on the lm_head and usually tied embeddings (0.5B-3B).
"""
from __future__ import annotations

from ..ggml import ops
from ..ggml.tensor import Tensor
from .blocks import (
    GraphContext,
    Model,
    NeoxHParams,
    TensorSpec,
    dense_ffn_specs,
    inv_sqrtf,
    std_io_specs,
    std_layer_specs,
)


class Qwen2HParams(NeoxHParams):
    """qwen2: the NEOX-rope common set, nothing of its own."""


class Qwen2(Model):
    arch = "qwen2"
    hparams_cls = Qwen2HParams

    def tensor_specs(self) -> list[TensorSpec]:
        hp = self.hp
        specs = std_io_specs(hp) + [TensorSpec("output.bias", (hp.n_vocab,), False)]
        for il in range(hp.n_layer):
            # qwen2 declares wq as (n_embd, n_embd): q heads span exactly n_embd
            specs += std_layer_specs(hp, il, q_dim=hp.n_embd) + dense_ffn_specs(hp, il)
        return specs

    def build(self, ctx: GraphContext) -> Tensor:
        hp, W = self.hp, self.weights
        inp = ctx.inp_embd(W["token_embd.weight"])
        pos = ctx.inp_pos()
        ctx.inp_attn()
        out_ids = ctx.inp_out_ids()
        kq_scale = inv_sqrtf(hp.head_dim_k)
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            inp_sa = inp
            cur = ctx.cb(ctx.norm(inp, W[p + "attn_norm.weight"], il), "attn_norm", il)
            q, k, v = ctx.qkv(il, cur, hp.n_head, hp.n_head_kv, hp.head_dim_k)
            q = ctx.cb(ctx.rope(q, pos, il), "Qcur", il)
            k = ctx.cb(ctx.rope(k, pos, il), "Kcur", il)
            cur = ctx.attn(il, q, k, v, kq_scale)
            if il == hp.n_layer - 1:
                cur, inp_sa = ops.get_rows(cur, out_ids), ops.get_rows(inp_sa, out_ids)
            ffn_inp = ctx.cb(ops.add(cur, inp_sa), "ffn_inp", il)
            cur = ctx.cb(ctx.norm(ffn_inp, W[p + "ffn_norm.weight"], il), "ffn_norm", il)
            cur = ctx.cb(ctx.ffn(cur, il, "silu"), "ffn_out", il)
            inp = ctx.cb(ops.add(cur, ffn_inp), "l_out", il)
        return ctx.output(inp, bias=self.w("output.bias"))
