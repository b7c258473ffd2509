// ROPE: NORMAL (adjacent pairs), NEOX, MROPE/IMROPE (sections of t/h/w/e positions) and VISION, with
// optional frequency factors and YaRN. theta follows ggml's CPU order of operations (a running product
// p * s * s * ..., not p * s^k) so that positions in the tens of thousands give the same angles.
// grid (ceil(ne0/2 / blockDim.x), min(rows, 65535), ceil(rows / 65535)), rows = (head i1, token i2, i3).
#include "common.cuh"

enum { R_NORMAL = 0, R_NEOX = 2, R_MROPE = 8, R_VISION = 24, R_IMROPE = 40 };

HL_DEV float rope_ramp(float low, float high, int k) {
    const float y = ((float)k - low) / fmaxf(0.001f, high - low);
    return 1.0f - fminf(1.0f, fmaxf(0.0f, y));
}

// Position index (0 t, 1 h, 2 w, 3 e) and exponent for pair k of a multi-section mode.
HL_DEV void mrope_section(int mode, int k, int s0, int s1, int s2, int s3, int* which, int* expo) {
    const int sect_dims = s0 + s1 + s2 + s3;
    const int sector = k % sect_dims;
    int w, start;
    if (mode == R_IMROPE) {
        if (sector % 3 == 1 && sector < 3 * s1) w = 1;
        else if (sector % 3 == 2 && sector < 3 * s2) w = 2;
        else if (sector % 3 == 0 && sector < 3 * s0) w = 0;
        else w = 3;
        start = 0;
    } else {
        if (sector < s0) { w = 0; start = 0; }
        else if (sector < s0 + s1) { w = 1; start = s0; }
        else if (sector < s0 + s1 + s2) { w = 2; start = s0 + s1; }
        else { w = 3; start = s0 + s1 + s2; }
    }
    *which = w;
    // VISION restarts each section's running product at the section's first pair
    *expo = mode == R_VISION ? sector - start : k;
}

extern "C" __global__ void __launch_bounds__(1024) k_rope(
    const u8* x, const u8* pos, const u8* ff, u8* d, int type, int mode, int n_dims, int n_offs, int ne0,
    int ne1, int ne2, int ne3, i64 nbx1, i64 nbx2, i64 nbx3, i64 nbd1, i64 nbd2, i64 nbd3, float theta_scale,
    float freq_scale, float ext_factor, float attn_factor, float corr0, float corr1, int s0, int s1, int s2,
    int s3) {
    const i64 r = blockIdx.y + (i64)blockIdx.z * gridDim.y;
    if (r >= (i64)ne1 * ne2 * ne3) return;
    const int i1 = (int)(r % ne1), i2 = (int)((r / ne1) % ne2), i3 = (int)(r / ((i64)ne1 * ne2));
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= ne0 / 2) return;
    const int es = type == T_F32 ? 4 : 2;
    const u8* xr = x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3;
    u8* dr = d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3;
    const int n_rot = mode == R_VISION ? n_dims : n_dims / 2;  // rotated pairs
    if (t >= n_rot) {  // dims outside [n_offs, n_offs + n_dims) are copied
        const int j = t - n_rot;
        const int e0 = 2 * j < n_offs ? 2 * j : 2 * j + n_dims;
        store_elem(dr + e0 * es, type, load_elem(xr + e0 * es, type));
        store_elem(dr + (e0 + 1) * es, type, load_elem(xr + (e0 + 1) * es, type));
        return;
    }
    const i32* p = (const i32*)pos;
    int k = t, expo = t;
    float pbase;
    if (mode & R_MROPE) {
        int which;
        mrope_section(mode, k, s0, s1, s2, s3, &which, &expo);
        pbase = (float)p[i2 + which * ne2];
    } else {
        pbase = (float)p[i2];
    }
    float theta_extrap = pbase;
    for (int j = 0; j < expo; j++) theta_extrap *= theta_scale;
    if (ff) theta_extrap /= ((const float*)ff)[k];
    const float theta_interp = freq_scale * theta_extrap;
    float theta = theta_interp, mscale = attn_factor;
    if (ext_factor != 0.0f) {
        const float mix = rope_ramp(corr0, corr1, k) * ext_factor;
        theta = theta_interp * (1.0f - mix) + theta_extrap * mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / freq_scale);
    }
    const float c = cosf(theta) * mscale, s = sinf(theta) * mscale;
    int ia, ib;  // element indices of the pair
    if (mode == R_NORMAL) { ia = n_offs + 2 * t; ib = ia + 1; }
    else if (mode == R_VISION) { ia = t; ib = t + n_dims; }
    else { ia = n_offs + t; ib = ia + n_dims / 2; }
    const float x0 = load_elem(xr + ia * es, type), x1 = load_elem(xr + ib * es, type);
    store_elem(dr + ia * es, type, x0 * c - x1 * s);
    store_elem(dr + ib * es, type, x0 * s + x1 * c);
}
