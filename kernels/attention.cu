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

// ---- decode (one query) split over the keys -----------------------------------------------------------
// The kernel above gives each head one block whose few warps walk the keys one chunk at a time, each step a
// dependent load: at short contexts it is latency-bound (~20 us per layer on an H100). Here a block owns
// FAD_R query heads that share one K/V head (GQA: each K/V row is loaded once for all of them) and a range
// of keys; grid (n_split, H / FAD_R, S). Per tile of FAD_TILE keys every thread issues its K, V and mask
// loads together (one memory round trip), FAD_TPK threads score each key, the block updates its online
// softmaxes in shared memory, and each thread accumulates 8 value dimensions of a few keys. The block's
// partial (max, sum, accumulator) goes to `part`; the last block of a (head group, sequence) to finish,
// counted in `cnt` (zero before the launch, zero again after it), merges the partials and writes the output.
#define FAD_NT 128   // threads per block
#define FAD_TILE 32  // keys per tile (a sub-warp of 32 lanes reduces a tile's scores on any warp width)
#define FAD_TPK 4    // threads scoring one key
#define FAD_R 4      // most query heads per block (more blocks beat reusing K/V across 8 heads at short contexts)
#define FAD_MAX_SPLIT 64  // most key splits (cupy_ops/attention.py)

// q8 copy (kernels/q8.cuh layout) of 32 values held 4 per thread by 8 consecutive threads (of 32 aligned
// ones): int8 values at q (the thread's 4), the block scale at *d.
HL_DEV void q8_quantize4x8(float4 v, int lane32, bool store, i8* q, float* d) {
    const float amax = warp_max<8>(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    const float sc = amax / 127.0f;
    if (!store) return;
    const float vs[4] = {v.x, v.y, v.z, v.w};
    u32 packed = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int qi = amax == 0.0f ? 0 : (int)roundf(vs[i] / sc);
        packed |= (u32)(u8)(i8)qi << (8 * i);
    }
    *(u32*)q = packed;
    if (lane32 % 8 == 0) *d = sc;
}

HL_DEV void f16x8(uint4 w, float* out) {  // eight f16 values of one 16-byte load
    f16x2(w.x, out);
    f16x2(w.y, out + 2);
    f16x2(w.z, out + 4);
    f16x2(w.w, out + 6);
}

// One tile's loads: this thread's K slices (score phase), V rows (value phase) and mask values.
template <int MAXD>
struct FadTile {
    static constexpr int NG = MAXD / 8, NKS = FAD_NT / NG, KPT = FAD_TILE / NKS, KLD = MAXD / 8 / FAD_TPK;
    uint4 kw[KLD], vw[KPT];
    float mv[FAD_R];

    HL_DEV void load(const u8* kb, const u8* vb, const u8* mask, int mask_type, int nm2, i64 nbm2, i64 mo,
                     int h0, int nr, int D, int Dv, i64 nbk1, i64 nbv1, int c0, int j_end, int t) {
        const int kk = t / FAD_TPK, kp = t % FAD_TPK, g = t % NG, ks = t / NG;
        const int j = c0 + kk;
        const bool kok = j < j_end;
#pragma unroll
        for (int u = 0; u < KLD; u++) {
            const int w = u * FAD_TPK + kp;
            kw[u] = kok && w < D / 8 ? ((const uint4*)(kb + j * nbk1))[w] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < KPT; u++) {
            const int jv = c0 + ks + u * NKS;
            vw[u] = jv < j_end && g < Dv / 8 ? ((const uint4*)(vb + jv * nbv1))[g] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int r = 0; r < FAD_R; r++) {
            float m = kok ? 0.0f : -f32_inf();
            if (mask_type >= 0 && kp == 0 && kok && r < nr && (r == 0 || nm2 > 1)) {
                const u8* row = mask + ((h0 + r) % nm2) * nbm2 + mo;
                m = mask_type == T_F16 ? f16_to_f32(((const u16*)row)[j]) : ((const float*)row)[j];
            }
            mv[r] = nm2 == 1 && r > 0 ? mv[0] : m;
        }
    }
};

template <int MAXD, bool VEC>
HL_DEV void flash_attn_decode(const u8* q, const u8* k, const u8* v, const u8* mask, const u8* sinks, u8* dst,
                                 int D, int Dv, int n_kv, int nr, int rk2, int rk3, int rv2, int rv3, i64 nbq2,
                                 i64 nbq3, i64 nbk1, i64 nbk2, i64 nbk3, i64 nbv1, i64 nbv2, i64 nbv3,
                                 int mask_type, int nm2, int nm3, i64 nbm2, i64 nbm3, float scale, float max_bias,
                                 float m0, float m1, int n_head_log2, float softcap, i64 nbd1, i64 nbd3, i8* oq,
                                 float* od, float* part, int* cnt, int tiles_per_split) {
    using Tile = FadTile<MAXD>;
    constexpr int NG = Tile::NG, NKS = Tile::NKS, KPT = Tile::KPT, KLD = Tile::KLD;
    __shared__ __align__(16) float sq[FAD_R][MAXD];
    __shared__ float ssc[FAD_R][FAD_TILE];
    __shared__ float sM[FAD_R], sS[FAD_R], sA[FAD_R], sl[FAD_R];
    __shared__ __align__(16) float sacc[NKS][FAD_R][8 * NG];
    const int split = blockIdx.x, hg = blockIdx.y, s = blockIdx.z, t = threadIdx.x;
    const int h0 = hg * nr;
    const u8* kb = k + (h0 / rk2) * nbk2 + (s / rk3) * nbk3;
    const u8* vb = v + (h0 / rv2) * nbv2 + (s / rv3) * nbv3;
    const i64 mo = (s % nm3) * nbm3;
    const int j_begin = split * tiles_per_split * FAD_TILE, j_end = min(n_kv, j_begin + tiles_per_split * FAD_TILE);
    Tile cur;  // the first tile's loads go out before Q is staged: the two memory trips overlap
    cur.load(kb, vb, mask, mask_type, nm2, nbm2, mo, h0, nr, D, Dv, nbk1, nbv1, j_begin, j_end, t);
    for (int e = t; e < FAD_R * MAXD; e += FAD_NT) {
        const int r = e / MAXD, d = e % MAXD;
        sq[r][d] = r < nr && d < D ? ((const float*)(q + (h0 + r) * nbq2 + s * nbq3))[d] : 0.0f;
    }
    if (t < FAD_R) {
        const int h = h0 + t;
        sM[t] = -f32_inf();
        sS[t] = 0.0f;
        sl[t] = max_bias > 0.0f ? (h < n_head_log2 ? powf(m0, (float)(h + 1))
                                                   : powf(m1, (float)(2 * (h - n_head_log2) + 1)))
                                : 1.0f;
    }
    __syncthreads();
    const int kk = t / FAD_TPK, kp = t % FAD_TPK;
    const int g = t % NG, ks = t / NG;
    float acc[FAD_R][8];
#pragma unroll
    for (int r = 0; r < FAD_R; r++)
#pragma unroll
        for (int i = 0; i < 8; i++) acc[r][i] = 0.0f;
    for (int c0 = j_begin; c0 < j_end; c0 += FAD_TILE) {
        if (c0 > j_begin) cur.load(kb, vb, mask, mask_type, nm2, nbm2, mo, h0, nr, D, Dv, nbk1, nbv1, c0, j_end, t);
        float dot[FAD_R];
#pragma unroll
        for (int r = 0; r < FAD_R; r++) dot[r] = 0.0f;
#pragma unroll
        for (int u = 0; u < KLD; u++) {
            const int e0 = 8 * (u * FAD_TPK + kp);
            float kf[8];
            f16x8(cur.kw[u], kf);
#pragma unroll
            for (int r = 0; r < FAD_R; r++) {
                const float4 qa = *(const float4*)&sq[r][e0], qb = *(const float4*)&sq[r][e0 + 4];
                dot[r] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3];
                dot[r] += qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
            }
        }
#pragma unroll
        for (int r = 0; r < FAD_R; r++) {
            const float d = warp_sum<FAD_TPK>(dot[r]);
            if (kp == 0 && r < nr) {
                float x = d * scale;
                if (softcap != 0.0f) x = softcap * tanhf(x);
                ssc[r][kk] = cur.mv[r] != -f32_inf() ? x + sl[r] * cur.mv[r] : -f32_inf();
            }
        }
        __syncthreads();
        for (int e = t; e < FAD_R * FAD_TILE; e += FAD_NT) {
            const int r = e / FAD_TILE, c = e % FAD_TILE;
            const float x = r < nr ? ssc[r][c] : -f32_inf();
            const float Mold = sM[r];
            const float Mnew = fmaxf(Mold, warp_max<FAD_TILE>(x));
            const float p = x == -f32_inf() ? 0.0f : expf(x - Mnew);
            const float sum = warp_sum<FAD_TILE>(p);
            ssc[r][c] = p;
            if (c == 0) {
                const float a = Mnew == -f32_inf() ? 1.0f : expf(Mold - Mnew);
                sA[r] = a;
                sS[r] = sS[r] * a + sum;
                sM[r] = Mnew;
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < FAD_R; r++) {
            const float a = sA[r];
#pragma unroll
            for (int i = 0; i < 8; i++) acc[r][i] *= a;
        }
#pragma unroll
        for (int u = 0; u < KPT; u++) {
            float vf[8];
            f16x8(cur.vw[u], vf);
#pragma unroll
            for (int r = 0; r < FAD_R; r++) {
                const float p = ssc[r][ks + u * NKS];
#pragma unroll
                for (int i = 0; i < 8; i++) acc[r][i] += p * vf[i];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < FAD_R; r++)
#pragma unroll
        for (int i = 0; i < 8; i++) sacc[ks][r][8 * g + i] = acc[r][i];
    __syncthreads();
    // the block's partial: values (n_split, FAD_R, MAXD) then (max, sum) pairs, per (sequence, head group)
    const int n_split = gridDim.x;
    const i64 grp = (i64)s * gridDim.y + hg;
    float* pv = part + grp * n_split * FAD_R * MAXD;
    float* pms = part + (i64)gridDim.z * gridDim.y * n_split * FAD_R * MAXD + grp * n_split * FAD_R * 2;
    for (int e = t; e < nr * MAXD; e += FAD_NT) {
        const int r = e / MAXD, d = e % MAXD;
        float o = 0.0f;
        for (int w = 0; w < NKS; w++) o += sacc[w][r][d];
        pv[(split * FAD_R + r) * MAXD + d] = o;
    }
    if (t < nr) {
        pms[(split * FAD_R + t) * 2] = sM[t];
        pms[(split * FAD_R + t) * 2 + 1] = sS[t];
    }
    if (!last_block_done(cnt + grp, n_split)) return;
    // The last block merges the splits of each head (sinks join the softmax without a value row): the
    // (max, sum) pairs into shared memory, each head's merge weights, then the values.
    float* sMw = &sacc[0][0][0];                          // [n_split][FAD_R]: maxima, then merge weights
    float* sSw = &sacc[0][0][0] + FAD_MAX_SPLIT * FAD_R;  // [n_split][FAD_R]: sums
    for (int e = t; e < n_split * FAD_R; e += FAD_NT) {
        const bool ok = e % FAD_R < nr;
        sMw[e] = ok ? ld_cg(pms + 2 * e) : -f32_inf();
        sSw[e] = ok ? ld_cg(pms + 2 * e + 1) : 0.0f;
    }
    __syncthreads();
    if (t < nr) {
        const float sink = sinks ? ((const float*)sinks)[h0 + t] : -f32_inf();
        float Mg = sink;
        for (int w = 0; w < n_split; w++) Mg = fmaxf(Mg, sMw[w * FAD_R + t]);
        float denom = sinks ? expf(sink - Mg) : 0.0f;
        for (int w = 0; w < n_split; w++) {
            const float Mw = sMw[w * FAD_R + t];
            const float f = Mw == -f32_inf() ? 0.0f : expf(Mw - Mg);
            denom += sSw[w * FAD_R + t] * f;
            sMw[w * FAD_R + t] = f;
        }
        sl[t] = denom > 0.0f ? 1.0f / denom : 0.0f;
    }
    __syncthreads();
    if constexpr (VEC) {
        // groups of 32 threads take whole heads; each thread 4 consecutive dimensions (16-byte loads of
        // every split together), and with oq the q8 copy: 8 threads per block of 32 values
        const int lane = t % 32, grp32 = t / 32;
        for (int r = grp32; r < nr; r += FAD_NT / 32) {
            const i64 off = (h0 + r) * nbd1 + s * nbd3;
            for (int d0 = 0; d0 < MAXD; d0 += 128) {  // uniform per group of 32
                const int d = d0 + 4 * lane;
                const bool ok = d < Dv;
                float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (ok) {
#pragma unroll 8
                    for (int w = 0; w < n_split; w++) {
                        const float f = sMw[w * FAD_R + r];
                        const float4 u = ld_cg4(pv + (w * FAD_R + r) * MAXD + d);
                        o.x += f * u.x;
                        o.y += f * u.y;
                        o.z += f * u.z;
                        o.w += f * u.w;
                    }
                    const float il = sl[r];
                    o = make_float4(o.x * il, o.y * il, o.z * il, o.w * il);
                    *(float4*)(dst + off + 4 * (i64)d) = o;
                }
                if (oq) q8_quantize4x8(o, lane, ok, oq + off / 4 + d, od + (off / 4 + d) / 32);
            }
        }
    } else {
        for (int r = 0; r < nr; r++) {
            const i64 off = (h0 + r) * nbd1 + s * nbd3;
            float* out = (float*)(dst + off);
            const i64 flat = off / 4;
            for (int d0 = 0; d0 < Dv; d0 += FAD_NT) {  // uniform trip count: q8 shuffles
                const int d = d0 + t;
                const bool ok = d < Dv;
                float o = 0.0f;
                if (ok) {
#pragma unroll 8
                    for (int w = 0; w < n_split; w++) o += sMw[w * FAD_R + r] * ld_cg(pv + (w * FAD_R + r) * MAXD + d);
                    o *= sl[r];
                    out[d] = o;
                }
                if (oq) q8_quantize32(o, t & 31, ok, oq + flat + (d & ~31), od + (flat + d) / 32);
            }
        }
    }
}

#define FAD_ARGS                                                                                             \
    const u8 *q, const u8 *k, const u8 *v, const u8 *mask, const u8 *sinks, u8 *dst, int D, int Dv, int n_kv, \
        int nr, int rk2, int rk3, int rv2, int rv3, i64 nbq2, i64 nbq3, i64 nbk1, i64 nbk2, i64 nbk3,         \
        i64 nbv1, i64 nbv2, i64 nbv3, int mask_type, int nm2, int nm3, i64 nbm2, i64 nbm3, float scale,       \
        float max_bias, float m0, float m1, int n_head_log2, float softcap, i64 nbd1, i64 nbd3, i8 *oq,        \
        float *od, float *part, int *cnt, int tiles_per_split
#define FAD_PASS                                                                                             \
    q, k, v, mask, sinks, dst, D, Dv, n_kv, nr, rk2, rk3, rv2, rv3, nbq2, nbq3, nbk1, nbk2, nbk3, nbv1, nbv2, \
        nbv3, mask_type, nm2, nm3, nbm2, nbm3, scale, max_bias, m0, m1, n_head_log2, softcap, nbd1, nbd3, oq, \
        od, part, cnt, tiles_per_split
#define HL_FAD_KERNEL(MAXD)                                                                                  \
    extern "C" __global__ void __launch_bounds__(FAD_NT) k_fad_##MAXD(FAD_ARGS) {                            \
        flash_attn_decode<MAXD, true>(FAD_PASS);                                                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(FAD_NT) k_fadr_##MAXD(FAD_ARGS) {                           \
        flash_attn_decode<MAXD, false>(FAD_PASS);                                                            \
    }
HL_FAD_KERNEL(64)
HL_FAD_KERNEL(128)
HL_FAD_KERNEL(256)

