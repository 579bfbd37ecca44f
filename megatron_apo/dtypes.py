"""The one table of dtype names a user may write (config fields, CLI flags), torch-free.

Config validation runs before torch is imported, so the table maps to torch attribute names
(`getattr(torch, DTYPE_NAMES[name])`); `torch_dtype` does that lookup. The safetensors header codes
("BF16", "F32", ...) are a different mapping and live with the file format in `models/safetensors_io.py`.
"""

from __future__ import annotations

DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def torch_dtype(name: str):
    """The torch dtype a table name stands for; KeyError for a name not in `DTYPE_NAMES` (callers say which field)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])
