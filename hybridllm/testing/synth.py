"""Tiny but real-shaped GGUF models for conformance tests.

`write_model(path, arch, weight_type)` writes a random-weight model of the architectures llama, qwen2,
qwen3, qwen3moe and gemma3 with the metadata keys and tensor names llama.cpp requires for each
(src/llama-model.cpp, src/models/<arch>.cpp, src/llama-vocab.cpp), dimensions small enough for CI and
large enough for K-quants (n_embd 256), and a small vocabulary llama.cpp accepts: SPM with byte tokens
for llama/gemma3, byte-level GPT-2 BPE with merges for the qwen family.

Weights are ~N(0, 0.02) with zero-mean blocks. Types gguf can quantize go through `gguf.quants.quantize`;
the others (K-quants, IQ4_*) get random *valid* blocks whose decoded values are zero-mean with the same
spread, built field by field from the block layouts in spec/quant-formats.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")

WEIGHT_TYPES: dict[str, QT] = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16,
    "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
    "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K, "q2_k": QT.Q2_K, "q3_k": QT.Q3_K,
    "iq4_nl": QT.IQ4_NL, "iq4_xs": QT.IQ4_XS, "mxfp4": QT.MXFP4,
}

WEIGHT_STD = 0.02
ROUTER_STD = 0.1   # larger than the weights so the top-k expert choice has clear margins


@dataclass(frozen=True)
class SynthConfig:
    """Dimensions and hyper-parameters of one synthetic model."""
    arch: str
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 512
    n_vocab: int = 512
    n_ctx: int = 512
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    tied_output: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_base_swa: float = 0.0
    extra: dict = field(default_factory=dict)


def default_config(arch: str, n_layer: int = 2) -> SynthConfig:
    """The per-architecture shape: each one exercises the features that distinguish it."""
    if arch == "llama":
        return SynthConfig(arch, n_layer=n_layer)
    if arch == "qwen2":
        return SynthConfig(arch, n_layer=n_layer, qkv_bias=True, tied_output=True, rope_base=1e6)
    if arch == "qwen3":  # head_dim independent of n_embd: q is 512 wide on a 256 model
        return SynthConfig(arch, n_layer=n_layer, head_dim=128, qk_norm=True, rope_base=1e6)
    if arch == "qwen3moe":
        return SynthConfig(arch, n_layer=n_layer, qk_norm=True, rope_base=1e6,
                           n_expert=8, n_expert_used=2, n_ff_exp=256)
    if arch == "gemma3":  # layers alternate sliding-window (window 8) and global attention
        return SynthConfig(arch, n_layer=n_layer, n_head_kv=1, head_dim=128, qk_norm=True,
                           post_norms=True, tied_output=True, rope_base=1e6,
                           sliding_window=8, swa_pattern=2, rope_base_swa=10000.0)
    raise ValueError(f"unknown synthetic architecture {arch!r}; expected one of {', '.join(ARCHS)}")


# ---------------------------------------------------------------------------------------------------
# weights

def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into the 12-byte Q4_K/Q5_K layout."""
    q = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    q[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)   # high bits of scales 4..7 ride in bytes 0..3
    q[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)     # high bits of mins 4..7 ride in bytes 4..7
    q[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return q


def _rand_u8(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, k), dtype=np.uint8)


def _blocks_q2_k(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    sc = rng.integers(1, 16, size=(n, 16), dtype=np.uint8)
    d = std / (8.0 * 1.118)  # mean scale 8, std of a uniform 2-bit code 1.118
    # y = d*sc*q - dmin*m with m = sc and dmin = 1.5 d: zero mean over q uniform in 0..3
    return np.hstack([sc | (sc << 4), _rand_u8(rng, n, 64), _f16(np.full(n, d)), _f16(np.full(n, 1.5 * d))])


def _blocks_q3_k(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    d = std / (16.0 * 2.29)  # signed 6-bit scales (mean |s| 16) times codes -4..3
    return np.hstack([_rand_u8(rng, n, 32), _rand_u8(rng, n, 64), _rand_u8(rng, n, 12), _f16(np.full(n, d))])


def _blocks_q45_k(rng: np.random.Generator, n: int, std: float, bits: int) -> np.ndarray:
    levels = 1 << bits
    sc = rng.integers(1, 64, size=(n, 8), dtype=np.uint8)
    ratio = (levels - 1) / 2 / (levels // 2)  # zero mean: dmin*m = d*sc*mean(q), with dmin = (levels/2) d
    m = np.minimum(np.rint(sc * ratio), 63).astype(np.uint8)
    d = std / (32.0 * levels / np.sqrt(12.0))
    parts = [_f16(np.full(n, d)), _f16(np.full(n, d * (levels // 2))), _pack_k_scales(sc, m)]
    if bits == 5:
        parts.append(_rand_u8(rng, n, 32))
    parts.append(_rand_u8(rng, n, 128))
    return np.hstack(parts)


def _blocks_q6_k(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    sc = rng.integers(1, 64, size=(n, 16)) * rng.choice([-1, 1], size=(n, 16))
    d = std / (32.0 * 18.5)
    return np.hstack([_rand_u8(rng, n, 128), _rand_u8(rng, n, 64), sc.astype(np.int8).view(np.uint8),
                      _f16(np.full(n, d))])


def _blocks_iq4_nl(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    d = std / 66.0 * rng.choice([-1.0, 1.0], size=n)  # random sign cancels the table's slight negative mean
    return np.hstack([_f16(d), _rand_u8(rng, n, 16)])


def _blocks_iq4_xs(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    d = std / (16.0 * 66.0)  # sub-block scales (ls - 32) are symmetric around zero
    return np.hstack([_f16(np.full(n, d)), _rand_u8(rng, n, 2), _rand_u8(rng, n, 4), _rand_u8(rng, n, 128)])


_BLOCK_MAKERS: dict[QT, Callable[[np.random.Generator, int, float], np.ndarray]] = {
    QT.Q2_K: _blocks_q2_k,
    QT.Q3_K: _blocks_q3_k,
    QT.Q4_K: lambda rng, n, std: _blocks_q45_k(rng, n, std, 4),
    QT.Q5_K: lambda rng, n, std: _blocks_q45_k(rng, n, std, 5),
    QT.Q6_K: _blocks_q6_k,
    QT.IQ4_NL: _blocks_iq4_nl,
    QT.IQ4_XS: _blocks_iq4_xs,
}


def random_blocks(rng: np.random.Generator, qtype: QT, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Random valid blocks of `qtype` for a tensor of numpy `shape` (last axis = ne0): uint8 byte array."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block}, got {shape[-1]}")
    n_blocks = int(np.prod(shape)) // block
    raw = _BLOCK_MAKERS[qtype](rng, n_blocks, std)
    assert raw.shape == (n_blocks, size), (qtype.name, raw.shape)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def random_weight(rng: np.random.Generator, shape: tuple[int, ...], qtype: QT,
                  std: float = WEIGHT_STD) -> np.ndarray:
    """A weight of numpy `shape` stored as `qtype`: float arrays for F32/F16, raw bytes otherwise."""
    if qtype in _BLOCK_MAKERS:
        return random_blocks(rng, qtype, shape, std)
    x = rng.normal(0.0, std, size=shape).astype(np.float32)
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    return quantize(x, qtype)


def _norm_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# vocabularies

_WORDS = ("the of and to in is it you that he was for on are as with his they at be this have from or one "
          "had by word but not what all were we when your can said there use an each which she do how their "
          "if will up other about out many then them these so some her would make like him into time has look "
          "two more write go see number no way could people my than first water been call who oil its now find "
          "long down day did get come made may part hello world model tensor layer token").split()


def _pieces(words: tuple[str, ...] | list[str], prefix: str) -> list[str]:
    """Prefix-closed pieces (every piece's one-shorter prefix is a piece too), so tokenizers can reach them."""
    seen: dict[str, None] = {}
    for w in words:
        for i in range(2, len(w) + 1):
            seen.setdefault(prefix + w[:i] if prefix else w[:i], None)
    return list(seen)


def spm_vocab(n_vocab: int, gemma: bool) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """SPM vocabulary: specials, the 256 byte tokens, letters and prefix-closed word pieces."""
    T = gguf.TokenType
    if gemma:
        specials = [("<pad>", T.CONTROL), ("<eos>", T.CONTROL), ("<bos>", T.CONTROL), ("<unk>", T.UNKNOWN),
                    ("<start_of_turn>", T.CONTROL), ("<end_of_turn>", T.CONTROL)]
        ids = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    else:
        specials = [("<unk>", T.UNKNOWN), ("<s>", T.CONTROL), ("</s>", T.CONTROL)]
        ids = {"unk": 0, "bos": 1, "eos": 2}
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(k) for _, k in specials] + [int(T.BYTE)] * 256
    normal = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    normal += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    normal += _pieces(_WORDS, "\u2581") + _pieces(_WORDS, "")
    normal = [p for p in dict.fromkeys(normal) if p not in tokens]
    room = n_vocab - len(tokens)
    if room < 64:
        raise ValueError(f"n_vocab {n_vocab} too small for an SPM vocabulary")
    normal = normal[:room] + [f"\u2581x{i}" for i in range(room - len(normal[:room]))]
    tokens += normal
    types += [int(T.NORMAL)] * len(normal)
    scores = [0.0] * (n_vocab - len(normal)) + [-float(i) for i in range(len(normal))]
    return tokens, scores, types, ids


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """Byte-level BPE vocabulary (qwen style): bytes, merged pieces built by the merges, three specials."""
    T = gguf.TokenType
    b2u = _byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    have = set(tokens)
    merges: list[str] = []
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    room = n_vocab - len(specials)
    words = [b2u[ord(" ")] + w for w in _WORDS] + list(_WORDS)
    for w in words:
        cur = w[0]
        for ch in w[1:]:
            nxt = cur + ch
            if nxt not in have and len(tokens) < room:
                merges.append(f"{cur} {ch}")
                tokens.append(nxt)
                have.add(nxt)
            if nxt not in have:
                break
            cur = nxt
    tokens += [f"[PAD{i}]" for i in range(room - len(tokens))]
    types = [int(T.NORMAL)] * len(tokens) + [int(T.CONTROL)] * len(specials)
    ids = {"eos": len(tokens), "bos": len(tokens)}
    tokens += specials
    return tokens, types, merges, ids


# ---------------------------------------------------------------------------------------------------
# model

def _write_metadata(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    w.add_name(f"synthetic-{c.arch}")
    w.add_context_length(c.n_ctx)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.rms_eps)
    if c.n_expert:
        w.add_expert_count(c.n_expert)
        w.add_expert_used_count(c.n_expert_used)
        w.add_expert_feed_forward_length(c.n_ff_exp)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern(c.swa_pattern)
        w.add_rope_freq_base_swa(c.rope_base_swa)
    for key, value in c.extra.items():
        w.add_key_value(key, value[0], value[1])


def _write_vocab(w: gguf.GGUFWriter, c: SynthConfig) -> None:
    if c.arch in ("llama", "gemma3"):
        tokens, scores, types, ids = spm_vocab(c.n_vocab, gemma=c.arch == "gemma3")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        w.add_unk_token_id(ids["unk"])
        if "pad" in ids:
            w.add_pad_token_id(ids["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(c.arch != "gemma3")
    else:
        tokens, types, merges, ids = bpe_vocab(c.n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        w.add_add_bos_token(False)


def model_tensors(c: SynthConfig, qtype: QT, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, QT]]:
    """Every tensor of the model: name -> (data, type); numpy shapes are ggml's ne reversed."""
    E, F, V, H = c.n_embd, c.n_ff, c.n_vocab, c.head_dim
    q_dim, kv_dim = c.n_head * H, c.n_head_kv * H
    out: dict[str, tuple[np.ndarray, QT]] = {}

    def mat(name: str, *shape: int, std: float = WEIGHT_STD) -> None:
        out[name] = (random_weight(rng, shape, qtype, std), qtype)

    def f32(name: str, data: np.ndarray) -> None:
        out[name] = (data.astype(np.float32), QT.F32)

    mat("token_embd.weight", V, E)
    f32("output_norm.weight", _norm_weight(rng, E))
    if not c.tied_output:
        mat("output.weight", V, E)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", _norm_weight(rng, E))
        mat(p + "attn_q.weight", q_dim, E)
        mat(p + "attn_k.weight", kv_dim, E)
        mat(p + "attn_v.weight", kv_dim, E)
        mat(p + "attn_output.weight", E, q_dim)
        if c.qkv_bias:
            for n, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                f32(p + f"attn_{n}.bias", rng.normal(0.0, WEIGHT_STD, dim))
        if c.qk_norm:
            f32(p + "attn_q_norm.weight", _norm_weight(rng, H))
            f32(p + "attn_k_norm.weight", _norm_weight(rng, H))
        if c.post_norms:
            f32(p + "post_attention_norm.weight", _norm_weight(rng, E))
            f32(p + "post_ffw_norm.weight", _norm_weight(rng, E))
        f32(p + "ffn_norm.weight", _norm_weight(rng, E))
        if c.n_expert:
            X, FE = c.n_expert, c.n_ff_exp
            f32(p + "ffn_gate_inp.weight", rng.normal(0.0, ROUTER_STD, (X, E)))  # routers stay F32
            mat(p + "ffn_gate_exps.weight", X, FE, E)
            mat(p + "ffn_up_exps.weight", X, FE, E)
            mat(p + "ffn_down_exps.weight", X, E, FE)
        else:
            mat(p + "ffn_gate.weight", F, E)
            mat(p + "ffn_up.weight", F, E)
            mat(p + "ffn_down.weight", E, F)
    return out


def write_model(path: str | Path, arch: str, weight_type: str = "q8_0", n_layer: int = 2, seed: int = 0,
                **overrides: object) -> Path:
    """Write a synthetic `arch` model with its matrices stored as `weight_type`; returns the path."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {', '.join(WEIGHT_TYPES)}")
    config = replace(default_config(arch, n_layer), **overrides)  # type: ignore[arg-type]
    qtype = WEIGHT_TYPES[weight_type]
    rng = np.random.default_rng([seed, ARCHS.index(arch), int(qtype)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _write_metadata(writer, config)
    _write_vocab(writer, config)
    for name, (data, dtype) in model_tensors(config, qtype, rng).items():
        writer.add_tensor(name, data, raw_dtype=None if dtype in (QT.F32, QT.F16) else dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)  # atomic: parallel test workers never see a half-written model
    return path


def model_path(root: str | Path, arch: str, weight_type: str, n_layer: int = 2, seed: int = 0) -> Path:
    """Path of the cached model with these parameters under `root`, written on first use."""
    path = Path(root) / f"synth-{arch}-{weight_type}-L{n_layer}-s{seed}.gguf"
    if not path.exists():
        write_model(path, arch, weight_type, n_layer=n_layer, seed=seed)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write a synthetic GGUF model")
    ap.add_argument("path")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--type", dest="weight_type", choices=list(WEIGHT_TYPES), default="q8_0")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_model(args.path, args.arch, args.weight_type, n_layer=args.layers, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
