// Row movement: GET_ROWS (any weight type -> f32, or i32 -> i32), SET_ROWS (f32/f16 rows -> f32/f16/bf16
// destination rows chosen by I32/I64 indices), CPY/DUP/CONT (logical element order, type conversion) and
// a plain byte copy. Out-of-range indices are reported through `err` and the row is skipped.
#include "common.cuh"
#include "quant/all.cuh"

// Destination rows (i, j, k) of GET_ROWS/SET_ROWS are spread over (blockIdx.y, blockIdx.z).
HL_DEV bool dst_row(int n, int b1, int b2, int* i, int* j, int* k) {
    const i64 r = blockIdx.y + (i64)blockIdx.z * gridDim.y;
    if (r >= (i64)n * b1 * b2) return false;
    *i = (int)(r % n);
    *j = (int)((r / n) % b1);
    *k = (int)(r / ((i64)n * b1));
    return true;
}

HL_DEV i64 load_index(const u8* p, int idx64) { return idx64 ? *(const i64*)p : (i64)*(const i32*)p; }

// dst[:, i, j, k] = dequant(src[:, idx[i, j, k], j, k]); threads walk 8-element groups of the row.
template <class T>
HL_DEV void get_rows(const u8* src, const u8* idx, u8* dst, int* err, int err_code, int ne00, int nr,
                     i64 nb01, i64 nb02, i64 nb03, int n, int b1, int b2, i64 nbi0, i64 nbi1, i64 nbi2,
                     i64 nbd1, i64 nbd2, i64 nbd3) {
    int i, j, k;
    if (!dst_row(n, b1, b2, &i, &j, &k)) return;
    const i64 row = load_index(idx + i * nbi0 + j * nbi1 + k * nbi2, 0);
    if (row < 0 || row >= nr) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report_error(err, err_code);
        return;
    }
    const u8* s = src + row * nb01 + j * nb02 + k * nb03;
    float* d = (float*)(dst + i * nbd1 + j * nbd2 + k * nbd3);
    const int ngroups = (ne00 + 7) / 8;
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < ngroups; g += blockDim.x * gridDim.x) {
        float y[8];
        T::dequant8(s, g, y, ne00);
#pragma unroll
        for (int q = 0; q < 8; q++)
            if (8 * g + q < ne00) d[8 * g + q] = y[q];
    }
}

#define GR_ARGS                                                                                         \
    const u8 *src, const u8 *idx, u8 *dst, int *err, int err_code, int ne00, int nr, i64 nb01, i64 nb02, \
        i64 nb03, int n, int b1, int b2, i64 nbi0, i64 nbi1, i64 nbi2, i64 nbd1, i64 nbd2, i64 nbd3
#define GR_PASS src, idx, dst, err, err_code, ne00, nr, nb01, nb02, nb03, n, b1, b2, nbi0, nbi1, nbi2, nbd1, nbd2, nbd3

#define HL_GET_ROWS_KERNEL(name, T) \
    extern "C" __global__ void __launch_bounds__(1024) get_rows_##name(GR_ARGS) { get_rows<T>(GR_PASS); }
HL_FOR_EACH_WEIGHT_TYPE(HL_GET_ROWS_KERNEL)

// I32 tables keep their type (ggml_get_rows of an I32 tensor is I32).
extern "C" __global__ void __launch_bounds__(1024) get_rows_i32(GR_ARGS) {
    int i, j, k;
    if (!dst_row(n, b1, b2, &i, &j, &k)) return;
    const i64 row = load_index(idx + i * nbi0 + j * nbi1 + k * nbi2, 0);
    if (row < 0 || row >= nr) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report_error(err, err_code);
        return;
    }
    const i32* s = (const i32*)(src + row * nb01 + j * nb02 + k * nb03);
    i32* d = (i32*)(dst + i * nbd1 + j * nbd2 + k * nbd3);
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < ne00; e += blockDim.x * gridDim.x) d[e] = s[e];
}

// dst[:, idx[i, i02 % ni1, i03 % ni2], i02, i03] = convert(src[:, i, i02, i03])
extern "C" __global__ void __launch_bounds__(1024) k_set_rows(
    const u8* src, const u8* idx, u8* dst, int* err, int err_code, int ts, int td, int idx64, int ne0, int n,
    int ne2, int ne3, i64 nbs0, i64 nbs1, i64 nbs2, i64 nbs3, int ni1, int ni2, i64 nbi0, i64 nbi1, i64 nbi2,
    i64 nrows_dst, i64 nbd0, i64 nbd1, i64 nbd2, i64 nbd3) {
    int i, i02, i03;
    if (!dst_row(n, ne2, ne3, &i, &i02, &i03)) return;
    const i64 row = load_index(idx + i * nbi0 + (i02 % ni1) * nbi1 + (i03 % ni2) * nbi2, idx64);
    if (row < 0 || row >= nrows_dst) {
        if (threadIdx.x == 0 && blockIdx.x == 0) report_error(err, err_code);
        return;
    }
    const u8* s = src + i * nbs1 + i02 * nbs2 + i03 * nbs3;
    u8* d = dst + row * nbd1 + i02 * nbd2 + i03 * nbd3;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < ne0; e += blockDim.x * gridDim.x)
        store_elem(d + e * nbd0, td, load_elem(s + e * nbs0, ts));
}

// CPY/DUP/CONT: element n of src in logical order (i0 fastest) goes to element n of dst in its logical
// order; the shapes may differ, the counts match. One thread per element, grid-stride over i64 counts.
extern "C" __global__ void __launch_bounds__(1024) k_copy(
    const u8* s, u8* d, int ts, int td, i64 count, int sne0, int sne1, int sne2, i64 snb0, i64 snb1, i64 snb2,
    i64 snb3, int dne0, int dne1, int dne2, i64 dnb0, i64 dnb1, i64 dnb2, i64 dnb3) {
    const i64 step = (i64)blockDim.x * gridDim.x;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < count; e += step) {
        i64 q = e;
        const i64 a0 = q % sne0; q /= sne0;
        const i64 a1 = q % sne1; q /= sne1;
        const i64 a2 = q % sne2; q /= sne2;
        const u8* sp = s + a0 * snb0 + a1 * snb1 + a2 * snb2 + q * snb3;
        q = e;
        const i64 b0 = q % dne0; q /= dne0;
        const i64 b1 = q % dne1; q /= dne1;
        const i64 b2 = q % dne2; q /= dne2;
        u8* dp = d + b0 * dnb0 + b1 * dnb1 + b2 * dnb2 + q * dnb3;
        if (ts == td && ts != T_F32 && ts != T_I32) *(u16*)dp = *(const u16*)sp;  // exact bits, NaNs too
        else if (ts == td) *(u32*)dp = *(const u32*)sp;
        else store_elem(dp, td, load_elem(sp, ts));
    }
}

// Byte copy of `n` bytes; 16-byte words when both ends and the size allow it.
extern "C" __global__ void __launch_bounds__(1024) k_memcpy(const u8* s, u8* d, i64 n) {
    const i64 step = (i64)blockDim.x * gridDim.x;
    const i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if ((((u64)s | (u64)d | (u64)n) & 15) == 0) {
        const uint4* s4 = (const uint4*)s;
        uint4* d4 = (uint4*)d;
        for (i64 i = t; i < n / 16; i += step) d4[i] = s4[i];
    } else {
        for (i64 i = t; i < n; i += step) d[i] = s[i];
    }
}
