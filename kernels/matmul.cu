// MUL_MAT and MUL_MAT_ID: dst[m, n] = sum_k A[k, m] * B[k, n] for every weight type in quant/all.cuh.
//
// Weights are dequantized in registers (dequant8) and multiplied with f32 activations in f32. Decode is
// memory-bound (~20 flop per weight byte available on an H100, a Q4_K weight costs ~4), so integer dot
// products would not make it faster there, and f32 keeps the result closer to exact than ggml's Q8
// activation rounding. Three shapes:
//   mul_mat_vec_<t>   one warp per output row, N <= 8 columns per block (decode, small batches)
//   mul_mat_tile_<t>  64x64 output tiles through shared memory, 256 threads (prefill)
//   mul_mat_id_vec_<t> MoE: the expert row is chosen per (slot, token) from an I32 id tensor
#include "common.cuh"
#include "quant/all.cuh"

// Eight activations from element e0; plain weight types may end mid-group (K % 8 != 0).
template <class T>
HL_DEV void load_x8(const u8* row, int e0, int K, float* v) {
    const float* x = (const float*)row + e0;
    if (T::PLAIN && e0 + 8 > K) {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = e0 + i < K ? x[i] : 0.0f;
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = x[i];
    }
}

// One row of A against NC columns of B; each lane takes every HL_WARP-th group of 8 elements.
template <class T, int NC>
HL_DEV void row_dot(const u8* a, const u8* b, i64 nb11, int K, int nc, float* acc) {
    const int ngroups = (K + 7) / 8;
#pragma unroll
    for (int c = 0; c < NC; c++) acc[c] = 0.0f;
#pragma unroll 2
    for (int g = threadIdx.x; g < ngroups; g += HL_WARP) {
        float w[8];
        T::dequant8(a, g, w, K);
#pragma unroll
        for (int c = 0; c < NC; c++) {
            if (c < nc) {
                float x[8];
                load_x8<T>(b + c * nb11, 8 * g, K, x);
#pragma unroll
                for (int i = 0; i < 8; i++) acc[c] += w[i] * x[i];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < NC; c++) acc[c] = warp_sum(acc[c]);
}

// grid (ceil(M / blockDim.y), ceil(N / NC), ne12 * ne13), block (HL_WARP, rows per block)
template <class T, int NC>
HL_DEV void mul_mat_vec(const u8* A, const u8* B, u8* D, int K, int M, int N, i64 nb01, i64 nb02,
                        i64 nb03, i64 nb11, i64 nb12, i64 nb13, i64 nb1, i64 nb2, i64 nb3, int ne12,
                        int r2, int r3) {
    const int m = blockIdx.x * blockDim.y + threadIdx.y;
    if (m >= M) return;  // the whole warp leaves together
    const int n0 = blockIdx.y * NC;
    const int i12 = blockIdx.z % ne12, i13 = blockIdx.z / ne12;
    const u8* a = A + m * nb01 + (i12 / r2) * nb02 + (i13 / r3) * nb03;
    const u8* b = B + n0 * nb11 + i12 * nb12 + i13 * nb13;
    const int nc = min(NC, N - n0);
    float acc[NC];
    row_dot<T, NC>(a, b, nb11, K, nc, acc);
    if (threadIdx.x == 0) {
        u8* d = D + m * 4 + n0 * nb1 + i12 * nb2 + i13 * nb3;
#pragma unroll
        for (int c = 0; c < NC; c++)
            if (c < nc) *(float*)(d + c * nb1) = acc[c];
    }
}

#define MM_BM 64
#define MM_BN 64
#define MM_BK 32

// grid (ceil(M / 64), ceil(N / 64), ne12 * ne13), block 256 threads; each thread owns a 4x4 output tile.
template <class T>
HL_DEV void mul_mat_tile(const u8* A, const u8* B, u8* D, int K, int M, int N, i64 nb01, i64 nb02,
                         i64 nb03, i64 nb11, i64 nb12, i64 nb13, i64 nb1, i64 nb2, i64 nb3, int ne12,
                         int r2, int r3) {
    __shared__ float As[MM_BK][MM_BM + 4];
    __shared__ float Bs[MM_BK][MM_BN + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int bm = blockIdx.x * MM_BM, bn = blockIdx.y * MM_BN;
    const int i12 = blockIdx.z % ne12, i13 = blockIdx.z / ne12;
    const int lr = tid >> 2, lg = tid & 3;  // loader: tile row/column lr, 8-group lg of the k-slice
    const u8* arow = bm + lr < M ? A + (bm + lr) * nb01 + (i12 / r2) * nb02 + (i13 / r3) * nb03 : nullptr;
    const u8* bcol = bn + lr < N ? B + (bn + lr) * nb11 + i12 * nb12 + i13 * nb13 : nullptr;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += MM_BK) {
        float w[8], x[8];
        const int e0 = k0 + 8 * lg;
        if (arow && e0 < K) T::dequant8(arow, e0 / 8, w, K);
        else for (int i = 0; i < 8; i++) w[i] = 0.0f;
        if (bcol && e0 < K) load_x8<T>(bcol, e0, K, x);
        else for (int i = 0; i < 8; i++) x[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            As[8 * lg + i][lr] = w[i];
            Bs[8 * lg + i][lr] = x[i];
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < MM_BK; k++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = As[k][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = Bs[k][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    u8* d = D + i12 * nb2 + i13 * nb3;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int m = bm + ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int n = bn + tx * 4 + j;
            if (m < M && n < N) *(float*)(d + m * 4 + n * nb1) = acc[i][j];
        }
    }
}

// MUL_MAT_ID, one (slot e, token t) pair per blockIdx.y: dst[:, e, t] = A[:, :, ids[e, t]]^T B[:, e % ne11, t]
// grid (ceil(M / blockDim.y), n_used * n_tokens), block (HL_WARP, rows per block)
template <class T>
HL_DEV void mul_mat_id_vec(const u8* A, const u8* B, const u8* ids, u8* D, int* err, int err_code, int K,
                           int M, int n_expert, int n_used, int ne11, i64 nb01, i64 nb02, i64 nb11,
                           i64 nb12, i64 nbi0, i64 nbi1, i64 nb1, i64 nb2) {
    const int m = blockIdx.x * blockDim.y + threadIdx.y;
    if (m >= M) return;
    const int e = blockIdx.y % n_used, t = blockIdx.y / n_used;
    const int expert = *(const i32*)(ids + e * nbi0 + t * nbi1);
    if (expert < 0 || expert >= n_expert) {
        if (threadIdx.x == 0) report_error(err, err_code);
        return;
    }
    const u8* a = A + m * nb01 + expert * nb02;
    const u8* b = B + (e % ne11) * nb11 + t * nb12;
    float acc[1];
    row_dot<T, 1>(a, b, nb11, K, 1, acc);
    if (threadIdx.x == 0) *(float*)(D + m * 4 + e * nb1 + t * nb2) = acc[0];
}

#define MM_ARGS                                                                                         \
    const u8 *A, const u8 *B, u8 *D, int K, int M, int N, i64 nb01, i64 nb02, i64 nb03, i64 nb11,       \
        i64 nb12, i64 nb13, i64 nb1, i64 nb2, i64 nb3, int ne12, int r2, int r3
#define MM_PASS A, B, D, K, M, N, nb01, nb02, nb03, nb11, nb12, nb13, nb1, nb2, nb3, ne12, r2, r3

#define HL_MATMUL_KERNELS(name, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(1024) mul_mat_vec_##name(MM_ARGS) {                   \
        mul_mat_vec<T, 1>(MM_PASS);                                                                     \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) mul_mat_vec8_##name(MM_ARGS) {                  \
        mul_mat_vec<T, 8>(MM_PASS);                                                                     \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) mul_mat_tile_##name(MM_ARGS) {                   \
        mul_mat_tile<T>(MM_PASS);                                                                       \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) mul_mat_id_vec_##name(                          \
        const u8* A, const u8* B, const u8* ids, u8* D, int* err, int err_code, int K, int M,          \
        int n_expert, int n_used, int ne11, i64 nb01, i64 nb02, i64 nb11, i64 nb12, i64 nbi0, i64 nbi1, \
        i64 nb1, i64 nb2) {                                                                             \
        mul_mat_id_vec<T>(A, B, ids, D, err, err_code, K, M, n_expert, n_used, ne11, nb01, nb02, nb11,  \
                          nb12, nbi0, nbi1, nb1, nb2);                                                  \
    }

HL_FOR_EACH_WEIGHT_TYPE(HL_MATMUL_KERNELS)
