"""Which device holds which layer, decided before any byte is uploaded.

Devices are the RPC workers' devices (in `--rpc` order) followed by the master's local device, the order
llama.cpp uses (RPC servers first). Each repeating layer `blk.N.*` goes, with its KV cache, to one device:
by default in proportion to the memory each device reports free once its fixed share is taken off
(compute buffers; for the master the input and output layers too), or by explicit `--tensor-split`
proportions. Layers stay in order, so the graph crosses each device boundary once. The token embedding
stays on the master (like llama.cpp), and so does the output layer: logits never cross the wire, only a
row of hidden state does. Tensors that are neither (e.g. llama3's `rope_freqs`) are copied to every device.

    costs = model_costs(f, hp, n_ctx=4096, n_ubatch=512)
    placement = place(costs, [worker, local], master=local)   # raises PlacementError if it cannot fit
    print(placement.describe())
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backends.base import Backend
from ..ggml.types import GGMLType, row_size
from .gguf_file import GGUFFile
from .kv_cache import pad

LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")
IO_TENSORS = frozenset({"token_embd.weight", "output_norm.weight", "output.weight", "output.bias"})
MiB = 1 << 20


class PlacementError(ValueError):
    """The model cannot be placed on these devices (does not fit, bad --tensor-split); one line."""


@dataclass(frozen=True)
class ModelCosts:
    """Bytes the model needs, by where they must go."""
    name: str
    layer_weights: tuple[int, ...]   # per layer
    layer_kv: tuple[int, ...]        # per layer (its KV cache cells, K and V)
    io_weights: int                  # token embedding and output layer: on the master
    shared_weights: int              # on every device (see the module docstring)
    compute_layers: int              # estimated compute buffer of a device running layers
    compute_master: int              # estimated compute buffer of the master's input/output work

    @property
    def n_layer(self) -> int:
        return len(self.layer_weights)

    @property
    def total(self) -> int:
        return sum(self.layer_weights) + sum(self.layer_kv) + self.io_weights + self.shared_weights \
            + self.compute_layers + self.compute_master


def tensor_role(name: str) -> tuple[str, int]:
    """("layer", il), ("io", -1) or ("shared", -1) for a GGUF tensor name."""
    m = LAYER_TENSOR.match(name)
    if m:
        return "layer", int(m.group(1))
    return ("io", -1) if name in IO_TENSORS else ("shared", -1)


def model_costs(f: GGUFFile, hp: object, *, n_ctx: int, n_ubatch: int, type_k: GGMLType = GGMLType.F16,
                type_v: GGMLType = GGMLType.F16, flash_attn: bool = True, kv_slots: int = 1,
                n_seq: int = 1) -> ModelCosts:
    """Per-layer weights (from the file's tensor directory) and KV cache (times `kv_slots` caches of
    n_ctx cells each; a sliding-window ring shared by n_seq sequences holds each one's window), and compute
    estimates."""
    n_layer: int = hp.n_layer  # type: ignore[attr-defined]
    weights = [0] * n_layer
    io = shared = 0
    for name, info in f.tensors.items():
        role, il = tensor_role(name)
        if role == "layer" and il < n_layer:
            weights[il] += info.nbytes
        elif role == "io":
            io += info.nbytes
        elif role == "shared":
            shared += info.nbytes
    size = pad(n_ctx)
    n_swa = getattr(hp, "n_swa", 0)
    swa_size = pad(min(size, n_swa * n_seq + n_ubatch)) if n_swa else size
    per_cell = row_size(type_k, hp.n_embd_k_gqa) + row_size(type_v, hp.n_embd_v_gqa)  # type: ignore[attr-defined]
    kv = [kv_slots * (swa_size if hp.is_swa(il) else size) * per_cell  # type: ignore[attr-defined]
          for il in range(n_layer)]
    layers, master = compute_estimate(hp, n_ubatch, size, flash_attn)
    return ModelCosts(str(f.get("general.name", f.path)), tuple(weights), tuple(kv), io, shared, layers, master)


def compute_estimate(hp: object, n_ubatch: int, n_kv: int, flash_attn: bool) -> tuple[int, int]:
    """(layer device, master) compute buffer bytes for a full ubatch: an upper estimate of the F32
    activations alive at once inside one layer (residual, Q/K/V, attention, FFN), plus the scores of
    KQ/softmax attention without flash attention; the master adds embeddings and one logits row."""
    g = hp.__getattribute__
    T, E = n_ubatch, g("n_embd")
    q, k, v = g("n_head") * g("head_dim_k"), g("n_embd_k_gqa"), g("n_embd_v_gqa")
    ff = max(g("n_ff"), getattr(hp, "n_ff_exp", 0) * max(getattr(hp, "n_expert_used", 0), 1))
    layer = 4 * T * (3 * E + 2 * q + k + v + 3 * ff) + 2 * T * n_kv * 2   # + masks and indices
    if not flash_attn:
        layer += 2 * 4 * T * n_kv * g("n_head")
    layer *= 2  # memory is reused only some nodes after its last reader (alloc.REUSE_LAG)
    master = 4 * T * 3 * E + 4 * g("n_vocab") + 4 * E
    return layer, master


# ------------------------------------------------------------------------------------------------
# placement

@dataclass
class DeviceShare:
    """What one device holds and what it reported free."""
    backend: Backend
    free: int
    total: int
    is_master: bool
    layers: list[int] = field(default_factory=list)
    weights: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def need(self) -> int:
        return self.weights + self.kv + self.compute


@dataclass
class Placement:
    """Layer -> device, with the byte budget of each device."""
    master: Backend
    layer_backends: list[Backend]
    shares: list[DeviceShare] = field(default_factory=list)
    how: str = "single device"

    @classmethod
    def single(cls, backend: Backend, n_layer: int) -> Placement:
        return cls(backend, [backend] * n_layer)

    @property
    def devices(self) -> list[Backend]:
        seen: dict[int, Backend] = {id(self.master): self.master}
        for b in self.layer_backends:
            seen.setdefault(id(b), b)
        return list(seen.values())

    def layer_backend(self, il: int) -> Backend:
        return self.layer_backends[il]

    def backends_for(self, name: str) -> list[Backend]:
        """Where a weight goes: its layer's device, the master (io), or every device (shared; the first
        is the one the graph names, the others hold replicas)."""
        role, il = tensor_role(name)
        if role == "layer" and il < len(self.layer_backends):
            return [self.layer_backends[il]]
        if role == "io":
            return [self.master]
        return self.devices

    def layers_of(self, backend: Backend) -> list[int]:
        return [il for il, b in enumerate(self.layer_backends) if b is backend]

    def describe(self) -> str:
        """The start-up table: which layers where, bytes per device."""
        lines = [f"placement ({self.how}):"]
        width = max((len(s.backend.name) for s in self.shares), default=0) + 9
        for s in self.shares:
            what = f"layers {_ranges(s.layers)}" if s.layers else "no layers"
            if s.is_master:
                what += " + input/output"
            label = s.backend.name + (" (master)" if s.is_master else "")
            lines.append(f"  {label:<{width}} {what:<24} weights {s.weights / MiB:8.1f} MiB, KV {s.kv / MiB:7.1f} MiB, "
                         f"compute ~{s.compute / MiB:6.1f} MiB; {s.free / MiB:.0f} MiB free")
        return "\n".join(lines)


def _ranges(items: Sequence[int]) -> str:
    out, start = [], None
    for i, x in enumerate(items):
        if start is None:
            start = x
        if i + 1 == len(items) or items[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def parse_tensor_split(text: str) -> list[float]:
    """'3,1' -> [3.0, 1.0]; a PlacementError names what is wrong."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlacementError(f"--tensor-split {text!r}: expected comma-separated numbers") from None
    if not vals or any(not 0 <= v < float("inf") for v in vals) or sum(vals) <= 0:
        raise PlacementError(f"--tensor-split {text!r}: proportions must be non-negative with a positive sum")
    return vals


def place(costs: ModelCosts, devices: Sequence[Backend], master: Backend,
          tensor_split: Sequence[float] | None = None,
          memory: Sequence[tuple[int, int]] | None = None, *, master_layers: bool = True) -> Placement:
    """Assign layers to `devices` (the master among them); PlacementError if some device cannot hold its
    share. `memory` overrides the (free, total) each device reports (tests, dry runs). Without
    `master_layers` (a CPU master: host RAM would outweigh every GPU), the split by free memory leaves the
    master out and gives it only the layers the other devices cannot hold, as llama.cpp keeps the layers
    beyond -ngl on the CPU; an explicit tensor_split still decides alone."""
    if not any(d is master for d in devices):
        raise PlacementError("the master device must be one of the devices")
    mem = list(memory) if memory is not None else [d.memory() for d in devices]
    shares = [DeviceShare(d, free, total, d is master) for d, (free, total) in zip(devices, mem)]
    costs_l = [w + k for w, k in zip(costs.layer_weights, costs.layer_kv)]
    if tensor_split is not None:
        if len(tensor_split) != len(devices):
            names = ", ".join(d.name for d in devices)
            raise PlacementError(f"--tensor-split has {len(tensor_split)} values for {len(devices)} devices "
                                 f"({names})")
        if any(v < 0 for v in tensor_split) or sum(tensor_split) <= 0:
            raise PlacementError("--tensor-split proportions must be non-negative with a positive sum")
        how = "--tensor-split " + ",".join(f"{v:g}" for v in tensor_split)
        assign = _proportional(costs_l, list(tensor_split))
    else:
        how = "by free memory"
        avail = [max(s.free - _fixed(costs, s.is_master, True), 0) for s in shares]
        if not master_layers and len(shares) > 1:
            avail = [0 if s.is_master else a for s, a in zip(shares, avail)]
            how += ", workers first"
        assign = _proportional(costs_l, [float(a) for a in avail]) if sum(avail) > 0 else []
        if not assign or not _fits(costs, shares, assign):
            assign = _greedy(costs, shares, costs_l)
    placement = _build(costs, shares, assign, master, how)
    _check_fit(costs, placement, tensor_split is not None)
    return placement


def _fixed(costs: ModelCosts, is_master: bool, has_layers: bool) -> int:
    """Bytes a device needs besides its layers."""
    n = costs.compute_layers + costs.shared_weights if has_layers else 0
    if is_master:
        n += costs.io_weights + costs.compute_master + (0 if has_layers else costs.shared_weights)
    return n


def _proportional(costs: list[int], weights: list[float]) -> list[int]:
    """Consecutive layers by cumulative bytes: layer i goes to the device whose slice of [0, 1) holds
    the middle of the layer (llama.cpp cuts by layer count; bytes differ only for uneven layers)."""
    total_w = sum(weights)
    cum, acc = [], 0.0
    for w in weights:
        acc += w / total_w
        cum.append(acc)
    # a device with weight 0 owns an empty slice, so bisect never lands in it; clamp rounding at 1.0
    last = max(i for i, w in enumerate(weights) if w > 0)
    total = sum(costs) or 1
    out, done = [], 0
    for c in costs:
        out.append(min(bisect.bisect_right(cum, (done + c / 2) / total), last))
        done += c
    return out


def _greedy(costs: ModelCosts, shares: list[DeviceShare], costs_l: list[int]) -> list[int]:
    """Fill devices in order, each up to its free memory: used when proportional rounding overflows one."""
    out, d = [], 0
    used = [_fixed(costs, s.is_master, False) for s in shares]
    started = [False] * len(shares)
    for c in costs_l:
        while d < len(shares):
            extra = 0 if started[d] else _fixed(costs, shares[d].is_master, True) - used[d]
            if used[d] + extra + c <= shares[d].free:
                used[d] += extra + c
                started[d] = True
                break
            d += 1
        out.append(d)   # len(shares) means "nowhere": _build reports it
    return out


def _build(costs: ModelCosts, shares: list[DeviceShare], assign: list[int], master: Backend,
           how: str) -> Placement:
    for il, d in enumerate(assign):
        if d >= len(shares):
            raise PlacementError(_too_big(costs, shares))
        s = shares[d]
        s.layers.append(il)
        s.weights += costs.layer_weights[il]
        s.kv += costs.layer_kv[il]
    for s in shares:
        if s.layers:
            s.weights += costs.shared_weights
            s.compute += costs.compute_layers
        if s.is_master:
            s.weights += costs.io_weights + (0 if s.layers else costs.shared_weights)
            s.compute += costs.compute_master
    return Placement(master, [shares[d].backend for d in assign], shares, how)


def _fits(costs: ModelCosts, shares: list[DeviceShare], assign: list[int]) -> bool:
    trial = [DeviceShare(s.backend, s.free, s.total, s.is_master) for s in shares]
    if any(d >= len(trial) for d in assign):
        return False
    _build(costs, trial, assign, trial[0].backend, "")
    return all(s.need <= s.free for s in trial)


def _too_big(costs: ModelCosts, shares: list[DeviceShare]) -> str:
    free = ", ".join(f"{s.backend.name} {s.free / MiB:.1f} MiB" for s in shares)
    return (f"{costs.name}: does not fit: it needs about {costs.total / MiB:.1f} MiB (weights "
            f"{(sum(costs.layer_weights) + costs.io_weights + costs.shared_weights) / MiB:.1f}, KV cache "
            f"{sum(costs.layer_kv) / MiB:.1f}, compute ~{(costs.compute_layers + costs.compute_master) / MiB:.1f}) "
            f"but the devices have {free} free (use a smaller --ctx or more workers)")


def _check_fit(costs: ModelCosts, placement: Placement, explicit: bool) -> None:
    over = [s for s in placement.shares if s.need > s.free]
    if not over:
        return
    if not explicit:
        raise PlacementError(_too_big(costs, placement.shares))
    s = over[0]
    raise PlacementError(f"{costs.name}: {placement.how} puts {s.need / MiB:.1f} MiB on {s.backend.name} "
                         f"(layers {_ranges(s.layers) or 'none'}) but it has {s.free / MiB:.1f} MiB free")
