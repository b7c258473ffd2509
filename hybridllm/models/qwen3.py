"""Qwen3 dense: src/models/qwen3.cpp.

Like Qwen2 without the Q/K/V biases, plus per-head RMS norms of Q and K (before RoPE, NEOX pairing);
head_dim is independent of n_embd (e.g. 128 heads of a 1024-wide model).
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


class Qwen3HParams(NeoxHParams):
    """qwen3: the NEOX-rope common set, nothing of its own."""


def qk_normed_attention(model: Model, ctx: GraphContext, il: int, cur: Tensor, pos: Tensor) -> Tensor:
    """Q/K/V projections, RMS norm of each Q and K head, RoPE, attention (qwen3 and qwen3moe)."""
    hp, W, p = model.hp, model.weights, f"blk.{il}."
    q, k, v = ctx.qkv(il, cur, hp.n_head, hp.n_head_kv, hp.head_dim_k)
    q = ctx.cb(ctx.norm(q, W[p + "attn_q_norm.weight"], il), "Qcur_normed", il)
    q = ctx.rope(q, pos, il)
    k = ctx.cb(ctx.norm(k, W[p + "attn_k_norm.weight"], il), "Kcur_normed", il)
    k = ctx.rope(k, pos, il)
    ctx.cb(q, "Qcur", il)
    ctx.cb(k, "Kcur", il)
    return ctx.attn(il, q, k, v, inv_sqrtf(hp.head_dim_k))


class Qwen3(Model):
    arch = "qwen3"
    hparams_cls = Qwen3HParams

    def tensor_specs(self) -> list[TensorSpec]:
        hp = self.hp
        specs = std_io_specs(hp)
        for il in range(hp.n_layer):
            specs += std_layer_specs(hp, il, qk_norm=True) + dense_ffn_specs(hp, il)
        return specs

    def build(self, ctx: GraphContext) -> Tensor:
        hp, W = self.hp, self.weights
        inp = ctx.inp_embd(W["token_embd.weight"])
        pos = ctx.inp_pos()
        ctx.inp_attn()
        out_ids = ctx.inp_out_ids()
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            inp_sa = inp
            cur = ctx.cb(ctx.norm(inp, W[p + "attn_norm.weight"], il), "attn_norm", il)
            cur = qk_normed_attention(self, ctx, il, cur, pos)
            if il == hp.n_layer - 1:
                cur, inp_sa = ops.get_rows(cur, out_ids), ops.get_rows(inp_sa, out_ids)
            ffn_inp = ctx.cb(ops.add(cur, inp_sa), "ffn_inp", il)
            cur = ctx.cb(ctx.norm(ffn_inp, W[p + "ffn_norm.weight"], il), "ffn_norm", il)
            cur = self.ffn(ctx, cur, il)
            inp = ctx.cb(ops.add(cur, ffn_inp), "l_out", il)
        return ctx.output(inp)

    def ffn(self, ctx: GraphContext, cur: Tensor, il: int) -> Tensor:
        """The layer's feed-forward block (qwen3moe swaps in its experts; the rest of the layer is shared)."""
        return ctx.cb(ctx.ffn(cur, il, "silu"), "ffn_out", il)
