"""The streaming safetensors writer and the validating reader (megatron_apo.models.safetensors_io),
checked against the safetensors library itself."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_apo.models.safetensors_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size


def test_writer_out_of_order_and_row_blocks_read_back_by_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=gen), "b": torch.randn(3, generator=gen).to(torch.bfloat16),
               "c": torch.randn(11, 4, generator=gen).to(torch.float16), "d": torch.randn(2, 2, generator=gen)}
    specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    w = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=100)
    w.write("d", tensors["d"])
    w.write_rows("c", 6, tensors["c"][6:])  # rows in any order
    w.write("b", tensors["b"])
    w.write_rows("c", 0, tensors["c"][:6])
    w.write("a", tensors["a"])
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                                     for t in tensors.values())
    back = {}
    for f in files:
        back.update(load_file(tmp_path / f))  # the reference reader accepts our files
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_refuses_wrong_tensors_and_incomplete_output(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, {"a": ((4, 2), torch.float32), "b": ((3,), torch.float32)}, 10**9)
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="not part of the planned"):
        w.write("z", torch.zeros(1))
    w.write_rows("a", 0, torch.zeros(2, 2))
    w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="1 tensors never written"):
        w.close()


def test_reader_rows_and_validation(tmp_path):
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    save_file({"x": t}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ck = HFCheckpoint(tmp_path)
    assert torch.equal(ck.get("x"), t) and torch.equal(ck.get_rows("x", 3, 20), t[3:])
    out = torch.empty(2, 4)
    ck.get_rows("x", 1, 3, out=out)
    assert torch.equal(out, t[1:3])
    with pytest.raises(ValueError, match="has shape \\[10, 4\\] but config.json implies \\[10, 5\\]"):
        ck.validate({"x": (10, 5)})
    with pytest.raises(ValueError, match="tensor y is missing"):
        ck.validate({"y": (1,)})
    ck.close()
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match="truncated"):
        HFCheckpoint(tmp_path)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
