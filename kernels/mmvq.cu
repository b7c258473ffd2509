// Decode matrix-vector products on int8 activations (q8.cuh), with the epilogues that save launches:
//   k_quantize_q8       f32 rows -> q8 columns (one launch per matmul input, shared by its readers)
//   mmvq_<t>/mmvq8_<t>  up to three matrices sharing one input (Q/K/V): plain f32 rows, an f16/f32 KV-cache
//                       row store (SET_ROWS fused), a residual add (ADD fused); 1 or up to 8 columns
//   mmvq_glu_<t>        gate and up rows of one input, GLU of the two, optionally quantized again for the
//                       down projection (32 rows per block so one block owns whole q8 blocks)
//   mmvq_id_<t>         MUL_MAT_ID: one (slot, token) pair per blockIdx.y, the expert from the ids tensor
//   mmvq_id_glu_<t>     MUL_MAT_ID gate and up experts + GLU (+ q8 of the result)
//   mmvq_id_sum_<t>     MUL_MAT_ID down experts, weighted by the router and summed over slots (+ residual)
// One warp per output row; its lanes take consecutive 32-weight units of the row.
#include "common.cuh"
#include "act.cuh"
#include "q8.cuh"

#define MMV_WARPS 4                                  // rows per block of the plain kernels
#define GLU_WARPS (1024 / 2 / HL_WARP)                // warps per block of the 32-row kernels: two rows
                                                     // per warp (512 threads: an H100 holds 4 blocks)
#define GLU_RPW (32 / GLU_WARPS)                     // rows per warp there
#define ID_CHUNK 8                                   // experts whose loads mmvq_id_sum issues together

extern "C" __global__ void __launch_bounds__(256) k_quantize_q8(const u8* x, i8* q, float* d, int K, int ne1,
                                                                int ne2, int ne3, i64 nb1, i64 nb2, i64 nb3) {
    const i64 r = blockIdx.y + (i64)blockIdx.z * gridDim.y;
    if (r >= (i64)ne1 * ne2 * ne3) return;  // uniform over the block
    const int i1 = (int)(r % ne1), i2 = (int)((r / ne1) % ne2), i3 = (int)(r / ((i64)ne1 * ne2));
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool ok = i < K;
    const float v = ok ? ((const float*)(x + i1 * nb1 + i2 * nb2 + i3 * nb3))[i] : 0.0f;
    q8_quantize32(v, threadIdx.x & 31, ok, q + r * K + (i & ~31), d + r * (K >> 5) + (i >> 5));
}

// Partial dot products of one row with nc <= NC activation columns (column c at xq + c*K); every lane gets
// the full sums.
template <class V, int NC>
HL_DEV void vq_row(const u8* __restrict__ row, int K, const i8* __restrict__ xq, const float* __restrict__ xd,
                   int nc, float* acc) {
    const int nunits = K / V::QK * V::UPB;
#pragma unroll
    for (int c = 0; c < NC; c++) acc[c] = 0.0f;
#pragma unroll 2
    for (int u = threadIdx.x; u < nunits; u += HL_WARP) {
        typename V::W w;
        V::load(row, u, w);
#pragma unroll
        for (int c = 0; c < NC; c++)
            if (c < nc) acc[c] += V::dot(w, xq + (i64)c * K, xd + (i64)c * (K >> 5));
    }
#pragma unroll
    for (int c = 0; c < NC; c++)
        if (c < nc) acc[c] = warp_sum(acc[c]);  // nc is warp-uniform
}

// Two rows (gate, up) against one column.
template <class V>
HL_DEV void vq_row2(const u8* __restrict__ ra, const u8* __restrict__ rb, int K, const i8* __restrict__ x,
                    const float* __restrict__ xd, float* a, float* b) {
    const int nunits = K / V::QK * V::UPB;
    float sa = 0.0f, sb = 0.0f;
#pragma unroll 2
    for (int u = threadIdx.x; u < nunits; u += HL_WARP) {
        typename V::W wa, wb;
        V::load(ra, u, wa);
        V::load(rb, u, wb);
        sa += V::dot(wa, x, xd);
        sb += V::dot(wb, x, xd);
    }
    *a = warp_sum(sa);
    *b = warp_sum(sb);
}

HL_DEV i64 row_index(const u8* idx, int idx64, int n) {
    return idx64 ? ((const i64*)idx)[n] : (i64)((const i32*)idx)[n];
}

// Matrix j (0..2): A_j with rows of nb01_j bytes; output (m, n) at D_j + n*nbd_j + m*esz, or, with an index
// tensor I_j, at D_j + I_j[n]*nbd_j + m*esz (esz 2 when F16_j). R (f32, may be null) is added to matrix 0.
// Batches (ne12 x ne13 blocks in z) only with a single matrix. grid (ceil(sum M_j / MMV_WARPS),
// ceil(N / NC), ne12 * ne13), block (HL_WARP, MMV_WARPS).
template <class V, int NC>
HL_DEV void mmvq(const u8* A0, const u8* A1, const u8* A2, u8* D0, u8* D1, u8* D2, const u8* I0,
                 const u8* I1, const u8* I2, int M0, int M1, int M2, int F0, int F1, int F2, i64 nbd0,
                 i64 nbd1, i64 nbd2, i64 nb01_0, i64 nb01_1, i64 nb01_2, int idx64, const i8* xq,
                 const float* xd, const u8* R, i64 nbr1, int K, int N, i64 nb02, i64 nb03, int ne12, int r2,
                 int r3, i64 nbz2, i64 nbz3, i64 nbr2, i64 nbr3) {
    int m = blockIdx.x * MMV_WARPS + threadIdx.y, j = 0;
    if (m >= M0) {
        m -= M0;
        j = 1;
        if (m >= M1) {
            m -= M1;
            j = 2;
            if (m >= M2) return;  // the whole warp leaves together
        }
    }
    const u8* A = j == 0 ? A0 : (j == 1 ? A1 : A2);
    const i64 nb01 = j == 0 ? nb01_0 : (j == 1 ? nb01_1 : nb01_2);
    const int n0 = blockIdx.y * NC, nc = min(NC, N - n0);
    const int i12 = blockIdx.z % ne12, i13 = blockIdx.z / ne12;
    const i64 col0 = n0 + (i64)N * blockIdx.z;
    float res[NC];  // the residual, loaded before the row so that its memory trip overlaps
#pragma unroll
    for (int c = 0; c < NC; c++)
        res[c] = j == 0 && R && threadIdx.x == 0 && c < nc
                     ? *(const float*)(R + m * 4 + (n0 + c) * nbr1 + i12 * nbr2 + i13 * nbr3) : 0.0f;
    float acc[NC];
    vq_row<V, NC>(A + m * nb01 + (i12 / r2) * nb02 + (i13 / r3) * nb03, K, xq + col0 * K, xd + col0 * (K >> 5),
                  nc, acc);
    if (threadIdx.x != 0) return;
    u8* D = j == 0 ? D0 : (j == 1 ? D1 : D2);
    const u8* I = j == 0 ? I0 : (j == 1 ? I1 : I2);
    const i64 nbd = j == 0 ? nbd0 : (j == 1 ? nbd1 : nbd2);
    const int f16 = j == 0 ? F0 : (j == 1 ? F1 : F2);
    D += i12 * nbz2 + i13 * nbz3;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const int n = n0 + c;
        float v = acc[c];
        if (j == 0 && R) v += res[c];
        u8* d = D + (I ? row_index(I, idx64, n) : (i64)n) * nbd;
        if (f16) ((u16*)d)[m] = f32_to_f16(v);
        else ((float*)d)[m] = v;
    }
}

// 32 consecutive results of one column, one per (warp, r) slot in `sv`, written as f32 (D, may be null)
// and as one q8 block (oq/od, may be null). Called by the whole block after its rows are done.
HL_DEV void store32(const float* sv, int m0, int M, u8* D, i8* oq, float* od) {
    if (threadIdx.y != 0) return;
    const int l = threadIdx.x & 31;
    const bool mine = threadIdx.x < 32 && m0 + l < M;
    const float v = sv[l];
    if (D && mine) ((float*)D)[m0 + l] = v;
    if (oq) q8_quantize32(v, l, mine, oq + m0, od + (m0 >> 5));
}

// Rows m0.. m0+31 of gate (Ag) and up (Au) against one q8 column; GLU of the pairs into sv.
template <class V>
HL_DEV void glu_rows(const u8* Ag, const u8* Au, i64 nbg, i64 nbu, int m0, int M, int K, const i8* x,
                     const float* xd, int op, float alpha, float limit, float* sv) {
#pragma unroll
    for (int r = 0; r < GLU_RPW; r++) {
        const int ml = threadIdx.y * GLU_RPW + r, m = m0 + ml;
        float g = 0.0f, u = 0.0f;
        if (m < M) vq_row2<V>(Ag + m * nbg, Au + m * nbu, K, x, xd, &g, &u);
        if (threadIdx.x == 0) sv[ml] = m < M ? glu(op, g, u, alpha, limit) : 0.0f;
    }
    __syncthreads();
}

// GLU(gate row, up row) for column blockIdx.y: D (f32, column stride nbd1, may be null) and the q8 of the
// result (oq/od, columns of M; may be null). grid (ceil(M / 32), N), block (HL_WARP, GLU_WARPS).
template <class V>
HL_DEV void mmvq_glu(const u8* Ag, const u8* Au, i64 nbg, i64 nbu, u8* D, i64 nbd1, i8* oq, float* od,
                     const i8* xq, const float* xd, int K, int M, int op, float alpha, float limit) {
    __shared__ float sv[32];
    const int n = blockIdx.y, m0 = blockIdx.x * 32;
    glu_rows<V>(Ag, Au, nbg, nbu, m0, M, K, xq + (i64)n * K, xd + (i64)n * (K >> 5), op, alpha, limit, sv);
    store32(sv, m0, M, D ? D + n * nbd1 : nullptr, oq ? oq + (i64)n * M : nullptr,
            od ? od + (i64)n * (M >> 5) : nullptr);
}

// Expert of pair p = (slot e, token t) = (p % n_used, p / n_used), or -1 (reported) when out of range.
HL_DEV int expert_of(const u8* ids, i64 nbi0, i64 nbi1, int e, int t, int n_expert, int* err, int code) {
    const int ex = *(const i32*)(ids + e * nbi0 + t * nbi1);
    if (ex < 0 || ex >= n_expert) {
        if (threadIdx.x == 0 && threadIdx.y == 0) report_error(err, code);
        return -1;
    }
    return ex;
}

// dst[:, e, t] = A[:, :, ids[e, t]]^T x[:, e % ne11, t]; q8 column (e % ne11) + ne11 * t.
// grid (ceil(M / MMV_WARPS), n_used * n_tokens), block (HL_WARP, MMV_WARPS).
template <class V>
HL_DEV void mmvq_id(const u8* A, const i8* xq, const float* xd, const u8* ids, u8* D, int* err, int code, int K,
                    int M, int n_expert, int n_used, int ne11, i64 nb01, i64 nb02, i64 nbi0, i64 nbi1,
                    i64 nb1, i64 nb2) {
    const int m = blockIdx.x * MMV_WARPS + threadIdx.y;
    const int e = blockIdx.y % n_used, t = blockIdx.y / n_used;
    const int ex = expert_of(ids, nbi0, nbi1, e, t, n_expert, err, code);
    if (m >= M || ex < 0) return;
    const i64 col = (e % ne11) + (i64)ne11 * t;
    float acc[1];
    vq_row<V, 1>(A + m * nb01 + ex * nb02, K, xq + col * K, xd + col * (K >> 5), 1, acc);
    if (threadIdx.x == 0) *(float*)(D + m * 4 + e * nb1 + t * nb2) = acc[0];
}

// GLU of the gate and up experts of pair (e, t) (shared input column (e % ne11) + ne11 * t): D[:, e, t]
// (may be null) and the q8 column e + n_used * t of M values. grid (ceil(M / 32), n_used * n_tokens).
template <class V>
HL_DEV void mmvq_id_glu(const u8* Ag, const u8* Au, i64 nbg1, i64 nbg2, i64 nbu1, i64 nbu2, const i8* xq,
                        const float* xd, const u8* ids, u8* D, i8* oq, float* od, int* err, int code, int K,
                        int M, int n_expert, int n_used, int ne11, i64 nbi0, i64 nbi1, i64 nb1, i64 nb2,
                        int op, float alpha, float limit) {
    __shared__ float sv[32];
    const int e = blockIdx.y % n_used, t = blockIdx.y / n_used, m0 = blockIdx.x * 32;
    const int ex = expert_of(ids, nbi0, nbi1, e, t, n_expert, err, code);
    if (ex < 0) return;  // uniform over the block
    const i64 col = (e % ne11) + (i64)ne11 * t, ocol = e + (i64)n_used * t;
    glu_rows<V>(Ag + ex * nbg2, Au + ex * nbu2, nbg1, nbu1, m0, M, K, xq + col * K, xd + col * (K >> 5), op,
                alpha, limit, sv);
    store32(sv, m0, M, D ? D + e * nb1 + t * nb2 : nullptr, oq ? oq + ocol * M : nullptr,
            od ? od + ocol * (M >> 5) : nullptr);
}

// out[:, t] = sum_e w[e, t] * A[:, :, ids[e, t]]^T x[:, e, t] (+ R[:, t]): MUL_MAT_ID of the down experts, the
// router weights and the sum over slots in one pass. q8 column e + n_used * t (ne11 == n_used) or t (ne11 1).
// grid (ceil(M / MMV_WARPS), n_tokens), block (HL_WARP, MMV_WARPS).
template <class V>
HL_DEV void mmvq_id_sum(const u8* A, const i8* xq, const float* xd, const u8* ids, const u8* W, const u8* R,
                        u8* D, int* err, int code, int K, int M, int n_expert, int n_used, int ne11, i64 nb01,
                        i64 nb02, i64 nbi0, i64 nbi1, i64 nbw1, i64 nbw2, i64 nbr1, i64 nbd1) {
    const int m = blockIdx.x * MMV_WARPS + threadIdx.y, t = blockIdx.y;
    if (m >= M) return;
    const int nunits = K / V::QK * V::UPB;
    const float res = R && threadIdx.x == 0 ? *(const float*)(R + m * 4 + t * nbr1) : 0.0f;
    float acc = 0.0f;
    // ID_CHUNK experts at a time: their ids and weights, then their rows, each set of loads in flight together
    for (int e0 = 0; e0 < n_used; e0 += ID_CHUNK) {
        int ex[ID_CHUNK];
        float we[ID_CHUNK];
#pragma unroll
        for (int i = 0; i < ID_CHUNK; i++) {
            const int e = e0 + i;
            ex[i] = e < n_used ? expert_of(ids, nbi0, nbi1, e, t, n_expert, err, code) : -1;
            we[i] = e < n_used ? *(const float*)(W + e * nbw1 + t * nbw2) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < ID_CHUNK; i++) {
            if (ex[i] < 0) continue;  // uniform
            const i64 col = (e0 + i) % ne11 + (i64)ne11 * t;
            const i8* x = xq + col * K;
            const float* xs = xd + col * (K >> 5);
            const u8* row = A + m * nb01 + ex[i] * nb02;
            float s = 0.0f;
#pragma unroll 2
            for (int u = threadIdx.x; u < nunits; u += HL_WARP) {
                typename V::W w;
                V::load(row, u, w);
                s += V::dot(w, x, xs);
            }
            acc += we[i] * s;
        }
    }
    acc = warp_sum(acc);
    if (threadIdx.x == 0) *(float*)(D + m * 4 + t * nbd1) = acc + res;
}

#define MMVQ_ARGS                                                                                          \
    const u8 *A0, const u8 *A1, const u8 *A2, u8 *D0, u8 *D1, u8 *D2, const u8 *I0, const u8 *I1,            \
        const u8 *I2, int M0, int M1, int M2, int F0, int F1, int F2, i64 nbd0, i64 nbd1, i64 nbd2,           \
        i64 nb01_0, i64 nb01_1, i64 nb01_2, int idx64, const i8 *xq, const float *xd, const u8 *R, i64 nbr1, \
        int K, int N, i64 nb02, i64 nb03, int ne12, int r2, int r3, i64 nbz2, i64 nbz3, i64 nbr2, i64 nbr3
#define MMVQ_PASS                                                                                           \
    A0, A1, A2, D0, D1, D2, I0, I1, I2, M0, M1, M2, F0, F1, F2, nbd0, nbd1, nbd2, nb01_0, nb01_1, nb01_2,   \
        idx64, xq, xd, R, nbr1, K, N, nb02, nb03, ne12, r2, r3, nbz2, nbz3, nbr2, nbr3

#define HL_MMVQ_KERNELS(name, V)                                                                            \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * HL_WARP) mmvq_##name(MMVQ_ARGS) {              \
        mmvq<V, 1>(MMVQ_PASS);                                                                              \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * HL_WARP) mmvq8_##name(MMVQ_ARGS) {             \
        mmvq<V, 8>(MMVQ_PASS);                                                                              \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(GLU_WARPS * HL_WARP) mmvq_glu_##name(                      \
        const u8* Ag, const u8* Au, i64 nbg, i64 nbu, u8* D, i64 nbd1, i8* oq, float* od, const i8* xq,     \
        const float* xd, int K, int M, int op, float alpha, float limit) {                                  \
        mmvq_glu<V>(Ag, Au, nbg, nbu, D, nbd1, oq, od, xq, xd, K, M, op, alpha, limit);                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * HL_WARP) mmvq_id_##name(                       \
        const u8* A, const i8* xq, const float* xd, const u8* ids, u8* D, int* err, int code, int K, int M, \
        int n_expert, int n_used, int ne11, i64 nb01, i64 nb02, i64 nbi0, i64 nbi1, i64 nb1, i64 nb2) {     \
        mmvq_id<V>(A, xq, xd, ids, D, err, code, K, M, n_expert, n_used, ne11, nb01, nb02, nbi0, nbi1, nb1, \
                   nb2);                                                                                    \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(GLU_WARPS * HL_WARP) mmvq_id_glu_##name(                   \
        const u8* Ag, const u8* Au, i64 nbg1, i64 nbg2, i64 nbu1, i64 nbu2, const i8* xq, const float* xd,  \
        const u8* ids, u8* D, i8* oq, float* od, int* err, int code, int K, int M, int n_expert,            \
        int n_used, int ne11, i64 nbi0, i64 nbi1, i64 nb1, i64 nb2, int op, float alpha, float limit) {    \
        mmvq_id_glu<V>(Ag, Au, nbg1, nbg2, nbu1, nbu2, xq, xd, ids, D, oq, od, err, code, K, M, n_expert,   \
                       n_used, ne11, nbi0, nbi1, nb1, nb2, op, alpha, limit);                               \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * HL_WARP) mmvq_id_sum_##name(                   \
        const u8* A, const i8* xq, const float* xd, const u8* ids, const u8* W, const u8* R, u8* D,         \
        int* err, int code, int K, int M, int n_expert, int n_used, int ne11, i64 nb01, i64 nb02,           \
        i64 nbi0, i64 nbi1, i64 nbw1, i64 nbw2, i64 nbr1, i64 nbd1) {                                       \
        mmvq_id_sum<V>(A, xq, xd, ids, W, R, D, err, code, K, M, n_expert, n_used, ne11, nb01, nb02, nbi0,  \
                       nbi1, nbw1, nbw2, nbr1, nbd1);                                                       \
    }

HL_FOR_EACH_Q8_TYPE(HL_MMVQ_KERNELS)
