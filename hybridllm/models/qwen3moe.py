"""Qwen3-MoE (30B-A3B, 235B-A22B): src/models/qwen3moe.cpp.

Qwen3's attention (per-head Q/K RMS norms, NEOX RoPE) with every FFN replaced by softmax-routed experts:
top-k by probability, weights renormalised to sum 1, SwiGLU experts through MUL_MAT_ID, outputs summed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.gguf_file import GGUFFile
from ..ggml.tensor import Tensor
from ..ggml.types import RopeMode
from .blocks import (
    GraphContext,
    HParams,
    MetaReader,
    ModelError,
    TensorSpec,
    std_io_specs,
    std_layer_specs,
)
from .qwen3 import Qwen3


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


class Qwen3Moe(Qwen3):
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

    def ffn(self, ctx: GraphContext, cur: Tensor, il: int) -> Tensor:
        hp = self.hp
        return ctx.moe_ffn(cur, il, hp.n_expert, hp.n_expert_used, norm_w=True, w_scale=0.0)
