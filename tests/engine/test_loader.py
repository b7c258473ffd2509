"""GGUF loading: our parser agrees with gguf.GGUFReader, weights stay in their stored types, and every
kind of bad file is one clear line (also from the CLI: exit code != 0, no traceback)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.engine.gguf_file import GGUFError, GGUFFile
from hybridllm.engine.runner import load
from hybridllm.ggml.types import GGMLType
from hybridllm.models import ModelError
from hybridllm.testing.synth import model_path, write_model

CLI = [sys.executable, "-c", "import sys; from hybridllm.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_path(tmp_path_factory.mktemp("loader"), "qwen2", "q4_k")


def test_matches_gguf_reader(synth: Path) -> None:
    ref = gguf.GGUFReader(synth)
    f = GGUFFile(synth)
    assert f.arch == "qwen2" and f.version == ref.fields["GGUF.version"].contents()
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = f.metadata[key]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        if isinstance(want, float):
            assert got == pytest.approx(want), key
        else:
            assert got == want, key
    assert len(f.tensors) == len(ref.tensors)
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.type == int(t.tensor_type) and info.nbytes == t.n_bytes
        assert info.ne[:len(t.shape)] == tuple(int(x) for x in t.shape)
        assert np.array_equal(f.tensor_data(t.name), t.data.view(np.uint8).reshape(-1)), t.name
    f.close()


def test_weights_keep_their_type(synth: Path) -> None:
    runner = load(synth, device=NumpyBackend(), n_ctx=256)
    with GGUFFile(synth) as f:
        for name, t in runner.model.weights.items().items():
            info = f.tensors[name]
            assert t.type == info.type and t.ne == info.ne
            stored = runner.backend.get(t.buffer, t.offset, t.nbytes)  # type: ignore[arg-type]
            assert stored == f.tensor_data(name).tobytes(), name
    assert runner.model.weights["blk.0.attn_q.weight"].type == GGMLType.Q4_K  # not dequantized
    runner.close()


def _expect(path: Path, fragment: str) -> None:
    with pytest.raises(GGUFError) as exc:
        load(path, device=NumpyBackend(), n_ctx=256)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg, msg


def test_bad_files(tmp_path: Path, synth: Path) -> None:
    data = synth.read_bytes()
    (tmp_path / "short.gguf").write_bytes(b"GGUF")
    _expect(tmp_path / "short.gguf", "not a GGUF file")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    _expect(tmp_path / "magic.gguf", "bad magic")
    (tmp_path / "header.gguf").write_bytes(data[:2000])
    _expect(tmp_path / "header.gguf", "truncated")
    (tmp_path / "data.gguf").write_bytes(data[:-100])
    _expect(tmp_path / "data.gguf", "truncated")
    _expect(tmp_path / "missing.gguf", "cannot open")


def test_unknown_arch_and_missing_tensor(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "mamba9")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelError, match="unknown architecture 'mamba9'"):
        load(tmp_path / "arch.gguf", device=NumpyBackend())

    # a complete llama whose layer-1 ffn_up is dropped on the way out
    src = write_model(tmp_path / "full.gguf", "llama", "q8_0")
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "hole.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        val = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, val, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, val, vtype)
    for t in r.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load(tmp_path / "hole.gguf", device=NumpyBackend())


def test_unsupported_tensor_type(tmp_path: Path, synth: Path) -> None:
    data = bytearray(synth.read_bytes())
    f = GGUFFile(synth)
    name = b"blk.0.attn_q.weight"
    f.close()
    pos = data.index(name) + len(name)          # tensor info: name, n_dims u32, dims u64.., type u32
    n_dims = int.from_bytes(data[pos:pos + 4], "little")
    type_pos = pos + 4 + 8 * n_dims
    data[type_pos:type_pos + 4] = (4).to_bytes(4, "little")  # 4 = removed Q4_2
    (tmp_path / "type.gguf").write_bytes(bytes(data))
    _expect(tmp_path / "type.gguf", "unsupported type id 4")


def test_cli_one_line_errors(tmp_path: Path, synth: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(synth.read_bytes()[:5000])
    for args in (["run", str(broken), "-p", "hi"], ["info", str(broken)], ["bench", str(broken)],
                 ["run", str(tmp_path / "nope.gguf")]):
        proc = subprocess.run(CLI + args, capture_output=True, text=True, check=False, timeout=60,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"hybridllm {args[0]}: error:"), lines


def test_cli_info(synth: Path) -> None:
    proc = subprocess.run(CLI + ["info", str(synth), "--json"], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json
    d = json.loads(proc.stdout)
    assert d["arch"] == "qwen2" and d["hparams"]["n_layer"] == 2
    assert d["tensor_types"]["q4_K"]["count"] > 0 and d["memory"]["weights"] > 0
