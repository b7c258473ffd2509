"""Unicode facts and BPE pre-tokenizers, matching llama.cpp's tokenizer (src/unicode.cpp) bit for bit.

llama.cpp classifies code points with its own table generated from Unicode 15.1 (`\\p{L}`, `\\p{N}`, ... are
the first letter of the general category; `\\s` is the White_Space property). We derive the same flags from
the stdlib `unicodedata` and patch in the code points assigned by Unicode 15.0/15.1 when Python's database is
older (Python 3.11 ships 14.0). A Python whose database is newer than 15.1 would classify the few code points
assigned after 15.1, which llama.cpp still treats as unassigned.

The three common pre-tokenizers (gpt2, llama3, qwen2/qwen35) are hand-written scanners in llama.cpp rather
than regexes; we scan the same way. Other pre-tokenizer regexes run on a "collapsed" text in which every
non-ASCII code point becomes one byte standing for its category, which is what llama.cpp feeds std::regex.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence

NUMBER, LETTER, SEPARATOR, MARK, PUNCT, SYMBOL, CONTROL = 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80
UNDEFINED, WHITESPACE = 0x1, 0x100

_CATEGORY_FLAGS = {"Cn": UNDEFINED, "Cc": CONTROL, "Cf": CONTROL, "Co": CONTROL, "Cs": CONTROL,
                   "L": LETTER, "M": MARK, "N": NUMBER, "P": PUNCT, "S": SYMBOL, "Z": SEPARATOR}
_WHITESPACE = frozenset([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                         0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
# Code points assigned by Unicode 15.0 and 15.1 (inclusive ranges, flag), unassigned in Unicode 14.
_UNICODE_15_ADDITIONS = (
    (0x0CF3, 0x0CF3, MARK), (0x0ECE, 0x0ECE, MARK), (0x2FFC, 0x2FFF, SYMBOL), (0x31EF, 0x31EF, SYMBOL),
    (0x10EFD, 0x10EFF, MARK), (0x1123F, 0x11240, LETTER), (0x11241, 0x11241, MARK),
    (0x11B00, 0x11B09, PUNCT), (0x11F00, 0x11F01, MARK), (0x11F02, 0x11F02, LETTER),
    (0x11F03, 0x11F03, MARK), (0x11F04, 0x11F10, LETTER), (0x11F12, 0x11F33, LETTER),
    (0x11F34, 0x11F3A, MARK), (0x11F3E, 0x11F42, MARK), (0x11F43, 0x11F4F, PUNCT), (0x11F50, 0x11F59, NUMBER),
    (0x1342F, 0x1342F, LETTER), (0x13439, 0x1343F, CONTROL), (0x13440, 0x13440, MARK),
    (0x13441, 0x13446, LETTER), (0x13447, 0x13455, MARK), (0x1B132, 0x1B132, LETTER),
    (0x1B155, 0x1B155, LETTER), (0x1D2C0, 0x1D2D3, NUMBER), (0x1DF25, 0x1DF2A, LETTER),
    (0x1E030, 0x1E06D, LETTER), (0x1E08F, 0x1E08F, MARK), (0x1E4D0, 0x1E4EB, LETTER),
    (0x1E4EC, 0x1E4EF, MARK), (0x1E4F0, 0x1E4F9, NUMBER), (0x1F6DC, 0x1F6DC, SYMBOL),
    (0x1F774, 0x1F776, SYMBOL), (0x1F77B, 0x1F77F, SYMBOL), (0x1F7D9, 0x1F7D9, SYMBOL),
    (0x1FA75, 0x1FA77, SYMBOL), (0x1FA87, 0x1FA88, SYMBOL), (0x1FAAD, 0x1FAAF, SYMBOL),
    (0x1FABB, 0x1FABD, SYMBOL), (0x1FABF, 0x1FABF, SYMBOL), (0x1FACE, 0x1FACF, SYMBOL),
    (0x1FADA, 0x1FADB, SYMBOL), (0x1FAE8, 0x1FAE8, SYMBOL), (0x1FAF7, 0x1FAF8, SYMBOL),
    (0x2B739, 0x2B739, LETTER), (0x2EBF0, 0x2EE5D, LETTER), (0x31350, 0x323AF, LETTER),
)
_PATCH_15 = tuple(unicodedata.unidata_version.split(".")) < ("15", "1", "0")


@functools.lru_cache(maxsize=1 << 16)
def cpt_flags(cpt: int) -> int:
    """llama.cpp's flags for one code point: category bit | WHITESPACE."""
    if _PATCH_15 and cpt >= 0xCF3:
        for lo, hi, flag in _UNICODE_15_ADDITIONS:
            if lo <= cpt <= hi:
                return flag | (WHITESPACE if cpt in _WHITESPACE else 0)
    cat = unicodedata.category(chr(cpt))
    flag = _CATEGORY_FLAGS.get(cat) or _CATEGORY_FLAGS[cat[0]]
    return flag | (WHITESPACE if cpt in _WHITESPACE else 0)


def _byte_to_char_table() -> list[str]:
    """GPT-2's reversible byte -> printable-char map: printable Latin-1 bytes map to themselves, the rest to 256+."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_to_char_table()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def byte_encode(word: str) -> str:
    """Map a word's UTF-8 bytes to GPT-2's printable chars (the alphabet of byte-level BPE vocabularies)."""
    return "".join([BYTE_TO_CHAR[b] for b in word.encode("utf-8", "surrogatepass")])


# --- hand-written scanners -----------------------------------------------------------------------------

def _contraction_len(cps: Sequence[int], pos: int, end: int, fold: bool) -> int:
    """Length of `'s|'t|'re|'ve|'m|'ll|'d` at pos (case-insensitive when fold), else 0."""
    if cps[pos] != 0x27 or pos + 1 >= end:
        return 0
    c1 = cps[pos + 1]
    if fold and 0x41 <= c1 <= 0x5A:
        c1 += 32
    if c1 in (0x73, 0x74, 0x6D, 0x64):  # s t m d
        return 2
    if pos + 2 < end:
        c2 = cps[pos + 2]
        if fold and 0x41 <= c2 <= 0x5A:
            c2 += 32
        if (c1, c2) in ((0x72, 0x65), (0x76, 0x65), (0x6C, 0x6C)):  # re ve ll
            return 3
    return 0


def _whitespace_run(fl: Sequence[int], pos: int, end: int) -> int:
    n = 0
    while pos + n < end and fl[pos + n] & WHITESPACE:
        n += 1
    return n


def split_gpt2(cps: Sequence[int], fl: Sequence[int], start: int, end: int, out: list[int]) -> None:
    """GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S); appends chunk lengths."""
    pos = start
    while pos < end:
        n = _contraction_len(cps, pos, end, fold=False)
        if n:
            out.append(n)
            pos += n
            continue
        is_space = cps[pos] == 0x20
        f = (fl[pos + 1] if pos + 1 < end else 0) if is_space else fl[pos]
        if f & LETTER:
            mask, want = LETTER, LETTER
        elif f & NUMBER:
            mask, want = NUMBER, NUMBER
        elif f and not f & (WHITESPACE | LETTER | NUMBER):
            mask, want = WHITESPACE | LETTER | NUMBER, 0
        else:
            pos = _split_whitespace(fl, pos, end, out)
            continue
        p = pos + is_space
        while p < end and fl[p] and (fl[p] & mask) == want:
            p += 1
        out.append(p - pos)
        pos = p


def _split_whitespace(fl: Sequence[int], pos: int, end: int, out: list[int]) -> int:
    """\\s+(?!\\S)|\\s+ or a lone unmatched char; returns the new position."""
    n = _whitespace_run(fl, pos, end)
    if n > 1 and pos + n < end:
        n -= 1  # leave the last space to prefix the next word
    n = max(n, 1)
    out.append(n)
    return pos + n


def split_llama3_like(cps: Sequence[int], fl: Sequence[int], start: int, end: int, out: list[int],
                      letters: int = LETTER, max_digits: int = 3) -> None:
    """llama3 (max_digits 3), qwen2 (1) and qwen35 (letters incl. marks):
    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+
    """
    pos = start
    while pos < end:
        n = _contraction_len(cps, pos, end, fold=True)
        if n:
            out.append(n)
            pos += n
            continue
        c, f = cps[pos], fl[pos]
        nxt = fl[pos + 1] if pos + 1 < end else 0
        if c not in (0x0D, 0x0A) and not f & NUMBER and (f & letters or nxt & letters):
            p = pos + 1
            while p < end and fl[p] & letters:
                p += 1
            out.append(p - pos)
            pos = p
            continue
        if f & NUMBER:
            p = pos
            while p < end and fl[p] & NUMBER and p - pos < max_digits:
                p += 1
            out.append(p - pos)
            pos = p
            continue
        pos = _split_punct_or_space(cps, fl, pos, end, out, letters)


def _split_punct_or_space(cps: Sequence[int], fl: Sequence[int], pos: int, end: int, out: list[int],
                          letters: int) -> int:
    """ ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+ for the llama3-like scanners."""
    c, f = cps[pos], fl[pos]
    stop = WHITESPACE | letters | NUMBER
    f2 = (fl[pos + 1] if pos + 1 < end else 0) if c == 0x20 else f
    if f and not f2 & stop:
        p = pos + (c == 0x20)
        while p < end and fl[p] and not fl[p] & stop:
            p += 1
        while p < end and cps[p] in (0x0D, 0x0A):
            p += 1
        out.append(p - pos)
        return p
    n = _whitespace_run(fl, pos, end)
    last_nl = 0
    for p in range(pos, pos + n):
        if cps[p] in (0x0D, 0x0A):
            last_nl = p + 1
    if last_nl:
        out.append(last_nl - pos)
        return last_nl
    return _split_whitespace(fl, pos, end, out)


def split_newlines(cps: Sequence[int], fl: Sequence[int], start: int, end: int, out: list[int]) -> None:
    """[^\\n]+|[\\n]+ : alternate runs of newlines and non-newlines."""
    pos = start
    while pos < end:
        is_nl = cps[pos] == 0x0A
        p = pos
        while p < end and (cps[p] == 0x0A) == is_nl:
            p += 1
        out.append(p - pos)
        pos = p


# --- regex pre-tokenizers on collapsed text ------------------------------------------------------------

_CAT_CODES = {"\\p{N}": (NUMBER, "\xd1", "0-9"), "\\p{L}": (LETTER, "\xd2", "A-Za-z"),
              "\\p{P}": (PUNCT, "\xd3", "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"), "\\p{M}": (MARK, "\xd4", ""),
              "\\p{S}": (SYMBOL, "\xd5", "\\$\\+<->^`\\|~")}
_CAT_CODES.update({f"\\p{{{k}}}": _CAT_CODES["\\p{L}"] for k in ("Lu", "Ll", "Lt", "Lm", "Lo")})
_COLLAPSE = {NUMBER: "\xd1", LETTER: "\xd2", PUNCT: "\xd3", MARK: "\xd4", SYMBOL: "\xd5"}
_PROP = re.compile(r"\\p\{[A-Za-z]{1,2}\}")


def collapse_text(cps: Sequence[int], fl: Sequence[int]) -> str:
    """One char per code point: ASCII kept, whitespace -> \\x0b, else a byte naming the category (or \\xd0)."""
    out = []
    for c, f in zip(cps, fl):
        if c < 128:
            out.append(chr(c))
        elif f & WHITESPACE:
            out.append("\x0b")
        else:
            out.append(_COLLAPSE.get(f & 0xFF, "\xd0"))
    return "".join(out)


def collapse_regex(expr: str) -> str:
    """Replace \\p{..} classes by their collapsed byte plus their ASCII members, as llama.cpp does."""
    out, inside, i = [], False, 0
    while i < len(expr):
        ch = expr[i]
        if ch == "[" and (i == 0 or expr[i - 1] != "\\"):
            inside = True
        elif ch == "]" and inside and expr[i - 1] != "\\":
            inside = False
        m = _PROP.match(expr, i) if ch == "\\" else None
        if m and m.group(0) in _CAT_CODES:
            _, code, ascii_members = _CAT_CODES[m.group(0)]
            body = code + ascii_members
            out.append(body if inside else f"[{body}]")
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def regex_split(text: str, pattern: re.Pattern[str], start: int, end: int, out: list[int]) -> None:
    """Split text[start:end] into matches and the gaps between them (std::regex_iterator semantics)."""
    prev = start
    for m in pattern.finditer(text, start, end):
        if m.start() > prev:
            out.append(m.start() - prev)
        if m.end() > m.start():
            out.append(m.end() - m.start())
        prev = m.end()
    if prev < end:
        out.append(end - prev)


Scanner = Callable[[Sequence[int], Sequence[int], int, int, list[int]], None]

_GPT2_RE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_CONTR = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_RE = _CONTR + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_QWEN2_RE = _CONTR + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_QWEN35_RE = (_CONTR + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_SCANNERS: dict[str, Scanner] = {
    _GPT2_RE: split_gpt2,
    _LLAMA3_RE: split_llama3_like,
    _QWEN2_RE: lambda c, f, s, e, o: split_llama3_like(c, f, s, e, o, max_digits=1),
    _QWEN35_RE: lambda c, f, s, e, o: split_llama3_like(c, f, s, e, o, letters=LETTER | MARK, max_digits=1),
    "[^\\n]+|[\\n]+": split_newlines,
}


class PreTokenizer:
    """Splits a text into words by a list of regexes applied in turn, each within the previous chunks."""

    def __init__(self, exprs: Sequence[str]) -> None:
        self.steps: list[tuple[Scanner | None, re.Pattern[str] | None, bool]] = []
        for expr in exprs:
            if expr in _SCANNERS:
                self.steps.append((_SCANNERS[expr], None, False))
            elif _PROP.search(expr):
                if any(ord(ch) >= 128 for ch in expr):
                    raise ValueError(f"pre-tokenizer regex mixes \\p{{}} and non-ASCII: {expr!r}")
                self.steps.append((None, re.compile(collapse_regex(expr), re.ASCII), True))
            else:
                self.steps.append((None, re.compile(expr, re.ASCII), False))

    def split(self, text: str) -> list[str]:
        cps = [ord(ch) for ch in text]
        fl = [cpt_flags(c) for c in cps]
        collapsed = plain = None
        offsets = [len(cps)]
        for scanner, pattern, use_collapsed in self.steps:
            new: list[int] = []
            start = 0
            for length in offsets:
                if scanner is not None:
                    scanner(cps, fl, start, start + length, new)
                else:
                    if use_collapsed:
                        collapsed = collapsed if collapsed is not None else collapse_text(cps, fl)
                        subject = collapsed
                    else:  # std::wregex sees non-ASCII whitespace as \v
                        plain = plain if plain is not None else "".join(
                            "\x0b" if c > 0x7F and f & WHITESPACE else chr(c) for c, f in zip(cps, fl))
                        subject = plain
                    regex_split(subject, pattern, start, start + length, new)  # type: ignore[arg-type]
                start += length
            offsets = new
        words, start = [], 0
        for length in offsets:
            words.append(text[start:start + length])
            start += length
        return words
