// Row reductions and sorting: SUM_ROWS / MEAN (block sum per row) and ARGSORT / TOP_K (rank sort: each
// element's position is the number of elements ordered before it, ties by index, so the result is the
// stable order; NaN sorts last). One block per row: grid (min(rows, 65535), ceil(rows / 65535)).
#include "common.cuh"

#define SORT_MAX 4096  // longest row the rank sort takes (it is O(n^2): MoE routers, not vocabularies)

HL_DEV bool block_row(int ne1, int ne2, int ne3, int* i1, int* i2, int* i3) {
    const i64 r = blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (r >= (i64)ne1 * ne2 * ne3) return false;
    *i1 = (int)(r % ne1);
    *i2 = (int)((r / ne1) % ne2);
    *i3 = (int)(r / ((i64)ne1 * ne2));
    return true;
}

// dst[0, i1, i2, i3] = sum_i x[i, i1, i2, i3], divided by ne0 when mean.
extern "C" __global__ void __launch_bounds__(1024) k_sum_rows(const u8* x, u8* d, int mean, int ne0, int ne1,
                                                              int ne2, int ne3, i64 nbx0, i64 nbx1, i64 nbx2,
                                                              i64 nbx3, i64 nbd1, i64 nbd2, i64 nbd3) {
    __shared__ float scratch[HL_MAX_WARPS];
    int i1, i2, i3;
    if (!block_row(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const u8* xr = x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3;
    float s = 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) s += *(const float*)(xr + i * nbx0);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) *(float*)(d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3) = mean ? s / (float)ne0 : s;
}

// Whether value a (index ia) comes before value b (index ib) in the sort.
HL_DEV bool sorts_before(float a, int ia, float b, int ib, int desc) {
    const bool na = a != a, nb = b != b;
    if (na || nb) return na == nb ? ia < ib : nb;
    if (a == b) return ia < ib;
    return desc ? a > b : a < b;
}

// dst[r, row] = index of the element of rank r (r < k): ARGSORT (k = ne0) or TOP_K (descending).
extern "C" __global__ void __launch_bounds__(1024) k_argsort(const u8* x, u8* d, int desc, int k, int ne0, int ne1,
                                                             int ne2, int ne3, i64 nbx0, i64 nbx1, i64 nbx2,
                                                             i64 nbx3, i64 nbd0, i64 nbd1, i64 nbd2, i64 nbd3) {
    __shared__ float sv[SORT_MAX];
    int i1, i2, i3;
    if (!block_row(ne1, ne2, ne3, &i1, &i2, &i3)) return;
    const u8* xr = x + i1 * nbx1 + i2 * nbx2 + i3 * nbx3;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) sv[i] = *(const float*)(xr + i * nbx0);
    __syncthreads();
    u8* dr = d + i1 * nbd1 + i2 * nbd2 + i3 * nbd3;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
        const float v = sv[i];
        int rank = 0;
        for (int j = 0; j < ne0; j++) rank += sorts_before(sv[j], j, v, i, desc);
        if (rank < k) *(i32*)(dr + rank * nbd0) = i;
    }
}

// MoE router of one token (llama.cpp's softmax gating): probs = softmax(x); order = ARGSORT desc of probs
// (stable); w[e] = probs[order[e]] for the n_used first, and with `norm` w /= clamp(sum w, cmin, cmax).
// Writes the full order row and w (n_used values); x may be in shared or global memory. A whole block.
HL_DEV void moe_route(const float* x, i32* orow, float* w, int n_exp, int n_used, int norm, float cmin,
                      float cmax, float* sv, int* so, float* scratch) {
    float mx = -f32_inf();
    for (int i = threadIdx.x; i < n_exp; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n_exp; i += blockDim.x) {  // as SOFT_MAX: exp, sum, times 1/sum
        const float e = x[i] == -f32_inf() ? 0.0f : expf(x[i] - mx);
        sv[i] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int n4 = (n_exp + 3) & ~3;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) sv[i] = i < n_exp ? sv[i] * inv : bits_f32(0x7fc00000u);
    __syncthreads();
    // rank = how many sort before: four values per shared load, several loads in flight (NaN padding to a
    // multiple of 4 sorts after everything)
    for (int i = threadIdx.x; i < n_exp; i += blockDim.x) {
        const float v = sv[i];
        int rank = 0;
#pragma unroll 8
        for (int j = 0; j < n4; j += 4) {
            const float4 q = *(const float4*)&sv[j];
            rank += sorts_before(q.x, j, v, i, 1) + sorts_before(q.y, j + 1, v, i, 1) +
                    sorts_before(q.z, j + 2, v, i, 1) + sorts_before(q.w, j + 3, v, i, 1);
        }
        so[rank] = i;
        orow[rank] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int e = 0; e < n_used; e++) s += sv[so[e]];
        const float c = fminf(fmaxf(s, cmin), cmax);
        for (int e = 0; e < n_used; e++) w[e] = norm ? sv[so[e]] / c : sv[so[e]];
    }
}

// The router above per token: one block per token, n_exp <= SORT_MAX.
extern "C" __global__ void __launch_bounds__(1024) k_moe_router(const u8* logits, u8* order, u8* wout, int n_exp,
                                                                int n_used, int n_tok, int norm, float cmin,
                                                                float cmax, i64 nbl1, i64 nbo1, i64 nbw1) {
    __shared__ __align__(16) float sv[SORT_MAX];
    __shared__ int so[SORT_MAX];
    __shared__ float scratch[HL_MAX_WARPS];
    const i64 t = blockIdx.x + (i64)blockIdx.y * gridDim.x;
    if (t >= n_tok) return;
    moe_route((const float*)(logits + t * nbl1), (i32*)(order + t * nbo1), (float*)(wout + t * nbw1), n_exp,
              n_used, norm, cmin, cmax, sv, so, scratch);
}

// Decode (one token): the router's f32 logits matvec (one warp per expert row, 16-byte loads; rows of K
// floats at stride nba1) and the router in one launch. Each block writes its logits to `lg`; the last block
// to finish (counted in `cnt`, zero before and after) routes. grid ceil(n_exp / warps per block).
#define ROUTER_MV_MAX 1024  // most experts of the fused decode router (three arrays in shared memory)
extern "C" __global__ void __launch_bounds__(256) k_moe_router_mv(const u8* a, const u8* x, float* lg, int* cnt,
                                                                 u8* order, u8* wout, int K, i64 nba1, int n_exp,
                                                                 int n_used, int norm, float cmin, float cmax) {
    __shared__ __align__(16) float sv[ROUTER_MV_MAX];
    __shared__ int so[ROUTER_MV_MAX];
    __shared__ float sx[ROUTER_MV_MAX];
    __shared__ float scratch[HL_MAX_WARPS];
    const int lane = threadIdx.x % HL_WARP, warp = threadIdx.x / HL_WARP;
    const int m = blockIdx.x * (blockDim.x / HL_WARP) + warp;
    if (m < n_exp) {
        const float4* ar = (const float4*)(a + m * nba1);
        const float4* xr = (const float4*)x;
        float acc = 0.0f;
#pragma unroll 16
        for (int i = lane; i < K / 4; i += HL_WARP) {  // a 2048-wide row's loads all in flight at once
            const float4 u = ar[i], v = xr[i];
            acc += u.x * v.x + u.y * v.y + u.z * v.z + u.w * v.w;
        }
        acc = warp_sum(acc);
        if (lane == 0) lg[m] = acc;
    }
    if (!last_block_done(cnt, gridDim.x)) return;
    for (int i = threadIdx.x; i < n_exp; i += blockDim.x) sx[i] = ld_cg(lg + i);
    __syncthreads();
    moe_route(sx, (i32*)order, (float*)wout, n_exp, n_used, norm, cmin, cmax, sv, so, scratch);
}

// out[m, t] = sum_e w[0, e, t] * ex[m, e, t] (+ r[m, t]): the MoE expert results weighted by the router and
// summed over the slots (MUL, the slot views and the ADD chain of llama.cpp's graph, in that order), for
// batches the per-slot matmuls ran apart. grid (ceil(M / 256), tokens), block 256.
extern "C" __global__ void __launch_bounds__(256) k_moe_wsum(const u8* ex, const u8* w, const u8* r, u8* out,
                                                             int M, int n_used, i64 nbe1, i64 nbe2, i64 nbw1,
                                                             i64 nbw2, i64 nbr1, i64 nbo1) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (m >= M) return;
    float acc = 0.0f;
    for (int e = 0; e < n_used; e++)
        acc += *(const float*)(ex + m * 4 + e * nbe1 + t * nbe2) * *(const float*)(w + e * nbw1 + t * nbw2);
    if (r) acc += *(const float*)(r + m * 4 + t * nbr1);
    *(float*)(out + m * 4 + t * nbo1) = acc;
}
