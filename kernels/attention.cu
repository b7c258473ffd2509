// FLASH_ATTN_EXT: out[:, h, i, s] = softmax_j(scale * q.k_j (softcap, + slope * mask[j, i])) . v_j
// with GQA broadcast of K/V heads, optional sinks, and K/V in f32/f16/bf16 (the F16 KV cache).
//
// One block per (query i, head h, sequence s): grid (n_q, H, S), block FA_WARPS warps. Each warp walks
// chunks of HL_WARP keys: lane j scores key j of the chunk (full dot product against q in shared memory,
// 16-byte loads for an aligned F16 cache), the warp updates its online softmax once per chunk, then
// accumulates V with lanes splitting the head dimension and the chunk's weights broadcast by shuffles.
// The warps' partial (max, sum, accumulator) triples are merged at the end. Decode (n_q = 1) is the
// target; prefill runs the same kernel per query (K/V come again from L2).
#include "common.cuh"
#include "q8.cuh"

#define FA_WARPS 4

// q . k for one key row; kvec: f16 row with 16-byte aligned start and D % 8 == 0.
HL_DEV float fa_dot(const float* sq, const u8* kr, int D, int kt, bool kvec) {
    float dot = 0.0f;
    if (kvec) {
        const uint4* k4 = (const uint4*)kr;
        for (int d8 = 0; d8 < D / 8; d8++) {
            const uint4 w = k4[d8];
            const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                dot += sq[8 * d8 + 2 * i] * f16_to_f32((u16)(words[i] & 0xffffu));
                dot += sq[8 * d8 + 2 * i + 1] * f16_to_f32((u16)(words[i] >> 16));
            }
        }
    } else {
        const int es = kt == T_F32 ? 4 : 2;
        for (int d = 0; d < D; d++) dot += sq[d] * load_elem(kr + d * es, kt);
    }
    return dot;
}

template <int MAXD>
HL_DEV void flash_attn(const u8* q, const u8* k, const u8* v, const u8* mask, const u8* sinks, u8* dst,
                       int kt, int vt, int mask_type, int kvec, int D, int Dv, int n_kv, int rk2, int rk3,
                       int rv2, int rv3, i64 nbq1, i64 nbq2, i64 nbq3, i64 nbk1, i64 nbk2, i64 nbk3,
                       i64 nbv1, i64 nbv2, i64 nbv3, int nm2, int nm3, i64 nbm1, i64 nbm2, i64 nbm3,
                       float scale, float max_bias, float m0, float m1, int n_head_log2, float softcap,
                       i64 nbd1, i64 nbd2, i64 nbd3, i8* oq, float* od) {
    constexpr int PER = MAXD / HL_WARP;  // head-dim elements per lane in the V accumulator
    __shared__ float sq[MAXD];
    __shared__ float sm_max[FA_WARPS], sm_sum[FA_WARPS];
    __shared__ float sm_acc[FA_WARPS][MAXD];
    const int i = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
    const int lane = threadIdx.x % HL_WARP, warp = threadIdx.x / HL_WARP;
    const int ves = vt == T_F32 ? 4 : 2;

    const float* qp = (const float*)(q + i * nbq1 + h * nbq2 + s * nbq3);
    for (int d = threadIdx.x; d < D; d += blockDim.x) sq[d] = qp[d];
    __syncthreads();
    const float slope = max_bias > 0.0f ? (h < n_head_log2 ? powf(m0, (float)(h + 1))
                                                           : powf(m1, (float)(2 * (h - n_head_log2) + 1)))
                                        : 1.0f;
    const u8* kb = k + (h / rk2) * nbk2 + (s / rk3) * nbk3;
    const u8* vb = v + (h / rv2) * nbv2 + (s / rv3) * nbv3;
    const u8* mr = mask_type >= 0 ? mask + i * nbm1 + (h % nm2) * nbm2 + (s % nm3) * nbm3 : nullptr;

    float acc[PER];
#pragma unroll
    for (int t = 0; t < PER; t++) acc[t] = 0.0f;
    float M = -f32_inf(), S = 0.0f;
    for (int c0 = warp * HL_WARP; c0 < n_kv; c0 += FA_WARPS * HL_WARP) {
        const int j = c0 + lane;
        float sc = -f32_inf();
        if (j < n_kv) {
            float mv = 0.0f;
            if (mr) mv = slope * (mask_type == T_F16 ? f16_to_f32(((const u16*)mr)[j]) : ((const float*)mr)[j]);
            if (mv != -f32_inf()) {
                sc = fa_dot(sq, kb + j * nbk1, D, kt, kvec != 0) * scale;
                if (softcap != 0.0f) sc = softcap * tanhf(sc);
                sc += mv;
            }
        }
        const float Mnew = fmaxf(M, warp_max(sc));
        if (Mnew == -f32_inf()) continue;  // the whole chunk is masked (warp-uniform)
        const float p = sc == -f32_inf() ? 0.0f : expf(sc - Mnew);
        const float ms = expf(M - Mnew);  // 0 while M is still -inf
        S = S * ms + warp_sum(p);
        M = Mnew;
#pragma unroll
        for (int t = 0; t < PER; t++) acc[t] *= ms;
        const int nk = min(HL_WARP, n_kv - c0);
        for (int kk = 0; kk < nk; kk++) {
            const float pk = shfl_idx(p, kk);
            if (pk == 0.0f) continue;  // masked key (uniform across the warp)
            const u8* vr = vb + (c0 + kk) * nbv1;
#pragma unroll
            for (int t = 0; t < PER; t++) {
                const int d = lane + t * HL_WARP;
                if (d < Dv) acc[t] += pk * load_elem(vr + d * ves, vt);
            }
        }
    }
    if (lane == 0) {
        sm_max[warp] = M;
        sm_sum[warp] = S;
    }
#pragma unroll
    for (int t = 0; t < PER; t++) sm_acc[warp][lane + t * HL_WARP] = acc[t];
    __syncthreads();

    float Mg = -f32_inf();
    for (int w = 0; w < FA_WARPS; w++) Mg = fmaxf(Mg, sm_max[w]);
    const float sink = sinks ? ((const float*)sinks)[h] : -f32_inf();
    Mg = fmaxf(Mg, sink);
    float denom = sinks ? expf(sink - Mg) : 0.0f;
    for (int w = 0; w < FA_WARPS; w++)
        if (sm_max[w] != -f32_inf()) denom += sm_sum[w] * expf(sm_max[w] - Mg);
    const i64 off = h * nbd1 + i * nbd2 + s * nbd3;
    float* out = (float*)(dst + off);
    // with oq (dst contiguous, Dv % 32 == 0): the q8 copy of the output for the matmul reading it
    const i64 flat = off / 4;
    for (int d0 = 0; d0 < Dv; d0 += blockDim.x) {  // uniform trip count: q8 shuffles
        const int d = d0 + threadIdx.x;
        const bool ok = d < Dv;
        float o = 0.0f;
        if (ok) {
            for (int w = 0; w < FA_WARPS; w++)
                if (sm_max[w] != -f32_inf()) o += sm_acc[w][d] * expf(sm_max[w] - Mg);
            o = denom > 0.0f ? o / denom : 0.0f;
            out[d] = o;
        }
        if (oq) q8_quantize32(o, threadIdx.x & 31, ok, oq + flat + (d & ~31), od + (flat + d) / 32);
    }
}

#define FA_ARGS                                                                                          \
    const u8 *q, const u8 *k, const u8 *v, const u8 *mask, const u8 *sinks, u8 *dst, int kt, int vt,     \
        int mask_type, int kvec, int D, int Dv, int n_kv, int rk2, int rk3, int rv2, int rv3, i64 nbq1, i64 nbq2,   \
        i64 nbq3, i64 nbk1, i64 nbk2, i64 nbk3, i64 nbv1, i64 nbv2, i64 nbv3, int nm2, int nm3, i64 nbm1, \
        i64 nbm2, i64 nbm3, float scale, float max_bias, float m0, float m1, int n_head_log2,            \
        float softcap, i64 nbd1, i64 nbd2, i64 nbd3, i8 *oq, float *od
#define FA_PASS                                                                                            \
    q, k, v, mask, sinks, dst, kt, vt, mask_type, kvec, D, Dv, n_kv, rk2, rk3, rv2, rv3, nbq1, nbq2, nbq3, nbk1, \
        nbk2, nbk3, nbv1, nbv2, nbv3, nm2, nm3, nbm1, nbm2, nbm3, scale, max_bias, m0, m1, n_head_log2,   \
        softcap, nbd1, nbd2, nbd3, oq, od

extern "C" __global__ void __launch_bounds__(FA_WARPS * HL_WARP) k_flash_attn_256(FA_ARGS) {
    flash_attn<256>(FA_PASS);
}
extern "C" __global__ void __launch_bounds__(FA_WARPS * HL_WARP) k_flash_attn_512(FA_ARGS) {
    flash_attn<512>(FA_PASS);
}
