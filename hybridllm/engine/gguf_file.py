"""GGUF files: metadata and tensor directory parsed from a read-only memory map; tensor data stays in
its stored (quantized) type and is only ever viewed, never converted.

We parse the header ourselves instead of using gguf.GGUFReader: the reader builds a numpy view per array
element, which takes 8-14 s for a 262k-token vocabulary; here numeric arrays are single numpy views and
string arrays one tight loop (well under a second). Value types and the layout follow the GGUF spec
(the same constants as the `gguf` package). Every problem is reported as one `GGUFError` line.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType

from ..ggml.types import TRAITS, GGMLType, type_name

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1), GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2), GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1), GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8), GGUFValueType.FLOAT64: ("<d", 8),
}
_NP_TYPES: dict[int, str] = {
    GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_MAX_DIMS = 4


class GGUFError(Exception):
    """A GGUF file that cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLType
    ne: tuple[int, int, int, int]
    offset: int   # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type)


class _Cursor:
    """Bounds-checked little-endian reader over the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int, path: str) -> None:
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF header (read past end at byte {start})")
        self.pos = start + n
        return start

    def scalar(self, vtype: int) -> Any:
        fmt, n = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(n))[0]

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return self.buf[start:start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.path}: corrupt GGUF metadata (value type {vtype})")
        return self.scalar(vtype)

    def array(self) -> Any:
        etype, count = self.u32(), self.u64()
        if etype in _NP_TYPES:
            dt = np.dtype(_NP_TYPES[etype])
            start = self.take(count * dt.itemsize)
            return np.frombuffer(self.buf, dtype=dt, count=count, offset=start).copy()
        if etype == GGUFValueType.STRING:
            return self._strings(count)
        if etype == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        raise GGUFError(f"{self.path}: corrupt GGUF metadata (array element type {etype})")

    def _strings(self, count: int) -> list[str]:
        # one pass over a bytes copy: much faster than struct calls on the mmap per element
        if count > self.size:
            raise GGUFError(f"{self.path}: corrupt GGUF metadata (string array of {count} entries)")
        data, pos, end, out = self.buf, self.pos, self.size, []
        frm = int.from_bytes
        for _ in range(count):
            if pos + 8 > end:
                raise GGUFError(f"{self.path}: truncated or corrupt GGUF header (string array)")
            n = frm(data[pos:pos + 8], "little")
            pos += 8
            if pos + n > end:
                raise GGUFError(f"{self.path}: truncated or corrupt GGUF header (string array)")
            out.append(data[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys to Python values (numeric arrays as numpy arrays);
    `tensors` maps names to TensorInfo; `tensor_data(name)` is a read-only uint8 view of the mapping."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise GGUFError(f"{self.path}: cannot open: {exc.strerror}") from None
        try:
            self.size = os.fstat(fd).st_size
            if self.size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file (only {self.size} bytes)")
            self._mm: mmap.mmap | None = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise

    def _parse(self) -> None:
        assert self._mm is not None
        cur = _Cursor(self._mm, self.size, self.path)
        magic = struct.unpack_from("<I", self._mm, cur.take(4))[0]
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic {self._mm[:4]!r})")
        self.version = cur.u32()
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = cur.u64(), cur.u64()
        if n_tensors > self.size or n_kv > self.size:
            raise GGUFError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.u32())
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: invalid general.alignment {align!r}")
        self.alignment = align
        self.data_offset = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ttype, ne, rel in infos:
            nbytes = TRAITS[ttype].type_size * (ne[0] // TRAITS[ttype].blck_size) * ne[1] * ne[2] * ne[3]
            off = self.data_offset + rel
            if rel % align or off + nbytes > self.size:
                raise GGUFError(f"{self.path}: truncated or corrupt file (tensor {name!r} data at "
                                f"{off}..{off + nbytes} beyond {self.size} bytes)")
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor {name!r}")
            self.tensors[name] = TensorInfo(name, GGMLType(ttype), ne, off, nbytes)

    def _tensor_info(self, cur: _Cursor) -> tuple[str, int, tuple[int, int, int, int], int]:
        name = cur.string()
        n_dims = cur.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
        dims = [cur.u64() for _ in range(n_dims)]
        ttype, rel = cur.u32(), cur.u64()
        if ttype not in TRAITS:
            raise GGUFError(f"{self.path}: tensor {name!r} has unsupported type id {ttype}")
        if any(d <= 0 or d >= 1 << 40 for d in dims):
            raise GGUFError(f"{self.path}: tensor {name!r} has invalid shape {dims}")
        ne = tuple(dims) + (1,) * (_MAX_DIMS - n_dims)
        if ne[0] % TRAITS[ttype].blck_size:
            raise GGUFError(f"{self.path}: tensor {name!r} row of {ne[0]} is not a multiple of the "
                            f"{type_name(ttype)} block size")
        return name, ttype, ne, rel  # type: ignore[return-value]

    # --- access --------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: missing general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        return self.metadata[key]

    def tensor_data(self, name: str) -> np.ndarray:
        """Read-only uint8 view of a tensor's stored bytes (no copy)."""
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        info = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def close(self) -> None:
        """Drop the mapping (metadata and the tensor directory stay usable)."""
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a numpy view is still alive; the mapping goes when it does
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({Path(self.path).name!r}, arch={self.metadata.get('general.architecture')!r}, " \
               f"{len(self.tensors)} tensors)"
