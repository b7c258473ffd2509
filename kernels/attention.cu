// FLASH_ATTN_EXT: out[:, h, i, s] = softmax_j(scale * q.k_j (softcap, + slope * mask[j, i])) . v_j
// with GQA broadcast of K/V heads, optional sinks, and K/V in f32/f16/bf16 (the F16 KV cache).
//
// One block per (QB consecutive queries, head h, sequence s): grid (ceil(n_q / QB), H, S), NW warps. Each
// warp walks chunks of HL_WARP keys: lane j loads key j of the chunk once and scores it against the QB
// queries in shared memory (16-byte loads for an aligned F16 cache), the warp updates its QB online softmaxes
// once per chunk, then accumulates V: each lane owns a contiguous slice of the head dimension (one vector
// load per key) and the chunk's weights are broadcast by shuffles. Chunks every query masks out are skipped
// (causal prefill). The warps' partial (max, sum, accumulator) triples are merged at the end.
//   decode (one query): QB 1, 8 warps, so short caches still spread over many warps;
//   prefill: QB 8 (4 above head size 128), 4 warps: each key and value load serves QB queries.
// With oq, the output is also written as q8 (kernels/q8.cuh) for the matmul that reads it.
#include "common.cuh"
#include "q8.cuh"

#define FA_VB 8  // value rows loaded together

HL_DEV bool warp_any(bool p) { return warp_max(p ? 1.0f : 0.0f) > 0.0f; }

// VPL consecutive elements of a K/V row from element d0 (vec: f16 with the lane's slice 2*VPL-byte aligned).
HL_DEV void f16x2(u32 w, float* out) {
    out[0] = f16_to_f32((u16)(w & 0xffffu));
    out[1] = f16_to_f32((u16)(w >> 16));
}
template <int VPL>
HL_DEV void load_vals(const u8* row, int d0, int n, int type, bool vec, float* out) {
    if (vec && d0 + VPL <= n) {
        const u8* p = row + 2 * d0;
        if constexpr (VPL % 8 == 0) {
#pragma unroll
            for (int i = 0; i < VPL / 8; i++) {
                const uint4 u = ((const uint4*)p)[i];
                f16x2(u.x, out + 8 * i);
                f16x2(u.y, out + 8 * i + 2);
                f16x2(u.z, out + 8 * i + 4);
                f16x2(u.w, out + 8 * i + 6);
            }
            return;
        } else if constexpr (VPL == 4) {
            const uint2 u = *(const uint2*)p;
            f16x2(u.x, out);
            f16x2(u.y, out + 2);
            return;
        } else if constexpr (VPL == 2) {
            f16x2(*(const u32*)p, out);
            return;
        }
    }
    const int es = type == T_F32 ? 4 : 2;
#pragma unroll
    for (int t = 0; t < VPL; t++) out[t] = d0 + t < n ? load_elem(row + (d0 + t) * es, type) : 0.0f;
}

template <int MAXD, int QB, int NW>
HL_DEV void flash_attn(const u8* q, const u8* k, const u8* v, const u8* mask, const u8* sinks, u8* dst,
                       int kt, int vt, int mask_type, int kvec, int vvec, int D, int Dv, int n_q, int n_kv,
                       int rk2, int rk3, int rv2, int rv3, i64 nbq1, i64 nbq2, i64 nbq3, i64 nbk1, i64 nbk2,
                       i64 nbk3, i64 nbv1, i64 nbv2, i64 nbv3, int nm2, int nm3, i64 nbm1, i64 nbm2, i64 nbm3,
                       float scale, float max_bias, float m0, float m1, int n_head_log2, float softcap,
                       i64 nbd1, i64 nbd2, i64 nbd3, i8* oq, float* od) {
    constexpr int VPL = MAXD / HL_WARP;  // head-dim elements per lane in the V accumulator (contiguous)
    __shared__ __align__(16) float sq[QB][MAXD];
    __shared__ float sm_max[NW][QB], sm_sum[NW][QB];
    __shared__ __align__(16) float sm_acc[NW][QB][MAXD];
    const int i0 = blockIdx.x * QB, h = blockIdx.y, s = blockIdx.z;
    const int lane = threadIdx.x % HL_WARP, warp = threadIdx.x / HL_WARP;
    const int nq = min(QB, n_q - i0);

    for (int e = threadIdx.x; e < QB * MAXD; e += blockDim.x) {
        const int qi = e / MAXD, d = e % MAXD;
        sq[qi][d] = qi < nq && d < D ? ((const float*)(q + (i0 + qi) * nbq1 + h * nbq2 + s * nbq3))[d] : 0.0f;
    }
    __syncthreads();
    const float slope = max_bias > 0.0f ? (h < n_head_log2 ? powf(m0, (float)(h + 1))
                                                           : powf(m1, (float)(2 * (h - n_head_log2) + 1)))
                                        : 1.0f;
    const u8* kb = k + (h / rk2) * nbk2 + (s / rk3) * nbk3;
    const u8* vb = v + (h / rv2) * nbv2 + (s / rv3) * nbv3;
    const u8* mr = mask_type >= 0 ? mask + i0 * nbm1 + (h % nm2) * nbm2 + (s % nm3) * nbm3 : nullptr;

    float acc[QB][VPL], M[QB], S[QB];
#pragma unroll
    for (int qi = 0; qi < QB; qi++) {
        M[qi] = -f32_inf();
        S[qi] = 0.0f;
#pragma unroll
        for (int t = 0; t < VPL; t++) acc[qi][t] = 0.0f;
    }
    for (int c0 = warp * HL_WARP; c0 < n_kv; c0 += NW * HL_WARP) {
        const int j = c0 + lane;
        float sc[QB];
        bool any = false;
#pragma unroll
        for (int qi = 0; qi < QB; qi++) {
            float mv = -f32_inf();
            if (qi < nq && j < n_kv) {
                mv = 0.0f;
                if (mr) {
                    const u8* m = mr + qi * nbm1;
                    mv = slope * (mask_type == T_F16 ? f16_to_f32(((const u16*)m)[j]) : ((const float*)m)[j]);
                }
            }
            sc[qi] = mv;
            any |= mv != -f32_inf();
        }
        if (!warp_any(any)) continue;  // every query masks the whole chunk (warp-uniform)
        if (any) {
            float dot[QB];
#pragma unroll
            for (int qi = 0; qi < QB; qi++) dot[qi] = 0.0f;
            const u8* kr = kb + j * nbk1;
            if (kvec) {
                const int n8 = D / 8;
                for (int d0 = 0; d0 < n8; d0 += 4) {  // four 16-byte loads in flight, then their math
                    uint4 w[4];
#pragma unroll
                    for (int u = 0; u < 4; u++) w[u] = d0 + u < n8 ? ((const uint4*)kr)[d0 + u] : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        if (d0 + u >= n8) break;
                        const u32 words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
                        float kf[8];
#pragma unroll
                        for (int i = 0; i < 4; i++) f16x2(words[i], kf + 2 * i);
                        const int d8 = d0 + u;
#pragma unroll
                        for (int qi = 0; qi < QB; qi++)
#pragma unroll
                            for (int i = 0; i < 8; i++) dot[qi] += sq[qi][8 * d8 + i] * kf[i];
                    }
                }
            } else {
                const int es = kt == T_F32 ? 4 : 2;
                for (int d = 0; d < D; d++) {
                    const float kv = load_elem(kr + d * es, kt);
#pragma unroll
                    for (int qi = 0; qi < QB; qi++) dot[qi] += sq[qi][d] * kv;
                }
            }
#pragma unroll
            for (int qi = 0; qi < QB; qi++) {
                if (sc[qi] == -f32_inf()) continue;
                float x = dot[qi] * scale;
                if (softcap != 0.0f) x = softcap * tanhf(x);
                sc[qi] += x;
            }
        }
        float p[QB];
#pragma unroll
        for (int qi = 0; qi < QB; qi++) {
            const float Mnew = fmaxf(M[qi], warp_max(sc[qi]));
            p[qi] = sc[qi] == -f32_inf() ? 0.0f : expf(sc[qi] - Mnew);
            const float ms = Mnew == -f32_inf() ? 1.0f : expf(M[qi] - Mnew);  // 0 while M is still -inf
            S[qi] = S[qi] * ms + warp_sum(p[qi]);
            M[qi] = Mnew;
#pragma unroll
            for (int t = 0; t < VPL; t++) acc[qi][t] *= ms;
        }
        const int nk = min(HL_WARP, n_kv - c0);
        for (int k0 = 0; k0 < nk; k0 += FA_VB) {  // FA_VB value rows in flight, then their math
            float vv[FA_VB][VPL];
#pragma unroll
            for (int u = 0; u < FA_VB; u++) {
                if (k0 + u < nk) load_vals<VPL>(vb + (c0 + k0 + u) * nbv1, lane * VPL, Dv, vt, vvec != 0, vv[u]);
                else
#pragma unroll
                    for (int t = 0; t < VPL; t++) vv[u][t] = 0.0f;
            }
#pragma unroll
            for (int u = 0; u < FA_VB; u++) {
#pragma unroll
                for (int qi = 0; qi < QB; qi++) {
                    const float pk = shfl_idx(p[qi], min(k0 + u, HL_WARP - 1));  // rows past nk add 0 * 0
#pragma unroll
                    for (int t = 0; t < VPL; t++) acc[qi][t] += pk * vv[u][t];
                }
            }
        }
    }
#pragma unroll
    for (int qi = 0; qi < QB; qi++) {
        if (lane == 0) {
            sm_max[warp][qi] = M[qi];
            sm_sum[warp][qi] = S[qi];
        }
#pragma unroll
        for (int t = 0; t < VPL; t++) sm_acc[warp][qi][lane * VPL + t] = acc[qi][t];
    }
    __syncthreads();

    const float sink = sinks ? ((const float*)sinks)[h] : -f32_inf();
    for (int qi = 0; qi < nq; qi++) {
        float Mg = sink;
        for (int w = 0; w < NW; w++) Mg = fmaxf(Mg, sm_max[w][qi]);
        float denom = sinks ? expf(sink - Mg) : 0.0f;
        for (int w = 0; w < NW; w++)
            if (sm_max[w][qi] != -f32_inf()) denom += sm_sum[w][qi] * expf(sm_max[w][qi] - Mg);
        const i64 off = h * nbd1 + (i0 + qi) * nbd2 + s * nbd3;
        float* out = (float*)(dst + off);
        // with oq (dst contiguous, Dv % 32 == 0): the q8 copy of the output for the matmul reading it
        const i64 flat = off / 4;
        for (int d0 = 0; d0 < Dv; d0 += blockDim.x) {  // uniform trip count: q8 shuffles
            const int d = d0 + threadIdx.x;
            const bool ok = d < Dv;
            float o = 0.0f;
            if (ok) {
                for (int w = 0; w < NW; w++)
                    if (sm_max[w][qi] != -f32_inf()) o += sm_acc[w][qi][d] * expf(sm_max[w][qi] - Mg);
                o = denom > 0.0f ? o / denom : 0.0f;
                out[d] = o;
            }
            if (oq) q8_quantize32(o, threadIdx.x & 31, ok, oq + flat + (d & ~31), od + (flat + d) / 32);
        }
    }
}

#define FA_ARGS                                                                                              \
    const u8 *q, const u8 *k, const u8 *v, const u8 *mask, const u8 *sinks, u8 *dst, int kt, int vt,         \
        int mask_type, int kvec, int vvec, int D, int Dv, int n_q, int n_kv, int rk2, int rk3, int rv2,       \
        int rv3, i64 nbq1, i64 nbq2, i64 nbq3, i64 nbk1, i64 nbk2, i64 nbk3, i64 nbv1, i64 nbv2, i64 nbv3,    \
        int nm2, int nm3, i64 nbm1, i64 nbm2, i64 nbm3, float scale, float max_bias, float m0, float m1,      \
        int n_head_log2, float softcap, i64 nbd1, i64 nbd2, i64 nbd3, i8 *oq, float *od
#define FA_PASS                                                                                              \
    q, k, v, mask, sinks, dst, kt, vt, mask_type, kvec, vvec, D, Dv, n_q, n_kv, rk2, rk3, rv2, rv3, nbq1,    \
        nbq2, nbq3, nbk1, nbk2, nbk3, nbv1, nbv2, nbv3, nm2, nm3, nbm1, nbm2, nbm3, scale, max_bias, m0, m1, \
        n_head_log2, softcap, nbd1, nbd2, nbd3, oq, od

#define HL_FA_KERNEL(MAXD, QB, NW)                                                                           \
    extern "C" __global__ void __launch_bounds__(NW * HL_WARP) k_fa_##MAXD##_##QB##_##NW(FA_ARGS) {          \
        flash_attn<MAXD, QB, NW>(FA_PASS);                                                                   \
    }

// decode
HL_FA_KERNEL(64, 1, 8)
HL_FA_KERNEL(128, 1, 8)
HL_FA_KERNEL(256, 1, 8)
HL_FA_KERNEL(512, 1, 8)
// decode with fewer warps (HYBRIDLLM_FA_DECODE_WARPS, for measurements)
HL_FA_KERNEL(128, 1, 2)
HL_FA_KERNEL(128, 1, 4)
// prefill
HL_FA_KERNEL(64, 8, 4)
HL_FA_KERNEL(128, 8, 4)
HL_FA_KERNEL(256, 4, 4)
HL_FA_KERNEL(512, 1, 4)
