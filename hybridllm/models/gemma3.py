"""Gemma 3 (text): src/models/gemma3.cpp.

Embeddings scaled by sqrt(n_embd) (per-row input `inp_scale_rows`), per-head Q/K RMS norms, Q pre-scaled
by `attention_scale` (attention itself uses scale 1), NEOX RoPE with a separate base for the sliding-window
layers, post-attention and post-FFN RMS norms, GEGLU (tanh GELU) FFN, tied lm_head and optional final
logit soft-capping. Layers alternate sliding-window (iSWA cache: a small ring) and global attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    f32,
    inv_sqrtf,
    std_io_specs,
    std_layer_specs,
)

DEFAULT_SWA_PATTERN = 6  # five sliding-window layers, then one global layer


@dataclass(kw_only=True)
class Gemma3HParams(HParams):
    swa_layers: tuple[bool, ...] = field(default_factory=tuple)
    rope_freq_base_swa: float = 10000.0
    rope_freq_scale_swa: float = 1.0
    final_logit_softcap: float = 0.0
    attention_scale: float = 0.0

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Gemma3HParams:
        m = MetaReader(f)
        common = cls.common(f, RopeMode.NEOX)
        n_layer = common["n_layer"]
        n_swa = int(m.get("attention.sliding_window", 0))
        swa_layers = (False,) * n_layer
        if n_swa > 0:
            pattern = m.get("attention.sliding_window_pattern", DEFAULT_SWA_PATTERN)
            if isinstance(pattern, (np.ndarray, list)):
                if len(pattern) < n_layer:
                    raise ModelError(f"{f.path}: sliding_window_pattern has {len(pattern)} entries "
                                     f"for {n_layer} layers")
                swa_layers = tuple(bool(x) for x in pattern[:n_layer])
            else:  # llama_hparams::set_swa_pattern(n_pattern, dense_first=false)
                n = int(pattern)
                swa_layers = tuple(n == 0 or il % n < n - 1 for il in range(n_layer))
        if n_layer == 62:  # gemma3 27B scales by the model width per head
            attention_scale = float(np.float32(1.0) / np.sqrt(np.float32(common["n_embd"] // common["n_head"])))
        else:
            attention_scale = inv_sqrtf(common["head_dim_k"])
        return cls(**common, n_swa=n_swa, swa_layers=swa_layers,
                   rope_freq_base_swa=f32(m.get("rope.freq_base_swa", 10000.0)),
                   final_logit_softcap=f32(m.get("final_logit_softcapping", 0.0)),
                   attention_scale=attention_scale)

    def is_swa(self, il: int) -> bool:
        return self.n_swa > 0 and self.swa_layers[il]


class Gemma3(Model):
    arch = "gemma3"
    hparams_cls = Gemma3HParams
    hp: Gemma3HParams

    def tensor_specs(self) -> list[TensorSpec]:
        hp = self.hp
        specs = std_io_specs(hp)
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            specs += std_layer_specs(hp, il, qk_norm=True) + dense_ffn_specs(hp, il)
            specs += [TensorSpec(p + "post_attention_norm.weight", (hp.n_embd,)),
                      TensorSpec(p + "post_ffw_norm.weight", (hp.n_embd,))]
        return specs

    def build(self, ctx: GraphContext) -> Tensor:
        hp, W = self.hp, self.weights
        iswa = hp.n_swa > 0
        # sqrtf(n_embd) in float, as llama.cpp passes it
        inp = ctx.cb(ctx.inp_embd(W["token_embd.weight"], float(np.sqrt(np.float32(hp.n_embd)))), "inp_scaled")
        pos = ctx.inp_pos()
        ctx.inp_attn()
        out_ids = ctx.inp_out_ids()
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            swa = hp.is_swa(il)
            base = hp.rope_freq_base_swa if swa else hp.rope_freq_base
            scale = hp.rope_freq_scale_swa if swa else hp.rope_freq_scale
            cur = ctx.cb(ctx.norm(inp, W[p + "attn_norm.weight"], il), "attn_norm", il)
            q, k, v = ctx.qkv(il, cur, hp.n_head, hp.n_head_kv, hp.head_dim_k)
            q = ctx.cb(ctx.norm(q, W[p + "attn_q_norm.weight"], il), "Qcur_normed", il)
            q = ctx.rope(q, pos, il, freq_base=base, freq_scale=scale)
            k = ctx.cb(ctx.norm(k, W[p + "attn_k_norm.weight"], il), "Kcur_normed", il)
            k = ctx.rope(k, pos, il, freq_base=base, freq_scale=scale)
            ctx.cb(q, "Qcur", il)
            ctx.cb(k, "Kcur", il)
            q = ops.scale(q, hp.attention_scale)
            cur = ctx.attn(il, q, k, v, 1.0, iswa_order=iswa)
            if il == hp.n_layer - 1:
                cur, inp = ops.get_rows(cur, out_ids), ops.get_rows(inp, out_ids)
            cur = ctx.cb(ctx.norm(cur, W[p + "post_attention_norm.weight"], il), "attn_post_norm", il)
            sa_out = ctx.cb(ops.add(cur, inp), "sa_out", il)
            cur = ctx.cb(ctx.norm(sa_out, W[p + "ffn_norm.weight"], il), "ffn_norm", il)
            cur = ctx.cb(ctx.ffn(cur, il, "gelu"), "ffn_out", il)
            cur = ctx.cb(ctx.norm(cur, W[p + "post_ffw_norm.weight"]), "ffn_post_norm", il)
            inp = ctx.cb(ops.add(cur, sa_out), "l_out", il)
        return ctx.output(inp, softcap=hp.final_logit_softcap)
