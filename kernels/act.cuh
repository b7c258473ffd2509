// Activation functions shared by the elementwise kernels and the fused matrix-vector epilogues
// (GLU of a gate and an up projection), with ggml's CPU numerics.
#pragma once
#include "common.cuh"

// ggml's CPU GELU/GELU_QUICK go through a table indexed by the f16 rounding of x and return an f16-rounded
// value; doing the same keeps results equal to the reference instead of ~1e-3 away.
HL_DEV float f16_round(float x) { return f16_to_f32(f32_to_f16(x)); }
HL_DEV float gelu_tanh(float x) {
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    const float h = f16_round(x);
    return f16_round(0.5f * h * (1.0f + tanhf(0.79788456080286535588f * h * (1.0f + 0.044715f * h * h))));
}
HL_DEV float gelu_quick(float x) {
    const float h = f16_round(x);
    return f16_round(h * (1.0f / (1.0f + expf(-1.702f * h))));
}
HL_DEV float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
HL_DEV float silu(float x) { return x / (1.0f + expf(-x)); }

enum { G_REGLU = 0, G_GEGLU = 1, G_SWIGLU = 2, G_SWIGLU_OAI = 3, G_GEGLU_ERF = 4, G_GEGLU_QUICK = 5,
       G_SWIGLU_CLAMP = 6 };

HL_DEV float glu(int op, float a, float b, float alpha, float limit) {
    switch (op) {
        case G_REGLU: return (a > 0.0f ? a : 0.0f) * b;
        case G_GEGLU: return gelu_tanh(a) * b;
        case G_SWIGLU: return silu(a) * b;
        case G_GEGLU_ERF: return gelu_erf(a) * b;
        case G_GEGLU_QUICK: return gelu_quick(a) * b;
        case G_SWIGLU_OAI: {
            const float x = fminf(a, limit), y = fminf(fmaxf(b, -limit), limit);
            return x / (1.0f + expf(-alpha * x)) * (y + 1.0f);
        }
        case G_SWIGLU_CLAMP: return silu(fminf(a, limit)) * fminf(fmaxf(b, -limit), limit);
        default: return 0.0f;
    }
}

