// Rotary embedding math shared by ROPE (rope.cu) and the fused norm -> rope kernel (norm.cu).
#pragma once
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

// cos/sin (times the YaRN magnitude scale) of pair k at position p. theta follows ggml's CPU order of
// operations (a running product p * s * s * ..., not p * s^k) so large positions give the same angles.
HL_DEV void rope_cos_sin(float p, int expo, int k, const u8* ff, float theta_scale, float freq_scale,
                         float ext_factor, float attn_factor, float corr0, float corr1, float* c, float* s) {
    float theta_extrap = p;
    for (int j = 0; j < expo; j++) theta_extrap *= theta_scale;
    if (ff) theta_extrap /= ((const float*)ff)[k];
    const float theta_interp = freq_scale * theta_extrap;
    float theta = theta_interp, mscale = attn_factor;
    if (ext_factor != 0.0f) {
        const float mix = rope_ramp(corr0, corr1, k) * ext_factor;
        theta = theta_interp * (1.0f - mix) + theta_extrap * mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / freq_scale);
    }
    *c = cosf(theta) * mscale;
    *s = sinf(theta) * mscale;
}
