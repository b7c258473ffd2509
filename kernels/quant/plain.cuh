// Plain (non-block) weight types behind the same decoder interface as the quantized ones:
// dequant8(row, g, y, K) writes the 8 logical elements [8g, 8g+8) of a row as f32, zeros past K.
#pragma once
#include "../common.cuh"

struct t_f32 {
    static constexpr int QK = 1, BYTES = 4, ALIGN = 4;
    static constexpr bool PLAIN = true;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int K) {
        const float* x = (const float*)row + 8 * g;
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = 8 * g + i < K ? x[i] : 0.0f;
    }
};

struct t_f16 {
    static constexpr int QK = 1, BYTES = 2, ALIGN = 2;
    static constexpr bool PLAIN = true;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int K) {
        const u16* x = (const u16*)row + 8 * g;
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = 8 * g + i < K ? f16_to_f32(x[i]) : 0.0f;
    }
};

struct t_bf16 {
    static constexpr int QK = 1, BYTES = 2, ALIGN = 2;
    static constexpr bool PLAIN = true;
    static HL_DEV void dequant8(const u8* row, int g, float* y, int K) {
        const u16* x = (const u16*)row + 8 * g;
#pragma unroll
        for (int i = 0; i < 8; i++) y[i] = 8 * g + i < K ? bf16_to_f32(x[i]) : 0.0f;
    }
};
