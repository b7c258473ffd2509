// Every weight type with a dequant8 decoder, as X(ggml type name, decoder struct). Kernels instantiate
// per type with this list; the host finds them by the ggml type name (hybridllm.ggml.types.TRAITS).
#pragma once
#include "plain.cuh"
#include "legacy.cuh"
#include "kquants.cuh"

#define HL_FOR_EACH_WEIGHT_TYPE(X) \
    X(f32, t_f32)                  \
    X(f16, t_f16)                  \
    X(bf16, t_bf16)                \
    X(q4_0, q4_0)                  \
    X(q4_1, q4_1)                  \
    X(q5_0, q5_0)                  \
    X(q5_1, q5_1)                  \
    X(q8_0, q8_0)                  \
    X(iq4_nl, iq4_nl)              \
    X(mxfp4, mxfp4)                \
    X(q2_K, q2_K)                  \
    X(q3_K, q3_K)                  \
    X(q4_K, q4_K)                  \
    X(q5_K, q5_K)                  \
    X(q6_K, q6_K)                  \
    X(iq4_xs, iq4_xs)
