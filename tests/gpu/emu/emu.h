// Host emulation of the CUDA subset that kernels/ uses, so the kernels run (slowly) on a CPU in tests.
// Every GPU thread of a block is a ucontext coroutine on one OS thread; __syncthreads and warp shuffles
// are barriers of the scheduler. A barrier nobody can pass (divergent __syncthreads) aborts with a
// message, and a shuffle that reads an exited lane aborts too: both are bugs on real hardware.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#ifndef HL_WARP
#define HL_WARP 32
#endif

namespace emu {

struct uint3_ { unsigned x, y, z; };

struct Thread {
    ucontext_t ctx;
    uint3_ tid;
    int warp;
    bool done;
    unsigned wait_gen;   // generation of the barrier this thread waits on
    int wait_kind;       // 0 none, 1 block barrier, 2 warp barrier
    unsigned shfl_seq;   // shuffles this thread has done (selects the slot bank, checks partners)
    char* stack;
};

inline Thread* cur = nullptr;
inline uint3_ g_block_idx, g_block_dim, g_grid_dim;
inline std::vector<Thread> threads;
inline ucontext_t sched_ctx;
inline unsigned block_gen = 0, block_arrived = 0;
inline std::vector<unsigned> warp_gen, warp_arrived;
inline std::vector<uint64_t> warp_slots;  // two 8-byte slots per thread for shuffles
inline std::vector<unsigned> warp_seqs;    // which shuffle wrote each slot
inline const std::function<void()>* g_body = nullptr;
inline char g_error[256] = {0};
inline std::vector<char> dyn_smem_buf;

constexpr size_t kStack = 256 * 1024;

[[noreturn]] inline void fail(const char* what) {
    fprintf(stderr, "emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, g_block_idx.x, g_block_idx.y,
            g_block_idx.z, cur ? cur->tid.x : 0, cur ? cur->tid.y : 0, cur ? cur->tid.z : 0);
    abort();
}

inline int nthreads() { return (int)(g_block_dim.x * g_block_dim.y * g_block_dim.z); }

inline int g_n = 0;  // threads taking part in the current block (a prefix of `threads`)

inline int live_in_block() {
    int n = 0;
    for (int i = 0; i < g_n; i++) n += !threads[i].done;
    return n;
}
inline int live_in_warp(int w) {
    int n = 0;
    for (int i = w * HL_WARP; i < g_n && i < (w + 1) * HL_WARP; i++) n += !threads[i].done;
    return n;
}

inline void yield_wait(int kind, unsigned gen) {
    cur->wait_kind = kind;
    cur->wait_gen = gen;
    swapcontext(&cur->ctx, &sched_ctx);
}

inline void syncthreads() {
    unsigned gen = block_gen;
    if (++block_arrived == (unsigned)live_in_block()) {
        block_arrived = 0;
        block_gen++;
        return;
    }
    yield_wait(1, gen);
}

inline void warp_barrier() {
    const int w = cur->warp;
    unsigned gen = warp_gen[w];
    if (++warp_arrived[w] == (unsigned)live_in_warp(w)) {
        warp_arrived[w] = 0;
        warp_gen[w]++;
        return;
    }
    yield_wait(2, gen);
}

inline int linear_tid(const Thread* t) {
    return (int)(t->tid.x + g_block_dim.x * (t->tid.y + g_block_dim.y * t->tid.z));
}

template <class T>
inline T shfl_lane(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a wide type");
    const int me = linear_tid(cur), lane = me % HL_WARP;
    if (src_lane < 0 || src_lane >= HL_WARP) fail("shuffle source lane out of range");
    const int src = me - lane + src_lane;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    // Two slot banks used alternately: a lane can only reuse a bank after passing the next shuffle's
    // barrier, which every lane reaches only after reading this one, so one barrier per shuffle suffices.
    const unsigned seq = ++cur->shfl_seq;
    const int bank = seq & 1;
    warp_slots[2 * me + bank] = bits;
    warp_seqs[2 * me + bank] = seq;
    warp_barrier();
    // the source lane must have taken part in this very shuffle (not exited before it)
    if (src >= g_n || warp_seqs[2 * src + bank] != seq) fail("shuffle reads an exited or missing lane");
    uint64_t got = warp_slots[2 * src + bank];
    T out;
    memcpy(&out, &got, sizeof(T));
    return out;
}

template <class T>
inline T shfl_xor(T v, int mask) { return shfl_lane(v, (linear_tid(cur) % HL_WARP) ^ mask); }
template <class T>
inline T shfl_idx(T v, int src) { return shfl_lane(v, src); }

inline void entry(int idx) {
    cur = &threads[idx];
    (*g_body)();
    cur->done = true;  // the scheduler re-checks barriers: an exit can complete one
}

inline void trampoline(unsigned lo, unsigned hi) {
    int idx = (int)lo;
    (void)hi;
    entry(idx);
}

inline bool can_run(const Thread& t) {
    if (t.done) return false;
    if (t.wait_kind == 1) return block_gen != t.wait_gen;
    if (t.wait_kind == 2) return warp_gen[t.warp] != t.wait_gen;
    return true;
}

// Barriers count live threads; an exit can complete one, so re-evaluate before deciding on deadlock.
inline void release_after_exit() {
    if (block_arrived && block_arrived == (unsigned)live_in_block()) {
        block_arrived = 0;
        block_gen++;
    }
    for (size_t w = 0; w < warp_arrived.size(); w++) {
        if (warp_arrived[w] && warp_arrived[w] == (unsigned)live_in_warp((int)w)) {
            warp_arrived[w] = 0;
            warp_gen[w]++;
        }
    }
}

// ucontext_t points into itself (saved FP state), so a Thread is never copied once its context exists:
// the pool only grows between blocks.
inline void run_block() {
    const int n = nthreads();
    const int nwarps = (n + HL_WARP - 1) / HL_WARP;
    while ((int)threads.size() < n) {
        threads.emplace_back();
        threads.back().stack = nullptr;
    }
    for (auto& t : threads)
        if (!t.stack) t.stack = (char*)malloc(kStack);
    g_n = n;
    warp_gen.assign(nwarps, 0);
    warp_arrived.assign(nwarps, 0);
    warp_slots.assign(2 * n, 0);
    warp_seqs.assign(2 * n, 0);
    block_gen = block_arrived = 0;
    for (int i = 0; i < n; i++) {
        Thread& t = threads[i];
        t.tid = {(unsigned)(i % g_block_dim.x), (unsigned)((i / g_block_dim.x) % g_block_dim.y),
                 (unsigned)(i / (g_block_dim.x * g_block_dim.y))};
        t.warp = i / HL_WARP;
        t.done = false;
        t.wait_kind = 0;
        t.shfl_seq = 0;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = t.stack;
        t.ctx.uc_stack.ss_size = kStack;
        t.ctx.uc_link = &sched_ctx;
        makecontext(&t.ctx, (void (*)())trampoline, 2, (unsigned)i, 0u);
    }
    for (;;) {
        bool progressed = false, all_done = true;
        for (int i = 0; i < n; i++) {
            Thread& t = threads[i];
            if (t.done) continue;
            all_done = false;
            if (!can_run(t)) continue;
            t.wait_kind = 0;
            cur = &t;
            swapcontext(&sched_ctx, &t.ctx);
            cur = nullptr;
            progressed = true;
            if (t.done) release_after_exit();
        }
        if (all_done) break;
        if (!progressed) {
            release_after_exit();
            bool any = false;
            for (int i = 0; i < n; i++) any |= can_run(threads[i]);
            if (!any) fail("deadlock: threads wait at a barrier that others never reach");
        }
    }
}

inline int launch(const unsigned* dims, size_t smem, const std::function<void()>& body) {
    g_grid_dim = {dims[0], dims[1], dims[2]};
    g_block_dim = {dims[3], dims[4], dims[5]};
    if (nthreads() <= 0 || nthreads() > 1024) fail("bad block size");
    dyn_smem_buf.assign(smem + 16, 0);
    g_body = &body;
    for (unsigned z = 0; z < dims[2]; z++)
        for (unsigned y = 0; y < dims[1]; y++)
            for (unsigned x = 0; x < dims[0]; x++) {
                g_block_idx = {x, y, z};
                run_block();
            }
    return 0;
}

template <class... A, size_t... I>
inline void call_with(void (*f)(A...), void** argv, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(argv[I])...);
}
template <class... A>
inline void invoke(void (*f)(A...), void** argv) {
    call_with(f, argv, std::index_sequence_for<A...>{});
}
template <class... A>
inline int arg_sizes(void (*)(A...), int* out, int cap) {
    int sizes[] = {0, (int)sizeof(A)...};
    int n = (int)sizeof...(A);
    for (int i = 0; i < n && i < cap; i++) out[i] = sizes[i + 1];
    return n;
}

// ---- numerics helpers the vendor layer maps to ------------------------------------------------------
inline float f16_to_f32(uint16_t h) {
    const uint32_t s = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) {
            u = s;
        } else {  // subnormal: normalise
            e = 127 - 15 + 1;
            while (!(m & 0x400)) { m <<= 1; e--; }
            u = s | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_f16(float f) {
    _Float16 h = (_Float16)f;  // GCC >= 12: round to nearest even
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

}  // namespace emu

// ---- the CUDA surface -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)
#define HL_DYN_SMEM(type, name) type* name = (type*)emu::dyn_smem_buf.data()

inline void __syncthreads() { emu::syncthreads(); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int atomicCAS(int* p, int cmp, int v) { int old = *p; if (old == cmp) *p = v; return old; }
inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }
inline float atomicAdd(float* p, float v) { float old = *p; *p += v; return old; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
#define __align__(n) __attribute__((aligned(n)))
