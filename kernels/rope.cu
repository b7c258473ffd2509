// ROPE: NORMAL (adjacent pairs), NEOX, MROPE/IMROPE (sections of t/h/w/e positions) and VISION, with
// optional frequency factors and YaRN. theta follows ggml's CPU order of operations (a running product
// p * s * s * ..., not p * s^k) so that positions in the tens of thousands give the same angles.
// grid (ceil(ne0/2 / blockDim.x), min(rows, 65535), ceil(rows / 65535)), rows = (head i1, token i2, i3).
#include "common.cuh"
#include "rope.cuh"

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
    float c, s;
    rope_cos_sin(pbase, expo, k, ff, theta_scale, freq_scale, ext_factor, attn_factor, corr0, corr1, &c, &s);
    int ia, ib;  // element indices of the pair
    if (mode == R_NORMAL) { ia = n_offs + 2 * t; ib = ia + 1; }
    else if (mode == R_VISION) { ia = t; ib = t + n_dims; }
    else { ia = n_offs + t; ib = ia + n_dims / 2; }
    const float x0 = load_elem(xr + ia * es, type), x1 = load_elem(xr + ib * es, type);
    store_elem(dr + ia * es, type, x0 * c - x1 * s);
    store_elem(dr + ib * es, type, x0 * s + x1 * c);
}
