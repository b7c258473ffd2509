"""ggml's CPU float arithmetic, bit for bit: its AVX2 expf/silu approximations, 8-lane sums, glibc calls.

Quantized matmuls round activations to 8 bits, so a one-ulp difference anywhere upstream can flip a
rounding and grow into ~1e-2 relative logit differences a few layers later (measured with
hybridllm.testing.diffgraph on gemma3-270m). Matching llama.cpp's numbers therefore means reproducing
its float operations exactly, not just accurately. The reference is the peer's libggml-cpu, built for
AVX2 + FMA (no AVX-512), so vector code works on 8 float lanes.

Everything here is numba-jitted scalar code (callable from other jitted kernels):
* `fma32` is LLVM's fused multiply-add on float32 (one rounding, like `_mm256_fmadd_ps`);
* `v_expf` is ggml_v_expf for one lane (lanes are independent; the vector branch only skips work);
* `hsum8` is the lane order of ggml's `_mm256` horizontal float sums;
* numba's float32 `math.exp/cos/sin` call glibc's expf/cosf/sinf, as ggml's scalar code does (numpy's
  float32 exp and correctly rounded double-then-round both differ from glibc in ~1% of cases for cos).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np

F32 = np.float32


def _intrinsics() -> tuple[Any, Any, Any]:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def fma32(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            flt = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [flt], ir.FunctionType(flt, [flt, flt, flt]))
            return builder.call(fn, args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def f32_bits(typingctx: Any, x: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(types.float32), codegen

    @intrinsic
    def bits_f32(typingctx: Any, u: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def f16_round(typingctx: Any, x: Any) -> Any:
        """float32 -> nearest F16 (ties to even, like _mm256_cvtps_ph(x, 0)) -> float32."""
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.float32), codegen

    @intrinsic
    def f16_bits_f32(typingctx: Any, u: Any) -> Any:
        """The float32 value of F16 bits (exact)."""
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen

    return fma32, f32_bits, bits_f32, f16_round, f16_bits_f32


fma32, f32_bits, bits_f32, f16_round, f16_bits_f32 = _intrinsics()

# ggml_v_expf constants (ARM's optimized-routines expf, as ggml's AVX2 build uses them)
_R = F32(float.fromhex("0x1.8p23"))
_LOG2E = F32(float.fromhex("0x1.715476p+0"))
_LN2_HI = F32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = F32(float.fromhex("0x1.7f7d1cp-20"))
_C0 = F32(float.fromhex("0x1.0e4020p-7"))
_C1 = F32(float.fromhex("0x1.573e2ep-5"))
_C2 = F32(float.fromhex("0x1.555e66p-3"))
_C3 = F32(float.fromhex("0x1.fffdb6p-2"))
_C4 = F32(float.fromhex("0x1.ffffecp-1"))
_ONE_BITS = np.uint32(0x3F800000)


def v_expf(x: np.float32) -> np.float32:  # numba
    """One lane of ggml_v_expf (AVX2): exp(x) to ~1.5 ulp, FMAs where ggml has them."""
    z = fma32(x, _LOG2E, _R)
    n = z - _R
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    e = np.uint32((np.uint64(f32_bits(z)) << np.uint64(23)) & np.uint64(0xFFFFFFFF))
    k = bits_f32(np.uint32((np.uint64(e) + np.uint64(_ONE_BITS)) & np.uint64(0xFFFFFFFF)))
    u = b * b
    j = fma32(fma32(fma32(_C0, b, _C1), u, fma32(_C2, b, _C3)), u, _C4 * b)
    if not abs(n) > F32(126):
        return fma32(j, k, k)
    g = np.uint64(0x82000000) if n <= F32(0) else np.uint64(0)
    s1 = bits_f32(np.uint32((g + np.uint64(0x7F000000)) & np.uint64(0xFFFFFFFF)))
    if abs(n) > F32(192):
        return s1 * s1
    s2 = bits_f32(np.uint32((np.uint64(e) - g) & np.uint64(0xFFFFFFFF)))
    return fma32(s2, j, s2) * s1


def v_silu(x: np.float32) -> np.float32:  # numba
    """One lane of ggml_v_silu: x / (1 + v_expf(0 - x))."""
    return x / (F32(1) + v_expf(F32(0) - x))


def silu_f32(x: np.float32) -> np.float32:  # numba
    """ggml_silu_f32 (the scalar tail of a row): x / (1 + expf(-x)) with glibc's expf."""
    return x / (F32(1) + math.exp(-x))


def hsum8(v: np.ndarray, i: int) -> np.float32:  # numba
    """v[i:i+8] summed in the lane order of ggml's AVX2 reduction (128-bit halves, movehl, movehdup)."""
    a0 = v[i] + v[i + 4]
    a1 = v[i + 1] + v[i + 5]
    a2 = v[i + 2] + v[i + 6]
    a3 = v[i + 3] + v[i + 7]
    return (a0 + a2) + (a1 + a3)


def silu_row(x: np.ndarray, y: np.ndarray) -> None:  # numba
    """ggml_vec_silu_f32 over one row: vector lanes in blocks of 8 from the row start, scalar tail."""
    n = x.size
    n8 = n - n % 8
    for i in range(n8):
        y[i] = v_silu(x[i])
    for i in range(n8, n):
        y[i] = silu_f32(x[i])


def swiglu_row(x: np.ndarray, g: np.ndarray, y: np.ndarray) -> None:  # numba
    """ggml_vec_swiglu_f32: v_silu(x) * g in blocks of 8, silu_f32(x) * g for the tail."""
    n = x.size
    n8 = n - n % 8
    for i in range(n8):
        y[i] = v_silu(x[i]) * g[i]
    for i in range(n8, n):
        y[i] = silu_f32(x[i]) * g[i]


def soft_max_row(w: np.ndarray, y: np.ndarray, mx: np.float32) -> float:  # numba
    """ggml_vec_soft_max_f32: y = exp(w - max); returns the sum in double (per-8 float partial sums)."""
    n = w.size
    n8 = n - n % 8
    total = 0.0
    for i in range(0, n8, 8):
        for lane in range(8):
            y[i + lane] = v_expf(w[i + lane] - mx)
        total += np.float64(hsum8(y, i))
    for i in range(n8, n):
        v = np.float32(math.exp(w[i] - mx))
        total += np.float64(v)
        y[i] = v
    return total


def glibc_cos_sin(theta: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:  # numba
    """cosf/sinf of float32 angles (flat arrays), as glibc computes them."""
    for i in range(theta.size):
        cos[i] = math.cos(theta[i])
        sin[i] = math.sin(theta[i])


_COMPILED = ("v_expf", "v_silu", "silu_f32", "hsum8", "silu_row", "swiglu_row", "soft_max_row", "glibc_cos_sin")


@functools.cache
def compiled() -> dict[str, Callable[..., Any]]:
    """The functions above, jitted (once per process; numba's disk cache keeps the machine code)."""
    from .elementwise import njit_in_place
    njit_in_place(globals(), *_COMPILED)
    return {name: globals()[name] for name in _COMPILED}


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """numba.njit(cache=True) for kernels that call the functions above (compiled first)."""
    import numba
    compiled()
    return numba.njit(cache=True)(fn)
