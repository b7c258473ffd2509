"""Shared transformer blocks, built node for node like llama.cpp's llm_graph_context (src/llama-graph.cpp):
the same ops, in the same order, with the same parameters, so that a graph computes what llama.cpp's
does (and could be shipped to a llama.cpp RPC worker unchanged).

A `Model` subclass per architecture declares its hyper-parameters (an `HParams` dataclass read from GGUF
metadata), its tensors, and a `build(ctx)` that assembles one ubatch's graph from `GraphContext` blocks.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from ..backends.base import Backend
from ..engine.alloc import WeightStore
from ..engine.gguf_file import GGUFError, GGUFFile
from ..engine.kv_cache import KVCache, KVCacheISWA, KVUnified, LayerKV, pad
from ..engine.placement import Placement
from ..engine.scheduler import buffer_lost
from ..ggml import ops
from ..ggml.tensor import Tensor
from ..ggml.types import GGMLType, RopeMode, type_name

GGML_PREC_F32 = 10      # enum ggml_prec: llama.cpp asks for F32 accumulation in attention
F16_MIN_NORMAL = 6.103515625e-5


class ModelError(GGUFError):
    """The file is a valid GGUF but not a model we can run (missing/misshapen tensor, bad hparams)."""


def f32(x: float) -> float:
    """Round to float32, as C code computing in float would store it."""
    return float(np.float32(x))


def inv_sqrtf(n: float) -> float:
    """1.0f/sqrtf(float(n)), in float32 arithmetic."""
    return float(np.float32(1.0) / np.sqrt(np.float32(n)))


# ------------------------------------------------------------------------------------------------
# hyper-parameters

def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_scaling(m: MetaReader) -> tuple[float, float, float]:
    """(freq_scale, ext_factor, attn_factor) as llama_context derives them from the GGUF's rope keys."""
    scaling = str(m.get("rope.scaling.type", "linear"))
    if scaling not in ("none", "linear", "yarn"):
        raise ModelError(f"{m.f.path}: rope scaling type {scaling!r} is not supported")
    factor = float(m.get("rope.scaling.factor", m.get("rope.scale_linear", 0.0)))
    freq_scale = 1.0 if (factor == 0.0 or scaling == "none") else f32(1.0 / factor)
    ext_factor = 1.0 if scaling == "yarn" else 0.0
    attn_factor = 1.0
    if ext_factor != 0.0:  # YaRN magnitude correction, cancelled again inside the rope kernel
        fac = 1.0 / freq_scale
        log_mul = float(m.get("rope.scaling.yarn_log_multiplier", 0.0))
        attn_factor = (_yarn_mscale(fac, 1.0) / _yarn_mscale(fac, log_mul)) if log_mul else _yarn_mscale(fac, 1.0)
        attn_factor *= 1.0 / (1.0 + 0.1 * math.log(fac))
    attn_factor *= float(m.get("rope.scaling.attn_factor", 1.0))
    return freq_scale, ext_factor, f32(attn_factor)

class MetaReader:
    """`{arch}.<key>` lookups with llama.cpp's defaults and one-line errors."""

    def __init__(self, f: GGUFFile) -> None:
        self.f, self.arch = f, f.arch

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.f.metadata:
            if required:
                raise ModelError(f"{self.f.path}: missing metadata key {full!r}")
            return default
        return self.f.metadata[full]

    def uniform(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        """A key that may be a per-layer array (get_key_or_arr); we need all layers equal."""
        v = self.get(key, default, required=required)
        if isinstance(v, (np.ndarray, list)):
            vals = {int(x) for x in v}
            if len(vals) != 1:
                raise ModelError(f"{self.f.path}: per-layer {self.arch}.{key} {sorted(vals)} is not supported")
            return vals.pop()
        return v


@dataclass(kw_only=True)
class HParams:
    """What every architecture here reads (llama_model_base::load_hparams + llama_context's cparams)."""
    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    rms_eps: float
    rope_type: int
    rope_freq_base: float
    rope_freq_scale: float
    n_ctx_orig: int
    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    n_swa: int = 0    # sliding window of the SWA layers (0: none)

    @classmethod
    def common(cls, f: GGUFFile, rope_type: RopeMode) -> dict[str, Any]:
        m = MetaReader(f)
        n_embd = int(m.get("embedding_length", required=True))
        n_head = int(m.uniform("attention.head_count", required=True))
        if n_head <= 0 or n_embd <= 0:
            raise ModelError(f"{f.path}: invalid n_embd {n_embd} / n_head {n_head}")
        head_k = int(m.get("attention.key_length", n_embd // n_head))
        tok = f.tensors.get("token_embd.weight")
        if tok is None:
            raise ModelError(f"{f.path}: missing tensor 'token_embd.weight'")
        n_ctx_train = int(m.get("context_length", required=True))
        freq_scale, ext_factor, attn_factor = _rope_scaling(m)
        return {
            "arch": f.arch, "n_vocab": tok.ne[1], "n_ctx_train": n_ctx_train, "n_embd": n_embd,
            "n_layer": int(m.get("block_count", required=True)), "n_head": n_head,
            "n_head_kv": int(m.uniform("attention.head_count_kv", n_head)),
            "n_ff": int(m.uniform("feed_forward_length", 0)), "head_dim_k": head_k,
            "head_dim_v": int(m.get("attention.value_length", n_embd // n_head)),
            "n_rot": int(m.get("rope.dimension_count", head_k)),
            "rms_eps": f32(m.get("attention.layer_norm_rms_epsilon", required=True)),
            "rope_type": int(rope_type), "rope_freq_base": f32(m.get("rope.freq_base", 10000.0)),
            "rope_freq_scale": freq_scale,
            "n_ctx_orig": int(m.get("rope.scaling.original_context_length", n_ctx_train)),
            "ext_factor": ext_factor, "attn_factor": attn_factor, "beta_fast": 32.0, "beta_slow": 1.0}

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> HParams:
        raise NotImplementedError

    def is_swa(self, il: int) -> bool:
        return False

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv

    def summary(self) -> dict[str, Any]:
        return {fl.name: getattr(self, fl.name) for fl in fields(self)}


@dataclass(kw_only=True)
class NeoxHParams(HParams):
    """The common hyper-parameters with NEOX rotary pairing over whole heads (qwen2, qwen3, qwen3moe)."""

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> NeoxHParams:
        hp = cls(**cls.common(f, RopeMode.NEOX))
        if hp.head_dim_k != hp.head_dim_v or hp.n_rot != hp.head_dim_k:
            raise ModelError(f"{f.path}: {f.arch} needs head_dim_k == head_dim_v == n_rot")
        return hp


# ------------------------------------------------------------------------------------------------
# model base

@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]
    required: bool = True


class Model(ABC):
    """An architecture: hyper-parameters, weights on a backend, and the graph of one ubatch."""

    arch: ClassVar[str]
    hparams_cls: ClassVar[type[HParams]]
    n_pos_per_embd: ClassVar[int] = 1   # 4 for M-RoPE models (qwen3vl)

    def __init__(self, f: GGUFFile, backend: Backend, placement: Placement | None = None, *,
                 progress: bool = False) -> None:
        """Upload the weights: all to `backend`, or per `placement` (layers on their devices; `backend`,
        the master, keeps the input and output layers)."""
        self.path = f.path
        self.hp = self.hparams_cls.from_gguf(f)
        self.backend = backend
        self.placement = placement or Placement.single(backend, self.hp.n_layer)
        if len(self.placement.layer_backends) != self.hp.n_layer:
            raise ModelError(f"{f.path}: placement covers {len(self.placement.layer_backends)} layers, "
                             f"the model has {self.hp.n_layer}")
        names = self.check_tensors(f)
        self.weights = WeightStore(backend, f, names, devices_of=self.placement.backends_for, progress=progress)
        self.tensor_types = {n: f.tensors[n].type for n in names}
        self.owned: list[Backend] = []   # backends load() opened for this model; closed with it

    def layer_backend(self, il: int) -> Backend:
        return self.placement.layer_backends[il]

    @abstractmethod
    def tensor_specs(self) -> list[TensorSpec]:
        """Every tensor the graph may use, with llama.cpp's expected shapes."""

    @abstractmethod
    def build(self, ctx: GraphContext) -> Tensor:
        """The ubatch's logits node (n_vocab, n_outputs)."""

    def check_tensors(self, f: GGUFFile) -> list[str]:
        names = []
        for spec in self.tensor_specs():
            info = f.tensors.get(spec.name)
            if info is None:
                if spec.required:
                    raise ModelError(f"{f.path}: missing tensor {spec.name!r}")
                continue
            want = tuple(spec.ne) + (1,) * (4 - len(spec.ne))
            if info.ne != want:
                raise ModelError(f"{f.path}: tensor {spec.name!r} has shape {list(info.ne)}, "
                                 f"expected {list(want)}")
            names.append(spec.name)
        return names

    def w(self, name: str) -> Tensor | None:
        return self.weights.get(name)

    def layer_kv(self) -> list[LayerKV]:
        hp = self.hp
        return [LayerKV(il, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v) for il in range(hp.n_layer)]

    def make_kv(self, n_ctx: int, n_ubatch: int, type_k: GGMLType, type_v: GGMLType,
                v_trans: bool = False, n_seq: int = 1) -> KVUnified | KVCacheISWA:
        """llama.cpp's unified cache for this model, shared by n_seq sequences: one full cache, or full +
        SWA ring (llama_kv_cache_iswa, the ring holding every sequence's window). V is transposed
        (v_trans) when flash attention is off, as in llama.cpp."""
        size = pad(n_ctx)
        layers = self.layer_kv()
        swa_layers = [s for s in layers if self.hp.is_swa(s.il)]
        kw: dict[str, Any] = {"type_k": type_k, "type_v": type_v, "v_trans": v_trans}
        kw["backend_of"] = self.layer_backend
        if not swa_layers:
            return KVUnified(KVCache(self.backend, layers, size, **kw))
        n_swa = self.hp.n_swa
        base = KVCache(self.backend, [s for s in layers if not self.hp.is_swa(s.il)], size, **kw)
        swa = KVCache(self.backend, swa_layers, pad(min(size, n_swa * n_seq + n_ubatch)), n_swa=n_swa, **kw)
        return KVCacheISWA(base, swa)

    def positions(self, pos: np.ndarray) -> np.ndarray:
        """The `inp_pos` values for text tokens at these positions: one per token, or for M-RoPE
        (n_pos_per_embd == 4) section-major [p..., p..., p..., 0...] as llama_batch_allocr expands them."""
        if self.n_pos_per_embd == 1:
            return pos
        n = self.n_pos_per_embd
        out = np.zeros(n * pos.size, dtype=pos.dtype)
        for j in range(min(3, n)):
            out[j * pos.size:(j + 1) * pos.size] = pos
        return out

    def output_weight(self) -> Tensor:
        """`output.weight`, or the token embeddings when tied (llama.cpp's TENSOR_DUPLICATED)."""
        out = self.w("output.weight")
        return out if out is not None else self.weights["token_embd.weight"]

    def recover(self, *, progress: bool = False) -> list[Backend]:
        """Reconnect the devices whose weights were lost with their worker, and upload them again;
        returns those devices (RpcError if one is still unreachable)."""
        lost = [b for b in self.placement.devices
                if any(key == id(b) and buffer_lost(buf) for key, buf in self.weights.buffers.items())]
        for b in lost:
            reconnect = getattr(b, "reconnect", None)
            if reconnect is not None:
                reconnect()
            self.weights.reload(b, progress)
        return lost

    def free(self) -> None:
        self.weights.free()
        for b in self.owned:
            close = getattr(b, "close", None)
            if close is not None:
                close()
        self.owned.clear()

    def describe_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[type_name(t)] = counts.get(type_name(t), 0) + 1
        return counts


def std_layer_specs(hp: HParams, il: int, *, q_dim: int | None = None, qk_norm: bool = False,
                    bias: bool = False) -> list[TensorSpec]:
    """attn_norm, Q/K/V/O (+ optional biases, Q/K norms), ffn_norm: the common per-layer tensors."""
    p, E = f"blk.{il}.", hp.n_embd
    q = q_dim if q_dim is not None else hp.head_dim_k * hp.n_head
    k, v = hp.n_embd_k_gqa, hp.n_embd_v_gqa
    specs = [TensorSpec(p + "attn_norm.weight", (E,)),
             TensorSpec(p + "attn_q.weight", (E, q)), TensorSpec(p + "attn_k.weight", (E, k)),
             TensorSpec(p + "attn_v.weight", (E, v)), TensorSpec(p + "attn_output.weight", (q, E)),
             TensorSpec(p + "attn_output.bias", (E,), False),
             TensorSpec(p + "attn_q.bias", (q,), bias), TensorSpec(p + "attn_k.bias", (k,), bias),
             TensorSpec(p + "attn_v.bias", (v,), bias),
             TensorSpec(p + "ffn_norm.weight", (E,))]
    if qk_norm:
        specs += [TensorSpec(p + "attn_q_norm.weight", (hp.head_dim_k,)),
                  TensorSpec(p + "attn_k_norm.weight", (hp.head_dim_k,))]
    return specs


def std_io_specs(hp: HParams) -> list[TensorSpec]:
    return [TensorSpec("token_embd.weight", (hp.n_embd, hp.n_vocab)),
            TensorSpec("output_norm.weight", (hp.n_embd,)),
            TensorSpec("output.weight", (hp.n_embd, hp.n_vocab), False)]


def dense_ffn_specs(hp: HParams, il: int) -> list[TensorSpec]:
    p, E, F = f"blk.{il}.", hp.n_embd, hp.n_ff
    return [TensorSpec(p + "ffn_gate.weight", (E, F)), TensorSpec(p + "ffn_down.weight", (F, E)),
            TensorSpec(p + "ffn_up.weight", (E, F))]


# ------------------------------------------------------------------------------------------------
# graph context

@dataclass
class AttnInput:
    """One KV cache's per-ubatch inputs (llm_graph_input_attn_kv)."""
    cache: KVCache
    n_kv: int
    k_idxs: Tensor
    v_idxs: Tensor
    kq_mask: Tensor


class GraphContext:
    """One ubatch's graph under construction: inputs, and llm_graph_context's building blocks."""

    def __init__(self, model: Model, kv: KVUnified | KVCacheISWA, n_tokens: int, n_outputs: int,
                 n_kv: Sequence[int], *, flash_attn: bool = True) -> None:
        self.model, self.hp, self.kv = model, model.hp, kv
        self.n_tokens, self.n_outputs = n_tokens, n_outputs
        self.n_kv = tuple(n_kv)
        self.flash_attn = flash_attn
        self.graph = ops.Graph()
        self.inputs: dict[str, Tensor] = {}
        self.attn_inputs: list[AttnInput] = []
        self.tok_scale = 1.0

    # --- naming and inputs -----------------------------------------------------------------------
    @staticmethod
    def cb(t: Tensor, name: str, il: int = -1) -> Tensor:
        """llama_context's graph callback: names tensors "<name>-<il>" (or "<name>")."""
        return ops.set_name(t, f"{name}-{il}" if il >= 0 else name)

    def _input(self, key: str, t: Tensor, name: str) -> Tensor:
        ops.set_input(ops.set_name(t, name))
        self.inputs[key] = t
        return t

    def inp_embd(self, tok_embd: Tensor, tok_scale: float = 1.0) -> Tensor:
        """Token ids -> embedding rows (GET_ROWS), optionally scaled per row (gemma's inp_scale_rows)."""
        tokens = self._input("tokens", ops.new_tensor_1d(GGMLType.I32, self.n_tokens), "inp_tokens")
        cur = ops.get_rows(tok_embd, tokens)
        if tok_scale != 1.0:
            self.tok_scale = f32(tok_scale)
            rows = self._input("scale_rows", ops.new_tensor_2d(GGMLType.F32, 1, self.n_tokens),
                               "inp_scale_rows")
            cur = ops.mul(cur, rows)
        self.cb(cur, "embd")
        self.graph.expand(cur)
        return cur

    def inp_pos(self) -> Tensor:
        n = self.n_tokens * self.model.n_pos_per_embd
        return self._input("pos", ops.new_tensor_1d(GGMLType.I32, n), "inp_pos")

    def inp_out_ids(self) -> Tensor:
        return self._input("out_ids", ops.new_tensor_1d(GGMLType.I32, self.n_outputs), "out_ids")

    def inp_attn(self) -> list[AttnInput]:
        """k/v index and mask inputs for each cache (base first, then SWA), as build_attn_inp_kv[_iswa]."""
        mask_type = GGMLType.F16 if self.flash_attn else GGMLType.F32
        for i, (cache, n_kv) in enumerate(zip(self.kv.caches, self.n_kv)):
            if not cache.layers:
                continue  # e.g. every layer of the model uses the sliding window
            k_idxs = self._input(f"k_idxs{i}", ops.new_tensor_1d(GGMLType.I64, self.n_tokens), "attn_inp_k_idxs")
            v_idxs = self._input(f"v_idxs{i}", ops.new_tensor_1d(GGMLType.I64, cache.n_v_idxs(self.n_tokens)),
                                 "attn_inp_v_idxs")
            mask = self._input(f"kq_mask{i}", ops.new_tensor_4d(mask_type, n_kv, self.n_tokens, 1, 1),
                               "attn_inp_kq_mask")
            self.attn_inputs.append(AttnInput(cache, n_kv, k_idxs, v_idxs, mask))
        return self.attn_inputs

    def attn_input_for(self, il: int) -> AttnInput:
        cache = self.kv.cache_for(il)
        return next(a for a in self.attn_inputs if a.cache is cache)

    # --- blocks ----------------------------------------------------------------------------------
    def mm(self, w: Tensor, cur: Tensor) -> Tensor:
        """build_lora_mm without adapters."""
        return ops.mul_mat(w, cur)

    def norm(self, cur: Tensor, w: Tensor | None, il: int = -1, eps: float | None = None) -> Tensor:
        """build_norm(LLM_NORM_RMS): RMS_NORM then MUL by the weight."""
        cur = ops.rms_norm(cur, self.hp.rms_eps if eps is None else eps)
        if w is not None:
            self.cb(cur, "norm", il)
            cur = ops.mul(cur, w)
        return cur

    def qkv(self, il: int, cur: Tensor, n_head: int, n_head_kv: int, head_dim: int
            ) -> tuple[Tensor, Tensor, Tensor]:
        """build_qkv, separate Q/K/V path: projections (+ biases), reshaped to (head_dim, heads, tokens)."""
        m, p = self.model, f"blk.{il}."
        out = []
        for part, heads in (("q", n_head), ("k", n_head_kv), ("v", n_head_kv)):
            name = f"{part.upper()}cur"
            t = self.cb(self.mm(m.weights[p + f"attn_{part}.weight"], cur), name, il)
            b = m.w(p + f"attn_{part}.bias")
            if b is not None:
                t = self.cb(ops.add(t, b), name, il)
            out.append(t)
        q, k, v = (ops.reshape_3d(t, head_dim, h, self.n_tokens)
                   for t, h in zip(out, (n_head, n_head_kv, n_head_kv)))
        return self.cb(q, "Qcur", il), self.cb(k, "Kcur", il), self.cb(v, "Vcur", il)

    def rope(self, x: Tensor, pos: Tensor, il: int, *, freq_base: float | None = None,
             freq_scale: float | None = None, factors: Tensor | None = None) -> Tensor:
        hp = self.hp
        return ops.rope_ext(x, pos, factors, hp.n_rot, hp.rope_type, hp.n_ctx_orig,
                            hp.rope_freq_base if freq_base is None else freq_base,
                            hp.rope_freq_scale if freq_scale is None else freq_scale,
                            hp.ext_factor, hp.attn_factor, hp.beta_fast, hp.beta_slow)

    def attn(self, il: int, q_cur: Tensor, k_cur: Tensor, v_cur: Tensor, kq_scale: float, *,
             sinks: Tensor | None = None, iswa_order: bool = False) -> Tensor:
        """build_attn (KV-cache variant): store K/V rows, attend over the cache, project with wo."""
        g, m, p = self.graph, self.model, f"blk.{il}."
        # same expansion order as llama.cpp (q, v, k; the iSWA variant uses q, k, v)
        for t in ((q_cur, k_cur, v_cur) if iswa_order else (q_cur, v_cur, k_cur)):
            g.expand(t)
        inp = self.attn_input_for(il)
        g.expand(inp.cache.cpy_k(k_cur, inp.k_idxs, il))
        g.expand(inp.cache.cpy_v(v_cur, inp.v_idxs, il))
        k, v = inp.cache.get_k(il, inp.n_kv), inp.cache.get_v(il, inp.n_kv)
        cur = self.cb(self.attn_mha(q_cur, k, v, inp.kq_mask, sinks, kq_scale, il), "kqv_out", il)
        cur = self.mm(m.weights[p + "attn_output.weight"], cur)
        b = m.w(p + "attn_output.bias")
        if b is not None:
            cur = ops.add(cur, b)
        return cur

    def attn_mha(self, q: Tensor, k: Tensor, v: Tensor, kq_mask: Tensor, sinks: Tensor | None,
                 kq_scale: float, il: int) -> Tensor:
        """build_attn_mha: flash attention (or KQ -> softmax -> KQV) over permuted Q/K/V."""
        v_trans = v.nb[1] > v.nb[2]
        n_stream = k.ne[3]
        q = ops.view_4d(q, q.ne[0], q.ne[1], q.ne[2] // n_stream, n_stream, q.nb[1], q.nb[2],
                        q.nb[2] * (q.ne[2] // n_stream), 0)
        q, k, v = (ops.permute(t, 0, 2, 1, 3) for t in (q, k, v))
        if self.flash_attn:
            if v_trans:
                v = ops.transpose(v)
            cur = ops.flash_attn_ext(q, k, v, kq_mask, f32(kq_scale), 0.0, 0.0)
            ops.flash_attn_ext_add_sinks(cur, sinks)
            ops.flash_attn_ext_set_n_kv_max(cur, 0)
            ops.flash_attn_ext_set_prec(cur, GGML_PREC_F32)
            cur = ops.reshape_2d(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        else:
            kq = self.cb(ops.mul_mat(k, q), "kq", il)
            ops.mul_mat_set_prec(kq, GGML_PREC_F32)
            kq = ops.soft_max_ext(kq, kq_mask, f32(kq_scale), 0.0)
            ops.soft_max_add_sinks(kq, sinks)
            self.cb(kq, "kq_soft_max", il)
            if not v_trans:
                v = self.cb(ops.cont(ops.transpose(v)), "v_cont", il)
            kqv = self.cb(ops.mul_mat(v, kq), "kqv", il)
            cur = ops.permute(kqv, 0, 2, 1, 3)
            cur = ops.cont_2d(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        self.graph.expand(cur)
        return cur

    def ffn(self, cur: Tensor, il: int, act: str) -> Tensor:
        """build_ffn with a parallel gate: down(act(gate(x)) * up(x)); act 'silu' or 'gelu'."""
        m, p = self.model, f"blk.{il}."
        up = self.cb(self.mm(m.weights[p + "ffn_up.weight"], cur), "ffn_up", il)
        gate = self.cb(self.mm(m.weights[p + "ffn_gate.weight"], cur), "ffn_gate", il)
        if act == "silu":
            cur = self.cb(ops.swiglu_split(gate, up), "ffn_swiglu", il)
        elif act == "gelu":
            cur = self.cb(ops.geglu_split(gate, up), "ffn_geglu", il)
        else:
            raise ValueError(f"unknown FFN activation {act!r}")
        return self.mm(m.weights[p + "ffn_down.weight"], cur)

    def moe_ffn(self, cur: Tensor, il: int, n_expert: int, n_expert_used: int, *, norm_w: bool,
                w_scale: float) -> Tensor:
        """build_moe_ffn with softmax gating and SwiGLU experts (llama/Mixtral, qwen3moe)."""
        g, m, p = self.graph, self.model, f"blk.{il}."
        n_embd, n_tokens = cur.ne[0], cur.ne[1]
        logits = self.cb(self.mm(m.weights[p + "ffn_gate_inp.weight"], cur), "ffn_moe_logits", il)
        probs = self.cb(ops.soft_max(logits), "ffn_moe_probs", il)
        selected = ops.argsort_top_k(probs, n_expert_used)
        self.cb(selected.src[0], "ffn_moe_argsort", il)  # type: ignore[arg-type]
        self.cb(selected, "ffn_moe_topk", il)
        weights = self.cb(ops.get_rows(ops.reshape_3d(probs, 1, n_expert, n_tokens), selected),
                          "ffn_moe_weights", il)
        if norm_w:
            weights = ops.reshape_2d(weights, n_expert_used, n_tokens)
            wsum = self.cb(ops.sum_rows(weights), "ffn_moe_weights_sum", il)
            wsum = self.cb(ops.clamp(wsum, F16_MIN_NORMAL, math.inf), "ffn_moe_weights_sum_clamped", il)
            weights = self.cb(ops.div(weights, wsum), "ffn_moe_weights_norm", il)
            weights = ops.reshape_3d(weights, 1, n_expert_used, n_tokens)
        if w_scale not in (0.0, 1.0):
            weights = self.cb(ops.scale(weights, w_scale), "ffn_moe_weights_scaled", il)
        g.expand(weights)
        cur = ops.reshape_3d(cur, n_embd, 1, n_tokens)
        up = self.cb(ops.mul_mat_id(m.weights[p + "ffn_up_exps.weight"], cur, selected), "ffn_moe_up", il)
        gate = self.cb(ops.mul_mat_id(m.weights[p + "ffn_gate_exps.weight"], cur, selected),
                       "ffn_moe_gate", il)
        act = self.cb(ops.swiglu_split(gate, up), "ffn_moe_swiglu", il)
        experts = self.cb(ops.mul_mat_id(m.weights[p + "ffn_down_exps.weight"], act, selected),
                          "ffn_moe_down", il)
        experts = self.cb(ops.mul(experts, weights), "ffn_moe_weighted", il)
        g.expand(experts)
        views = [ops.view_2d(experts, n_embd, n_tokens, experts.nb[2], i * experts.nb[1])
                 for i in range(n_expert_used)]
        for v in views:
            g.expand(v)
        out = views[0]
        for v in views[1:]:
            out = g.expand(ops.add(out, v))
        if n_expert_used == 1:
            out = ops.cont(out)
        return self.cb(out, "ffn_moe_out", il)

    def output(self, cur: Tensor, *, softcap: float = 0.0, bias: Tensor | None = None) -> Tensor:
        """Final norm and lm_head (+ qwen2's optional output bias, gemma's final logit soft-capping)."""
        m = self.model
        cur = self.cb(self.norm(cur, m.weights["output_norm.weight"]), "result_norm")
        cur = self.mm(m.output_weight(), cur)
        if bias is not None:
            cur = ops.add(cur, bias)
        if softcap:
            cur = ops.scale(cur, f32(1.0 / softcap))
            cur = ops.tanh(cur)
            cur = ops.scale(cur, softcap)
        self.cb(cur, "result_output")
        ops.set_output(cur)
        self.graph.expand(cur)
        return cur
