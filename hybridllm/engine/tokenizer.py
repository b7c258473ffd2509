"""Text <-> token ids exactly as llama.cpp does it (src/llama-vocab.cpp), for SPM and byte-level BPE vocabs.

    tok = Tokenizer.from_gguf(path_or_reader)
    ids = tok.tokenize("Hello", add_special=True, parse_special=False)   # == llama_tokenize
    tok.detokenize(ids, remove_special=False, unparse_special=True)      # == llama_detokenize (bytes)
    tok.token_to_piece(id, special=False)                                # == llama_token_to_piece (bytes)

Special and user-defined tokens are first cut out of the text (longest first); the remaining fragments go
through SPM (bigram merges by score over the whole fragment, byte fallback) or BPE (pre-tokenizer regexes,
byte-level alphabet, merges by rank).
"""
from __future__ import annotations

import codecs
import heapq
from collections.abc import Iterable, Sequence
from typing import Any

from hybridllm.engine import tokenizer_unicode as tu
from hybridllm.engine.tokenizer_vocab import TOKEN_NULL, TokenAttr, Vocab, VocabError, load_vocab

__all__ = ["TOKEN_NULL", "StreamDecoder", "TokenAttr", "Tokenizer", "Vocab", "VocabError"]

_ASCII_SPACE = " \t\n\v\f\r"
_SPECIAL_ATTRS = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN)
_LSTRIP, _RSTRIP = int(TokenAttr.LSTRIP), int(TokenAttr.RSTRIP)
_WORD_CACHE_MAX = 1 << 16


class Tokenizer:
    """Tokenizer over a llama.cpp-compatible `Vocab` (SPM `llama` or BPE `gpt2` tokenizer models)."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._pieces: list[bytes | None] = [None] * vocab.n_tokens
        self._pre = tu.PreTokenizer(vocab.pre_regexes) if vocab.model == "gpt2" else None
        self._word_cache: dict[str, list[int]] = {}
        self._special_first = {vocab.tokens[i][:1] for i in vocab.special_ids}

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """From a GGUF path, an open `gguf.GGUFReader` or a metadata mapping."""
        return cls(load_vocab(source))

    # --- properties -----------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.vocab.n_tokens

    @property
    def bos_id(self) -> int:
        return self.vocab.bos

    @property
    def eos_id(self) -> int:
        return self.vocab.eos

    @property
    def eog_ids(self) -> frozenset[int]:
        return self.vocab.eog_ids

    def is_eog(self, token: int) -> bool:
        return token in self.vocab.eog_ids

    def token_text(self, token: int) -> str:
        return self.vocab.tokens[token]

    # --- tokenize -------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize: ids for text; add_special adds BOS/EOS as the vocab asks; parse_special turns
        control-token texts into their ids (user-defined tokens are always parsed)."""
        v = self.vocab
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates (e.g. from JSON "\\ud800") are not text
            raise ValueError(f"text is not valid Unicode: unpaired surrogate at index {exc.start}") from None
        frags = self._partition(text, parse_special)
        out: list[int] = []
        if add_special and v.add_bos:
            if v.bos == TOKEN_NULL:
                raise VocabError("vocab asks for a BOS token but has none")
            out.append(v.bos)
        if v.model == "llama":
            prev_special = True
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if v.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm(frag.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe(frag.replace(" ", "\u2581") if v.escape_whitespaces else frag, out)
        if add_special and v.add_eos:
            if v.eos == TOKEN_NULL:
                raise VocabError("vocab asks for an EOS token but has none")
            out.append(v.eos)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of text, longest first; each splits every text fragment at all its matches."""
        if not text:
            return []
        frags: list[str | int] = [text]
        v = self.vocab
        firsts = self._special_first.intersection(text)
        if not firsts:
            return frags
        for tid in v.special_ids:
            tok = v.tokens[tid]
            if tok[:1] not in firsts or tok not in text:
                continue  # fragments are substrings of text: no match there, none in them
            attr = v.attrs[tid]
            if not parse_special and attr & _SPECIAL_ATTRS:
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    new.append(frag)
                else:
                    _split_fragment(frag, tid, tok, attr, new)
            frags = new
        return frags

    def _spm(self, text: str, out: list[int]) -> None:
        """SentencePiece-style BPE: merge the best-scoring adjacent pair (leftmost on ties) until none is a token."""
        n = len(text)
        if n == 0:
            return
        to_id, scores = self.vocab.token_to_id, self.vocab.scores
        size = [1] * n                       # symbol i covers text[i:i+size[i]]; 0 once merged away
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        for i in range(n - 1):
            tid = to_id.get(text[i:i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        push = heapq.heappush
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue  # stale: one side already merged elsewhere
            size[left] = total
            size[right] = 0
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                tid = to_id.get(text[before:before + size[before] + total])
                if tid is not None:
                    push(heap, (-scores[tid], before, left, size[before] + total))
            if after >= 0:
                tid = to_id.get(text[left:left + total + size[after]])
                if tid is not None:
                    push(heap, (-scores[tid], left, after, total + size[after]))
        i = 0
        while i != -1:
            piece = text[i:i + size[i]]
            tid = to_id.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_token(b) for b in piece.encode("utf-8", "surrogateescape"))
            i = nxt[i]

    def _byte_token(self, byte: int) -> int:
        """SPM byte fallback: <0xXX>, else the byte itself as a token."""
        to_id = self.vocab.token_to_id
        tid = to_id.get(f"<0x{byte:02X}>")
        if tid is None:
            tid = to_id.get(bytes([byte]).decode("utf-8", "surrogateescape"))
        if tid is None:
            raise VocabError(f"vocab has no byte token for 0x{byte:02X}")
        return tid

    def _bpe(self, text: str, out: list[int]) -> None:
        assert self._pre is not None
        cache = self._word_cache
        for word in self._pre.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(tu.byte_encode(word))
                if len(cache) >= _WORD_CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        """Byte-level BPE of one pre-tokenized word: merge the lowest-ranked adjacent pair, leftmost on ties."""
        to_id, ranks = self.vocab.token_to_id, self.vocab.bpe_ranks
        if self.vocab.ignore_merges and word in to_id:
            return [to_id[word]]
        syms = list(word)
        n = len(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(r, i, i + 1, syms[i] + syms[i + 1]) for i in range(n - 1)
                if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                continue
            syms[left], syms[right] = merged, ""
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
            for a, b in ((prv[left], left), (left, after)):
                if a >= 0 and b >= 0 and (r := ranks.get((syms[a], syms[b]))) is not None:
                    heapq.heappush(heap, (r, a, b, syms[a] + syms[b]))
        ids: list[int] = []
        for sym in syms:
            if not sym:
                continue
            tid = to_id.get(sym)
            if tid is not None:
                ids.append(tid)
                continue
            for b in sym.encode("utf-8", "surrogateescape"):  # llama.cpp looks up each raw byte; most miss
                tid = to_id.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if tid is not None:
                    ids.append(tid)
        return ids

    # --- detokenize -----------------------------------------------------------------------------------
    def token_to_piece(self, token: int, special: bool = False, lstrip: int = 0) -> bytes:
        """llama_token_to_piece: the bytes of one token; control/unknown tokens are empty unless special."""
        v = self.vocab
        if not 0 <= token < v.n_tokens:
            raise IndexError(f"token id {token} out of range [0, {v.n_tokens})")
        if not special and v.attrs[token] & _SPECIAL_ATTRS:
            return b""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._make_piece(token)
        for _ in range(lstrip):
            if not piece.startswith(b" "):
                break
            piece = piece[1:]
        return piece

    def _make_piece(self, token: int) -> bytes:
        v = self.vocab
        attr, text = v.attrs[token], v.tokens[token]
        if attr & (_SPECIAL_ATTRS | TokenAttr.USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & TokenAttr.NORMAL:
            if v.model == "llama" or v.escape_whitespaces:
                return text.replace("\u2581", " ").encode("utf-8", "surrogateescape")
            return _decode_byte_level(text)
        if attr & TokenAttr.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def detokenize(self, tokens: Sequence[int], remove_special: bool = False,
                   unparse_special: bool = False) -> bytes:
        """llama_detokenize: concatenated pieces, first leading space dropped if the vocab adds one, and
        for BPE vocabs with clean_up_tokenization_spaces, llama.cpp's space clean-up passes."""
        v = self.vocab
        toks = list(tokens)
        remove_space = v.add_space_prefix
        if remove_special and v.add_bos and toks and toks[0] == v.bos:
            remove_space = False
            toks = toks[1:]
        if remove_special and v.add_eos and toks and toks[-1] == v.eos:
            toks = toks[:-1]
        parts = []
        for tok in toks:
            parts.append(self.token_to_piece(tok, unparse_special, lstrip=int(remove_space)))
            remove_space = False
        text = b"".join(parts)
        return _clean_spaces(text) if v.clean_spaces else text

    def decode(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of tokens (special tokens rendered when special), invalid UTF-8 replaced by U+FFFD."""
        return self.detokenize(tokens, unparse_special=special).decode("utf-8", "replace")


def _split_fragment(frag: str, tid: int, tok: str, attr: int, out: list[str | int]) -> None:
    """Split one text fragment at every occurrence of special token `tok`, stripping around it per attr."""
    pos, n = 0, len(frag)
    while True:
        match = frag.find(tok, pos)
        if match < 0:
            if pos < n:
                out.append(frag[pos:])
            return
        left_end = match
        if attr & _LSTRIP:
            while left_end > pos and frag[left_end - 1] in _ASCII_SPACE:
                left_end -= 1
        if left_end > pos:
            out.append(frag[pos:left_end])
        out.append(tid)
        pos = match + len(tok)
        if pos >= n:
            return
        if attr & _RSTRIP:
            while pos < n and frag[pos] in _ASCII_SPACE:
                pos += 1


def _decode_byte_level(text: str) -> bytes:
    """Byte-level BPE token text -> raw bytes; chars outside the byte alphabet become an [UNK_BYTE_..] marker."""
    out = bytearray()
    for ch in text:
        b = tu.CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            hexed = "".join(f"{x:02x}" for x in ch.encode("utf-8", "surrogateescape"))
            out += f"[UNK_BYTE_0x{hexed}{text}]".encode("utf-8", "surrogateescape")
    return bytes(out)


def _clean_spaces(text: bytes) -> bytes:
    """clean_up_tokenization_spaces as llama.cpp does it: ' ?'->'?' (and ! . ,), ' ' ' -> ''', " 's"->"'s" ..."""
    if not text:
        return text
    out = bytearray(text[:1])  # pass 1: no space before ? ! . ,
    for i in range(1, len(text)):
        if text[i - 1] == 0x20 and text[i] in b"?!.,":
            out.pop()
        out.append(text[i])
    src, out = bytearray(out), bytearray(out[:1])  # pass 2: a lone apostrophe between spaces
    i = 1
    while i < len(src):
        x = src[i]
        if x == 0x27 and i + 1 < len(src) and src[i - 1] == 0x20 and src[i + 1] == 0x20:
            out.pop()
            i += 1
            src[i] = 0  # llama.cpp zeroes the following space, which the next comparison then sees
        out.append(x)
        i += 1
    done, out = bytes(out), bytearray(out[:1])  # pass 3: contractions 's 'm 're 've
    for i in range(1, len(done)):
        x = done[i]
        if done[i - 1] == 0x20 and x == 0x27 and i + 1 < len(done):
            x1 = done[i + 1]
            if x1 in b"sm" or (x1 not in b"td" and i + 2 < len(done) and done[i + 1:i + 3] in (b"re", b"ve")):
                out.pop()
        out.append(x)
    return bytes(out)


class StreamDecoder:
    """Incremental token -> text for streaming: holds back bytes of an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, tokens: Iterable[int]) -> str:
        data = b"".join(self._tok.token_to_piece(t, self._special) for t in tokens)
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
