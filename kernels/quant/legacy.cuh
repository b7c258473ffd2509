// 32-element block formats (shared/spec/quant-formats.md): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4.
// dequant8(row, g, y, K): the 8 logical elements [8g, 8g+8) of a row of blocks, as f32. Blocks are 2-byte
// aligned at best (18/20/22/34 bytes), so loads stay 16-bit or narrower.
#pragma once
#include "../common.cuh"

// Within a 32-block, group c = 0..3 covers elements 8c..8c+7: the low nibbles of qs[0..15] hold
// elements 0..15 and the high nibbles 16..31, so c picks the byte half (c & 1) and the nibble (c >> 1).
HL_DEV void nibbles8(const u8* qs, int c, int* q) {
    const u8* p = qs + 8 * (c & 1);
    const int sh = 4 * (c >> 1);
#pragma unroll
    for (int i = 0; i < 8; i++) q[i] = (p[i] >> sh) & 15;
}

struct q4_0 {
    static constexpr int QK = 32, BYTES = 18, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const float d = ld_f16(b);
        int q[8];
        nibbles8(b + 2, g & 3, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = i2f(q[i] - 8) * d;
    }
};

struct q4_1 {
    static constexpr int QK = 32, BYTES = 20, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const float d = ld_f16(b), m = ld_f16(b + 2);
        int q[8];
        nibbles8(b + 4, g & 3, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = i2f(q[i]) * d + m;
    }
};

struct q5_0 {
    static constexpr int QK = 32, BYTES = 22, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const float d = ld_f16(b);
        const u32 qh = ld_u32_a2(b + 2) >> (8 * (g & 3));
        int q[8];
        nibbles8(b + 6, g & 3, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = i2f((q[i] | (int)(((qh >> i) & 1) << 4)) - 16) * d;
    }
};

struct q5_1 {
    static constexpr int QK = 32, BYTES = 24, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const float d = ld_f16(b), m = ld_f16(b + 2);
        const u32 qh = ld_u32_a2(b + 4) >> (8 * (g & 3));
        int q[8];
        nibbles8(b + 8, g & 3, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = i2f(q[i] | (int)(((qh >> i) & 1) << 4)) * d + m;
    }
};

struct q8_0 {
    static constexpr int QK = 32, BYTES = 34, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const float d = ld_f16(b);
        const u8* qs = b + 2 + 8 * (g & 3);
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
            const u32 v = ld_u16(qs + i);
            y[i] = i2f((i8)(v & 0xff)) * d;
            y[i + 1] = i2f((i8)(v >> 8)) * d;
        }
    }
};

// 16-entry int8 tables packed into two 64-bit constants: a lookup stays in registers (a local array
// indexed at run time would spill to local memory).
HL_DEV int lut16_i8(u64 lo, u64 hi, int i) { return (int)(i8)((i < 8 ? lo : hi) >> (8 * (i & 7))); }

// kvalues_iq4nl: -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113
HL_DEV int kvalue_iq4nl(int i) { return lut16_i8(0xf6eaddcfbfad9881ull, 0x7159453526190d01ull, i); }

struct iq4_nl {
    static constexpr int QK = 32, BYTES = 18, ALIGN = 2;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const float d = ld_f16(b);
        int q[8];
        nibbles8(b + 2, g & 3, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = i2f(kvalue_iq4nl(q[i])) * d;
    }
};

// kvalues_fp4 (twice the E2M1 value): 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12
HL_DEV int kvalue_fp4(int i) { return lut16_i8(0xc08060403020100ull, 0xf4f8fafcfdfeff00ull, i); }

struct mxfp4 {
    static constexpr int QK = 32, BYTES = 17, ALIGN = 1;
    static constexpr bool PLAIN = false;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int) {
        const u8* b = row + (g >> 2) * BYTES;
        const int e = b[0];
        // 2^(e-128): a normal float for e >= 2, the denormals 2^-127 / 2^-128 for e = 1 / 0
        const float d = e >= 2 ? bits_f32((u32)(e - 1) << 23) : bits_f32(0x00200000u << e);
        int q[8];
        nibbles8(b + 1, g & 3, q);
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = i2f(kvalue_fp4(q[i])) * d;
    }
};
