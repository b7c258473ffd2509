"""Bitwise comparison of our node results with ggml's (tests/numerics helpers)."""
from __future__ import annotations

import numpy as np

from hybridllm.ggml.types import type_name


def mismatches(res, out) -> tuple[int, int]:
    """(differing elements, total) between ggml's and our values of one node; NaN equals NaN and the
    sign of zero counts."""
    ref, ours = res.ref(out), res.ours(out)
    same = (ref == ours) & (np.signbit(ref) == np.signbit(ours))
    same |= np.isnan(ref) & np.isnan(ours)
    return int((~same).sum()), int(ref.size)


def assert_bitexact(res, *outs) -> None:
    """Every listed node equal to ggml's to the last bit."""
    for i, out in enumerate(outs):
        bad, total = mismatches(res, out)
        if bad:
            node = res.node(out)
            ref, ours = res.ref(out), res.ours(out)
            fin = np.isfinite(ref) & np.isfinite(ours)
            scale = max(float(np.abs(ref[fin]).max(initial=0)), 1e-30)
            err = float(np.abs(ours[fin] - ref[fin]).max(initial=0)) / scale
            raise AssertionError(f"output {i} ({node.op.name} {type_name(node.type)} {node.ne}): {bad} of {total} "
                                 f"elements differ, max rel err {err:.2e} over finite values")
