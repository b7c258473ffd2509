"""ggml enums and type traits at the version the protocol targets (llama.cpp b11739, RPC 8.0.0).

Values are ggml's own (ggml-rpc.md §10); never renumber. GGMLType ids 4, 5, 31-33, 36-38 are removed types
and have block size 0, which the wire validation rejects.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


GGML_TYPE_COUNT = 43


class TypeTraits(NamedTuple):
    name: str          # ggml_type_name()
    blck_size: int     # elements per block
    type_size: int     # bytes per block
    quantized: bool


TRAITS: dict[int, TypeTraits] = {
    0: TypeTraits("f32", 1, 4, False), 1: TypeTraits("f16", 1, 2, False),
    2: TypeTraits("q4_0", 32, 18, True), 3: TypeTraits("q4_1", 32, 20, True),
    6: TypeTraits("q5_0", 32, 22, True), 7: TypeTraits("q5_1", 32, 24, True),
    8: TypeTraits("q8_0", 32, 34, True), 9: TypeTraits("q8_1", 32, 36, True),
    10: TypeTraits("q2_K", 256, 84, True), 11: TypeTraits("q3_K", 256, 110, True),
    12: TypeTraits("q4_K", 256, 144, True), 13: TypeTraits("q5_K", 256, 176, True),
    14: TypeTraits("q6_K", 256, 210, True), 15: TypeTraits("q8_K", 256, 292, True),
    16: TypeTraits("iq2_xxs", 256, 66, True), 17: TypeTraits("iq2_xs", 256, 74, True),
    18: TypeTraits("iq3_xxs", 256, 98, True), 19: TypeTraits("iq1_s", 256, 50, True),
    20: TypeTraits("iq4_nl", 32, 18, True), 21: TypeTraits("iq3_s", 256, 110, True),
    22: TypeTraits("iq2_s", 256, 82, True), 23: TypeTraits("iq4_xs", 256, 136, True),
    24: TypeTraits("i8", 1, 1, False), 25: TypeTraits("i16", 1, 2, False),
    26: TypeTraits("i32", 1, 4, False), 27: TypeTraits("i64", 1, 8, False),
    28: TypeTraits("f64", 1, 8, False), 29: TypeTraits("iq1_m", 256, 56, True),
    30: TypeTraits("bf16", 1, 2, False), 34: TypeTraits("tq1_0", 256, 54, True),
    35: TypeTraits("tq2_0", 256, 66, True), 39: TypeTraits("mxfp4", 32, 17, True),
    40: TypeTraits("nvfp4", 64, 36, True), 41: TypeTraits("q1_0", 128, 18, True),
    42: TypeTraits("q2_0", 64, 18, True),
}


def is_valid_type(t: int) -> bool:
    """True for ids a peer may send: below GGML_TYPE_COUNT and not a removed type (block size 0)."""
    return 0 <= t < GGML_TYPE_COUNT and t in TRAITS


def type_name(t: int) -> str:
    tr = TRAITS.get(t)
    return tr.name if tr else f"type{t}"


def row_size(t: int, n: int) -> int:
    tr = TRAITS[t]
    return tr.type_size * n // tr.blck_size


def default_strides(t: int, ne: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    tr = TRAITS[t]
    nb0 = tr.type_size
    nb1 = nb0 * (ne[0] // tr.blck_size)
    nb2 = nb1 * ne[1]
    nb3 = nb2 * ne[2]
    return (nb0, nb1, nb2, nb3)


def nbytes(t: int, ne: tuple[int, ...], nb: tuple[int, ...]) -> int:
    """ggml_nbytes from ne/nb exactly as ggml computes it (§10.1); 0 if any dim is <= 0."""
    if any(n <= 0 for n in ne):
        return 0
    tr = TRAITS[t]
    if tr.blck_size == 1:
        total = tr.type_size
        for i in range(4):
            total += (ne[i] - 1) * nb[i]
        return total
    total = ne[0] * nb[0] // tr.blck_size
    for i in range(1, 4):
        total += (ne[i] - 1) * nb[i]
    return total


class GGMLOp(IntEnum):
    NONE = 0; DUP = 1; ADD = 2; ADD_ID = 3; ADD1 = 4; ACC = 5; SUB = 6; MUL = 7; DIV = 8; SQR = 9
    SQRT = 10; LOG = 11; SIN = 12; COS = 13; SUM = 14; SUM_ROWS = 15; CUMSUM = 16; MEAN = 17
    ARGMAX = 18; COUNT_EQUAL = 19; REPEAT = 20; REPEAT_BACK = 21; CONCAT = 22; SILU_BACK = 23
    NORM = 24; RMS_NORM = 25; RMS_NORM_BACK = 26; GROUP_NORM = 27; L2_NORM = 28; MUL_MAT = 29
    MUL_MAT_ID = 30; OUT_PROD = 31; SCALE = 32; SET = 33; CPY = 34; CONT = 35; RESHAPE = 36
    VIEW = 37; PERMUTE = 38; TRANSPOSE = 39; GET_ROWS = 40; GET_ROWS_BACK = 41; SET_ROWS = 42
    DIAG = 43; DIAG_MASK_INF = 44; DIAG_MASK_ZERO = 45; SOFT_MAX = 46; SOFT_MAX_BACK = 47
    ROPE = 48; ROPE_BACK = 49; CLAMP = 50; CONV_TRANSPOSE_1D = 51; IM2COL = 52; IM2COL_BACK = 53
    IM2COL_3D = 54; COL2IM_1D = 55; CONV_2D = 56; CONV_3D = 57; CONV_2D_DW = 58
    CONV_TRANSPOSE_2D = 59; POOL_1D = 60; POOL_2D = 61; POOL_2D_BACK = 62; UPSCALE = 63; PAD = 64
    PAD_REFLECT_1D = 65; ROLL = 66; ARANGE = 67; TIMESTEP_EMBEDDING = 68; ARGSORT = 69; TOP_K = 70
    LEAKY_RELU = 71; TRI = 72; FILL = 73; FLASH_ATTN_EXT = 74; FLASH_ATTN_BACK = 75; SSM_CONV = 76
    SSM_SCAN = 77; WIN_PART = 78; WIN_UNPART = 79; GET_REL_POS = 80; ADD_REL_POS = 81
    RWKV_WKV6 = 82; GATED_LINEAR_ATTN = 83; RWKV_WKV7 = 84; SOLVE_TRI = 85; GATED_DELTA_NET = 86
    LIGHTNING_INDEXER = 87; DSV4_HC_COMB = 88; DSV4_HC_PRE = 89; DSV4_HC_POST = 90; UNARY = 91
    MAP_CUSTOM1 = 92; MAP_CUSTOM2 = 93; MAP_CUSTOM3 = 94; CUSTOM = 95; CROSS_ENTROPY_LOSS = 96
    CROSS_ENTROPY_LOSS_BACK = 97; OPT_STEP_ADAMW = 98; OPT_STEP_SGD = 99; GLU = 100


GGML_OP_COUNT = 101

# Ops whose result aliases their source: nothing to compute (ggml-rpc.md §6.3).
VIEW_OPS = frozenset({GGMLOp.NONE, GGMLOp.RESHAPE, GGMLOp.VIEW, GGMLOp.PERMUTE, GGMLOp.TRANSPOSE})


class UnaryOp(IntEnum):
    ABS = 0; SGN = 1; NEG = 2; STEP = 3; TANH = 4; ELU = 5; RELU = 6; SIGMOID = 7; GELU = 8
    GELU_QUICK = 9; SILU = 10; HARDSWISH = 11; HARDSIGMOID = 12; EXP = 13; EXPM1 = 14; SOFTPLUS = 15
    GELU_ERF = 16; XIELU = 17; FLOOR = 18; CEIL = 19; ROUND = 20; TRUNC = 21


class GluOp(IntEnum):
    REGLU = 0; GEGLU = 1; SWIGLU = 2; SWIGLU_OAI = 3; GEGLU_ERF = 4; GEGLU_QUICK = 5; SWIGLU_CLAMP = 6


class TensorFlag(IntFlag):
    INPUT = 1
    OUTPUT = 2
    PARAM = 4
    LOSS = 8
    COMPUTE = 16


class RopeMode(IntEnum):
    NORMAL = 0
    NEOX = 2
    MROPE = 8
    VISION = 24
    IMROPE = 40


GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
