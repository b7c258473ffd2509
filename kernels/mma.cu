// Prefill MUL_MAT on tensor cores: dst[m, n] = sum_k A[k, m] * B[k, n] with A (any weight type of
// quant/all.cuh) dequantized to f16 tiles in shared memory, B (f32 activations) rounded to f16, products
// summed in f32 by mma.sync m16n8k16. Block tile 128 (rows of A) x BN (columns of B) x 32 (k), 8 warps as
// 4 x 2, each warp 32 x BN/2; fragments come from shared memory through ldmatrix; the next k-slice is read
// from global memory while the tensor cores work on the current one (two shared-memory buffers).
//
// Warps of 32 only (the fragment layout is defined per 32 lanes). On CUDA the fragments go through the
// real instructions; elsewhere (the host emulator, 32-wide HIP) through shuffles that follow the PTX
// fragment layout exactly, so the emulator tests this very tiling. 64-wide wavefronts use matmul.cu's tiles.
#include "common.cuh"
#include "quant/all.cuh"

#if HL_WARP == 32

#define MMA_BM 128
#define MMA_BK 32
#define MMA_LDS (MMA_BK + 8)  // halves per shared row: 80 bytes, so 8 rows of a fragment hit distinct banks

HL_DEV u32 pack_f16x2(float lo, float hi) {
#if defined(HL_CUDA)
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // one conversion for two values
    return r;
#else
    return (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
#endif
}

// Four 8x8 b16 matrices: lane l gives the address of row l % 8 of matrix l / 8; r[i] is matrix i's
// (row l / 4, columns 2 (l % 4), +1).
HL_DEV void ldmatrix_x4(u32* r, const u16* p) {
#if defined(HL_CUDA)
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u64 row = shfl_idx_u64((u64)p, 8 * i + (lane >> 2));
        r[i] = *(const u32*)((const u8*)row + 4 * (lane & 3));
    }
#endif
}

#if !defined(HL_CUDA)
HL_DEV float f16_lo(u32 v) { return f16_to_f32((u16)(v & 0xffffu)); }
HL_DEV float f16_hi(u32 v) { return f16_to_f32((u16)(v >> 16)); }
#endif

// c += A (16x16, fragments a[0..3]) * B (16x8, fragments b[0..1]), f16 inputs, f32 accumulators:
// c[0], c[1] = (row g, columns 2t, 2t+1), c[2], c[3] = (row g + 8, same), g = lane / 4, t = lane % 4.
HL_DEV void mma_16816(float* c, const u32* a, const u32* b) {
#if defined(HL_CUDA)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    // a0: (row g, k 2t..2t+1), a1: (row g+8, k 2t..), a2: (row g, k 8+2t..), a3: (row g+8, k 8+2t..);
    // b0: (k 2t..2t+1, column g), b1: (k 8+2t.., column g).
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int la = 4 * g + q, l0 = 4 * (2 * t) + q, l1 = 4 * (2 * t + 1) + q;
        const u32 a0 = shfl_idx_u32(a[0], la), a1 = shfl_idx_u32(a[1], la);
        const u32 a2 = shfl_idx_u32(a[2], la), a3 = shfl_idx_u32(a[3], la);
        const u32 b00 = shfl_idx_u32(b[0], l0), b10 = shfl_idx_u32(b[1], l0);
        const u32 b01 = shfl_idx_u32(b[0], l1), b11 = shfl_idx_u32(b[1], l1);
        c[0] += f16_lo(a0) * f16_lo(b00) + f16_hi(a0) * f16_hi(b00) + f16_lo(a2) * f16_lo(b10) + f16_hi(a2) * f16_hi(b10);
        c[1] += f16_lo(a0) * f16_lo(b01) + f16_hi(a0) * f16_hi(b01) + f16_lo(a2) * f16_lo(b11) + f16_hi(a2) * f16_hi(b11);
        c[2] += f16_lo(a1) * f16_lo(b00) + f16_hi(a1) * f16_hi(b00) + f16_lo(a3) * f16_lo(b10) + f16_hi(a3) * f16_hi(b10);
        c[3] += f16_lo(a1) * f16_lo(b01) + f16_hi(a1) * f16_hi(b01) + f16_lo(a3) * f16_lo(b11) + f16_hi(a3) * f16_hi(b11);
    }
#endif
}

// The 16 weights [16 g, 16 g + 16) of a row. Generic: two dequant8 calls; the common K-quants and Q8_0 read
// their 16 quants (and the super-block header) with one or two wide loads instead of ~8 narrow loads per 8
// weights, which bound the tile loop on the load/store unit.
template <class T>
struct Dequant16 {
    static HL_DEV void run(const u8* row, int g, float* y, int K) {
        T::dequant8(row, 2 * g, y, K);
        T::dequant8(row, 2 * g + 1, y + 8, K);
    }
};

// Q4_K/Q5_K: sub-block j = 2p + hi of a super-block; its scale and min from the 16-byte header.
HL_DEV void kq_sub_scale(uint4 h, int j, float* dl, float* ml) {
    const float d = f16_to_f32((u16)(h.x & 0xffffu)), dmin = f16_to_f32((u16)(h.x >> 16));
    const u32 sc12[3] = {h.y, h.z, h.w};
    auto byte = [&](int i) -> int { return (int)((i < 4 ? sc12[0] : (i < 8 ? sc12[1] : sc12[2])) >> (8 * (i & 3))) & 0xff; };
    int sc, m;
    if (j < 4) {
        sc = byte(j) & 63;
        m = byte(j + 4) & 63;
    } else {
        sc = (byte(j + 4) & 0xF) | ((byte(j - 4) >> 6) << 4);
        m = (byte(j + 4) >> 4) | ((byte(j) >> 6) << 4);
    }
    *dl = d * i2f(sc);
    *ml = dmin * i2f(m);
}

template <>
struct Dequant16<q4_K> {
    static HL_DEV void run(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 4) * 144;
        const int l0 = (g & 15) * 16, p = l0 >> 6, hi = (l0 >> 5) & 1;  // chunk of 64, nibble
        float dl, ml;
        kq_sub_scale(*(const uint4*)b, 2 * p + hi, &dl, &ml);
        const uint4 q = *(const uint4*)(b + 16 + 32 * p + (l0 & 31));
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 16; i++) y[i] = dl * i2f((w[i >> 2] >> (8 * (i & 3) + 4 * hi)) & 15) - ml;
    }
};

template <>
struct Dequant16<q5_K> {
    static HL_DEV void run(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 4) * 176;
        const int l0 = (g & 15) * 16, p = l0 >> 6, hi = (l0 >> 5) & 1;
        float dl, ml;
        kq_sub_scale(*(const uint4*)b, 2 * p + hi, &dl, &ml);
        const uint4 q = *(const uint4*)(b + 48 + 32 * p + (l0 & 31));
        const uint4 h = *(const uint4*)(b + 16 + (l0 & 31));
        const u32 w[4] = {q.x, q.y, q.z, q.w}, hb[4] = {h.x, h.y, h.z, h.w};
        const int bit = 2 * p + hi;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int sh = 8 * (i & 3);
            const int v = ((w[i >> 2] >> (sh + 4 * hi)) & 15) | (((hb[i >> 2] >> (sh + bit)) & 1) << 4);
            y[i] = dl * i2f(v) - ml;
        }
    }
};

template <>
struct Dequant16<q6_K> {
    static HL_DEV void run(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 4) * 210;
        const int e0 = (g & 15) * 16, h = e0 >> 7, q = (e0 >> 5) & 3, l = e0 & 31;  // half, quarter, offset
        u32 ql[4], qh[4];
        ld_words_a2<4>(b + 64 * h + 32 * (q & 1) + l, ql);
        ld_words_a2<4>(b + 128 + 32 * h + l, qh);
        const float dl = ld_f16(b + 208) * i2f((i8)b[192 + 8 * h + (l >> 4) + 2 * q]);
        const int sl = 4 * (q >> 1), sq = 2 * q;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int sh = 8 * (i & 3);
            const int v = ((ql[i >> 2] >> (sh + sl)) & 15) | (((qh[i >> 2] >> (sh + sq)) & 3) << 4);
            y[i] = dl * i2f(v - 32);
        }
    }
};

template <>
struct Dequant16<q8_0> {
    static HL_DEV void run(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 1) * 34;
        u32 w[4];
        ld_words_a2<4>(b + 2 + 16 * (g & 1), w);
        const float d = ld_f16(b);
#pragma unroll
        for (int i = 0; i < 16; i++) y[i] = i2f((i8)(w[i >> 2] >> (8 * (i & 3)))) * d;
    }
};

// One k-slice of the tile in registers: A groups (8 weights each) and B groups (8 activations each).
template <int BN>
struct MmaStage {
    static constexpr int AG = MMA_BM * MMA_BK / 8 / 256, BG = BN * MMA_BK / 8 / 256;
    float a[AG * 8];  // 16 consecutive weights
    uint4 b[BG];      // 8 f16 activations
};

// Row pointers a thread loads from: A rows tid / 2 (groups 2 (tid & 1) + {0, 1}), B rows (g >> 2) for its
// groups g = tid + 256 i (k group g & 3). B rows are f16, K8 (K rounded up to 8) long, zero padded.
template <class T, int BN>
HL_DEV void mma_load(MmaStage<BN>& st, const u8* arow, const u16* const* bcols, int k0, int K, int K8) {
    const int tid = threadIdx.x;
    static_assert(MmaStage<BN>::AG == 2, "a thread loads 16 consecutive weights");
    const int e0 = k0 + 16 * (tid & 1);
    if (arow && e0 < K) {
        Dequant16<T>::run(arow, e0 / 16, st.a, K);
    } else {
#pragma unroll
        for (int j = 0; j < 16; j++) st.a[j] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < MmaStage<BN>::BG; i++) {
        const int e0 = k0 + 8 * ((tid + 256 * i) & 3);
        st.b[i] = bcols[i] && e0 < K8 ? *(const uint4*)(bcols[i] + e0) : make_uint4(0, 0, 0, 0);
    }
}

template <int BN>
HL_DEV void mma_store(const MmaStage<BN>& st, u16* As, u16* Bs) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < MmaStage<BN>::AG; i++) {
        const float* w = st.a + 8 * i;
        *(uint4*)(As + (tid >> 1) * MMA_LDS + 8 * (2 * (tid & 1) + i)) =
            make_uint4(pack_f16x2(w[0], w[1]), pack_f16x2(w[2], w[3]), pack_f16x2(w[4], w[5]), pack_f16x2(w[6], w[7]));
    }
#pragma unroll
    for (int i = 0; i < MmaStage<BN>::BG; i++) {
        const int g = tid + 256 * i;
        *(uint4*)(Bs + (g >> 2) * MMA_LDS + 8 * (g & 3)) = st.b[i];
    }
}

// The 128 x BN tile of A rows from `arow` (this thread's loader row) times the B columns `bcols` (this
// thread's loader columns) over all of K, into acc (fragment layout of mma_16816).
template <class T, int BN>
HL_DEV void mma_tile(const u8* arow, const u16* const* bcols, int K, int K8, u16 (*As)[MMA_BM * MMA_LDS],
                     u16 (*Bs)[BN * MMA_LDS], float (*acc)[BN / 16][4]) {
    constexpr int WN = BN / 2, NT = WN / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;
    MmaStage<BN> st;
    mma_load<T, BN>(st, arow, bcols, 0, K, K8);
    mma_store<BN>(st, As[0], Bs[0]);
    __syncthreads();
    int buf = 0;
    for (int k0 = 0; k0 < K; k0 += MMA_BK) {
        const bool more = k0 + MMA_BK < K;
        if (more) mma_load<T, BN>(st, arow, bcols, k0 + MMA_BK, K, K8);  // in flight during the math
        const u16* as = As[buf];
        const u16* bs = Bs[buf];
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 16) {
            u32 a[2][4], b[NT][2];
#pragma unroll
            for (int i = 0; i < 2; i++)
                ldmatrix_x4(a[i], as + (wm * 32 + i * 16 + (lane & 15)) * MMA_LDS + ks + (lane >> 4) * 8);
#pragma unroll
            for (int j = 0; j < NT / 2; j++) {
                u32 r[4];
                ldmatrix_x4(r, bs + (wn * WN + j * 16 + (lane >> 4) * 8 + (lane & 7)) * MMA_LDS + ks + ((lane >> 3) & 1) * 8);
                b[2 * j][0] = r[0];
                b[2 * j][1] = r[1];
                b[2 * j + 1][0] = r[2];
                b[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < NT; j++) mma_16816(acc[i][j], a[i], b[j]);
        }
        if (more) {
            mma_store<BN>(st, As[buf ^ 1], Bs[buf ^ 1]);
            __syncthreads();
            buf ^= 1;
        }
    }
}

// Row m (within the tile) and column n of fragment value c of acc[i][j].
HL_DEV int frag_row(int i, int c) { return ((threadIdx.x >> 5) >> 1) * 32 + i * 16 + ((threadIdx.x & 31) >> 2) + 8 * (c >> 1); }
template <int BN>
HL_DEV int frag_col(int j, int c) { return ((threadIdx.x >> 5) & 1) * (BN / 2) + j * 8 + 2 * (threadIdx.x & 3) + (c & 1); }

// grid (tiles of M + M1 + M2, ceil(N / BN), ne12 * ne13), block 256. B: the activations as f16 rows of K8
// (k_to_f16), row n + N * blockIdx.z. Up to three matrices A, A1, A2 (same type and K, rows of
// nb01/nb01_1/nb01_2 bytes) share B (Q/K/V); their row tiles follow each other in blockIdx.x, outputs
// D/D1/D2 with column strides nb1/nb1_1/nb1_2. Batches with one matrix only.
template <class T, int BN>
HL_DEV void mul_mat_mma(const u8* A, const u16* B, u8* D, int K, int K8, int M, int N, i64 nb01, i64 nb02,
                        i64 nb03, i64 nb1, i64 nb2, i64 nb3, int ne12, int r2, int r3, const u8* A1, const u8* A2,
                        u8* D1, u8* D2, int M1, int M2, i64 nb01_1, i64 nb01_2, i64 nb1_1, i64 nb1_2) {
    constexpr int NT = BN / 16, BG = MmaStage<BN>::BG;
    __shared__ __align__(16) u16 As[2][MMA_BM * MMA_LDS];
    __shared__ __align__(16) u16 Bs[2][BN * MMA_LDS];
    const int tid = threadIdx.x;
    int bx = blockIdx.x;
    const int t0 = (M + MMA_BM - 1) / MMA_BM, t1 = (M1 + MMA_BM - 1) / MMA_BM;
    if (bx >= t0) {  // a later matrix (uniform over the block)
        bx -= t0;
        const bool one = bx < t1;
        if (!one) bx -= t1;
        A = one ? A1 : A2;
        D = one ? D1 : D2;
        M = one ? M1 : M2;
        nb01 = one ? nb01_1 : nb01_2;
        nb1 = one ? nb1_1 : nb1_2;
    }
    const int bm = bx * MMA_BM, bn = blockIdx.y * BN;
    const int i12 = blockIdx.z % ne12, i13 = blockIdx.z / ne12;
    const u8* arow = bm + (tid >> 1) < M ? A + (bm + (tid >> 1)) * nb01 + (i12 / r2) * nb02 + (i13 / r3) * nb03 : nullptr;
    const u16* bcols[BG];
#pragma unroll
    for (int i = 0; i < BG; i++) {
        const int n = bn + ((tid + 256 * i) >> 2);
        bcols[i] = n < N ? B + ((i64)n + (i64)N * blockIdx.z) * K8 : nullptr;
    }
    float acc[2][NT][4];
    mma_tile<T, BN>(arow, bcols, K, K8, As, Bs, acc);
    u8* d = D + i12 * nb2 + i13 * nb3;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int m = bm + frag_row(i, c), n = bn + frag_col<BN>(j, c);
                if (m < M && n < N) *(float*)(d + m * 4 + n * nb1) = acc[i][j][c];
            }
}

// MUL_MAT_ID for many tokens: dst[:, e, t] = A[:, :, ids[e, t]]^T B[:, e % ne11, t], one expert per
// blockIdx.z, its (slot, token) pairs listed by k_moe_route (pair p = slot + n_used * token), BN of them per
// tile; tiles blockIdx.y, + gridDim.y, ... up to the expert's count. grid (ceil(M / 128), tiles, n_expert).
template <class T, int BN>
HL_DEV void mul_mat_id_mma(const u8* A, const u16* B, u8* D, const i32* counts, const i32* lists, int cap, int K,
                           int K8, int M, int n_used, int ne11, i64 nb01, i64 nb02, i64 nb1, i64 nb2) {
    constexpr int NT = BN / 16, BG = MmaStage<BN>::BG;
    __shared__ __align__(16) u16 As[2][MMA_BM * MMA_LDS];
    __shared__ __align__(16) u16 Bs[2][BN * MMA_LDS];
    const int tid = threadIdx.x, e = blockIdx.z, bm = blockIdx.x * MMA_BM;
    const int count = counts[e];
    const i32* list = lists + (i64)e * cap;
    const u8* arow = bm + (tid >> 1) < M ? A + (bm + (tid >> 1)) * nb01 + e * nb02 : nullptr;
    for (int tile = blockIdx.y; tile * BN < count; tile += gridDim.y) {
        const int bn = tile * BN;
        const u16* bcols[BG];
#pragma unroll
        for (int i = 0; i < BG; i++) {
            const int n = bn + ((tid + 256 * i) >> 2);
            const int pr = n < count ? list[n] : -1;
            bcols[i] = pr >= 0 ? B + ((i64)((pr % n_used) % ne11) + (i64)ne11 * (pr / n_used)) * K8 : nullptr;
        }
        float acc[2][NT][4];
        __syncthreads();  // the previous tile's last reads of the shared buffers are done
        mma_tile<T, BN>(arow, bcols, K, K8, As, Bs, acc);
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int c2 = 0; c2 < 2; c2++) {
                const int n = bn + frag_col<BN>(j, c2);
                if (n >= count) continue;
                const int pr = list[n];
                u8* d = D + (pr % n_used) * nb1 + (pr / n_used) * nb2;
#pragma unroll
                for (int i = 0; i < 2; i++)
#pragma unroll
                    for (int c = c2; c < 4; c += 2) {
                        const int m = bm + frag_row(i, c);
                        if (m < M) *(float*)(d + m * 4) = acc[i][j][c];
                    }
            }
    }
}

#define MMA_ARGS                                                                                        \
    const u8 *A, const u16 *B, u8 *D, int K, int K8, int M, int N, i64 nb01, i64 nb02, i64 nb03, i64 nb1, \
        i64 nb2, i64 nb3, int ne12, int r2, int r3, const u8 *A1, const u8 *A2, u8 *D1, u8 *D2, int M1,   \
        int M2, i64 nb01_1, i64 nb01_2, i64 nb1_1, i64 nb1_2
#define MMA_PASS                                                                                        \
    A, B, D, K, K8, M, N, nb01, nb02, nb03, nb1, nb2, nb3, ne12, r2, r3, A1, A2, D1, D2, M1, M2, nb01_1,   \
        nb01_2, nb1_1, nb1_2

#define MMA_ID_ARGS                                                                                     \
    const u8 *A, const u16 *B, u8 *D, const i32 *counts, const i32 *lists, int cap, int K, int K8, int M, \
        int n_used, int ne11, i64 nb01, i64 nb02, i64 nb1, i64 nb2
#define MMA_ID_PASS A, B, D, counts, lists, cap, K, K8, M, n_used, ne11, nb01, nb02, nb1, nb2

#define HL_MMA_KERNELS(name, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 2) mul_mat_mma_##name(MMA_ARGS) {                 \
        mul_mat_mma<T, 128>(MMA_PASS);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) mul_mat_mma64_##name(MMA_ARGS) {                  \
        mul_mat_mma<T, 64>(MMA_PASS);                                                                   \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) mul_mat_id_mma_##name(MMA_ID_ARGS) {              \
        mul_mat_id_mma<T, 64>(MMA_ID_PASS);                                                             \
    }

HL_FOR_EACH_WEIGHT_TYPE(HL_MMA_KERNELS)

// f32 rows (ne0 = K; dims 1..3 with byte strides) -> f16 rows of K8 = K rounded up to 8, zero padded, row
// r = i1 + ne1 * (i2 + ne2 * i3): the tensor cores' activations, converted once per matmul input.
// grid (ceil(K8 / 256), min(rows, 65535), ceil(rows / 65535)), block 256.
extern "C" __global__ void __launch_bounds__(256) k_to_f16(const u8* x, u16* y, int K, int K8, int ne1, int ne2,
                                                           int ne3, i64 nb1, i64 nb2, i64 nb3) {
    const i64 r = blockIdx.y + (i64)blockIdx.z * gridDim.y;
    if (r >= (i64)ne1 * ne2 * ne3) return;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= K8) return;
    const int i1 = (int)(r % ne1), i2 = (int)((r / ne1) % ne2), i3 = (int)(r / ((i64)ne1 * ne2));
    const float v = i < K ? ((const float*)(x + i1 * nb1 + i2 * nb2 + i3 * nb3))[i] : 0.0f;
    y[r * K8 + i] = f32_to_f16(v);
}

// Expert e = blockIdx.x collects its (slot, token) pairs p = slot + n_used * token from ids (n_used x
// n_tokens, I32) into lists[e * cap ...] and their number into counts[e]; block 256. Out-of-range ids are
// reported (by block 0) and skipped. The order within a list is arbitrary: each pair is computed alone.
extern "C" __global__ void __launch_bounds__(256) k_moe_route(const u8* ids, i32* counts, i32* lists, int cap,
                                                              int n_used, int n_tokens, int n_expert, i64 nbi0,
                                                              i64 nbi1, int* err, int code) {
    __shared__ int cnt;
    if (threadIdx.x == 0) cnt = 0;
    __syncthreads();
    const int e = blockIdx.x;
    for (int p = threadIdx.x; p < n_used * n_tokens; p += blockDim.x) {
        const int ex = *(const i32*)(ids + (p % n_used) * nbi0 + (p / n_used) * nbi1);
        if (ex < 0 || ex >= n_expert) {
            if (e == 0) report_error(err, code);
        } else if (ex == e) {
            const int pos = atomicAdd(&cnt, 1);
            if (pos < cap) lists[(i64)e * cap + pos] = p;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) counts[e] = min(cnt, cap);
}

#else
// 64-wide wavefronts: no kernels here (matmul.cu's mul_mat_tile serves), but a module must define one.
extern "C" __global__ void mma_unavailable(int* p) { (void)p; }
#endif
