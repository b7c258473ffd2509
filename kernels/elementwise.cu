// Elementwise ops over 4-D strided tensors of f32/f16/bf16 (ggml type ids T_*): ADD/SUB/MUL/DIV with
// src1 broadcast by modulo, the UNARY family plus SCALE/CLAMP/SQR/SQRT/LOG/SIN/COS, and GLU.
//
// Launch shape for all of them: grid (ceil(ne0 / blockDim.x), min(rows, 65535), ceil(rows / 65535)),
// one row (i1, i2, i3) per (blockIdx.y, blockIdx.z), threads along i0.
#include "common.cuh"
#include "act.cuh"

HL_DEV bool row_index(int ne1, int ne2, int ne3, int* i1, int* i2, int* i3) {
    const i64 r = blockIdx.y + (i64)blockIdx.z * gridDim.y;
    if (r >= (i64)ne1 * ne2 * ne3) return false;
    *i1 = (int)(r % ne1);
    *i2 = (int)((r / ne1) % ne2);
    *i3 = (int)(r / ((i64)ne1 * ne2));
    return true;
}

enum { B_ADD = 2, B_SUB = 6, B_MUL = 7, B_DIV = 8 };  // ggml op ids

extern "C" __global__ void __launch_bounds__(1024) k_binary(
    int op, const u8* a, const u8* b, u8* d, int ta, int tb, int td, int ne0, int ne1, int ne2, int ne3,
    i64 nba0, i64 nba1, i64 nba2, i64 nba3, int neb0, int neb1, int neb2, int neb3, i64 nbb0, i64 nbb1,
    i64 nbb2, i64 nbb3, i64 nbd0, i64 nbd1, i64 nbd2, i64 nbd3) {
    int i1, i2, i3;
    if (!row_index(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const u8* ar = a + i1 * nba1 + i2 * nba2 + i3 * nba3;
    const u8* br = b + (i1 % neb1) * nbb1 + (i2 % neb2) * nbb2 + (i3 % neb3) * nbb3;
    u8* dr = d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3;
    for (int i0 = blockIdx.x * blockDim.x + threadIdx.x; i0 < ne0; i0 += blockDim.x * gridDim.x) {
        const float x = load_elem(ar + i0 * nba0, ta);
        const float y = load_elem(br + (i0 % neb0) * nbb0, tb);
        float r;
        if (op == B_ADD) r = x + y;
        else if (op == B_SUB) r = x - y;
        else if (op == B_MUL) r = x * y;
        else r = x / y;
        store_elem(dr + i0 * nbd0, td, r);
    }
}

// ggml_unary_op ids, then pseudo-ops for the separate ggml ops that map onto one input and two params.
enum {
    U_ABS = 0, U_SGN = 1, U_NEG = 2, U_STEP = 3, U_TANH = 4, U_ELU = 5, U_RELU = 6, U_SIGMOID = 7,
    U_GELU = 8, U_GELU_QUICK = 9, U_SILU = 10, U_HARDSWISH = 11, U_HARDSIGMOID = 12, U_EXP = 13,
    U_EXPM1 = 14, U_SOFTPLUS = 15, U_GELU_ERF = 16, U_FLOOR = 18, U_CEIL = 19, U_ROUND = 20, U_TRUNC = 21,
    U_SCALE = 100, U_CLAMP = 101, U_SQR = 102, U_SQRT = 103, U_LOG = 104, U_SIN = 105, U_COS = 106,
    U_LEAKY_RELU = 107,
};

HL_DEV float unary(int op, float x, float p0, float p1) {
    switch (op) {
        case U_ABS: return fabsf(x);
        case U_SGN: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
        case U_NEG: return -x;
        case U_STEP: return x > 0.0f ? 1.0f : 0.0f;
        case U_TANH: return tanhf(x);
        case U_ELU: return x > 0.0f ? x : expm1f(x);
        case U_RELU: return x > 0.0f ? x : 0.0f;
        case U_SIGMOID: return 1.0f / (1.0f + expf(-x));
        case U_GELU: return gelu_tanh(x);
        case U_GELU_QUICK: return gelu_quick(x);
        case U_SILU: return silu(x);
        case U_HARDSWISH: return x * fminf(1.0f, fmaxf(0.0f, (x + 3.0f) / 6.0f));
        case U_HARDSIGMOID: return fminf(1.0f, fmaxf(0.0f, (x + 3.0f) / 6.0f));
        case U_EXP: return expf(x);
        case U_EXPM1: return expm1f(x);
        case U_SOFTPLUS: return x > 20.0f ? x : log1pf(expf(x));
        case U_GELU_ERF: return gelu_erf(x);
        case U_FLOOR: return floorf(x);
        case U_CEIL: return ceilf(x);
        case U_ROUND: return roundf(x);
        case U_TRUNC: return truncf(x);
        case U_SCALE: return x * p0 + p1;
        case U_CLAMP: return fminf(fmaxf(x, p0), p1);
        case U_SQR: return x * x;
        case U_SQRT: return sqrtf(x);
        case U_LOG: return logf(x);
        case U_SIN: return sinf(x);
        case U_COS: return cosf(x);
        case U_LEAKY_RELU: return x > 0.0f ? x : x * p0;
        default: return x;
    }
}

extern "C" __global__ void __launch_bounds__(1024) k_unary(
    int op, float p0, float p1, const u8* a, u8* d, int ta, int td, int ne0, int ne1, int ne2, int ne3,
    i64 nba0, i64 nba1, i64 nba2, i64 nba3, i64 nbd0, i64 nbd1, i64 nbd2, i64 nbd3) {
    int i1, i2, i3;
    if (!row_index(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const u8* ar = a + i1 * nba1 + i2 * nba2 + i3 * nba3;
    u8* dr = d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3;
    for (int i0 = blockIdx.x * blockDim.x + threadIdx.x; i0 < ne0; i0 += blockDim.x * gridDim.x)
        store_elem(dr + i0 * nbd0, td, unary(op, load_elem(ar + i0 * nba0, ta), p0, p1));
}

// a and b are the gate and up operands (two tensors, or the two halves of one row: the host offsets b).
extern "C" __global__ void __launch_bounds__(1024) k_glu(
    int op, float alpha, float limit, const u8* a, const u8* b, u8* d, int ta, int td, int ne0, int ne1,
    int ne2, int ne3, i64 nba0, i64 nba1, i64 nba2, i64 nba3, i64 nbb0, i64 nbb1, i64 nbb2, i64 nbb3,
    i64 nbd0, i64 nbd1, i64 nbd2, i64 nbd3) {
    int i1, i2, i3;
    if (!row_index(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const u8* ar = a + i1 * nba1 + i2 * nba2 + i3 * nba3;
    const u8* br = b + i1 * nbb1 + i2 * nbb2 + i3 * nbb3;
    u8* dr = d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3;
    for (int i0 = blockIdx.x * blockDim.x + threadIdx.x; i0 < ne0; i0 += blockDim.x * gridDim.x) {
        const float x = load_elem(ar + i0 * nba0, ta), y = load_elem(br + i0 * nbb0, ta);
        store_elem(dr + i0 * nbd0, td, glu(op, x, y, alpha, limit));
    }
}
