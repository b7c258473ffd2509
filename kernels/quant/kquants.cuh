// 256-element super-block formats (shared/spec/quant-formats.md): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS.
// dequant8(row, g, y, K): the 8 logical elements [8g, 8g+8) of a row, as f32. Inside a super-block, group
// j = g % 32 never straddles a scale boundary (scales cover 16 or 32 elements), so each call decodes one
// scale and eight quants.
#pragma once
#include "../common.cuh"
#include "legacy.cuh"

// Q4_K/Q5_K: 8 six-bit scales and mins packed into 12 bytes.
HL_DEV void scale_min_k4(const u8* q, int j, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

struct q2_K {
    static constexpr int QK = 256, BYTES = 84, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 5) * BYTES;
        const int j = g & 31;
        const int h = j >> 4, s = (j >> 2) & 3, l0 = (j & 3) * 8;  // half, 2-bit shift index, offset in 32
        const int sc = b[8 * h + 2 * s + (l0 >= 16)];
        const float dl = ld_f16(b + 80) * (float)(sc & 15), ml = ld_f16(b + 82) * (float)(sc >> 4);
        const u8* q = b + 16 + 32 * h + l0;
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = dl * i2f((q[i] >> (2 * s)) & 3) - ml;
    }
};

struct q3_K {
    static constexpr int QK = 256, BYTES = 110, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 5) * BYTES;
        const int j = g & 31;
        const int h = j >> 4, s = (j >> 2) & 3, l0 = (j & 3) * 8;
        const int is = 8 * h + 2 * s + (l0 >= 16);  // 6-bit signed scale index 0..15
        const u8* sb = b + 96;
        const int low4 = is < 8 ? (sb[is] & 15) : (sb[is - 8] >> 4);
        const int high2 = (sb[8 + (is & 3)] >> (2 * (is >> 2))) & 3;
        const float dl = ld_f16(b + 108) * (float)((low4 | (high2 << 4)) - 32);
        const u8* q = b + 32 + 32 * h + l0;
        const u8* hm = b + l0;
        const int hbit = 4 * h + s;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int q2 = (q[i] >> (2 * s)) & 3;
            y[i] = dl * i2f(q2 - (((hm[i] >> hbit) & 1) ? 0 : 4));
        }
    }
};

struct q4_K {
    static constexpr int QK = 256, BYTES = 144, ALIGN = 4;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 5) * BYTES;
        const int j = g & 31;
        const int p = j >> 3, hi = (j >> 2) & 1, l0 = (j & 3) * 8;  // 64-chunk, nibble, offset in 32
        float sc, m;
        scale_min_k4(b + 4, 2 * p + hi, &sc, &m);
        const float dl = ld_f16(b) * sc, ml = ld_f16(b + 2) * m;
        const u8* q = b + 16 + 32 * p + l0;
        const u32 w0 = ld_u32(q) >> (4 * hi), w1 = ld_u32(q + 4) >> (4 * hi);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            y[i] = dl * i2f((w0 >> (8 * i)) & 15) - ml;
            y[i + 4] = dl * i2f((w1 >> (8 * i)) & 15) - ml;
        }
    }
};

struct q5_K {
    static constexpr int QK = 256, BYTES = 176, ALIGN = 4;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 5) * BYTES;
        const int j = g & 31;
        const int p = j >> 3, hi = (j >> 2) & 1, l0 = (j & 3) * 8;
        float sc, m;
        scale_min_k4(b + 4, 2 * p + hi, &sc, &m);
        const float dl = ld_f16(b) * sc, ml = ld_f16(b + 2) * m;
        const u8* q = b + 48 + 32 * p + l0;
        const int hb = 2 * p + hi;  // bit of qh[l] holding the 5th bit
        const u32 w0 = ld_u32(q) >> (4 * hi), w1 = ld_u32(q + 4) >> (4 * hi);
        const u32 h0 = ld_u32(b + 16 + l0) >> hb, h1 = ld_u32(b + 16 + l0 + 4) >> hb;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            y[i] = dl * i2f(((w0 >> (8 * i)) & 15) | (((h0 >> (8 * i)) & 1) << 4)) - ml;
            y[i + 4] = dl * i2f(((w1 >> (8 * i)) & 15) | (((h1 >> (8 * i)) & 1) << 4)) - ml;
        }
    }
};

struct q6_K {
    static constexpr int QK = 256, BYTES = 210, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 5) * BYTES;
        const int j = g & 31;
        const int h = j >> 4, q = (j >> 2) & 3, l0 = (j & 3) * 8;  // half, quarter, offset in 32
        const float dl = ld_f16(b + 208) * (float)(i8)b[192 + 8 * h + (l0 >> 4) + 2 * q];
        const u8* ql = b + 64 * h + l0 + 32 * (q & 1);
        const u8* qh = b + 128 + 32 * h + l0;
        const int sl = 4 * (q >> 1), sh = 2 * q;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int v = ((ql[i] >> sl) & 15) | (((qh[i] >> sh) & 3) << 4);
            y[i] = dl * i2f(v - 32);
        }
    }
};

struct iq4_xs {
    static constexpr int QK = 256, BYTES = 136, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 5) * BYTES;
        const int j = g & 31;
        const int ib = j >> 2, c = j & 3;  // 32-element sub-block, group inside it
        const int ls = ((b[4 + (ib >> 1)] >> (4 * (ib & 1))) & 15) | (((ld_u16(b + 2) >> (2 * ib)) & 3) << 4);
        const float dl = ld_f16(b) * (float)(ls - 32);
        int q[8];
        nibbles8(b + 8 + 16 * ib, c, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = dl * i2f(kvalue_iq4nl(q[i]));
    }
};
