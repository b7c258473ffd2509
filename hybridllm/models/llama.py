"""LLaMA (1/2/3.x, and Mixtral-style MoE when the file has experts): src/models/llama.cpp.

Pre-norm decoder: RMS norm -> Q/K/V -> RoPE (NORMAL pairing, optional llama3 frequency factors) ->
attention (scale 1/sqrt(head_dim)) -> residual -> RMS norm -> SwiGLU FFN or softmax-routed experts ->
residual; final RMS norm and lm_head (tied to the embeddings when `output.weight` is absent).
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
    dense_ffn_specs,
    inv_sqrtf,
    std_io_specs,
    std_layer_specs,
)


@dataclass(kw_only=True)
class LlamaHParams(HParams):
    n_expert: int = 0
    n_expert_used: int = 0

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> LlamaHParams:
        m = MetaReader(f)
        hp = cls(**cls.common(f, RopeMode.NORMAL),
                 n_expert=int(m.get("expert_count", 0)),
                 n_expert_used=int(m.uniform("expert_used_count", 0)))
        if hp.n_rot != hp.head_dim_k:  # llama.cpp refuses these files too
            raise ModelError(f"{f.path}: invalid n_rot {hp.n_rot}, expected {hp.head_dim_k}")
        if hp.n_expert and not 0 < hp.n_expert_used <= hp.n_expert:
            raise ModelError(f"{f.path}: {hp.n_expert_used} of {hp.n_expert} experts used")
        return hp


def moe_specs(hp: LlamaHParams, il: int, n_ff_exp: int) -> list[TensorSpec]:
    p, E, X = f"blk.{il}.", hp.n_embd, hp.n_expert
    return [TensorSpec(p + "ffn_gate_inp.weight", (E, X)),
            TensorSpec(p + "ffn_gate_exps.weight", (E, n_ff_exp, X)),
            TensorSpec(p + "ffn_down_exps.weight", (n_ff_exp, E, X)),
            TensorSpec(p + "ffn_up_exps.weight", (E, n_ff_exp, X))]


class Llama(Model):
    arch = "llama"
    hparams_cls = LlamaHParams
    hp: LlamaHParams

    def tensor_specs(self) -> list[TensorSpec]:
        hp = self.hp
        specs = std_io_specs(hp) + [TensorSpec("rope_freqs.weight", (hp.n_rot // 2,), False)]
        for il in range(hp.n_layer):
            specs += std_layer_specs(hp, il)
            specs += moe_specs(hp, il, hp.n_ff) if hp.n_expert else dense_ffn_specs(hp, il)
        return specs

    def build(self, ctx: GraphContext) -> Tensor:
        hp, W = self.hp, self.weights
        inp = ctx.inp_embd(W["token_embd.weight"])
        pos = ctx.inp_pos()
        ctx.inp_attn()
        kq_scale = inv_sqrtf(hp.head_dim_k)
        out_ids = ctx.inp_out_ids()
        factors = self.w("rope_freqs.weight")  # llama3 rope scaling; None for llama 1/2
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            inp_sa = inp
            cur = ctx.cb(ctx.norm(inp, W[p + "attn_norm.weight"], il), "attn_norm", il)
            q, k, v = ctx.qkv(il, cur, hp.n_head, hp.n_head_kv, hp.head_dim_k)
            q = ctx.cb(ctx.rope(q, pos, il, factors=factors), "Qcur", il)
            k = ctx.cb(ctx.rope(k, pos, il, factors=factors), "Kcur", il)
            cur = ctx.cb(ctx.attn(il, q, k, v, kq_scale), "attn_out", il)
            if il == hp.n_layer - 1:
                cur, inp_sa = ops.get_rows(cur, out_ids), ops.get_rows(inp_sa, out_ids)
            ffn_inp = ctx.cb(ops.add(cur, inp_sa), "ffn_inp", il)
            cur = ctx.cb(ctx.norm(ffn_inp, W[p + "ffn_norm.weight"], il), "ffn_norm", il)
            if hp.n_expert:
                cur = ctx.moe_ffn(cur, il, hp.n_expert, hp.n_expert_used, norm_w=True, w_scale=0.0)
            else:
                cur = ctx.cb(ctx.ffn(cur, il, "silu"), "ffn_out", il)
            inp = ctx.cb(ops.add(cur, ffn_inp), "l_out", il)
        return ctx.output(inp)
