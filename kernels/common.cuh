// Vendor layer shared by every kernel: the same source compiles as CUDA (nvcc / NVRTC), as HIP (hipcc /
// hipRTC, e.g. gfx906 with 64-wide wavefronts) and, for tests, on the host (HL_EMU, tests/gpu/emu/emu.h).
// Kernels never name a vendor API directly; they use the helpers below.
#pragma once

#if defined(HL_EMU)
#define HL_HOST_EMU 1
#elif defined(__HIP__) || defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define HL_HIP 1
#if !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#endif
#else
#define HL_CUDA 1
#endif

// No standard headers: NVRTC and hipRTC have none by default.
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

// Threads per warp/wavefront. The loader defines HL_WARP from the device attribute; the fallbacks keep
// offline compilation (tests/test_kernels_compile.py) working. Never assume 32.
#ifndef HL_WARP
#if defined(HL_HIP) && defined(__AMDGCN_WAVEFRONT_SIZE)
#define HL_WARP __AMDGCN_WAVEFRONT_SIZE
#elif defined(HL_HIP)
#define HL_WARP 64
#else
#define HL_WARP 32
#endif
#endif

// Not `static`: unused helpers of the shared header must not warn in modules that skip them.
#define HL_DEV __device__ __forceinline__

// ---- bit casts and half/bfloat conversion (activations are f32; caches/weights may be f16/bf16) --------
HL_DEV float bits_f32(u32 u) { return __uint_as_float(u); }
HL_DEV u32 f32_bits(float f) { return __float_as_uint(f); }
HL_DEV float f32_inf() { return __uint_as_float(0x7f800000u); }

#if defined(HL_CUDA)
HL_DEV float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
HL_DEV u16 f32_to_f16(float f) {  // round to nearest even, like F16C and numpy
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#elif defined(HL_HIP)
HL_DEV float f16_to_f32(u16 h) { return (float)__builtin_bit_cast(_Float16, h); }
HL_DEV u16 f32_to_f16(float f) { return __builtin_bit_cast(u16, (_Float16)f); }
#else
HL_DEV float f16_to_f32(u16 h) { return emu::f16_to_f32(h); }
HL_DEV u16 f32_to_f16(float f) { return emu::f32_to_f16(f); }
#endif

HL_DEV float bf16_to_f32(u16 h) { return bits_f32((u32)h << 16); }
HL_DEV u16 f32_to_bf16(float f) {  // ggml's rounding, NaN forced quiet
    u32 u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Exact int -> float for |v| < 2^22 with an integer add and a float subtract (both full-rate), instead of
// the conversion unit: dequantizing weights in a tensor-core loop would otherwise be bound by it.
HL_DEV float i2f(int v) { return __int_as_float(0x4B400000 + v) - 12582912.0f; }

// ---- unaligned-tolerant little-endian loads from quantized blocks --------------------------------------
HL_DEV u32 ld_u16(const u8* p) { return *(const u16*)p; }                 // p 2-aligned
HL_DEV u32 ld_u32_a2(const u8* p) { return ld_u16(p) | (ld_u16(p + 2) << 16); }  // p 2-aligned
HL_DEV u32 ld_u32(const u8* p) { return *(const u32*)p; }                 // p 4-aligned
HL_DEV float ld_f16(const u8* p) { return f16_to_f32(*(const u16*)p); }

// ---- warp collectives ---------------------------------------------------------------------------------
HL_DEV float shfl_xor(float v, int mask) {
#if defined(HL_CUDA)
    return __shfl_xor_sync(0xffffffffu, v, mask, HL_WARP);
#elif defined(HL_HIP)
    return __shfl_xor(v, mask, HL_WARP);
#else
    return emu::shfl_xor(v, mask);
#endif
}

// Value of `v` in lane `src` of the warp (a broadcast when src is uniform).
HL_DEV float shfl_idx(float v, int src) {
#if defined(HL_CUDA)
    return __shfl_sync(0xffffffffu, v, src, HL_WARP);
#elif defined(HL_HIP)
    return __shfl(v, src, HL_WARP);
#else
    return emu::shfl_idx(v, src);
#endif
}

// Integer and 64-bit shuffles (pointers for the emulated ldmatrix, packed int8/f16 words).
HL_DEV u32 shfl_idx_u32(u32 v, int src) {
#if defined(HL_CUDA)
    return __shfl_sync(0xffffffffu, v, src, HL_WARP);
#elif defined(HL_HIP)
    return (u32)__shfl((int)v, src, HL_WARP);
#else
    return emu::shfl_idx(v, src);
#endif
}
HL_DEV u64 shfl_idx_u64(u64 v, int src) {
    const u32 lo = shfl_idx_u32((u32)v, src), hi = shfl_idx_u32((u32)(v >> 32), src);
    return (u64)lo | ((u64)hi << 32);
}

// Sum/max over groups of W consecutive lanes (W a power of two <= HL_WARP); every lane gets the result.
template <int W = HL_WARP>
HL_DEV float warp_sum(float v) {
#pragma unroll
    for (int m = W / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
    return v;
}
template <int W = HL_WARP>
HL_DEV float warp_max(float v) {
#pragma unroll
    for (int m = W / 2; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
    return v;
}

#define HL_MAX_WARPS (1024 / HL_WARP)

// Block-wide sum/max; `scratch` holds HL_MAX_WARPS floats; blockDim.x is a multiple of HL_WARP and the
// block is one-dimensional. Every thread gets the result. Ends with a barrier so scratch can be reused.
HL_DEV float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % HL_WARP, warp = threadIdx.x / HL_WARP;
    const int nwarps = blockDim.x / HL_WARP;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}
HL_DEV float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % HL_WARP, warp = threadIdx.x / HL_WARP;
    const int nwarps = blockDim.x / HL_WARP;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -f32_inf();
    v = warp_max(v);
    __syncthreads();
    return v;
}

// ---- int8 dot product of four packed lanes plus accumulator (dp4a on NVIDIA, sdot4 on gfx906+) --------
HL_DEV int dot4_i8(int a, int b, int c) {
#if defined(HL_CUDA)
    return __dp4a(a, b, c);
#elif defined(HL_HIP) && (defined(__gfx906__) || defined(__gfx908__) || defined(__gfx90a__) || \
                          defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__))
    return __builtin_amdgcn_sdot4(a, b, c, false);
#else
    for (int i = 0; i < 4; i++) c += (int)(i8)(a >> (8 * i)) * (int)(i8)(b >> (8 * i));
    return c;
#endif
}

// Byte-wise helpers for packed int8 words.
HL_DEV u32 hi16_lo16(u32 lo, u32 hi) { return (lo >> 16) | (hi << 16); }  // bytes 2..5 of hi:lo

// `NW` 32-bit words starting at a 2-byte aligned address (quant blocks of 18/22/34/210 bytes): aligned
// loads, shifted by 16 bits when p is 2 mod 4. Reads stay inside the 4-byte words holding the bytes.
template <int NW>
HL_DEV void ld_words_a2(const u8* p, u32* w) {
    const u32* a = (const u32*)((u64)p & ~(u64)3);
    if (((u64)p & 3) == 0) {
#pragma unroll
        for (int i = 0; i < NW; i++) w[i] = a[i];
    } else {
        u32 prev = a[0];
#pragma unroll
        for (int i = 0; i < NW; i++) {
            const u32 next = a[i + 1];
            w[i] = hi16_lo16(prev, next);
            prev = next;
        }
    }
}

// ---- device-side error reporting: first failing node wins (the host reads it after a run) -------------
HL_DEV void report_error(int* err, int code) {
    if (err) atomicCAS(err, 0, code);
}

// ---- one launch's blocks handing their parts to the block that finishes last ---------------------------
HL_DEV void fence_device() {
#if !defined(HL_HOST_EMU)
    __threadfence();
#endif
}

// Loads of what other blocks wrote in this launch (after last_block_done): from L2, never a stale L1 line.
HL_DEV float ld_cg(const float* p) {
#if defined(HL_CUDA)
    return __ldcg(p);
#else
    return *(const volatile float*)p;
#endif
}
HL_DEV float4 ld_cg4(const float* p) {  // p 16-byte aligned
#if defined(HL_CUDA)
    return __ldcg((const float4*)p);
#else
    const volatile float* v = p;
    return make_float4(v[0], v[1], v[2], v[3]);
#endif
}

// Called by every thread of every (1-D) block once its part is written: true in the block that counted
// last, which may then read every other block's part with ld_cg. *cnt is zero before the launch and zero
// again after it, so a replayed CUDA graph needs no reset.
HL_DEV bool last_block_done(int* cnt, int n_blocks) {
    __shared__ int s_last;
    fence_device();
    __syncthreads();
    if (threadIdx.x == 0) {
        s_last = atomicAdd(cnt, 1) == n_blocks - 1;
        if (s_last) *cnt = 0;  // every other block has counted
    }
    __syncthreads();
    if (!s_last) return false;
    fence_device();
    return true;
}

// ---- element access of plain-typed tensors by ggml type id --------------------------------------------
enum { T_F32 = 0, T_F16 = 1, T_I32 = 26, T_BF16 = 30 };

HL_DEV float load_elem(const u8* p, int type) {
    if (type == T_F32) return *(const float*)p;
    if (type == T_F16) return f16_to_f32(*(const u16*)p);
    if (type == T_BF16) return bf16_to_f32(*(const u16*)p);
    return (float)*(const i32*)p;
}
HL_DEV void store_elem(u8* p, int type, float v) {
    if (type == T_F32) *(float*)p = v;
    else if (type == T_F16) *(u16*)p = f32_to_f16(v);
    else if (type == T_BF16) *(u16*)p = f32_to_bf16(v);
    else *(i32*)p = (i32)v;  // truncation toward zero, as ggml's F32->I32
}
