"""Qwen3-MoE (30B-A3B, 235B-A22B): src/models/qwen3moe.cpp.

Qwen3's attention (per-head Q/K RMS norms, NEOX RoPE) with every FFN replaced by softmax-routed experts:
top-k by probability, weights renormalised to sum 1, SwiGLU experts through MUL_MAT_ID, outputs summed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.gguf_file import GGUFFile
from ..ggml import ops
from ..ggml.tensor import Tensor
from ..ggml.types import RopeMode
from .blocks import (
    GraphContext,
    HParams,
    MetaReader,
    Model,
    ModelError,
    TensorSpec,
    std_io_specs,
    std_layer_specs,
)
from .qwen3 import qk_normed_attention


@dataclass(kw_only=True)
class Qwen3MoeHParams(HParams):
    n_expert: int
    n_expert_used: int
    n_ff_exp: int

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Qwen3MoeHParams:
        m = MetaReader(f)
        common = cls.common(f, RopeMode.NEOX)
        n_expert = int(m.get("expert_count", 0))
        n_used = int(m.uniform("expert_used_count", 0))
        if n_expert <= 0 or not 0 < n_used <= n_expert:
            raise ModelError(f"{f.path}: qwen3moe needs experts (expert_count {n_expert}, used {n_used})")
        n_ff_exp = int(m.uniform("expert_feed_forward_length", 0)) or common["n_ff"] // n_used
        hp = cls(**common, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp)
        if hp.head_dim_k != hp.head_dim_v or hp.n_rot != hp.head_dim_k:
            raise ModelError(f"{f.path}: qwen3moe needs head_dim_k == head_dim_v == n_rot")
        return hp


class Qwen3Moe(Model):
    arch = "qwen3moe"
    hparams_cls = Qwen3MoeHParams
    hp: Qwen3MoeHParams

    def tensor_specs(self) -> list[TensorSpec]:
        hp = self.hp
        E, X, FE = hp.n_embd, hp.n_expert, hp.n_ff_exp
        specs = std_io_specs(hp)
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            specs += std_layer_specs(hp, il, qk_norm=True)
            specs += [TensorSpec(p + "ffn_gate_inp.weight", (E, X)),
                      TensorSpec(p + "ffn_gate_exps.weight", (E, FE, X)),
                      TensorSpec(p + "ffn_down_exps.weight", (FE, E, X)),
                      TensorSpec(p + "ffn_up_exps.weight", (E, FE, X))]
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
            cur = ctx.moe_ffn(cur, il, hp.n_expert, hp.n_expert_used, norm_w=True, w_scale=0.0)
            inp = ctx.cb(ops.add(cur, ffn_inp), "l_out", il)
        return ctx.output(inp)
