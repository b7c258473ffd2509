"""A GGUF vocabulary as llama.cpp loads it (src/llama-vocab.cpp `llama_vocab::impl::load`).

Reads the `tokenizer.ggml.*` metadata, applies llama.cpp's defaults per tokenizer model and pre-tokenizer,
its special-token id checks, its text-based detection of EOT/EOM/FIM tokens and of the end-of-generation
set, and its per-token attribute fix-ups, so that tokenization sees exactly the same vocabulary.
"""
from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybridllm.engine import tokenizer_unicode as tu

TOKEN_NULL = -1


class TokenAttr(enum.IntFlag):
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# GGUF token types (llama_token_type) -> attributes
_TYPE_ATTR = {0: TokenAttr.UNDEFINED, 1: TokenAttr.NORMAL, 2: TokenAttr.UNKNOWN, 3: TokenAttr.CONTROL,
              4: TokenAttr.USER_DEFINED, 5: TokenAttr.UNUSED, 6: TokenAttr.BYTE}
_TYPE_ATTR_INT = {k: int(v) for k, v in _TYPE_ATTR.items()}
# plain ints for the per-token loops (IntFlag arithmetic is ~50x slower)
_CONTROL, _USER, _UNKNOWN, _UNUSED = (int(TokenAttr.CONTROL), int(TokenAttr.USER_DEFINED),
                                      int(TokenAttr.UNKNOWN), int(TokenAttr.UNUSED))

_GPT2 = tu._GPT2_RE
_LLAMA3 = tu._LLAMA3_RE
_QWEN2 = tu._QWEN2_RE
_PRE_REGEXES: dict[str, list[str]] = {
    "default": ["[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [tu._QWEN35_RE],
    "starcoder": ["\\p{N}", _GPT2],
    "falcon": ["[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "deepseek-coder": ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"],
}
# tokenizer.ggml.pre -> (regex family, overrides of the BPE defaults)
_PRE_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("default", {}),
    **{n: ("llama3", {"ignore_merges": True, "add_bos": True}) for n in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")},
    "dbrx": ("llama3", {}), "smaug-bpe": ("llama3", {}),
    "chatglm-bpe": ("llama3", {"bos": TOKEN_NULL}),
    "glm4": ("llama3", {"bos": TOKEN_NULL, "ignore_merges": True}),
    **{n: ("gpt2", {}) for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                                 "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4")},
    **{n: ("qwen2", {"clean_spaces": False}) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")},
    "megrez": ("qwen2", {}), "stablelm2": ("qwen2", {}),
    "qwen35": ("qwen35", {"clean_spaces": False}),
    **{n: ("starcoder", {}) for n in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b")},
    "command-r": ("starcoder", {"clean_spaces": False}), "smollm": ("starcoder", {"clean_spaces": False}),
    "falcon": ("falcon", {}),
    "deepseek-coder": ("deepseek-coder", {"clean_spaces": False}),
}

_SPECIAL_KEYS = (  # (gguf key suffix, Vocab attribute); the deprecated FIM keys come last, as in llama.cpp
    ("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
    ("unknown_token_id", "unk"), ("seperator_token_id", "sep"), ("padding_token_id", "pad"),
    ("mask_token_id", "mask"), ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"),
    ("fim_mid_token_id", "fim_mid"), ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"),
    ("fim_sep_token_id", "fim_sep"), ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"),
    ("middle_token_id", "fim_mid"),
)
_DETECT = {  # special id left unset by the GGUF -> token texts that stand for it
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))


class VocabError(ValueError):
    """The GGUF's tokenizer metadata is missing, malformed or of an unsupported kind."""


@dataclass
class Vocab:
    model: str                      # "llama" (SPM) or "gpt2" (byte-level BPE)
    pre: str                        # pre-tokenizer name, "default" for SPM
    tokens: list[str]               # token texts (UTF-8, undecodable bytes kept as surrogate escapes)
    scores: list[float]
    attrs: list[int]                # TokenAttr bits per token
    token_to_id: dict[str, int]
    bpe_ranks: dict[tuple[str, str], int] = field(default_factory=dict)
    pre_regexes: list[str] = field(default_factory=list)
    bos: int = TOKEN_NULL
    eos: int = TOKEN_NULL
    eot: int = TOKEN_NULL
    eom: int = TOKEN_NULL
    unk: int = TOKEN_NULL
    sep: int = TOKEN_NULL
    pad: int = TOKEN_NULL
    mask: int = TOKEN_NULL
    fim_pre: int = TOKEN_NULL
    fim_suf: int = TOKEN_NULL
    fim_mid: int = TOKEN_NULL
    fim_pad: int = TOKEN_NULL
    fim_rep: int = TOKEN_NULL
    fim_sep: int = TOKEN_NULL
    add_bos: bool = False
    add_eos: bool = False
    add_sep: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    escape_whitespaces: bool = True
    ignore_merges: bool = False
    remove_extra_whitespaces: bool = False
    eog_ids: frozenset[int] = frozenset()
    special_ids: list[int] = field(default_factory=list)   # parsed out of text, longest first

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _default_settings(model: str, pre: str) -> dict[str, Any]:
    if model == "llama":
        return {"bos": 1, "eos": 2, "unk": 0, "add_space_prefix": True, "clean_spaces": False, "add_bos": True,
                "escape_whitespaces": True, "pre_regexes": []}
    if model != "gpt2":
        raise VocabError(f"unsupported tokenizer model {model!r} (supported: 'llama' (SPM), 'gpt2' (BPE))")
    name = pre or "default"
    if name not in _PRE_NAMES:
        raise VocabError(f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(_PRE_NAMES))})")
    family, overrides = _PRE_NAMES[name]
    settings: dict[str, Any] = {"bos": 11, "eos": 11, "add_space_prefix": False, "escape_whitespaces": False,
                                "clean_spaces": True, "pre_regexes": list(_PRE_REGEXES[family])}
    settings.update(overrides)
    return settings


def _read_merges(merges: list[str]) -> dict[tuple[str, str], int]:
    ranks: dict[tuple[str, str], int] = {}
    for i, merge in enumerate(merges):
        pos = merge.find(" ", 1)
        pair = (merge[:pos], merge[pos + 1:]) if pos >= 0 else ("", "")
        ranks.setdefault(pair, i)  # the first occurrence of a pair keeps its rank
    return ranks


def build_vocab(meta: Mapping[str, Any]) -> Vocab:
    """Build the vocabulary from tokenizer metadata (keys as in the GGUF, arrays as lists or numpy arrays)."""
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise VocabError("GGUF has no tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre") or ""
    settings = _default_settings(model, pre)
    raw_tokens = meta.get("tokenizer.ggml.tokens")
    if raw_tokens is None or len(raw_tokens) == 0:
        raise VocabError("GGUF has no tokenizer.ggml.tokens")
    tokens = [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else str(t) for t in raw_tokens]
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    n = len(tokens)
    scores = _array(meta, "tokenizer.ggml.scores", n, np.float32)
    types = _array(meta, "tokenizer.ggml.token_type", n, np.int32)
    attrs = [_TYPE_ATTR_INT.get(t, 0) for t in types.tolist()] if types is not None \
        else [int(TokenAttr.NORMAL)] * n
    vocab = Vocab(model=model, pre=pre or "default", tokens=tokens,
                  scores=scores.tolist() if scores is not None else [0.0] * n, attrs=attrs,
                  token_to_id={t: i for i, t in enumerate(tokens)})
    for key, value in settings.items():
        setattr(vocab, key, value)
    if model == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise VocabError("BPE GGUF has no tokenizer.ggml.merges")
        vocab.bpe_ranks = _read_merges([m.decode("utf-8", "surrogateescape") if isinstance(m, bytes) else m
                                        for m in merges])
    for key in ("add_space_prefix", "remove_extra_whitespaces"):
        if f"tokenizer.ggml.{key}" in meta:
            setattr(vocab, key, bool(meta[f"tokenizer.ggml.{key}"]))
    _load_special_ids(vocab, meta)
    _detect_special_tokens(vocab)
    _build_eog(vocab)
    _name_fixups(vocab, meta)
    specials = [i for i, a in enumerate(vocab.attrs) if a & (_CONTROL | _USER | _UNKNOWN)]
    vocab.special_ids = sorted(specials, key=lambda i: -len(vocab.tokens[i].encode("utf-8", "surrogateescape")))
    return vocab


def _array(meta: Mapping[str, Any], key: str, n: int, dtype: type) -> np.ndarray | None:
    if key not in meta:
        return None
    arr = np.asarray(meta[key])
    if arr.ndim != 1 or len(arr) < n:
        raise VocabError(f"{key}: expected {n} entries, got {arr.shape}")
    return arr[:n].astype(dtype)


def _load_special_ids(vocab: Vocab, meta: Mapping[str, Any]) -> None:
    n = vocab.n_tokens
    for suffix, attr in _SPECIAL_KEYS:
        current = getattr(vocab, attr)
        if current >= n:
            setattr(vocab, attr, current := TOKEN_NULL)
        value = meta.get(f"tokenizer.ggml.{suffix}")
        if value is not None and 0 <= int(value) < n:
            setattr(vocab, attr, int(value))
    for key in ("add_bos", "add_eos", "add_sep"):
        if f"tokenizer.ggml.{key}_token" in meta:
            setattr(vocab, key, bool(meta[f"tokenizer.ggml.{key}_token"]))


def _force_control(vocab: Vocab, tid: int) -> None:
    vocab.attrs[tid] |= _CONTROL


def _detect_special_tokens(vocab: Vocab) -> None:
    """Find unset EOT/EOM/FIM ids by their text (llama.cpp's workaround), then mark 'unused' control tokens."""
    for attr, texts in _DETECT.items():
        if getattr(vocab, attr) != TOKEN_NULL:
            continue
        found = sorted(vocab.token_to_id[t] for t in texts if t in vocab.token_to_id)
        if found:  # llama.cpp takes the first in hash-map order; we take the lowest id
            setattr(vocab, attr, found[0])
            _force_control(vocab, found[0])
    for i, text in enumerate(vocab.tokens):
        if vocab.attrs[i] & _CONTROL and "unused" in text:
            vocab.attrs[i] |= _UNUSED


def _build_eog(vocab: Vocab) -> None:
    eog = {t for t in (vocab.fim_pad, vocab.fim_rep, vocab.fim_sep) if t != TOKEN_NULL}
    for text in _EOG_TEXTS:
        tid = vocab.token_to_id.get(text)
        if tid is not None:
            eog.add(tid)
            _force_control(vocab, tid)
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
        if text in vocab.token_to_id:
            vocab.attrs[vocab.token_to_id[text]] = int(TokenAttr.USER_DEFINED)
    eog |= {t for t in (vocab.eos, vocab.eot, vocab.eom) if t != TOKEN_NULL}
    texts = {vocab.tokens[t]: t for t in eog if 0 <= t < vocab.n_tokens}
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        eog.discard(texts["<|end|>"])  # harmony / solar-open: <|end|> ends a message, not the generation
        vocab.attrs[texts["<|end|>"]] = int(TokenAttr.USER_DEFINED)
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        vocab.attrs[texts["</s>"]] = int(TokenAttr.NORMAL)
    vocab.eog_ids = frozenset(eog)


def _name_fixups(vocab: Vocab, meta: Mapping[str, Any]) -> None:
    """Per-model strip attributes that llama.cpp sets by model or pre-tokenizer name."""
    name = str(meta.get("general.name", "")).lower()
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    arch = str(meta.get("general.architecture", ""))
    tid = vocab.token_to_id
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code", "mmbert")) or \
            any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
        if "<mask>" in tid:
            vocab.attrs[tid["<mask>"]] |= int(TokenAttr.LSTRIP)
    elif "phi-3" in name or "phi3" in name:
        for i, a in enumerate(vocab.attrs):
            if a & (_CONTROL | _USER | _UNKNOWN):
                vocab.attrs[i] |= int(TokenAttr.RSTRIP)
        for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            if text in tid:
                rstrip = int(TokenAttr.RSTRIP)
                attr = vocab.attrs[tid[text]]
                vocab.attrs[tid[text]] = (attr | rstrip) if on else (attr & ~rstrip)
    elif "modern-bert" in name and "[MASK]" in tid:
        vocab.attrs[tid["[MASK]"]] |= int(TokenAttr.LSTRIP)


# --- GGUF reading ---------------------------------------------------------------------------------------

def read_tokenizer_metadata(reader: Any) -> dict[str, Any]:
    """The tokenizer-related keys of a `gguf.GGUFReader` as Python values (fast paths for the big arrays)."""
    from gguf import GGUFValueType

    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if not (key.startswith("tokenizer.") or key in ("general.name", "general.architecture")):
            continue
        types = fld.types
        if types and types[0] == GGUFValueType.ARRAY:
            if len(types) > 1 and types[1] == GGUFValueType.STRING:
                meta[key] = [bytes(fld.parts[i]) for i in fld.data]
            elif len(fld.data) == 0:
                meta[key] = np.zeros(0)
            else:
                meta[key] = _contiguous_array(reader, fld)
        elif types and types[0] == GGUFValueType.STRING:
            meta[key] = bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")
        else:
            meta[key] = fld.parts[fld.data[0]][0].item() if fld.data else None
    return meta


def _contiguous_array(reader: Any, fld: Any) -> np.ndarray:
    """A numeric GGUF array as one view: its elements are adjacent in the file, so slice the mapping once."""
    first = fld.parts[fld.data[0]]
    base = reader.data
    offset = first.ctypes.data - base.ctypes.data
    count = len(fld.data)
    if not 0 <= offset <= base.nbytes - count * first.itemsize:
        return np.concatenate([fld.parts[i] for i in fld.data])
    return np.frombuffer(base, dtype=first.dtype, count=count, offset=offset)


def load_vocab(source: Any) -> Vocab:
    """Vocab from a GGUF path, an open `gguf.GGUFReader`, an object with a `metadata` mapping (such as
    `hybridllm.engine.gguf_file.GGUFFile`), or a metadata mapping."""
    if isinstance(source, Mapping):
        return build_vocab(source)
    if isinstance(getattr(source, "metadata", None), Mapping):
        return build_vocab(source.metadata)
    if isinstance(source, (str, os.PathLike)):
        from gguf import GGUFReader

        try:
            source = GGUFReader(source)
        except (OSError, ValueError) as exc:
            raise VocabError(f"cannot read GGUF {os.fspath(source)!r}: {exc}") from exc
    return build_vocab(read_tokenizer_metadata(source))
