"""Our tokenizer against llama.cpp's (the real peer, loaded vocab-only in-process): same ids for a corpus of
hard strings with every add_special/parse_special combination, same detokenized bytes, same pieces.

Vocabularies: the real Gemma 3 270M (SPM, 262144 tokens) and byte-level BPE vocabularies built here from
merges over a text corpus and written as tiny `qwen2`-architecture GGUFs with several pre-tokenizers
(qwen2, llama-bpe, gpt-2, default, ...). llama.cpp is the oracle for every expected id.
"""
from __future__ import annotations

import collections
import inspect
import json.decoder
import random
import textwrap
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from hybridllm.engine import tokenizer_unicode as tu
from hybridllm.engine.tokenizer import StreamDecoder, Tokenizer, VocabError

HARD_STRINGS = [
    "", " ", "  ", "\n", "\t", "a", "Hello world", "Hello, World!", "  leading spaces", "trailing spaces   ",
    "It's I'M we'Re you'Ve they'LL he'D she's 'll 'd 's 't 're 've 'm '", "don't won't can't y'all",
    "a \n b", "a\n\n\nb", "\r\n", "line1\r\nline2\rline3", " \t \n ", "\t\tindented\n\t\t\tmore",
    "x\u00a0y\u3000z\u2028w\u2029v\u0085u", "\x0b\x0c vertical", "\x1c\x1d\x1e\x1f sep chars",
    "1", "12", "123", "1234", "1234567890123", "3.14159", "1,000,000", "-42e-7", "٣٤٥ ٠١٢", "x² y³ ½ ⅔", "Ⅻ Ⅷ ⅷ",
    "日本語のテキストです。", "中文文本和汉字", "한국어 텍스트", "Hello世界123", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ",
    "مرحبا بالعالم", "שלום עולם", "Ελληνικά κείμενα", "Привет, мир!", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "e\u0301 a\u0308\u0304 o\u0323\u0302", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334",
    "\u0301 leading combining mark", "ﬁ ﬂ ß ẞ İstanbul \u212a ǅ",
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦 family", "🇺🇸🇫🇷🇯🇵", "🏳️\u200d🌈 flag", "1️⃣ keycap", "❤️ heart",
    "\U0001FAE8 shaking face", "\U00031350\U00031351 ext-H", "\U00011F04\U00011F05 kawi", "\U0001FAE9 unicode16",
    "def f(x: int) -> int:\n    return x ** 2  # square\n", "int main(void) { return 0; }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', '<div class="x">text</div>', "</s><s>",
    "https://example.com/path?q=1&r=two#frag", "!@#$%^&*()_+-=[]{}|;':\",./<>?`~", "...", "?!", " ' ", " ,",
    "x ' ' y ' 's ' 're z 've 'll 't 'd 'm ,a .b ?c !d", "' '  ' '",
    "\u2581 literal lower one eighth", "<0x41> literal byte text", "\x00\x01\x02 controls \x7f", "\u200b\u200c\ufeff",
    "x" * 500, "ab" * 300, "9" * 100, " " * 100, "\n" * 40, "\t" * 40, "a" + " " * 7 + "b", "word" * 50 + "!",
]
GEMMA_SPECIAL = [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "<bos><bos>", "<eos>",
    "x<eos>y", "<unused12> and <mask>", "[multimodal]", "<start_of_image><end_of_image>", "<start_of_tur",
    "<end_of_turn><end_of_turn>", "<pad><unk>", "a<b>c</b> <div>x</div> <table><tr>", "  <start_of_turn>  ",
]
BPE_SPECIAL = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<think>\nhmm\n</think>\n\nok", "<|endoftext|>",
    "x<|im_end|>y", "<|im_start|><|im_start|>", "<|fim_prefix|>code<tool_call>", "<|im_sta", " <think> ",
]
_POOL = [*HARD_STRINGS[:60], *GEMMA_SPECIAL, *BPE_SPECIAL, " ", "  ", "\n", "\t", "'", "s", "0", "é", "あ", "🙂"]


def random_strings(n: int, seed: int) -> list[str]:
    """Concatenations of random pool pieces and random code points (fixed seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.3:
                cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x3000, 0xD7FF),
                                 rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x3FFFF)])
                parts.append(chr(cp) * rng.randint(1, 3))
            else:
                piece = rng.choice(_POOL)
                parts.append(piece[:rng.randint(1, max(1, len(piece)))] if rng.random() < 0.3 else piece)
        out.append("".join(parts))
    return out


def big_text() -> str:
    """About 4-5k tokens of mixed prose and code."""
    return (inspect.getsource(json.decoder) + "\n".join(HARD_STRINGS[:80]) + inspect.getsource(textwrap))[:16000]


# --- the peer, vocab-only ---------------------------------------------------------------------------------

class PeerVocab:
    """llama.cpp's tokenizer through the C API on a vocab-only model."""

    def __init__(self, lcp: Any, path: Path) -> None:
        self.lib, self.ffi = lcp._cffi_bindings.get_lib(), lcp._cffi_bindings.get_ffi()
        self.lib.llama_backend_init()
        params = self.lib.llama_model_default_params()
        params.vocab_only = True
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), params)
        assert self.model != self.ffi.NULL, f"peer cannot load {path}"
        self.vocab = self.lib.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        cap = len(data) + 16
        buf = self.ffi.new(f"llama_token[{cap}]")
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        assert n >= 0
        return list(buf[0:n])

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = self.ffi.new(f"llama_token[{max(1, len(ids))}]", ids)
        cap = 64 * len(ids) + 16
        buf = self.ffi.new(f"char[{cap}]")
        n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        assert n >= 0
        return bytes(self.ffi.buffer(buf, n))

    def piece(self, token: int, special: bool) -> bytes:
        buf = self.ffi.new("char[512]")
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 512, 0, special)
        assert n >= 0
        return bytes(self.ffi.buffer(buf, n))

    def close(self) -> None:
        self.lib.llama_model_free(self.model)


def compare_corpus(tok: Tokenizer, peer: PeerVocab, corpus: list[str]) -> list[str]:
    """Every mismatch (tokenize in 4 modes, detokenize in 4 modes) as a readable line."""
    bad = []
    for text in corpus:
        for add in (True, False):
            for special in (True, False):
                ours, theirs = tok.tokenize(text, add, special), peer.tokenize(text, add, special)
                if ours != theirs:
                    bad.append(f"tokenize({text[:40]!r}, {add}, {special}): {ours[:12]} != {theirs[:12]}")
        ids = peer.tokenize(text, True, True)
        for remove in (True, False):
            for unparse in (True, False):
                ours_b, theirs_b = tok.detokenize(ids, remove, unparse), peer.detokenize(ids, remove, unparse)
                if ours_b != theirs_b:
                    bad.append(f"detokenize({text[:40]!r}, {remove}, {unparse}): {ours_b[:40]!r} != {theirs_b[:40]!r}")
    return bad


# --- Gemma (SPM) -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_pair(peer: Any, gemma_path: Path) -> Any:
    reader = gguf.GGUFReader(gemma_path)
    pv = PeerVocab(peer, gemma_path)
    yield Tokenizer.from_gguf(reader), pv
    pv.close()


def test_gemma_corpus_ids_and_text_match_peer(gemma_pair: Any) -> None:
    tok, pv = gemma_pair
    corpus = HARD_STRINGS + GEMMA_SPECIAL + random_strings(300, seed=1)
    bad = compare_corpus(tok, pv, corpus)
    assert not bad, f"{len(bad)} mismatches over {len(corpus)} strings:\n" + "\n".join(bad[:20])


def test_gemma_vocab_facts_match_peer(gemma_pair: Any) -> None:
    tok, pv = gemma_pair
    lib = pv.lib
    assert tok.n_vocab == lib.llama_vocab_n_tokens(pv.vocab) == 262144
    assert (tok.bos_id, tok.eos_id) == (lib.llama_vocab_bos(pv.vocab), lib.llama_vocab_eos(pv.vocab))
    peer_eog = {t for t in range(tok.n_vocab) if lib.llama_vocab_is_eog(pv.vocab, t)}
    assert tok.eog_ids == peer_eog and {1, 106} <= peer_eog  # <eos>, <end_of_turn>
    attrs = [lib.llama_vocab_get_attr(pv.vocab, t) for t in range(0, tok.n_vocab, 97)]
    assert [tok.vocab.attrs[t] for t in range(0, tok.n_vocab, 97)] == attrs


def test_gemma_every_piece_matches_peer(gemma_pair: Any) -> None:
    tok, pv = gemma_pair
    for special in (True, False):
        bad = [t for t in range(tok.n_vocab) if tok.token_to_piece(t, special) != pv.piece(t, special)]
        assert not bad, f"special={special}: {len(bad)} pieces differ, first ids {bad[:10]}"


def test_gemma_long_prompt_is_fast_and_exact(gemma_pair: Any) -> None:
    tok, pv = gemma_pair
    text = big_text()
    start = time.perf_counter()
    ids = tok.tokenize(text, True, True)
    elapsed = time.perf_counter() - start
    assert ids == pv.tokenize(text, True, True)
    assert len(ids) >= 4000 and elapsed < 1.0, (len(ids), elapsed)


# --- byte-level BPE vocabularies built here ---------------------------------------------------------------

def _training_text() -> str:
    return "\n".join(HARD_STRINGS[:70]) * 2 + inspect.getsource(json.decoder) + inspect.getsource(textwrap)


def build_bpe_gguf(path: Path, pre: str, add_bos: bool | None = False, chat_template: str | None = None) -> None:
    """A byte-level BPE vocab (256 byte tokens + left-to-right merges of frequent words + specials) in a
    tiny qwen2-architecture GGUF (metadata only; llama.cpp loads it vocab-only)."""
    splitter = tu.PreTokenizer([tu._QWEN2_RE])
    words = collections.Counter(tu.byte_encode(w) for w in splitter.split(_training_text()))
    freq: dict[tuple[str, str], int] = {}
    for word, count in words.items():
        acc = word[0]
        for ch in word[1:]:
            freq[(acc, ch)] = freq.get((acc, ch), 0) + count
            acc += ch
    merges = sorted(freq, key=lambda m: (len(m[0]) + len(m[1]), -freq[m], m))
    tokens = list(dict.fromkeys([*tu.BYTE_TO_CHAR, *(a + b for a, b in merges)]))
    extra = ["Ġsupercalifragilistic", "ĠunreachableWord"]  # whole words without merges (ignore_merges)
    specials = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4),
                ("<|fim_prefix|>", 3), ("<tool_call>", 4)]
    types = [1] * (len(tokens) + len(extra)) + [t for _, t in specials]
    tokens += extra + [s for s, _ in specials]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


BPE_CASES = [("qwen2", False), ("llama-bpe", None), ("gpt-2", False), ("default", True), ("starcoder", False),
             ("falcon", False), ("deepseek-coder", False), ("qwen35", False), ("command-r", False)]


@pytest.mark.parametrize("pre,add_bos", BPE_CASES)
def test_bpe_corpus_matches_peer(peer: Any, tmp_path: Path, pre: str, add_bos: bool | None) -> None:
    path = tmp_path / f"bpe-{pre}.gguf"
    build_bpe_gguf(path, pre, add_bos)
    pv = PeerVocab(peer, path)
    try:
        tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
        assert tok.n_vocab == pv.lib.llama_vocab_n_tokens(pv.vocab) > 1000
        corpus = HARD_STRINGS + BPE_SPECIAL + random_strings(150, seed=2) + [big_text()]
        bad = compare_corpus(tok, pv, corpus)
        assert not bad, f"{pre}: {len(bad)} mismatches over {len(corpus)} strings:\n" + "\n".join(bad[:20])
        for special in (True, False):
            assert [tok.token_to_piece(t, special) for t in range(tok.n_vocab)] == \
                [pv.piece(t, special) for t in range(tok.n_vocab)]
        peer_eog = {t for t in range(tok.n_vocab) if pv.lib.llama_vocab_is_eog(pv.vocab, t)}
        assert tok.eog_ids == peer_eog
    finally:
        pv.close()


def build_spm_gguf(path: Path, add_space_prefix: bool) -> None:
    """A small SentencePiece-style vocab (pieces scored by frequency, byte fallback) in a `llama` GGUF."""
    text = _training_text().replace(" ", "\u2581")
    counts: collections.Counter[str] = collections.Counter()
    for n in range(2, 7):
        counts.update(text[i:i + n] for i in range(len(text) - n + 1))
    pieces = [p for p, c in counts.most_common() if c >= 4 and "\n" not in p][:3000]
    pieces += sorted(set(text) - set(pieces) - {"\n"})[:200]  # some single chars; the rest falls back to bytes
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<start_of_turn>", "<tag>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("space_prefix", [True, False])
def test_small_spm_vocab_matches_peer(peer: Any, tmp_path: Path, space_prefix: bool) -> None:
    path = tmp_path / "spm.gguf"
    build_spm_gguf(path, space_prefix)
    pv = PeerVocab(peer, path)
    try:
        tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
        corpus = HARD_STRINGS + ["<start_of_turn>x<tag> y", " <tag><start_of_turn> z"] + random_strings(100, seed=3)
        bad = compare_corpus(tok, pv, corpus)
        assert not bad, f"{len(bad)} mismatches over {len(corpus)} strings:\n" + "\n".join(bad[:20])
        for special in (True, False):
            assert [tok.token_to_piece(t, special) for t in range(tok.n_vocab)] == \
                [pv.piece(t, special) for t in range(tok.n_vocab)]
    finally:
        pv.close()


def test_bpe_ignore_merges_only_for_llama3_family(tmp_path: Path) -> None:
    for pre, whole in (("llama-bpe", True), ("qwen2", False)):
        build_bpe_gguf(tmp_path / f"{pre}.gguf", pre)
        tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / f"{pre}.gguf"))
        ids = tok.tokenize(" supercalifragilistic", add_special=False)
        assert (len(ids) == 1) == whole, (pre, ids)


def test_stream_decoder_matches_whole_decode(tmp_path: Path) -> None:
    build_bpe_gguf(tmp_path / "q.gguf", "qwen2")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "q.gguf"))
    text = "日本語 ꙮ𝔘 e\u0301 <|im_end|> done"
    ids = tok.tokenize(text, add_special=False, parse_special=True)

    def whole_utf8(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert not all(whole_utf8(tok.token_to_piece(t)) for t in ids)  # rare chars fall back to byte tokens
    stream = StreamDecoder(tok)
    parts = [stream.feed([t]) for t in ids] + [stream.flush()]
    assert "".join(parts) == tok.decode(ids) == text.replace("<|im_end|>", "")
    assert all("\ufffd" not in p for p in parts)  # incomplete UTF-8 is held back, never replaced


def test_bpe_long_prompt_speed(tmp_path: Path) -> None:
    build_bpe_gguf(tmp_path / "q.gguf", "qwen2")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "q.gguf"))
    text = big_text()
    start = time.perf_counter()
    tok.tokenize(text)
    assert time.perf_counter() - start < 1.0


def test_unicode_flags_cover_unicode_15_1() -> None:
    # assigned in Unicode 15.0/15.1 (llama.cpp's table), unassigned in Python 3.11's Unicode 14 database
    assert tu.cpt_flags(0x31350) == tu.LETTER and tu.cpt_flags(0x1FAE8) == tu.SYMBOL
    assert tu.cpt_flags(0x0CF3) == tu.MARK and tu.cpt_flags(0x1D2C0) == tu.NUMBER
    assert tu.cpt_flags(0x20) == tu.SEPARATOR | tu.WHITESPACE and tu.cpt_flags(0x1C) == tu.CONTROL
    assert np.all([tu.cpt_flags(c) & tu.WHITESPACE for c in (0x85, 0xA0, 0x3000, 0x2028)])


def test_bad_vocab_metadata_and_text_get_clear_errors(tmp_path: Path) -> None:
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": list("abc"),
            "tokenizer.ggml.merges": ["a b"]}
    assert Tokenizer.from_gguf(base).tokenize("ab", add_special=False) == [0, 1]  # no 'ab' token: bytes
    for bad, match in (({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model"),
                       ({"tokenizer.ggml.pre": "no-such-pre"}, "unsupported pre-tokenizer"),
                       ({"tokenizer.ggml.tokens": []}, "no tokenizer.ggml.tokens"),
                       ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
                       ({"tokenizer.ggml.scores": [0.0]}, "expected 3 entries")):
        meta = {k: v for k, v in {**base, **bad}.items() if v is not None}
        with pytest.raises(VocabError, match=match):
            Tokenizer.from_gguf(meta)
    with pytest.raises(VocabError, match="cannot read GGUF"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="unpaired surrogate"):
        Tokenizer.from_gguf(base).tokenize("a\ud800")
