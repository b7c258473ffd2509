"""Token sampling like llama.cpp's default chain: penalties -> top-k -> top-p -> min-p -> temperature -> dist.

    sampler = Sampler(SamplerParams(temperature=0.8, top_k=40, seed=42), n_vocab)
    sampler.accept_many(prompt_ids)          # fills the repetition-penalty window
    token = sampler.sample(logits)           # float32[n_vocab]; also accepts the token
    stop = StopChecker(tokenizer.eog_ids, ["\\n\\n"]); text, done = stop.feed_text(piece)

The arithmetic follows llama.cpp (src/llama-sampler.cpp) step by step in float32 on the candidate order it
keeps (top-k leaves candidates sorted by logit, ties by token id), and `dist` draws from a Mersenne
Twister seeded like std::mt19937 with libstdc++'s generate_canonical<double>: with top_k > 0 a given seed
yields the same tokens as llama.cpp. Everything is numpy-vectorized; a 262144-entry vocab takes ~1-2 ms.
"""
from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: pick a random seed


@dataclass
class SamplerParams:
    """llama.cpp's common sampling defaults; temperature <= 0 samples greedily."""
    temperature: float = 0.8
    top_k: int = 40                  # <= 0: all tokens
    top_p: float = 0.95              # 1.0: disabled
    min_p: float = 0.05              # 0.0: disabled
    min_keep: int = 0
    repeat_penalty: float = 1.0      # 1.0: disabled
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64          # 0: no penalties, < 0: the whole history
    seed: int = DEFAULT_SEED
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"top_p and min_p must be in [0, 1] (got {self.top_p}, {self.min_p})")
        if self.repeat_penalty <= 0.0:
            raise ValueError(f"repeat_penalty must be > 0 (got {self.repeat_penalty})")
        if not 0 <= self.seed <= 0xFFFFFFFF:
            raise ValueError(f"seed must fit in 32 bits (got {self.seed})")


class MT19937:
    """std::mt19937 seeded with a 32-bit seed, drawing doubles like std::uniform_real_distribution<double>."""

    def __init__(self, seed: int) -> None:
        # RandomState seeds with init_genrand(seed), exactly as std::mt19937(seed) does
        state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)
        self._gen = np.random.MT19937()
        self._gen.state = {"bit_generator": "MT19937", "state": state["state"]}

    def uniform(self) -> float:
        lo, hi = (int(x) for x in self._gen.random_raw(2))
        value = float(lo + hi * 4294967296.0) / 18446744073709551616.0  # generate_canonical: 2 draws
        return value if value < 1.0 else math.nextafter(1.0, 0.0)


class Sampler:
    """Stateful sampler for one sequence: penalty window + RNG."""

    def __init__(self, params: SamplerParams, n_vocab: int) -> None:
        params.validate()
        self.params = params
        self.n_vocab = n_vocab
        self.seed = params.seed if params.seed != DEFAULT_SEED else random.getrandbits(32)
        self._rng = MT19937(self.seed)
        self._window: deque[int] = deque()
        self._counts: Counter[int] = Counter()
        self._bias_ids = np.array(list(params.logit_bias), dtype=np.int64)
        self._bias_vals = np.array(list(params.logit_bias.values()), dtype=np.float32)

    def reset(self) -> None:
        self._rng = MT19937(self.seed)
        self._window.clear()
        self._counts.clear()

    # --- penalty window -------------------------------------------------------------------------------
    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) in the repetition-penalty window."""
        last_n = self.params.repeat_last_n
        if last_n == 0:
            return
        self._counts[token] += 1
        if 0 < last_n <= len(self._window):
            old = self._window.popleft()
            self._counts[old] -= 1
            if self._counts[old] == 0:
                del self._counts[old]
        self._window.append(token)

    def accept_many(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.accept(t)

    # --- sampling -------------------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, accept: bool = True) -> int:
        """Pick the next token from one row of logits and (by default) record it in the window."""
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"expected logits of shape ({self.n_vocab},), got {logits.shape}")
        token = self._choose(np.asarray(logits, dtype=np.float32))
        if accept:
            self.accept(token)
        return token

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        vals = self._penalized(logits)
        ids: np.ndarray | None = None  # None: all tokens, in id order
        is_sorted = False
        if p.top_k > 0:
            ids, vals = _top_k(vals, min(p.top_k, len(vals)))
            is_sorted = True
        if p.top_p < 1.0:
            ids, vals = _top_p(ids, vals, is_sorted, p.top_p, p.min_keep)
            is_sorted = True
        if p.min_p > 0.0:
            ids, vals, is_sorted = _min_p(ids, vals, is_sorted, p.min_p, p.min_keep)
        if p.temperature <= 0.0:
            best = int(np.argmax(vals))  # temp <= 0 keeps only the first maximum
            vals = np.full_like(vals, -np.inf)
            vals[best] = 0.0
        else:
            vals = vals / np.float32(p.temperature)
        pick = _dist(vals, is_sorted, self._rng.uniform())
        return int(ids[pick]) if ids is not None else pick

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        vals = logits
        if len(self._bias_ids):
            vals = vals.copy()
            vals[self._bias_ids] += self._bias_vals
        disabled = p.repeat_last_n == 0 or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0
                                            and p.presence_penalty == 0.0)
        if disabled or not self._counts:
            return vals
        toks = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        keep = toks < len(vals)
        toks, counts = toks[keep], counts[keep]
        vals = vals.copy() if vals is logits else vals
        x = vals[toks]
        rep = np.float32(p.repeat_penalty)
        x = np.where(x <= 0, x * rep, x / rep)
        x -= counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
        vals[toks] = x
        return vals


def _order_desc(vals: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Permutation sorting by logit descending, ties by token id ascending."""
    return np.lexsort((ids, -vals))


def _top_k(vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest logits of the full vocab, sorted (boundary ties go to the lowest ids)."""
    n = len(vals)
    if k < n:
        kth = np.partition(vals, n - k)[n - k]
        above = np.flatnonzero(vals > kth)
        ties = np.flatnonzero(vals == kth)[:k - len(above)]
        ids = np.concatenate([above, ties])
    else:
        ids = np.arange(n)
    order = _order_desc(vals[ids], ids)
    ids = ids[order]
    return ids, vals[ids]


def _expf(x: np.ndarray) -> np.ndarray:
    """float32 exp rounded from double, as glibc's expf (correctly rounded in practice)."""
    return np.exp(x.astype(np.float64)).astype(np.float32)


def _top_p(ids: np.ndarray | None, vals: np.ndarray, is_sorted: bool, top_p: float,
           min_keep: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(vals)
    if ids is None:
        ids = np.arange(n)
    mx = vals[0] if is_sorted else vals.max()
    probs = _expf(vals - mx)
    probs = probs / np.cumsum(probs, dtype=np.float32)[-1]  # llama.cpp's float32 running sum, in order
    if is_sorted:
        order = np.arange(n)
    else:  # like llama.cpp, sort only the best 256 unless they don't reach top_p; then widen
        for head_len in (256, 4096, 32768, n):
            head = np.argpartition(-vals, head_len - 1)[:head_len] if head_len < n else np.arange(n)
            order = head[_order_desc(vals[head], ids[head])]
            if head_len >= n or _top_p_cut(probs[order], top_p, min_keep) is not None:
                break
    cut = _top_p_cut(probs[order], top_p, min_keep)
    last = cut if cut is not None else n
    order = order[:last]
    return ids[order], vals[order]


def _top_p_cut(sorted_probs: np.ndarray, top_p: float, min_keep: int) -> int | None:
    """Candidates to keep: up to the first whose float32 running sum reaches top_p (and min_keep)."""
    cum = np.cumsum(sorted_probs, dtype=np.float32)
    hit = np.flatnonzero((cum >= np.float32(top_p)) & (np.arange(1, len(cum) + 1) >= min_keep))
    return int(hit[0]) + 1 if len(hit) else None


def _min_p(ids: np.ndarray | None, vals: np.ndarray, is_sorted: bool, min_p: float,
           min_keep: int) -> tuple[np.ndarray | None, np.ndarray, bool]:
    log_p = np.float32(math.log(min_p))
    if not is_sorted:
        keep = np.flatnonzero(vals >= np.float32(vals.max() + log_p))
        if len(keep) and len(keep) >= min_keep:
            return (keep if ids is None else ids[keep]), vals[keep], False
        all_ids = np.arange(len(vals)) if ids is None else ids
        order = _order_desc(vals, all_ids)
        ids, vals = all_ids[order], vals[order]
    elif ids is None:
        ids = np.arange(len(vals))
    threshold = np.float32(vals[0] + log_p)
    below = np.flatnonzero((vals < threshold) & (np.arange(len(vals)) >= min_keep))
    below = below[below >= 1]  # the first token always stays
    last = int(below[0]) if len(below) else len(vals)
    return ids[:last], vals[:last], True


def _dist(vals: np.ndarray, is_sorted: bool, rnd: float) -> int:
    """Softmax in float32, then the first candidate whose running (double) sum reaches rnd * total."""
    if len(vals) == 1:
        return 0
    mx = vals[0] if is_sorted else vals.max()
    probs = _expf(vals - mx)
    running = np.cumsum(probs, dtype=np.float64)
    hit = int(np.searchsorted(running, running[-1] * rnd, side="left"))
    return min(hit, len(vals) - 1)


class StopChecker:
    """End-of-generation tokens and stop strings, with hold-back of a partial stop-string match.

    feed_text returns the text that is safe to stream now and whether a stop string completed; text that
    might be the start of a stop string is held until it is ruled out (flush returns it at the end).
    """

    def __init__(self, eog_ids: Iterable[int] = (), stop_strings: Sequence[str] = ()) -> None:
        self.eog_ids = frozenset(eog_ids)
        self.stops = [s for s in stop_strings if s]
        self._held = ""
        self.stopped_by: str | None = None

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    def feed_text(self, text: str) -> tuple[str, bool]:
        buf = self._held + text
        first = None
        for s in self.stops:
            pos = buf.find(s)
            if pos >= 0 and (first is None or pos < first[0]):
                first = (pos, s)
        if first is not None:
            self._held = ""
            self.stopped_by = first[1]
            return buf[:first[0]], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial_len(self, buf: str) -> int:
        """Longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
