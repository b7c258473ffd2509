// Row reductions: RMS_NORM / NORM / L2_NORM (optionally fused with the MUL by a broadcast weight that
// follows them in llama.cpp graphs) and SOFT_MAX (scale, mask, ALiBi slope, attention sinks).
// One block per row: grid (min(rows, 65535), ceil(rows / 65535)), 1-D block of a multiple of HL_WARP.
#include "common.cuh"

HL_DEV bool block_row(int ne1, int ne2, int ne3, int* i1, int* i2, int* i3) {
    const i64 r = blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (r >= (i64)ne1 * ne2 * ne3) return false;
    *i1 = (int)(r % ne1);
    *i2 = (int)((r / ne1) % ne2);
    *i3 = (int)(r / ((i64)ne1 * ne2));
    return true;
}

enum { N_RMS = 0, N_NORM = 1, N_L2 = 2 };

// x and dst are f32 with dense rows. w (f32, may be null) multiplies the result, broadcast by modulo.
extern "C" __global__ void __launch_bounds__(1024) k_norm(
    int kind, float eps, const u8* x, u8* d, const u8* w, int ne0, int ne1, int ne2, int ne3, i64 nbx1,
    i64 nbx2, i64 nbx3, i64 nbd1, i64 nbd2, i64 nbd3, int nw0, int nw1, int nw2, int nw3, i64 nbw0, i64 nbw1,
    i64 nbw2, i64 nbw3) {
    __shared__ float scratch[HL_MAX_WARPS];
    int i1, i2, i3;
    if (!block_row(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const float* xr = (const float*)(x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3);
    float* dr = (float*)(d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3);
    const u8* wr = w ? w + (i1 % nw1) * nbw1 + (i2 % nw2) * nbw2 + (i3 % nw3) * nbw3 : nullptr;

    float mean = 0.0f;
    if (kind == N_NORM) {
        float s = 0.0f;
        for (int i = threadIdx.x; i < ne0; i += blockDim.x) s += xr[i];
        mean = block_sum(s, scratch) / (float)ne0;
    }
    float s2 = 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
        const float v = xr[i] - mean;
        s2 += v * v;
    }
    s2 = block_sum(s2, scratch);
    float scale;
    if (kind == N_L2) scale = 1.0f / fmaxf(sqrtf(s2), eps);
    else scale = 1.0f / sqrtf(s2 / (float)ne0 + eps);
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
        float v = (xr[i] - mean) * scale;
        if (wr) v *= *(const float*)(wr + (i % nw0) * nbw0);
        dr[i] = v;
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
