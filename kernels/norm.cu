// Row reductions: RMS_NORM / NORM / L2_NORM (optionally fused with the MUL by a broadcast weight that
// follows them in llama.cpp graphs) and SOFT_MAX (scale, mask, ALiBi slope, attention sinks).
// One block per row: grid (min(rows, 65535), ceil(rows / 65535)), 1-D block of a multiple of HL_WARP.
#include "common.cuh"
#include "q8.cuh"
#include "rope.cuh"

HL_DEV bool block_row(int ne1, int ne2, int ne3, int* i1, int* i2, int* i3) {
    const i64 r = blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (r >= (i64)ne1 * ne2 * ne3) return false;
    *i1 = (int)(r % ne1);
    *i2 = (int)((r / ne1) % ne2);
    *i3 = (int)(r / ((i64)ne1 * ne2));
    return true;
}

enum { N_RMS = 0, N_NORM = 1, N_L2 = 2 };

#define NORM_EPT 8  // row values per thread kept in registers

// x and dst are f32 with dense rows. w (f32, may be null) multiplies the result, broadcast by modulo.
extern "C" __global__ void __launch_bounds__(1024) k_norm(
    int kind, float eps, const u8* x, u8* d, const u8* w, int ne0, int ne1, int ne2, int ne3, i64 nbx1,
    i64 nbx2, i64 nbx3, i64 nbd1, i64 nbd2, i64 nbd3, int nw0, int nw1, int nw2, int nw3, i64 nbw0, i64 nbw1,
    i64 nbw2, i64 nbw3, i8* oq, float* od) {
    __shared__ float scratch[HL_MAX_WARPS];
    int i1, i2, i3;
    if (!block_row(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const float* xr = (const float*)(x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3);
    float* dr = (float*)(d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3);
    const u8* wr = w ? w + (i1 % nw1) * nbw1 + (i2 % nw2) * nbw2 + (i3 % nw3) * nbw3 : nullptr;

    // a row of up to NORM_EPT * blockDim.x values stays in registers (one read of x); longer rows re-read it
    float xv[NORM_EPT], wv[NORM_EPT];  // with the weights, loaded before the reductions wait on memory
    const bool cached = ne0 <= NORM_EPT * (int)blockDim.x;
    float mean = 0.0f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_EPT; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            xv[k] = i < ne0 ? xr[i] : 0.0f;
            wv[k] = wr && i < ne0 ? *(const float*)(wr + (i % nw0) * nbw0) : 1.0f;
        }
    }
    if (kind == N_NORM) {
        float s = 0.0f;
        if (cached) {
#pragma unroll
            for (int k = 0; k < NORM_EPT; k++) s += xv[k];
        } else {
            for (int i = threadIdx.x; i < ne0; i += blockDim.x) s += xr[i];
        }
        mean = block_sum(s, scratch) / (float)ne0;
    }
    float s2 = 0.0f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_EPT; k++) {
            const float v = threadIdx.x + k * blockDim.x < ne0 ? xv[k] - mean : 0.0f;
            s2 += v * v;
        }
    } else {
        for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
            const float v = xr[i] - mean;
            s2 += v * v;
        }
    }
    s2 = block_sum(s2, scratch);
    float scale;
    if (kind == N_L2) scale = 1.0f / fmaxf(sqrtf(s2), eps);
    else scale = 1.0f / sqrtf(s2 / (float)ne0 + eps);
    // with oq (dst contiguous, ne0 % 32 == 0): also the q8 copy of the row for the matmuls reading it
    const i64 flat = ((i64)i1 + (i64)ne1 * (i2 + (i64)ne2 * i3)) * ne0;
    for (int base = 0, k = 0; base < ne0; base += blockDim.x, k++) {  // uniform trip count: q8 shuffles
        const int i = base + threadIdx.x;
        const bool ok = i < ne0;
        float v = 0.0f;
        if (ok) {
            float x = 0.0f, wk = 1.0f;
            if (cached) {
#pragma unroll
                for (int kk = 0; kk < NORM_EPT; kk++)
                    if (kk == k) x = xv[kk], wk = wv[kk];  // constant register index after unrolling
            } else {
                x = xr[i];
                if (wr) wk = *(const float*)(wr + (i % nw0) * nbw0);
            }
            v = (x - mean) * scale * wk;
            dr[i] = v;
        }
        if (oq) q8_quantize32(v, threadIdx.x & 31, ok, oq + flat + (i & ~31), od + (flat + i) / 32);
    }
}

// RMS_NORM(x) * w -> ROPE (NORMAL/NEOX, no offset) in one pass over rows of one head (ne0 <= 1024), written
// to d (f32) or, with idx, as SET_ROWS of the result seen as rows of ne0*ne1: row idx[i2] of `cache`
// (f16/f32, row stride nbc1), columns i1*ne0 + i0. One block per row (i1 head, i2 token, i3).
#define NR_ARGS                                                                                              \
    const u8 *x, u8 *d, const u8 *w, const u8 *pos, const u8 *ff, float eps, int ne0, int ne1, int ne2, int ne3, \
        i64 nbx1, i64 nbx2, i64 nbx3, i64 nbd1, i64 nbd2, i64 nbd3, int nw0, i64 nbw0, int mode, int n_dims,   \
        float theta_scale, float freq_scale, float ext_factor, float attn_factor, float corr0, float corr1,     \
        const u8 *idx, int idx64, u8 *cache, int cache_f16, i64 nbc1
#define NR_PASS                                                                                              \
    x, d, w, pos, ff, eps, ne0, ne1, ne2, ne3, nbx1, nbx2, nbx3, nbd1, nbd2, nbd3, nw0, nbw0, mode, n_dims,    \
        theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1, idx, idx64, cache, cache_f16, nbc1
#define NR_ARGS_B                                                                                            \
    const u8 *x_b, u8 *d_b, const u8 *w_b, const u8 *pos_b, const u8 *ff_b, float eps_b, int ne0_b, int ne1_b, \
        int ne2_b, int ne3_b, i64 nbx1_b, i64 nbx2_b, i64 nbx3_b, i64 nbd1_b, i64 nbd2_b, i64 nbd3_b, int nw0_b, \
        i64 nbw0_b, int mode_b, int n_dims_b, float theta_scale_b, float freq_scale_b, float ext_factor_b,     \
        float attn_factor_b, float corr0_b, float corr1_b, const u8 *idx_b, int idx64_b, u8 *cache_b,          \
        int cache_f16_b, i64 nbc1_b
#define NR_PASS_B                                                                                            \
    x_b, d_b, w_b, pos_b, ff_b, eps_b, ne0_b, ne1_b, ne2_b, ne3_b, nbx1_b, nbx2_b, nbx3_b, nbd1_b, nbd2_b,     \
        nbd3_b, nw0_b, nbw0_b, mode_b, n_dims_b, theta_scale_b, freq_scale_b, ext_factor_b, attn_factor_b,     \
        corr0_b, corr1_b, idx_b, idx64_b, cache_b, cache_f16_b, nbc1_b

HL_DEV void norm_rope_row(i64 rr, NR_ARGS);

extern "C" __global__ void __launch_bounds__(1024) k_norm_rope(NR_ARGS) {
    norm_rope_row(blockIdx.x + (i64)blockIdx.y * gridDim.x, NR_PASS);
}

// Two independent k_norm_rope launches in one (Q and K of a layer): the first n_a blocks do the first.
extern "C" __global__ void __launch_bounds__(1024) k_norm_rope2(NR_ARGS, NR_ARGS_B, int n_a) {
    const i64 r = blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (r < n_a) norm_rope_row(r, NR_PASS);
    else norm_rope_row(r - n_a, NR_PASS_B);
}

HL_DEV void norm_rope_row(i64 rr, NR_ARGS) {
    __shared__ float scratch[HL_MAX_WARPS];
    __shared__ float row[1024];
    if (rr >= (i64)ne1 * ne2 * ne3) return;
    const int i1 = (int)(rr % ne1), i2 = (int)((rr / ne1) % ne2), i3 = (int)(rr / ((i64)ne1 * ne2));
    const float* xr = (const float*)(x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3);
    float s2 = 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) s2 += xr[i] * xr[i];
    s2 = block_sum(s2, scratch);
    const float scale = 1.0f / sqrtf(s2 / (float)ne0 + eps);
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) row[i] = xr[i] * scale * *(const float*)(w + (i % nw0) * nbw0);
    __syncthreads();
    const float p = (float)((const i32*)pos)[i2];
    u8* out;
    int f16 = 0;
    if (cache) {
        const i64 r = idx64 ? ((const i64*)idx)[i2] : (i64)((const i32*)idx)[i2];
        f16 = cache_f16;
        out = cache + r * nbc1 + (i64)i1 * ne0 * (f16 ? 2 : 4);
    } else {
        out = d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3;
    }
    const int half = n_dims / 2;
    for (int t = threadIdx.x; t < ne0 / 2; t += blockDim.x) {
        int ia, ib;
        float ya, yb;
        if (t < half) {
            float c, sn;
            rope_cos_sin(p, t, t, ff, theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1, &c, &sn);
            if (mode == R_NORMAL) { ia = 2 * t; ib = ia + 1; }
            else { ia = t; ib = t + half; }
            ya = row[ia] * c - row[ib] * sn;
            yb = row[ia] * sn + row[ib] * c;
        } else {  // dims past n_dims are copied
            ia = 2 * (t - half) + n_dims;
            ib = ia + 1;
            ya = row[ia];
            yb = row[ib];
        }
        if (f16) {
            ((u16*)out)[ia] = f32_to_f16(ya);
            ((u16*)out)[ib] = f32_to_f16(yb);
        } else {
            ((float*)out)[ia] = ya;
            ((float*)out)[ib] = yb;
        }
    }
}

// dst = softmax(x * scale + slope * mask) per row; mask rows follow x rows (i1), dims 2/3 by modulo.
// mask_type: -1 none, T_F32, T_F16. sinks (f32 per head, may be null) join the denominator only.
extern "C" __global__ void __launch_bounds__(1024) k_soft_max(
    const u8* x, const u8* mask, const u8* sinks, u8* d, int mask_type, float scale, float max_bias,
    float m0, float m1, int n_head_log2, int ne0, int ne1, int ne2, int ne3, i64 nbx1, i64 nbx2, i64 nbx3,
    int nm2, int nm3, i64 nbm1, i64 nbm2, i64 nbm3, i64 nbd1, i64 nbd2, i64 nbd3) {
    __shared__ float scratch[HL_MAX_WARPS];
    int i1, i2, i3;
    if (!block_row(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const float* xr = (const float*)(x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3);
    float* dr = (float*)(d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3);
    const u8* mr = mask_type >= 0 ? mask + i1 * nbm1 + (i2 % nm2) * nbm2 + (i3 % nm3) * nbm3 : nullptr;
    float slope = 1.0f;
    if (max_bias > 0.0f)
        slope = i2 < n_head_log2 ? powf(m0, (float)(i2 + 1)) : powf(m1, (float)(2 * (i2 - n_head_log2) + 1));

    // pass 1: logits into dst, running max
    float mx = -f32_inf();
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
        float v = xr[i] * scale;
        if (mr) v += slope * (mask_type == T_F16 ? f16_to_f32(((const u16*)mr)[i]) : ((const float*)mr)[i]);
        dr[i] = v;
        mx = fmaxf(mx, v);
    }
    mx = block_max(mx, scratch);
    const float sink = sinks ? ((const float*)sinks)[i2] : -f32_inf();
    if (sinks) mx = fmaxf(mx, sink);
    // pass 2: exponentials and their sum (a row that is all -inf gives zeros, not NaN)
    float sum = 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
        const float e = dr[i] == -f32_inf() ? 0.0f : expf(dr[i] - mx);
        dr[i] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    if (sinks) sum += expf(sink - mx);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) dr[i] *= inv;
}
