// Integer dot products of quantized weights with activations quantized to int8 (decode matrix-vector).
//
// Activation layout ("q8"): column c of a K-long input (K % 32 == 0) is K int8 values at q + c*K and K/32
// float scales at d + c*(K/32); value = d * q, d = max|x| / 127 per 32 values, q = round(x / d) (half away
// from zero), as ggml rounds activations for its integer paths. The integer sums go through dot4_i8 (dp4a /
// sdot4), four weights per instruction, so a decode step is bound by weight bytes, not by arithmetic.
//
// Each weight type is a struct V with a decoded unit W of 32 weights (one 16-byte slice of a K-quant
// super-block, or one 32-block of the legacy formats):
//   V::UPB              units per quant block (UPB * 32 == QK)
//   V::load(row, u, w)  decode unit u of a row: the packed 4-bit/6-bit/8-bit integers and float scales
//   V::dot(w, x, xd)    its dot product with one activation column (x: the column's int8, xd: its scales)
// Lanes of a warp take consecutive units, so their loads of one super-block are adjacent 16-byte pieces.
#pragma once
#include "common.cuh"

// Quantize one 32-block: the 32 consecutive lanes (lane32 = 0..31; half a 64-wide wavefront) hold its
// values. Every lane of the warp must call it (shuffles); `store` says whether this lane's block is real.
HL_DEV void q8_quantize32(float v, int lane32, bool store, i8* q, float* d) {
    const float amax = warp_max<32>(fabsf(v));
    const float s = amax / 127.0f;
    const int qi = amax == 0.0f ? 0 : (int)roundf(v / s);
    if (store) {
        q[lane32] = (i8)qi;
        if (lane32 == 0) *d = s;
    }
}

HL_DEV int dp4(u32 a, u32 b, int c) { return dot4_i8((int)a, (int)b, c); }
HL_DEV int sum4(u32 x, int c) { return dot4_i8(0x01010101, (int)x, c); }  // sum of four int8 of x

// Sixteen int8 activations starting at element e (16-byte aligned).
HL_DEV uint4 ld_x16(const i8* x, int e) { return *(const uint4*)(x + e); }

// dot of 16 packed values w[0..3] (bytes) with 16 activations; *n += their activation sum
HL_DEV int dot16(const u32* w, uint4 x, int* n) {
    int s = dp4(w[0], x.x, 0);
    s = dp4(w[1], x.y, s);
    s = dp4(w[2], x.z, s);
    s = dp4(w[3], x.w, s);
    *n = sum4(x.w, sum4(x.z, sum4(x.y, sum4(x.x, *n))));
    return s;
}

// ---- K-quants -------------------------------------------------------------------------------------------

// The two 6-bit (scale, min) pairs of sub-blocks 2p and 2p+1 of a Q4_K/Q5_K super-block, from its 12
// scale bytes (words y = bytes 0..3, z = 4..7, w = 8..11), as 16-bit pairs (sub-block 2p in the low byte).
HL_DEV void kq_scales(u32 y, u32 z, u32 w, int p, u32* sc, u32* mn) {
    const int sh = 16 * (p & 1);
    if (p < 2) {
        *sc = (y >> sh) & 0x3f3fu;
        *mn = (z >> sh) & 0x3f3fu;
    } else {
        *sc = ((w >> sh) & 0x0f0fu) | (((y >> sh) >> 2) & 0x3030u);
        *mn = (((w >> sh) >> 4) & 0x0f0fu) | (((z >> sh) >> 2) & 0x3030u);
    }
}

// Q4_K/Q5_K unit u: 16 bytes of a 64-element chunk p; the low nibbles are elements e..e+15 (sub-block 2p),
// the high nibbles e+32..e+47 (sub-block 2p+1).
struct kq45_unit {
    u32 lo[4], hi[4];
    float da, db, ma, mb;
    int e;
};

HL_DEV float kq45_dot(const kq45_unit& w, const i8* x, const float* xd) {
    int na = 0, nb = 0;
    const int sa = dot16(w.lo, ld_x16(x, w.e), &na);
    const int sb = dot16(w.hi, ld_x16(x, w.e + 32), &nb);
    const int blk = w.e >> 5;
    return xd[blk] * (w.da * (float)sa - w.ma * (float)na) + xd[blk + 1] * (w.db * (float)sb - w.mb * (float)nb);
}

HL_DEV void kq45_header(const u8* b, int p, kq45_unit& w) {
    const uint4 h = *(const uint4*)b;  // d, dmin, 12 scale bytes
    const float d = f16_to_f32((u16)(h.x & 0xffffu)), dmin = f16_to_f32((u16)(h.x >> 16));
    u32 sc, mn;
    kq_scales(h.y, h.z, h.w, p, &sc, &mn);
    w.da = d * (float)(sc & 0xffu);
    w.db = d * (float)(sc >> 8);
    w.ma = dmin * (float)(mn & 0xffu);
    w.mb = dmin * (float)(mn >> 8);
}

struct vq_q4_K {
    static constexpr int QK = 256, BYTES = 144, UPB = 8, ALIGN = 16;
    typedef kq45_unit W;
    static HL_DEV void load(const u8* row, int u, W& w) {
        const int s = u >> 3, c = u & 7, p = c >> 1, hh = (c & 1) * 16;
        const u8* b = row + s * BYTES;
        const uint4 q = *(const uint4*)(b + 16 + 32 * p + hh);
        const u32 qs[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w.lo[i] = qs[i] & 0x0f0f0f0fu;
            w.hi[i] = (qs[i] >> 4) & 0x0f0f0f0fu;
        }
        kq45_header(b, p, w);
        w.e = s * QK + 64 * p + hh;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) { return kq45_dot(w, x, xd); }
};

struct vq_q5_K {
    static constexpr int QK = 256, BYTES = 176, UPB = 8, ALIGN = 16;
    typedef kq45_unit W;
    static HL_DEV void load(const u8* row, int u, W& w) {
        const int s = u >> 3, c = u & 7, p = c >> 1, hh = (c & 1) * 16;
        const u8* b = row + s * BYTES;
        const uint4 q = *(const uint4*)(b + 48 + 32 * p + hh);
        const uint4 h = *(const uint4*)(b + 16 + hh);  // qh[l]: bit 2p -> element 64p+l, bit 2p+1 -> +32
        const u32 qs[4] = {q.x, q.y, q.z, q.w}, qh[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w.lo[i] = (qs[i] & 0x0f0f0f0fu) | (((qh[i] >> (2 * p)) & 0x01010101u) << 4);
            w.hi[i] = ((qs[i] >> 4) & 0x0f0f0f0fu) | (((qh[i] >> (2 * p + 1)) & 0x01010101u) << 4);
        }
        kq45_header(b, p, w);
        w.e = s * QK + 64 * p + hh;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) { return kq45_dot(w, x, xd); }
};

// Q6_K unit u: half h of the super-block, ql bytes [64h + 32qq + 16s2, +16) with their qh bytes: the low
// nibbles are quarter qq (elements e..e+15), the high nibbles quarter qq+2 (elements e+64..e+79).
struct vq_q6_K {
    static constexpr int QK = 256, BYTES = 210, UPB = 8, ALIGN = 2;
    struct W {
        u32 lo[4], hi[4];
        float da, db;
        int e;
    };
    static HL_DEV void load(const u8* row, int u, W& w) {
        const int s = u >> 3, j = u & 7, h = j >> 2, qq = (j >> 1) & 1, s2 = j & 1;
        const u8* b = row + s * BYTES;
        u32 ql[4], qh[4];
        ld_words_a2<4>(b + 64 * h + 32 * qq + 16 * s2, ql);
        ld_words_a2<4>(b + 128 + 32 * h + 16 * s2, qh);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w.lo[i] = (ql[i] & 0x0f0f0f0fu) | (((qh[i] >> (2 * qq)) & 0x03030303u) << 4);
            w.hi[i] = ((ql[i] >> 4) & 0x0f0f0f0fu) | (((qh[i] >> (2 * qq + 4)) & 0x03030303u) << 4);
        }
        const float d = ld_f16(b + 208);
        const u8* sc = b + 192 + 8 * h + s2 + 2 * qq;
        w.da = d * (float)(i8)sc[0];
        w.db = d * (float)(i8)sc[4];
        w.e = s * QK + 128 * h + 32 * qq + 16 * s2;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) {
        int na = 0, nb = 0;
        const int sa = dot16(w.lo, ld_x16(x, w.e), &na);
        const int sb = dot16(w.hi, ld_x16(x, w.e + 64), &nb);
        const int blk = w.e >> 5;
        return xd[blk] * w.da * (float)(sa - 32 * na) + xd[blk + 2] * w.db * (float)(sb - 32 * nb);
    }
};

// ---- 32-element block formats: one unit per block; lo = elements 0..15, hi = 16..31 (Q8_0: all 32) ---------

// Four 5th bits (of elements 4i..4i+3) spread to bit 4 of each byte.
HL_DEV u32 spread4(u32 b) { return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25); }

struct q32_unit {
    u32 lo[4], hi[4];
    float d, m;  // weight = d * q + m (m = -offset * d for the symmetric formats)
    int u;
};

HL_DEV float q32_dot(const q32_unit& w, const i8* x, const float* xd) {
    int n = 0;
    const int s = dot16(w.lo, ld_x16(x, 32 * w.u), &n) + dot16(w.hi, ld_x16(x, 32 * w.u + 16), &n);
    return xd[w.u] * (w.d * (float)s + w.m * (float)n);
}

HL_DEV void split_nibbles(const u32* q, q32_unit& w) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w.lo[i] = q[i] & 0x0f0f0f0fu;
        w.hi[i] = (q[i] >> 4) & 0x0f0f0f0fu;
    }
}

struct vq_q4_0 {
    static constexpr int QK = 32, BYTES = 18, UPB = 1, ALIGN = 2;
    typedef q32_unit W;
    static HL_DEV void load(const u8* row, int u, W& w) {
        const u8* b = row + u * BYTES;
        u32 q[4];
        ld_words_a2<4>(b + 2, q);
        split_nibbles(q, w);
        w.d = ld_f16(b);
        w.m = -8.0f * w.d;
        w.u = u;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) { return q32_dot(w, x, xd); }
};

struct vq_q4_1 {
    static constexpr int QK = 32, BYTES = 20, UPB = 1, ALIGN = 4;
    typedef q32_unit W;
    static HL_DEV void load(const u8* row, int u, W& w) {
        const u8* b = row + u * BYTES;
        const u32 dm = ld_u32(b);
        const u32 q[4] = {ld_u32(b + 4), ld_u32(b + 8), ld_u32(b + 12), ld_u32(b + 16)};
        split_nibbles(q, w);
        w.d = f16_to_f32((u16)(dm & 0xffffu));
        w.m = f16_to_f32((u16)(dm >> 16));
        w.u = u;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) { return q32_dot(w, x, xd); }
};

HL_DEV void add_high_bits(u32 qh, q32_unit& w) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w.lo[i] |= spread4((qh >> (4 * i)) & 15u);
        w.hi[i] |= spread4((qh >> (16 + 4 * i)) & 15u);
    }
}

struct vq_q5_0 {
    static constexpr int QK = 32, BYTES = 22, UPB = 1, ALIGN = 2;
    typedef q32_unit W;
    static HL_DEV void load(const u8* row, int u, W& w) {
        const u8* b = row + u * BYTES;
        u32 q[4], qh[1];
        ld_words_a2<1>(b + 2, qh);
        ld_words_a2<4>(b + 6, q);
        split_nibbles(q, w);
        add_high_bits(qh[0], w);
        w.d = ld_f16(b);
        w.m = -16.0f * w.d;
        w.u = u;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) { return q32_dot(w, x, xd); }
};

struct vq_q5_1 {
    static constexpr int QK = 32, BYTES = 24, UPB = 1, ALIGN = 4;
    typedef q32_unit W;
    static HL_DEV void load(const u8* row, int u, W& w) {
        const u8* b = row + u * BYTES;
        const u32 dm = ld_u32(b), qh = ld_u32(b + 4);
        const u32 q[4] = {ld_u32(b + 8), ld_u32(b + 12), ld_u32(b + 16), ld_u32(b + 20)};
        split_nibbles(q, w);
        add_high_bits(qh, w);
        w.d = f16_to_f32((u16)(dm & 0xffffu));
        w.m = f16_to_f32((u16)(dm >> 16));
        w.u = u;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) { return q32_dot(w, x, xd); }
};

struct vq_q8_0 {
    static constexpr int QK = 32, BYTES = 34, UPB = 1, ALIGN = 2;
    struct W {
        u32 q[8];
        float d;
        int u;
    };
    static HL_DEV void load(const u8* row, int u, W& w) {
        const u8* b = row + u * BYTES;
        ld_words_a2<8>(b + 2, w.q);
        w.d = ld_f16(b);
        w.u = u;
    }
    static HL_DEV float dot(const W& w, const i8* x, const float* xd) {
        int n = 0;
        const int s = dot16(w.q, ld_x16(x, 32 * w.u), &n) + dot16(w.q + 4, ld_x16(x, 32 * w.u + 16), &n);
        return xd[w.u] * w.d * (float)s;
    }
};

// The weight types with an integer path, as X(ggml type name, struct).
#define HL_FOR_EACH_Q8_TYPE(X) \
    X(q4_0, vq_q4_0)           \
    X(q4_1, vq_q4_1)           \
    X(q5_0, vq_q5_0)           \
    X(q5_1, vq_q5_1)           \
    X(q8_0, vq_q8_0)           \
    X(q4_K, vq_q4_K)           \
    X(q5_K, vq_q5_K)           \
    X(q6_K, vq_q6_K)
