"""ggml tensor basics for the graph API: errors, shape predicates, tensor creation, views, reshapes and
copies. `hybridllm.ggml.ops` re-exports all of it; build graphs through `ops`."""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence


from .tensor import Tensor
from .types import (
    GGML_MAX_NAME,
    TRAITS,
    GGMLOp,
    TensorFlag,
    row_size,
)



class GraphError(ValueError):
    """A graph-construction call that ggml would reject with GGML_ASSERT."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise GraphError(what)


# ------------------------------------------------------------------------------------------------
# predicates (ggml.c names)

def blck_size(t: int) -> int:
    return TRAITS[t].blck_size


def type_size(t: int) -> int:
    return TRAITS[t].type_size


def nelements(a: Tensor) -> int:
    return a.ne[0] * a.ne[1] * a.ne[2] * a.ne[3]


def is_empty(a: Tensor) -> bool:
    return any(n == 0 for n in a.ne)


def is_scalar(a: Tensor) -> bool:
    return a.ne == (1, 1, 1, 1)


def is_vector(a: Tensor) -> bool:
    return a.ne[1] == 1 and a.ne[2] == 1 and a.ne[3] == 1


def is_matrix(a: Tensor) -> bool:
    return a.ne[2] == 1 and a.ne[3] == 1


def is_transposed(a: Tensor) -> bool:
    return a.nb[0] > a.nb[1]


def _is_contiguous_mn(a: Tensor, m: int, n: int) -> bool:
    bs, ts = blck_size(a.type), type_size(a.type)
    if a.ne[0] != bs and a.nb[0] != ts:
        return False
    next_nb = ts * (a.ne[0] // bs)
    for i in range(1, n):
        if i > m:
            if a.ne[i] != 1 and a.nb[i] != next_nb:
                return False
            next_nb *= a.ne[i]
        else:  # this dimension does not need to be contiguous
            next_nb = a.ne[i] * a.nb[i]
    return True


def is_contiguous(a: Tensor) -> bool:
    return _is_contiguous_mn(a, 0, 4)


def is_contiguous_1(a: Tensor) -> bool:
    return _is_contiguous_mn(a, 1, 4)


def is_contiguous_2(a: Tensor) -> bool:
    return _is_contiguous_mn(a, 2, 4)


def is_contiguous_rows(a: Tensor) -> bool:
    return a.ne[0] == blck_size(a.type) or a.nb[0] == type_size(a.type)


def is_padded_1d(a: Tensor) -> bool:
    return (a.nb[0] == type_size(a.type) and a.nb[2] == a.nb[1] * a.ne[1]
            and a.nb[3] == a.nb[2] * a.ne[2])


def are_same_shape(a: Tensor, b: Tensor) -> bool:
    return a.ne == b.ne


def can_repeat(a: Tensor, b: Tensor) -> bool:
    """True if b can be represented as a repetition of a."""
    if is_empty(a):
        return is_empty(b)
    return all(b.ne[i] % a.ne[i] == 0 for i in range(4))


def can_repeat_rows(a: Tensor, b: Tensor) -> bool:
    return a.ne[0] == b.ne[0] and can_repeat(a, b)


def can_mul_mat(a: Tensor, b: Tensor) -> bool:
    return a.ne[0] == b.ne[0] and b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0


# ------------------------------------------------------------------------------------------------
# tensor creation

def _fmt_name(fmt: str, *names: str) -> str:
    """ggml_format_name: vsnprintf into a 64-byte buffer (63 characters kept)."""
    return (fmt % names)[:GGML_MAX_NAME - 1]


def _new(type: int, ne: Sequence[int], view_src: Tensor | None = None, view_offs: int = 0) -> Tensor:
    """ggml_new_tensor_impl: default strides, views resolved to their ultimate base."""
    _check(0 < len(ne) <= 4, f"bad number of dims {len(ne)}")
    _check(type in TRAITS, f"bad tensor type {type}")
    ne4 = tuple(int(n) for n in ne) + (1,) * (4 - len(ne))
    if view_src is not None and view_src.view_src is not None:
        view_offs += view_src.view_offs
        view_src = view_src.view_src
    if view_src is not None:
        data_size = row_size(type, ne4[0]) * ne4[1] * ne4[2] * ne4[3]
        _check(data_size == 0 or data_size + view_offs <= view_src.nbytes,
               f"view of {view_src.name!r} out of bounds ({data_size}+{view_offs} > {view_src.nbytes})")
    tr = TRAITS[type]
    nb0 = tr.type_size
    nb1 = nb0 * (ne4[0] // tr.blck_size)
    nb = (nb0, nb1, nb1 * ne4[1], nb1 * ne4[1] * ne4[2])
    t = Tensor(type, ne4, nb, view_src=view_src, view_offs=view_offs)
    if view_src is not None:
        t.buffer = view_src.buffer
        t.offset = view_src.offset + view_offs
    return t


def _set_op(t: Tensor, op: GGMLOp, *src: Tensor | None, params: bytes | None = None) -> Tensor:
    t.op = op
    srcs = list(src)
    while srcs and srcs[-1] is None:
        srcs.pop()
    t.src = srcs
    if params is not None:
        t.op_params = params.ljust(64, b"\0")
    return t


def _params(*values: float) -> bytes:
    """i32 for ints, f32 for floats, in order (ggml_set_op_params of a packed C array)."""
    return b"".join(struct.pack("<f", v) if isinstance(v, float) else struct.pack("<i", v)
                    for v in values)


def _set_param_i32(t: Tensor, i: int, v: int) -> None:
    p = bytearray(t.op_params)
    struct.pack_into("<i", p, 4 * i, v)
    t.op_params = bytes(p)


def _set_param_f32(t: Tensor, i: int, v: float) -> None:
    p = bytearray(t.op_params)
    struct.pack_into("<f", p, 4 * i, v)
    t.op_params = bytes(p)


def new_tensor(type: int, *ne: int) -> Tensor:
    return _new(type, ne)


def new_tensor_1d(type: int, ne0: int) -> Tensor:
    return _new(type, (ne0,))


def new_tensor_2d(type: int, ne0: int, ne1: int) -> Tensor:
    return _new(type, (ne0, ne1))


def new_tensor_3d(type: int, ne0: int, ne1: int, ne2: int) -> Tensor:
    return _new(type, (ne0, ne1, ne2))


def new_tensor_4d(type: int, ne0: int, ne1: int, ne2: int, ne3: int) -> Tensor:
    return _new(type, (ne0, ne1, ne2, ne3))


def dup_tensor(a: Tensor) -> Tensor:
    return _new(a.type, a.ne)


def view_tensor(a: Tensor) -> Tensor:
    t = _new(a.type, a.ne, a, 0)
    t.name = _fmt_name("%s (view)", a.name)
    t.nb = a.nb
    return t


def set_name(t: Tensor, name: str) -> Tensor:
    t.name = name[:GGML_MAX_NAME - 1]
    return t


def set_input(t: Tensor) -> Tensor:
    _check(t.op == GGMLOp.NONE, "set_input on a computed tensor")
    t.flags |= TensorFlag.INPUT
    return t


def set_output(t: Tensor) -> Tensor:
    cur: Tensor | None = t
    while cur is not None:
        cur.flags |= TensorFlag.OUTPUT
        cur = cur.view_src
    return t


# ------------------------------------------------------------------------------------------------
# views and layout

def _view(a: Tensor, ne: Sequence[int], offset: int) -> Tensor:
    t = _new(a.type, ne, a, offset)
    t.name = _fmt_name("%s (view)", a.name)
    return _set_op(t, GGMLOp.VIEW, a, params=struct.pack("<Q", offset))


def view_1d(a: Tensor, ne0: int, offset: int) -> Tensor:
    return _view(a, (ne0,), offset)


def view_2d(a: Tensor, ne0: int, ne1: int, nb1: int, offset: int) -> Tensor:
    t = _view(a, (ne0, ne1), offset)
    t.nb = (t.nb[0], nb1, nb1 * ne1, nb1 * ne1)
    return t


def view_3d(a: Tensor, ne0: int, ne1: int, ne2: int, nb1: int, nb2: int, offset: int) -> Tensor:
    t = _view(a, (ne0, ne1, ne2), offset)
    t.nb = (t.nb[0], nb1, nb2, nb2 * ne2)
    return t


def view_4d(a: Tensor, ne0: int, ne1: int, ne2: int, ne3: int, nb1: int, nb2: int, nb3: int,
            offset: int) -> Tensor:
    t = _view(a, (ne0, ne1, ne2, ne3), offset)
    t.nb = (t.nb[0], nb1, nb2, nb3)
    return t


def _reshape(a: Tensor, ne: Sequence[int]) -> Tensor:
    _check(is_contiguous(a), f"reshape of non-contiguous {a.name!r}")
    _check(nelements(a) == math.prod(ne), f"reshape {a.ne} -> {tuple(ne)} changes the element count")
    t = _new(a.type, ne, a, 0)
    t.name = _fmt_name("%s (reshaped)", a.name)
    return _set_op(t, GGMLOp.RESHAPE, a)


def reshape(a: Tensor, b: Tensor) -> Tensor:
    _check(is_contiguous(a), f"reshape of non-contiguous {a.name!r}")
    _check(nelements(a) == nelements(b), "reshape changes the element count")
    t = _new(a.type, b.ne, a, 0)
    t.name = _fmt_name("%s (reshaped)", a.name)
    return _set_op(t, GGMLOp.RESHAPE, a)


def reshape_1d(a: Tensor, ne0: int) -> Tensor:
    return _reshape(a, (ne0,))


def reshape_2d(a: Tensor, ne0: int, ne1: int) -> Tensor:
    return _reshape(a, (ne0, ne1))


def reshape_3d(a: Tensor, ne0: int, ne1: int, ne2: int) -> Tensor:
    return _reshape(a, (ne0, ne1, ne2))


def reshape_4d(a: Tensor, ne0: int, ne1: int, ne2: int, ne3: int) -> Tensor:
    return _reshape(a, (ne0, ne1, ne2, ne3))


def permute(a: Tensor, axis0: int, axis1: int, axis2: int, axis3: int) -> Tensor:
    axes = (axis0, axis1, axis2, axis3)
    _check(sorted(axes) == [0, 1, 2, 3], f"bad permutation {axes}")
    t = view_tensor(a)
    t.name = _fmt_name("%s (permuted)", a.name)
    ne, nb = [0] * 4, [0] * 4
    for i, ax in enumerate(axes):  # source dim i goes to result dim ax
        ne[ax], nb[ax] = a.ne[i], a.nb[i]
    t.ne, t.nb = tuple(ne), tuple(nb)  # type: ignore[assignment]
    return _set_op(t, GGMLOp.PERMUTE, a, params=_params(*axes))


def transpose(a: Tensor) -> Tensor:
    t = view_tensor(a)
    t.name = _fmt_name("%s (transposed)", a.name)
    t.ne = (a.ne[1], a.ne[0], a.ne[2], a.ne[3])
    t.nb = (a.nb[1], a.nb[0], a.nb[2], a.nb[3])
    return _set_op(t, GGMLOp.TRANSPOSE, a)


def cont(a: Tensor) -> Tensor:
    t = dup_tensor(a)
    t.name = _fmt_name("%s (cont)", a.name)
    return _set_op(t, GGMLOp.CONT, a)


def cont_4d(a: Tensor, ne0: int, ne1: int = 1, ne2: int = 1, ne3: int = 1) -> Tensor:
    _check(nelements(a) == ne0 * ne1 * ne2 * ne3, "cont_4d changes the element count")
    t = _new(a.type, (ne0, ne1, ne2, ne3))
    t.name = _fmt_name("%s (cont)", a.name)
    return _set_op(t, GGMLOp.CONT, a)


def cont_1d(a: Tensor, ne0: int) -> Tensor:
    return cont_4d(a, ne0)


def cont_2d(a: Tensor, ne0: int, ne1: int) -> Tensor:
    return cont_4d(a, ne0, ne1)


def cont_3d(a: Tensor, ne0: int, ne1: int, ne2: int) -> Tensor:
    return cont_4d(a, ne0, ne1, ne2)


def cpy(a: Tensor, b: Tensor) -> Tensor:
    """Copy a into b (with conversion); the result is a view of b."""
    _check(nelements(a) == nelements(b), "cpy between tensors of different sizes")
    t = view_tensor(b)
    t.name = (_fmt_name("%s (copy of %s)", b.name, a.name) if b.name
              else _fmt_name("%s (copy)", a.name))
    return _set_op(t, GGMLOp.CPY, a, b)


def cast(a: Tensor, type: int) -> Tensor:
    t = _new(type, a.ne)
    t.name = _fmt_name("%s (copy)", a.name)
    return _set_op(t, GGMLOp.CPY, a, t)  # src[1] = itself, as ggml does


def dup(a: Tensor, inplace: bool = False) -> Tensor:
    return _set_op(view_tensor(a) if inplace else dup_tensor(a), GGMLOp.DUP, a)
