"""Hugging Face checkpoint folders: validated lazy reading, and a streaming sharded safetensors writer.

The writer knows every tensor's name, shape and dtype up front (from the model config), so it writes
each file's header first and then each tensor straight to its offset as soon as it is produced: peak
memory is one tensor, not one shard file. The file format is safetensors' documented layout
(8-byte little-endian header size, JSON header with `data_offsets`, then the raw little-endian bytes).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_apo.config import InputError, MissingInputError
from megatron_apo.dtypes import DTYPE_NAMES, torch_dtype
from megatron_apo.models.checksums import CHECKSUM_FILE, CheckpointCorrupt, checksum_files, verify_checkpoint

SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFE = {v: k for k, v in SAFE_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


ROW_BLOCK_BYTES = 64 << 20  # get_rows(out=...): rows copied per block


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().replace("torch.", "")
    if key not in DTYPE_NAMES:
        raise InputError(f"--dtype {name!r} is not supported; use one of float32, bfloat16, float16")
    return torch_dtype(key)


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes (HF's decimal units), '500MiB' -> 500 * 2**20, or a plain integer."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise InputError(f"max shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of one safetensors file's header (name -> dtype, shape, data_offsets), and where
    the data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InputError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise InputError(f"{path}: not a safetensors file (header size {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            raise InputError(f"{path}: corrupt safetensors header (entry {name!r} lacks dtype/shape/data_offsets)")
    return header, 8 + n


@dataclass
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class HFCheckpoint:
    """An HF model folder: config.json plus model.safetensors or sharded files with an index.

    Opening reads only headers; `get(name)` reads one tensor (files are memory-mapped by safetensors).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MissingInputError(f"HF checkpoint folder {self.folder} does not exist")
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise MissingInputError(f"{cfg_path} is missing; an HF checkpoint folder needs config.json")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
        try:  # folders this project exported carry CRC32s of their shards (others have none: safetensors is data)
            verify_checkpoint(self.folder, collective=False, allow_unverified=True, refuse_unlisted=False)
        except CheckpointCorrupt as e:
            raise CheckpointCorrupt(f"{e}; if the weights were replaced on purpose, delete "
                                    f"{self.folder / CHECKSUM_FILE}") from None
        self.tensors: dict[str, TensorInfo] = {}
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
            where = f"listed in {index}"
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map, files, where = None, [SINGLE_FILE], ""
        else:
            raise MissingInputError(f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE} "
                                    f"(only safetensors is supported)")
        for fname in files:
            path = self.folder / fname
            if not path.is_file():
                raise MissingInputError(f"safetensors shard {path} {where} is missing")
            header, data_start = read_safetensors_header(path)
            size = path.stat().st_size
            for name, entry in header.items():
                if entry["dtype"] not in SAFE_DTYPES:
                    raise InputError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
                info = TensorInfo(fname, SAFE_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                  data_start + entry["data_offsets"][0])
                if entry["data_offsets"][1] - entry["data_offsets"][0] != info.nbytes or \
                        data_start + entry["data_offsets"][1] > size:
                    raise InputError(f"{path}: tensor {name} has inconsistent data offsets (truncated file?)")
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.tensors or self.tensors[name].file != fname:
                    raise InputError(f"{index}: tensor {name} is mapped to {fname} but that file does not hold it")
        self._handles: dict = {}  # plain files, for whole-tensor reads

    def dtype(self) -> torch.dtype:
        """The floating dtype most of the weights are stored in (by bytes)."""
        by: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else torch.float32

    def validate(self, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Config/weights agreement: every tensor the config implies exists with the right shape."""
        for name, shape in expected_shapes.items():
            if name not in self.tensors:
                raise InputError(f"{self.folder}: tensor {name} is missing but config.json implies it "
                                 f"(config and weights do not match)")
            if self.tensors[name].shape != tuple(shape):
                raise InputError(f"{self.folder}: tensor {name} has shape {list(self.tensors[name].shape)} but "
                                 f"config.json implies {list(shape)} (config and weights do not match)")

    def get(self, name: str) -> torch.Tensor:
        """Reads one tensor with a plain file read (no memory map, so the process holds only this tensor)."""
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.folder}: tensor {name} not found")
        if info.file not in self._handles:
            self._handles[info.file] = open(self.folder / info.file, "rb")
        f = self._handles[info.file]
        out = torch.empty(info.shape, dtype=info.dtype)
        f.seek(info.offset)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if f.readinto(view) != info.nbytes:
            raise InputError(f"{self.folder / info.file}: tensor {name} is truncated")
        return out

    def get_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, reading only their bytes (vocab tensors are the largest), through
        safetensors' `get_slice`; copied into `out` (contiguous, same dtype, rows clipped to the tensor) when given."""
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.folder}: tensor {name} not found")
        stop = min(stop, info.shape[0])
        shape = (max(0, stop - start), *info.shape[1:])
        if out is not None and (tuple(out.shape) != shape or out.dtype != info.dtype or not out.is_contiguous()):
            raise InputError(f"{name}: cannot read rows {start}:{stop} into a {tuple(out.shape)} {out.dtype} tensor")
        if shape[0] == 0:
            return out if out is not None else torch.empty(shape, dtype=info.dtype)
        from safetensors import safe_open

        path = str(self.folder / info.file)
        if out is None:
            with safe_open(path, framework="pt") as f:
                return f.get_slice(name)[start:stop]
        # get_slice copies out of a memory map whose touched pages count as this process's memory until it is
        # closed: read in blocks (<= 64 MB), each through its own short-lived map, so neither copy nor map grows.
        row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
        block = max(1, ROW_BLOCK_BYTES // row_bytes)
        for lo in range(start, stop, block):
            hi = min(stop, lo + block)
            with safe_open(path, framework="pt") as f:
                out[lo - start:hi - start].copy_(f.get_slice(name)[lo:hi])
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class ShardedSafetensorsWriter:
    """Writes a known set of tensors into `model-0000i-of-0000N.safetensors` + the index, one tensor at a time.

    `specs` (ordered name -> (shape, dtype)) fixes the layout up front; `write` may come in any order.
    """

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.folder = Path(folder)
        self.specs = specs
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in specs.items():
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.total_size = 0
        self.weight_map: dict[str, str] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute offset, nbytes)
        self._files = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                shape, dtype = specs[name]
                nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
                header[name] = {"dtype": TORCH_TO_SAFE[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the safetensors library writes it
            start = 8 + len(raw)
            f = open(self.folder / fname, "wb")
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + offset)
            self._files[fname] = f
            for name in names:
                b, e = header[name]["data_offsets"]
                self._where[name] = (fname, start + b, e - b)
                self.weight_map[name] = fname
            self.total_size += offset
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not part of the planned HF checkpoint")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Writes rows [row_start, row_start + len(rows)) of a planned tensor (so a large tensor can be
        streamed in blocks); the tensor counts as written once all its rows have come."""
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not part of the planned HF checkpoint")
        shape, dtype = self.specs[name]
        full_rows = shape[0] if shape else 1
        if (tuple(rows.shape[1:]) != tuple(shape[1:]) or rows.dtype != dtype
                or row_start + (rows.shape[0] if shape else 1) > full_rows):
            raise ValueError(f"tensor {name}: got rows {row_start}+{tuple(rows.shape)} {rows.dtype}, planned "
                             f"{tuple(shape)} {dtype}")
        fname, offset, nbytes = self._where[name]
        data = rows.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._files[fname]
        f.seek(offset + row_start * (nbytes // full_rows if full_rows else 0))
        f.write(memoryview(data))
        self._rows[name] = self._rows.get(name, 0) + (rows.shape[0] if shape else 1)
        if self._rows[name] == full_rows:
            self._written.add(name)

    def close(self) -> None:
        """Closes the files and writes the index; every planned tensor must have been written."""
        missing = [n for n in self.specs if n not in self._written]
        for f in self._files.values():
            f.close()
        if missing:
            raise ValueError(f"HF export incomplete: {len(missing)} tensors never written (first: {missing[0]})")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        # CRC32 of each shard, verified when this folder is read back (HFCheckpoint): a flipped byte is named
        sums = checksum_files(self.folder, only=sorted(self._files), collective=False)
        (self.folder / CHECKSUM_FILE).write_text(json.dumps({"algorithm": "crc32", "files": sums}, indent=1) + "\n")

    def abort(self) -> None:
        """Closes the files of an export being thrown away (the caller deletes them). On a
        full disk the flush fails again (ENOSPC): that second error must not bury the first."""
        for f in self._files.values():
            try:
                f.close()  # a failed flush still closes the file descriptor
            except OSError:
                pass


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
                      "added_tokens.json", "*.model", "chat_template*")


def copy_tokenizer_files(src: str | Path, dst: Path) -> list[str]:
    """Copies the tokenizer files of an HF folder (or a tokenizer folder); returns their names."""
    import shutil

    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer folder {src} does not exist")
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and p.name not in copied:
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    if not copied:
        raise FileNotFoundError(f"tokenizer folder {src} holds no tokenizer files (tokenizer.json, "
                                f"tokenizer_config.json, tokenizer.model, vocab.json, ...)")
    return copied
